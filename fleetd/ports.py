"""Host ports a fleet forwards to its guests: conflicts with other fleets and with the host.

Replica ``i`` of a fleet with ``ports = ["8080:80"]`` listens on host port
``8080 + i``. Before anything starts, every port is checked against the other
fleets' forwards and against what is already bound on the host; the error
names the port and who holds it (a fleet replica, or a pid and program).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable

from fleetd.errors import ConflictError


def _listening_inodes(port: int, proto: str) -> set[int]:
    files = ("/proc/net/tcp", "/proc/net/tcp6") if proto == "tcp" else ("/proc/net/udp",
                                                                          "/proc/net/udp6")
    out = set()
    for path in files:
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or state == "0A"):
                        out.add(int(inode))
        except OSError:
            continue
    return out


def port_holder(port: int, proto: str = "tcp") -> str | None:
    """``pid N (comm)`` of a process with a socket bound to ``port``, if it can be found."""
    inodes = _listening_inodes(port, proto)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    with open(f"/proc/{pid}/comm") as f:
                        return f"pid {pid} ({f.read().strip()})"
        except OSError:
            continue
    return "another process"


def host_port_free(port: int, proto: str = "tcp") -> bool:
    """Whether ``127.0.0.1:port`` can be bound right now."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError as err:
        if err.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        s.close()


def check_ports(wanted: Iterable[tuple[str, str, int, int]],
                taken: dict[tuple[str, int], str]) -> None:
    """Check (replica, proto, host port, guest port) forwards before anything starts.

    ``taken`` maps (proto, host port) to the replica that already forwards it.

    Raises:
        ConflictError: naming the port and who holds it.
    """
    seen: dict[tuple[str, int], str] = {}
    for name, proto, host, guest in wanted:
        key = (proto, host)
        if key in taken:
            raise ConflictError(f"port {host}/{proto} (for {name}, guest port {guest}) is already "
                                f"forwarded to {taken[key]}", port=host, holder=taken[key])
        if key in seen:
            raise ConflictError(f"port {host}/{proto} is wanted twice ({seen[key]} and {name})",
                                port=host)
        seen[key] = name
        if not 0 < host < 65536:
            raise ConflictError(f"port {host} (for {name}) is out of range", port=host)
        if not host_port_free(host, proto):
            holder = port_holder(host, proto) or "another process"
            raise ConflictError(f"port {host}/{proto} (for {name}, guest port {guest}) is in use "
                                f"on the host by {holder}", port=host, holder=holder)
