"""Rendering for fleetctl: rich tables for people, plain JSON and Prometheus text for programs.

Everything here is pure (data in, text or rich renderables out), so it is
unit-tested without a daemon. ``--json`` output never goes through rich.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fleetd.protocol import (
    FailureShowResult,
    InfoResult,
    NamesResult,
    PlanResult,
    ReplicaDetail,
    ReplicaInfo,
    ScaleResult,
    StatsResult,
)
from fleetd.topology import format_cpulist

# -- consoles and JSON -------------------------------------------------------------------------


def make_console(*, stderr: bool = False) -> Console:
    """A rich console; when not a terminal, wide enough that tables never wrap."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, stderr=stderr, highlight=False, soft_wrap=not tty,
                   width=None if tty else 250)


def emit(renderable: Any, console: Console | None = None) -> None:
    """Print a rich renderable; off a terminal, without the padding rich leaves at line ends."""
    console = console or make_console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as cap:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in cap.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()


def to_plain(obj: Any) -> Any:
    """Models (and lists of them) as JSON-ready data."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, (list, tuple)):
        return [to_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> str:
    """``--json`` output: indented JSON of models or plain data."""
    return json.dumps(to_plain(obj), indent=2, default=str)


# -- small formatters --------------------------------------------------------------------------


def format_uptime(seconds: float | None) -> str:
    """``12s``, ``3m04s``, ``2h01m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_host_cpus(host_cpus: Sequence[Sequence[int]]) -> str:
    """Host CPUs per vCPU, in vCPU order.

    ``[[0], [1]]`` -> ``"0,1"`` (vcpu0 on 0, vcpu1 on 1); a vCPU allowed on
    several CPUs is bracketed: ``[[0], [2, 3]]`` -> ``"0,[2-3]"``; every vCPU
    floating over the same set: ``[[0,1,2,3]] * 4`` -> ``"[0-3]x4"``; none -> ``"-"``.
    """
    if not host_cpus:
        return "-"
    sets = [sorted(set(c)) for c in host_cpus]
    if len(sets) > 1 and all(s == sets[0] for s in sets) and len(sets[0]) > 1:
        return f"[{format_cpulist(sets[0])}]x{len(sets)}"
    parts = []
    for s in sets:
        if not s:
            parts.append("?")
        elif len(s) == 1:
            parts.append(str(s[0]))
        else:
            parts.append(f"[{format_cpulist(s)}]")
    return ",".join(parts)


def format_bytes(n: float | None) -> str:
    """``512B``, ``64.0M``, ``1.5G`` (binary units); ``-`` when unknown."""
    if n is None or not isinstance(n, (int, float)) or not math.isfinite(n):
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{int(value)}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"  # pragma: no cover


