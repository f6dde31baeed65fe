"""The local runtime: the functions run on this machine exactly as their containers run them, no Docker.

- layout: a function's build context laid out as faas-cli lays it out (template + handler in function/);
- of_watchdog: the real of-watchdog in front of a function, configured as the template's image does;
- functions: FunctionProcess, one function as a local process from its build context;
- gateway: the local stand-in for the OpenFaaS gateway (`scripts/serve` runs `python -m localrun.gateway`);
- supervisor: what the gateway does with its functions (logs relayed, "serving" once ready, exit with the
  reason of one that cannot start);
- stack: Stack, the gateway in its own process, waited for until healthy (tests, bench, loadtest);
- processes: free ports, waiting for a condition, stopping a process (SIGTERM, wait, SIGKILL);
- images: the function images built with faas-cli + podman (`scripts/images`, `python -m localrun.images`).
"""

from localrun.functions import FUNCTION_DIRS, FunctionProcess
from localrun.layout import ROOT, TEMPLATE, layout
from localrun.processes import free_port, stop_group, terminate, wait_until
from localrun.stack import Stack

__all__ = [
    "FUNCTION_DIRS",
    "ROOT",
    "TEMPLATE",
    "FunctionProcess",
    "Stack",
    "free_port",
    "layout",
    "stop_group",
    "terminate",
    "wait_until",
]
