"""Accelerator probe: can this host run KVM guests, with which CPU model?

The probe runs once per daemon (cached per QEMU binary): it checks that
/dev/kvm opens and answers ``KVM_GET_API_VERSION``, names the KVM module
(kvm_intel, kvm_amd, or the nested kvm_pvm), then starts a paused QEMU with
``-cpu host`` and, if that dies (nested KVM aborts on an MSR assertion), with
``host,-arch-capabilities``. If neither survives ``cont``, guests use TCG.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from fleetd.errors import AccelError, FleetError
from fleetd.process import QemuProcess, find_qemu
from fleetd.qmp import QmpConnection
from fleetd.spec import GuestSpec, find_qboot

KVM_GET_API_VERSION = 0xAE00
KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
HOST_MODELS = ("host", "host,-arch-capabilities")
TCG_MODEL = "max"


@dataclass(frozen=True)
class AccelDecision:
    """What the probe found and decided for ``accel=auto``."""

    accel: str                      # "kvm" or "tcg"
    kvm_usable: bool
    kvm_module: str | None
    kvm_cpu_model: str | None       # the host model that survived, e.g. "host,-arch-capabilities"
    reason: str
    qemu: str = ""
    qemu_version: str = ""
    probe_ms: float = 0.0
    attempts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def nested(self) -> bool:
        """True on software-assisted nested KVM (kvm_pvm), where ring-0 guest code is very slow."""
        return self.kvm_module == "kvm_pvm"

    def to_dict(self) -> dict[str, object]:
        return {"accel": self.accel, "kvm_usable": self.kvm_usable, "kvm_module": self.kvm_module,
                "kvm_cpu_model": self.kvm_cpu_model, "reason": self.reason, "qemu": self.qemu,
                "qemu_version": self.qemu_version, "probe_ms": round(self.probe_ms, 1),
                "attempts": list(self.attempts)}


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator and ``-cpu`` value one guest runs with."""

    accel: str
    cpu_model: str
    notes: tuple[str, ...] = ()


def kvm_module() -> str | None:
    """Name of the loaded KVM vendor module, if any."""
    for mod in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{mod}"):
            return mod
    return None