def format_time(value: Any) -> str:
    """An event time (epoch seconds or ISO text) as local ``HH:MM:SS.mmm``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return dt.datetime.fromtimestamp(value).strftime("%H:%M:%S.%f")[:-3]
    if isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if stamp.tzinfo is not None:
            stamp = stamp.astimezone()
        return stamp.strftime("%H:%M:%S.%f")[:-3]
    return "-"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(round(value, 3))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _table(*columns: str, title: str | None = None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title,
              title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, no_wrap=True, overflow="fold")
    return t


# -- ps / inspect / info -----------------------------------------------------------------------

PS_COLUMNS = ("NAME", "FLEET", "STATE", "HEALTH", "CPUS", "HOST CPUS", "PID", "UPTIME",
              "RESTARTS")

_STATE_STYLE = {"running": "green", "starting": "yellow", "paused": "cyan", "stopping": "yellow",
                "stopped": "dim", "crashed": "red", "panicked": "red", "failed": "red"}
_HEALTH_STYLE = {"healthy": "green", "booting": "yellow", "unknown": "dim"}


def ps_row(r: ReplicaInfo) -> tuple[str, ...]:
    """One ``ps`` row as plain strings, in :data:`PS_COLUMNS` order."""
    return (r.name, r.fleet, r.state, r.health, str(r.cpus), format_host_cpus(r.host_cpus),
            str(r.pid) if r.pid is not None else "-", format_uptime(r.uptime_s),
            str(r.restarts))


def ps_table(replicas: Iterable[ReplicaInfo]) -> Table:
    t = _table(*PS_COLUMNS)
    for r in replicas:
        row = list(ps_row(r))
        cells: list[Text | str] = list(row)
        cells[2] = Text(row[2], style=_STATE_STYLE.get(r.state, ""))
        cells[3] = Text(row[3], style=_HEALTH_STYLE.get(r.health, "red"))
        t.add_row(*cells)
    return t


def kv_text(items: Iterable[tuple[str, Any]], *, indent: int = 0) -> Text:
    """``key  value`` lines, keys aligned (bold), values verbatim."""
    rows = [(k, _cell(v)) for k, v in items]
    width = max((len(k) for k, _ in rows), default=0)
    out = Text()
    for i, (k, v) in enumerate(rows):
        if i:
            out.append("\n")
        out.append(" " * indent)
        out.append(k.ljust(width), style="bold")
        out.append("  " + v if v else "")
    return out


def info_view(info: InfoResult) -> Text:
    data: dict[str, Any] = info.model_dump()
    data["uptime_s"] = format_uptime(info.uptime_s)
    data["by_state"] = ", ".join(f"{k} {v}" for k, v in info.by_state.items()) or "-"
    a = info.accel
    data["accel"] = (f"{a.get('accel', '?')}"
                     + (f" (KVM usable: -cpu {a['kvm_cpu_model']}, {a.get('kvm_module')})"
                        if a.get("kvm_usable") else " (KVM not usable)"))
    data["accel_reason"] = a.get("reason", "")
    data["problems"] = "; ".join(info.problems) or "-"
    st = info.store
    data["store"] = (f"{st.get('writes', 0)} writes, {st.get('failures', 0)} failures"
                     + (f", last error: {st['last_error']}" if st.get("last_error") else ""))
    if info.readopt_s is None:
        data.pop("readopt_s", None)
    order = ["daemon", "version", "protocol", "pid", "uptime_s", "socket", "state_dir", "qemu",
             "qemu_version", "accel", "accel_reason", "host_cpus", "topology", "pool",
             "housekeeping", "fleets", "replicas", "by_state", "readopt_s", "store", "problems"]
    items = [(k, data[k]) for k in order if k in data] + [
        (k, v) for k, v in data.items() if k not in order]
    return kv_text(("uptime" if k == "uptime_s" else k, v) for k, v in items)


def inspect_view(d: ReplicaDetail) -> Group:
    head = [("name", d.name), ("fleet", d.fleet), ("index", d.index), ("state", d.state),
            ("health", d.health + (f" ({d.health_reason})" if d.health_reason else "")),
            ("pid", d.pid), ("accel", d.accel or "-"), ("cpus", d.cpus),
            ("host cpus", format_host_cpus(d.host_cpus)),
            ("guest cpus online", d.guest_cpus_online), ("restarts", d.restarts),
            ("uptime", format_uptime(d.uptime_s)), ("ports", ", ".join(d.ports) or "-"),
            ("last failure", d.last_failure), ("gdb", d.gdb)]
    if d.exit:
        head.append(("exit", d.exit))
    parts: list[Any] = [kv_text(head)]
    if d.vcpus:
        t = _table("VCPU", "THREAD", "ASKED", "ALLOWED")
        for v in d.vcpus:
            t.add_row(str(v.vcpu), str(v.thread_id),
                      format_cpulist(v.asked) if v.asked else "-",
                      v.cpus_allowed_list)
        parts += [Text("\nvCPUs", style="bold"), t]
    for title, section in (("checks", d.checks), ("paths", d.paths)):
        if section:
            parts += [Text(f"\n{title}", style="bold"), kv_text(section.items(), indent=2)]
    if d.argv:
        parts += [Text("\nargv", style="bold"), Text("  " + shlex.join(d.argv))]
    if d.console_tail:
        parts += [Text("\nconsole (last lines)", style="bold"),
                  Text("\n".join("  " + line for line in d.console_tail))]
    return Group(*parts)


# -- operations --------------------------------------------------------------------------------

VERBS = {"stop": "stopped", "restart": "restarted", "rm": "removed", "pause": "paused",
         "resume": "resumed"}


def names_lines(method: str, result: NamesResult) -> list[str]:
    """``stopped web-0`` lines for the replicas acted on."""
    verb = VERBS.get(method, method)
    return [f"{verb} {name}" for name in result.done]


def scale_lines(result: ScaleResult) -> list[str]:
    lines = [f"{result.fleet}: {result.replicas} replica{'s' if result.replicas != 1 else ''}"]
    if result.added:
        lines.append(f"added {' '.join(result.added)}")
    if result.removed:
        lines.append(f"removed {' '.join(result.removed)}")
    lines += [f"note: {n}" for n in result.notes]
    return lines


def plan_text(plan: PlanResult) -> str:
    return "\n".join([plan.table.rstrip("\n")] + [f"note: {n}" for n in plan.notes])


# -- events ------------------------------------------------------------------------------------

_EVENT_FIXED = ("time", "kind", "vm", "fleet")


def event_text(event: Mapping[str, Any]) -> str:
    """One event as ``time kind vm details`` (details: the other fields as ``k=v``)."""
    details = " ".join(f"{k}={_cell(v)}" for k, v in event.items()
                       if k not in _EVENT_FIXED and v not in (None, "", {}, []))
    vm = event.get("vm") or event.get("fleet") or "-"
    kind = str(event.get("kind", "?"))
    return f"{format_time(event.get('time'))} {kind:<14} {vm:<16} {details}".rstrip()


FAILURE_COLUMNS = ("id", "time", "vm", "cause", "detail", "restarts")


def failures_table(failures: Sequence[Mapping[str, Any]]) -> Table:
    """Failure bundles: the usual columns when present, else every scalar key (``--json`` has all)."""
    present = {k for f in failures for k, v in f.items() if not isinstance(v, (dict, list))}
    keys = [k for k in FAILURE_COLUMNS if k in present] or sorted(present)
    t = _table(*(k.upper() for k in keys))
    for f in failures:
        t.add_row(*(format_time(f.get(k)) if k == "time" else _cell(f.get(k)) for k in keys))
    return t


def failure_view(result: FailureShowResult) -> Group:
    meta = [(k, format_time(v) if k == "time" else v) for k, v in result.meta.items()
            if k != "id"]
    parts: list[Any] = [kv_text([("id", result.id), *meta])]
    for fname, content in result.files.items():
        parts.append(Text(f"--- {fname}", style="bold"))
        parts.append(Text(content.rstrip("\n")))
    return Group(*parts)


# -- stats: Prometheus text and top ------------------------------------------------------------

#: Stats fields that only grow (besides ``*_total`` and ``*cpu_seconds``): counters, ``_total``.
COUNTERS = frozenset({"restarts", "failures", "heartbeats", "vcpu_counter", "events_published",
                      "crashes", "console_bytes", "qmp_errors"})
#: Fields that identify rather than measure: never samples.
NOT_METRICS = frozenset({"pid", "index", "vcpu"})
HELP = {
    "vcpu_cpu_seconds_total": "CPU time consumed by the vCPU thread.",
    "vcpu_counter_rate": "Guest per-vCPU work counter increase per second.",
    "vcpu_counter_total": "Guest per-vCPU work counter.",
    "qemu_cpu_seconds_total": "CPU time consumed by the replica's whole QEMU process.",
    "qemu_rss_bytes": "Resident set size of the replica's QEMU process.",
    "restarts_total": "Times the replica was restarted.",
    "failures_total": "Failures of the replica, all causes.",
    "uptime_seconds": "Seconds since the replica's current guest started.",
    "heartbeats_total": "Guest heartbeats seen.",
    "heartbeat_rate": "Guest heartbeats per second.",
    "replica_info": "Replica state as labels (value is always 1).",
}
_UNIT_SUFFIXES = (("_s", "_seconds"), ("_ms", "_milliseconds"))


def metric_name(key: str) -> tuple[str, str]:
    """A stats field's Prometheus name (without ``fleetd_``) and type (counter/gauge).

    ``uptime_s`` -> ``uptime_seconds`` gauge; ``restarts`` -> ``restarts_total``
    counter; ``qemu_cpu_seconds`` -> ``qemu_cpu_seconds_total`` counter.
    """
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()
    for short, long in _UNIT_SUFFIXES:
        if name.endswith(short):
            name = name[: -len(short)] + long
            break
    if name.endswith("_total"):
        return name, "counter"
    if name in COUNTERS or name.endswith("cpu_seconds"):
        return f"{name}_total", "counter"
    return name, "gauge"


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_value(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))


class _Families:
    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, key: str, value: Any, labels: Mapping[str, Any], *, help_: str | None = None,
            kind: str | None = None) -> None:
        if not _is_number(value):
            return
        name, mtype = metric_name(key)
        mtype = kind or mtype
        full = f"fleetd_{name}"
        fam = self.families.setdefault(
            full, (mtype, help_ or HELP.get(name, f"fleetd stats field {key!r}."), []))
        label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        fam[2].append(f"{full}{{{label_text}}} {_sample_value(value)}" if label_text
                      else f"{full} {_sample_value(value)}")

    def text(self) -> str:
        out = []
        for full, (mtype, help_, samples) in self.families.items():
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {mtype}")
            out.extend(samples)
        return "\n".join(out) + ("\n" if out else "")


def prometheus(stats: StatsResult) -> str:
    """Prometheus text exposition of a stats reply, rendered generically from its keys.

    Each replica dict gives labels ``vm`` (its ``name``) and ``fleet``; every
    numeric field becomes ``fleetd_<field>`` (``*_s`` -> ``*_seconds``; known
    monotonic fields get ``_total`` and type counter); string fields become
    labels of ``fleetd_replica_info 1``; ``vcpus: [{"vcpu": 0, ...}]`` entries
    become ``fleetd_vcpu_<field>{vm,fleet,vcpu}``. Numeric ``daemon`` fields
    become ``fleetd_daemon_<field>``.
    """
    fams = _Families()
    for r in stats.replicas:
        labels = {"vm": r.get("name", "?"), "fleet": r.get("fleet", "")}
        info: dict[str, Any] = {}
        for key, value in r.items():
            if key in ("name", "fleet") or key in NOT_METRICS:
                continue
            if key == "vcpus" and isinstance(value, list):
                for v in value:
                    if not isinstance(v, dict):
                        continue
                    vlabels = {**labels, "vcpu": v.get("vcpu", "?")}
                    for k2, v2 in v.items():
                        if k2 not in NOT_METRICS:
                            fams.add(f"vcpu_{k2}", v2, vlabels)
            elif isinstance(value, str):
                info[key] = value
            else:
                fams.add(key, value, labels)
        if info:
            fams.add("replica_info", 1, {**labels, **info}, kind="gauge")
    for key, value in stats.daemon.items():
        if key not in NOT_METRICS:
            fams.add(f"daemon_{key}", value, {}, help_=f"fleetd daemon {key.replace('_', ' ')}.")
    return fams.text()


def _cpu_seconds(r: Mapping[str, Any]) -> float | None:
    vcpus = r.get("vcpus")
    if not isinstance(vcpus, list):
        return None
    vals = [v.get("cpu_seconds") for v in vcpus if isinstance(v, dict)]
    nums = [float(x) for x in vals if _is_number(x)]
    return sum(nums) if nums else None


TOP_COLUMNS = ("NAME", "FLEET", "STATE", "HEALTH", "VCPU%", "RSS", "RESTARTS", "HB/S", "UPTIME")


def top_rows(stats: StatsResult, previous: StatsResult | None, interval: float,
             health: Mapping[str, str] | None = None) -> list[tuple[str, ...]]:
    """Rows for ``top``: VCPU% is vCPU time per wall time since the previous sample
    (100% = one host CPU); ``health`` comes from ``ps`` (stats does not carry it)."""
    prev = {r.get("name"): _cpu_seconds(r) for r in previous.replicas} if previous else {}
    health = health or {}
    rows = []
    for r in stats.replicas:
        name = str(r.get("name", "?"))
        now, before = _cpu_seconds(r), prev.get(name)
        cpu = "-"
        if now is not None and before is not None and interval > 0:
            cpu = f"{max(0.0, now - before) / interval * 100:.0f}%"
        rows.append((name, str(r.get("fleet", "")), _cell(r.get("state")),
                     health.get(name, _cell(r.get("health"))), cpu,
                     format_bytes(r.get("qemu_rss_bytes")), _cell(r.get("restarts")),
                     _cell(r.get("heartbeat_rate")), format_uptime(r.get("uptime_s"))))
    return rows


def top_table(rows: Iterable[tuple[str, ...]], *, title: str = "") -> Table:
    t = _table(*TOP_COLUMNS, title=title or None)
    for row in rows:
        t.add_row(*row)
    return t
