"""Requests held in a probe function's handler (tests/support/probe_function, `?hold=FOLDER`) until the
test lets them go: "in flight at this moment" by construction, never by "this takes longer than that"."""
import os
from pathlib import Path


class Held:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True)

    @property
    def params(self):
        return {"hold": str(self.folder)}

    def holding(self):
        """One entry per request now in a handler: the pid of the process holding it."""
        return [int(p.name.split("-")[0]) for p in self.folder.iterdir() if p.name != "release"]

    def release(self):
        (self.folder / "release").touch()


def sockets(pid):
    """How many sockets a process holds open: it has accepted a connection once this count grows."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))
