"""Host CPU topology: cpulists, synthetic hosts, sysfs and cgroup readers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.topology import (
    HostCpu,
    Topology,
    cgroup_cpuset,
    daemon_affinity,
    format_cpulist,
    parse_cpulist,
)

# -- cpulists ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("", set()),
    ("   \n", set()),
    ("0", {0}),
    ("0-3", {0, 1, 2, 3}),
    ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
    (" 0-1 , 4 \n", {0, 1, 4}),
    ("3,1,2", {1, 2, 3}),
    ("5-5", {5}),
])
def test_parse_cpulist(text: str, expected: set[int]) -> None:
    assert parse_cpulist(text) == frozenset(expected)


@pytest.mark.parametrize("text", ["a", "1-", "-1", "3-1", "1,,2", "1 2", "0-3:2", "1.5", "99999999"])
def test_parse_cpulist_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="invalid cpulist"):
        parse_cpulist(text)


@pytest.mark.parametrize(("cpus", "expected"), [
    ([], ""),
    ([0], "0"),
    ([0, 1], "0-1"),
    ([0, 1, 2, 3, 8, 10, 11], "0-3,8,10-11"),
    ([11, 10, 3, 2, 1, 0, 8, 8], "0-3,8,10-11"),
    ([1, 3, 5], "1,3,5"),
])
def test_format_cpulist(cpus: list[int], expected: str) -> None:
    assert format_cpulist(cpus) == expected


@settings(max_examples=100, deadline=None)
@given(st.frozensets(st.integers(0, 300), max_size=40))
def test_cpulist_round_trip(cpus: frozenset[int]) -> None:
    assert parse_cpulist(format_cpulist(cpus)) == cpus


# -- synthetic ---------------------------------------------------------------


def test_synthetic_default_is_one_package_two_cores() -> None:
    t = Topology.synthetic()
    assert t.cpus == {
        0: HostCpu(id=0, core=0, package=0, node=0, siblings=frozenset({0}), online=True),
        1: HostCpu(id=1, core=1, package=0, node=0, siblings=frozenset({1}), online=True),
    }
    assert t.online() == {0, 1}
    assert t.nodes() == {0: frozenset({0, 1})}


def test_synthetic_two_sockets_smt_numbering_like_linux() -> None:
    t = Topology.synthetic(packages=2, cores_per_package=8, threads_per_core=2, nodes=2)
    assert len(t.cpus) == 32
    for i in range(16):
        assert t.siblings_of(i) == {i, i + 16}
        assert t.siblings_of(i + 16) == {i, i + 16}
        assert t.cpus[i].package == t.cpus[i + 16].package == i // 8
        assert t.cpus[i].core == t.cpus[i + 16].core == i % 8
    assert t.nodes() == {0: frozenset([*range(0, 8), *range(16, 24)]),
                         1: frozenset([*range(8, 16), *range(24, 32)])}
    assert t.node_of(17) == 0
    assert t.node_of(31) == 1
    assert t.summary() == "32 CPUs (0-31 online), 2 packages, 16 cores, 2 NUMA nodes"


def test_synthetic_numa_nodes_within_one_package() -> None:
    t = Topology.synthetic(packages=1, cores_per_package=4, nodes=2)
    assert t.nodes() == {0: frozenset({0, 1}), 1: frozenset({2, 3})}


def test_synthetic_offline() -> None:
    t = Topology.synthetic(cores_per_package=4, offline=[1, 3])
    assert t.online() == {0, 2}
    assert not t.cpus[3].online
    assert len(t.cpus) == 4


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"packages": 0}, "packages must be >= 1"),
    ({"threads_per_core": 0}, "threads_per_core must be >= 1"),
    ({"nodes": 3}, "3 nodes but only 2 cores"),
    ({"offline": [2]}, "offline CPUs 2 do not exist"),
])
def test_synthetic_rejects_bad_shapes(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Topology.synthetic(**kwargs)  # type: ignore[arg-type]


def test_topology_lookups_and_hash() -> None:
    t = Topology.synthetic()
    assert t == Topology.synthetic()
    assert hash(t) == hash(Topology.synthetic())
    with pytest.raises(KeyError, match="no host CPU 7"):
        t.node_of(7)
    with pytest.raises(TypeError):
        t.cpus[5] = t.cpus[0]  # type: ignore[index]


def test_topology_rejects_mismatched_keys() -> None:
    cpu = HostCpu(id=1, core=0, package=0, node=0, siblings=frozenset({1}), online=True)
    with pytest.raises(ValueError, match="key 0 holds CPU 1"):
        Topology({0: cpu})


# -- from_sysfs --------------------------------------------------------------


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _fake_sysfs(root: Path) -> None:
    """4 CPUs, 2 cores x 2 threads (siblings 0,2 and 1,3), 2 nodes, cpu3 offline."""
    cpu = "sys/devices/system/cpu"
    _write(root, f"{cpu}/online", "0-2")
    _write(root, f"{cpu}/present", "0-3")
    for i, (core, siblings) in enumerate([(0, "0,2"), (1, "1"), (0, "0,2")]):
        _write(root, f"{cpu}/cpu{i}/topology/thread_siblings_list", siblings)
        _write(root, f"{cpu}/cpu{i}/topology/core_id", str(core))
        _write(root, f"{cpu}/cpu{i}/topology/physical_package_id", "0")
    (root / cpu / "cpu3").mkdir()  # offline: no topology directory
    _write(root, "sys/devices/system/node/node0/cpulist", "0,2")
    _write(root, "sys/devices/system/node/node1/cpulist", "1")
    _write(root, "sys/devices/system/node/online", "0-1")


def test_from_sysfs_fake_tree(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path)
    t = Topology.from_sysfs(tmp_path)
    assert t.cpus == {
        0: HostCpu(id=0, core=0, package=0, node=0, siblings=frozenset({0, 2}), online=True),
        1: HostCpu(id=1, core=1, package=0, node=1, siblings=frozenset({1}), online=True),
        2: HostCpu(id=2, core=0, package=0, node=0, siblings=frozenset({0, 2}), online=True),
        3: HostCpu(id=3, core=3, package=0, node=0, siblings=frozenset({3}), online=False),
    }
    assert t.online() == {0, 1, 2}


def test_from_sysfs_per_cpu_online_files(tmp_path: Path) -> None:
    cpu = "sys/devices/system/cpu"
    (tmp_path / cpu / "cpu0").mkdir(parents=True)  # cpu0 has no online file: always online
    _write(tmp_path, f"{cpu}/cpu1/online", "0")
    _write(tmp_path, f"{cpu}/cpu2/online", "1")
    t = Topology.from_sysfs(str(tmp_path))
    assert t.online() == {0, 2}
    # No topology or node files: each CPU its own core, package 0, node 0.
    assert [(c.core, c.package, c.node, c.siblings) for c in t.cpus.values()] == [
        (0, 0, 0, {0}), (1, 0, 0, {1}), (2, 0, 0, {2})]


def test_from_sysfs_without_cpu_dirs_uses_present(tmp_path: Path) -> None:
    _write(tmp_path, "sys/devices/system/cpu/present", "0-1")
    assert set(Topology.from_sysfs(tmp_path).cpus) == {0, 1}


def test_from_sysfs_without_cpus_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CPUs found under"):
        Topology.from_sysfs(tmp_path)


@pytest.mark.parametrize(("rel", "text", "match"), [
    ("sys/devices/system/cpu/online", "0-x", "online: invalid cpulist"),
    ("sys/devices/system/cpu/cpu0/topology/core_id", "zero", "core_id: expected an integer"),
])
def test_from_sysfs_junk(tmp_path: Path, rel: str, text: str, match: str) -> None:
    _fake_sysfs(tmp_path)
    _write(tmp_path, rel, text)
    with pytest.raises(ValueError, match=match):
        Topology.from_sysfs(tmp_path)


def test_from_sysfs_real_host_sanity() -> None:
    t = Topology.from_sysfs("/")
    assert t.cpus
    assert t.online()
    assert daemon_affinity() <= t.online()
    for cpu in t.cpus.values():
        assert cpu.id in cpu.siblings
        for s in cpu.siblings:
            assert t.siblings_of(s) == cpu.siblings
        assert cpu.node in t.nodes()


# -- affinity and cgroup -----------------------------------------------------


def test_daemon_affinity_matches_os() -> None:
    assert daemon_affinity() == frozenset(os.sched_getaffinity(0))


def _cgroup_fixture(tmp_path: Path, proc_cgroup: str) -> tuple[Path, Path]:
    proc = tmp_path / "proc"
    _write(proc, "self/cgroup", proc_cgroup)
    return proc, tmp_path / "cgroup"


def test_cgroup_v2_effective_cpuset(tmp_path: Path) -> None:
    proc, cg = _cgroup_fixture(tmp_path, "0::/system.slice/fleetd.service")
    _write(cg, "cpuset.cpus.effective", "0-7")
    _write(cg, "system.slice/fleetd.service/cpuset.cpus.effective", "2-3,6")
    assert cgroup_cpuset(proc, cg) == {2, 3, 6}


def test_cgroup_v2_walks_up_when_file_missing(tmp_path: Path) -> None:
    proc, cg = _cgroup_fixture(tmp_path, "0::/system.slice/fleetd.service")
    _write(cg, "system.slice/cpuset.cpus.effective", "1-2")
    (cg / "system.slice/fleetd.service").mkdir(parents=True)
    _write(cg, "system.slice/fleetd.service/cpuset.cpus.effective", "")  # empty counts as missing
    assert cgroup_cpuset(proc, cg) == {1, 2}


def test_cgroup_v2_without_cpuset_is_no_restriction(tmp_path: Path) -> None:
    proc, cg = _cgroup_fixture(tmp_path, "0::/user.slice")
    (cg / "user.slice").mkdir(parents=True)
    assert cgroup_cpuset(proc, cg) is None


def test_cgroup_missing_proc_file_is_no_restriction(tmp_path: Path) -> None:
    assert cgroup_cpuset(tmp_path / "proc", tmp_path / "cgroup") is None


def test_cgroup_v1_cpuset_hierarchy(tmp_path: Path) -> None:
    proc, cg = _cgroup_fixture(tmp_path, "4:memory:/x\n3:cpuset:/docker/abc\n0::/")
    _write(cg, "cpuset/docker/abc/cpuset.effective_cpus", "0,4")
    assert cgroup_cpuset(proc, cg) == {0, 4}


def test_cgroup_junk_cpuset_raises(tmp_path: Path) -> None:
    proc, cg = _cgroup_fixture(tmp_path, "0::/a")
    _write(cg, "a/cpuset.cpus.effective", "zero")
    with pytest.raises(ValueError, match="cpuset.cpus.effective: invalid cpulist"):
        cgroup_cpuset(proc, cg)


def test_cgroup_real_host_sanity() -> None:
    cpus = cgroup_cpuset()
    assert cpus is None or (cpus and cpus <= Topology.from_sysfs("/").cpus.keys())
