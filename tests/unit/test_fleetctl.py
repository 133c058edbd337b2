"""fleetctl: request building, fleet files, rendering, exit codes, and the client on a real socket.

Daemon semantics are not tested here (that needs the real daemon); the CLI runs
against a ControlServer with a scripted Handlers to check the client side.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
import structlog
from pydantic import BaseModel
from typer.testing import CliRunner

from fleetctl import render
from fleetctl.client import ApiError, Client, DaemonUnreachable, InvalidRequest, default_socket
from fleetctl.main import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    app,
    build_start_request,
    exit_code_for,
    find_key_line,
    load_fleet_config,
    run_console,
    wait_healthy,
)
from fleetd.errors import FleetError, NotFoundError, SpecError, StateError
from fleetd.protocol import (
    EventsResult,
    LogsResult,
    NamesResult,
    OkResult,
    PsResult,
    ReplicaInfo,
    StartResult,
    StatsResult,
)
from fleetd.server import AccessPolicy, ControlServer, Peer, Streaming

HINT = "(start it: fleetd &, or systemctl start fleetd)"


# -- building the start request ------------------------------------------------------------------

def test_start_request_from_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = build_start_request(name="web", replicas=3, cpus=2, memory="128M",
                                 kernel=Path("vmlinuz"), append="console=ttyS0",
                                 machine="pc", accel="tcg", pin="exclusive", restart="always",
                                 debug=True)
    assert params == {
        "name": "web", "replicas": 3, "debug": True,
        "spec": {"cpus": 2, "memory": 128, "kernel": str(tmp_path / "vmlinuz"),
                 "append": "console=ttyS0", "machine": "pc", "accel": "tcg"},
        "policy": {"pin": "exclusive", "restart": {"policy": "always"}},
    }


def test_start_request_defaults_are_left_to_the_daemon() -> None:
    assert build_start_request() == {"spec": {}, "policy": {}}
    assert build_start_request(workload="spin", cpus=4) == {
        "spec": {"workload": "spin", "cpus": 4}, "policy": {}}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpus": 0}, "--cpus: Input should be greater than or equal to 1"),
    ({"cpus": 1000}, "--cpus: Input should be less than or equal to 255"),
    ({"memory": "lots"}, "--memory: 'lots' is not a size (use e.g. 64M, 953M, 1G)"),
    ({"replicas": 0}, "--replicas: Input should be greater than or equal to 1"),
    ({"replicas": 100000}, "--replicas: Input should be less than or equal to 1024"),
    ({"name": "../x"}, "--name: String should match pattern"),
    ({"kernel": Path("/k"), "workload": "spin"}, "--workload: only applies to the bundled guest"),
    ({"cpu_model": "host;rm"}, "--cpu-model: String should match pattern"),
])
def test_start_request_flag_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        build_start_request(**kwargs)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


FLEET_TOML = """\
name = "web"
replicas = 4

[spec]
cpus = 2
memory = "128M"
kernel = "images/vmlinuz"
append = "console=ttyS0 quiet"

[policy]
pin = "shared"

[policy.restart]
policy = "always"
backoff_max = 5.0

