"""The control protocol: request round trips, clear errors for bad requests, the API doc."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetd import errors
from fleetd.errors import NotFoundError, ProtocolError
from fleetd.protocol import (
    MAX_LINE,
    PARAMS,
    READ_ONLY_METHODS,
    REQUEST_MODELS,
    RESULTS,
    NamesResult,
    PsResult,
    ReplicaInfo,
    decode_request,
    error_reply,
    event_line,
    greeting_line,
    json_schema,
    ok_reply,
    parse_message,
)

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
BEGIN, END = "<!-- schema:begin -->", "<!-- schema:end -->"

#: One representative request per method (params as a client sends them).
EXAMPLES: dict[str, dict[str, Any]] = {
    "info": {},
    "start": {"name": "web", "replicas": 3,
              "spec": {"cpus": 2, "memory": "128M", "workload": "spin", "machine": "pc"},
              "policy": {"pin": "exclusive", "restart": {"policy": "always"},
                         "health": {"boot_timeout": 5}},
              "debug": True},
    "ps": {"targets": ["web", "db-0"], "all": False},
    "inspect": {"name": "web-0"},
    "stop": {"targets": ["web"], "grace": 1.5, "kill": False},
    "restart": {"all": True},
    "rm": {"targets": ["web"]},
    "pause": {"targets": ["web-1"]},
    "resume": {"targets": ["web-1"]},
    "scale": {"fleet": "web", "replicas": 0},
    "logs": {"name": "web-0", "tail": 10, "follow": True},
    "console": {"name": "web-0"},
    "console_input": {"name": "web-0", "data": "aGVscAo="},
    "events": {"follow": True, "tail": 5, "targets": ["web"]},
    "daemon_stop": {"stop_guests": True},
    "plan": {"name": "p", "replicas": 4, "cpus": 2, "pin": "shared"},
    "failures": {"name": "web-0"},
    "failure_show": {"id": "web-0:20261204T210000.123"},
    "stats": {"targets": [], "all": True},
    "inject": {"name": "web-0", "fault": "exit", "arg": 3},
    "debug": {"name": "web-0"},
}


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_every_method_has_an_example() -> None:
    assert EXAMPLES.keys() == PARAMS.keys() == RESULTS.keys() == REQUEST_MODELS.keys()
    assert READ_ONLY_METHODS <= PARAMS.keys()


@pytest.mark.parametrize("method", sorted(EXAMPLES))
@pytest.mark.parametrize("rid", [1, "req-α"])
def test_request_round_trip(method: str, rid: int | str) -> None:
    req = decode_request(line({"id": rid, "method": method, "params": EXAMPLES[method]}))
    assert isinstance(req, REQUEST_MODELS[method])
    assert req.id == rid and req.method == method
    # what the daemon re-encodes decodes to the same request
    again = decode_request(req.model_dump_json().encode())
    assert again == req
    # given params survive (normalised: memory "128M" -> 128)
    dumped = req.params.model_dump(mode="json")
    for key, value in EXAMPLES[method].items():
        if not isinstance(value, dict):
            assert dumped[key] == value, key
    if method == "start":
        assert req.params.spec.memory == 128 and req.params.policy.pin.value == "exclusive"


@pytest.mark.parametrize("method", [m for m, p in PARAMS.items() if not any(
    f.is_required() for f in p.model_fields.values())])
def test_params_may_be_omitted_or_null(method: str) -> None:
    assert decode_request(line({"id": 1, "method": method})).params == PARAMS[method]()
    assert decode_request(line({"id": 1, "method": method, "params": None})).params == PARAMS[method]()


def test_reply_and_event_framing() -> None:
    ps = PsResult(replicas=[ReplicaInfo(name="web-0", fleet="web", index=0, state="running",
                                        health="healthy", cpus=2, host_cpus=[[0], [1]])])
    msg = parse_message(ok_reply(7, ps).rstrip(b"\n"))
    assert msg["id"] == 7 and RESULTS["ps"].model_validate(msg["result"]) == ps
    msg = parse_message(error_reply("x", NotFoundError("no such replica: a", name="a")))
    assert msg == {"id": "x", "error": {"code": "not_found", "message": "no such replica: a",
                                        "data": {"name": "a"}}}
    err = ProtocolError("bad", id=3, reason="invalid_params")
    assert parse_message(error_reply(3, err))["error"]["data"] == {"reason": "invalid_params"}
    assert parse_message(event_line("log", {"vm": "a", "line": "x"})) == {
        "event": "log", "data": {"vm": "a", "line": "x"}}
    assert json.loads(greeting_line())["greeting"]["protocol"] == 1
    for framed in (ok_reply(1, NamesResult()), event_line("end", {}), greeting_line()):
        assert framed.endswith(b"\n") and framed.count(b"\n") == 1
    with pytest.raises(ProtocolError, match="non-object"):
        parse_message(b"[1]")
    with pytest.raises(ProtocolError, match="invalid JSON"):
        parse_message(b"{")


# -- bad requests: one clear line naming the field ------------------------------------------

BAD: list[tuple[Any, str, str | None]] = [
    # (request, expected message (regex), expected data.field)
    ({"id": 1, "method": "frobnicate"}, r"^unknown method 'frobnicate'$", None),
    ({"id": 1, "method": 7}, r'^missing "method"$', None),
    ({"id": 1}, r'^missing "method"$', None),
    ({"id": 1, "method": "start", "params": {"replicas": "two"}},
     r"^start: params\.replicas: Input should be a valid integer", "params.replicas"),
    ({"id": 1, "method": "inspect", "params": {"name": "../x"}},
     r"^inspect: params\.name: String should match pattern", "params.name"),
    ({"id": 1, "method": "inspect", "params": {"name": ""}},
     r"^inspect: params\.name: String should have at least 1 character", "params.name"),
    ({"id": 1, "method": "inspect", "params": {"name": "a" * 300}},
     r"^inspect: params\.name: String should have at most 48 characters", "params.name"),
    ({"id": 1, "method": "inspect", "params": {}}, r"^inspect: params\.name: Field required",
     "params.name"),
    ({"id": 1, "method": "stop", "params": {"targets": ["ok", "../etc"]}},
     r"^stop: params\.targets\.1: String should match pattern", "params.targets.1"),
    ({"id": 1, "method": "start", "params": {"replicas": 0}},
     r"^start: params\.replicas: Input should be greater than or equal to 1$", "params.replicas"),
    ({"id": 1, "method": "start", "params": {"replicas": -1}},
     r"^start: params\.replicas: Input should be greater than or equal to 1$", "params.replicas"),
    ({"id": 1, "method": "start", "params": {"replicas": 100000}},
     r"^start: params\.replicas: Input should be less than or equal to 1024$", "params.replicas"),
    ({"id": 1, "method": "scale", "params": {"fleet": "web", "replicas": -1}},
     r"^scale: params\.replicas: Input should be greater than or equal to 0$", "params.replicas"),
    ({"id": 1, "method": "start", "params": {"spec": {"cpus": 0}}},
     r"^start: params\.spec\.cpus: Input should be greater than or equal to 1$",
     "params.spec.cpus"),
    ({"id": 1, "method": "start", "params": {"spec": {"cpus": 1000}}},
     r"^start: params\.spec\.cpus: Input should be less than or equal to 255$",
     "params.spec.cpus"),
    ({"id": 1, "method": "plan", "params": {"cpus": 1000}},
     r"^plan: params\.cpus: Input should be less than or equal to 255$", "params.cpus"),
    ({"id": 1, "method": "start", "params": {"spec": {"memory": "lots"}}},
     r"^start: params\.spec\.memory: 'lots' is not a size", "params.spec.memory"),
    ({"id": 1, "method": "start", "params": {"spec": {"colour": "red"}}},
     r"^start: params\.spec\.colour: unknown field$", "params.spec.colour"),
    ({"id": 1, "method": "start", "params": {"policy": {"pin": "tight"}}},
     r"^start: params\.policy\.pin: Input should be 'exclusive', 'shared' or 'none'$",
     "params.policy.pin"),
    ({"id": 1, "method": "ps", "params": {"targets": "web"}},
     r"^ps: params\.targets: Input should be a valid list$", "params.targets"),
    ({"id": 1, "method": "ps", "params": []}, r"^ps: params: Input should be a valid dictionary",
     "params"),
    ({"id": 1, "method": "ps", "colour": 1}, r"^ps: colour: unknown field$", "colour"),
    ({"method": "ps"}, r"^ps: id: Field required$", "id"),
    ({"id": 1.5, "method": "ps"}, r"^ps: id", None),
    ({"id": 1, "method": "inject", "params": {"name": "a", "fault": "nuke"}},
     r"^inject: params\.fault: Input should be 'kill'", "params.fault"),
    ({"id": 1, "method": "console_input", "params": {"name": "a", "data": "x" * 70000}},
     r"^console_input: params\.data: String should have at most 65536 characters$",
     "params.data"),
    ({"id": 1, "method": "failure_show", "params": {"id": "../../etc/passwd"}},
     r"^failure_show: params\.id: String should match pattern", "params.id"),
]


@pytest.mark.parametrize(("request_", "message", "field"), BAD,
                         ids=[f"{i}-{r.get('method', 'none') if isinstance(r, dict) else 'raw'}"
                              for i, (r, _, _) in enumerate(BAD)])
def test_bad_request(request_: Any, message: str, field: str | None) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(line(request_))
    err = info.value
    assert re.search(message, err.message), err.message
    assert "\n" not in err.message and len(err.message) < 300
    if field is not None:
        assert err.fields["field"] == field
        assert err.fields["reason"] == "invalid_params"
    rid = request_.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        assert err.fields["id"] == rid  # the server can still answer with the request's id


@pytest.mark.parametrize(("raw", "message", "reason"), [
    (b"", r"^invalid JSON", "invalid_json"),
    (b"{not json", r"^invalid JSON", "invalid_json"),
    (b"\xff\xfe", r"^invalid JSON", "invalid_json"),
    (b"[1, 2]", r"^a request must be a JSON object$", "not_object"),
    (b'"ps"', r"^a request must be a JSON object$", "not_object"),
    (b"null", r"^a request must be a JSON object$", "not_object"),
    (b"1" * 5000, r"^invalid JSON", "invalid_json"),           # int digit limit
    (b"[" * 100_000, r"^invalid JSON", "invalid_json"),        # nesting
    (b'{"id": 1, "method": "ps", "params": {"targets": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
     r"^invalid JSON", "invalid_json"),
    (b'{"id": 1, "method": "ps", "pad": "' + b"x" * (2 * MAX_LINE) + b'"}',
     r"^line too long \(2097188 > 1048576 bytes\)$", "too_long"),
])
def test_bad_line(raw: bytes, message: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(raw)
    assert re.search(message, info.value.message), info.value.message
    assert info.value.fields["reason"] == reason
    assert "\n" not in info.value.message


# -- fuzz: nothing but ProtocolError ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
param_keys = st.sampled_from(sorted({k for p in PARAMS.values() for k in p.model_fields}))
requests = st.fixed_dictionaries(
    {"method": st.sampled_from(sorted(PARAMS)) | st.text(max_size=12)},
    optional={"id": st.integers() | st.text(max_size=200) | json_values,
              "params": st.dictionaries(param_keys, json_values, max_size=5) | json_values,
              "extra": json_values})
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        decode_request(data)
    except ProtocolError as err:
        assert isinstance(err.message, str) and err.code == "protocol_error"


@pytest.mark.parametrize("key", ["a\nb", "x" * 5000])
def test_messages_stay_one_short_line_for_hostile_field_names(key: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(line({"id": 1, "method": "ps", "params": {key: 1}}))
    assert "\n" not in info.value.message and len(info.value.message) < 300


@FUZZ
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)


@FUZZ
@given(json_values)
def test_decode_arbitrary_json(value: Any) -> None:
    _decode_or_protocol_error(json.dumps(value).encode())


@FUZZ
@given(requests)
def test_decode_request_shaped_json(value: dict[str, Any]) -> None:
    _decode_or_protocol_error(json.dumps(value).encode())


# -- docs/api.md ---------------------------------------------------------------------------------

def schema_block() -> str:
    text = json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False)
    return f"\n```json\n{text}\n```\n"


def test_api_doc_schema_is_current() -> None:
    """docs/api.md embeds exactly the generated schema (UPDATE_DOCS=1 rewrites it)."""
    doc = API_DOC.read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1, f"{API_DOC}: schema markers missing"
    head, rest = doc.split(BEGIN)
    current, tail = rest.split(END)
    expected = schema_block()
    if current != expected:
        if os.environ.get("UPDATE_DOCS") == "1":
            API_DOC.write_text(head + BEGIN + expected + END + tail)
            return
        pytest.fail(f"{API_DOC} is out of date with fleetd.protocol; regenerate with: "
                    "UPDATE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_protocol.py -k schema")


def test_api_doc_lists_every_method_and_error_code() -> None:
    doc = API_DOC.read_text().split(BEGIN)[0]
    for method in PARAMS:
        assert re.search(rf"^\| `{method}` \|", doc, re.M), f"docs/api.md: method {method} missing"
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.FleetError)}
    for code in codes | {"internal"}:
        assert f"| `{code}` |" in doc, f"docs/api.md: error code {code} missing"
    readonly = re.search(r"^\| readonly \|.*\| (.*) \|$", doc, re.M)
    assert readonly is not None
    assert set(re.findall(r"`(\w+)`", readonly.group(1))) == READ_ONLY_METHODS
