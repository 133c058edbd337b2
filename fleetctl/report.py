"""Soak results, pure: a :class:`SoakRecord` built from fleetd events, and the reports made from it.

``fleetctl soak`` (fleetctl/soak.py) starts a fleet, injects faults and feeds
every fleetd event to :func:`ingest`; everything here is data in, data or text
out, so it is unit-tested with synthetic events (no daemon, no QEMU):

- :func:`ingest` keeps, per replica, its state and health over time (the
  intervals of the timeline), its failures, restarts and heartbeat samples,
  and matches each ``failure`` event to the fault injected into that replica
  (if any): a failure with no pending injection is *unexpected*;
- :func:`check_timeouts` resolves injections whose bounds ran out (a miss, no
  recovery);
- :func:`summarize` computes the numbers and the verdict (``summary.json``);
- :func:`junit_xml` and :func:`html_report` render them.

Times are wall-clock seconds (``time.time()``), the clock of fleetd's events.

An injected fault is judged by two bounds taken from the fleet's policy
(:func:`fault_bounds`): it must be *detected* (a ``failure`` event with the
expected cause, and the stalled vCPU for ``stall``) within the detection bound,
and *recovered* (the replica healthy again) within the recovery bound, both
counted from the injection. A ``daemon-restart`` (fleetd SIGKILLed and started
again) must cause no guest failure, and every replica must be re-adopted with
its pid and restart count unchanged; "detected" is then the new daemon's
``ready`` event.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

#: Every chaos kind, in the order reports list them.
ALL_KINDS = ("kill", "sigstop", "pause", "panic", "hang", "stall", "reset", "daemon-restart")
HOST_KINDS = frozenset({"kill", "sigstop", "pause", "daemon-restart"})
GUEST_KINDS = frozenset({"panic", "hang", "stall", "reset"})
#: The failure cause fleetd must report for each injected kind.
EXPECTED_CAUSE: dict[str, str | None] = {
    "kill": "crashed", "sigstop": "unresponsive", "pause": "paused", "panic": "panic",
    "hang": "hang", "stall": "stall", "reset": "reset", "daemon-restart": None,
}
#: fleetd's QMP confirmation timeout after a missed heartbeat (fleetd.health.CONFIRM_TIMEOUT).
CONFIRM_TIMEOUT = 0.5
#: Post-mortem register dump timeout when QEMU does not answer (fleetd.postmortem).
POSTMORTEM_QMP_TIMEOUT = 3.0
FAIL_ON = ("unexpected", "any")
#: Below this fraction of expected heartbeats a replica gets a warning.
HEARTBEAT_WARN_RATIO = 0.9
#: A daemon restart is judged this long after fleetd is back (failures right after a
#: re-adoption belong to it).
DAEMON_SETTLE_S = 3.0

#: Display states of the timeline and their colours.
STATE_COLOURS: dict[str, str] = {
    "healthy": "#2ca02c", "booting": "#9ecae1", "starting": "#4f81bd", "unhealthy": "#ff9f1c",
    "paused": "#9467bd", "panicked": "#d62728", "backoff": "#f2d43d", "stopping": "#a0a0a0",
    "stopped": "#5a5a5a", "failed": "#111111", "completed": "#8c564b", "pending": "#d9d9d9",
}
_RESET_HEALTH_STATES = frozenset({"backoff", "stopping", "stopped", "failed", "completed",
                                  "panicked", "pending"})


# -- bounds -----------------------------------------------------------------------------------

def _policy_value(policy: dict[str, Any], section: str, key: str, default: float) -> float:
    sec = policy.get(section) if isinstance(policy, dict) else None
    value = sec.get(key) if isinstance(sec, dict) else None
    return float(value) if isinstance(value, (int, float)) else default


def fault_bounds(policy: dict[str, Any], *, hb_period: float = 0.1, margin: float = 3.0,
                 boot_allowance: float = 30.0) -> dict[str, dict[str, float]]:
    """Detection and recovery bounds (seconds after the injection) per chaos kind.

    Detection: the health timeout that catches the fault (heartbeat_timeout for
    hang/pause, stall_timeout for stall; for sigstop the periodic QMP check can
    hold the checker for check_interval + qmp_timeout before the confirmation)
    plus ``margin``. Recovery: detection + a post-mortem that may wait on a dead
    QMP + backoff_max + ``boot_allowance``.
    """
    hb = _policy_value(policy, "health", "heartbeat_timeout", 3.0)
    st = _policy_value(policy, "health", "stall_timeout", 5.0)
    ci = _policy_value(policy, "health", "check_interval", 1.0)
    qt = _policy_value(policy, "health", "qmp_timeout", 3.0)
    bmax = _policy_value(policy, "restart", "backoff_max", 10.0)
    detect = {
        "kill": margin,
        "panic": margin,
        "reset": margin,
        "pause": hb + margin,
        "hang": hb + CONFIRM_TIMEOUT + margin,
        "stall": st + hb_period + margin,
        "sigstop": max(hb, ci + qt) + CONFIRM_TIMEOUT + margin,
        "daemon-restart": boot_allowance,
    }
    out: dict[str, dict[str, float]] = {}
    for kind, d in detect.items():
        if kind == "daemon-restart":
            rec = d + boot_allowance
        else:
            rec = d + POSTMORTEM_QMP_TIMEOUT + bmax + boot_allowance
        out[kind] = {"detect_s": round(d, 3), "recover_s": round(rec, 3)}
    return out


# -- the record -------------------------------------------------------------------------------

@dataclass
class Interval:
    """One stretch of a replica's timeline in one display state (end None: still open)."""

    start: float
    end: float | None
    display: str
    state: str
    health: str
    reason: str = ""


@dataclass
class Injection:
    """One fault the soak injected, and what fleetd made of it."""

    id: int
    kind: str
    vm: str | None                    # None for daemon-restart
    arg: int | None
    at: float
    detect_bound: float
    recover_bound: float
    expected_cause: str | None
    planned_at: float | None = None   # offset in the chaos plan
    planned_target: str | None = None
    detected_at: float | None = None
    cause: str | None = None
    vcpu: int | None = None
    detail: str = ""
    recovered_at: float | None = None
    resolved_at: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    console: list[str] | None = None
    before: dict[str, list[int | None]] = field(default_factory=dict)   # daemon-restart
    adopted: dict[str, list[int | None]] = field(default_factory=dict)  # daemon-restart
    vm_problems: dict[str, int] = field(default_factory=dict)  # vm -> index in problems
    failure_time: float | None = None

    @property
    def resolved(self) -> bool:
        return self.resolved_at is not None

    @property
    def outcome(self) -> str:
        """``pending``, ``ok``, or the first problem's category (``missed``, ``late``...)."""
        if self.problems:
            return self.problems[0].split(":", 1)[0]
        if self.warnings and self.warnings[0].startswith("inject-failed"):
            return "inject-failed"
        if self.resolved_at is None:
            return "pending"
        return "ok"

    @property
    def detection_s(self) -> float | None:
        return None if self.detected_at is None else self.detected_at - self.at

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class FailureRecord:
    """One ``failure`` event of a replica."""

    time: float
    vm: str
    cause: str
    detail: str = ""
    vcpu: int | None = None
    pid: int | None = None
    injection: int | None = None      # the injection it answered (or came with), if any
    problem: bool = False             # it came with a daemon restart, which must cause none
    note: str = ""
    console: list[str] | None = None

    @property
    def expected(self) -> bool:
        """The answer to a fault injected into this replica."""
        return self.injection is not None and not self.problem


