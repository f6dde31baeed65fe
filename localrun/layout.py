"""Lay out a function's build context the way faas-cli does: the template's files at the root,
the handler folder copied into function/. The container and scripts/serve run the same tree."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template" / "python3-debian"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "tmp")


def layout(function_dir: Path, dest: str | Path, template: Path = TEMPLATE) -> Path:
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(template, dest, ignore=IGNORE)
    shutil.rmtree(dest / "function")  # the template's skeleton handler is replaced by the real one
    shutil.copytree(function_dir, dest / "function", ignore=IGNORE)
    return dest
