"""``fleetctl soak``: run a fleet for a while, inject faults from a seeded plan, judge the result.

The pure parts are here too and unit-tested: :func:`parse_duration`,
:func:`plan_chaos` (the chaos schedule, a function of the seed and the options
only), :func:`merge_policy`, :func:`daemon_argv`. The judging is
fleetctl/report.py; :class:`Soak` is the orchestration against a real fleetd:

1. start the fleet (or take the existing one of that name) with the soak
   policy (short timeouts for the bundled guest, see :data:`SOAK_POLICY`),
   subscribed to the event stream first so nothing is missed;
2. wait until every replica is healthy, then run for the duration: every
   event goes to :func:`fleetctl.report.ingest`; the planned faults fire in
   order, each at its time or as soon as a healthy replica without a pending
   fault is free (the planned one first, then the next ones round the fleet);
   a ``daemon-restart`` waits for the whole fleet to be healthy and quiet;
   ``stats`` is polled every few seconds for heartbeat counts and fleetd's
   RSS/fds;
3. after the duration, wait for pending faults to resolve (within their
   bounds), collect the post-mortem bundle list and console excerpts, write
   ``summary.json``, ``junit.xml`` and ``report.html``, and remove the fleet
   (unless ``--keep`` or it pre-existed). Ctrl-C jumps to 3.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fleetctl import report as R
from fleetctl.client import ApiError, Client, DaemonUnreachable
from fleetd.errors import FleetError

#: The policy of fleets the soak starts, under what --config sets: timeouts that suit the
#: bundled guest (heartbeats every 100 ms) and a crash-loop limit chaos cannot reach.
SOAK_POLICY: dict[str, Any] = {
    "restart": {"backoff_initial": 0.2, "backoff_max": 2.0, "crash_loop_failures": 1000},
    "health": {"heartbeat_timeout": 2.0, "stall_timeout": 3.0},
}
#: Chaos kinds and the ``inject`` fault each one sends (daemon-restart is not an inject).
INJECT_FAULT = {"kill": "kill", "sigstop": "sigstop", "pause": "pause", "panic": "panic",
                "hang": "hang", "stall": "stall", "reset": "reset"}
JITTER = 0.25                 # chaos interval +- 25 %
MIN_HEALTHY_S = 1.0           # a replica must have been healthy this long to get a fault
STATS_EVERY_S = 3.0
GAP_WAIT_S = 0.2              # after (re)subscribing, before the second look at the history
DEDUP_WINDOW_S = 120.0        # events older than the newest by this much are history
DEFAULT_HB_MS = 100

_DUR_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|sec|s|min|m|h|d)?", re.I)
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
          "d": 86400.0}


def parse_duration(text: str | float) -> float:
    """Seconds from ``90s``, ``10m``, ``1h``, ``1.5s``, ``500ms``, ``1h30m`` or a bare number.

    Raises:
        ValueError: anything else (or a negative/empty value).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}")
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DUR_RE.match(s, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 10m, 1h, 1.5s)")
        if m.group(2) is None and m.end() < len(s):
            raise ValueError(f"invalid duration {text!r} (a number without a unit must be "
                             "alone)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def parse_kinds(text: str | Sequence[str] | None) -> list[str]:
    """``kill,sigstop,...`` (or ``all``) as a list of chaos kinds, in the given order.

    Raises:
        ValueError: an unknown kind.
    """
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        k = raw.strip().lower()
        if not k:
            continue
        if k == "all":
            out.extend(x for x in R.ALL_KINDS if x not in out)
            continue
        if k not in R.ALL_KINDS:
            raise ValueError(f"unknown chaos kind {k!r} (kinds: {', '.join(R.ALL_KINDS)}, all)")
        if k not in out:
            out.append(k)
    return out


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``at`` seconds into the soak window, which kind, which replica
    index (None for daemon-restart) and argument (the vCPU of a stall)."""

    index: int
    at: float
    kind: str
    target: int | None
    arg: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_chaos(seed: int | str | None, duration: float, interval: float, kinds: Sequence[str],
               replicas: int, cpus: int) -> list[Fault]:
    """The chaos schedule: a pure function of its arguments.

    Faults come every ``interval`` seconds +- 25 % (seeded jitter), from the
    first interval until ``duration``. Kinds are drawn from seeded shuffles of
    ``kinds`` (every kind once per round, so each appears once in any
    ``len(kinds)`` consecutive faults); each replica fault gets a seeded target
    replica and a stall a seeded vCPU.
    """
    kinds = [k for k in kinds]
    if not kinds or interval <= 0 or duration <= 0 or replicas < 1:
        return []
    rng = random.Random(seed)
    faults: list[Fault] = []
    bag: list[str] = []
    t = 0.0
    while True:
        t += interval * rng.uniform(1 - JITTER, 1 + JITTER)
        if t >= duration:
            break
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        target = rng.randrange(replicas)
        arg = rng.randrange(max(1, cpus))
        faults.append(Fault(len(faults), round(t, 3), kind,
                            None if kind == "daemon-restart" else target,
                            arg if kind == "stall" else None))
    return faults


def merge_policy(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """``override`` deep-merged over ``base`` (tables merge, values replace)."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_policy(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def hb_period_of(spec: dict[str, Any]) -> float | None:
    """Heartbeat period (s) of the bundled guest from its ``append``; None for other kernels
    that say nothing."""
    append = str(spec.get("append") or "")
    m = re.search(r"(?:^|\s)hb_ms=(0x[0-9a-fA-F]+|\d+)(?:\s|$)", append)
    if m:
        ms = int(m.group(1), 0)
        return ms / 1000.0 if ms > 0 else None
    if spec.get("kernel"):
        return None
    return DEFAULT_HB_MS / 1000.0


def _has_opt(argv: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in argv)


def daemon_argv(info: dict[str, Any], cmdline: Sequence[str] | None, *,
                python: str = sys.executable) -> list[str]:
    """The command line to start fleetd again after killing it.

    The old process's own command line when it is readable and is fleetd (so
    --run-dir, --config, log options survive), else ``python -m fleetd.main``;
    either way with the same ``--socket`` and ``--state-dir``, and
    ``--accel tcg`` when the old daemon's accelerator decision says KVM was
    disabled by configuration (``--accel tcg`` or ``FLEETD_ACCEL=tcg``).
    """
    argv = [a for a in (cmdline or [])]
    looks_like_fleetd = bool(argv) and any(
        a.endswith("/fleetd") or a == "fleetd" or a == "fleetd.main" for a in argv[:3])
    if not looks_like_fleetd:
        argv = [python, "-m", "fleetd.main"]
    if not _has_opt(argv, "--socket"):
        argv += ["--socket", str(info["socket"])]
    if not _has_opt(argv, "--state-dir"):
        argv += ["--state-dir", str(info["state_dir"])]
    accel = info.get("accel") or {}
    if "disabled by configuration" in str(accel.get("reason", "")) and not _has_opt(argv, "--accel"):
        argv += ["--accel", "tcg"]
    return argv


def _proc_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# -- options ------------------------------------------------------------------------------------

@dataclass
class SoakOptions:
    name: str | None = None           # None: the --config's name, else "soak"
    replicas: int | None = None
    cpus: int | None = None
    duration: float = 1800.0
    config: Path | None = None
    workload: str | None = None
    chaos: list[str] = field(default_factory=list)
    chaos_interval: float = 30.0
    seed: int | None = None
    report_dir: Path | None = None
    fail_on: str = "unexpected"
    json: bool = False
    keep: bool = False
    margin: float = 3.0
    boot_allowance: float = 30.0
    ready_timeout: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "replicas": self.replicas, "cpus": self.cpus,
                "duration_s": self.duration, "config": str(self.config) if self.config else None,
                "workload": self.workload, "chaos": list(self.chaos),
                "chaos_interval_s": self.chaos_interval, "seed": self.seed,
                "fail_on": self.fail_on, "keep": self.keep, "margin_s": self.margin,
                "boot_allowance_s": self.boot_allowance, "ready_timeout_s": self.ready_timeout,
                "report_dir": str(self.report_dir) if self.report_dir else None}