@dataclass
class ReplicaRecord:
    name: str
    index: int
    state: str = "pending"
    health: str = "-"
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    restart_events: int = 0
    lifetime_start: float | None = None
    intervals: list[Interval] = field(default_factory=list)
    failures_by_cause: dict[str, int] = field(default_factory=dict)
    hb_max: dict[str, int] = field(default_factory=dict)        # lifetime key -> max total
    hb_baseline: dict[str, int] = field(default_factory=dict)   # at the window start
    pending: int | None = None        # id of the injection not yet resolved
    last_event: str = ""
    last_event_time: float | None = None
    healthy_since: float | None = None
    crash_loop: bool = False

    @property
    def display(self) -> str:
        return display_state(self.state, self.health)

    @property
    def heartbeats_seen(self) -> int:
        return sum(max(0, v - self.hb_baseline.get(k, 0)) for k, v in self.hb_max.items())


@dataclass
class SoakRecord:
    """Everything a soak observed; see the module docstring."""

    fleet: str
    options: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    hb_period: float | None = 0.1
    started_at: float = 0.0
    window_start: float | None = None
    window_end: float | None = None
    ended_at: float | None = None
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    injections: list[Injection] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    daemon_down: list[list[float | None]] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)
    not_run: list[dict[str, Any]] = field(default_factory=list)
    bundles: list[dict[str, Any]] = field(default_factory=list)
    daemon_samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)        # always fail the verdict
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    events_seen: int = 0
    dropped: int = 0
    last_event_time: float = 0.0

    def replica(self, name: str) -> ReplicaRecord:
        rep = self.replicas.get(name)
        if rep is None:
            idx = name.rsplit("-", 1)[-1]
            rep = ReplicaRecord(name, int(idx) if idx.isdigit() else len(self.replicas))
            rep.intervals.append(Interval(self.started_at or 0.0, None, rep.display, rep.state,
                                          rep.health))
            self.replicas[name] = rep
        return rep

    def injection(self, iid: int | None) -> Injection | None:
        if iid is None or not 0 <= iid < len(self.injections):
            return None
        return self.injections[iid]

    @property
    def pending(self) -> list[Injection]:
        return [i for i in self.injections if not i.resolved]

    @property
    def unexpected(self) -> list[FailureRecord]:
        """Failures nobody injected (those during a daemon restart count for it instead)."""
        return [f for f in self.failures if f.injection is None]


def new_record(fleet: str, *, replicas: int = 0, started_at: float | None = None,
               policy: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
               hb_period: float | None = 0.1, margin: float = 3.0,
               boot_allowance: float = 30.0) -> SoakRecord:
    """A record for ``fleet`` with replicas ``<fleet>-0..N-1`` and bounds from ``policy``."""
    rec = SoakRecord(fleet=fleet, options=dict(options or {}), policy=dict(policy or {}),
                     hb_period=hb_period,
                     started_at=time.time() if started_at is None else started_at)
    rec.bounds = fault_bounds(rec.policy, hb_period=hb_period or 0.1, margin=margin,
                              boot_allowance=boot_allowance)
    for i in range(replicas):
        rec.replica(f"{fleet}-{i}")
    return rec


def display_state(state: str, health: str) -> str:
    """The timeline colour of a replica: its state, refined by health while it runs."""
    if state == "running":
        return {"healthy": "healthy", "unhealthy": "unhealthy", "paused": "paused"}.get(
            health, "booting")
    return state if state in STATE_COLOURS else "pending"


def _redisplay(rep: ReplicaRecord, t: float) -> None:
    cur = rep.intervals[-1] if rep.intervals else None
    disp = rep.display
    if cur is not None and cur.end is None:
        if cur.display == disp:
            cur.state, cur.health, cur.reason = rep.state, rep.health, rep.reason or cur.reason
            return
        cur.end = max(t, cur.start)
    rep.intervals.append(Interval(t, None, disp, rep.state, rep.health, rep.reason))
    if disp == "healthy":
        if rep.healthy_since is None:
            rep.healthy_since = t
    else:
        rep.healthy_since = None


# -- injections -------------------------------------------------------------------------------

def add_injection(rec: SoakRecord, kind: str, vm: str | None, *, at: float,
                  arg: int | None = None, planned_at: float | None = None,
                  planned_target: str | None = None,
                  before: dict[str, tuple[int | None, int]] | None = None) -> Injection:
    """Record a fault about to be injected (call it just *before* injecting)."""
    b = rec.bounds.get(kind) or fault_bounds(rec.policy).get(kind) or {"detect_s": 10.0,
                                                                        "recover_s": 60.0}
    inj = Injection(id=len(rec.injections), kind=kind, vm=vm, arg=arg, at=at,
                    detect_bound=b["detect_s"], recover_bound=b["recover_s"],
                    expected_cause=EXPECTED_CAUSE.get(kind), planned_at=planned_at,
                    planned_target=planned_target,
                    before={k: [v[0], v[1]] for k, v in (before or {}).items()})
    rec.injections.append(inj)
    if vm is not None:
        rec.replica(vm).pending = inj.id
    return inj


def injection_failed(rec: SoakRecord, inj: Injection, error: str, now: float) -> None:
    """The inject request itself failed: nothing to expect from it."""
    inj.warnings.append(f"inject-failed: {error}")
    inj.resolved_at = now
    if inj.vm is not None and rec.replica(inj.vm).pending == inj.id:
        rec.replica(inj.vm).pending = None


def _resolve(rec: SoakRecord, inj: Injection, t: float) -> None:
    inj.resolved_at = t
    if inj.vm is not None:
        rep = rec.replica(inj.vm)
        if rep.pending == inj.id:
            rep.pending = None


def _detected(rec: SoakRecord, inj: Injection, t: float, cause: str, detail: str,
              vcpu: int | None) -> None:
    inj.detected_at, inj.cause, inj.detail, inj.vcpu = t, cause, detail, vcpu
    lat = t - inj.at
    if inj.expected_cause is not None and cause != inj.expected_cause:
        inj.problems.append(f"wrong-cause: {inj.kind} into {inj.vm} was detected as {cause!r} "
                            f"(expected {inj.expected_cause!r}): {detail}")
    elif inj.kind == "stall" and inj.arg is not None and vcpu != inj.arg:
        inj.problems.append(f"wrong-cause: stall of vCPU {inj.arg} in {inj.vm} was reported "
                            f"on vCPU {vcpu}: {detail}")
    if lat > inj.detect_bound:
        inj.problems.append(f"late: {inj.kind} into {inj.vm or 'fleetd'} detected after "
                            f"{lat:.2f}s (bound {inj.detect_bound:g}s)")


def _daemon_restart_progress(rec: SoakRecord, inj: Injection, t: float) -> None:
    """Recovered once fleetd is back and every replica re-adopted and healthy; resolved
    (by :func:`check_timeouts`) :data:`DAEMON_SETTLE_S` after fleetd is back."""
    if inj.detected_at is None or inj.resolved or inj.recovered_at is not None:
        return
    for vm in inj.before:
        if vm not in inj.adopted:
            return
        rep = rec.replicas.get(vm)
        if rep is None or rep.display != "healthy":
            return
    inj.recovered_at = max(t, inj.detected_at)


def _vm_problem(inj: Injection, vm: str, text: str) -> None:
    """One problem per replica for a daemon restart; more about it is appended."""
    idx = inj.vm_problems.get(vm)
    if idx is None:
        inj.vm_problems[vm] = len(inj.problems)
        inj.problems.append(text)
    else:
        inj.problems[idx] += "; " + text.split(": ", 1)[-1]


