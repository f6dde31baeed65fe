"""scripts/serve as a user runs it: its function processes never outlive it, even when it is killed
outright, and a function that cannot start ends it, non-zero, with that function's reason in one line."""
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
import requests
from clip import config
from support.servers import WATCHDOG, WATCHDOG_ABSENT, FunctionProcess, Stack, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 90  # a function drains on SIGTERM; nothing is in flight here, so it is quick
STARTS_WITHIN_S = 180


@pytest.fixture(params=["bare", "watchdog"])
def watchdog(request):
    """Each test runs with the functions bare, then behind the real of-watchdog in their own networks."""
    if request.param == "watchdog" and not WATCHDOG:
        pytest.skip(WATCHDOG_ABSENT)
    return WATCHDOG if request.param == "watchdog" else None


class Serve:
    """scripts/serve in its own process, from `cwd`, its output in a file."""

    def __init__(self, tmp_path, env, *args, cwd=ROOT):
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        command = [str(ROOT / "scripts" / "serve"), "--port", str(self.port), "--build-dir", str(tmp_path / "b"), *args]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=out,
                                            stderr=subprocess.STDOUT)

    def output(self):
        return self.log.read_text(errors="replace")

    def wait(self, timeout):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"scripts/serve still runs after {timeout} s:\n{self.output()[-3000:]}")

    def kill_all(self):
        """Whatever is left of it and its children: a failing test leaves nothing running."""
        try:
            leftovers = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.Error:
            leftovers = []
        for process in leftovers:
            try:
                process.kill()
            except psutil.Error:
                pass
        self.process.wait(30)


def function_addresses(output):
    """(host, port) of each function the gateway started, from its start lines."""
    return [(host, int(port)) for host, port in re.findall(r"\w+: pid \d+ on http://([\d.]+):(\d+)", output)]


def refuses(address):
    try:
        socket.create_connection(address, timeout=2).close()
        return False
    except OSError:
        return True


# ---- the functions end with the gateway ---------------------------------------------------------------------------

def test_a_gateway_killed_outright_leaves_no_function_running(clip_env, tmp_path, watchdog):
    stack = Stack(tmp_path, clip_env, watchdog=watchdog).start()
    functions = psutil.Process(stack.process.pid).children(recursive=True)  # watchdogs and hosts
    addresses = function_addresses(stack.output())
    try:
        assert len(addresses) == 2 and not any(refuses(a) for a in addresses)
        assert len(functions) >= (4 if watchdog else 2)
        stack.process.send_signal(signal.SIGKILL)  # no handler, no atexit: only the kernel can say it
        stack.process.wait(30)
        _, alive = psutil.wait_procs(functions, timeout=GONE_WITHIN_S)
        assert not alive, f"still running after the gateway was killed: {alive}"
        assert all(refuses(a) for a in addresses)  # their ports are free
    finally:
        for process in functions:
            try:
                process.kill()
            except psutil.Error:
                pass
        stack.stop()


def test_a_host_outlives_no_watchdog_killed_outright(clip_env, tmp_path):
    """As in a container, whose processes end with its first: the host behind a SIGKILLed watchdog ends."""
    if not WATCHDOG:
        pytest.skip(WATCHDOG_ABSENT)
    # its drain waits for the watchdog that started it (not for its parent by then, init): gone at once,
    # not at the end of a drain timeout far beyond GONE_WITHIN_S
    env = {"CLIP_URL": "http://127.0.0.1:9/", "DRAIN_TIMEOUT_S": "3600"}
    fn = FunctionProcess("index", tmp_path, env, watchdog=WATCHDOG).start()
    host = psutil.Process(fn.host_pid)
    try:
        fn.process.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs([host], timeout=GONE_WITHIN_S)
        assert not alive
    finally:
        if host.is_running():
            host.kill()
        fn.stop()


# ---- a function that cannot start ends scripts/serve ----------------------------------------------------------------

def test_a_function_that_cannot_start_ends_scripts_serve_with_its_reason(clip_env, tmp_path, watchdog):
    serve = Serve(tmp_path, {**clip_env, "CLIP_MAX_BATCH": "abc"}, *([f"--watchdog={watchdog}"] if watchdog else []))
    try:
        assert serve.wait(STARTS_WITHIN_S) != 0
        output = serve.output()
        last = output.strip().splitlines()[-1]
        # the host exits 78 (EX_CONFIG) on a bad setting; of-watchdog, when it runs the host, exits 1 after it
        status = 1 if watchdog else 78
        assert last == f"gateway: clip could not start (exit status {status}): CLIP_MAX_BATCH must be a whole " \
                       "number from 0 to 256, not 'abc'"
        assert not [line for line in output.splitlines() if line.startswith("serving")]  # the gateway's line
        wait_until(lambda: all(refuses(a) for a in function_addresses(output)), GONE_WITHIN_S, what="index stopped")
    finally:
        serve.kill_all()


