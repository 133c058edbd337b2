"""``fleetd``: the daemon's command line."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import anyio
import typer

from fleetd import __version__
from fleetd.config import load_config
from fleetd.errors import FleetError
from fleetd.log import configure, get_logger

app = typer.Typer(add_completion=True, help="fleetd: supervise fleets of QEMU SMP guests.",
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleetd {__version__}")
        raise typer.Exit()


@app.command()
def main(
    socket: Path | None = typer.Option(None, "--socket", envvar="FLEETD_SOCKET",
                                          help="Control socket path."),
    state_dir: Path | None = typer.Option(None, "--state-dir", envvar="FLEETD_STATE_DIR",
                                             help="Where state, console logs and bundles live."),
    config: Path | None = typer.Option(None, "--config", help="Daemon config (TOML)."),
    run_dir: Path | None = typer.Option(None, "--run-dir",
                                           help="Per-VM sockets (default: the socket's directory)."),
    log_level: str | None = typer.Option(None, "--log-level", help="debug|info|warning|error"),
    log_json: bool | None = typer.Option(None, "--log-json/--log-console",
                                            help="JSON log lines (default when not a TTY)."),
    accel: str | None = typer.Option(None, "--accel", help="auto (the probe's choice), kvm (whenever usable) or tcg (never KVM)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    """Run the daemon in the foreground (systemd runs it as Type=notify)."""
    try:
        cfg = load_config(config, socket=socket, state_dir=state_dir, run_dir=run_dir,
                          log_level=log_level, log_json=log_json, accel=accel)
    except FleetError as err:
        typer.echo(f"fleetd: error: {err}", err=True)
        raise typer.Exit(2) from err
    configure(cfg.log_level, json=cfg.log_json)
    # A full collection over hundreds of replicas' objects took 100+ ms every ~2 s (p99 of
    # `ps` at 256 guests): collect young objects as usual, old ones far less often, and keep
    # everything imported at start-up out of the collector's way.
    gc.set_threshold(10000, 50, 50)
    gc.freeze()
    from fleetd.daemon import Daemon, sd_listen_fd
    daemon = Daemon(cfg, listen_fd=sd_listen_fd())
    from fleetd.sdnotify import SYSTEMD_VARIABLES
    for key in SYSTEMD_VARIABLES:      # read by now; QEMU (spawned with our env) must not inherit
        os.environ.pop(key, None)
    try:
        anyio.run(daemon.run)
    except FleetError as err:
        get_logger().error("daemon.failed", error=str(err))
        typer.echo(f"fleetd: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app()