class SoakAbort(Exception):
    """The soak cannot go on (fleetd gone); finish with what we have."""


# -- the orchestration ----------------------------------------------------------------------------

class Soak:
    """One soak run; see the module docstring. :meth:`run` returns the exit code."""

    def __init__(self, opts: SoakOptions, *, socket: Path | None = None, api_timeout: float = 30.0,
                 out: TextIO | None = None, err: TextIO | None = None,
                 build_start: Callable[..., dict[str, Any]] | None = None) -> None:
        self.opts = opts
        if opts.seed is None:
            opts.seed = secrets.randbelow(2**31)
        self.socket = socket
        self.api_timeout = api_timeout
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.build_start = build_start
        self.api = Client(socket, timeout=api_timeout)
        self.path = self.api.path
        self.ev: Client | None = None
        self.rec: R.SoakRecord | None = None
        self.created = False
        self.plan: list[Fault] = []
        self.next_fault = 0
        self.next_due: float | None = None
        self.notices: deque[str] = deque(maxlen=8)
        self.info: dict[str, Any] = {}
        self.daemon_pid: int | None = None
        self._last_t = 0.0
        self._seen: dict[str, float] = {}     # event (as JSON) -> time, to de-duplicate
        self._next_stats = 0.0
        self._next_ps_check = 0.0
        self._console_todo: list[Any] = []
        self._resolved_seen: set[int] = set()
        self._failures_seen = 0
        self._live: Any = None
        self._console: Any = None
        self._last_status = 0.0

    # -- output ----------------------------------------------------------------------------------

    def _emit_json(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, default=str) + "\n")
        self.out.flush()

    def notice(self, text: str, **data: Any) -> None:
        now = time.time()
        rel = now - self.rec.started_at if self.rec else 0.0
        self.notices.append(f"+{rel:7.1f}s  {text}")
        if self.opts.json:
            self._emit_json({"time": round(now, 6), "kind": "soak", "message": text, **data})
        elif self._live is None:
            self.err.write(f"soak +{rel:.1f}s: {text}\n")
            self.err.flush()

    # -- API helpers ------------------------------------------------------------------------------

    def call(self, method: str, *, retry: bool = True, timeout: float | None = None,
             **params: Any) -> Any:
        """A request on the API connection (reads are retried once on a lost connection)."""
        client = self.api if timeout is None else Client(self.path, timeout=timeout)
        try:
            try:
                return client.call(method, **params)
            except DaemonUnreachable:
                if not retry:
                    raise
                client.close()
                return client.call(method, **params)
        finally:
            if client is not self.api:
                client.close()

    def _subscribe(self, tail: int) -> None:
        """Follow fleetd's events, with the last ``tail`` of its history.

        fleetd takes the history before it subscribes the follower (after its
        reply), so events published in between are in neither; with a history
        wanted, a second look at it after the subscription closes that gap.
        """
        if self.ev is not None:
            self.ev.close()
        self.ev = Client(self.path, timeout=self.api_timeout)
        first, _ = self.ev.stream("events", follow=True, tail=tail)
        events = list(getattr(first, "events", []))
        if tail:
            time.sleep(GAP_WAIT_S)
            try:
                events += list(self.call("events", tail=tail).events)
                events += [d for k, d in self.ev.poll(0) if k == "event"]
            except FleetError:
                pass
            events.sort(key=lambda e: e.get("time") if isinstance(e.get("time"), (int, float))
                        else 0.0)
        self._on_events(events)

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        assert self.rec is not None
        for ev in events:
            t = ev.get("time")
            if not isinstance(t, (int, float)):
                continue
            key = json.dumps(ev, sort_keys=True, default=str)
            if key in self._seen or t < self._last_t - DEDUP_WINDOW_S \
                    or t < self.rec.started_at - 1.0:
                continue
            self._seen[key] = t
            self._last_t = max(self._last_t, t)
            if self.opts.json and (ev.get("fleet") == self.rec.fleet or ev.get("kind") in
                                   ("daemon", "dropped")):
                self._emit_json(ev)
            R.ingest(self.rec, ev)
        if len(self._seen) > 20000:
            self._seen = {k: v for k, v in self._seen.items()
                          if v >= self._last_t - DEDUP_WINDOW_S}
        self._after_ingest()

    def _after_ingest(self) -> None:
        rec = self.rec
        assert rec is not None
        for f in rec.failures[self._failures_seen:]:
            if not f.expected:
                self.notice(("UNEXPECTED failure" if f.injection is None else "failure")
                            + f" of {f.vm}: {f.cause}: {f.detail}"
                            + (f" ({f.note})" if f.note else ""),
                            event="unexpected" if f.injection is None else "problem",
                            vm=f.vm, cause=f.cause)
                self._console_todo.append(f)
        self._failures_seen = len(rec.failures)
        for inj in rec.injections:
            if inj.resolved and inj.id not in self._resolved_seen:
                self._resolved_seen.add(inj.id)
                self._report_resolved(inj)

    def _report_resolved(self, inj: R.Injection) -> None:
        what = f"#{inj.id} {inj.kind}{'' if inj.arg is None else ' ' + str(inj.arg)} " \
               f"into {inj.vm or 'fleetd'}"
        if inj.outcome == "ok":
            self.notice(f"{what}: detected as {inj.cause} in {R.fmt_s(inj.detection_s)}, "
                        f"recovered in {R.fmt_s(inj.recovery_s)}", event="resolved", id=inj.id,
                        outcome="ok", detection_s=inj.detection_s, recovery_s=inj.recovery_s)
        else:
            self.notice(f"{what}: {'; '.join(inj.problems + inj.warnings)}",
                        event="resolved", id=inj.id, outcome=inj.outcome)
        if inj.problems and inj.vm is not None:
            self._console_todo.append(inj)

    def _fill_consoles(self) -> None:
        while self._console_todo:
            item = self._console_todo.pop(0)
            if item.console is not None or item.vm is None:
                continue
            try:
                logs = self.call("logs", name=item.vm, tail=40)
                item.console = list(getattr(logs, "lines", []))
            except FleetError as err:
                item.console = [f"(no console: {err})"]

    def _poll_events(self, timeout: float) -> None:
        assert self.ev is not None and self.rec is not None
        try:
            events = self.ev.poll(timeout)
        except DaemonUnreachable:
            self._lost_stream("the connection closed")
            return
        except ApiError as err:
            self._lost_stream(f"stream error: {err}")
            return
        self._on_events([d for k, d in events if k == "event"])
        if self.ev.stream_ended:
            self._lost_stream("fleetd ended the subscription")

    def _lost_stream(self, why: str) -> None:
        """The event stream ended without the soak restarting fleetd.

        Resubscribing with a long tail recovers what was missed (events are
        de-duplicated by time). A fleetd that went away, or came back as another
        process, fails the soak: nobody but the soak may restart it.
        """
        rec = self.rec
        assert rec is not None
        now = time.time()
        old_pid = self.daemon_pid
        if self._reconnect(deadline=time.monotonic() + 1.0) and self.daemon_pid == old_pid:
            rec.warnings.append(f"the event stream ended at +{now - rec.started_at:.1f}s "
                                f"({why}); resubscribed")
            return
        down: list[float | None] = [now, None]
        rec.daemon_down.append(down)
        if self.daemon_pid == old_pid:
            self.notice("lost the connection to fleetd; waiting up to 30s for it to come back",
                        event="daemon_lost")
            if not self._reconnect(deadline=time.monotonic() + 30):
                rec.errors.append(f"lost fleetd (pid {old_pid}) at +{now - rec.started_at:.1f}s "
                                  "and it did not come back within 30s")
                raise SoakAbort("fleetd is gone")
        down[1] = time.time()
        rec.errors.append(f"fleetd went away at +{now - rec.started_at:.1f}s, not stopped by "
                          f"the soak (pid {old_pid}, now pid {self.daemon_pid})")

    def _reconnect(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                self.api.close()
                info = self.api.call("info")
                self.info = info.model_dump(mode="json")
                self.daemon_pid = info.pid
                self._subscribe(tail=5000)
                return True
            except FleetError:
                time.sleep(0.2)
        return False

    # -- setup ------------------------------------------------------------------------------------

    def _start_params(self) -> dict[str, Any]:
        o = self.opts
        build = self.build_start
        if build is None:
            from fleetctl.main import build_start_request as build
        params = build(config=o.config, name=o.name, replicas=o.replicas, cpus=o.cpus,
                       workload=o.workload)
        from pydantic import ValidationError

        from fleetd.policy import FleetPolicy
        from fleetd.spec import spec_error_from_validation
        policy = merge_policy(SOAK_POLICY, params.get("policy") or {})
        try:
            FleetPolicy.model_validate(policy)
        except ValidationError as err:
            raise spec_error_from_validation(err, prefix="policy.") from err
        params["policy"] = policy
        return params

    def _setup(self) -> bool:
        o = self.opts
        if o.name is None:
            if o.config is not None:
                from fleetctl.main import load_fleet_config
                cfg_name = load_fleet_config(o.config).data.get("name")
                o.name = cfg_name if isinstance(cfg_name, str) and cfg_name else None
            o.name = o.name or "soak"
        info = self.call("info")
        self.info = info.model_dump(mode="json")
        self.daemon_pid = info.pid
        existing = None
        try:
            existing = self.call("ps", targets=[o.name]).replicas
        except ApiError as err:
            if err.code != "not_found":
                raise
        params: dict[str, Any] = {}
        if existing:
            detail = self.call("inspect", name=existing[0].name)
            policy, spec = detail.policy, detail.spec
            n, cpus = len(existing), existing[0].cpus
        else:
            params = self._start_params()
            policy, spec = params["policy"], params.get("spec") or {}
            n = int(params.get("replicas") or 1)
            cpus = int(spec.get("cpus") or 1)
        options = o.to_dict()
        options.update(replicas=n, cpus=cpus, pre_existing=bool(existing),
                       fleetd_socket=str(self.path), fleetd_pid=info.pid,
                       accel=self.info.get("accel", {}).get("accel"))
        from fleetd.policy import FleetPolicy
        full_policy = FleetPolicy.model_validate(policy).model_dump(mode="json")
        self.rec = R.new_record(o.name, replicas=n, policy=full_policy, options=options,
                                hb_period=hb_period_of(spec), margin=o.margin,
                                boot_allowance=o.boot_allowance)
        self.plan = plan_chaos(o.seed, o.duration, o.chaos_interval, o.chaos, n, cpus)
        self.rec.plan = [f.to_dict() for f in self.plan]
        self._subscribe(tail=0)
        time.sleep(GAP_WAIT_S)      # fleetd subscribes us only after its reply
        if existing:
            now = time.time()
            for r in existing:
                rep = self.rec.replica(r.name)
                rep.state, rep.health, rep.pid, rep.restarts = r.state, r.health, r.pid, r.restarts
                if r.uptime_s is not None:
                    rep.lifetime_start = now - r.uptime_s
                R._redisplay(rep, now)
            self.notice(f"using the existing fleet {o.name} ({n} replicas x {cpus} vCPUs)",
                        event="existing")
        else:
            res = self.call("start", timeout=600.0, **params)
            self.created = True
            self.notice(f"started fleet {res.fleet}: {n} replicas x {cpus} vCPUs "
                        f"(seed {o.seed})", event="started", replicas=res.replicas)
        return self._wait_healthy()

    def _wait_healthy(self) -> bool:
        rec = self.rec
        assert rec is not None
        deadline = time.monotonic() + self.opts.ready_timeout
        rows: list[Any] = []
        while time.monotonic() < deadline:
            self._poll_events(0.2)
            self._refresh()
            rows = self.call("ps", targets=[rec.fleet]).replicas
            if rows and all(r.health == "healthy" for r in rows):
                return True
        bad = ", ".join(f"{r.name} {r.state}/{r.health}" for r in rows if r.health != "healthy")
        rec.errors.append(f"the fleet was not healthy within {self.opts.ready_timeout:g}s "
                          f"({bad or 'no replicas'})")
        for r in rows:
            if r.health != "healthy":
                self._console_todo.append(R.FailureRecord(time.time(), r.name, "not-ready"))
        return False

    # -- the run ----------------------------------------------------------------------------------

    def _sample_stats(self, targets: list[str] | None = None, *, baseline: bool = False) -> None:
        rec = self.rec
        assert rec is not None
        try:
            st = self.call("stats", targets=targets or [rec.fleet])
        except FleetError:
            return
        for r in st.replicas:
            R.sample_heartbeats(rec, r.get("name"), r.get("pid"), r.get("restarts"),
                                r.get("heartbeats_total"), baseline=baseline)
        d = st.daemon or {}
        if targets is None and d.get("pid"):
            rec.daemon_samples.append({"time": time.time(), "pid": d.get("pid"),
                                       "rss_bytes": d.get("rss_bytes"),
                                       "fds": _fd_count(int(d["pid"])),
                                       "api_connections": d.get("api_connections")})

    def _eligible(self, rep: R.ReplicaRecord, now: float) -> bool:
        return (rep.display == "healthy" and rep.pending is None and rep.healthy_since is not None
                and now - rep.healthy_since >= MIN_HEALTHY_S)

    def _daemon_restart_pending(self) -> bool:
        return any(i.kind == "daemon-restart" for i in self.rec.pending)  # type: ignore[union-attr]

    def _chaos_tick(self, now_mono: float) -> None:
        rec = self.rec
        assert rec is not None and rec.window_start is not None
        if self.next_fault >= len(self.plan) or self.next_due is None:
            return
        now = time.time()
        if now < self.next_due or self._daemon_restart_pending():
            return
        if now_mono < self._next_ps_check:
            return
        fault = self.plan[self.next_fault]
        done = self._daemon_restart(fault) if fault.kind == "daemon-restart" \
            else self._inject(fault)
        if not done:
            self._next_ps_check = now_mono + 0.25
            return
        self.next_fault += 1
        if self.next_fault < len(self.plan):
            gap = min(1.0, self.opts.chaos_interval / 2)
            self.next_due = max(rec.window_start + self.plan[self.next_fault].at, time.time() + gap)

    def _inject(self, fault: Fault) -> bool:
        rec = self.rec
        assert rec is not None and fault.target is not None
        n = len(rec.replicas)
        now = time.time()
        names = [f"{rec.fleet}-{(fault.target + k) % n}" for k in range(n)]
        cands = [v for v in names if v in rec.replicas and self._eligible(rec.replicas[v], now)]
        if not cands:
            return False
        rows = {r.name: r for r in self.call("ps", targets=[rec.fleet]).replicas}
        self._poll_events(0)
        for vm in cands:
            row = rows.get(vm)
            rep = rec.replicas[vm]
            if row is None or row.health != "healthy" or row.state != "running" \
                    or row.pid != rep.pid or not self._eligible(rep, time.time()):
                continue
            self._sample_stats([vm])
            inj = R.add_injection(rec, fault.kind, vm, at=time.time(), arg=fault.arg,
                                  planned_at=fault.at, planned_target=names[0])
            try:
                self.call("inject", retry=False, name=vm, fault=INJECT_FAULT[fault.kind],
                          arg=fault.arg)
            except FleetError as err:
                R.injection_failed(rec, inj, str(err), time.time())
                self.notice(f"#{inj.id} inject {fault.kind} into {vm} failed: {err}",
                            event="inject_failed", id=inj.id)
                return True
            self.notice(f"#{inj.id} injected {fault.kind}"
                        f"{'' if fault.arg is None else ' ' + str(fault.arg)} into {vm}"
                        + ("" if vm == names[0] else f" (planned {names[0]}, not free)"),
                        event="inject", id=inj.id, fault=fault.kind, vm=vm, arg=fault.arg)
            return True
        return False

    def _daemon_restart(self, fault: Fault) -> bool:
        rec = self.rec
        assert rec is not None
        now = time.time()
        if rec.pending or not all(self._eligible(r, now) for r in rec.replicas.values()):
            return False
        rows = self.call("ps", targets=[rec.fleet]).replicas
        if not rows or any(r.health != "healthy" or r.state != "running" for r in rows):
            return False
        info = self.call("info")
        pid = info.pid
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            cmdline = None
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = "/"
        argv = daemon_argv(info.model_dump(mode="json"), cmdline)
        self._sample_stats()
        before = {r.name: (r.pid, r.restarts) for r in rows}
        inj = R.add_injection(rec, "daemon-restart", None, at=time.time(), planned_at=fault.at,
                              before=before)
        self.notice(f"#{inj.id} daemon-restart: SIGKILL fleetd (pid {pid}), start it again",
                    event="inject", id=inj.id, fault="daemon-restart", pid=pid, argv=argv)
        if self.ev is not None:
            self.ev.close()
        self.api.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as err:
            R.injection_failed(rec, inj, f"cannot kill fleetd pid {pid}: {err}", time.time())
            self._reconnect(deadline=time.monotonic() + 30)
            return True
        down = [time.time(), None]
        rec.daemon_down.append(down)
        deadline = time.monotonic() + 10
        while not _proc_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        state_dir = Path(str(info.state_dir))
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            with open(state_dir / "fleetd.log", "ab") as log:
                if shutil.which("setsid"):
                    subprocess.run(["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=cwd, check=True, timeout=30)
                else:  # pragma: no cover - util-linux is everywhere fleetd runs
                    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        except (OSError, subprocess.SubprocessError) as err:
            rec.errors.append(f"could not start fleetd again ({' '.join(argv)}): {err}")
            raise SoakAbort("fleetd could not be restarted") from err
        deadline = time.monotonic() + self.opts.boot_allowance
        while time.monotonic() < deadline:
            try:
                self.api.close()
                new = self.api.call("info")
                if new.pid != pid:
                    self.info = new.model_dump(mode="json")
                    self.daemon_pid = new.pid
                    break
            except FleetError:
                pass
            time.sleep(0.05)
        else:
            rec.errors.append(f"fleetd did not answer within {self.opts.boot_allowance:g}s of "
                              f"being started again (see {state_dir / 'fleetd.log'})")
            raise SoakAbort("fleetd did not come back")
        down[1] = time.time()
        self.notice(f"#{inj.id} fleetd is back (pid {self.daemon_pid}) after "
                    f"{down[1] - down[0]:.2f}s", event="daemon_back", pid=self.daemon_pid)
        self._subscribe(tail=5000)
        return True

    def _check(self) -> None:
        rec = self.rec
        assert rec is not None
        R.check_timeouts(rec, time.time())
        self._after_ingest()

    def _step(self, *, chaos: bool) -> None:
        now_mono = time.monotonic()
        self._poll_events(0.1)
        self._check()
        if chaos:
            self._chaos_tick(now_mono)
        if now_mono >= self._next_stats:
            self._sample_stats()
            self._next_stats = now_mono + STATS_EVERY_S
        self._fill_consoles()
        self._refresh()

    def _loop(self) -> None:
        rec = self.rec
        assert rec is not None
        rec.window_start = time.time()
        self._sample_stats(baseline=True)
        self._next_stats = time.monotonic() + STATS_EVERY_S
        if self.plan:
            self.next_due = rec.window_start + self.plan[0].at
        self.notice(f"all healthy; soaking for {R.fmt_dur(self.opts.duration)}"
                    + (f" with chaos ({', '.join(self.opts.chaos)}, {len(self.plan)} faults "
                       f"planned, seed {self.opts.seed})" if self.plan else ""),
                    event="window_start")
        end = rec.window_start + self.opts.duration
        while time.time() < end:
            self._step(chaos=True)
        # drain: let pending faults resolve within their bounds
        if rec.pending:
            self.notice(f"duration reached; waiting for {len(rec.pending)} pending fault(s)",
                        event="drain")
        while rec.pending:
            self._step(chaos=False)

    # -- live view --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        if self.opts.json or self.rec is None:
            return
        now = time.monotonic()
        if self._live is not None:
            if now - self._last_status >= 0.5:
                self._last_status = now
                self._live.update(self._view(), refresh=True)
            return
        if now - self._last_status >= 30:
            self._last_status = now
            rec = self.rec
            counts: dict[str, int] = {}
            for r in rec.replicas.values():
                counts[r.display] = counts.get(r.display, 0) + 1
            self.err.write(f"soak {self._progress_text()}: "
                           + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "\n")
            self.err.flush()

    def _progress_text(self) -> str:
        rec = self.rec
        assert rec is not None
        if rec.window_start is None:
            return "booting"
        el = time.time() - rec.window_start
        return f"{R.fmt_dur(min(el, self.opts.duration))} / {R.fmt_dur(self.opts.duration)}"

    def _view(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        rec = self.rec
        assert rec is not None
        now = time.time()
        probs = sum(1 for i in rec.injections if i.problems)
        title = (f"fleetd soak {rec.fleet}: {self._progress_text()}  seed {self.opts.seed}  "
                 f"faults {len(rec.injections)}/{len(self.plan)} "
                 f"({len(rec.pending)} pending, {probs} with problems)  "
                 f"unexpected failures {len(rec.unexpected)}")
        t = Table(title=title, title_justify="left", expand=False, pad_edge=False)
        for col in ("REPLICA", "STATE", "HEALTH", "UPTIME", "RESTARTS", "HEARTBEATS", "FAULTS",
                    "FAILURES", "LAST EVENT"):
            t.add_column(col, no_wrap=True, justify="right" if col in (
                "UPTIME", "RESTARTS", "HEARTBEATS", "FAULTS", "FAILURES") else "left")
        styles = {"healthy": "green", "unhealthy": "bold red", "panicked": "bold red",
                  "backoff": "yellow", "paused": "magenta", "failed": "bold red"}
        for rep in sorted(rec.replicas.values(), key=lambda r: r.index):
            up = (now - rep.lifetime_start) if rep.lifetime_start and rep.state in (
                "running", "paused") else None
            unexp = sum(1 for f in rec.unexpected if f.vm == rep.name)
            t.add_row(rep.name, Text(rep.state, style=styles.get(rep.display, "")),
                      Text(rep.health, style=styles.get(rep.health, "")), R.fmt_dur(up),
                      str(rep.restart_events), str(rep.heartbeats_seen),
                      str(sum(1 for i in rec.injections if i.vm == rep.name)),
                      Text(f"{sum(rep.failures_by_cause.values())}"
                           + (f" ({unexp} unexpected)" if unexp else ""),
                           style="bold red" if unexp else ""),
                      rep.last_event[:70])
        return Group(t, Text("\n".join(self.notices) or "(no faults yet)", style="dim"))

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self) -> tuple[dict[str, Any], Path]:
        rec = self.rec
        assert rec is not None
        now = time.time()
        if rec.window_start is not None and rec.window_end is None:
            rec.window_end = now
        R.check_timeouts(rec, now, final=True)
        self._after_ingest()
        reachable = True
        try:
            if rec.window_start is not None:
                self._sample_stats()
            res = self.call("failures", name=rec.fleet)
            rec.bundles = [b for b in res.failures
                           if (b.get("time") or 0) >= rec.started_at - 1]
        except FleetError as err:
            reachable = False
            rec.warnings.append(f"could not list post-mortem bundles: {err}")
        if reachable:
            try:
                self._fill_consoles()
            except FleetError:
                pass
        started = rec.window_start
        for f in self.plan[self.next_fault:]:
            rec.not_run.append({**f.to_dict(), "why": "interrupted" if rec.interrupted else
                                "no healthy replica was free before the end" if started else
                                "the soak window never started"})
        rec.ended_at = time.time()
        summary = R.summarize(rec, fail_on=self.opts.fail_on)
        d = self.opts.report_dir or Path(f"soak-report-{time.strftime('%Y%m%d-%H%M%S')}")
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(R.summary_json(summary))
        (d / "junit.xml").write_text(R.junit_xml(rec, summary))
        (d / "report.html").write_text(R.html_report(rec, summary))
        (d / "record.json").write_text(json.dumps(R.record_dict(rec), default=str) + "\n")
        return summary, d

    def _remove_fleet(self) -> None:
        if not self.created or self.opts.keep or self.rec is None:
            return
        try:
            self.call("rm", timeout=600.0, targets=[self.rec.fleet])
            self.notice(f"removed fleet {self.rec.fleet}", event="removed")
        except FleetError as err:
            self.err.write(f"fleetctl: error: could not remove fleet {self.rec.fleet}: {err}\n")

    def _print_result(self, summary: dict[str, Any], d: Path) -> None:
        if self.opts.json:
            self._emit_json({"time": round(time.time(), 6), "kind": "soak", "event": "verdict",
                             "verdict": summary["verdict"], "reasons": summary["reasons"],
                             "totals": summary["totals"], "report_dir": str(d)})
            return
        tot = summary["totals"]
        w = self.out.write
        w(f"soak {summary['fleet']}: {summary['verdict'].upper()} "
          f"({R.fmt_dur(summary['window']['duration_s'])}, {tot['replicas']} replicas, seed "
          f"{summary['seed']}{', interrupted' if summary['interrupted'] else ''})\n")
        for kind, k in summary["faults"].items():
            det, rc = k["detection_s"], k["recovery_s"]
            w(f"  {kind:15} {k['ok']}/{k['injected']} ok   detect p50 {R.fmt_s(det['p50'])} "
              f"p95 {R.fmt_s(det['p95'])} max {R.fmt_s(det['max'])}   recover p50 "
              f"{R.fmt_s(rc['p50'])} p95 {R.fmt_s(rc['p95'])} max {R.fmt_s(rc['max'])}\n")
        w(f"  failures {tot['failures']} ({tot['unexpected_failures']} unexpected), restarts "
          f"{tot['restarts']}, uptime mean {tot['uptime_pct_mean']}%, heartbeats "
          f"{tot['heartbeats_seen']}/{tot['heartbeats_expected']}\n")
        for r in summary["reasons"][:20]:
            w(f"  FAIL: {r}\n")
        if len(summary["reasons"]) > 20:
            w(f"  ... and {len(summary['reasons']) - 20} more (summary.json)\n")
        for r in summary["warnings"][:10]:
            w(f"  warning: {r}\n")
        w(f"  report: {d / 'report.html'}  (summary.json, junit.xml)\n")
        self.out.flush()

    def run(self) -> int:
        """Run the soak; the exit code: 0 pass, 1 fail, 130 interrupted."""
        from fleetctl import render
        if not self.opts.json:
            self._console = render.make_console()
        live_cm = None
        try:
            try:
                if self._console is not None and self._console.is_terminal:
                    from rich.live import Live
                    live_cm = Live(console=self._console, auto_refresh=False, transient=False)
                    self._live = live_cm.__enter__()
                ok = self._setup()
                if ok:
                    self._loop()
            except KeyboardInterrupt:
                if self.rec is None:
                    raise
                self.rec.interrupted = True
                self.notice("interrupted; writing the report", event="interrupted")
            except SoakAbort as err:
                self.notice(f"aborted: {err}", event="aborted")
            except FleetError as err:
                if self.rec is None:
                    raise
                self.rec.errors.append(f"soak stopped by an error: {err}")
                self.notice(f"error: {err}", event="error")
            finally:
                if self._live is not None and live_cm is not None:
                    try:
                        self._live.update(self._view(), refresh=True)
                    except Exception:  # noqa: BLE001 - never lose the report to the view
                        pass
                    live_cm.__exit__(None, None, None)
                    self._live = None
            try:
                summary, d = self._finish()
            finally:
                self._remove_fleet()
                if self.ev is not None:
                    self.ev.close()
                self.api.close()
        except KeyboardInterrupt:
            self._remove_fleet()
            return 130
        self._print_result(summary, d)
        if summary["verdict"] != "pass":
            return 1
        return 130 if summary["interrupted"] else 0
