"""Requests held in a probe function's handler (tests/support/probe_function, `?hold=FOLDER`) until the
test lets them go: "in flight at this moment" by construction, never by "this takes longer than that"."""
import os
import shutil
from pathlib import Path

from localrun.layout import ROOT


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


HELD_INIT = '''"""clip, with its init() held until the test removes {hold!r}: "still loading" for as long as the test
needs, on any machine (a test-side wrapper: the function's own files are unchanged)."""
import os
import time

from . import clip_handler
from .clip_handler import ERROR_CODES, NAME, alive, handle, sample  # noqa: F401


def init():
    deadline = time.monotonic() + 120
    while os.path.exists({hold!r}) and time.monotonic() < deadline:
        time.sleep(0.005)
    clip_handler.init()
'''


def clip_held_while(hold: Path, folder: Path) -> Path:
    """A copy of clip's handler folder whose init() waits while `hold` exists: register it in
    localrun.functions.FUNCTION_DIRS and start it like clip."""
    shutil.copytree(ROOT / "backend" / "clip", folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "handler.py").rename(folder / "clip_handler.py")
    (folder / "handler.py").write_text(HELD_INIT.format(hold=str(hold)))
    return folder
