"""A network of its own for one of-watchdog, as its container would give it.

of-watchdog 0.11.6 always serves its metrics on :8081 (its `metrics_port` is ignored), so a second
watchdog on one network panics. Each watchdog here runs in a named network namespace joined to ours by
a veth pair: the watchdog listens inside (`inside`), the function's host process stays in our network
and listens on our end of the pair (`outside`), where the watchdog proxies to it. So a function still
reaches whatever the caller runs on 127.0.0.1 (a test's fake upstream, another function), and the
caller reaches the watchdog at `inside`. Needs root and iproute2's `ip`, and util-linux's `nsenter`.
"""

import atexit
import functools
import os
import shutil
import subprocess
from pathlib import Path

PREFIX = "localrun"  # namespaces are named localrun-<owner pid>-<slot>, links lr<slot>o / lr<slot>i
SLOTS = 16384  # one /30 of 10.213.0.0/16 each


@functools.cache
def problem() -> str | None:
    """Why namespaces cannot be made here, or None when they can (tried once: root in a container may
    still lack the capability)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nsenter") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2, util-linux)"
    try:
        Network().close()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a network namespace here ({exc})"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _remove_orphans() -> None:
    """Namespaces left by a process that died before it could remove them."""
    for path in Path("/run/netns").glob(f"{PREFIX}-*-*") if Path("/run/netns").is_dir() else []:
        owner = int(path.name.split("-")[1])
        if not Path(f"/proc/{owner}").exists():
            _ip("netns", "del", path.name, check=False)


class Network:
    """A namespace and its veth pair, in the first free slot or in `slot` (the same addresses again);
    close() removes both, and so does this process's exit."""

    def __init__(self, wanted: int | None = None) -> None:
        _remove_orphans()
        for slot in range(SLOTS) if wanted is None else [wanted]:
            outer, inner = f"lr{slot}o", f"lr{slot}i"
            # creating the link is the claim on a slot: it fails if another process holds it
            made = _ip("link", "add", outer, "type", "veth", "peer", "name", inner, check=False)
            if made.returncode == 0:
                break
            if "exists" not in made.stderr:  # not a taken slot: no permission, no veth support
                raise RuntimeError(f"cannot add a veth pair: {made.stderr.strip()}")
        else:
            raise RuntimeError(f"no free veth slot for a watchdog's network (wanted: {wanted})")
        self.slot, self.name, self.closed = slot, f"{PREFIX}-{os.getpid()}-{slot}", False
        atexit.register(self.close)
        base = slot * 4
        self.outside = f"10.213.{base // 256}.{base % 256 + 1}"
        self.inside = f"10.213.{base // 256}.{base % 256 + 2}"
        try:
            _ip("netns", "add", self.name)
            _ip("link", "set", inner, "netns", self.name)
            _ip("addr", "add", f"{self.outside}/30", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("-n", self.name, "addr", "add", f"{self.inside}/30", "dev", inner)
            _ip("-n", self.name, "link", "set", inner, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            raise RuntimeError(f"cannot set up {self.name}: {exc.stderr.strip()}") from exc

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside this namespace."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--"]

    @staticmethod
    def back() -> list[str]:
        """The command prefix that runs a program (started inside) in this process's network again."""
        return ["nsenter", f"--net=/proc/{os.getpid()}/ns/net", "--"]

    def close(self) -> None:
        """Once only (explicitly, then at exit): the slot is released by deleting our end of the pair, and
        after that another process may claim it, so a second delete by name would take its link."""
        if self.closed:
            return
        self.closed = True
        _ip("link", "del", f"lr{self.slot}o", check=False)  # takes the inner link too: the slot is free
        _ip("netns", "del", self.name, check=False)  # named after this process: no one else's
