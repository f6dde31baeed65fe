"""Label sets an operator ships as files, read and checked once, at start (config.from_env).

A folder holds NAME.txt (one label per line) and optionally NAME.templates (one prompt per line, {} where
the label goes); each pair becomes label_set=NAME. Both are UTF-8; blank lines and lines starting with #
are ignored; other files (a README) are not read. Anything off stops the function with one line naming the
file and the line (LabelFileError, a settings.SettingError: the host logs it and exits 78). No torch here:
config.py imports this before the model exists."""

import os
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import settings

FUNCTION_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label_sets")
LABELS = ".txt"
TEMPLATES = ".templates"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # also a cache file's and a metric label's name
HOW = "one label per line; blank lines and lines starting with # are ignored"


class LabelFileError(settings.SettingError):
    """A label-set file the function cannot serve; str(): one line naming the file (and the line)."""


@dataclass(frozen=True)
class FileSet:
    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]  # empty: no NAME.templates, the prompts of custom labels (CLIP_CUSTOM_TEMPLATES)
    path: str  # the labels file, as messages name it
    shown: str  # where it came from, as GET / shows it: label_sets/NAME.txt or CLIP_LABEL_SETS_DIR/NAME.txt


def folders(setting_dir: str) -> list[tuple[str, str]]:
    """(folder, how GET / names it): the function's own label_sets/, then CLIP_LABEL_SETS_DIR's."""
    found = [(FUNCTION_FOLDER, "label_sets")]
    if setting_dir:
        if not os.path.isdir(setting_dir):
            relative = "" if os.path.isabs(setting_dir) else "; a relative path is read from the function's folder"
            raise LabelFileError(
                f"CLIP_LABEL_SETS_DIR must be a folder, not {setting_dir!r} (no such folder{relative})"
            )
        if os.path.realpath(setting_dir) != os.path.realpath(FUNCTION_FOLDER):
            found.append((setting_dir, "CLIP_LABEL_SETS_DIR"))
    return found


def read_all(
    places: Sequence[tuple[str, str]], taken: Mapping[str, str], max_labels: int, max_label_chars: int
) -> dict[str, FileSet]:
    """Every set the folders hold, by name; `taken`: names no file may use (the built-in sets), and why."""
    sets: dict[str, FileSet] = {}
    for folder, shown in places:
        if not os.path.isdir(folder):
            continue  # the function's own folder is optional
        files = sorted(f for f in os.listdir(folder) if not f.startswith(".") and f.endswith((LABELS, TEMPLATES)))
        for file in files:
            path = os.path.join(folder, file)
            name, suffix = os.path.splitext(file)
            if suffix == TEMPLATES:
                if not os.path.exists(os.path.join(folder, name + LABELS)):
                    raise LabelFileError(f"{path}: prompt templates for no label set (there is no {name}{LABELS})")
                continue
            if not NAME.fullmatch(name):
                raise LabelFileError(
                    f"{path}: a label set's name is letters, digits, _ and - (at most 64, starting with a letter "
                    f"or digit), not {name!r}"
                )
            clash = next((t for t in taken if t.lower() == name.lower()), None) or next(
                (s for s in sets if s.lower() == name.lower()), None
            )
            if clash in sets:
                raise LabelFileError(f"{path}: the label set {clash!r} is already read from {sets[clash].path}")
            if clash:
                raise LabelFileError(f"{path}: {clash!r} is {taken[clash]}; give the file another name")
            templates_path = os.path.join(folder, name + TEMPLATES)
            sets[name] = FileSet(
                name,
                read_labels(path, max_labels, max_label_chars),
                read_templates(templates_path) if os.path.exists(templates_path) else (),
                path,
                f"{shown}/{file}",
            )
    return sets


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text stripped) of each line that is neither blank nor a # comment."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise LabelFileError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise LabelFileError(f"{path}, line {number}: not UTF-8 text") from None
        if text and not text.startswith("#"):
            yield number, text


def read_labels(path: str, max_labels: int, max_label_chars: int) -> tuple[str, ...]:
    seen: dict[str, tuple[int, str]] = {}  # casefolded label -> (its line, as written)
    for number, label in _lines(path):
        where = f"{path}, line {number}"
        if len(label) > max_label_chars:
            raise LabelFileError(
                f"{where}: a label of {len(label)} characters; at most {max_label_chars} (CLIP_MAX_LABEL_CHARS)"
            )
        first = seen.get(label.casefold())
        if first:
            again = f"{label!r}" if first[1] == label else f"{label!r} ({first[1]!r} whatever the case)"
            raise LabelFileError(f"{where}: {again} repeats line {first[0]}")
        if len(seen) == max_labels:
            raise LabelFileError(f"{where}: label {max_labels + 1}; at most {max_labels} (CLIP_MAX_LABELS)")
        seen[label.casefold()] = (number, label)
    if not seen:
        raise LabelFileError(f"{path}: holds no label ({HOW})")
    return tuple(label for _, label in seen.values())


def read_templates(path: str) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for number, template in _lines(path):
        where = f"{path}, line {number}"
        try:
            slots = [
                (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None
            ]
        except ValueError:  # a lone { or }
            slots = [("?", "", None)]
        if any(slot != ("", "", None) for slot in slots):
            raise LabelFileError(f"{where}: only {{}} may stand in braces (write {{{{ and }}}} for a brace itself)")
        if not slots:
            raise LabelFileError(f"{where}: a template needs {{}} where the label goes, as in 'a photo of a {{}}.'")
        if template in seen:
            raise LabelFileError(f"{where}: {template!r} repeats line {seen[template]}")
        seen[template] = number
    if not seen:
        raise LabelFileError(f"{path}: holds no template (one per line, {{}} where the label goes)")
    return tuple(seen)
