"""Real servers for the tests: single functions (FunctionProcess) or the whole local stack (Stack:
localrun.gateway in its own process) as `scripts/serve` runs it.

Where the real of-watchdog is found (localrun.of_watchdog) and network namespaces can be made
(localrun.netns), every function the tests start runs behind it, each in a network of its own, as its
container runs it: a watchdog-level defect then fails the tests that meet it. Elsewhere the functions
run bare, and WATCHDOG_ABSENT says why (pytest's header shows it)."""

import localrun
from localrun import ROOT, free_port, wait_until  # noqa: F401
from localrun.of_watchdog import watchdog_for_many

WATCHDOG, WATCHDOG_ABSENT = watchdog_for_many()


class FunctionProcess(localrun.FunctionProcess):
    def __init__(self, *args, watchdog=WATCHDOG, **kwargs):
        super().__init__(*args, watchdog=watchdog, **kwargs)


class Stack(localrun.Stack):
    def __init__(self, *args, watchdog=WATCHDOG, **kwargs):
        super().__init__(*args, watchdog=watchdog, **kwargs)