def kvm_device_ok(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether ``path`` opens read-write and reports KVM API version 12."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return False, f"{path}: {err.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return False, f"{path}: KVM_GET_API_VERSION failed: {err.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"{path}: unexpected KVM API version {version}"
    return True, f"{path} usable"


async def _try_model(qemu: str, model: str, workdir: Path) -> tuple[bool, str, str]:
    """Start a paused KVM QEMU with ``-cpu model``, let it run briefly, see if it survives."""
    sock = workdir / f"p{len(os.listdir(workdir))}.sock"
    argv = [qemu, "-S", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "q35", "-accel", "kvm", "-cpu", model, "-m", "16", "-smp", "1",
            "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control"]
    qboot = find_qboot()
    if qboot:
        argv += ["-bios", str(qboot)]
    err = workdir / "stderr"
    proc = QemuProcess.spawn(argv, stdout=workdir / "stdout", stderr=err)
    qmp = QmpConnection("accel-probe", str(sock))
    version = ""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(proc.watch)
            try:
                await qmp.connect(timeout=5, alive=lambda: proc.alive)
                version = qmp.qemu_version
                await qmp.execute("cont", timeout=2)
                await anyio.sleep(0.25)
                status = await qmp.execute("query-status", timeout=2)
                ok = proc.alive and status.get("status") in ("running", "paused", "shutdown")
            except FleetError:
                ok = False
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await qmp.close()
            proc.send_signal(9)
            await proc.watch()
            proc.close()
    why = ""
    if not ok:
        text = err.read_text(errors="replace").strip().splitlines()
        why = text[-1] if text else (proc.status.describe() if proc.status else "failed")
    return ok, version, why


async def probe(qemu_binary: str = "qemu-system-x86_64", *, allow_kvm: bool = True) -> AccelDecision:
    """Probe KVM usability and the working host CPU model (uncached; see :func:`get_decision`).

    Raises:
        QemuStartError: when QEMU is not installed.
    """
    t0 = time.monotonic()
    qemu = find_qemu(qemu_binary)
    module = kvm_module()
    attempts: list[str] = []
    if os.environ.get("FLEETD_ACCEL") == "tcg" or not allow_kvm:
        return AccelDecision("tcg", False, module, None, "KVM disabled by configuration (FLEETD_ACCEL=tcg)",
                             qemu, "", (time.monotonic() - t0) * 1000)
    ok, why = kvm_device_ok()
    if not ok:
        return AccelDecision("tcg", False, module, None, f"KVM unusable ({why}): using TCG",
                             qemu, "", (time.monotonic() - t0) * 1000)
    workdir = Path(tempfile.mkdtemp(prefix="fdp", dir="/tmp"))
    version = ""
    try:
        for model in HOST_MODELS:
            good, version, detail = await _try_model(qemu, model, workdir)
            attempts.append(f"-cpu {model}: {'ok' if good else detail}")
            if good:
                ms = (time.monotonic() - t0) * 1000
                if module == "kvm_pvm":
                    # Measured here: guest ring-0 code runs thousands of times slower under this
                    # nested, software-assisted KVM; an 8x2 fleet of the bundled guest became
                    # healthy in 1.15 s under it vs 0.58 s under TCG, idling at 3x the host CPU,
                    # and a Debian kernel did not boot at all. accel=kvm still uses it.
                    return AccelDecision(
                        "tcg", True, module, model,
                        f"KVM usable with -cpu {model}, but module kvm_pvm is nested and "
                        "software-assisted (ring-0 guest code is very slow): auto uses TCG; "
                        "accel=kvm uses KVM", qemu, version, ms, tuple(attempts))
                return AccelDecision("kvm", True, module, model,
                                     f"KVM usable with -cpu {model}, module {module}",
                                     qemu, version, ms, tuple(attempts))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return AccelDecision("tcg", False, module, None,
                         "KVM present but no host CPU model starts: using TCG", qemu, version,
                         (time.monotonic() - t0) * 1000, tuple(attempts))


_cache: dict[str, AccelDecision] = {}
_lock: anyio.Lock | None = None


async def get_decision(qemu_binary: str = "qemu-system-x86_64") -> AccelDecision:
    """The cached probe result for this QEMU binary (probing on first use)."""
    global _lock
    if _lock is None:
        _lock = anyio.Lock()
    async with _lock:
        if qemu_binary not in _cache:
            _cache[qemu_binary] = await probe(qemu_binary)
        return _cache[qemu_binary]


def choose(spec: GuestSpec, decision: AccelDecision) -> AccelChoice:
    """The accelerator and ``-cpu`` value for one spec under the probe's decision.

    ``-cpu host[,flags]`` keeps its flags; under KVM the probe's extra flag
    (``-arch-capabilities``) is added, under TCG ``host`` becomes ``max``.

    Raises:
        AccelError: ``accel="kvm"`` on a host where KVM is not usable.
    """
    notes: list[str] = []
    if spec.accel == "kvm" and not decision.kvm_usable:  # (kvm_usable: the probe's own finding)
        raise AccelError(f"accel: kvm requested but not usable here ({decision.reason})",
                         field="accel")
    accel = decision.accel if spec.accel == "auto" else spec.accel
    model = spec.cpu_model
    base, _, flags = model.partition(",")
    if accel == "kvm":
        host = decision.kvm_cpu_model or "host"
        if model == "auto":
            model = host
        elif base == "host":
            extra = [f for f in host.split(",")[1:] if f not in flags.split(",")]
            model = ",".join([model, *extra])
            if extra:
                notes.append(f"cpu model {spec.cpu_model} + {','.join(extra)} (probe)")
    else:
        if model == "auto":
            model = TCG_MODEL
        elif base == "host":
            model = ",".join([TCG_MODEL, flags]) if flags else TCG_MODEL
            notes.append(f"cpu model {spec.cpu_model} -> {model} under TCG")
        if spec.accel == "auto" and decision.kvm_module and not decision.kvm_usable:
            notes.append(decision.reason)
    return AccelChoice(accel, model, tuple(notes))
