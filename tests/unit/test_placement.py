"""vCPU placement: pools, exclusive/shared/none modes, state, and properties."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleetd.errors import NotFoundError, PlacementError
from fleetd.placement import (
    DEFAULT_MODE,
    Assignment,
    CpuPool,
    PinMode,
    Placer,
    Plan,
    make_pool,
)
from fleetd.topology import Topology

EXCL, SHARED, NONE = PinMode.EXCLUSIVE, PinMode.SHARED, PinMode.NONE


def fs(*cpus: int) -> frozenset[int]:
    return frozenset(cpus)


def pool_of(topo: Topology, *, housekeeping: Iterable[int] = (), affinity: Iterable[int] | None = None,
            cgroup: Iterable[int] | None = None, configured: Iterable[int] | None = None) -> CpuPool:
    return make_pool(topo, affinity=frozenset(affinity if affinity is not None else topo.cpus),
                     cgroup=None if cgroup is None else frozenset(cgroup),
                     configured=None if configured is None else frozenset(configured),
                     housekeeping=frozenset(housekeeping))


def placer(topo: Topology | None = None, **pool_kwargs: object) -> Placer:
    topo = topo or Topology.synthetic()
    return Placer(topo, pool_of(topo, **pool_kwargs))  # type: ignore[arg-type]


def big() -> Topology:
    """2 sockets x 8 cores x 2 threads, one NUMA node per socket."""
    return Topology.synthetic(packages=2, cores_per_package=8, threads_per_core=2, nodes=2)


def reps(prefix: str, count: int, vcpus: int) -> list[tuple[str, int]]:
    return [(f"{prefix}-{i}", vcpus) for i in range(count)]


def cpus_of(a: Assignment) -> list[int]:
    return [next(iter(c)) for c in a.vcpus]


# -- make_pool ---------------------------------------------------------------


def test_pool_whole_host() -> None:
    pool = pool_of(Topology.synthetic())
    assert pool == CpuPool(allowed=fs(0, 1), housekeeping=fs(), description="0-1", notes=())
    assert pool.emulator_cpus == {0, 1}


def test_pool_minus_housekeeping() -> None:
    pool = pool_of(Topology.synthetic(), housekeeping=[0])
    assert pool.allowed == {1}
    assert pool.housekeeping == {0}
    assert pool.emulator_cpus == {0}
    assert pool.description == "0-1 minus housekeeping 0"


def test_pool_intersects_affinity_cgroup_configured_and_online() -> None:
    topo = Topology.synthetic(cores_per_package=8, offline=[5])
    pool = pool_of(topo, affinity=range(1, 8), cgroup=range(0, 7), configured=[2, 3, 4, 5, 6, 9],
                   housekeeping=[1, 6])
    assert pool.allowed == {2, 3, 4}
    # housekeeping need not be inside the configured cpus, only usable by the daemon
    assert pool.housekeeping == {1, 6}
    assert pool.description == "2-4,6 minus housekeeping 6"
    assert pool.notes == ("configured cpus 5,9 ignored: offline, absent, or outside the daemon's "
                          "affinity or cgroup cpuset",)


def test_pool_ignores_unusable_housekeeping() -> None:
    pool = pool_of(Topology.synthetic(cores_per_package=4), affinity=[0, 1, 2], housekeeping=[3])
    assert pool.allowed == {0, 1, 2}
    assert pool.housekeeping == fs()
    assert pool.emulator_cpus == {0, 1, 2}
    assert pool.notes and "housekeeping 3 ignored" in pool.notes[0]


def test_pool_housekeeping_covering_everything_falls_back() -> None:
    pool = pool_of(Topology.synthetic(), housekeeping=[0, 1])
    assert pool.allowed == {0, 1}
    assert pool.description == "0-1 (all housekeeping)"
    assert pool.notes == ("housekeeping 0-1 covers every usable CPU (0-1): vCPUs use them too",)
    plan = Placer(Topology.synthetic(), pool).plan([("a", 2)], SHARED)
    assert plan.notes == pool.notes
    assert cpus_of(plan.assignments[0]) == [0, 1]


def test_pool_empty_names_inputs() -> None:
    topo = Topology.synthetic(cores_per_package=4, offline=[3])
    with pytest.raises(PlacementError) as exc:
        pool_of(topo, affinity=[0, 1], cgroup=[1, 2, 3], configured=[3])
    assert str(exc.value) == ("no usable host CPUs: nothing is in all of online 0-2, affinity 0-1, "
                              "cgroup cpuset 1-3, configured cpus 3")
    assert (exc.value.needed, exc.value.available) == (1, 0)


def test_placer_rejects_pool_outside_topology() -> None:
    with pytest.raises(ValueError, match="pool CPUs 7 are not in the topology"):
        Placer(Topology.synthetic(), CpuPool(allowed=fs(0, 7), housekeeping=fs(), description="x"))


# -- exact maps --------------------------------------------------------------


def test_shared_eight_replicas_of_two_on_two_cpus() -> None:
    p = placer()
    plan = p.plan(reps("web", 8, 2), SHARED)
    # each guest's two vCPUs on distinct CPUs, and the boot vCPUs alternate between them
    assert [cpus_of(a) for a in plan.assignments] == [[0, 1], [1, 0]] * 4
    assert dict(plan.load_after) == {0: 8, 1: 8}
    assert plan.overcommitted
    assert plan.render_table() == "\n".join([
        "pool 0-1, mode shared, overcommitted",
        *(f"web-{i}  vcpu0→{i % 2} vcpu1→{1 - i % 2}" for i in range(8)),
        "host CPU  0 1",
        "vCPUs     8 8",
    ])
    assert plan.summary() == ("8 replicas, 16 vCPUs, shared on 0-1; overcommitted "
                              "(up to 8 pinned vCPUs per host CPU)")


def test_boot_vcpus_spread_around_what_is_placed() -> None:
    p = placer()
    p.place(reps("a", 1, 2), SHARED)                      # a-0: vcpu0 on 0
    plan = p.plan(reps("b", 3, 2), SHARED)
    assert [cpus_of(a)[0] for a in plan.assignments] == [1, 0, 1]


def test_exclusive_does_not_fit_exact_message() -> None:
    p = placer(housekeeping=[0])
    with pytest.raises(PlacementError) as exc:
        p.plan([("big", 16)], EXCL)
    assert str(exc.value) == "needs 16 host CPUs, 1 available (0-1 minus housekeeping 0)"
    assert (exc.value.needed, exc.value.available) == (16, 1)
    assert exc.value.to_dict()["code"] == "placement_failed"


def test_exclusive_shortage_names_cpus_in_use() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place([("a", 1)], SHARED)
    with pytest.raises(PlacementError, match=r"^needs 4 host CPUs, 3 available \(0-3; in use: 0\)$"):
        p.plan([("b", 4)], EXCL)
    # the total over all requested replicas counts
    with pytest.raises(PlacementError, match=r"^needs 4 host CPUs, 3 available"):
        p.plan([("b", 2), ("c", 2)], EXCL)
    p.place([("b", 3)], EXCL)
    with pytest.raises(PlacementError, match=r"^needs 1 host CPU, 0 available \(0-3; in use: 0-3\)$"):
        p.plan([("c", 1)], EXCL)


def test_shared_two_sockets_spreads_over_nodes_and_cores_before_smt() -> None:
    p = placer(big())
    plan = p.place(reps("web", 8, 2), SHARED)
    assert [cpus_of(a) for a in plan.assignments] == [
        [0, 1], [8, 9], [2, 3], [10, 11], [4, 5], [12, 13], [6, 7], [14, 15]]
    assert not plan.overcommitted
    # the next replicas land on the idle sibling threads, still one node each
    plan = p.place(reps("db", 2, 4), SHARED)
    assert [cpus_of(a) for a in plan.assignments] == [[16, 17, 18, 19], [24, 25, 26, 27]]
    assert plan.notes == ()


def test_exclusive_two_sockets_exact_map() -> None:
    p = placer(big(), housekeeping=[0, 16])
    plan = p.place(reps("db", 4, 4), EXCL)
    assert [cpus_of(a) for a in plan.assignments] == [
        [1, 2, 3, 4], [8, 9, 10, 11], [12, 13, 14, 15], [5, 6, 7, 17]]
    # node 1 is now full on physical cores, node 0 has none idle either: siblings next, by node load
    plan = p.place(reps("x", 2, 4), EXCL)
    assert [cpus_of(a) for a in plan.assignments] == [[24, 25, 26, 27], [18, 19, 20, 21]]
    assert not plan.overcommitted
    assert plan.to_json()["pool"] == "0-31 minus housekeeping 0,16"


def test_guest_kept_in_one_node_unless_balance_forbids() -> None:
    topo = Topology.synthetic(cores_per_package=6, nodes=2)  # nodes {0,1,2} and {3,4,5}
    p = placer(topo)
    p.place([("a", 1)], SHARED)
    plan = p.place([("b", 2)], SHARED)
    assert cpus_of(plan.assignments[0]) == [3, 4]  # fits the emptier node 1
    assert plan.notes == ()
    plan = p.plan([("c", 3)], SHARED)
    assert cpus_of(plan.assignments[0]) == [1, 2, 5]  # balance beats locality
    assert plan.notes == ("c spans NUMA nodes 0-1 (no single node had 3 least-loaded CPUs)",)
    plan = p.plan([("c", 4)], SHARED)  # bigger than any node: no note
    assert plan.notes == ()


def test_smt_siblings_used_last() -> None:
    p = placer(Topology.synthetic(cores_per_package=2, threads_per_core=2))  # siblings 0/2, 1/3
    got = [cpus_of(p.place([(f"g{i}", 1)], SHARED).assignments[0])[0] for i in range(4)]
    assert got == [0, 1, 2, 3]


def test_more_vcpus_than_cpus_spread_evenly_within_guest() -> None:
    p = placer(Topology.synthetic(cores_per_package=3))
    plan = p.plan([("wide", 7)], SHARED)
    assert cpus_of(plan.assignments[0]) == [0, 1, 2, 0, 1, 2, 0]
    assert dict(plan.load_after) == {0: 3, 1: 2, 2: 2}


# -- modes interacting -------------------------------------------------------


def test_shared_never_lands_on_exclusive_cpus() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place([("ex", 2)], EXCL)
    plan = p.place(reps("s", 4, 2), SHARED)
    assert all(set(cpus_of(a)) == {2, 3} for a in plan.assignments)
    assert p.load() == {0: 1, 1: 1, 2: 4, 3: 4}


def test_exclusive_needs_idle_cpus() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place([("s", 1)], SHARED)
    plan = p.place([("ex", 3)], EXCL)
    assert cpus_of(plan.assignments[0]) == [1, 2, 3]
    with pytest.raises(PlacementError, match="needs 1 host CPU, 0 available"):
        p.plan([("ex2", 1)], EXCL)


def test_shared_with_everything_held_exclusively() -> None:
    p = placer()
    p.place([("ex", 2)], EXCL)
    with pytest.raises(PlacementError, match=r"needs 3 host CPUs, 0 available \(0-1; all held exclusively\)"):
        p.plan([("s", 3)], SHARED)


def test_mode_none_floats_over_pool() -> None:
    p = placer(Topology.synthetic(cores_per_package=4), housekeeping=[0])
    plan = p.place([("f", 3)], NONE)
    assert plan.assignments == (Assignment("f", NONE, (fs(1, 2, 3),) * 3),)
    assert p.load() == {1: 0, 2: 0, 3: 0}
    assert not plan.overcommitted
    assert p.plan([("g", 1)], NONE).overcommitted  # 4 vCPUs on 3 CPUs
    assert plan.render_table().splitlines()[1] == "f  vcpu0→1-3 vcpu1→1-3 vcpu2→1-3"


def test_mode_none_notes_exclusive_cpus() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place([("ex", 1)], EXCL)
    assert p.plan([("f", 1)], NONE).notes == (
        "mode none floats over all of 0-3, including CPUs held exclusively (0)",)


def test_overcommitted_flag() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    assert not p.plan([("a", 4)], SHARED).overcommitted
    assert p.plan([("a", 5)], SHARED).overcommitted
    p.place([("a", 2)], SHARED)
    assert not p.plan([("b", 2)], SHARED).overcommitted
    assert p.plan([("b", 3)], SHARED).overcommitted


def test_default_mode_is_shared_and_strings_accepted() -> None:
    assert DEFAULT_MODE is SHARED
    p = placer()
    assert p.plan([("a", 1)]).mode is SHARED
    assert p.plan([("a", 1)], "exclusive").mode is EXCL
    with pytest.raises(ValueError, match="'pinned' is not a valid PinMode"):
        p.plan([("a", 1)], "pinned")


# -- state: plan, commit, place, release, restore ----------------------------


def test_plan_is_pure_and_commit_applies() -> None:
    p = placer()
    before = (p.load(), p.assignments())
    plan = p.plan(reps("a", 2, 1), SHARED)
    assert (p.load(), p.assignments()) == before
    p.commit(plan)
    assert p.load() == {0: 1, 1: 1} == dict(plan.load_after)
    assert set(p.assignments()) == {"a-0", "a-1"}


def test_stale_plan_is_refused() -> None:
    p = placer()
    plan = p.plan([("a", 1)], SHARED)
    p.place([("b", 1)], SHARED)
    with pytest.raises(PlacementError, match="stale"):
        p.commit(plan)
    with pytest.raises(PlacementError, match="stale"):
        placer().commit(plan)
    p.commit(p.plan([("a", 1)], SHARED))
    assert p.load() == {0: 1, 1: 1}


def test_place_is_atomic() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place([("a", 1)], SHARED)
    before = (p.load(), p.assignments())
    with pytest.raises(PlacementError):
        p.place([("b", 2), ("c", 2)], EXCL)
    with pytest.raises(PlacementError, match="replica a is already placed"):
        p.place([("d", 1), ("a", 1)], SHARED)
    assert (p.load(), p.assignments()) == before


def test_scale_up_places_around_existing() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.place(reps("web", 1, 3), SHARED)
    plan = p.place([("web-1", 3)], SHARED)
    assert cpus_of(plan.assignments[0]) == [3, 0, 1]
    assert p.load() == {0: 2, 1: 2, 2: 1, 3: 1}


def test_release_restores_previous_state() -> None:
    p = placer(big())
    p.place(reps("a", 3, 5), SHARED)
    before = (p.load(), p.assignments())
    p.place(reps("b", 2, 3), EXCL)
    released = p.release("b-0")
    assert released.mode is EXCL and len(released.vcpus) == 3
    p.release("b-1")
    assert (p.load(), p.assignments()) == before
    with pytest.raises(NotFoundError, match="no placement for replica 'b-0'"):
        p.release("b-0")


def test_restore_reregisters_placements() -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    a = p.restore("ex", [fs(3)], EXCL)
    assert a == Assignment("ex", EXCL, (fs(3),))
    p.restore("sh", [fs(0), fs(0)], "shared")
    p.restore("fl", [None, fs(1, 2)], NONE)
    assert p.load() == {0: 2, 1: 0, 2: 0, 3: 1}
    assert p.assignments()["fl"].vcpus == (fs(0, 1, 2, 3), fs(1, 2))
    # new placements go around the restored ones
    assert cpus_of(p.place([("new", 2)], SHARED).assignments[0]) == [1, 2]


def test_restore_outside_pool_counts_and_releases_cleanly() -> None:
    p = placer(Topology.synthetic(cores_per_package=4), configured=[0, 1])
    p.restore("old", [fs(3)], SHARED)
    assert p.load() == {0: 0, 1: 0, 3: 1}
    p.release("old")
    assert p.load() == {0: 0, 1: 0}


@pytest.mark.parametrize(("host_cpus", "mode", "error", "match"), [
    ([fs(0, 1)], SHARED, ValueError, "vcpu0 has host CPUs 0-1; mode shared needs exactly one"),
    ([None], EXCL, ValueError, r"vcpu0 has host CPUs \(none\)"),
    ([], SHARED, ValueError, "vcpus must be an integer >= 1"),
    ([fs(1)], EXCL, PlacementError, "host CPUs 1 clash with exclusive placement"),
    ([fs(0)], SHARED, PlacementError, "host CPUs 0 clash"),
    ([fs(2), fs(2)], EXCL, PlacementError, "host CPUs 2 clash"),
])
def test_restore_rejects(host_cpus: list[frozenset[int] | None], mode: PinMode,
                         error: type[Exception], match: str) -> None:
    p = placer(Topology.synthetic(cores_per_package=4))
    p.restore("ex", [fs(0)], EXCL)
    p.restore("sh", [fs(1)], SHARED)
    before = p.load()
    with pytest.raises(error, match=match):
        p.restore("x", host_cpus, mode)
    assert p.load() == before
    with pytest.raises(PlacementError, match="replica ex is already placed"):
        p.restore("ex", [fs(3)], SHARED)


@pytest.mark.parametrize(("requests", "match"), [
    ([("a", 0)], "replica a: vcpus must be an integer >= 1, got 0"),
    ([("a", True)], "vcpus must be an integer >= 1, got True"),
    ([("a", 1.5)], "got 1.5"),
    ([("", 1)], "replica name must be a non-empty string"),
    ([("a", 1), ("a", 2)], "replica a requested twice"),
])
def test_invalid_requests(requests: list[tuple[str, int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        placer().plan(requests, SHARED)


# -- output ------------------------------------------------------------------


def test_to_json_is_plain_data() -> None:
    p = placer(housekeeping=[0])
    plan = p.plan(reps("web", 2, 2), SHARED)
    data = plan.to_json()
    assert data == {
        "mode": "shared",
        "pool": "0-1 minus housekeeping 0",
        "replicas": {"web-0": [[1], [1]], "web-1": [[1], [1]]},
        "load": {"1": 4},
        "overcommitted": True,
        "notes": [],
    }
    assert json.loads(json.dumps(data)) == data


def test_render_table_wraps_and_pads() -> None:
    p = placer(big())
    table = p.plan([("a", 2), ("longer-name", 1)], SHARED).render_table().splitlines()
    assert table[:3] == ["pool 0-31, mode shared", "a            vcpu0→0 vcpu1→1", "longer-name  vcpu0→8"]
    assert table[3] == "host CPU  " + " ".join(f"{c:>2}" if c >= 10 else str(c) for c in range(16))
    assert table[4].startswith("vCPUs     1 1 0 0")
    assert table[5].startswith("host CPU  16 17")
    assert len(table) == 7


def test_empty_plan() -> None:
    plan = placer().plan([], SHARED)
    assert plan == Plan(assignments=(), load_after={0: 0, 1: 0}, overcommitted=False, notes=(),
                        pool=plan.pool)
    assert plan.mode is None
    assert plan.to_json()["mode"] is None


# -- properties --------------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn) -> tuple[Topology, CpuPool]:
    packages = draw(st.integers(1, 2))
    cores = draw(st.integers(1, 4))
    threads = draw(st.integers(1, 2))
    nodes = draw(st.integers(1, min(packages * cores, 3)))
    total = packages * cores * threads
    ids = st.sampled_from(range(total))
    offline = draw(st.frozensets(ids, max_size=total - 1))
    topo = Topology.synthetic(packages=packages, cores_per_package=cores, threads_per_core=threads,
                              nodes=nodes, offline=offline)
    affinity = draw(st.frozensets(ids, min_size=1) | st.just(frozenset(range(total))))
    housekeeping = draw(st.frozensets(ids, max_size=2))
    assume(topo.online() & affinity)
    return topo, make_pool(topo, affinity=affinity, cgroup=None, configured=None,
                           housekeeping=housekeeping)


MODES = st.sampled_from([EXCL, SHARED, NONE])
Op = tuple[str, object, list[int]]
ops = st.lists(st.one_of(
    st.tuples(st.just("place"), MODES, st.lists(st.integers(1, 6), min_size=1, max_size=4)),
    st.tuples(st.just("release"), st.integers(0, 1000), st.just([])),
), max_size=12)


def run(p: Placer, operations: list[Op], start: int = 0) -> list[Plan | None]:
    """Apply ops, skipping placements that do not fit; returns each op's plan (None if skipped)."""
    out: list[Plan | None] = []
    for i, (kind, arg, sizes) in enumerate(operations, start):
        if kind == "release":
            names = sorted(p.assignments())
            if names:
                p.release(names[int(arg) % len(names)])  # type: ignore[call-overload]
            out.append(None)
            continue
        try:
            out.append(p.place([(f"r{i}-{j}", n) for j, n in enumerate(sizes)], arg))  # type: ignore[arg-type]
        except PlacementError:
            out.append(None)
    return out


