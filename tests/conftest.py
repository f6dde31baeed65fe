"""Shared fixtures: a tiny open_clip model directory and real servers (behind the real of-watchdog
where support.servers finds it)."""
import pytest
from support.servers import WATCHDOG, WATCHDOG_ABSENT, FunctionProcess, Stack
from support.tiny_model import make_tiny_model


def pytest_report_header():
    if WATCHDOG:
        return f"functions run behind the real of-watchdog ({WATCHDOG}), each in its own network namespace"
    return f"functions run without of-watchdog: {WATCHDOG_ABSENT}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def clip_env(tiny_model, tmp_path_factory):
    """Environment for a clip function on the tiny model, with its own embedding cache."""
    return {"CLIP_MODEL": f"local-dir:{tiny_model}", "CLIP_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
            "CLIP_PRELOAD_LABEL_SETS": "cifar100,cifar10",
            "CLIP_DTYPE": "fp32"}  # parity with open_clip's fp32 at 1e-4, whatever auto picks on this CPU


@pytest.fixture(scope="session")
def clip_server(clip_env, tmp_path_factory):
    """The clip function alone, started from its build context exactly as the container does."""
    with FunctionProcess("clip", tmp_path_factory.mktemp("clip-fn"), clip_env) as fn:
        yield fn


@pytest.fixture(scope="session")
def stack(clip_env, tmp_path_factory):
    """Both functions behind the local gateway, as `scripts/serve` runs them."""
    with Stack(tmp_path_factory.mktemp("stack"), clip_env) as running:
        yield running


def pytest_terminal_summary(terminalreporter, config):
    """The order's seed at the end too, where `-q` (CI) still shows it: a failure can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"tests ran in random order: replay it with --randomly-seed={seed}")