def check_timeouts(rec: SoakRecord, now: float, *, final: bool = False) -> list[Injection]:
    """Resolve injections whose bounds ran out at ``now``; returns those it resolved.

    With ``final`` (the soak was interrupted) pending injections still inside
    their bounds are closed without a verdict of their own (a warning).
    """
    done = []
    for inj in rec.injections:
        if inj.resolved:
            continue
        if inj.kind == "daemon-restart" and inj.recovered_at is not None and (
                final or now >= (inj.detected_at or inj.at) + DAEMON_SETTLE_S):
            _resolve(rec, inj, now)
            done.append(inj)
            continue
        if now >= inj.at + inj.recover_bound:
            if inj.detected_at is None:
                what = ("fleetd did not come back" if inj.kind == "daemon-restart"
                        else f"no failure reported (expected {inj.expected_cause})")
                inj.problems.append(f"missed: {inj.kind} into {inj.vm or 'fleetd'}: {what} "
                                    f"within {inj.recover_bound:g}s")
            elif inj.kind == "daemon-restart":
                missing = sorted(set(inj.before) - set(inj.adopted))
                unhealthy = sorted(v for v in inj.before
                                   if rec.replicas.get(v) is None
                                   or rec.replicas[v].display != "healthy")
                inj.problems.append(
                    "not-recovered: after the daemon restart "
                    + (f"{', '.join(missing)} not re-adopted" if missing else
                       f"{', '.join(unhealthy)} not healthy")
                    + f" within {inj.recover_bound:g}s")
            else:
                inj.problems.append(f"not-recovered: {inj.vm} not healthy again within "
                                    f"{inj.recover_bound:g}s of the {inj.kind}")
            _resolve(rec, inj, now)
            done.append(inj)
        elif final:
            inj.warnings.append("interrupted: the soak ended before this fault was resolved")
            _resolve(rec, inj, now)
            done.append(inj)
    return done


# -- ingest -----------------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def ingest(rec: SoakRecord, event: dict[str, Any]) -> None:
    """Fold one fleetd event (a dict from the ``events`` stream) into ``rec``.

    Events about other fleets are ignored; ``daemon`` events (no fleet) count.
    """
    if not isinstance(event, dict):
        return
    kind = str(event.get("kind", ""))
    t = _num(event.get("time")) or time.time()
    if kind == "dropped":
        n = _int(event.get("count")) or 0
        rec.dropped += n
        rec.warnings.append(f"fleetd dropped {n} events for this soak (a slow subscriber)")
        return
    if kind == "daemon":
        rec.events_seen += 1
        rec.last_event_time = max(rec.last_event_time, t)
        if event.get("state") == "ready":
            for inj in rec.injections:
                if inj.kind == "daemon-restart" and not inj.resolved and inj.detected_at is None \
                        and t >= inj.at:
                    _detected(rec, inj, t, "readopted", f"fleetd pid {event.get('pid')} ready",
                              None)
                    _daemon_restart_progress(rec, inj, t)
        return
    if event.get("fleet") != rec.fleet:
        return
    rec.events_seen += 1
    rec.last_event_time = max(rec.last_event_time, t)
    vm = event.get("vm")
    if not isinstance(vm, str):
        return
    rep = rec.replica(vm)
    rep.last_event_time = t
    dr = [i for i in rec.injections if i.kind == "daemon-restart" and not i.resolved
          and t >= i.at]
    if kind == "state":
        new = str(event.get("new", rep.state))
        rep.state = new
        rep.reason = str(event.get("reason", ""))
        if new in _RESET_HEALTH_STATES:
            rep.health = "-"
        rep.last_event = f"state {event.get('old', '?')} -> {new}" + (
            f" ({rep.reason})" if rep.reason else "")
        _redisplay(rep, t)
    elif kind == "health":
        rep.health = str(event.get("health", rep.health))
        reason = str(event.get("reason", ""))
        rep.last_event = f"health {rep.health}" + (f" ({reason})" if reason else "")
        _redisplay(rep, t)
        if rep.health == "healthy":
            inj = rec.injection(rep.pending)
            if inj is not None and inj.detected_at is not None and not inj.resolved \
                    and t >= inj.detected_at:
                inj.recovered_at = t
                if t - inj.at > inj.recover_bound:
                    inj.problems.append(f"not-recovered: {vm} healthy again only after "
                                        f"{t - inj.at:.2f}s (bound {inj.recover_bound:g}s)")
                _resolve(rec, inj, t)
            for d in dr:
                _daemon_restart_progress(rec, d, t)
    elif kind == "started":
        pid = _int(event.get("pid"))
        restarts = _int(event.get("restarts"))
        if pid != rep.pid:
            rep.lifetime_start = t
            if rep.pid is not None:
                rep.health = "booting"
        rep.pid = pid
        if restarts is not None:
            rep.restarts = restarts
        rep.last_event = f"started pid {pid}"
        _redisplay(rep, t)
        for d in dr:
            if vm in d.before:
                d.adopted[vm] = [pid, restarts]
                want = d.before[vm]
                if (want[0], want[1]) != (pid, restarts):
                    _vm_problem(d, vm, f"not-readopted: {vm} came back with pid {pid} "
                                f"restarts {restarts} (before the daemon restart: pid "
                                f"{want[0]} restarts {want[1]})")
            _daemon_restart_progress(rec, d, t)
    elif kind == "restart":
        rep.restart_events += 1
        r = _int(event.get("restarts"))
        if r is not None:
            rep.restarts = r
        rep.last_event = f"restart #{rep.restarts}"
    elif kind == "backoff":
        rep.last_event = f"backoff {event.get('delay_s')}s after {event.get('cause')}"
    elif kind == "crash_loop":
        rep.crash_loop = True
        rep.last_event = f"crash loop ({event.get('failures')} failures, {event.get('cause')})"
    elif kind == "inject":
        rep.last_event = f"inject {event.get('fault')}" + (
            f" {event.get('arg')}" if event.get("arg") is not None else "")
    elif kind == "failure":
        cause = str(event.get("cause", "?"))
        detail = str(event.get("detail", ""))
        vcpu = _int(event.get("vcpu"))
        rep.failures_by_cause[cause] = rep.failures_by_cause.get(cause, 0) + 1
        rep.last_event = f"FAILURE {cause}: {detail}"
        f = FailureRecord(t, vm, cause, detail, vcpu, _int(event.get("pid")))
        inj = rec.injection(rep.pending)
        if inj is not None and inj.detected_at is None and not inj.resolved and t >= inj.at:
            f.injection = inj.id
            inj.failure_time = t
            _detected(rec, inj, t, cause, detail, vcpu)
        else:
            if dr:
                f.injection, f.problem = dr[0].id, True
                f.note = f"during daemon-restart #{dr[0].id}"
                for d in dr:
                    _vm_problem(d, vm, f"guest-failure: {vm} failed during the daemon "
                                f"restart ({cause}: {detail})")
            elif inj is not None and inj.detected_at is not None:
                f.note = f"while recovering from {inj.kind} #{inj.id}"
        rec.failures.append(f)


def sample_heartbeats(rec: SoakRecord, vm: str, pid: int | None, restarts: int | None,
                      total: int | None, *, baseline: bool = False) -> None:
    """A ``stats`` sample: ``heartbeats_total`` of the lifetime (pid, restarts) of ``vm``."""
    if pid is None or total is None:
        return
    rep = rec.replica(vm)
    key = f"{pid}:{restarts}"
    rep.hb_max[key] = max(rep.hb_max.get(key, 0), int(total))
    if baseline:
        rep.hb_baseline[key] = int(total)


# -- summary ----------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_stats(values: list[float]) -> dict[str, float | int | None]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)
    return {"n": len(values), "p50": r(percentile(values, 50)), "p95": r(percentile(values, 95)),
            "max": r(max(values) if values else None)}


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _window(rec: SoakRecord) -> tuple[float, float]:
    start = rec.window_start if rec.window_start is not None else rec.started_at
    end = rec.window_end or rec.ended_at or max(rec.last_event_time, start)
    return start, max(start, end)


