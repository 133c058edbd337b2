"""The control API: one typed protocol, imported by the daemon and by fleetctl.

Newline-delimited JSON over a Unix socket, in QMP's spirit (docs/api.md):

- on connect the daemon sends a greeting: ``{"greeting": {"daemon": "fleetd", "version", "protocol"}}``;
- a request is ``{"id": <int|str>, "method": "<name>", "params": {...}}``;
- the reply is ``{"id", "result": {...}}`` or ``{"id", "error": {"code", "message", "data"}}``;
- subscriptions (``events``/``logs`` with follow, ``console``) reply once, then stream
  ``{"event": "<kind>", "data": {...}}`` messages on that connection until it closes.

Lines longer than :data:`MAX_LINE` bytes are refused. Requests are a pydantic
discriminated union on ``method``; each method has one params model and one
result model (:data:`RESULTS`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fleetd import __version__
from fleetd.errors import FleetError, ProtocolError
from fleetd.placement import PinMode
from fleetd.policy import FleetPolicy
from fleetd.spec import GuestSpec

PROTOCOL_VERSION = 1
MAX_LINE = 1024 * 1024
MAX_REPLICAS = 1024

Name = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
RequestId = Union[Annotated[int, Field(strict=True)], Annotated[str, Field(max_length=128, strict=True)]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- params ------------------------------------------------------------------------------------

class Targets(_Model):
    """Replica names and/or fleet names, or ``all``."""

    targets: list[Name] = Field(default_factory=list, max_length=4096)
    all: bool = False


class NoParams(_Model):
    pass


class StartParams(_Model):
    name: Name | None = None
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    spec: GuestSpec = GuestSpec()
    policy: FleetPolicy = FleetPolicy()
    debug: bool = False


class PsParams(Targets):
    pass


class InspectParams(_Model):
    name: Name


class StopParams(Targets):
    grace: float | None = Field(default=None, ge=0, le=600)
    kill: bool = False


class ScaleParams(_Model):
    fleet: Name
    replicas: int = Field(ge=0, le=MAX_REPLICAS)


class LogsParams(_Model):
    name: Name
    tail: int = Field(default=100, ge=0, le=1_000_000)
    follow: bool = False


class ConsoleParams(_Model):
    name: Name


class ConsoleInputParams(_Model):
    name: Name
    data: str = Field(max_length=65536, description="base64 of the bytes to send")


class EventsParams(_Model):
    follow: bool = False
    tail: int = Field(default=100, ge=0, le=100_000)
    targets: list[Name] = Field(default_factory=list, max_length=4096)


class DaemonStopParams(_Model):
    stop_guests: bool = False


class PlanParams(_Model):
    name: Name = "plan"
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    cpus: int = Field(default=1, ge=1, le=255)
    pin: PinMode = PinMode.SHARED
    topology: str | None = Field(default=None, pattern=r"^[1-9][0-9]*x[1-9][0-9]*x[1-9][0-9]*(n[1-9][0-9]*)?$",
                                 description="preview on a synthetic host: PACKAGESxCORESxTHREADS[nNODES]")
    housekeeping: str | None = Field(default=None, max_length=256,
                                     description="with topology: housekeeping CPUs (cpulist)")


class FailuresParams(_Model):
    name: Name | None = None


class FailureShowParams(_Model):
    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")


class StatsParams(Targets):
    pass


class InjectParams(_Model):
    name: Name
    fault: Literal["kill", "sigstop", "sigcont", "pause", "panic", "hang", "stall", "reset",
                   "exit"]
    arg: int | None = Field(default=None, ge=0, le=255)


class DebugParams(_Model):
    name: Name


# -- requests ------------------------------------------------------------------------------------

class _Req(_Model):
    id: RequestId


def _req(method: str, params: type[BaseModel]) -> type[_Req]:
    model = type(f"{''.join(p.title() for p in method.split('_'))}Request", (_Req,), {
        "__annotations__": {"method": Literal[method], "params": params},
        "params": Field(default_factory=params),
        "__module__": __name__,
    })
    return model


PARAMS: dict[str, type[BaseModel]] = {
    "info": NoParams,
    "start": StartParams,
    "ps": PsParams,
    "inspect": InspectParams,
    "stop": StopParams,
    "restart": Targets,
    "rm": Targets,
    "pause": Targets,
    "resume": Targets,
    "scale": ScaleParams,
    "logs": LogsParams,
    "console": ConsoleParams,
    "console_input": ConsoleInputParams,
    "events": EventsParams,
    "daemon_stop": DaemonStopParams,
    "plan": PlanParams,
    "failures": FailuresParams,
    "failure_show": FailureShowParams,
    "stats": StatsParams,
    "inject": InjectParams,
    "debug": DebugParams,
}
REQUEST_MODELS = {m: _req(m, p) for m, p in PARAMS.items()}
Request = Annotated[Union[tuple(REQUEST_MODELS.values())], Field(discriminator="method")]  # type: ignore[valid-type]
_request_adapter: TypeAdapter[Any] = TypeAdapter(Request)

#: Methods a read-only peer may call.
READ_ONLY_METHODS = frozenset({"info", "ps", "inspect", "logs", "events", "plan", "failures",
                               "failure_show", "stats"})
#: Methods that always stream (``logs``/``events`` stream only with ``follow``).
STREAMING = frozenset({"console"})


# -- results -------------------------------------------------------------------------------------

class ReplicaInfo(_Model):
    """One row of ``ps``."""

    name: str
    fleet: str
    index: int
    state: str
    health: str
    health_reason: str = ""
    pid: int | None = None
    cpus: int
    host_cpus: list[list[int]] = Field(default_factory=list, description="one list per vCPU")
    guest_cpus_online: int | None = None
    restarts: int = 0
    uptime_s: float | None = None
    ports: list[str] = Field(default_factory=list)
    accel: str = ""
    last_failure: str | None = None


class VcpuInfo(_Model):
    vcpu: int
    thread_id: int
    asked: list[int] | None
    cpus_allowed_list: str
    allowed: list[int]


class ReplicaDetail(ReplicaInfo):
    """``inspect``: a replica with everything fleetd knows about it."""

    spec: dict[str, Any]
    policy: dict[str, Any]
    vcpus: list[VcpuInfo] = Field(default_factory=list)
    argv: list[str] = Field(default_factory=list)
    paths: dict[str, str] = Field(default_factory=dict)
    checks: dict[str, Any] = Field(default_factory=dict)
    exit: dict[str, Any] | None = None
    console_tail: list[str] = Field(default_factory=list)
    recent_events: list[dict[str, Any]] = Field(default_factory=list)
    gdb: str | None = None


class InfoResult(_Model):
    daemon: str = "fleetd"
    version: str = __version__
    protocol: int = PROTOCOL_VERSION
    pid: int
    qemu: str
    qemu_version: str
    accel: dict[str, Any]
    host_cpus: str
    pool: str
    housekeeping: str
    topology: str
    socket: str
    state_dir: str
    fleets: int
    replicas: int
    by_state: dict[str, int]
    uptime_s: float
    problems: list[str] = Field(default_factory=list, description="e.g. unreadable state files")
    store: dict[str, Any] = Field(default_factory=dict, description="state writes, failures")
    readopt_s: float | None = None


class StartResult(_Model):
    fleet: str
    replicas: list[str]
    notes: list[str] = Field(default_factory=list)
    plan: dict[str, Any] = Field(default_factory=dict)


class PsResult(_Model):
    replicas: list[ReplicaInfo]


class NamesResult(_Model):
    """Result of an operation on targets: which replicas it acted on, and per-replica errors."""

    done: list[str] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)


class ScaleResult(_Model):
    fleet: str
    replicas: int
    added: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class LogsResult(_Model):
    name: str
    lines: list[str]


class EventsResult(_Model):
    events: list[dict[str, Any]]


class OkResult(_Model):
    ok: bool = True


class PlanResult(_Model):
    plan: dict[str, Any]
    table: str
    notes: list[str] = Field(default_factory=list)


class FailuresResult(_Model):
    failures: list[dict[str, Any]]


class FailureShowResult(_Model):
    id: str
    meta: dict[str, Any]
    files: dict[str, str]


class StatsResult(_Model):
    replicas: list[dict[str, Any]]
    daemon: dict[str, Any] = Field(default_factory=dict)


class DebugResult(_Model):
    name: str
    gdb_target: str
    gdb_command: str
    symbols: str | None = None


RESULTS: dict[str, type[BaseModel]] = {
    "info": InfoResult,
    "start": StartResult,
    "ps": PsResult,
    "inspect": ReplicaDetail,
    "stop": NamesResult,
    "restart": NamesResult,
    "rm": NamesResult,
    "pause": NamesResult,
    "resume": NamesResult,
    "scale": ScaleResult,
    "logs": LogsResult,
    "console": OkResult,
    "console_input": OkResult,
    "events": EventsResult,
    "daemon_stop": OkResult,
    "plan": PlanResult,
    "failures": FailuresResult,
    "failure_show": FailureShowResult,
    "stats": StatsResult,
    "inject": OkResult,
    "debug": DebugResult,
}
assert RESULTS.keys() == PARAMS.keys()


# -- envelopes -----------------------------------------------------------------------------------

class Greeting(_Model):
    daemon: str = "fleetd"
    version: str = __version__
    protocol: int = PROTOCOL_VERSION


class ErrorBody(_Model):
    code: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class OkReply(_Model):
    id: RequestId | None
    result: dict[str, Any]


class ErrorReply(_Model):
    id: RequestId | None
    error: ErrorBody


class StreamEvent(_Model):
    event: str
    data: dict[str, Any] = Field(default_factory=dict)


# -- framing -------------------------------------------------------------------------------------

def encode(obj: BaseModel | dict[str, Any]) -> bytes:
    """One protocol line (compact JSON + ``\\n``)."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(exclude_none=False)
    else:
        text = json.dumps(obj, separators=(",", ":"), default=str)
    return text.encode() + b"\n"


