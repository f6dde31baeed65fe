"""The README's and docs/api.md's own examples, run as a newcomer runs them: every command in their `sh`
code blocks that calls the API, against a stack started as `scripts/serve` starts it (no
CLIP_PRELOAD_LABEL_SETS: what scripts/serve preloads is what these examples meet), with cat.jpg and
dog.png in the working directory and the stack's port in place of 8080. Each answers 2xx the first
time, or the status its own comment says (a URL example "needs CLIP_URL_ALLOW_HOSTS": off by default).
`faas-cli invoke` lines need faas-cli and a real gateway: tests/test_faas_cli.py holds those."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.images import noise_image
from support.servers import Stack

from localrun import gateway

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/api.md")
BLOCK = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.S | re.M)
# What a command's own comment says it needs, and what it answers on a stack without it.
EXPECTED = {"needs CLIP_URL_ALLOW_HOSTS": (400, "url_disabled")}


def commands():
    """[(where, the URL= line before it, the command)] for every line of an sh block that runs curl."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in BLOCK.finditer(text):
            url_line = None
            first = text[:block.start()].count("\n") + 2
            for offset, line in enumerate(block.group(1).splitlines()):
                if re.match(r"\s*URL=", line):
                    url_line = line.strip()
                elif re.match(r"\s*curl\b", line):
                    found.append((f"{doc}:{first + offset}", url_line, line.strip()))
    return found


COMMANDS = commands()


def test_the_docs_show_commands_to_run():
    where = {w.split(":")[0] for w, _, _ in COMMANDS}
    assert where == set(DOCS) and len(COMMANDS) >= 10, COMMANDS
    assert any("label_set=cifar10" in command for _, _, command in COMMANDS)  # issue 25: it must work at once


@pytest.fixture(scope="module")
def served(clip_env, tmp_path_factory):
    """A stack as scripts/serve runs it: its own cold cache, no preload setting of ours."""
    env = {**clip_env, "CLIP_CACHE_DIR": str(tmp_path_factory.mktemp("docs-cache"))}
    stack = Stack(tmp_path_factory.mktemp("docs-stack"), env)
    stack.env.pop("CLIP_PRELOAD_LABEL_SETS", None)
    with stack as running:
        yield running


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pictures")
    (directory / "cat.jpg").write_bytes(noise_image("JPEG", size=(64, 48), seed=1))
    (directory / "dog.png").write_bytes(noise_image("PNG", size=(48, 64), seed=2))
    return directory


@pytest.mark.parametrize("where, url_line, command", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_each_documented_command_answers_as_documented(served, pictures, where, url_line, command):
    assert url_line or "127.0.0.1:8080" in command, f"{where}: no URL= line before {command!r}"
    port = f"127.0.0.1:{served.port}"
    # curl writes the body to a file and prints the status: the command itself is run as written
    script = "\n".join([
        'curl() { command curl -sS -o "$BODY" -w "%{http_code}" "$@"; }',
        (url_line or "").replace("127.0.0.1:8080", port),
        command.replace("127.0.0.1:8080", port),
    ])
    body = pictures / "body"
    run = subprocess.run(["bash", "-c", script], cwd=pictures, env={"BODY": str(body), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{where}: {command}\n{run.stderr}"
    status, answer = int(run.stdout.strip()), body.read_text(errors="replace")
    expected = next((e for note, e in EXPECTED.items() if note in command), None)
    if expected:
        assert status == expected[0] and f'"{expected[1]}"' in answer, f"{where}: {command}\n{status} {answer[:500]}"
    else:
        assert 200 <= status < 300, f"{where}: {command}\n{status} {answer[:500]}"


def test_scripts_serve_preloads_what_the_stacks_preload():
    """localrun.gateway's sets are the deployed stacks' own (one fact, two homes, held equal here)."""
    for stack in ("clip.yml", "clip.pro.yml", "clip.gpu.yml"):
        (fn,) = yaml.safe_load((ROOT / stack).read_text())["functions"].values()
        sets = [s.strip() for s in str(fn["environment"]["CLIP_PRELOAD_LABEL_SETS"]).split(",")]
        assert tuple(sets) == gateway.STACK_PRELOAD_LABEL_SETS, stack


def test_scripts_serve_keeps_an_explicit_preload_and_the_default_set():
    assert gateway.preload_label_sets({}) == "cifar100,cifar10"
    assert gateway.preload_label_sets({"CLIP_PRELOAD_LABEL_SETS": "imagenet1k"}) == "imagenet1k"
    assert gateway.preload_label_sets({"CLIP_LABEL_SET": "imagenet1k"}) == "imagenet1k,cifar100,cifar10"


def test_the_url_input_recipe_in_scripts_serve_help_works(clip_env, pictures, tmp_path):
    """scripts/serve --help's recipe, followed: a local file server, the two settings it shows, and the
    picture by URL classifies as the same bytes do. (localrun's own Stack: scripts/serve's default,
    no watchdog, functions on this machine's network.)"""
    import functools
    import http.server
    import threading

    import requests

    from localrun.stack import Stack as ServeStack

    help_text = subprocess.run([sys.executable, "-m", "localrun.gateway", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert gateway.TRY_URL_INPUT in help_text
    serve_line = next(line for line in gateway.TRY_URL_INPUT.splitlines() if line.strip().endswith("scripts/serve"))
    settings = dict(word.split("=", 1) for word in serve_line.split()[:-1])
    assert set(settings) == {"CLIP_URL_ALLOW_HOSTS", "CLIP_URL_ALLOW_NETWORKS"}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(pictures))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        with ServeStack(tmp_path, {**clip_env, **settings}) as stack:
            url = f"{stack.url}/function/clip"
            by_url = requests.post(url, json={"url": f"http://127.0.0.1:{files.server_port}/cat.jpg"}, timeout=60)
            direct = requests.post(url, data=(pictures / "cat.jpg").read_bytes(), timeout=60)
            assert by_url.status_code == direct.status_code == 200, by_url.text
            assert by_url.json()["predictions"] == direct.json()["predictions"]
    finally:
        files.shutdown()