def state_seconds(rec: SoakRecord, rep: ReplicaRecord, start: float, end: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for iv in rep.intervals:
        d = _overlap(iv.start, iv.end if iv.end is not None else end, start, end)
        if d > 0:
            out[iv.display] = out.get(iv.display, 0.0) + d
    return out


def match_bundle(rec: SoakRecord, vm: str | None, cause: str | None, t: float | None) -> dict[str, Any] | None:
    """The post-mortem bundle of a failure (same replica and cause, closest in time, < 5 s)."""
    if vm is None or t is None:
        return None
    best, best_d = None, 5.0
    for b in rec.bundles:
        bt = _num(b.get("time"))
        if b.get("vm") != vm or bt is None or (cause and b.get("cause") != cause):
            continue
        d = abs(bt - t)
        if d <= best_d:
            best, best_d = b, d
    return best


def _rel(rec: SoakRecord, t: float | None) -> float | None:
    return None if t is None else round(t - rec.started_at, 3)


def fmt_s(x: float | None) -> str:
    """``1.23s`` / ``-``."""
    return "-" if x is None else f"{x:.2f}s"


def fmt_dur(seconds: float | None) -> str:
    """``45s``, ``3m04s``, ``1h02m``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def injection_dict(rec: SoakRecord, inj: Injection) -> dict[str, Any]:
    b = match_bundle(rec, inj.vm, inj.cause, inj.failure_time)
    return {
        "id": inj.id, "kind": inj.kind, "vm": inj.vm, "arg": inj.arg,
        "at_s": _rel(rec, inj.at), "planned_at_s": inj.planned_at,
        "planned_target": inj.planned_target,
        "expected_cause": inj.expected_cause, "cause": inj.cause, "vcpu": inj.vcpu,
        "detail": inj.detail,
        "detection_s": None if inj.detection_s is None else round(inj.detection_s, 3),
        "recovery_s": None if inj.recovery_s is None else round(inj.recovery_s, 3),
        "detect_bound_s": inj.detect_bound, "recover_bound_s": inj.recover_bound,
        "outcome": inj.outcome, "problems": list(inj.problems), "warnings": list(inj.warnings),
        "bundle": b.get("path") if b else None,
        "before": inj.before or None, "adopted": inj.adopted or None,
    }


def failure_dict(rec: SoakRecord, f: FailureRecord) -> dict[str, Any]:
    b = match_bundle(rec, f.vm, f.cause, f.time)
    return {"at_s": _rel(rec, f.time), "time": f.time, "vm": f.vm, "cause": f.cause,
            "detail": f.detail, "vcpu": f.vcpu, "pid": f.pid, "injection": f.injection,
            "expected": f.expected, "note": f.note, "bundle": b.get("path") if b else None}


def summarize(rec: SoakRecord, *, fail_on: str = "unexpected") -> dict[str, Any]:
    """The numbers and the verdict (the content of ``summary.json``).

    ``fail_on``: ``unexpected`` fails the verdict on failures nobody injected,
    on injected faults detected late, with the wrong cause, missed or not
    recovered in time, and on errors of the soak itself; ``any`` also on every
    guest failure (injected ones included) and on every warning.
    """
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}")
    start, end = _window(rec)
    window = end - start
    reasons: list[str] = list(rec.errors)
    warnings: list[str] = list(dict.fromkeys(rec.warnings))
    for f in rec.unexpected:
        reasons.append(f"unexpected failure: {f.vm} {f.cause} at +{f.time - rec.started_at:.1f}s"
                       + (f" [vcpu {f.vcpu}]" if f.vcpu is not None else "")
                       + (f" ({f.note})" if f.note else "") + f": {f.detail}")
    for inj in rec.injections:
        for p in inj.problems:
            reasons.append(f"injection #{inj.id} at +{inj.at - rec.started_at:.1f}s: {p}")
        for w in inj.warnings:
            warnings.append(f"injection #{inj.id} ({inj.kind} into {inj.vm or 'fleetd'}): {w}")
    for rep in rec.replicas.values():
        if rep.crash_loop:
            reasons.append(f"{rep.name} ended in a crash loop (state {rep.state})")
    by_why: dict[str, list[dict[str, Any]]] = {}
    for nr in rec.not_run:
        by_why.setdefault(str(nr.get("why", "the soak ended")), []).append(nr)
    for why, nrs in by_why.items():
        if len(nrs) <= 3:
            warnings.extend(f"planned fault not run: {nr.get('kind')} at +{nr.get('at')}s "
                            f"({why})" for nr in nrs)
        else:
            warnings.append(f"{len(nrs)} planned faults not run ({why}), the first at "
                            f"+{nrs[0].get('at')}s")
    if rec.interrupted:
        warnings.append("the soak was interrupted before its duration")

    # per replica
    replicas_out = []
    tot_hb_exp = 0.0
    tot_hb_seen = 0
    for rep in sorted(rec.replicas.values(), key=lambda r: r.index):
        secs = state_seconds(rec, rep, start, end)
        healthy = secs.get("healthy", 0.0)
        # heartbeats cannot come between an injection and its detection
        faulted = 0.0
        for inj in rec.injections:
            if inj.vm == rep.name:
                stop = inj.detected_at or inj.resolved_at or end
                faulted += _overlap(inj.at, stop, start, end)
        hb_exp = None
        if rec.hb_period and rec.hb_period > 0:
            hb_exp = int(max(0.0, healthy - faulted) / rec.hb_period)
            tot_hb_exp += hb_exp
        hb_seen = rep.heartbeats_seen if rep.hb_max else None
        if hb_seen is not None:
            tot_hb_seen += hb_seen
        ratio = (hb_seen / hb_exp) if hb_exp and hb_seen is not None else None
        if ratio is not None and ratio < HEARTBEAT_WARN_RATIO and hb_exp >= 50:
            warnings.append(f"{rep.name}: {hb_seen} heartbeats seen of {hb_exp} expected "
                            f"({ratio:.0%})")
        unexpected = [f for f in rec.unexpected if f.vm == rep.name]
        replicas_out.append({
            "name": rep.name, "index": rep.index, "final_state": rep.state,
            "final_health": rep.health,
            "uptime_pct": round(100.0 * healthy / window, 2) if window > 0 else None,
            "healthy_s": round(healthy, 3),
            "state_seconds": {k: round(v, 3) for k, v in sorted(secs.items())},
            "restarts": rep.restart_events,
            "failures_by_cause": dict(sorted(rep.failures_by_cause.items())),
            "failures": sum(rep.failures_by_cause.values()),
            "unexpected_failures": len(unexpected),
            "injections": sum(1 for i in rec.injections if i.vm == rep.name),
            "heartbeats_expected": hb_exp, "heartbeats_seen": hb_seen,
            "heartbeat_ratio": round(ratio, 4) if ratio is not None else None,
        })

    # per fault kind
    kinds_out: dict[str, Any] = {}
    for kind in ALL_KINDS:
        injs = [i for i in rec.injections if i.kind == kind]
        if not injs and kind not in (rec.options.get("chaos") or []):
            continue
        outcomes = Counter(i.outcome for i in injs)
        kinds_out[kind] = {
            "expected_cause": EXPECTED_CAUSE[kind],
            "injected": len([i for i in injs if i.outcome != "inject-failed"]),
            "inject_failed": outcomes.get("inject-failed", 0),
            "ok": outcomes.get("ok", 0),
            "detected_right": sum(1 for i in injs if i.detected_at is not None and not any(
                p.startswith("wrong-cause") for p in i.problems)),
            "late": outcomes.get("late", 0), "wrong_cause": outcomes.get("wrong-cause", 0),
            "missed": outcomes.get("missed", 0),
            "not_recovered": outcomes.get("not-recovered", 0),
            "not_readopted": outcomes.get("not-readopted", 0),
            "guest_failure": outcomes.get("guest-failure", 0),
            "pending": outcomes.get("pending", 0),
            "detection_s": latency_stats([i.detection_s for i in injs
                                          if i.detection_s is not None]),
            "recovery_s": latency_stats([i.recovery_s for i in injs if i.recovery_s is not None]),
            "bounds": rec.bounds.get(kind, {}),
        }

    all_failures = list(rec.failures)
    if fail_on == "any":
        for f in all_failures:
            if f.expected:
                reasons.append(f"failure (--fail-on any): {f.vm} {f.cause} at "
                               f"+{f.time - rec.started_at:.1f}s (injected #{f.injection})")
        reasons.extend(f"warning (--fail-on any): {w}" for w in warnings)
    by_cause: Counter[str] = Counter()
    for rep in rec.replicas.values():
        by_cause.update(rep.failures_by_cause)
    uptimes = [r["uptime_pct"] for r in replicas_out if r["uptime_pct"] is not None]
    totals = {
        "replicas": len(rec.replicas),
        "injected": sum(k["injected"] for k in kinds_out.values()),
        "injected_by_kind": {k: v["injected"] for k, v in kinds_out.items()},
        "injections_ok": sum(k["ok"] for k in kinds_out.values()),
        "injection_problems": sum(1 for i in rec.injections if i.problems),
        "failures": len(all_failures),
        "failures_by_cause": dict(sorted(by_cause.items())),
        "unexpected_failures": len(rec.unexpected),
        "restarts": sum(r["restarts"] for r in replicas_out),
        "uptime_pct_mean": round(sum(uptimes) / len(uptimes), 2) if uptimes else None,
        "uptime_pct_min": min(uptimes) if uptimes else None,
        "heartbeats_expected": int(tot_hb_exp) if rec.hb_period else None,
        "heartbeats_seen": tot_hb_seen,
        "daemon_restarts": sum(1 for i in rec.injections if i.kind == "daemon-restart"
                               and i.outcome != "inject-failed"),
        "events": rec.events_seen, "events_dropped": rec.dropped,
    }
    verdict = "fail" if reasons else "pass"
    return {
        "fleet": rec.fleet,
        "verdict": verdict,
        "reasons": reasons,
        "warnings": list(dict.fromkeys(warnings)),
        "fail_on": fail_on,
        "seed": rec.options.get("seed"),
        "options": rec.options,
        "policy": rec.policy,
        "bounds": rec.bounds,
        "heartbeat_period_s": rec.hb_period,
        "started_at": rec.started_at,
        "started_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.started_at)),
        "window": {"start_s": round(start - rec.started_at, 3),
                   "end_s": round(end - rec.started_at, 3), "duration_s": round(window, 3)},
        "interrupted": rec.interrupted,
        "totals": totals,
        "faults": kinds_out,
        "replicas": replicas_out,
        "injections": [injection_dict(rec, i) for i in rec.injections],
        "unexpected_failures": [failure_dict(rec, f) for f in rec.unexpected],
        "failures": [failure_dict(rec, f) for f in rec.failures],
        "daemon_down": [{"start_s": _rel(rec, a), "end_s": _rel(rec, b)}
                        for a, b in rec.daemon_down],
        "daemon": daemon_summary(rec),
        "plan": rec.plan,
        "not_run": rec.not_run,
        "bundles": [{k: b.get(k) for k in ("id", "vm", "cause", "time", "path")}
                    for b in rec.bundles],
    }


def daemon_summary(rec: SoakRecord) -> dict[str, Any]:
    """fleetd's RSS and fd count per daemon process (pid) over the soak."""
    out: dict[str, Any] = {}
    for s in rec.daemon_samples:
        pid = str(s.get("pid"))
        d = out.setdefault(pid, {"samples": 0, "rss_mib": {}, "fds": {}})
        d["samples"] += 1
        for key, name, scale in (("rss_bytes", "rss_mib", 1 / (1024 * 1024)), ("fds", "fds", 1)):
            v = _num(s.get(key))
            if v is None:
                continue
            v = round(v * scale, 2)
            m = d[name]
            m.setdefault("first", v)
            m["last"] = v
            m["max"] = max(m.get("max", v), v)
    return out


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str) + "\n"


