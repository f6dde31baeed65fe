"""One home per fact: docs/configuration.md's table and backend/clip/config.py agree.

Every CLIP_* row of the table is a variable clip's config.py reads (or, for the rows marked
"(index)", one the index function reads), with the default the table shows; every CLIP_* variable
config.py reads has a row. What "reads" means is seen from the outside: setting the variable changes
what config.from_env() returns, so the test holds however config.py is written.
"""
import math
import os
import re
from pathlib import Path

import pytest
from clip import config

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "configuration.md"
CONFIG = ROOT / "backend" / "clip" / "config.py"
INDEX = ROOT / "frontend" / "index"
LITERAL = re.compile(r"`([^`]*)`")


def table_rows():
    """[(variables, default cell, meaning)] from the markdown table."""
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: ") or cells[0] == "variable":
            continue
        rows.append((LITERAL.findall(cells[0]), cells[1], cells[2]))
    return rows


def documented_defaults():
    """{variable: (default cell or that variable's own literal, meaning)} for every CLIP_* variable."""
    found = {}
    for names, default, meaning in table_rows():
        literals = LITERAL.findall(default)
        shared = len(names) > 1 and len(literals) == len(names) and re.fullmatch(r"(`[^`]*`,\s*)*`[^`]*`", default)
        for i, name in enumerate(names):
            if name.startswith("CLIP_"):
                found[name] = (f"`{literals[i]}`" if shared else default, meaning)
    return found


DOCUMENTED = documented_defaults()
CLIP_ROWS = sorted(name for name, (_, meaning) in DOCUMENTED.items() if not meaning.startswith("(index)"))
INDEX_ROWS = sorted(name for name, (_, meaning) in DOCUMENTED.items() if meaning.startswith("(index)"))
# Defaults the table describes in words rather than as one value: what each phrase means in Settings.
DESCRIBED = {
    "CLIP_PRELOAD_LABEL_SETS": lambda s: s.preload_label_sets == (s.default_label_set,),  # "the default set"
    "CLIP_MAX_BATCH": lambda s: s.max_batch == 0,  # "per dtype": 0 = precision.default_max_batch decides
    "CLIP_THREADS": lambda s: s.threads == 0,  # "all cores"
    "CLIP_DECODERS": lambda s: s.decoders == 0,  # "CLIP_THREADS, else all cores"
    "CLIP_URL_ALLOW_HOSTS": lambda s: s.url_allow_hosts == (),  # "empty = URL input off"
    "CLIP_URL_ALLOW_NETWORKS": lambda s: s.url_allow_networks == (),  # "empty = public addresses only"
}


@pytest.fixture
def empty_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CLIP_") or name == "FUNCTION_WORKERS":
            monkeypatch.delenv(name)
    return monkeypatch


def changed_fields(monkeypatch, name):
    """The Settings fields that setting `name` changes (tried with a number, a word, a list, a network)."""
    base = config.from_env()
    for probe in ("7", "probe-value", "probe-a,probe-b", "10.0.0.0/8"):
        monkeypatch.setenv(name, probe)
        try:
            settings = config.from_env()
        except ValueError:
            continue
        finally:
            monkeypatch.delenv(name)
        changed = {f for f in base.__dataclass_fields__ if getattr(settings, f) != getattr(base, f)}
        if changed:
            return changed, base
    return set(), base


def same(value, documented):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value) == documented or (isinstance(value, str) and value == os.path.expanduser(documented))
    try:
        return math.isclose(float(value), float(documented))
    except ValueError:
        return False


def test_the_table_lists_the_clip_variables():
    assert {"CLIP_MODEL", "CLIP_PRETRAINED", "CLIP_DEVICE", "CLIP_DTYPE", "CLIP_MAX_QUEUE"} <= set(CLIP_ROWS)
    assert "CLIP_URL" in INDEX_ROWS


@pytest.mark.parametrize("name", CLIP_ROWS)
def test_each_documented_clip_variable_is_read_with_the_documented_default(empty_env, name):
    fields, defaults = changed_fields(empty_env, name)
    assert fields, f"docs/configuration.md lists {name}, but setting it changes nothing config.from_env() returns"
    default, _ = DOCUMENTED[name]
    if name in DESCRIBED:
        assert DESCRIBED[name](defaults), f"{name}: config's default does not match the table's '{default}'"
        return
    literal = LITERAL.match(default)
    assert literal, f"{name}: the table's default '{default}' is neither a value nor described in this test"
    values = {field: getattr(defaults, field) for field in fields}
    assert any(same(value, literal.group(1)) for value in values.values()), \
        f"{name}: the table says {literal.group(1)!r}, config.from_env() gives {values}"


def test_every_clip_variable_config_reads_is_in_the_table():
    read = set(re.findall(r"[\"'](CLIP_[A-Z0-9_]+)[\"']", CONFIG.read_text()))
    assert read, "config.py reads no CLIP_* variable?"
    missing = sorted(read - set(CLIP_ROWS))
    assert not missing, f"backend/clip/config.py reads {missing}, which docs/configuration.md does not list"


@pytest.mark.parametrize("name", INDEX_ROWS)
def test_each_index_variable_is_read_by_index_with_the_documented_default(name):
    source = "\n".join(path.read_text() for path in sorted(INDEX.glob("*.py")))
    read = re.search(r"environ\.get\(\s*\"%s\"\s*,\s*\"([^\"]*)\"" % name, source)
    assert read, f"docs/configuration.md lists {name} for index, but frontend/index never reads it"
    default, _ = DOCUMENTED[name]
    assert same(read.group(1), LITERAL.match(default).group(1)), (name, read.group(1), default)


def test_the_per_dtype_batch_defaults_are_the_tables():
    torch = pytest.importorskip("torch")
    from clip import precision
    default, _ = DOCUMENTED["CLIP_MAX_BATCH"]
    assert default.startswith("per dtype: `8` (CPU fp32), `16` (CPU bf16, CUDA)"), default
    assert precision.default_max_batch("cpu", torch.float32) == 8
    assert precision.default_max_batch("cpu", torch.bfloat16) == 16
    assert all(precision.default_max_batch("cuda", dtype) == 16
               for dtype in (torch.float32, torch.bfloat16, torch.float16))