def test_scripts_serve_takes_a_watchdog_path_relative_to_where_it_is_run(clip_env, tmp_path):
    if not WATCHDOG:
        pytest.skip(WATCHDOG_ABSENT)
    here = tmp_path / "elsewhere"
    here.mkdir()
    serve = Serve(tmp_path, clip_env, "--watchdog", os.path.relpath(WATCHDOG, here), cwd=here)
    try:
        wait_until(lambda: "\nserving" in serve.output() or serve.process.poll() is not None, STARTS_WITHIN_S,
                   what="scripts/serve ready")
        assert serve.process.poll() is None, serve.output()[-3000:]
        for name in ("clip", "index"):  # both run behind the watchdog it found
            assert requests.get(f"http://127.0.0.1:{serve.port}/function/{name}/_/health", timeout=5).status_code == 200
        line = next(line for line in serve.output().splitlines() if line.startswith("serving"))
        assert line == f"serving http://127.0.0.1:{serve.port}/function/index (page) and " \
                       f"http://127.0.0.1:{serve.port}/function/clip (API)"
        serve.process.send_signal(signal.SIGTERM)
        assert serve.wait(GONE_WITHIN_S) == 0
    finally:
        serve.kill_all()


def test_a_watchdog_that_is_not_there_is_one_line_before_anything_starts(tmp_path):
    serve = Serve(tmp_path, {"CLIP_URL": "http://127.0.0.1:9/"}, "--watchdog", "no/such/fwatchdog")
    try:
        assert serve.wait(60) == 2
        output = serve.output()
        assert f"error: --watchdog no/such/fwatchdog: no executable file at {ROOT}/no/such/fwatchdog" in output
        assert "Traceback" not in output
        assert not [line for line in output.splitlines() if line.startswith(("starting", "serving"))]
    finally:
        serve.kill_all()


def test_index_alone_says_it_fronts_the_remote_clip_and_offers_no_clip_path(tmp_path):
    remote = "http://127.0.0.1:9/"
    serve = Serve(tmp_path, {"CLIP_URL": remote})
    try:
        wait_until(lambda: "\nserving" in serve.output() or serve.process.poll() is not None, STARTS_WITHIN_S,
                   what="scripts/serve ready")
        line = next(line for line in serve.output().splitlines() if line.startswith("serving"))
        assert line == f"serving http://127.0.0.1:{serve.port}/function/index (page), in front of the clip at {remote}"
        serve.process.send_signal(signal.SIGTERM)
        assert serve.wait(GONE_WITHIN_S) == 0
    finally:
        serve.kill_all()


# ---- the reason names the setting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, kind", [("CLIP_MAX_BATCH", "abc", "a whole number from 0 to 256"),
                                               ("CLIP_DEADLINE_S", "soon", "a number from 0 to 3600")])
def test_a_setting_that_is_not_a_number_is_named_in_one_line(monkeypatch, name, value, kind):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as error:
        config.from_env()
    assert str(error.value) == f"{name} must be {kind}, not {value!r}"


# ---- a network's slot is released once --------------------------------------------------------------------------

def test_a_network_closed_twice_leaves_the_next_owner_of_its_slot_alone():
    """close() runs explicitly, then again at exit: by then another function (or process) may hold the
    slot, and its link must survive."""
    from localrun import netns
    if netns.problem():
        pytest.skip(netns.problem())
    first = netns.Network()
    first.close()
    second = netns.Network(first.slot)
    try:
        first.close()  # what atexit does
        assert subprocess.run(["ip", "link", "show", f"lr{second.slot}o"], capture_output=True).returncode == 0
        assert subprocess.run(["ip", "netns", "exec", second.name, "ip", "link", "show", f"lr{second.slot}i"],
                              capture_output=True).returncode == 0
    finally:
        second.close()


def test_the_gateways_own_lines_are_written_whole():
    """stdout and stderr of scripts/serve often share one unbuffered file with the functions' logs: each
    of the gateway's lines goes out in one write, so no function's line lands inside it."""
    from localrun.supervisor import say

    class Stream:
        def __init__(self):
            self.writes = []
            self.buffer = self

        def write(self, data):
            self.writes.append(bytes(data))

        def flush(self):
            pass

    stream = Stream()
    say("serving http://127.0.0.1:8080/function/index (page)", stream)
    assert stream.writes == [b"serving http://127.0.0.1:8080/function/index (page)\n"]
