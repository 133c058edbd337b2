"""The fleetd daemon: fleets, replicas, the control API handlers, and the daemon's own life.

:class:`Daemon` owns one task group holding the control server, one
supervision task per replica, the console-log rotator and the signal
watcher. Signal handlers only record (anyio's signal receiver); the main
loop acts. Each control-API method has one handler, ``h_<method>``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

from fleetd import __version__, consolelog, postmortem
from fleetd import protocol as P
from fleetd.accel import AccelDecision, choose, get_decision, probe
from fleetd.config import DaemonConfig
from fleetd.console import ConsoleSweeper
from fleetd.errors import (ConflictError, FleetError, NotFoundError, SpecError, StateError,
                           StateStoreError)
from fleetd.events import EventBus
from fleetd.fleet import Fleet, check_fleet_name
from fleetd.log import get_logger
from fleetd.placement import CpuPool, Placer, make_pool
from fleetd.server import AccessPolicy, ControlServer, Peer, Streaming
from fleetd.ports import check_ports
from fleetd.sdnotify import Notifier, guest_status
from fleetd.store import Store
from fleetd.supervisor import Replica, ReplicaState, Runtime, Want
from fleetd.topology import Topology, cgroup_cpuset, daemon_affinity, format_cpulist, parse_cpulist


class Daemon:
    """One fleetd instance; see the module docstring."""

    def __init__(self, config: DaemonConfig, *, listen_fd: int | None = None) -> None:
        self.config = config
        self.listen_fd = listen_fd
        self.bus = EventBus()
        self.fleets: dict[str, Fleet] = {}
        self.log = get_logger()
        self.started = time.monotonic()
        self.decision: AccelDecision | None = None
        self.topology: Topology | None = None
        self.pool: CpuPool | None = None
        self.placer: Placer | None = None
        self.rt: Runtime | None = None
        self.server: ControlServer | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._shutdown = anyio.Event()
        self.stop_guests = config.stop_guests_on_exit
        self.ready = anyio.Event()
        self.store = Store(config.state_dir)
        self.problems: list[str] = []
        self.readopt_s: float | None = None
        self.notifier = Notifier()

    # -- life ------------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until asked to stop (SIGTERM/SIGINT or ``daemon_stop``).

        Raises:
            FleetError: when the daemon cannot start (socket in use, bad config).
        """
        cfg = self.config
        for d in (cfg.state_dir, cfg.run_root):
            try:
                d.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as err:
                raise StateStoreError(f"cannot create {d}: {err.strerror}", path=str(d)) from err
        if cfg.accel == "tcg":
            self.decision = await probe(cfg.qemu, allow_kvm=False)
        else:
            self.decision = await get_decision(cfg.qemu)
            if cfg.accel == "kvm" and self.decision.kvm_usable and self.decision.accel != "kvm":
                self.decision = dataclasses.replace(
                    self.decision, accel="kvm", reason=self.decision.reason + " (config: kvm)")
        self.log.info("daemon.accel", decision=self.decision.accel, reason=self.decision.reason,
                      module=self.decision.kvm_module, probe_ms=round(self.decision.probe_ms))
        self.topology = Topology.from_sysfs("/")
        self.pool = make_pool(self.topology, affinity=daemon_affinity(), cgroup=cgroup_cpuset(),
                              configured=parse_cpulist(cfg.cpus) if cfg.cpus else None,
                              housekeeping=parse_cpulist(cfg.housekeeping))
        self.placer = Placer(self.topology, self.pool)
        if self.pool.housekeeping:
            try:
                os.sched_setaffinity(0, self.pool.housekeeping)
            except OSError as err:
                self.log.warning("daemon.affinity_failed", error=str(err))
        self.sweeper = ConsoleSweeper()
        self.rt = Runtime(cfg.run_root, cfg.state_dir, self.decision, self.bus,
                          placer=self.placer, qemu=cfg.qemu, changed=self._changed,
                          start_timeout=cfg.start_timeout, sweeper=self.sweeper)
        access = AccessPolicy.resolve(control_group=cfg.control_group,
                                      readonly_group=cfg.readonly_group)
        self.server = ControlServer(self, cfg.socket, access=access, socket_group=cfg.socket_group,
                                    listen_fd=self.listen_fd)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.notifier.run_watchdog)   # petted during a long re-adoption too
                tg.start_soon(self.store.run)
                tg.start_soon(self.sweeper.run)
                restored = await self._restore()
                await tg.start(self.server.serve)
                tg.start_soon(self._watch_signals)
                tg.start_soon(self._rotate_logs)
                t0 = time.monotonic()
                with anyio.move_on_after(self.rt.adopt_timeout + 5):
                    for r in restored:
                        await r.adopt_done.wait()
                self.readopt_s = time.monotonic() - t0
                if restored:
                    self.log.info("daemon.readopted", replicas=len(restored),
                                  seconds=round(self.readopt_s, 3))
                self.bus.publish("daemon", state="ready", pid=os.getpid(), version=__version__)
                self.log.info("daemon.ready", socket=str(cfg.socket), pid=os.getpid(),
                              pool=self.pool.description)
                self.ready.set()
                for f in self.fleets.values():         # READY=1 means: state on disk is current
                    self.store.mark(f.name, f.record)
                self.store.flush()
                self.notifier.ready(self.status_text())
                task_status.started(self)
                await self._shutdown.wait()
                self.notifier.stopping()
                await self._wind_down()
                await anyio.sleep(0.1)  # let in-flight replies (daemon_stop's own) reach clients
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self.notifier.close()
            for f in self.fleets.values():
                self.store.mark(f.name, f.record)
            if not self.store.flush():
                self.log.error("daemon.final_state_write_failed", error=self.store.last_error)
        self.log.info("daemon.stopped")

    def request_shutdown(self, *, stop_guests: bool | None = None) -> None:
        """Ask the main loop to stop (records only; the loop acts)."""
        if stop_guests is not None:
            self.stop_guests = stop_guests
        self._shutdown.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    self.log.info("daemon.sighup")  # nothing to reload yet; logged
                    continue
                self.log.info("daemon.signal", signal=signal.Signals(sig).name)
                self.request_shutdown()

    async def _wind_down(self) -> None:
        replicas = [r for f in self.fleets.values() for r in f.replicas.values()]
        if self.stop_guests:
            self.log.info("daemon.stopping_guests", count=len(replicas))
            async with anyio.create_task_group() as tg:
                for r in replicas:
                    tg.start_soon(lambda r=r: r.stop())
        else:
            self.log.info("daemon.detaching", count=len(replicas))
            for r in replicas:
                r.detach()

    async def _rotate_logs(self) -> None:
        while True:
            await anyio.sleep(self.config.rotate_interval)
            for f in self.fleets.values():
                lp = f.policy.logs
                for r in f.replicas.values():
                    try:
                        if consolelog.rotate_if_needed(r.paths.console_log, lp.console_max_bytes,
                                                       lp.console_keep):
                            self.bus.publish("log_rotated", vm=r.name, fleet=f.name)
                    except OSError as err:
                        self.log.warning("daemon.rotate_failed", vm=r.name, error=str(err))

    def _changed(self, replica: Replica) -> None:
        """A replica changed: persist its fleet (coalesced); tell systemd the counts."""
        self.notifier.status(self.status_text())
        fleet = replica.fleet
        if fleet.name in self.fleets:
            self.store.mark(fleet.name, fleet.record)

    def status_text(self) -> str:
        """One line of guest counts by state, for systemd's STATUS=."""
        return guest_status(r.state for f in self.fleets.values() for r in f.replicas.values())

    async def _restore(self) -> list[Replica]:
        """Recreate fleets from the state dir and start their replicas' supervision.

        Replicas with a recorded QEMU re-adopt it in their own task, each with its own
        deadline, so one wedged QEMU cannot stall the others or the API.
        """
        assert self.rt and self.placer and self._tg
        from fleetd.policy import FleetPolicy
        from fleetd.spec import GuestSpec
        docs, self.problems = self.store.load_all()
        out: list[Replica] = []
        for doc in docs:
            name = doc["name"]
            try:
                spec = GuestSpec.model_validate(doc["spec"])
                policy = FleetPolicy.model_validate(doc["policy"])
            except ValueError as err:
                msg = f"state file {self.store.path(name)}: fleet {name!r} not restored: {err}"
                self.problems.append(msg.splitlines()[0])
                self.log.error("daemon.restore_failed", fleet=name, error=str(err).splitlines()[0])
                continue
            emu = doc.get("emulator_cpus")
            fleet = Fleet(name, spec, policy, emulator_cpus=frozenset(emu) if emu else None,
                          created=doc.get("created"))
            self.fleets[name] = fleet
            for key, rec in sorted(doc["replicas"].items(), key=lambda kv: int(kv[0])):
                r = Replica(fleet, int(key), self.rt)
                r.restore(rec)
                cpus = rec.get("host_cpus")
                if cpus and r.want == Want.RUNNING:
                    try:
                        r.assignment = self.placer.restore(
                            r.name, [frozenset(c) for c in cpus], policy.pin)
                    except (ValueError, FleetError) as err:
                        self.log.warning("daemon.placement_not_restored", vm=r.name, error=str(err))
                fleet.replicas[r.index] = r
                out.append(r)
            self.bus.publish("fleet", fleet=name, action="restored", replicas=fleet.size)
        for r in out:
            await self._tg.start(r.run)
        return out

    # -- lookup ----------------------------------------------------------------------------------

    def replicas(self) -> list[Replica]:
        return [r for f in sorted(self.fleets) for r in self.fleets[f].sorted_replicas()]

    def replica(self, name: str) -> Replica:
        """The replica with that name.

        Raises:
            NotFoundError: no such replica (a fleet name is named as such).
        """
        for f in self.fleets.values():
            for r in f.replicas.values():
                if r.name == name:
                    return r
        if name in self.fleets:
            raise NotFoundError(f"{name!r} is a fleet; give a replica name like {name}-0",
                                name=name)
        raise NotFoundError(f"no such replica: {name}", name=name)

    def fleet(self, name: str) -> Fleet:
        if name not in self.fleets:
            raise NotFoundError(f"no such fleet: {name}", name=name)
        return self.fleets[name]

    def resolve(self, targets: list[str], all_: bool, *, default_all: bool = False) -> list[Replica]:
        """Replicas named by ``targets`` (replica or fleet names) or all of them.

        Raises:
            NotFoundError: a target names nothing.
            SpecError: neither targets nor ``all`` given where one is required.
        """
        if all_ or (not targets and default_all):
            return self.replicas()
        if not targets:
            raise SpecError("targets: give replica or fleet names, or all", field="targets")
        out: list[Replica] = []
        for t in targets:
            if t in self.fleets:
                out.extend(self.fleets[t].sorted_replicas())
            else:
                out.append(self.replica(t))
        seen: set[str] = set()
        return [r for r in out if not (r.name in seen or seen.add(r.name))]

    # -- dispatch --------------------------------------------------------------------------------

    async def dispatch(self, request: Any, peer: Peer) -> BaseModel | Streaming:
        """Route a request to its handler (one per method)."""
        handler = getattr(self, f"h_{request.method}")
        return await handler(request.params, peer)

    # -- handlers --------------------------------------------------------------------------------

    async def h_info(self, p: P.NoParams, peer: Peer) -> P.InfoResult:
        assert self.decision and self.topology and self.pool
        by_state: dict[str, int] = {}
        for r in self.replicas():
            by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
        return P.InfoResult(
            pid=os.getpid(), qemu=self.decision.qemu, qemu_version=self.decision.qemu_version,
            accel=self.decision.to_dict(), host_cpus=format_cpulist(self.topology.online()),
            pool=self.pool.description, housekeeping=format_cpulist(self.pool.housekeeping),
            topology=self.topology.summary(), socket=str(self.config.socket),
            state_dir=str(self.config.state_dir), fleets=len(self.fleets),
            replicas=sum(by_state.values()), by_state=by_state,
            uptime_s=round(time.monotonic() - self.started, 3), problems=self.problems,
            store={"writes": self.store.writes, "failures": self.store.failures,
                   "last_error": self.store.last_error},
            readopt_s=round(self.readopt_s, 3) if self.readopt_s is not None else None)

    def _free_name(self) -> str:
        n = 0
        while True:
            name = "fleet" if n == 0 else f"fleet{n}"
            try:
                check_fleet_name(name, list(self.fleets))
                return name
            except ConflictError:
                n += 1

    async def h_start(self, p: P.StartParams, peer: Peer) -> P.StartResult:
        assert self.placer and self.rt and self.decision and self._tg
        name = p.name or self._free_name()
        check_fleet_name(name, list(self.fleets))
        spec = p.spec
        spec.check_files()
        choice = choose(spec, self.decision)          # AccelError before anything starts
        names = [f"{name}-{i}" for i in range(p.replicas)]
        self._check_ports(spec, name, range(p.replicas))
        gdb_ports = self._gdb_ports(p.replicas) if p.debug else []
        plan = self.placer.place([(n, spec.cpus) for n in names], p.policy.pin)
        fleet = Fleet(name, spec, p.policy, emulator_cpus=self.pool.emulator_cpus if self.pool else None)
        self.fleets[name] = fleet
        for i, a in enumerate(plan.assignments):
            r = Replica(fleet, i, self.rt)
            r.assignment = a
            r.debug = p.debug
            r.gdb_port = gdb_ports[i] if p.debug else None
            fleet.replicas[i] = r
        notes = list(plan.notes) + list(choice.notes)
        if plan.overcommitted:
            notes.append(plan.summary())
        notes.append(f"accel {choice.accel}, -cpu {choice.cpu_model}")
        for r in fleet.sorted_replicas():
            if r.debug:
                notes.append(f"{r.name}: halted for gdb: {r.gdb_command()}")
        self.bus.publish("fleet", fleet=name, action="created", replicas=p.replicas,
                         cpus=spec.cpus, pin=p.policy.pin.value, accel=choice.accel)
        self.log.info("fleet.created", fleet=name, replicas=p.replicas, cpus=spec.cpus,
                      overcommitted=plan.overcommitted)
        self.store.mark(name, fleet.record)
        for r in fleet.sorted_replicas():
            await self._tg.start(r.run)
        return P.StartResult(fleet=name, replicas=names, notes=notes, plan=plan.to_json())

    def _check_ports(self, spec: Any, fleet: str, indexes: Any) -> None:
        """Refuse forwards that clash with other fleets or with ports bound on the host."""
        from fleetd.argv import host_ports
        if spec.network is None or not spec.network.ports:
            return
        taken = {(proto, h): r.name for f in self.fleets.values() for r in f.replicas.values()
                 for proto, h, _ in host_ports(f.spec, r.index)}
        check_ports([(f"{fleet}-{i}", proto, h, g) for i in indexes
                     for proto, h, g in host_ports(spec, i)], taken)

    def _gdb_ports(self, n: int, base: int = 1234) -> list[int]:
        """``n`` free TCP ports for gdbstubs, from ``base`` up (1234 is gdb's habit)."""
        from fleetd.ports import host_port_free
        used = {r.gdb_port for r in self.replicas() if r.gdb_port}
        out: list[int] = []
        port = base
        while len(out) < n and port < 65535:
            if port not in used and host_port_free(port):
                out.append(port)
            port += 1
        return out

    async def h_ps(self, p: P.PsParams, peer: Peer) -> P.PsResult:
        reps = self.resolve(p.targets, p.all, default_all=True)
        # built by fleetd itself from typed fields: construct, don't re-validate (hot path)
        return P.PsResult.model_construct(
            replicas=[P.ReplicaInfo.model_construct(**r.info()) for r in reps])

    async def h_inspect(self, p: P.InspectParams, peer: Peer) -> P.ReplicaDetail:
        return P.ReplicaDetail(**self.replica(p.name).detail())

    async def _each(self, reps: list[Replica], op: Any) -> P.NamesResult:
        res = P.NamesResult()

        async def one(r: Replica) -> None:
            try:
                await op(r)
                res.done.append(r.name)
            except FleetError as err:
                res.errors[r.name] = str(err)

        async with anyio.create_task_group() as tg:
            for r in reps:
                tg.start_soon(one, r)
        res.done.sort()
        return res

    async def h_stop(self, p: P.StopParams, peer: Peer) -> P.NamesResult:
        reps = self.resolve(p.targets, p.all)
        return await self._each(reps, lambda r: r.stop(grace=p.grace, kill=p.kill))

    async def h_restart(self, p: P.Targets, peer: Peer) -> P.NamesResult:
        return await self._each(self.resolve(p.targets, p.all), lambda r: r.restart())

    async def h_pause(self, p: P.Targets, peer: Peer) -> P.NamesResult:
        return await self._each(self.resolve(p.targets, p.all), lambda r: r.pause())

    async def h_resume(self, p: P.Targets, peer: Peer) -> P.NamesResult:
        return await self._each(self.resolve(p.targets, p.all), lambda r: r.resume())

    async def h_rm(self, p: P.Targets, peer: Peer) -> P.NamesResult:
        if p.all:
            fleets = list(self.fleets)
        else:
            if not p.targets:
                raise SpecError("targets: give fleet names, or all", field="targets")
            fleets = []
            for t in p.targets:
                if t not in self.fleets:
                    self.replica(t)  # raises not_found for unknown names
                    raise SpecError(f"targets: rm removes whole fleets; {t!r} is a replica "
                                    f"(use: fleetctl scale)", field="targets")
                fleets.append(t)
        res = P.NamesResult()
        for name in fleets:
            fleet = self.fleets[name]
            r = await self._each(fleet.sorted_replicas(), lambda r: r.stop(remove=True))
            res.done.extend(r.done)
            res.errors.update(r.errors)
            for rep in fleet.replicas.values():
                rep.release()
            del self.fleets[name]
            self.bus.publish("fleet", fleet=name, action="removed")
            self._fleet_removed(name)
        return res

    def _fleet_removed(self, name: str) -> None:
        self.store.remove(name)

    async def h_scale(self, p: P.ScaleParams, peer: Peer) -> P.ScaleResult:
        assert self.placer and self.rt and self._tg
        fleet = self.fleet(p.fleet)
        res = P.ScaleResult(fleet=fleet.name, replicas=p.replicas)
        cur = fleet.size
        if p.replicas > cur:
            idx = fleet.next_indexes(p.replicas - cur)
            names = [f"{fleet.name}-{i}" for i in idx]
            self._check_ports(fleet.spec, fleet.name, idx)
            plan = self.placer.place([(n, fleet.spec.cpus) for n in names], fleet.policy.pin)
            new = []
            for i, a in zip(idx, plan.assignments):
                r = Replica(fleet, i, self.rt)
                r.assignment = a
                fleet.replicas[i] = r
                new.append(r)
            if plan.overcommitted:
                res.notes.append(plan.summary())
            for r in new:
                await self._tg.start(r.run)
            res.added = names
        elif p.replicas < cur:
            victims = sorted(fleet.replicas)[p.replicas:]
            reps = [fleet.replicas[i] for i in victims]
            await self._each(reps, lambda r: r.stop(remove=True))
            for i in victims:
                fleet.replicas[i].release()
                del fleet.replicas[i]
            res.removed = [r.name for r in reps]
        self.store.mark(fleet.name, fleet.record)
        self.bus.publish("fleet", fleet=fleet.name, action="scaled", replicas=p.replicas,
                         added=res.added, removed=res.removed)
        return res

    async def h_logs(self, p: P.LogsParams, peer: Peer) -> BaseModel | Streaming:
        r = self.replica(p.name)
        keep = r.policy.logs.console_keep
        lines = consolelog.tail_lines(r.paths.console_log, p.tail, keep)
        result = P.LogsResult(name=r.name, lines=lines)
        if not p.follow:
            return result
        follower = consolelog.FileFollower(r.paths.console_log, from_end=True)

        async def stream() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            while True:
                for line in follower.read_lines():
                    yield "log", {"vm": r.name, "line": line}
                if r.want == Want.REMOVED:
                    return
                await anyio.sleep(0.1)

        return Streaming(result, stream())

    async def h_console(self, p: P.ConsoleParams, peer: Peer) -> Streaming:
        r = self.replica(p.name)
        vm = r.vm
        if vm is None or vm.console is None or not vm.console.connected:
            raise StateError(f"{r.name}: no console while {r.state.value}", vm=r.name,
                             state=r.state.value, operation="console")
        console = vm.console

        async def stream() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            with console.subscribe() as chunks:
                async for chunk in chunks:
                    yield "console", {"vm": r.name, "data": base64.b64encode(chunk).decode()}
            yield "console_closed", {"vm": r.name, "state": r.state.value}

        return Streaming(P.OkResult(), stream())

    async def h_console_input(self, p: P.ConsoleInputParams, peer: Peer) -> P.OkResult:
        r = self.replica(p.name)
        try:
            data = base64.b64decode(p.data, validate=True)
        except ValueError as err:
            raise SpecError("data: not valid base64", field="data") from err
        vm = r.vm
        if vm is None or vm.state.terminal:
            raise StateError(f"{r.name}: not running", vm=r.name, state=r.state.value,
                             operation="console_input")
        await vm.send_console(data)
        return P.OkResult()

    async def h_events(self, p: P.EventsParams, peer: Peer) -> BaseModel | Streaming:
        for t in p.targets:
            if t not in self.fleets:
                self.replica(t)
        # subscribe first, then snapshot the history: no event falls between the two
        sub = self.bus.open(p.targets or None) if p.follow else None
        recent = [e.to_dict() for e in self.bus.recent(p.tail, p.targets or None)]
        result = P.EventsResult(events=recent)
        if sub is None:
            return result

        async def stream() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            try:
                async for ev in sub.recv:
                    yield "event", ev.to_dict()
            finally:
                sub.close()

        return Streaming(result, stream())

    async def h_daemon_stop(self, p: P.DaemonStopParams, peer: Peer) -> P.OkResult:
        self.request_shutdown(stop_guests=p.stop_guests or self.config.stop_guests_on_exit)
        return P.OkResult()

    async def h_plan(self, p: P.PlanParams, peer: Peer) -> P.PlanResult:
        assert self.placer
        names = [f"{p.name}-{i}" for i in range(p.replicas)]
        placer = self.placer
        notes: list[str] = []
        if p.topology:
            shape, _, nodes = p.topology.partition("n")
            pk, co, th = (int(x) for x in shape.split("x"))
            try:
                topo = Topology.synthetic(packages=pk, cores_per_package=co, threads_per_core=th,
                                          nodes=int(nodes or 1))
                hk = parse_cpulist(p.housekeeping or "")
                pool = make_pool(topo, affinity=topo.online(), cgroup=None, configured=None,
                                 housekeeping=hk)
            except ValueError as err:
                raise SpecError(f"topology: {err}", field="topology") from err
            placer = Placer(topo, pool)
            notes.append(f"synthetic host: {topo.summary()} (nothing placed there yet)")
        plan = placer.plan([(n, p.cpus) for n in names], p.pin)
        notes += list(plan.notes)
        if plan.overcommitted:
            notes.append(plan.summary())
        return P.PlanResult(plan=plan.to_json(), table=plan.render_table(), notes=notes)

    def _failure_roots(self, name: str | None) -> list[Path]:
        if name is None:
            root = self.config.state_dir / "vms"
            return [d / "failures" for d in root.iterdir()] if root.is_dir() else []
        if name in self.fleets:
            return [r.failures_dir for r in self.fleets[name].sorted_replicas()]
        try:
            return [self.replica(name).failures_dir]
        except NotFoundError:
            # a removed replica or fleet: its bundles stay on disk
            root = self.config.state_dir / "vms"
            dirs = [d / "failures" for d in (root.iterdir() if root.is_dir() else [])
                    if d.name == name or re.fullmatch(rf"{re.escape(name)}-\d+", d.name)]
            if any(d.is_dir() for d in dirs):
                return dirs
            raise

    async def h_failures(self, p: P.FailuresParams, peer: Peer) -> P.FailuresResult:
        return P.FailuresResult(failures=postmortem.list_bundles(self._failure_roots(p.name)))

    async def h_failure_show(self, p: P.FailureShowParams, peer: Peer) -> P.FailureShowResult:
        meta, files = postmortem.read_bundle(self._failure_roots(None), p.id)
        return P.FailureShowResult(id=p.id, meta=meta, files=files)

    async def h_stats(self, p: P.StatsParams, peer: Peer) -> P.StatsResult:
        reps = self.resolve(p.targets, p.all, default_all=True)
        from fleetd.process import thread_cpu_seconds
        me = os.getpid()
        daemon: dict[str, Any] = {"pid": me, "cpu_seconds": thread_cpu_seconds(me, None) or 0.0,
                                  "uptime_s": round(time.monotonic() - self.started, 3),
                                  "events_published": self.bus.published,
                                  "api_connections": self.server.connections if self.server else 0}
        try:
            with open(f"/proc/{me}/statm") as f:
                daemon["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        return P.StatsResult(replicas=[r.stats() for r in reps], daemon=daemon)

    async def h_inject(self, p: P.InjectParams, peer: Peer) -> P.OkResult:
        r = self.replica(p.name)
        r._live_vm(f"inject {p.fault}")     # refuse before announcing
        self.bus.publish("inject", vm=r.name, fleet=r.fleet.name, fault=p.fault, arg=p.arg)
        await r.inject(p.fault, p.arg)
        return P.OkResult()

    async def h_debug(self, p: P.DebugParams, peer: Peer) -> P.DebugResult:
        """Restart a replica halted, with a gdbstub and health timeouts suspended."""
        r = self.replica(p.name)
        if not r.debug or r.gdb_port is None:
            r.gdb_port = self._gdb_ports(1)[0]
        r.debug = True
        await r.restart()
        await r.wait_until(lambda: r.state in (ReplicaState.PAUSED, ReplicaState.FAILED,
                                               ReplicaState.RUNNING), timeout=30)
        self.bus.publish("debug", vm=r.name, fleet=r.fleet.name, gdb=r.gdb_target())
        return P.DebugResult(name=r.name, gdb_target=r.gdb_target() or "",
                             gdb_command=r.gdb_command(), symbols=r.symbols())


def sd_listen_fd() -> int | None:
    """The listening socket passed by systemd (LISTEN_FDS), if any for this process."""
    from fleetd.sdnotify import listen_fds
    fds = listen_fds()
    return fds[0] if fds else None
