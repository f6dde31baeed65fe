"""Real servers on loopback for the tests: single functions (FunctionProcess) or the whole local
stack (Stack: localrun.gateway in its own process) as `scripts/serve` runs it."""
from localrun import ROOT, FunctionProcess, Stack, free_port, wait_until  # noqa: F401