def greeting_line() -> bytes:
    return encode({"greeting": Greeting().model_dump()})


def _safe_loc(part: Any) -> str:
    """A field path element fit for a one-line message (hostile keys are escaped and cut)."""
    text = str(part)
    if text.isidentifier() or text.isdigit():
        return text[:64]
    return json.dumps(text[:40])


def decode_request(line: bytes) -> Any:
    """Parse one request line into its typed request model.

    Raises:
        ProtocolError: invalid JSON, not an object, missing/unknown method, or bad params
            (``data.id`` carries the request id when it could be read).
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line too long ({len(line)} > {MAX_LINE} bytes)", reason="too_long")
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise ProtocolError(f"invalid JSON: {err}", reason="invalid_json") from err
    if not isinstance(raw, dict):
        raise ProtocolError("a request must be a JSON object", reason="not_object")
    rid = raw.get("id")
    rid = rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None
    method = raw.get("method")
    if not isinstance(method, str):
        raise ProtocolError("missing \"method\"", id=rid, reason="no_method")
    if method not in REQUEST_MODELS:
        raise ProtocolError(f"unknown method {method[:60]!r}", id=rid, reason="unknown_method",
                            method=method[:60])
    if "params" in raw and raw["params"] is None:
        raw = {k: v for k, v in raw.items() if k != "params"}
    if "id" in raw and not (isinstance(raw["id"], (int, str)) and not isinstance(raw["id"], bool)):
        raise ProtocolError(f"{method}: id: must be an integer or a string", reason="invalid_id",
                            field="id", method=method)
    try:
        return _request_adapter.validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(_safe_loc(p) for p in first.get("loc", ())[1:])  # drop the union tag
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field"
        raise ProtocolError(f"{method}: {loc or 'request'}: {msg}", id=rid, reason="invalid_params",
                            field=loc, method=method) from err


def error_reply(rid: Any, err: FleetError) -> bytes:
    d = err.to_dict()
    d["data"].pop("id", None)
    return encode({"id": rid, "error": d})


def ok_reply(rid: Any, result: BaseModel) -> bytes:
    return encode({"id": rid, "result": result.model_dump(mode="json")})


def event_line(kind: str, data: dict[str, Any]) -> bytes:
    return encode({"event": kind, "data": data})


def parse_message(line: bytes) -> dict[str, Any]:
    """Client side: parse one line from the daemon.

    Raises:
        ProtocolError: when it is not a JSON object.
    """
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"daemon sent invalid JSON: {err}") from err
    if not isinstance(msg, dict):
        raise ProtocolError("daemon sent a non-object message")
    return msg


def json_schema() -> dict[str, Any]:
    """The JSON schema of every request, result and envelope (for docs/api.md)."""
    return {
        "request": TypeAdapter(Request).json_schema(),
        "results": {m: r.model_json_schema() for m, r in RESULTS.items()},
        "greeting": Greeting.model_json_schema(),
        "error": ErrorReply.model_json_schema(),
        "event": StreamEvent.model_json_schema(),
    }
