"""Build the function images without Docker: faas-cli lays out the build contexts, podman builds them.

    scripts/images [clip] [index] [--build-arg KEY=VALUE ...] [--add NAME:PATH ...]

The same build as `faas-cli build -f clip.yml` on a machine with Docker. What it needs and makes:
- faas-cli ($FAAS_CLI, on PATH, or ../shared/bin): `faas-cli build --shrinkwrap -f <stack>` writes
  build/<name>/ (it does not apply the stack's build_args: they are passed to podman here).
- podman, runc, mmdebstrap (Debian packages). CONTAINERS_CONF names a containers.conf; when unset,
  build/images/containers.conf is used: runc (crun fails under hybrid cgroups) and open-file and
  process limits a container may have on any host.
- The Python base image from Debian's archive (mmdebstrap + podman import: python3, python3-venv,
  python-is-python3, ca-certificates), passed as PYTHON_IMAGE; no registry is needed.
- The watchdog image: FROM scratch with fwatchdog ($FWATCHDOG, on PATH, or ../shared/bin), tagged
  as the Dockerfile's WATCHDOG_IMAGE, after checking it is that version.
- Behind a TLS-intercepting (corporate) proxy the host's CA bundle is mounted into the build, so pip
  trusts what the proxy presents.
Images are named as the stack says (REGISTRY, TAG); podman's layer cache is kept between runs.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from localrun.layout import ROOT, TEMPLATE
from localrun.of_watchdog import find_fwatchdog, find_tool

STACKS = {"clip": "clip.yml", "index": "index.yml"}
BASE_IMAGE = "localhost/python3-debian-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""


def run(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | TextIO | None = None,
) -> subprocess.CompletedProcess[bytes]:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    stdout = sys.stderr if stdout is None else stdout  # stdout says only the images built
    return subprocess.run(list(command), check=True, env=env, cwd=cwd, stdout=stdout)


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("CONTAINERS_CONF"):
        conf = ROOT / "build" / "images" / "containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    return env


def image_exists(name: str, env: dict[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env).returncode == 0


def dockerfile_default(name: str) -> str:
    (value,) = re.findall(rf"^ARG {re.escape(name)}=(\S+)", (TEMPLATE / "Dockerfile").read_text(), re.MULTILINE)
    return value


def ensure_base_image(env: dict[str, str]) -> str:
    if not image_exists(BASE_IMAGE, env):
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "base.tar"
            run(["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tar)])
            run(["podman", "import", str(tar), BASE_IMAGE], env=env, stdout=subprocess.DEVNULL)
    return BASE_IMAGE


def ensure_watchdog_image(env: dict[str, str]) -> str:
    name = dockerfile_default("WATCHDOG_IMAGE")
    if image_exists(name, env):
        return name
    binary = find_fwatchdog()
    if not binary:
        sys.exit(f"images: no fwatchdog binary for {name}: set FWATCHDOG or put it on PATH")
    version = name.rsplit(":", 1)[1]
    said = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    if f"Version: {version}" not in said:
        sys.exit(f"images: {binary} is not of-watchdog {version}: {said.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(binary, Path(tmp) / "fwatchdog")
        (Path(tmp) / "Containerfile").write_text("FROM scratch\nCOPY fwatchdog /fwatchdog\n")
        run(["podman", "build", "--format", "docker", "-t", name, tmp], env=env)
    return name


def image_name(fn: dict) -> str:
    """The stack's image, its ${VAR:-default} parts expanded from the environment as faas-cli does."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), fn["image"])


def shrinkwrap(name: str, faas_cli: str) -> Path:
    run([faas_cli, "build", "--shrinkwrap", "-f", STACKS[name], "--filter", name], cwd=ROOT, stdout=subprocess.DEVNULL)
    return ROOT / "build" / name


def build(name: str, faas_cli: str, overrides: dict[str, str], extra: list[str], env: dict[str, str]) -> str:
    (fn,) = yaml.safe_load((ROOT / STACKS[name]).read_text())["functions"].values()
    context = shrinkwrap(name, faas_cli)
    for path in extra:
        shutil.copytree(path, context / "function" / Path(path).name, dirs_exist_ok=True)
    args = {
        "PYTHON_IMAGE": ensure_base_image(env),
        **{k: str(v) for k, v in fn.get("build_args", {}).items()},
        **overrides,
    }
    image = image_name(fn)
    command = ["podman", "build", "--format", "docker", "--layers", "-t", image]
    if os.path.exists(CA_BUNDLE):  # a TLS-intercepting proxy's CA, trusted inside the build too
        command += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    run([*command, str(context)], env=env)
    print(f"images: built {image} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return image


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(prog="scripts/images", description=__doc__.splitlines()[0])
    parser.add_argument("functions", nargs="*", metavar="FUNCTION", help="clip, index (default: both)")
    parser.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides the stack's build_args (e.g. TORCH_INDEX_URL=https://pypi.org/simple)",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="NAME:PATH",
        help="copy PATH into function NAME's function/ folder in its build context (a local model)",
    )
    args = parser.parse_args(argv or None)
    unknown = set(args.functions) - set(STACKS)
    if unknown:
        parser.error(f"unknown functions {sorted(unknown)}; known: {', '.join(STACKS)}")
    faas_cli = find_tool("faas-cli", "FAAS_CLI")
    if not faas_cli or not shutil.which("podman"):
        sys.exit("images: needs faas-cli (FAAS_CLI, PATH or ../shared/bin) and podman (scripts/setup --images)")
    overrides = dict(pair.split("=", 1) for pair in args.build_arg)
    env = podman_env()
    ensure_watchdog_image(env)
    for name in args.functions or list(STACKS):
        extra = [path for spec in args.add for fn, _, path in [spec.partition(":")] if fn == name]
        print(build(name, faas_cli, overrides, extra, env))


if __name__ == "__main__":
    main()
