"""A function for testing the template host itself (no model): says which process answered, sleeps or
holds on request, and its init() can be made slow or failing per worker through the environment."""
import os
import time
import uuid
from pathlib import Path

from settings import Setting, read

# read at import, as a function's config module does: a bad value stops the host at start
SETTINGS = read([Setting("PROBE_SLEEP_CAP_S", float, 10.0, minimum=0, maximum=60, doc="longest ?sleep")])


def init():
    worker = os.environ.get("FUNCTION_WORKER", "0")
    if os.environ.get("PROBE_FAIL_INIT") == worker:
        raise RuntimeError(f"worker {worker}: init failed on purpose")
    time.sleep(float(os.environ.get(f"PROBE_INIT_S_{worker}", "0")))


def hold(folder):
    """?hold=FOLDER: say so with a file in FOLDER named for this process, then wait until FOLDER/release
    exists (a minute at most): a test then knows which requests are in the handler, and for how long."""
    (folder / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + 60
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def handle(event, context):
    time.sleep(min(float(event.query.get("sleep", "0") or 0), SETTINGS["PROBE_SLEEP_CAP_S"]))
    if event.query.get("hold"):
        hold(Path(event.query["hold"]))
    return {"statusCode": 200, "body": {"pid": os.getpid(), "worker": os.environ.get("FUNCTION_WORKER"),
                                        "workers": os.environ.get("FUNCTION_WORKERS"),
                                        "prometheus_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                                        "cpus": os.environ.get("FUNCTION_CPUS"),
                                        "cpus_source": os.environ.get("FUNCTION_CPUS_SOURCE")}}
