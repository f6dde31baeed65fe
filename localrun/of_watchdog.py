"""The real of-watchdog in front of a local function process, configured as the template's image
configures it (mode=http, the Dockerfile's ENV), so local runs and tests meet what a container meets.

fwatchdog is found as a user's machine would have it: $FWATCHDOG, on PATH, or ../shared/bin next to
the repository's root (where this project's CI keeps the binary built from of-watchdog's source).
"""

import os
import re
import shlex
import shutil
from pathlib import Path

from localrun import netns
from localrun.layout import ROOT, TEMPLATE

# Where the watchdog's own settings differ from the image's on purpose: the drain's pause before it
# stops accepting (5 s in the image, for Kubernetes endpoints to catch up) only slows local stops.
LOCAL_OVERRIDES = {"healthcheck_interval": "1s"}


def find_tool(name: str, variable: str) -> str | None:
    """A tool named by $variable, on PATH, or in ../shared/bin; None when absent."""
    for candidate in (os.environ.get(variable), shutil.which(name), str(ROOT.parent / "shared" / "bin" / name)):
        if candidate and os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    return None


def find_fwatchdog() -> str | None:
    return find_tool("fwatchdog", "FWATCHDOG")


def watchdog_for_many() -> tuple[str | None, str | None]:
    """(fwatchdog, None) when any number of functions can run behind it at once (each in a network
    namespace of its own: localrun.netns), else (None, why not)."""
    found = find_fwatchdog()
    if not found:
        return None, "no fwatchdog (of-watchdog 0.11.6): set FWATCHDOG, put it on PATH or in ../shared/bin"
    why_not = netns.problem()
    return (None, why_not) if why_not else (found, None)


def image_environment(dockerfile: Path = TEMPLATE / "Dockerfile") -> dict[str, str]:
    """The ENV the template's final image stage sets (key="value" pairs), as a dict."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


WATCHDOG_KEYS = (
    "fprocess",
    "mode",
    "upstream_url",
    "http_buffer_req_body",
    "suppress_lock",
    "exec_timeout",
    "read_timeout",
    "write_timeout",
    "healthcheck_interval",
    "prefix_logs",
    "max_inflight",
    "ready_path",
)


def watchdog_env(python: list[str], upstream: str, port: int, metrics_port: int, env: dict[str, str]) -> dict[str, str]:
    """The watchdog's variables from the image, then the caller's (a stack's timeouts), then the ports.
    `python` is the command that stands in for the image's `python`; `upstream` the host's URL."""
    image = image_environment()
    settings = {k: v for k, v in image.items() if k in WATCHDOG_KEYS}
    settings.update(LOCAL_OVERRIDES)
    settings.update({k: v for k, v in env.items() if k in WATCHDOG_KEYS})
    command = shlex.split(settings["fprocess"])
    if command[0] == "python":
        command[0:1] = python  # the venv's interpreter stands in for the image's
    settings.update(
        fprocess=" ".join(command),
        upstream_url=upstream,
        port=str(port),
        metrics_port=str(metrics_port),
    )
    return settings
