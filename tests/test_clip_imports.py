"""clip's wiring goes one way: its modules import each other without a cycle, none hidden in a function
or behind TYPE_CHECKING, and the core imports no observability: only the edge (the handler) imports
metrics, and the core hands it what it measured. Read from the sources (ast), so every import counts,
wherever it is written."""
import ast
from pathlib import Path

import pytest

CLIP = Path(__file__).resolve().parents[1] / "backend" / "clip"
MODULES = sorted(path.stem for path in CLIP.glob("*.py") if path.stem != "__init__")
EDGE = {"handler"}  # where a request comes in: it records what the core measured
OBSERVABILITY = {"metrics"}


def imported(module):
    """The clip modules `module` imports, at the top, in a function or under TYPE_CHECKING alike."""
    tree = ast.parse((CLIP / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "clip":
            found.add((node.module.split(".") + [alias.name for alias in node.names])[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("clip.")}
    return found & set(MODULES)


GRAPH = {module: imported(module) for module in MODULES}


def cycle():
    """One import cycle of the graph, as a list of modules, or None."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in MODULES:
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_scan_sees_imports_of_every_kind():
    """A function-level import (handler's of service) and a TYPE_CHECKING one (labels' of model) count."""
    assert "service" in GRAPH["handler"] and "model" in GRAPH["labels"]
    assert "errors" in GRAPH["batcher"] and "metrics" in GRAPH["handler"]


def test_clip_has_no_import_cycle():
    assert cycle() is None, " -> ".join(cycle())


@pytest.mark.parametrize("module", sorted(set(MODULES) - EDGE - OBSERVABILITY))
def test_the_core_imports_no_observability(module):
    assert not GRAPH[module] & OBSERVABILITY, f"{module} imports {GRAPH[module] & OBSERVABILITY}"


def test_observability_imports_none_of_the_core_but_the_error_catalogue():
    for module in OBSERVABILITY:
        assert GRAPH[module] <= {"errors"}, f"{module} imports {GRAPH[module]}"


def calls(module):
    """The names a module calls (f(...) and x.f(...)): what it does, not only what it imports."""
    tree = ast.parse((CLIP / f"{module}.py").read_text())
    return {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree) if isinstance(node, ast.Call)}


def test_the_service_sees_no_raw_input():
    """The door (request.parse_request) parses the body and checks the options; the service takes what
    it returns and never parses a request or its options itself."""
    assert not calls("service") & {"parse_options", "parse_request", "sort_body"}
    assert "parse_request" in calls("handler")


def test_no_data_object_calls_back_into_the_service():
    """request.Item and request.Request are data: no methods (an Item once ranked itself with the
    service's rank)."""
    tree = ast.parse((CLIP / "request.py").read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for name in ("Item", "Request"):
        assert not [f.name for f in classes[name].body if isinstance(f, ast.FunctionDef)], name
