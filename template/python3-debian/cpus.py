"""The CPUs this process may use: the one count behind every thread and worker count.

os.cpu_count() and torch's default see the whole node. In a container limited to 2 CPUs on a 64-core
node, 64 busy threads spend most of each scheduler period throttled by the kernel's CFS quota. The
count here is the cgroup's CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
rounded up, the smallest along the process's cgroup and its ancestors, capped by the affinity mask
(`--cpuset-cpus`, taskset); with no quota, the affinity mask alone.

The host publishes it for the function before importing it: FUNCTION_CPUS (this worker's share when
FUNCTION_WORKERS > 1) and FUNCTION_CPUS_SOURCE (where the count came from, e.g. "cgroup quota 2.0",
"affinity 16", "cgroup quota 4.0 / 2 workers"). FUNCTION_CGROUP_ROOT (tests only) replaces
/sys/fs/cgroup with a directory laid out the same way.
"""

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
MEMBERSHIP = "/proc/self/cgroup"  # which cgroup this process is in, per hierarchy
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")  # where v1 mounts the cpu controller


def affinity() -> int:
    """The CPUs the scheduler may run this process on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cgroup_paths(membership: str) -> tuple[str, str]:
    """This process's cgroup in the v2 hierarchy and in v1's cpu controller ("/" where not listed)."""
    v2 = v1 = "/"
    try:
        with open(membership) as lines:
            for line in lines:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and controllers == "":
                    v2 = path
                elif "cpu" in controllers.split(","):
                    v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _levels(base: str, path: str) -> list[str]:
    """base/path and each of its ancestors up to base, those that exist. Inside a container the
    cgroup is often mounted as the root while /proc/self/cgroup names its path on the host."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    dirs = [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if os.path.isdir(d)]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_quota(directory: str) -> float | None:
    """cpu.max: "<quota> <period>" in microseconds, or "max <period>" for no limit."""
    text = _read(os.path.join(directory, "cpu.max"))
    fields = text.split() if text else []
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: str) -> float | None:
    """cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us."""
    quota, period = (_read(os.path.join(directory, f"cpu.cfs_{name}_us")) for name in ("quota", "period"))
    return _ratio(quota, period) if quota and period else None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def quota(root: str | None = None, membership: str = MEMBERSHIP) -> float | None:
    """The cgroup's CPU quota in CPUs (the smallest along the cgroup and its ancestors), None for none."""
    root = root or os.environ.get("FUNCTION_CGROUP_ROOT") or CGROUP_ROOT
    v2_path, v1_path = _cgroup_paths(membership)
    v2_dirs = [d for d in _levels(root, v2_path) if os.path.exists(os.path.join(d, "cpu.max"))]
    if v2_dirs:
        found = [_v2_quota(d) for d in v2_dirs]
    else:  # v1 (or hybrid, where the cpu controller stays on v1)
        found = [_v1_quota(d) for name in V1_CPU_DIRS for d in _levels(os.path.join(root, name), v1_path)]
    limits = [q for q in found if q is not None]
    return min(limits) if limits else None


def _shown(cpus: float) -> str:
    text = f"{cpus:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text  # 2.0, 1.5, 0.25


def available(root: str | None = None, membership: str = MEMBERSHIP) -> tuple[int, str]:
    """The CPUs this process may use, and where that count came from."""
    mask = affinity()
    limit = quota(root, membership)
    if limit is not None and math.ceil(limit) <= mask:
        return max(1, math.ceil(limit)), f"cgroup quota {_shown(limit)}"
    return mask, f"affinity {mask}"


def share(workers: int, root: str | None = None, membership: str = MEMBERSHIP) -> tuple[int, str]:
    """One worker's share of the CPUs when `workers` processes serve the function (at least 1)."""
    count, source = available(root, membership)
    if workers <= 1:
        return count, source
    return max(1, count // workers), f"{source} / {workers} workers"


def publish(workers: int) -> tuple[int, str]:
    """Set FUNCTION_CPUS and FUNCTION_CPUS_SOURCE for the function this process serves."""
    count, source = share(workers)
    os.environ["FUNCTION_CPUS"], os.environ["FUNCTION_CPUS_SOURCE"] = str(count), source
    return count, source
