"""Request options (top_k, labels, label_set, embedding): validated, with a clear 400 for anything off."""

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from werkzeug.datastructures import MultiDict

from .errors import ClientError

if TYPE_CHECKING:
    from .config import Settings


@dataclass(frozen=True)
class Options:
    top_k: int
    label_set: str  # a built-in set name, or "custom"
    labels: tuple = ()  # custom labels, when given
    embedding: bool = False  # each picture's normalised image embedding in its result


@dataclass(frozen=True)
class OptionRules:
    """What options are checked against: the label sets there are, and the settings' defaults and limits."""

    label_sets: Collection[str]
    top_k: int  # CLIP_TOP_K
    default_label_set: str  # CLIP_LABEL_SET
    max_labels: int  # CLIP_MAX_LABELS
    max_label_chars: int  # CLIP_MAX_LABEL_CHARS

    @classmethod
    def of(cls, settings: "Settings", label_sets: Collection[str]) -> "OptionRules":
        return cls(
            tuple(label_sets), settings.top_k, settings.default_label_set, settings.max_labels, settings.max_label_chars
        )


def _one(options: MultiDict[str, Any], key: str) -> Any:
    values = options.getlist(key)
    return values[-1] if values else None


def parse_options(options: MultiDict[str, Any], rules: OptionRules) -> Options:
    top_k = _parse_top_k(_one(options, "top_k"), rules.top_k)
    embedding = parse_flag(_one(options, "embedding"), "embedding")
    labels = _parse_labels(options.getlist("labels"), rules)
    label_set = _one(options, "label_set")
    if label_set is None or label_set == "":
        label_set = rules.default_label_set
    if not isinstance(label_set, str) or label_set not in rules.label_sets:
        shown = repr(label_set)[:60]
        raise ClientError(
            400, "unknown_label_set", f"Unknown label_set {shown}; choose one of: {', '.join(rules.label_sets)}."
        )
    if labels:
        return Options(top_k=top_k, label_set="custom", labels=labels, embedding=embedding)
    return Options(top_k=top_k, label_set=label_set, embedding=embedding)


FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_flag(value: Any, name: str) -> bool:
    """A yes/no option: a JSON boolean (or 1/0), or true/false (1/0, yes/no, on/off) as text; absent or
    empty: no."""
    if value is None or value is False or value is True or (type(value) is int and value in (0, 1)):
        return bool(value)
    flag = FLAGS.get(value.strip().lower()) if isinstance(value, str) else None
    if isinstance(value, str) and not value.strip():
        return False
    if flag is None:
        raise ClientError(400, "invalid_option", f"{name} must be true or false.")
    return flag


def _json_list(text: str) -> Any:
    """labels=["cat","dog"] in a query or form: a JSON list, the one way to send labels holding commas
    there. Split on commas it would become '["cat"' and '"dog"]'."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested 100,000 deep
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClientError(
            400,
            "invalid_labels",
            'labels starting with "[" must be a JSON list of strings, e.g. ["cat","dog, running"] '
            "(the way to send labels holding commas); otherwise send comma-separated text: cat,dog.",
        )
    return value


def _parse_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ClientError(400, "invalid_option", "top_k must be a whole number of 1 or more.")
    try:
        top_k = int(value) if not isinstance(value, str) else int(value.strip(), 10)
    except (TypeError, ValueError):
        raise ClientError(400, "invalid_option", "top_k must be a whole number of 1 or more.") from None
    if top_k < 1:
        raise ClientError(400, "invalid_option", "top_k must be a whole number of 1 or more.")
    return top_k  # larger than the label count is clamped where the count is known


def _parse_labels(values: list[Any], rules: OptionRules) -> tuple[str, ...]:
    """labels: a JSON list of strings (a JSON body's list, or text starting with '[' in the query or a
    form), or comma-separated text."""
    values = [v for v in values if not (isinstance(v, str) and not v.strip())]  # an empty form field
    if not values:
        return ()
    labels = []
    for value in values:
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = _json_list(value)
        if isinstance(value, str):
            labels.extend(value.split(","))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            labels.extend(value)
        else:
            raise ClientError(400, "invalid_labels", "labels must be a list of strings or comma-separated text.")
    labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if not labels:
        raise ClientError(400, "invalid_labels", "labels was given but holds no label.")
    if len(labels) > rules.max_labels:
        raise ClientError(400, "too_many_labels", f"{len(labels)} labels sent; at most {rules.max_labels} per request.")
    too_long = next((label for label in labels if len(label) > rules.max_label_chars), None)
    if too_long is not None:
        raise ClientError(400, "invalid_labels", f"Each label may have at most {rules.max_label_chars} characters.")
    return tuple(labels)
