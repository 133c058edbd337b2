"""The one error hierarchy of fleetd, rooted at :class:`FleetError`.

Every error carries the fields a caller needs to act on it (which VM, which
state, which QMP command, which field) and a one-line message. Errors raised
because of another exception are chained with ``from err``. Cancellation is
never wrapped: nothing here derives from or catches ``CancelledError``.
"""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Base of every error fleetd raises on purpose.

    ``code`` is the stable machine-readable name used on the control API.
    """

    code = "error"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = {k: v for k, v in fields.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data, for the control API and events."""
        return {"code": self.code, "message": self.message, "data": _plain(self.fields)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class SpecError(FleetError):
    """A guest spec, config file or request parameter is invalid (names the field)."""

    code = "invalid_spec"

    def __init__(self, message: str, *, field: str | None = None, **fields: Any) -> None:
        super().__init__(message, field=field, **fields)
        self.field = field


class AccelError(FleetError):
    """The requested accelerator cannot be used on this host."""

    code = "accel_unavailable"


class VmError(FleetError):
    """An error about one VM; ``vm`` names it."""

    code = "vm_error"

    def __init__(self, message: str, *, vm: str | None = None, **fields: Any) -> None:
        super().__init__(message, vm=vm, **fields)
        self.vm = vm


class StateError(VmError):
    """An operation is not allowed in the VM's (or replica's) current state."""

    code = "invalid_state"

    def __init__(self, message: str, *, vm: str | None = None, state: str | None = None,
                 operation: str | None = None, **fields: Any) -> None:
        super().__init__(message, vm=vm, state=state, operation=operation, **fields)
        self.state = state
        self.operation = operation


class QemuStartError(VmError):
    """QEMU could not be started, or died before it was ready."""

    code = "qemu_start_failed"


class QmpError(VmError):
    """A QMP connection failed or a QMP command returned an error."""

    code = "qmp_error"

    def __init__(self, message: str, *, vm: str | None = None, command: str | None = None,
                 error_class: str | None = None, **fields: Any) -> None:
        super().__init__(message, vm=vm, command=command, error_class=error_class, **fields)
        self.command = command
        self.error_class = error_class


class PinningError(VmError):
    """A vCPU or QEMU thread could not be pinned, or reads back different CPUs."""

    code = "pinning_failed"


class VmTimeout(VmError):
    """Something about a VM did not happen within its deadline."""

    code = "timeout"


class PlacementError(FleetError):
    """Host CPU placement cannot satisfy a request."""

    code = "placement_failed"

    def __init__(self, message: str, *, needed: int | None = None,
                 available: int | None = None, **fields: Any) -> None:
        super().__init__(message, needed=needed, available=available, **fields)
        self.needed = needed
        self.available = available


class NotFoundError(FleetError):
    """No fleet or replica by that name."""

    code = "not_found"


class ConflictError(FleetError):
    """The request conflicts with something that exists (a name, a port)."""

    code = "conflict"


class PermissionDeniedError(FleetError):
    """The peer is not allowed to call this method."""

    code = "permission_denied"


class ProtocolError(FleetError):
    """A control-API message is malformed."""

    code = "protocol_error"


class InternalError(FleetError):
    """A bug in fleetd; the request failed but the daemon keeps serving."""

    code = "internal"


class StateStoreError(FleetError):
    """Persisted state could not be read or written."""

    code = "state_store"


def single_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one real exception inside a task group's exception group, if there is exactly one.

    Task groups wrap what their body raises; callers that promise a plain
    :class:`FleetError` unwrap with this (cancellation is never unwrapped).
    """
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], Exception) else None
