"""One home per fact: docs/configuration.md's table and the settings' declarations agree.

Every setting is declared once (settings.Setting: type, default, allowed values or range): clip's in
backend/clip/config.py (DECLARATIONS), index's in frontend/index/config.py (DECLARATIONS), the template
host's in template/python3-debian/settings.py (HOST_SETTINGS). Each declared variable has a row that
names its owner, shows its default and says what is allowed in the declaration's own words; each row is a
declared setting, or one marked as no setting whose reader is named here. clip's from_env() reads every
declaration, and a bad value stops it with one line naming the variable, the value and what is allowed.
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import settings
from clip import config

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "configuration.md"
LITERAL = re.compile(r"`([^`]*)`")
# Rows that are no setting: who reads them (a source that names them).
NOT_SETTINGS = {
    "FUNCTION_CPUS": ROOT / "template/python3-debian/cpus.py",  # the host publishes them for the function
    "FUNCTION_CPUS_SOURCE": ROOT / "template/python3-debian/cpus.py",
    "GATEWAY_CONNECTIONS": ROOT / "localrun/gateway.py",  # scripts/serve's local gateway
    "GATEWAY_UPSTREAM_TIMEOUT_S": ROOT / "localrun/gateway.py",
}
# Defaults the table describes in words rather than as one value: what each phrase means in Settings.
DESCRIBED = {
    "CLIP_PRELOAD_LABEL_SETS": lambda s: s.preload_label_sets == (s.default_label_set,),  # "the default set"
    "CLIP_LABEL_SETS_DIR": lambda s: s.label_sets_dir == "",  # "empty = the function's own label_sets/ only"
    "CLIP_MAX_BATCH": lambda s: s.max_batch == 0,  # "per dtype": 0 = precision.default_max_batch decides
    "CLIP_THREADS": lambda s: s.threads == 0,  # "the CPUs the process may use"
    "CLIP_DECODERS": lambda s: s.decoders == 0,  # "as many as the torch threads"
    "CLIP_URL_ALLOW_HOSTS": lambda s: s.url_allow_hosts == (),  # "empty = URL input off"
    "CLIP_URL_ALLOW_NETWORKS": lambda s: s.url_allow_networks == (),  # "empty = public addresses only"
}


def table_rows():
    """{variable: (default cell, allowed cell, meaning)} from the markdown table."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4 or set(cells[0]) <= set("-: ") or cells[0] == "variable":
            continue
        names = LITERAL.findall(cells[0])
        assert len(names) == 1, f"one variable per row: {cells[0]}"
        assert names[0] not in rows, f"{names[0]} has two rows"
        rows[names[0]] = tuple(cells[1:])
    return rows


def owner(meaning):
    """Who a row says reads the variable: clip (no mark), index, the template host, or none (no setting)."""
    if meaning.startswith("(index)"):
        return "index"
    if meaning.startswith(("(template host, not a setting)", "(local gateway")):
        return None
    return "host" if meaning.startswith("(template host") else "clip"


def declarations():
    from frontend.index import config as index_config
    return {"clip": config.DECLARATIONS, "host": settings.HOST_SETTINGS, "index": index_config.DECLARATIONS}


ROWS = table_rows()
DECLARED = {setting.name: (part, setting) for part, found in declarations().items() for setting in found}


def same(value, documented):
    if isinstance(value, tuple):
        return ",".join(value) == documented
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value) == documented
    try:
        return math.isclose(float(value), float(documented))
    except ValueError:
        return False


@pytest.fixture
def empty_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CLIP_") or name == "FUNCTION_WORKERS":
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_table_lists_the_clip_variables():
    assert {"CLIP_MODEL", "CLIP_PRETRAINED", "CLIP_DEVICE", "CLIP_DTYPE", "CLIP_MAX_QUEUE"} <= set(ROWS)
    assert owner(ROWS["CLIP_URL"][2]) == "index" and owner(ROWS["MAX_BODY_BYTES"][2]) == "host"


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_each_declared_setting_has_a_row_with_its_owner_default_and_what_is_allowed(name):
    part, setting = DECLARED[name]
    assert name in ROWS, f"{part} declares {name}, which docs/configuration.md does not list"
    default, allowed, meaning = ROWS[name]
    assert owner(meaning) == part, f"{name}: the row says {owner(meaning)} reads it; {part} declares it"
    assert allowed.startswith(setting.allowed()), f"{name}: allowed is {setting.allowed()!r}, the row says {allowed!r}"
    if name in DESCRIBED:
        assert DESCRIBED[name](config.Settings()), f"{name}: config's default does not match the table's '{default}'"
        return
    literal = LITERAL.match(default)
    assert literal, f"{name}: the table's default '{default}' is neither a value nor described in this test"
    shown = os.path.expanduser(literal.group(1)) if name == "CLIP_CACHE_DIR" else literal.group(1)
    declared = os.path.expanduser(setting.default) if name == "CLIP_CACHE_DIR" else setting.default
    assert same(declared, shown), f"{name}: the table says {shown!r}, the declaration {declared!r}"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_is_a_declared_setting_or_named_as_none(name):
    default, allowed, meaning = ROWS[name]
    if name in DECLARED:
        return
    assert owner(meaning) is None and allowed == "—", f"{name} is declared nowhere, and its row does not say so"
    source = NOT_SETTINGS[name].read_text()
    assert name in source, f"{name}: {NOT_SETTINGS[name].name} never reads it"
    literal = LITERAL.match(default)
    if literal:  # the local gateway's: read with that default
        read = re.search(r"environ\.get\(\s*\"%s\"\s*,\s*\"([^\"]*)\"" % name, source)
        assert read and same(read.group(1), literal.group(1)), (name, default)


