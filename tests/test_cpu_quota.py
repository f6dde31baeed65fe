"""Threads sized to the CPUs the process may use (the template host's cpus.py), never the node's cores.

The cgroup is read from a fake tree laid out like /sys/fs/cgroup (FUNCTION_CGROUP_ROOT, or the root
argument): v2's cpu.max, v1's cpu/cpu.cfs_quota_us and cpu.cfs_period_us. Where a test needs the node
to be bigger than its quota, it stands for a 16-CPU node by replacing the affinity count."""
import os
import subprocess
import sys
from pathlib import Path

import cpus
import pytest
import requests
from clip import config
from support.servers import FunctionProcess

from localrun.functions import FUNCTION_DIRS

ROOT = Path(__file__).resolve().parent.parent
FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")


def tree(root, files):
    """A fake cgroup tree: {relative path: content}."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return root


def membership(tmp_path, *lines):
    """A fake /proc/self/cgroup."""
    path = tmp_path / "proc-self-cgroup"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def node16(monkeypatch):
    """This process on a 16-CPU node."""
    monkeypatch.setattr(cpus, "affinity", lambda: 16)


V2 = ("0::/",)
V1 = ("4:memory:/", "2:cpu,cpuacct:/", "0::/")


@pytest.mark.parametrize("files, lines, expected", [
    ({"cpu.max": "200000 100000"}, V2, (2, "cgroup quota 2.0")),
    ({"cpu.max": "150000 100000"}, V2, (2, "cgroup quota 1.5")),  # rounded up
    ({"cpu.max": "25000 100000"}, V2, (1, "cgroup quota 0.25")),  # never 0
    ({"cpu.max": "max 100000"}, V2, (16, "affinity 16")),  # no limit
    ({"cpu.max": "6400000 100000"}, V2, (16, "affinity 16")),  # more than the node: the node
    ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, V1, (3, "cgroup quota 3.0")),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, V1,
     (1, "cgroup quota 0.5")),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, V1, (16, "affinity 16")),  # no limit
    ({}, V2, (16, "affinity 16")),  # no cgroup files at all (not Linux, or not mounted)
    ({"cpu.max": "garbage"}, V2, (16, "affinity 16")),
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "0"}, V1, (16, "affinity 16")),
], ids=["v2", "v2-fraction", "v2-small", "v2-max", "v2-above-node", "v1", "v1-cpu,cpuacct", "v1-no-limit",
        "none", "v2-unreadable", "v1-zero-period"])
def test_the_count_is_the_cgroup_quota_rounded_up_or_the_affinity(tmp_path, node16, files, lines, expected):
    root = tree(tmp_path / "cgroup", files)
    root.mkdir(exist_ok=True)
    assert cpus.available(str(root), membership(tmp_path, *lines)) == expected


def test_a_quota_on_an_ancestor_cgroup_limits_its_children(tmp_path, node16):
    """Kubernetes sets the pod's limit on the pod's cgroup and the container's on its own: the smallest
    along the path applies."""
    root = tree(tmp_path / "cgroup", {"kubepods/pod1/cpu.max": "100000 100000",
                                      "kubepods/pod1/ctr/cpu.max": "max 100000",
                                      "kubepods/cpu.max": "max 100000"})
    assert cpus.available(str(root), membership(tmp_path, "0::/kubepods/pod1/ctr")) == (1, "cgroup quota 1.0")


def test_a_container_whose_cgroup_is_mounted_as_the_root_reads_the_root(tmp_path, node16):
    """Without a cgroup namespace, /proc/self/cgroup names the host's path, but the container sees its
    own cgroup mounted at /sys/fs/cgroup/cpu: the path's missing levels are skipped."""
    root = tree(tmp_path / "cgroup", {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"})
    lines = membership(tmp_path, "3:cpu,cpuacct:/docker/0123abcd", "0::/docker/0123abcd")
    assert cpus.available(str(root), lines) == (2, "cgroup quota 2.0")


def test_the_affinity_mask_caps_the_quota(tmp_path):
    """--cpuset-cpus or taskset: a quota of 4 CPUs on a process pinned to one CPU is 1 thread."""
    root = tree(tmp_path / "cgroup", {"cpu.max": "400000 100000"})
    script = ("import os, cpus; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              f"print(cpus.available({str(root)!r}, {membership(tmp_path, *V2)!r}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "template" / "python3-debian")}).stdout
    assert out.strip() == "(1, 'affinity 1')"


@pytest.mark.parametrize("workers, expected", [
    (1, (4, "cgroup quota 4.0")),
    (2, (2, "cgroup quota 4.0 / 2 workers")),
    (3, (1, "cgroup quota 4.0 / 3 workers")),  # rounded down: 3 workers × 2 threads would oversubscribe
    (8, (1, "cgroup quota 4.0 / 8 workers")),  # never 0
])
def test_each_worker_gets_its_share(tmp_path, node16, workers, expected):
    root = tree(tmp_path / "cgroup", {"cpu.max": "400000 100000"})
    assert cpus.share(workers, str(root), membership(tmp_path, *V2)) == expected


def test_the_cgroup_root_comes_from_the_environment(tmp_path, node16, monkeypatch):
    monkeypatch.setenv("FUNCTION_CGROUP_ROOT", str(tree(tmp_path / "cgroup", {"cpu.max": "300000 100000"})))
    assert cpus.available(membership=membership(tmp_path, *V2)) == (3, "cgroup quota 3.0")


# ---- clip's thread count ----------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CLIP_THREADS", "FUNCTION_CPUS", "FUNCTION_CPUS_SOURCE", "FUNCTION_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_clip_threads_follow_the_hosts_count(clean_env):
    clean_env.setenv("FUNCTION_CPUS", "3")
    clean_env.setenv("FUNCTION_CPUS_SOURCE", "cgroup quota 2.5")
    assert config.threads(config.from_env()) == (3, "cgroup quota 2.5")


def test_clip_threads_an_explicit_setting_wins(clean_env):
    clean_env.setenv("FUNCTION_CPUS", "3")
    clean_env.setenv("CLIP_THREADS", "5")
    assert config.threads(config.from_env()) == (5, "CLIP_THREADS")


def test_clip_threads_outside_a_host_are_the_affinity_mask(clean_env):
    mask = len(os.sched_getaffinity(0))
    assert config.threads(config.from_env()) == (mask, f"affinity {mask}")


# ---- served ------------------------------------------------------------------------------------------

def test_a_served_clip_reports_its_threads_and_where_the_count_came_from(clip_env, tmp_path):
    """A container limited to half a CPU: one torch thread, one decoder, and GET / says why."""
    root = tree(tmp_path / "cgroup", {"cpu.max": "50000 100000"})
    with FunctionProcess("clip", tmp_path / "fn", {**clip_env, "FUNCTION_CGROUP_ROOT": str(root)}) as fn:
        described = requests.get(fn.url, timeout=30).json()
    assert (described["threads"], described["threads_source"]) == (1, "cgroup quota 0.5")
    assert described["limits"]["decoders"] == 1


def test_a_served_clip_without_a_fake_tree_reads_this_machines_cgroup(clip_server):
    """The real /sys/fs/cgroup and affinity mask, as the test process itself sees them."""
    described = requests.get(clip_server.url, timeout=30).json()
    assert (described["threads"], described["threads_source"]) == cpus.available()


def test_the_host_gives_each_worker_its_share(tmp_path):
    root = tree(tmp_path / "cgroup", {"cpu.max": "800000 100000"})
    env = {"FUNCTION_WORKERS": "2", "FUNCTION_CGROUP_ROOT": str(root)}
    with FunctionProcess("probe", tmp_path / "fn", env) as fn:
        answer = requests.get(fn.url, timeout=30).json()
    count, source = cpus.available(str(root))  # 8, or this machine's affinity mask where smaller
    assert answer["cpus"] == str(max(1, count // 2)) and answer["cpus_source"] == f"{source} / 2 workers"
