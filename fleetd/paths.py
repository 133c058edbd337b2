"""Default locations: the control socket, the state directory, the runtime directory.

As root: ``/run/fleetd/fleetd.sock`` and ``/var/lib/fleetd``. Otherwise:
``$XDG_RUNTIME_DIR/fleetd/fleetd.sock`` (``/tmp/fleetd-<uid>/`` without it) and
``$XDG_STATE_HOME/fleetd`` (``~/.local/state/fleetd``). ``FLEETD_SOCKET`` and
``FLEETD_STATE_DIR`` override both, for the daemon and for fleetctl alike.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_socket() -> Path:
    """The control socket path (``FLEETD_SOCKET`` overrides)."""
    env = os.environ.get("FLEETD_SOCKET")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/fleetd/fleetd.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "fleetd" if xdg else Path(f"/tmp/fleetd-{os.getuid()}")
    return base / "fleetd.sock"


def default_state_dir() -> Path:
    """The state directory (``FLEETD_STATE_DIR`` overrides)."""
    env = os.environ.get("FLEETD_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/fleetd")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fleetd"