def check_invariants(p: Placer) -> None:
    allowed = p.pool.allowed
    load: Counter[int] = Counter()
    exclusive: Counter[int] = Counter()
    for a in p.assignments().values():
        if a.mode is NONE:
            assert all(c == allowed for c in a.vcpus)
            continue
        assert all(len(c) == 1 for c in a.vcpus)
        cpus = cpus_of(a)
        assert set(cpus) <= allowed
        load.update(cpus)
        if a.mode is EXCL:
            exclusive.update(cpus)
    assert p.load() == {c: load[c] for c in allowed}
    for cpu in exclusive:
        assert load[cpu] == 1, "an exclusive CPU is shared"
    if not any("covers every usable CPU" in n for n in p.pool.notes):
        assert not p.pool.housekeeping & allowed


@settings(max_examples=300, deadline=None)
@given(hosts(), ops)
def test_invariants_hold_after_any_sequence(host: tuple[Topology, CpuPool], operations: list[Op]) -> None:
    topo, pool = host
    p = Placer(topo, pool)
    for i, op in enumerate(operations):
        held = {c for a in p.assignments().values() if a.mode is EXCL for c in a.host_cpus()}
        (plan,) = run(p, [op], start=i)
        check_invariants(p)
        for a in plan.assignments if plan else ():
            usable = len(pool.allowed) if a.mode is EXCL else len(pool.allowed - held)
            if a.mode is not NONE and len(a.vcpus) <= usable:
                assert len(set(cpus_of(a))) == len(a.vcpus), "vCPUs share a CPU needlessly"