[policy.health]
boot_timeout = 10
"""


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_start_request_from_config(tmp_path: Path) -> None:
    cfg = write(tmp_path, FLEET_TOML)
    params = build_start_request(config=cfg)
    assert params["name"] == "web" and params["replicas"] == 4
    assert params["spec"] == {"cpus": 2, "memory": 128, "append": "console=ttyS0 quiet",
                              "kernel": str(tmp_path / "images" / "vmlinuz")}
    assert params["policy"] == {"pin": "shared", "restart": {"policy": "always", "backoff_max": 5.0},
                                "health": {"boot_timeout": 10.0}}


def test_flags_override_config(tmp_path: Path) -> None:
    cfg = write(tmp_path, FLEET_TOML)
    params = build_start_request(config=cfg, cpus=8, replicas=1, restart="never", pin="none")
    assert params["spec"]["cpus"] == 8 and params["replicas"] == 1
    assert params["policy"]["restart"] == {"policy": "never", "backoff_max": 5.0}
    assert params["policy"]["pin"] == "none"
    # a flag error names the flag, not the file
    with pytest.raises(SpecError, match=r"^--cpus: Input should be greater than or equal to 1$"):
        build_start_request(config=cfg, cpus=0)


@pytest.mark.parametrize(("text", "message"), [
    ('name = "web"\n\n[spec]\ncpus = 0\n',
     "fleet.toml:4: spec.cpus: Input should be greater than or equal to 1"),
    ('[spec]\ncpus = 2\ncolour = "red"\n', "fleet.toml:3: spec.colour: unknown field"),
    ('[spec]\nmemory = "lots"\n', "fleet.toml:2: spec.memory: 'lots' is not a size"),
    ('replicas = 0\n', "fleet.toml:1: replicas: Input should be greater than or equal to 1"),
    ('name = "a b"\n', "fleet.toml:1: name: String should match pattern"),
    ('\nreplica = 3\n', "fleet.toml:2: replica: unknown field (expected one of name, replicas, "
                       "spec, policy, debug)"),
    ('spec = 3\n', "fleet.toml:1: spec: must be a table ([spec])"),
    ('[policy]\npin = "tight"\n',
     "fleet.toml:2: policy.pin: Input should be 'exclusive', 'shared' or 'none'"),
    ('[policy.health]\ncheck_interval = 1\nboot_timeout = -1\n',
     "fleet.toml:3: policy.health.boot_timeout: Input should be greater than 0"),
    ('[policy.restart]\nbackoff_initial = 5\nbackoff_max = 1\n',
     "fleet.toml:3: policy.restart.backoff_max: must be >= backoff_initial"),
    ('[spec]\ncpus = 4\nsockets = 2\ncores = 3\nthreads = 1\n',
     "fleet.toml:2: spec.cpus: sockets*cores*threads = 6 but cpus = 4"),
    ('[spec]\nnetwork = { ports = ["80"] }\n',
     "fleet.toml:2: spec.network.ports.0: "),
    ('[spec]\ncpus = \n', "fleet.toml: invalid TOML: "),
])
def test_config_errors_name_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        build_start_request(config=cfg)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}/{message}"), msg
    assert "\n" not in msg


def test_config_with_toml_only_types(tmp_path: Path) -> None:
    cfg = write(tmp_path, "name = 1979-05-27\n")
    with pytest.raises(SpecError, match=r"fleet.toml:1: name: Input should be a valid string"):
        build_start_request(config=cfg)


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"invalid TOML: .*line 2"):
        load_fleet_config(write(tmp_path, '[spec]\ncpus = \n'))
    with pytest.raises(SpecError, match="cannot read fleet file"):
        load_fleet_config(tmp_path / "missing.toml")


def test_find_key_line() -> None:
    text = ('name = "x"\n'
            "[spec]\n"
            "  cpus = 2   # two\n"
            "network.ports = [\"80:80\"]\n"
            "[policy.restart]\n"
            "policy = \"always\"\n"
            "[policy]\n"
            "health = { boot_timeout = 3 }\n")
    assert find_key_line(text, "name") == 1
    assert find_key_line(text, "spec.cpus") == 3
    assert find_key_line(text, "spec.network.ports.0") == 4
    assert find_key_line(text, "policy.restart.policy") == 6
    assert find_key_line(text, "policy.health.boot_timeout") == 8  # inside an inline table
    assert find_key_line(text, "spec.memory") is None


# -- rendering -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0s"), (12.7, "12s"), (59.9, "59s"), (60, "1m00s"), (184, "3m04s"),
    (3599, "59m59s"), (3600, "1h00m"), (7260, "2h01m"), (86399, "23h59m"),
    (86400 * 3 + 3600 * 4, "3d04h"),
    (-1, "-"), (float("nan"), "-"),
])
def test_format_uptime(seconds: float | None, text: str) -> None:
    assert render.format_uptime(seconds) == text


@pytest.mark.parametrize(("host_cpus", "text"), [
    ([], "-"),
    ([[0], [1]], "0,1"),
    ([[3]], "3"),
    ([[0], [2, 3]], "0,[2-3]"),
    ([[0, 1, 2, 3]] * 4, "[0-3]x4"),
    ([[0, 1, 2, 3]], "[0-3]"),
    ([[5], [5]], "5,5"),
    ([[0, 2, 4], [1, 3, 5]], "[0,2,4],[1,3,5]"),
])
def test_format_host_cpus(host_cpus: list[list[int]], text: str) -> None:
    assert render.format_host_cpus(host_cpus) == text


def info(**kw: Any) -> ReplicaInfo:
    base: dict[str, Any] = {"name": "web-0", "fleet": "web", "index": 0, "state": "running",
                            "health": "healthy", "cpus": 2, "host_cpus": [[0], [1]],
                            "pid": 4242, "uptime_s": 184.2, "restarts": 1}
    return ReplicaInfo(**{**base, **kw})


def test_ps_rows_and_table() -> None:
    assert render.ps_row(info()) == ("web-0", "web", "running", "healthy", "2", "0,1", "4242",
                                     "3m04s", "1")
    assert render.ps_row(info(pid=None, uptime_s=None, host_cpus=[], state="stopped",
                              health="down")) == (
        "web-0", "web", "stopped", "down", "2", "-", "-", "-", "1")
    console = render.Console(file=io.StringIO(), width=200)
    console.print(render.ps_table([info(), info(name="web-1", index=1, host_cpus=[[2], [3]])]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert all(col in text for col in render.PS_COLUMNS)
    assert "web-1" in text and "2,3" in text


def test_metric_names() -> None:
    assert render.metric_name("uptime_s") == ("uptime_seconds", "gauge")
    assert render.metric_name("restarts") == ("restarts_total", "counter")
    assert render.metric_name("heartbeats_total") == ("heartbeats_total", "counter")
    assert render.metric_name("vcpu_cpu_seconds") == ("vcpu_cpu_seconds_total", "counter")
    assert render.metric_name("qemu_cpu_seconds") == ("qemu_cpu_seconds_total", "counter")
    assert render.metric_name("qemu_rss_bytes") == ("qemu_rss_bytes", "gauge")
    assert render.metric_name("weird-key.x") == ("weird_key_x", "gauge")


STATS = StatsResult(replicas=[
    {"name": "web-0", "fleet": "web", "state": "running", "restarts": 2, "uptime_s": 12.5,
     "pid": 99, "failures": 0, "qemu_rss_bytes": 52428800, "heartbeats_total": 40,
     "heartbeat_rate": 3.2, "paused": False,
     "vcpus": [{"vcpu": 0, "cpu_seconds": 1.23, "counter_rate": 1000.0},
               {"vcpu": 1, "cpu_seconds": 0.5, "counter_rate": 990.5}]},
    {"name": "web-1", "fleet": "web", "state": "crashed", "restarts": 0, "uptime_s": 0.0,
     "note": 'say "hi"\\'},
], daemon={"pid": 1, "uptime_s": 100.0, "api_connections": 3})


def test_prometheus_rendering() -> None:
    text = render.prometheus(STATS)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert 'fleetd_vcpu_cpu_seconds_total{vm="web-0",fleet="web",vcpu="0"} 1.23' in lines
    assert 'fleetd_vcpu_cpu_seconds_total{vm="web-0",fleet="web",vcpu="1"} 0.5' in lines
    assert 'fleetd_qemu_rss_bytes{vm="web-0",fleet="web"} 52428800' in lines
    assert 'fleetd_restarts_total{vm="web-0",fleet="web"} 2' in lines
    assert 'fleetd_restarts_total{vm="web-1",fleet="web"} 0' in lines
    assert 'fleetd_uptime_seconds{vm="web-0",fleet="web"} 12.5' in lines
    assert 'fleetd_heartbeats_total{vm="web-0",fleet="web"} 40' in lines
    assert 'fleetd_paused{vm="web-0",fleet="web"} 0' in lines
    assert 'fleetd_replica_info{vm="web-0",fleet="web",state="running"} 1' in lines
    assert ('fleetd_replica_info{vm="web-1",fleet="web",state="crashed",'
            'note="say \\"hi\\"\\\\"} 1') in lines
    assert "fleetd_daemon_uptime_seconds 100.0" in lines
    assert "fleetd_daemon_api_connections 3" in lines
    assert not any("pid" in line for line in lines)
    # one HELP and one TYPE per family, before its samples, samples grouped
    for family, mtype in (("fleetd_vcpu_cpu_seconds_total", "counter"),
                          ("fleetd_restarts_total", "counter"),
                          ("fleetd_uptime_seconds", "gauge"),
                          ("fleetd_heartbeats_total", "counter"),
                          ("fleetd_qemu_rss_bytes", "gauge")):
        assert lines.count(f"# TYPE {family} {mtype}") == 1, family
        i = lines.index(f"# TYPE {family} {mtype}")
        assert lines[i - 1].startswith(f"# HELP {family} ")
        samples = [n for n, line in enumerate(lines) if line.startswith(family + "{")]
        assert samples == list(range(i + 1, i + 1 + len(samples)))
    for line in lines:  # the exposition grammar, roughly
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or \
            (line.startswith("fleetd_") and " " in line), line


def test_top_rows() -> None:
    later = StatsResult(replicas=[{**STATS.replicas[0], "vcpus": [
        {"vcpu": 0, "cpu_seconds": 2.23}, {"vcpu": 1, "cpu_seconds": 1.0}]}])
    rows = render.top_rows(later, STATS, 1.0, {"web-0": "healthy"})
    assert rows == [("web-0", "web", "running", "healthy", "150%", "50.0M", "2", "3.2", "12s")]
    assert render.top_rows(STATS, None, 1.0)[0][4] == "-"


def test_event_text_and_misc() -> None:
    ev = {"time": 0.0, "kind": "health", "vm": "web-0", "fleet": "web", "health": "healthy",
          "reason": None}
    text = render.event_text(ev)
    assert text.endswith("health         web-0            health=healthy")
    assert render.event_text({"time": "2026-12-04T21:00:00Z", "kind": "fleet", "fleet": "web",
                              "action": "created"}).split()[2:] == ["web", "action=created"]
    assert render.format_bytes(512) == "512B" and render.format_bytes(1536) == "1.5K"
    assert render.format_bytes(None) == "-"
    assert render.names_lines("stop", NamesResult(done=["a", "b"])) == ["stopped a", "stopped b"]
    assert json.loads(render.dumps([info()]))[0]["host_cpus"] == [[0], [1]]


# -- exit codes ----------------------------------------------------------------------------------

def test_exit_code_mapping() -> None:
    assert exit_code_for(DaemonUnreachable("/x")) == EXIT_UNREACHABLE == 4
    assert exit_code_for(ApiError("not_found", "no")) == EXIT_NOT_FOUND == 3
    assert exit_code_for(ApiError("invalid_state", "no")) == EXIT_FAILED == 1
    assert exit_code_for(ApiError("internal", "bug")) == EXIT_FAILED
    assert exit_code_for(UsageError("no")) == EXIT_USAGE == 2
    assert exit_code_for(SpecError("no")) == EXIT_USAGE
    assert exit_code_for(InvalidRequest("no")) == EXIT_USAGE
    assert exit_code_for(FleetError("other")) == EXIT_FAILED


runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def test_unreachable_daemon(short_tmp: Path) -> None:
    sock = short_tmp / "nope.sock"
    res = cli("--socket", str(sock), "ps")
    assert res.exit_code == 4
    assert res.stderr == f"fleetctl: error: fleetd is not running at {sock} {HINT}\n"
    assert res.stdout == ""
    res = cli("info", env={"FLEETD_SOCKET": str(sock)})
    assert res.exit_code == 4 and str(sock) in res.stderr


def test_stale_socket_file_is_unreachable(short_tmp: Path) -> None:
    sock = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()
    res = cli("--socket", str(sock), "ps")
    assert res.exit_code == 4 and HINT in res.stderr


@pytest.mark.parametrize(("args", "text"), [
    (["stop"], "fleetctl: error: give replica or fleet names, or --all\n"),
    (["rm", "--all", "web"], "fleetctl: error: give replica or fleet names, or --all, not both\n"),
    (["pause"], "fleetctl: error: give replica or fleet names, or --all\n"),
    (["inspect", "../x"], "fleetctl: error: inspect: params.name: String should match pattern"),
    (["logs", "web-0", "--tail", "5000000"], "fleetctl: error: logs: params.tail: "),
    (["start", "--cpus", "0"], "fleetctl: error: --cpus: Input should be greater than or equal to 1\n"),
    (["failures", "show"], "fleetctl: error: usage: fleetctl failures show ID\n"),
    (["stats", "--json", "--prometheus"], "fleetctl: error: --json and --prometheus are exclusive\n"),
])
def test_usage_errors_exit_2_before_connecting(short_tmp: Path, args: list[str], text: str) -> None:
    res = cli("--socket", str(short_tmp / "nope.sock"), *args)
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith(text), res.stderr
    assert res.stderr.count("\n") == 1


def test_typer_usage_errors_exit_2() -> None:
    assert cli("ps", "--bogus").exit_code == 2
    assert cli("start", "--pin", "tight").exit_code == 2
    assert cli("scale", "web").exit_code == 2
    assert cli("--help").exit_code == 0
    assert "--install-completion" in cli("--help").stdout


# -- against a real ControlServer ----------------------------------------------------------------

def replica(name: str, **kw: Any) -> ReplicaInfo:
    fleet, _, idx = name.rpartition("-")
    base: dict[str, Any] = {"name": name, "fleet": fleet, "index": int(idx), "state": "running",
                            "health": "healthy", "cpus": 2, "host_cpus": [[0], [1]],
                            "uptime_s": 5.0}
    return ReplicaInfo(**{**base, **kw})


class ScriptedDaemon:
    """Scripted answers, enough to drive every client path."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.ps_calls: dict[str, int] = {}
        self.console_in: list[bytes] = []
        self.echo_send, self.echo_recv = anyio.create_memory_object_stream[bytes](100)

    async def dispatch(self, request: Any, peer: Peer) -> BaseModel | Streaming:
        p = request.params
        self.requests.append((request.method, p.model_dump(mode="json", exclude_unset=True)))
        match request.method:
            case "start":
                name = p.name or "fleet"
                return StartResult(fleet=name, replicas=[f"{name}-{i}" for i in range(p.replicas)],
                                   notes=["shared: 4 vCPUs on 2 host CPUs (2x overcommit)"])
            case "ps":
                return PsResult(replicas=self._ps(p.targets))
            case "inspect":
                raise NotFoundError(f"no such replica: {p.name}", name=p.name)
            case "stop":
                done = [t for t in p.targets if t != "web-2"]
                errs = {"web-2": "web-2: cannot stop while\nstarting"} if "web-2" in p.targets else {}
                return NamesResult(done=done, errors=errs)
            case "logs":
                result = LogsResult(name=p.name, lines=["old 1", "old 2"][-p.tail:] if p.tail else [])
                return Streaming(result, self._logs(p.name)) if p.follow else result
            case "events":
                ev = {"time": 1.0, "kind": "state", "vm": "web-0", "fleet": "web", "to": "running"}
                return Streaming(EventsResult(events=[ev]), self._events()) if p.follow else \
                    EventsResult(events=[ev])
            case "console":
                if p.name == "gone":
                    raise StateError("gone: no console while stopped", vm="gone")
                return Streaming(OkResult(), self._console(p.name))
            case "console_input":
                data = base64.b64decode(p.data)
                if data == b"reject\n":
                    raise StateError(f"{p.name}: not running", vm=p.name)
                self.console_in.append(data)
                await self.echo_send.send(data)
                return OkResult()
            case "stats":
                return STATS
        raise FleetError(f"{request.method}: not scripted")

    def close(self) -> None:
        self.echo_send.close()
        self.echo_recv.close()

    def _ps(self, targets: list[str]) -> list[ReplicaInfo]:
        fleet = targets[0] if targets else "web"
        n = self.ps_calls[fleet] = self.ps_calls.get(fleet, 0) + 1
        if fleet == "good":  # boots on the second poll
            return [replica(f"good-{i}", **({} if n > 1 else {"state": "starting",
                                                              "health": "booting"}))
                    for i in range(2)]
        if fleet == "bad":
            return [replica("bad-0"),
                    replica("bad-1", state="crashed", health="down", health_reason="panic",
                            last_failure="panic: Kernel panic - not syncing")]
        if fleet == "slow":
            return [replica("slow-0", health="booting", health_reason="no heartbeat yet")]
        return [replica("web-0"), replica("web-1", host_cpus=[[2], [3]], pid=77, uptime_s=184)]

    async def _logs(self, name: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        for i in range(2):
            yield "log", {"vm": name, "line": f"new {i}"}

    async def _events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "event", {"time": 2.0, "kind": "health", "vm": "web-0", "fleet": "web",
                        "health": "healthy"}

    async def _console(self, name: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "console", {"vm": name, "data": base64.b64encode(b"welcome\r\n").decode()}
        async for data in self.echo_recv:
            yield "console", {"vm": name, "data": base64.b64encode(data.upper()).decode()}
            if data.endswith(b"quit\n"):
                break
        yield "console_closed", {"vm": name, "state": "stopped"}


def quiet_log() -> Any:
    return structlog.wrap_logger(structlog.PrintLogger(file=io.StringIO()),
                                 wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[tuple[Path, ScriptedDaemon]]:
    """A ControlServer with the scripted handlers, in a thread of its own."""
    path = short_tmp / "fleetd.sock"
    handlers = ScriptedDaemon()
    server = ControlServer(handlers, path, access=AccessPolicy(daemon_uid=os.geteuid()),
                           log=quiet_log())
    with anyio.from_thread.start_blocking_portal() as portal:
        future, _ = portal.start_task(server.serve)
        try:
            yield path, handlers
        finally:
            future.cancel()
            handlers.close()


def test_client_call_and_errors(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    with Client(path, timeout=5) as c:
        ps = c.call("ps", all=True)
        assert isinstance(ps, PsResult) and [r.name for r in ps.replicas] == ["web-0", "web-1"]
        assert c.greeting is not None and c.greeting.protocol == 1
        with pytest.raises(ApiError) as info:
            c.call("inspect", name="nope")
        assert (info.value.code, info.value.message, info.value.data) == (
            "not_found", "no such replica: nope", {"name": "nope"})
        with pytest.raises(InvalidRequest, match="params.name"):
            c.call("inspect", name="../x")
        assert isinstance(c.call("ps"), PsResult)  # still usable
    assert [m for m, _ in handlers.requests] == ["ps", "inspect", "ps"]


def test_client_stream_ends_and_connection_stays_usable(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, _ = daemon
    with Client(path, timeout=5) as c:
        first, events = c.stream("logs", name="web-0", tail=1, follow=True)
        assert isinstance(first, LogsResult) and first.lines == ["old 2"]
        assert list(events) == [("log", {"vm": "web-0", "line": "new 0"}),
                                ("log", {"vm": "web-0", "line": "new 1"})]
        assert c.stream_ended
        assert isinstance(c.call("ps"), PsResult)


def test_console_input_while_streaming(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    with Client(path, timeout=5) as c:
        _, events = c.stream("console", name="web-0")
        got = b""
        for kind, data in events:
            if kind == "console":
                got += base64.b64decode(data["data"])
                if got == b"welcome\r\n":
                    c.send_console_input("web-0", b"hi\n")
                    c.send_console_input("web-0", b"reject\n")
                    c.send_console_input("web-0", b"quit\n")
        assert got == b"welcome\r\nHI\nQUIT\n"
        assert handlers.console_in == [b"hi\n", b"quit\n"]
        assert [e.code for e in c.send_errors] == ["invalid_state"]


def test_run_console_with_piped_stdin(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    r, w = os.pipe()
    os.write(w, b"hello\nquit\n")
    os.close(w)
    out = io.BytesIO()
    try:
        with Client(path, timeout=5) as c:
            c.stream("console", name="web-0")
            run_console(c, "web-0", stdin_fd=r, stdout=out, drain=2.0)
    finally:
        os.close(r)
    assert out.getvalue() == b"welcome\r\nHELLO\nQUIT\n"
    assert b"".join(handlers.console_in) == b"hello\nquit\n"


def test_cli_not_found_is_exit_3(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, _ = daemon
    res = cli("--socket", str(path), "inspect", "nope")
    assert res.exit_code == 3
    assert res.stderr == "fleetctl: error: no such replica: nope\n"
    res = cli("--socket", str(path), "console", "gone")
    assert res.exit_code == 1
    assert res.stderr == "fleetctl: error: gone: no console while stopped\n"


def test_cli_partial_failure_is_exit_1(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    res = cli("--socket", str(path), "stop", "web-1", "web-2", "--grace", "2")
    assert res.exit_code == 1
    assert res.stdout == "stopped web-1\n"
    assert res.stderr == "fleetctl: error: web-2: web-2: cannot stop while starting\n"
    assert handlers.requests[-1] == ("stop", {"targets": ["web-1", "web-2"], "all": False,
                                              "grace": 2.0, "kill": False})


def test_cli_ps(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    res = cli("--socket", str(path), "ps", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, list) and [r["name"] for r in data] == ["web-0", "web-1"]
    assert data[1] == replica("web-1", host_cpus=[[2], [3]], pid=77, uptime_s=184).model_dump(
        mode="json")
    assert handlers.requests[-1] == ("ps", {"targets": [], "all": True})
    res = cli("--socket", str(path), "ps")
    assert res.exit_code == 0
    assert "HOST CPUS" in res.stdout and "2,3" in res.stdout and "3m04s" in res.stdout


def test_cli_start_waits_until_healthy(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, handlers = daemon
    res = cli("--socket", str(path), "start", "--name", "good", "--replicas", "2", "--cpus", "2",
              "--workload", "spin")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == [
        "started fleet good: good-0 good-1",
        "note: shared: 4 vCPUs on 2 host CPUs (2x overcommit)",
        "good: 2/2 healthy"]
    assert "booting good: 0/2 healthy (2 starting)" in res.stderr
    assert handlers.requests[0] == ("start", {"name": "good", "replicas": 2,
                                              "spec": {"cpus": 2, "workload": "spin"},
                                              "policy": {}})
    assert handlers.ps_calls["good"] == 2


def test_cli_start_reports_failed_replicas(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, _ = daemon
    res = cli("--socket", str(path), "start", "--name", "bad", "--replicas", "2")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert "fleetctl: error: bad-1 failed" in lines
    assert ("  bad-1: state crashed, health down (panic); last failure: "
            "panic: Kernel panic - not syncing") in lines
    assert "    | old 2" in lines  # its last console lines


def test_cli_start_timeout(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, _ = daemon
    res = cli("--socket", str(path), "start", "--name", "slow", "--timeout", "0.3")
    assert res.exit_code == 1
    assert "fleetctl: error: slow-0 not healthy after 0.3s" in res.stderr
    assert "slow-0: state running, health booting (no heartbeat yet)" in res.stderr


def test_cli_logs_events_stats(daemon: tuple[Path, ScriptedDaemon]) -> None:
    path, _ = daemon
    res = cli("--socket", str(path), "logs", "web-0", "-f", "--tail", "2")
    assert res.exit_code == 0 and res.stdout == "old 1\nold 2\nnew 0\nnew 1\n"
    res = cli("--socket", str(path), "logs", "web-0", "--json")
    assert json.loads(res.stdout) == {"name": "web-0", "lines": ["old 1", "old 2"]}
    res = cli("--socket", str(path), "events", "-f", "--json")
    assert [json.loads(x)["kind"] for x in res.stdout.splitlines()] == ["state", "health"]
    res = cli("--socket", str(path), "events")
    assert res.stdout.split()[1:] == ["state", "web-0", "to=running"]
    res = cli("--socket", str(path), "stats", "--prometheus")
    assert res.exit_code == 0 and res.stdout == render.prometheus(STATS)
    res = cli("--socket", str(path), "stats", "--json")
    assert json.loads(res.stdout) == STATS.model_dump(mode="json")


def test_wait_healthy_logic() -> None:
    script = [[replica("w-0", health="booting"), replica("w-1", health="booting")],
              [replica("w-0"), replica("w-1", health="booting")],
              [replica("w-0"), replica("w-1")]]

    class FakeClient:
        def call(self, method: str, **params: Any) -> PsResult:
            assert (method, params) == ("ps", {"targets": ["w"]})
            return PsResult(replicas=script.pop(0) if len(script) > 1 else script[0])

    seen: list[str] = []
    now = [0.0]
    client: Any = FakeClient()
    outcome = wait_healthy(client, "w", ["w-0", "w-1"], 10, progress=seen.append,
                           clock=lambda: now[0], sleep=lambda s: None)
    assert outcome.healthy
    assert seen == ["booting w: 0/2 healthy (2 running)", "booting w: 1/2 healthy (1 running)",
                    "booting w: 2/2 healthy"]
    script[:] = [[replica("w-0", health="booting")]]

    def tick(_: float) -> None:
        now[0] += 1
    outcome = wait_healthy(client, "w", ["w-0"], 3, progress=seen.append,
                           clock=lambda: now[0], sleep=tick)
    assert not outcome.healthy and outcome.reason == "not healthy after 3s"
    assert [r.name for r in outcome.unhealthy] == ["w-0"]


# -- the client's edges --------------------------------------------------------------------------

def one_shot_server(path: Path, first_line: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.sendall(first_line)
            conn.recv(1)  # until the client hangs up

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(("line", "code", "text"), [
    (b'{"id":null,"error":{"code":"permission_denied","message":"uid 5 is not allowed to use '
     b'fleetd (...)","data":{}}}\n', "permission_denied", "uid 5 is not allowed"),
    (b'{"greeting":{"daemon":"fleetd","version":"9.0","protocol":99}}\n', "protocol_error",
     "daemon speaks protocol 99, fleetctl speaks 1"),
    (b'{"hello":1}\n', "protocol_error", "did not send a greeting"),
])
def test_client_connect_refusals(short_tmp: Path, line: bytes, code: str, text: str) -> None:
    path = short_tmp / "one.sock"
    t = one_shot_server(path, line)
    c = Client(path, timeout=5)
    with pytest.raises(ApiError) as info:
        c.connect()
    assert info.value.code == code and text in info.value.message
    c.close()
    t.join(5)


def test_client_timeout_when_daemon_is_silent(short_tmp: Path) -> None:
    path = short_tmp / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    with srv:
        with pytest.raises(DaemonUnreachable,
                           match=r"did not answer in time \(timeout 0\.2s; it may still be at work\)"):
            Client(path, timeout=0.2).connect()


def test_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETD_SOCKET", "/x/y.sock")
    assert default_socket() == Path("/x/y.sock")
    monkeypatch.delenv("FLEETD_SOCKET")
    if os.geteuid() == 0:
        assert default_socket() == Path("/run/fleetd/fleetd.sock")
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        assert default_socket() == Path("/run/user/1000/fleetd/fleetd.sock")

