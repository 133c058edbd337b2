"""fleetctl: the command line of fleetd. Thin: build a request, send it, render the reply.

Exit codes: 0 ok; 1 the operation failed (an error reply, or some replicas
failed); 2 usage error (bad arguments, an invalid config file); 3 no such
fleet or replica; 4 fleetd is not reachable. Errors are one line on stderr:
``fleetctl: error: <message>``.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import select
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.live import Live

from fleetctl import render
from fleetctl.client import ApiError, Client, DaemonUnreachable, InvalidRequest
from fleetd.errors import FleetError, SpecError
from fleetd.placement import PinMode
from fleetd.policy import FleetPolicy
from fleetd.protocol import (
    DebugResult,
    EventsResult,
    FailureShowResult,
    FailuresResult,
    InfoResult,
    LogsResult,
    NamesResult,
    PlanResult,
    PsResult,
    ReplicaDetail,
    ScaleResult,
    StartParams,
    StartResult,
    StatsResult,
)
from fleetd.spec import parse_spec, spec_error_from_validation

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
#: Replica states in which ``start --wait`` gives up at once.
FAILED_STATES = frozenset({"failed", "crashed", "panicked"})
DETACH = b"\x1d"  # Ctrl-]

app = typer.Typer(name="fleetctl", help="Control fleetd, the QEMU SMP fleet runner.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
daemon_app = typer.Typer(help="Control the daemon itself.", no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")


class UsageError(FleetError):
    """The command line does not make sense (exit code 2)."""

    code = "usage"


# -- errors and plumbing -----------------------------------------------------------------------

def _die(message: str, code: int) -> typer.Exit:
    sys.stderr.write(f"fleetctl: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def exit_code_for(err: BaseException) -> int:
    """The exit code for an error raised by a command."""
    if isinstance(err, DaemonUnreachable):
        return EXIT_UNREACHABLE
    if isinstance(err, ApiError):
        return EXIT_NOT_FOUND if err.code == "not_found" else EXIT_FAILED
    if isinstance(err, (UsageError, SpecError, InvalidRequest)):
        return EXIT_USAGE
    return EXIT_FAILED


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn errors into ``fleetctl: error: ...`` and the right exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except FleetError as err:
        raise _die(err.message, exit_code_for(err)) from None
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `fleetctl ps | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None


F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cli_errors():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


@dataclass
class Settings:
    socket: Path | None
    timeout: float


#: Reply timeout for operations that wait on guests (start, stop, scale...).
SLOW_TIMEOUT = 600.0


def connect(ctx: typer.Context, *, slow: bool = False) -> Client:
    """A client for the global ``--socket``/``--api-timeout``; it connects on first use,
    after the request passed local validation. ``slow`` operations wait for guests, so
    their replies get at least :data:`SLOW_TIMEOUT`."""
    settings = ctx.find_object(Settings) or Settings(None, 30.0)
    timeout = max(settings.timeout, SLOW_TIMEOUT) if slow else settings.timeout
    return Client(settings.socket, timeout=timeout)


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_json(obj: Any) -> None:
    out(render.dumps(obj))


def warn(text: str) -> None:
    sys.stderr.write(f"fleetctl: {text}\n")
    sys.stderr.flush()


def require_targets(targets: list[str] | None, all_: bool) -> list[str]:
    """Targets or ``--all``, exactly one of them.

    Raises:
        UsageError: neither or both given.
    """
    targets = targets or []
    if not targets and not all_:
        raise UsageError("give replica or fleet names, or --all")
    if targets and all_:
        raise UsageError("give replica or fleet names, or --all, not both")
    return targets


def report_names(method: str, result: NamesResult, as_json: bool) -> None:
    """Print what was done; per-replica errors go to stderr and exit 1."""
    if as_json:
        print_json(result)
    else:
        for line in render.names_lines(method, result):
            out(line)
    for name, msg in result.errors.items():
        sys.stderr.write(f"fleetctl: error: {name}: {' '.join(msg.split())}\n")
    if result.errors:
        raise typer.Exit(EXIT_FAILED)


# -- fleet config and the start request --------------------------------------------------------

class Workload(StrEnum):
    spin = "spin"
    idle = "idle"
    smp_test = "smp-test"


class Machine(StrEnum):
    pc = "pc"
    q35 = "q35"


class Accel(StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class Restart(StrEnum):
    never = "never"
    on_failure = "on-failure"
    always = "always"


class Fault(StrEnum):
    kill = "kill"
    sigstop = "sigstop"
    sigcont = "sigcont"
    pause = "pause"
    panic = "panic"
    hang = "hang"
    stall = "stall"
    reset = "reset"
    exit = "exit"


TOP_LEVEL_KEYS = ("name", "replicas", "spec", "policy", "debug")
#: Which command-line flag sets which request field (for error messages).
FLAGS = {"name": "--name", "replicas": "--replicas", "spec.cpus": "--cpus",
         "spec.memory": "--memory", "spec.kernel": "--kernel", "spec.initrd": "--initrd",
         "spec.append": "--append", "spec.workload": "--workload", "spec.machine": "--machine",
         "spec.accel": "--accel", "spec.cpu_model": "--cpu-model", "policy.pin": "--pin",
         "policy.restart.policy": "--restart"}
_TABLE_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _toml_path(text: str) -> list[str]:
    return [p.strip().strip("\"'") for p in text.split(".")]


def find_key_line(text: str, field: str) -> int | None:
    """The 1-based line of the TOML key that sets ``field`` (``spec.cpus``), if found.

    Understands ``[table]`` headers and dotted keys; an inline table or array
    (``network = {...}``) answers for the fields inside it. List indices in
    ``field`` are ignored.
    """
    want = [p for p in field.split(".") if not p.isdigit()]
    table: list[str] = []
    best: tuple[int, int] | None = None  # (matched depth, line)
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("[["):
            table = ["<array>"]
            continue
        if m := _TABLE_RE.match(line):
            table = _toml_path(m.group(1))
            continue
        if m := _KEY_RE.match(line):
            path = table + _toml_path(m.group(1))
            if path == want:
                return lineno
            if want[: len(path)] == path and (best is None or len(path) > best[0]):
                best = (len(path), lineno)
    if best is not None:
        return best[1]
    last = re.escape(want[-1]) if want else None
    if last:
        for lineno, line in enumerate(text.splitlines(), 1):
            if re.match(rf"^\s*{last}\s*=", line):
                return lineno
    return None


@dataclass
class FleetConfig:
    """A parsed fleet file: the data, and its text for line numbers."""

    path: Path
    text: str
    data: dict[str, Any]

    def error(self, field: str, message: str) -> SpecError:
        line = find_key_line(self.text, field)
        where = f"{self.path}:{line}" if line else str(self.path)
        return SpecError(f"{where}: {field}: {message}", field=field, path=str(self.path),
                         line=line)


def load_fleet_config(path: Path) -> FleetConfig:
    """Read a TOML fleet file: ``name``, ``replicas``, ``[spec]``, ``[policy]``.

    Relative ``kernel``/``initrd``/``firmware`` paths are relative to the file.

    Raises:
        SpecError: unreadable, not TOML, or an unknown/ill-typed top-level key
            (the message names the file, line and field).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read fleet file: {getattr(err, 'strerror', None) or err}",
                        field="config") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: invalid TOML: {err}", field="config") from err
    config = FleetConfig(path, text, data)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise config.error(key, f"unknown field (expected one of {', '.join(TOP_LEVEL_KEYS)})")
    for key in ("spec", "policy"):
        if key in data and not isinstance(data[key], dict):
            raise config.error(key, "must be a table ([" + key + "])")
    spec = data.setdefault("spec", {})
    for key in ("kernel", "initrd", "firmware"):
        value = spec.get(key)
        if isinstance(value, str) and value and (key != "firmware" or "/" in value):
            p = Path(value).expanduser()
            spec[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return config


def _strip_field(err: SpecError) -> str:
    msg = err.message
    if err.field and msg.startswith(f"{err.field}: "):
        return msg[len(err.field) + 2:]
    return msg


def build_start_request(*, config: Path | None = None, name: str | None = None,
                        replicas: int | None = None, cpus: int | None = None,
                        memory: str | None = None, kernel: Path | None = None,
                        initrd: Path | None = None, append: str | None = None,
                        workload: str | None = None, machine: str | None = None,
                        accel: str | None = None, cpu_model: str | None = None,
                        pin: str | None = None, restart: str | None = None,
                        debug: bool = False) -> dict[str, Any]:
    """The ``start`` params for a command line: the fleet file, overridden by flags.

    Validated locally with the daemon's models; only fields that were set are
    sent (the daemon applies its defaults). Relative paths are made absolute
    (the daemon has another working directory).

    Raises:
        SpecError: one line naming the bad field, as ``--flag: ...`` for flags and
            ``FILE:LINE: field: ...`` for the fleet file.
    """
    cfg = load_fleet_config(config) if config is not None else None
    data: dict[str, Any] = copy.deepcopy(cfg.data) if cfg else {}
    spec: dict[str, Any] = data.setdefault("spec", {})
    policy: dict[str, Any] = data.setdefault("policy", {})
    from_flags: set[str] = set()

    def flag(field: str, value: Any) -> None:
        if value is None:
            return
        *parents, leaf = field.split(".")
        target = data
        for p in parents:
            if not isinstance(target.get(p), dict):
                target[p] = {}  # a flag replaces a non-table value from the file
            target = target[p]
        target[leaf] = value
        from_flags.add(field)

    flag("name", name)
    flag("replicas", replicas)
    flag("spec.cpus", cpus)
    flag("spec.memory", memory)
    flag("spec.kernel", str(kernel.expanduser().resolve()) if kernel is not None else None)
    flag("spec.initrd", str(initrd.expanduser().resolve()) if initrd is not None else None)
    flag("spec.append", append)
    flag("spec.workload", str(workload) if workload is not None else None)
    flag("spec.machine", str(machine) if machine is not None else None)
    flag("spec.accel", str(accel) if accel is not None else None)
    flag("spec.cpu_model", cpu_model)
    flag("policy.pin", str(pin) if pin is not None else None)
    flag("policy.restart.policy", str(restart) if restart is not None else None)
    if debug:
        data["debug"] = True

    def fail(err: SpecError) -> SpecError:
        field, message = err.field or "request", _strip_field(err)
        # a nested model's own check names its field in the message: "backoff_max: ..."
        if m := re.match(r"^([a-z_][a-z0-9_]*): (.+)$", message):
            field, message = f"{field}.{m.group(1)}", m.group(2)
        if field in from_flags or cfg is None:
            return SpecError(f"{FLAGS.get(field, field)}: {message}", field=field)
        return cfg.error(field, message)

    try:
        spec_model = parse_spec(spec, prefix="spec.")
    except SpecError as err:
        raise fail(err) from err
    try:
        policy_model = FleetPolicy.model_validate(policy)
    except ValidationError as err:
        raise fail(spec_error_from_validation(err, prefix="policy.")) from err
    top = {k: data[k] for k in ("name", "replicas", "debug") if k in data}
    try:
        StartParams.model_validate(top)
    except ValidationError as err:
        raise fail(spec_error_from_validation(err)) from err
    return {**top, "spec": spec_model.model_dump(mode="json", exclude_unset=True),
            "policy": policy_model.model_dump(mode="json", exclude_unset=True)}


# -- start --wait --------------------------------------------------------------------------------

@dataclass
class WaitOutcome:
    healthy: bool
    reason: str
    unhealthy: list[Any]


def wait_healthy(client: Client, fleet: str, names: list[str], timeout: float, *,
                 progress: Callable[[str], None], interval: float = 0.15,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> WaitOutcome:
    """Poll ``ps`` until every replica in ``names`` is healthy, one fails, or time runs out.

    Raises:
        ApiError, DaemonUnreachable: from ``ps``.
    """
    deadline = clock() + timeout
    want = set(names)
    while True:
        ps = client.call("ps", targets=[fleet])
        assert isinstance(ps, PsResult)
        rows = [r for r in ps.replicas if not want or r.name in want]
        healthy = [r for r in rows if r.health == "healthy"]
        total = len(want) or len(rows)
        states: dict[str, int] = {}
        for r in rows:
            if r.health != "healthy":
                states[r.state] = states.get(r.state, 0) + 1
        detail = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        progress(f"booting {fleet}: {len(healthy)}/{total} healthy" + (f" ({detail})" if detail else ""))
        not_ok = [r for r in rows if r.health != "healthy"]
        missing = want - {r.name for r in rows}
        if rows and not not_ok and not missing:
            return WaitOutcome(True, "", [])
        failed = [r for r in rows if r.state in FAILED_STATES]
        if failed:
            return WaitOutcome(False, "failed", not_ok)
        if clock() >= deadline:
            return WaitOutcome(False, f"not healthy after {timeout:g}s", not_ok)
        sleep(interval)


def _report_unhealthy(client: Client, outcome: WaitOutcome) -> None:
    names = ", ".join(r.name for r in outcome.unhealthy) or "replicas"
    sys.stderr.write(f"fleetctl: error: {names} {outcome.reason}\n")
    for r in outcome.unhealthy:
        why = f" ({r.health_reason})" if r.health_reason else ""
        fail = f"; last failure: {r.last_failure}" if r.last_failure else ""
        sys.stderr.write(f"  {r.name}: state {r.state}, health {r.health}{why}{fail}\n")
        try:
            logs = client.call("logs", name=r.name, tail=10)
        except FleetError as err:
            sys.stderr.write(f"    (no console lines: {err})\n")
            continue
        assert isinstance(logs, LogsResult)
        for line in logs.lines[-10:]:
            sys.stderr.write(f"    | {line}\n")
    sys.stderr.flush()


# -- commands ------------------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (only) to stdout.")]
TargetsArg = Annotated[list[str] | None, typer.Argument(help="Replica or fleet names.",
                                                        show_default=False)]
AllOpt = Annotated[bool, typer.Option("--all", "-a", help="Every replica of every fleet.")]


@app.callback()
def main(ctx: typer.Context,
         socket: Annotated[Path | None, typer.Option(
             "--socket", "-s", envvar="FLEETD_SOCKET", show_default=False,
             help="fleetd's control socket (default: /run/fleetd/fleetd.sock for root, else "
                  "$XDG_RUNTIME_DIR/fleetd/fleetd.sock).")] = None,
         timeout: Annotated[float, typer.Option(
             "--api-timeout", help="Seconds to wait for each reply.", min=0.1)] = 30.0) -> None:
    """Control fleetd, the QEMU SMP fleet runner."""
    ctx.obj = Settings(socket, timeout)


@app.command()
@handled
def start(ctx: typer.Context,
          name: Annotated[str | None, typer.Option("--name", "-n", help="Fleet name.")] = None,
          replicas: Annotated[int | None, typer.Option("--replicas", "-r")] = None,
          cpus: Annotated[int | None, typer.Option("--cpus", "-c", help="vCPUs per guest.")] = None,
          memory: Annotated[str | None, typer.Option(help="Guest memory, e.g. 64M, 1G.")] = None,
          kernel: Annotated[Path | None, typer.Option(
              help="Kernel image (default: the bundled guest).")] = None,
          initrd: Annotated[Path | None, typer.Option()] = None,
          append: Annotated[str | None, typer.Option(help="Kernel command line.")] = None,
          workload: Annotated[Workload | None, typer.Option(help="Bundled guest workload.")] = None,
          machine: Annotated[Machine | None, typer.Option()] = None,
          accel: Annotated[Accel | None, typer.Option()] = None,
          cpu_model: Annotated[str | None, typer.Option("--cpu-model")] = None,
          pin: Annotated[PinMode | None, typer.Option(help="vCPU pinning.")] = None,
          restart: Annotated[Restart | None, typer.Option(help="Restart policy.")] = None,
          config: Annotated[Path | None, typer.Option("--config", "-f", help="TOML fleet file.")] = None,
          debug: Annotated[bool, typer.Option(help="Start guests with a gdb stub.")] = False,
          wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until healthy.")] = True,
          timeout: Annotated[float, typer.Option(help="Seconds --wait waits.", min=0)] = 60.0,
          as_json: JsonOpt = False) -> None:
    """Start a fleet of identical guests (flags override --config)."""
    params = build_start_request(config=config, name=name, replicas=replicas, cpus=cpus,
                                 memory=memory, kernel=kernel, initrd=initrd, append=append,
                                 workload=workload, machine=machine, accel=accel,
                                 cpu_model=cpu_model, pin=pin, restart=restart, debug=debug)
    with connect(ctx, slow=True) as client:
        result = client.call("start", **params)
        assert isinstance(result, StartResult)
        if not as_json:
            out(f"started fleet {result.fleet}: {' '.join(result.replicas)}")
            for note in result.notes:
                out(f"note: {note}")
        if wait:
            outcome = _wait_with_progress(client, result, timeout, quiet=as_json)
            if not outcome.healthy:
                _report_unhealthy(client, outcome)
                raise typer.Exit(EXIT_FAILED)
        if as_json:
            print_json(result)


def _wait_with_progress(client: Client, result: StartResult, timeout: float, *,
                        quiet: bool) -> WaitOutcome:
    err_console = render.make_console(stderr=True)
    if err_console.is_terminal and not quiet:
        with err_console.status("booting") as status:
            outcome = wait_healthy(client, result.fleet, result.replicas, timeout,
                                   progress=lambda text: status.update(text))
    else:
        last = [""]

        def progress(text: str) -> None:
            if text != last[0] and not quiet:
                sys.stderr.write(text + "\n")
                last[0] = text
        outcome = wait_healthy(client, result.fleet, result.replicas, timeout, progress=progress)
    if outcome.healthy and not quiet:
        out(f"{result.fleet}: {len(result.replicas)}/{len(result.replicas)} healthy")
    return outcome


@app.command()
@handled
def ps(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
       as_json: JsonOpt = False) -> None:
    """List replicas (all of them when no names are given)."""
    with connect(ctx) as client:
        result = client.call("ps", targets=targets or [], all=all_ or not targets)
    assert isinstance(result, PsResult)
    if as_json:
        print_json(result.replicas)
    else:
        render.emit(render.ps_table(result.replicas))


@app.command()
@handled
def inspect(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Everything fleetd knows about one replica."""
    with connect(ctx) as client:
        result = client.call("inspect", name=name)
    assert isinstance(result, ReplicaDetail)
    if as_json:
        print_json(result)
    else:
        render.emit(render.inspect_view(result))


def _targets_command(ctx: typer.Context, method: str, targets: list[str] | None, all_: bool,
                     as_json: bool, **extra: Any) -> None:
    names = require_targets(targets, all_)
    with connect(ctx, slow=True) as client:
        result = client.call(method, targets=names, all=all_, **extra)
    assert isinstance(result, NamesResult)
    report_names(method, result, as_json)


@app.command()
@handled
def stop(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
         grace: Annotated[float | None, typer.Option(help="Seconds for a clean shutdown.")] = None,
         kill: Annotated[bool, typer.Option("--kill", help="Kill at once.")] = False,
         as_json: JsonOpt = False) -> None:
    """Stop replicas (they stay listed until rm)."""
    _targets_command(ctx, "stop", targets, all_, as_json, grace=grace, kill=kill)


@app.command()
@handled
def restart(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
            as_json: JsonOpt = False) -> None:
    """Restart replicas."""
    _targets_command(ctx, "restart", targets, all_, as_json)


@app.command()
@handled
def rm(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
       as_json: JsonOpt = False) -> None:
    """Stop and remove whole fleets (shrink a fleet with scale)."""
    _targets_command(ctx, "rm", targets, all_, as_json)


@app.command()
@handled
def pause(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
          as_json: JsonOpt = False) -> None:
    """Pause guests (vCPUs stop; QEMU stays)."""
    _targets_command(ctx, "pause", targets, all_, as_json)


@app.command()
@handled
def resume(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
           as_json: JsonOpt = False) -> None:
    """Resume paused guests."""
    _targets_command(ctx, "resume", targets, all_, as_json)


@app.command()
@handled
def scale(ctx: typer.Context, fleet: str, replicas: int, as_json: JsonOpt = False) -> None:
    """Grow or shrink a fleet to N replicas."""
    with connect(ctx, slow=True) as client:
        result = client.call("scale", fleet=fleet, replicas=replicas)
    assert isinstance(result, ScaleResult)
    if as_json:
        print_json(result)
    else:
        for line in render.scale_lines(result):
            out(line)


@app.command()
@handled
def logs(ctx: typer.Context, name: str,
         follow: Annotated[bool, typer.Option("--follow", "-f",
                                              help="Keep printing new lines.")] = False,
         tail: Annotated[int, typer.Option("--tail", "-n", help="Lines of history.", min=0)] = 100,
         as_json: JsonOpt = False) -> None:
    """A replica's console output."""
    with connect(ctx) as client:
        if not follow:
            result = client.call("logs", name=name, tail=tail)
            assert isinstance(result, LogsResult)
            if as_json:
                print_json(result)
            else:
                for line in result.lines:
                    out(line)
            return
        first, events = client.stream("logs", name=name, tail=tail, follow=True)
        assert isinstance(first, LogsResult)
        for line in first.lines:
            out(json.dumps({"vm": name, "line": line}) if as_json else line)
        try:
            for kind, data in events:
                if kind == "log":
                    out(json.dumps(data) if as_json else str(data.get("line", "")))
        except KeyboardInterrupt:
            return


@app.command()
@handled
def events(ctx: typer.Context, targets: TargetsArg = None,
           follow: Annotated[bool, typer.Option("--follow", "-f",
                                                help="Keep printing new events.")] = False,
           tail: Annotated[int, typer.Option("--tail", "-n", min=0)] = 100,
           as_json: JsonOpt = False) -> None:
    """Lifecycle, health and failure events (JSON lines with --json --follow)."""
    with connect(ctx) as client:
        if not follow:
            result = client.call("events", targets=targets or [], tail=tail)
            assert isinstance(result, EventsResult)
            if as_json:
                print_json(result.events)
            else:
                for ev in result.events:
                    out(render.event_text(ev))
            return
        first, stream = client.stream("events", targets=targets or [], tail=tail, follow=True)
        assert isinstance(first, EventsResult)
        for ev in first.events:
            out(json.dumps(ev, default=str) if as_json else render.event_text(ev))
        try:
            for kind, data in stream:
                if kind == "event":
                    out(json.dumps(data, default=str) if as_json else render.event_text(data))
        except KeyboardInterrupt:
            return


@app.command()
@handled
def console(ctx: typer.Context, name: str) -> None:
    """Attach to a replica's serial console (Ctrl-] detaches)."""
    with connect(ctx) as client:
        client.stream("console", name=name)
        run_console(client, name, stdin_fd=sys.stdin.fileno(), stdout=sys.stdout.buffer)


def run_console(client: Client, name: str, *, stdin_fd: int, stdout: Any,
                drain: float = 0.5) -> None:
    """Pump console bytes both ways until Ctrl-] (TTY), stdin EOF (+ ``drain`` s), or the end.

    The terminal is put in raw mode on a TTY and always restored.

    Raises:
        ApiError: the daemon ended the console with an error.
        DaemonUnreachable: the connection was lost.
    """
    is_tty = os.isatty(stdin_fd)
    saved = None
    if is_tty:
        import termios
        import tty
        sys.stderr.write(f"Connected to {name}'s console. Escape character is ^]\n")
        sys.stderr.flush()
        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
        # keep output processing: guests that print bare "\n" must not staircase
        mode = termios.tcgetattr(stdin_fd)
        mode[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(stdin_fd, termios.TCSANOW, mode)
    nl = "\n"
    try:
        stdin_open = True
        drain_until: float | None = None
        while not client.stream_ended:
            for kind, data in client.poll(0):
                if kind == "console_closed":
                    sys.stderr.write(f"{nl}fleetctl: {name}'s console closed "
                                     f"(state {data.get('state', '?')}){nl}")
                elif kind == "console":
                    try:
                        chunk = base64.b64decode(str(data.get("data", "")), validate=False)
                    except ValueError:
                        continue
                    stdout.write(chunk)
                    stdout.flush()
            while client.send_errors:
                sys.stderr.write(f"fleetctl: console input rejected: {client.send_errors.popleft()}{nl}")
            if client.stream_ended:
                break
            if drain_until is not None and time.monotonic() >= drain_until:
                return
            fds = [client.fileno()] + ([stdin_fd] if stdin_open else [])
            wait = None if drain_until is None else max(0.0, drain_until - time.monotonic())
            ready, _, _ = select.select(fds, [], [], wait)
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:
                    stdin_open = False
                    drain_until = time.monotonic() + drain
                    continue
                if is_tty and DETACH in data:
                    before = data[: data.index(DETACH)]
                    if before:
                        client.send_console_input(name, before)
                    return
                client.send_console_input(name, data)
        sys.stderr.write(f"fleetctl: console of {name} closed by fleetd{nl}")
    finally:
        if saved is not None:
            import termios
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            sys.stderr.write("\n")
            sys.stderr.flush()


@app.command()
@handled
def info(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The daemon: version, QEMU, accelerator, CPU pool, counts."""
    with connect(ctx) as client:
        result = client.call("info")
    assert isinstance(result, InfoResult)
    if as_json:
        print_json(result)
    else:
        render.emit(render.info_view(result))


@daemon_app.command("stop")
@handled
def daemon_stop(ctx: typer.Context,
                stop_guests: Annotated[bool, typer.Option(
                    "--stop-guests", help="Stop every guest too (else they keep running "
                    "and the next fleetd adopts them).")] = False) -> None:
    """Stop fleetd."""
    with connect(ctx) as client:
        client.call("daemon_stop", stop_guests=stop_guests)
    out("fleetd stopping" + (" (and its guests)" if stop_guests else ""))


@app.command()
@handled
def plan(ctx: typer.Context,
         replicas: Annotated[int, typer.Option("--replicas", "-r")] = 1,
         cpus: Annotated[int, typer.Option("--cpus", "-c")] = 1,
         pin: Annotated[PinMode, typer.Option()] = PinMode.SHARED,
         name: Annotated[str, typer.Option("--name", "-n")] = "plan",
         topology: Annotated[str | None, typer.Option(
             "--topology", help="Preview on a synthetic host: PACKAGESxCORESxTHREADS[nNODES], "
             "e.g. 2x8x2n2 (32 CPUs, 2 NUMA nodes).")] = None,
         housekeeping: Annotated[str | None, typer.Option(
             "--housekeeping", help="With --topology: housekeeping CPUs, e.g. 0,16.")] = None,
         as_json: JsonOpt = False) -> None:
    """Show where a fleet's vCPUs would be pinned, without starting it."""
    extra = {k: v for k, v in (("topology", topology), ("housekeeping", housekeeping)) if v}
    with connect(ctx) as client:
        result = client.call("plan", name=name, replicas=replicas, cpus=cpus, pin=str(pin),
                             **extra)
    assert isinstance(result, PlanResult)
    if as_json:
        print_json(result)
    else:
        out(render.plan_text(result))


@app.command()
@handled
def failures(ctx: typer.Context,
             args: Annotated[list[str] | None, typer.Argument(
                 metavar="[NAME] | show ID", show_default=False,
                 help="A replica or fleet to filter by; or 'show ID' for one bundle.")] = None,
             name: Annotated[str | None, typer.Option(
                 "--name", help="Filter by this name (for a replica called 'show').")] = None,
             as_json: JsonOpt = False) -> None:
    """Post-mortem bundles of failed guests: list them, or `failures show ID`."""
    args = args or []
    if args[:1] == ["show"]:
        if len(args) != 2:
            raise UsageError("usage: fleetctl failures show ID")
        with connect(ctx) as client:
            shown = client.call("failure_show", id=args[1])
        assert isinstance(shown, FailureShowResult)
        if as_json:
            print_json(shown)
        else:
            render.emit(render.failure_view(shown))
        return
    if len(args) > 1 or (args and name):
        raise UsageError("give at most one name")
    with connect(ctx) as client:
        result = client.call("failures", name=name or (args[0] if args else None))
    assert isinstance(result, FailuresResult)
    if as_json:
        print_json(result.failures)
    elif result.failures:
        render.emit(render.failures_table(result.failures))


@app.command()
@handled
def stats(ctx: typer.Context, targets: TargetsArg = None, all_: AllOpt = False,
          as_json: JsonOpt = False,
          prometheus: Annotated[bool, typer.Option(
              "--prometheus", help="Prometheus text exposition format.")] = False) -> None:
    """Per-replica and per-vCPU counters."""
    if as_json and prometheus:
        raise UsageError("--json and --prometheus are exclusive")
    with connect(ctx) as client:
        result = client.call("stats", targets=targets or [], all=all_ or not targets)
    assert isinstance(result, StatsResult)
    if as_json:
        print_json(result)
    elif prometheus:
        sys.stdout.write(render.prometheus(result))
        sys.stdout.flush()
    else:
        with connect(ctx) as client:
            ps = client.call("ps", targets=targets or [], all=all_ or not targets)
        assert isinstance(ps, PsResult)
        health = {r.name: r.health for r in ps.replicas}
        render.emit(render.top_table(render.top_rows(result, None, 0, health)))


@app.command()
@handled
def top(ctx: typer.Context, targets: TargetsArg = None,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes.",
                                                min=0.1)] = 1.0) -> None:
    """A live table of replica stats (Ctrl-C quits)."""
    console_ = render.make_console()
    with connect(ctx) as client:
        previous: StatsResult | None = None
        last = time.monotonic()

        def frame() -> Any:
            nonlocal previous, last
            result = client.call("stats", targets=targets or [], all=not targets)
            ps = client.call("ps", targets=targets or [], all=not targets)
            assert isinstance(result, StatsResult) and isinstance(ps, PsResult)
            now = time.monotonic()
            rows = render.top_rows(result, previous, now - last,
                                   {r.name: r.health for r in ps.replicas})
            previous, last = result, now
            title = f"fleetd top: {len(rows)} replicas, every {interval:g}s (Ctrl-C quits)"
            return render.top_table(rows, title=title)

        try:
            if not console_.is_terminal:  # a pipe or a file: one table per refresh
                while True:
                    render.emit(frame(), console_)
                    time.sleep(interval)
            with Live(console=console_, auto_refresh=False) as live:
                while True:
                    live.update(frame(), refresh=True)
                    time.sleep(interval)
        except KeyboardInterrupt:
            return


@app.command()
@handled
def inject(ctx: typer.Context, name: str, fault: Fault,
           arg: Annotated[int | None, typer.Argument(
               help="Fault argument (exit code).")] = None) -> None:
    """Inject a fault into a replica (testing the supervisor)."""
    with connect(ctx) as client:
        client.call("inject", name=name, fault=str(fault), arg=arg)
    out(f"injected {fault} into {name}")


@app.command()
@handled
def debug(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """How to attach gdb to a replica started with --debug."""
    with connect(ctx) as client:
        result = client.call("debug", name=name)
    assert isinstance(result, DebugResult)
    if as_json:
        print_json(result)
        return
    out(f"gdb target: {result.gdb_target}")
    if result.symbols:
        out(f"symbols:    {result.symbols}")
    out(f"run:        {result.gdb_command}")



config_app = typer.Typer(help="Check fleet and daemon config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("validate")
@handled
def config_validate(path: Path = typer.Argument(..., help="A fleet file or a fleetd.toml."),
                    as_json: JsonOpt = False) -> None:
    """Validate a config file locally; errors name the file, line and field."""
    if path.exists() and path.suffix == ".toml" and re.search(r"(?m)^\s*\[daemon\]", path.read_text()):
        from fleetd.config import load_config
        cfg = load_config(path)
        result: dict[str, Any] = {"kind": "daemon", "path": str(path),
                                  "config": cfg.model_dump(mode="json")}
    else:
        req = build_start_request(config=path)
        spec = parse_spec(req["spec"])
        try:
            spec.check_files()
        except SpecError as err:
            raise load_fleet_config(path).error(f"spec.{err.field}", _strip_field(err)) from err
        result = {"kind": "fleet", "path": str(path), "start": req}
    if as_json:
        print_json(result)
    else:
        out(f"{path}: ok ({result['kind']} config)")


class FailOn(StrEnum):
    unexpected = "unexpected"
    any = "any"


@app.command()
@handled
def soak(ctx: typer.Context,
         name: Annotated[str | None, typer.Option(
             "--name", "-n", help="Fleet name (default: the --config's, else soak); an "
             "existing fleet of that name is used as it is.")] = None,
         replicas: Annotated[int | None, typer.Option("--replicas", "-r", min=1)] = None,
         cpus: Annotated[int | None, typer.Option("--cpus", "-c", min=1,
                                                  help="vCPUs per guest.")] = None,
         duration: Annotated[str, typer.Option(help="How long: 90s, 10m, 1h, 1.5s.")] = "30m",
         config: Annotated[Path | None, typer.Option("--config", "-f",
                                                     help="TOML fleet file.")] = None,
         workload: Annotated[Workload | None, typer.Option(
             help="Bundled guest workload (default idle).")] = None,
         chaos: Annotated[str, typer.Option(
             help="Faults to inject, comma-separated: kill, sigstop, pause, panic, hang, stall, "
                  "reset, daemon-restart (or all).")] = "",
         chaos_interval: Annotated[str, typer.Option(
             help="Time between faults (+-25%, seeded).")] = "30s",
         seed: Annotated[int | None, typer.Option(help="Chaos seed (default: random, "
                                                       "reported).")] = None,
         report_dir: Annotated[Path | None, typer.Option(
             help="Where summary.json, junit.xml, report.html go "
                  "(default ./soak-report-<timestamp>).")] = None,
         fail_on: Annotated[FailOn, typer.Option(
             help="unexpected: fail on failures nobody injected and faults handled wrongly; "
                  "any: also on every failure and warning.")] = FailOn.unexpected,
         as_json: Annotated[bool, typer.Option("--json", help="Stream events as JSON lines "
                                               "instead of the live view.")] = False,
         keep: Annotated[bool, typer.Option("--keep", help="Leave the fleet running.")] = False,
         margin: Annotated[str, typer.Option(help="Slack on every detection bound.")] = "3s",
         boot_allowance: Annotated[str, typer.Option(
             help="Slack for a restart to be healthy again.")] = "30s",
         ready_timeout: Annotated[str, typer.Option(
             help="How long the fleet may take to become healthy.")] = "120s") -> None:
    """Run a fleet for a duration (with seeded chaos) and judge it: exit 0 only on a pass."""
    from fleetctl import soak as soak_mod
    try:
        opts = soak_mod.SoakOptions(
            name=name, replicas=replicas, cpus=cpus, duration=soak_mod.parse_duration(duration),
            config=config, workload=str(workload) if workload is not None else None,
            chaos=soak_mod.parse_kinds(chaos),
            chaos_interval=soak_mod.parse_duration(chaos_interval), seed=seed,
            report_dir=report_dir, fail_on=str(fail_on), json=as_json, keep=keep,
            margin=soak_mod.parse_duration(margin),
            boot_allowance=soak_mod.parse_duration(boot_allowance),
            ready_timeout=soak_mod.parse_duration(ready_timeout))
    except ValueError as err:
        raise UsageError(str(err)) from err
    if opts.chaos and opts.chaos_interval <= 0:
        raise UsageError("--chaos-interval must be more than 0")
    settings = ctx.find_object(Settings) or Settings(None, 30.0)
    raise typer.Exit(soak_mod.Soak(opts, socket=settings.socket, api_timeout=settings.timeout,
                                   build_start=build_start_request).run())


if __name__ == "__main__":  # python -m fleetctl.main
    app()