def probe(setting, folder):
    """A valid value that is not the default (a folder that is there for a folder's setting)."""
    if setting.name == "CLIP_LABEL_SETS_DIR":
        return str(folder)
    if setting.choices:
        return next(choice for choice in reversed(list(setting.choices)) if choice != setting.default)
    if setting.kind in (int, float):
        value = setting.default + 1 if setting.maximum is None or setting.default + 1 <= setting.maximum \
            else setting.default - 1
        return str(max(value, setting.minimum if setting.minimum is not None else value))
    return "10.0.0.0/8" if setting.kind == "list" else "probe-value"


@pytest.mark.parametrize("setting", config.DECLARATIONS, ids=lambda setting: setting.name)
def test_from_env_reads_each_of_clips_declarations(empty_env, setting, tmp_path):
    base = config.from_env()
    empty_env.setenv(setting.name, probe(setting, tmp_path))
    changed = config.from_env()
    assert changed != base, f"setting {setting.name}={probe(setting, tmp_path)} changes nothing from_env() returns"


@pytest.mark.parametrize(("name", "value", "line"), [
    ("CLIP_MAX_BATCH", "eight", "CLIP_MAX_BATCH must be a whole number from 0 to 256, not 'eight'"),
    ("CLIP_DTYPE", "fp64", "CLIP_DTYPE must be one of auto, fp32, bf16, fp16, not 'fp64'"),
    ("CLIP_PRELOAD_LABEL_SETS", "cifar10,cifar1000",
     "CLIP_PRELOAD_LABEL_SETS must be a comma-separated list of cifar100, cifar10, imagenet1k, "
     "not 'cifar10,cifar1000'"),
    ("CLIP_URL_ALLOW_NETWORKS", "10.1.2.3/8",
     "CLIP_URL_ALLOW_NETWORKS must be networks such as 10.0.0.0/8, comma-separated, not '10.1.2.3/8' "
     "(10.1.2.3/8 has host bits set)"),
])
def test_a_bad_value_is_refused_in_one_line_naming_it(empty_env, name, value, line):
    empty_env.setenv(name, value)
    with pytest.raises(settings.SettingError) as refused:
        config.from_env()
    assert str(refused.value) == line


def test_a_bad_value_stops_the_function_as_its_handler_is_imported(tmp_path):
    """At start, not when a request or the model meets it: importing the handler (what the host does
    first) raises the one line, which the host logs before it exits 78 (EX_CONFIG)."""
    env = {**os.environ, "CLIP_DTYPE": "fp64", "PYTHONPATH": os.pathsep.join(
        str(ROOT / part) for part in ("backend", "template/python3-debian"))}
    done = subprocess.run([sys.executable, "-c", "import clip.handler"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == \
        "settings.SettingError: CLIP_DTYPE must be one of auto, fp32, bf16, fp16, not 'fp64'"


def test_choices_declared_where_torch_is_not_imported_are_the_modules_own():
    pytest.importorskip("torch")
    from clip import device_decode, labels, precision
    assert config.LABEL_SET_NAMES == tuple(labels.LABEL_SETS)
    assert config.DTYPE_SETTINGS == precision.SETTINGS
    assert config.DEVICE_DECODE_MODES == device_decode.MODES


def test_the_per_dtype_batch_defaults_are_the_tables():
    torch = pytest.importorskip("torch")
    from clip import precision
    default, _, _ = ROWS["CLIP_MAX_BATCH"]
    assert default.startswith("per dtype: `8` (CPU fp32), `16` (CPU bf16, CUDA)"), default
    assert precision.default_max_batch("cpu", torch.float32) == 8
    assert precision.default_max_batch("cpu", torch.bfloat16) == 16
    assert all(precision.default_max_batch("cuda", dtype) == 16
               for dtype in (torch.float32, torch.bfloat16, torch.float16))