# -- junit ------------------------------------------------------------------------------------

def _console_text(lines: list[str] | None) -> str:
    if not lines:
        return "(no console excerpt)"
    return "console (logs --tail 40):\n" + "\n".join(lines)


def _xml_safe(text: str) -> str:
    return "".join(c if c in "\t\n\r" or 0x20 <= ord(c) < 0xD800 or 0xE000 <= ord(c) <= 0xFFFD
                   else f"\\x{ord(c):02x}" for c in text)


def junit_xml(rec: SoakRecord, summary: dict[str, Any]) -> str:
    """JUnit XML: one testcase per replica (a <failure> per unexpected failure and per
    injected fault handled wrongly), plus a ``fleetd`` suite for daemon restarts."""
    fail_any = summary.get("fail_on") == "any"
    dur = summary["window"]["duration_s"]
    root = ET.Element("testsuites", name=f"fleetctl soak {rec.fleet}")
    suite = ET.SubElement(root, "testsuite", name=f"soak.{rec.fleet}",
                          timestamp=summary.get("started_at_iso", ""), time=f"{dur:.3f}",
                          hostname="")
    props = ET.SubElement(suite, "properties")
    for k in ("seed", "verdict", "fail_on"):
        ET.SubElement(props, "property", name=k, value=str(summary.get(k)))
    for k, v in sorted(rec.options.items()):
        ET.SubElement(props, "property", name=f"option.{k}", value=_xml_safe(
            json.dumps(v) if not isinstance(v, str) else v))
    n_fail = 0
    n_tests = 0
    rows = {r["name"]: r for r in summary["replicas"]}
    for rep in sorted(rec.replicas.values(), key=lambda r: r.index):
        n_tests += 1
        tc = ET.SubElement(suite, "testcase", classname=f"soak.{rec.fleet}", name=rep.name,
                           time=f"{dur:.3f}")
        failed = False
        for f in rec.failures:
            if f.vm != rep.name or (f.expected and not fail_any):
                continue
            kind = ("unexpected" if f.injection is None else "daemon-restart" if f.problem
                    else "injected")
            el = ET.SubElement(tc, "failure", type=f"{kind}:{f.cause}", message=_xml_safe(
                f"{kind} failure {f.cause} at +{f.time - rec.started_at:.1f}s"
                + (f" (vcpu {f.vcpu})" if f.vcpu is not None else "")
                + (f" ({f.note})" if f.note else "") + f": {f.detail}"))
            b = match_bundle(rec, f.vm, f.cause, f.time)
            el.text = _xml_safe((f"post-mortem: {b['path']}\n" if b else "")
                                + _console_text(f.console))
            failed = True
        for inj in rec.injections:
            if inj.vm != rep.name or not (inj.problems or (fail_any and inj.warnings)):
                continue
            msgs = inj.problems + (inj.warnings if fail_any else [])
            el = ET.SubElement(tc, "failure", type=f"injected:{inj.kind}:{inj.outcome}",
                               message=_xml_safe(f"injection #{inj.id} {inj.kind}"
                                                 f"{'' if inj.arg is None else ' ' + str(inj.arg)}"
                                                 f" at +{inj.at - rec.started_at:.1f}s: "
                                                 + "; ".join(msgs)))
            el.text = _xml_safe(_console_text(inj.console))
            failed = True
        for inj in rec.injections:       # re-adoption problems without a guest failure
            idx = inj.vm_problems.get(rep.name)
            if idx is None or any(f.vm == rep.name and f.injection == inj.id
                                  for f in rec.failures):
                continue
            ET.SubElement(tc, "failure", type=f"daemon-restart:{inj.outcome}",
                          message=_xml_safe(f"daemon-restart #{inj.id} at "
                                            f"+{inj.at - rec.started_at:.1f}s: "
                                            f"{inj.problems[idx]}"))
            failed = True
        r = rows.get(rep.name, {})
        out = ET.SubElement(tc, "system-out")
        out.text = _xml_safe(
            f"uptime {r.get('uptime_pct')}%, restarts {r.get('restarts')}, failures "
            f"{r.get('failures_by_cause')}, injections {r.get('injections')}, heartbeats "
            f"{r.get('heartbeats_seen')}/{r.get('heartbeats_expected')}")
        n_fail += failed
    suite.set("tests", str(n_tests))
    suite.set("failures", str(n_fail))
    suite.set("errors", "0")
    total_tests, total_fail = n_tests, n_fail
    dr = [i for i in rec.injections if i.kind == "daemon-restart"]
    general = list(rec.errors) + [f"crash loop: {r.name}" for r in rec.replicas.values()
                                  if r.crash_loop]
    if dr or general:
        ds = ET.SubElement(root, "testsuite", name=f"soak.{rec.fleet}.fleetd",
                           timestamp=summary.get("started_at_iso", ""), time=f"{dur:.3f}")
        d_fail = 0
        for inj in dr:
            tc = ET.SubElement(ds, "testcase", classname=f"soak.{rec.fleet}.fleetd",
                               name=f"daemon-restart #{inj.id} at +{inj.at - rec.started_at:.1f}s",
                               time=f"{(inj.recovery_s or 0.0):.3f}")
            msgs = inj.problems + (inj.warnings if fail_any else [])
            if msgs:
                el = ET.SubElement(tc, "failure", type=f"daemon-restart:{inj.outcome}",
                                   message=_xml_safe("; ".join(msgs)))
                el.text = _xml_safe("\n".join(msgs))
                d_fail += 1
        if general:
            tc = ET.SubElement(ds, "testcase", classname=f"soak.{rec.fleet}.fleetd", name="soak")
            el = ET.SubElement(tc, "failure", type="soak", message=_xml_safe("; ".join(general)))
            el.text = _xml_safe("\n".join(general))
            d_fail += 1
        ds.set("tests", str(len(ds.findall("testcase"))))
        ds.set("failures", str(d_fail))
        ds.set("errors", "0")
        total_tests += len(ds.findall("testcase"))
        total_fail += d_fail
    root.set("tests", str(total_tests))
    root.set("failures", str(total_fail))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# -- html -------------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _nice_step(span: float, target_ticks: int = 10) -> float:
    raw = max(span / max(1, target_ticks), 1e-3)
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400):
        if step >= raw:
            return float(step)
    return float(math.ceil(raw / 3600) * 3600)


