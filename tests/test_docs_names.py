"""docs/performance.md names settings and code that exist: every `UPPER_CASE` name in backticks is read
somewhere outside the docs (a setting, a build argument, an environment variable), and every
`module.name` is a module of this repository with that name in it, or a key path of an answer (each part a
quoted key in the code). A rename that leaves the doc behind (WARM_ARGS, structure.plain_single_scan) fails."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
SOURCES = [p for d in ("backend", "frontend", "template", "localrun", "benchmarks", "scripts", "deploy")
           for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
SOURCES += list(ROOT.glob("*.yml"))
CODE = "\n".join(p.read_text(errors="replace") for p in SOURCES)
NOT_SETTINGS = {"AVX2"}  # a processor feature, not something the code reads
TEXT = DOC.read_text()
UPPER = sorted(set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`", TEXT)) - NOT_SETTINGS)
DOTTED = sorted(set(re.findall(r"`([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)`", TEXT)) - {("clip", "yml")})


@pytest.mark.parametrize("name", UPPER)
def test_each_setting_named_is_read_by_the_code(name):
    assert re.search(rf"\b{name}\b", CODE), f"docs/performance.md names {name}, which nothing reads"


@pytest.mark.parametrize("module, name", DOTTED, ids=[".".join(d) for d in DOTTED])
def test_each_dotted_name_exists(module, name):
    files = [p for p in SOURCES if p.name == f"{module}.py"]
    if any(re.search(rf"^\s*(def|class)\s+{name}\b|^{name}\s*=", p.read_text(), re.M) for p in files):
        return
    assert f'"{module}"' in CODE and f'"{name}"' in CODE, \
        f"docs/performance.md names {module}.{name}: neither a module with {name} nor an answer's key path"