@settings(max_examples=100, deadline=None)
@given(hosts(), st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=8))
def test_shared_from_empty_stays_balanced(host: tuple[Topology, CpuPool], batches: list[list[int]]) -> None:
    topo, pool = host
    p = Placer(topo, pool)
    for i, sizes in enumerate(batches):
        plan = p.place([(f"r{i}-{j}", n) for j, n in enumerate(sizes)], SHARED)
        load = p.load()
        assert max(load.values()) - min(load.values()) <= 1
        assert set(load) == pool.allowed
        for a in plan.assignments:
            per_cpu = Counter(cpus_of(a))
            # a guest's vCPUs are distinct while there are enough CPUs, else spread evenly
            assert max(per_cpu.values()) == -(-len(a.vcpus) // len(pool.allowed))


@settings(max_examples=100, deadline=None)
@given(hosts(), ops, MODES, st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_place_then_release_restores_state(host: tuple[Topology, CpuPool], operations: list[Op],
                                           mode: PinMode, sizes: list[int]) -> None:
    p = Placer(*host)
    run(p, operations)
    before = (p.load(), p.assignments())
    try:
        plan = p.place([(f"new-{j}", n) for j, n in enumerate(sizes)], mode)
    except PlacementError:
        assert (p.load(), p.assignments()) == before
        return
    for a in plan.assignments:
        p.release(a.name)
    assert (p.load(), p.assignments()) == before


@settings(max_examples=60, deadline=None)
@given(hosts(), ops)
def test_placement_is_deterministic(host: tuple[Topology, CpuPool], operations: list[Op]) -> None:
    first, second = Placer(*host), Placer(*host)
    plans_a = run(first, operations)
    plans_b = run(second, operations)
    assert plans_a == plans_b
    assert [pl.to_json() for pl in plans_a if pl] == [pl.to_json() for pl in plans_b if pl]
    assert first.load() == second.load()


@settings(max_examples=60, deadline=None)
@given(hosts())
def test_housekeeping_never_hosts_vcpus_while_others_exist(host: tuple[Topology, CpuPool]) -> None:
    topo, pool = host
    p = Placer(topo, pool)
    plan = p.place([("a", 3), ("b", 5)], SHARED)
    used = set().union(*(a.host_cpus() for a in plan.assignments))
    if pool.allowed - pool.housekeeping:
        assert not used & pool.housekeeping
    assert used <= pool.allowed