def _tick_label(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if s % 60 else "")
    return f"{s // 3600}h" + (f"{(s % 3600) // 60:02d}m" if s % 3600 else "")


SHORT_LABEL = {"sigstop": "SIGSTOP", "daemon-restart": "fleetd restart"}
OUTCOME_COLOURS = {"ok": "#1b7f2a", "pending": "#777777", "inject-failed": "#777777"}
PROBLEM_COLOUR = "#d0021b"


def _label(xx: float, y: float, text: str, dx: float, size: str, fill: str, left: bool,
           tip: str | None = None) -> str:
    """A marker's text label, right of it (left of it near the right edge)."""
    tx = xx - dx if left else xx + dx
    return (f'<text x="{tx:.2f}" y="{y}" font-size="{size}" fill="{fill}" '
            f'text-anchor="{"end" if left else "start"}">{_e(text)}'
            + (f"<title>{_e(tip)}</title>" if tip else "") + "</text>")


def timeline_svg(rec: SoakRecord, summary: dict[str, Any]) -> str:
    """The timeline: one row per replica coloured by state, fault and failure markers."""
    t0 = rec.started_at
    t1 = max(rec.ended_at or 0.0, rec.window_end or 0.0, rec.last_event_time, t0 + 1.0)
    span = t1 - t0
    reps = sorted(rec.replicas.values(), key=lambda r: r.index)
    label_w, plot_w, right = 110, 1240, 20
    row_h, gap, top = 20, 15, 62
    height = top + len(reps) * (row_h + gap) + 34
    width = label_w + plot_w + right

    def x(t: float) -> float:
        return label_w + (min(max(t, t0), t1) - t0) / span * plot_w

    def near_end(xx: float) -> bool:
        return xx > label_w + plot_w - 80

    out: list[str] = [
        f'<svg id="timeline" viewBox="0 0 {width} {height}" width="100%" '
        f'preserveAspectRatio="xMinYMin meet" role="img" font-family="sans-serif" '
        f'font-size="12"><title>Soak timeline of fleet {_e(rec.fleet)}</title>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    # axis
    step = _nice_step(span)
    k = 0
    bottom = top + len(reps) * (row_h + gap)
    while k * step <= span + 1e-9:
        xx = x(t0 + k * step)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 8}" x2="{xx:.1f}" y2="{bottom}" '
                   f'stroke="#e4e4e4" stroke-width="1"/>')
        out.append(f'<text x="{xx:.1f}" y="{bottom + 16}" text-anchor="middle" '
                   f'fill="#444">{_e(_tick_label(k * step))}</text>')
        k += 1
    ws, we = _window(rec)
    for t, label in ((ws, "soak window starts"), (we, "window ends")):
        if rec.window_start is None or not t0 <= t <= t1:
            continue
        xx = x(t)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 30}" x2="{xx:.1f}" y2="{bottom}" '
                   f'stroke="#333" stroke-width="1.5" stroke-dasharray="2,3">'
                   f'<title>{_e(label)} (+{t - t0:.1f}s)</title></line>')
        right_side = xx > label_w + plot_w * 0.85
        out.append(f'<text x="{xx - 3 if right_side else xx + 3:.1f}" y="{top - 32}" '
                   f'text-anchor="{"end" if right_side else "start"}" fill="#333" '
                   f'font-size="11">{_e(label)}</text>')
    # daemon down bands
    for a, b in rec.daemon_down:
        if a is None:
            continue
        b2 = b if b is not None else t1
        out.append(f'<rect x="{x(a):.1f}" y="{top - 6}" width="{max(4.0, x(b2) - x(a)):.1f}" '
                   f'height="{bottom - top + 6}" fill="#000" fill-opacity="0.12">'
                   f'<title>fleetd down (killed by the soak) +{a - t0:.1f}s .. '
                   f'+{b2 - t0:.1f}s ({b2 - a:.2f}s)</title></rect>')
    # rows
    for i, rep in enumerate(reps):
        y = top + i * (row_h + gap)
        out.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" '
                   f'fill="#111" font-weight="bold">{_e(rep.name)}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{row_h}" '
                   f'fill="#f4f4f4"/>')
        # healthy first, then everything else on top, at least 2 px wide: a restart of a
        # fraction of a second must stay visible on a timeline of hours
        ivs = sorted(rep.intervals, key=lambda iv: iv.display != "healthy")
        for iv in ivs:
            a = max(iv.start, t0)
            b = iv.end if iv.end is not None else t1
            if b <= a and iv.end is not None:
                continue
            xa, xb = x(a), x(b)
            w = xb - xa if iv.display == "healthy" else max(2.0, xb - xa)
            colour = STATE_COLOURS.get(iv.display, "#cccccc")
            tip = (f"{rep.name}: {iv.display} (state {iv.state}, health {iv.health})"
                   + (f" {iv.reason}" if iv.reason else "")
                   + f"\n+{a - t0:.1f}s .. +{b - t0:.1f}s ({b - a:.2f}s)")
            out.append(f'<rect class="iv" x="{xa:.2f}" y="{y}" width="{max(0.6, w):.2f}" '
                       f'height="{row_h}" fill="{colour}"><title>{_e(tip)}</title></rect>')
    # failure markers (detected)
    for f in rec.failures:
        rep = rec.replicas.get(f.vm)
        if rep is None:
            continue
        i = reps.index(rep)
        cx, cy = x(f.time), top + i * (row_h + gap) + row_h / 2
        r = 6.5 if not f.expected else 5
        fill = PROBLEM_COLOUR if not f.expected else "#ffffff"
        b = match_bundle(rec, f.vm, f.cause, f.time)
        what = ("UNEXPECTED " if f.injection is None else
                "DURING A DAEMON RESTART: " if f.problem else "")
        tip = (f"{what}failure {f.cause} on {f.vm} at "
               f"+{f.time - t0:.2f}s" + (f" (vcpu {f.vcpu})" if f.vcpu is not None else "")
               + f"\n{f.detail}" + (f"\n{f.note}" if f.note else "")
               + (f"\ninjection #{f.injection}" if f.injection is not None else "")
               + (f"\npost-mortem: {b['path']}" if b else ""))
        out.append(f'<path class="failure" d="M{cx:.2f},{cy - r:.2f} L{cx + r:.2f},{cy:.2f} '
                   f'L{cx:.2f},{cy + r:.2f} L{cx - r:.2f},{cy:.2f} Z" fill="{fill}" '
                   f'stroke="#000" stroke-width="1.3"><title>{_e(tip)}</title></path>')
    # injection markers
    for inj in rec.injections:
        colour = OUTCOME_COLOURS.get(inj.outcome, PROBLEM_COLOUR)
        det = fmt_s(inj.detection_s)
        recov = fmt_s(inj.recovery_s)
        tip = (f"#{inj.id} injected {inj.kind}"
               + (f" {inj.arg}" if inj.arg is not None else "")
               + f" into {inj.vm or 'fleetd'} at +{inj.at - t0:.2f}s\n"
               + f"expected {inj.expected_cause or 'no guest failure, re-adoption'}; got "
               + f"{inj.cause or '-'}\ndetection {det} (bound {inj.detect_bound:g}s), recovery "
               + f"{recov} (bound {inj.recover_bound:g}s)\noutcome {inj.outcome}"
               + "".join(f"\n{p}" for p in inj.problems + inj.warnings))
        xx = x(inj.at)
        if inj.vm is None:
            out.append(f'<g class="inject"><line x1="{xx:.2f}" y1="{top - 6}" x2="{xx:.2f}" '
                       f'y2="{bottom}" stroke="{colour}" stroke-width="2" '
                       f'stroke-dasharray="5,3"/><path d="M{xx - 6:.2f},{top - 16} '
                       f'L{xx + 6:.2f},{top - 16} L{xx:.2f},{top - 6} Z" fill="{colour}" '
                       f'stroke="#000" stroke-width="0.8"/>'
                       + _label(xx, top - 8, "fleetd restart", 8, "10", "#222", near_end(xx))
                       + f'<title>{_e(tip)}</title></g>')
            continue
        rep = rec.replicas.get(inj.vm)
        if rep is None:
            continue
        i = reps.index(rep)
        y = top + i * (row_h + gap)
        out.append(f'<path class="inject" d="M{xx - 5:.2f},{y - 7} L{xx + 5:.2f},{y - 7} '
                   f'L{xx:.2f},{y + 3} Z" fill="{colour}" stroke="#000" stroke-width="0.8">'
                   f'<title>{_e(tip)}</title></path>')
        label = SHORT_LABEL.get(inj.kind, inj.kind) + ("" if inj.arg is None else f" {inj.arg}")
        out.append(_label(xx, y - 2, label, 6, "9.5",
                          "#222" if colour != PROBLEM_COLOUR else PROBLEM_COLOUR, near_end(xx),
                          tip))
        if inj.detected_at is not None:
            out.append(f'<line x1="{xx:.2f}" y1="{y + row_h - 2}" x2="{x(inj.detected_at):.2f}" '
                       f'y2="{y + row_h - 2}" stroke="#000" stroke-width="2"/>')
    out.append(f'<text x="{label_w}" y="{height - 4}" fill="#666" font-size="11">seconds since the '
               f'soak started ({_e(summary.get("started_at_iso", ""))})</text>')
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:20px 28px;color:#1a1a1a;font-size:14px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.verdict{display:inline-block;padding:3px 12px;border-radius:4px;font-weight:bold;color:#fff;font-size:16px}
.pass{background:#1b7f2a} .fail{background:#d0021b}
.meta{color:#444;margin:6px 0 10px} .meta b{color:#111}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d6d6d6;padding:3px 8px;text-align:left;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;min-width:320px;max-width:640px}
th{background:#f0f0f0;cursor:pointer;white-space:nowrap} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecec} tr.ok td.outcome{color:#1b7f2a;font-weight:bold} tr.bad td.outcome{color:#d0021b;font-weight:bold}
.legend span{display:inline-block;margin:2px 12px 2px 0;white-space:nowrap}
.sw{display:inline-block;width:14px;height:12px;vertical-align:-1px;margin-right:4px;border:1px solid #888}
ul.reasons li{color:#b00010} ul.warnings li{color:#8a5a00}
pre{background:#f7f7f7;border:1px solid #e2e2e2;padding:6px;font-size:12px;overflow-x:auto;max-height:320px}
.tl{border:1px solid #ddd;padding:4px;overflow-x:auto}
code{font-size:12px}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows), asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _table(headers: list[str], rows: list[list[Any]], *, row_classes: list[str] | None = None,
           num_cols: set[int] | None = None, wrap_cols: set[int] | None = None) -> str:
    num_cols = num_cols or set()
    wrap_cols = wrap_cols or set()
    h = "".join(f"<th>{_e(c)}</th>" for c in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        cells = []
        for j, c in enumerate(row):
            if isinstance(c, tuple):      # (html, sort value)
                cells.append(f'<td data-v="{_e(c[1])}">{c[0]}</td>')
            else:
                cls_td = (' class="num"' if j in num_cols else
                          ' class="wrap"' if j in wrap_cols else "")
                cells.append(f"<td{cls_td}>{_e('-' if c is None else c)}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table class="sortable"><thead><tr>{h}</tr></thead><tbody>{"".join(body)}'
            f"</tbody></table>")


def _listing(title: str, cls: str, items: list[str], shown: int = 8) -> str:
    """A heading and a list; past ``shown`` items the rest fold into <details>."""
    if not items:
        return ""
    head = "".join(f"<li>{_e(r)}</li>" for r in items[:shown])
    out = f"<h2>{_e(title)} ({len(items)})</h2><ul class='{cls}'>{head}</ul>"
    if len(items) > shown:
        rest = "".join(f"<li>{_e(r)}</li>" for r in items[shown:1000])
        out += (f"<details><summary>{len(items) - shown} more</summary><ul class='{cls}'>"
                f"{rest}</ul></details>")
    return out


def _file_link(path: str | None) -> str:
    if not path:
        return "-"
    from urllib.parse import quote
    return f'<a href="file://{_e(quote(path))}">{_e(path.rsplit("/", 1)[-1])}</a>'


def html_report(rec: SoakRecord, summary: dict[str, Any]) -> str:
    """``report.html``: one self-contained page (inline CSS, SVG and JS; nothing external)."""
    s = summary
    tot = s["totals"]
    verdict = s["verdict"]
    opts = s.get("options") or {}
    parts: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fleetd soak {_e(rec.fleet)}: {verdict.upper()}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>fleetd soak of fleet <code>{_e(rec.fleet)}</code> '
        f'<span class="verdict {verdict}">{verdict.upper()}</span></h1>',
        '<div class="meta">'
        f"<b>started</b> {_e(s.get('started_at_iso'))} &nbsp; <b>window</b> "
        f"{_e(fmt_dur(s['window']['duration_s']))} &nbsp; <b>replicas</b> {tot['replicas']} "
        f"&times; {_e(opts.get('cpus', '?'))} vCPUs &nbsp; <b>seed</b> {_e(s.get('seed'))} "
        f"&nbsp; <b>chaos</b> {_e(', '.join(opts.get('chaos') or []) or 'none')} every "
        f"{_e(opts.get('chaos_interval_s'))}s &nbsp; <b>fail on</b> {_e(s.get('fail_on'))}"
        + (" &nbsp; <b>INTERRUPTED</b>" if s.get("interrupted") else "") + "</div>",
        '<div class="meta">'
        f"<b>faults injected</b> {tot['injected']} ({tot['injections_ok']} handled right, "
        f"{tot['injection_problems']} with problems) &nbsp; <b>failures</b> {tot['failures']} "
        f"&nbsp; <b>unexpected</b> {tot['unexpected_failures']} &nbsp; <b>restarts</b> "
        f"{tot['restarts']} &nbsp; <b>uptime</b> mean {_e(tot['uptime_pct_mean'])}% / min "
        f"{_e(tot['uptime_pct_min'])}% &nbsp; <b>heartbeats</b> {_e(tot['heartbeats_seen'])} "
        f"seen / {_e(tot['heartbeats_expected'])} expected</div>",
    ]
    legend = "".join(f'<span><i class="sw" style="background:{c}"></i>{_e(n)}</span>'
                     for n, c in STATE_COLOURS.items())
    legend += ('<span><i class="sw" style="background:#1b7f2a"></i>&#9660; fault injected, '
               'handled right</span><span><i class="sw" style="background:#d0021b"></i>&#9660; '
               'fault with a problem</span><span>&#9671; failure detected (white: injected, '
               'red: unexpected); black bar: detection latency</span><span><i class="sw" '
               'style="background:#000;opacity:.15"></i>fleetd down; dashed line: '
               'daemon restart</span>')
    parts += ["<h2>Timeline</h2>", '<p class="legend">' + legend + "</p>",
              f'<div class="tl">{timeline_svg(rec, s)}</div>',
              "<p class='meta'>Hover over a bar or a marker for details.</p>"]
    parts += [_listing("Why it failed", "reasons", s["reasons"]),
              _listing("Warnings", "warnings", s["warnings"])]
    # faults by kind
    rows, classes = [], []
    for kind, k in s["faults"].items():
        bad = k["injected"] and k["ok"] < k["injected"]
        det, recov, b = k["detection_s"], k["recovery_s"], k.get("bounds", {})
        rows.append([kind, k["expected_cause"] or "re-adopted", k["injected"], k["ok"],
                     k["late"], k["wrong_cause"], k["missed"], k["not_recovered"]
                     + k.get("not_readopted", 0) + k.get("guest_failure", 0),
                     fmt_s(det["p50"]), fmt_s(det["p95"]), fmt_s(det["max"]),
                     fmt_s(recov["p50"]), fmt_s(recov["p95"]), fmt_s(recov["max"]),
                     f"{b.get('detect_s', '-')}s / {b.get('recover_s', '-')}s"])
        classes.append("bad" if bad else "ok")
    parts += ["<h2>Faults by kind</h2>",
              _table(["kind", "expected", "injected", "ok", "late", "wrong cause", "missed",
                      "not recovered", "detect p50", "p95", "max", "recover p50", "p95", "max",
                      "bounds (detect / recover)"], rows, row_classes=classes,
                     num_cols=set(range(2, 14)))]
    # replicas
    rows, classes = [], []
    for r in s["replicas"]:
        rows.append([r["name"], r["final_state"], r["uptime_pct"], r["restarts"],
                     ", ".join(f"{c} {n}" for c, n in r["failures_by_cause"].items()) or "-",
                     r["unexpected_failures"], r["injections"], r["heartbeats_seen"],
                     r["heartbeats_expected"],
                     None if r["heartbeat_ratio"] is None else f"{r['heartbeat_ratio']:.1%}"])
        classes.append("bad" if r["unexpected_failures"] else "")
    parts += ["<h2>Replicas</h2>",
              _table(["replica", "final state", "uptime %", "restarts", "failures by cause",
                      "unexpected", "faults injected", "heartbeats seen", "expected", "seen %"],
                     rows, row_classes=classes, num_cols={2, 3, 5, 6, 7, 8, 9})]
    # unexpected failures
    if rec.unexpected:
        parts.append("<h2>Unexpected failures</h2>")
        for f in rec.unexpected:
            b = match_bundle(rec, f.vm, f.cause, f.time)
            parts.append(
                f"<p><b>{_e(f.vm)}</b> {_e(f.cause)}"
                + (f" (vCPU {f.vcpu})" if f.vcpu is not None else "")
                + f" at +{f.time - rec.started_at:.1f}s: {_e(f.detail)}"
                + (f" <i>{_e(f.note)}</i>" if f.note else "")
                + (f" &mdash; post-mortem {_file_link(b['path'])}" if b else "") + "</p>"
                + f"<details><summary>console</summary><pre>{_e(_console_text(f.console))}"
                  "</pre></details>")
    # injections
    rows, classes = [], []
    for d in s["injections"]:
        rows.append([d["id"], (_e(f"+{d['at_s']:.1f}s"), d["at_s"]), d["kind"]
                     + ("" if d["arg"] is None else f" {d['arg']}"), d["vm"] or "fleetd",
                     d["expected_cause"] or "re-adopted", d["cause"],
                     fmt_s(d["detection_s"]), fmt_s(d["recovery_s"]), d["outcome"],
                     ("; ".join(d["problems"] + d["warnings"]) or "-"),
                     (_file_link(d["bundle"]), d["bundle"] or "")])
        classes.append("bad" if d["problems"] else "ok")
    parts += ["<h2>Injected faults</h2>",
              _table(["#", "at", "fault", "target", "expected", "detected as", "detection",
                      "recovery", "outcome", "problems", "post-mortem"], rows,
                     row_classes=classes, num_cols={0}, wrap_cols={9})]
    # bundles
    if rec.bundles:
        rows = [[b.get("vm"), b.get("cause"),
                 (_e(f"+{(_num(b.get('time')) or rec.started_at) - rec.started_at:.1f}s"),
                  b.get("time")), (_file_link(b.get("path")), b.get("path") or "")]
                for b in sorted(rec.bundles, key=lambda b: _num(b.get("time")) or 0)]
        parts += ["<h2>Post-mortem bundles</h2>",
                  _table(["replica", "cause", "at", "bundle"], rows)]
    # daemon
    if s.get("daemon"):
        rows = [[pid, d["samples"], d["rss_mib"].get("first"), d["rss_mib"].get("last"),
                 d["rss_mib"].get("max"), d["fds"].get("first"), d["fds"].get("last"),
                 d["fds"].get("max")] for pid, d in s["daemon"].items()]
        parts += ["<h2>fleetd resources</h2>",
                  _table(["fleetd pid", "samples", "RSS MiB first", "last", "max", "fds first",
                          "last", "max"], rows, num_cols=set(range(1, 8)))]
    parts += ["<h2>Options and policy</h2>",
              f"<pre>{_e(json.dumps({'options': opts, 'policy': s.get('policy'), 'bounds': s.get('bounds')}, indent=1, default=str))}</pre>",
              f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def record_dict(rec: SoakRecord) -> dict[str, Any]:
    """The whole record as JSON-ready data (``record.json``: to debug a soak or re-render it)."""
    return asdict(rec)


def load_record(data: dict[str, Any]) -> SoakRecord:
    """A record back from :func:`record_dict` (e.g. ``record.json``), to render it again."""
    d = dict(data)
    reps = {}
    for name, r in (d.pop("replicas", None) or {}).items():
        r = dict(r)
        r["intervals"] = [Interval(**iv) for iv in r.get("intervals", [])]
        r["failures_by_cause"] = dict(r.get("failures_by_cause") or {})
        reps[name] = ReplicaRecord(**r)
    injections = [Injection(**i) for i in d.pop("injections", None) or []]
    failures = [FailureRecord(**f) for f in d.pop("failures", None) or []]
    rec = SoakRecord(**d)
    rec.replicas, rec.injections, rec.failures = reps, injections, failures
    return rec
