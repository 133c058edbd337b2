//! fleet-guest: a tiny x86-64 SMP kernel for fleetd.
//!
//! It boots from QEMU's `-kernel` (multiboot v1), brings every CPU listed in the ACPI MADT
//! online, runs a workload on all of them and speaks the FLEET console protocol (see
//! PROTOCOL.md) on COM1: BOOT, READY, periodic HB with one counter per CPU, PANIC, EXIT.
//! Faults can be injected from the command line or from the console at run time.

#![no_std]
#![no_main]

mod acpi;
mod apic;
mod arch;
mod boot;
mod config;
mod console;
mod mem;
mod smp;
mod time;

use arch::{halt_forever, outb, outl, pause, rdtsc, Racy};
use config::{Config, Workload};
use console::{Escaped, Line};
use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use smp::{cpu_index, MAX_CPUS, ONLINE, PERCPU, STALL_REQ};

pub const PROTO: u32 = 1;
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Multiboot handoff (written by boot.rs).
#[no_mangle]
pub static MB_MAGIC: Racy<u32> = Racy::new(0);
#[no_mangle]
pub static MB_INFO: Racy<u32> = Racy::new(0);

const CMDLINE_MAX: usize = 1024;
static CMDLINE: Racy<[u8; CMDLINE_MAX]> = Racy::new([0; CMDLINE_MAX]);
static CMDLINE_LEN: Racy<usize> = Racy::new(0);
/// Written once by the BSP before any AP starts; read-only afterwards.
static CFG: Racy<Config> = Racy::new(Config::default());
static CPUS: Racy<acpi::CpuList> = Racy::new(acpi::CpuList::EMPTY);
/// CPUs the firmware reported as enabled ("expected" in READY).
static EXPECTED: AtomicU32 = AtomicU32::new(1);

/// Set by the first CPU to panic: the BSP stops heartbeating.
static PANICKED: AtomicBool = AtomicBool::new(false);
static IN_PANIC: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

// ---- smp-test shared state (each in its own cache line)
#[repr(C, align(64))]
struct Line64(AtomicU64);
/// The shared counter every CPU hammers with `lock xadd`.
static SHARED: Line64 = Line64(AtomicU64::new(0));
/// Quiesce handshake: the BSP bumps EPOCH, each participant acks it (after publishing its
/// contribution) and waits for RELEASE to reach it.
static EPOCH: Line64 = Line64(AtomicU64::new(0));
static RELEASE: Line64 = Line64(AtomicU64::new(0));
/// Set after READY: the busy workloads start; smp-test participants are the CPUs online
/// at that point. (boot.rs's "sleep until GO" service reads it.)
#[no_mangle]
static GO: AtomicU32 = AtomicU32::new(0);
static PARTICIPANT: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// Test hooks (console `crash K` / `fault K`): CPU K takes a Rust panic (1) or a CPU
/// exception (2) the next time it looks.
static CRASH_REQ: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

fn cfg() -> &'static Config {
    unsafe { &*CFG.get() }
}

fn expected() -> usize {
    EXPECTED.load(Relaxed) as usize
}

// ------------------------------------------------------------------------------------------
// Fatal paths

/// Print `FLEET PANIC cpu=<i> msg="..."`, signal pvpanic, stop this CPU for good.
pub fn fatal(cpu: usize, args: fmt::Arguments) -> ! {
    let slot = cpu.min(MAX_CPUS - 1);
    if IN_PANIC[slot].swap(1, AcqRel) == 0 {
        PANICKED.store(true, Release);
        {
            let mut l = Line::new_forced(cpu);
            l.str("FLEET PANIC cpu=").u64(cpu as u64).str(" msg=\"");
            let _ = fmt::write(&mut Escaped(&mut l), args);
            l.str("\"");
        }
        outb(0x505, 1); // pvpanic: "guest panicked"
    }
    halt_forever()
}

#[panic_handler]
fn on_panic(info: &core::panic::PanicInfo) -> ! {
    let cpu = cpu_index();
    match info.location() {
        Some(l) => fatal(cpu, format_args!("rust panic: {} at {}:{}", info.message(), l.file(), l.line())),
        None => fatal(cpu, format_args!("rust panic: {}", info.message())),
    }
}

#[repr(C)]
pub struct ExcFrame {
    cr2: u64,
    regs: [u64; 15], // r15 .. rax
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXC_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)", "#TS", "#NP", "#SS", "#GP", "#PF",
    "(15)", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "(22)", "(23)", "(24)", "(25)", "(26)", "(27)", "#HV", "#VC",
    "#SX", "(31)",
];

/// CPU exceptions: always fatal. boot.rs saves the frame in ring 0 and comes here in ring 3.
#[no_mangle]
pub extern "C" fn rust_exception(f: &ExcFrame) -> ! {
    let cr2 = if f.vector == 14 { f.cr2 } else { 0 };
    let name = EXC_NAMES[(f.vector & 31) as usize];
    fatal(
        cpu_index(),
        format_args!(
            "cpu exception {} {} err={:#x} rip={:#x} cs={:#x} rsp={:#x} rflags={:#x} cr2={:#x}",
            f.vector, name, f.error, f.rip, f.cs, f.rsp, f.rflags, cr2
        ),
    )
}

// ------------------------------------------------------------------------------------------
// Boot (BSP)

/// Copy what we need out of the multiboot info (it lives in memory we reuse later).
/// Returns the top of contiguous RAM above 1 MiB.
fn read_multiboot() -> u64 {
    let magic = unsafe { *MB_MAGIC.get() };
    let info = unsafe { *MB_INFO.get() } as u64;
    let mut mem_top = 0x100000 + 15 * 1024 * 1024; // conservative if the loader says nothing
    if magic != 0x2BAD_B002 || info == 0 {
        return mem_top;
    }
    let flags = arch::phys_u32(info);
    if flags & 1 != 0 {
        mem_top = 0x100000 + arch::phys_u32(info + 8) as u64 * 1024;
    }
    if flags & 4 != 0 {
        let p = arch::phys_u32(info + 16) as u64;
        let buf = unsafe { &mut *CMDLINE.get() };
        let mut raw_len = 0;
        let mut skipping_path = true; // multiboot loaders prepend the kernel's path
        let mut i = 0u64;
        while p != 0 && i < 4096 {
            let c = arch::phys_u8(p + i);
            i += 1;
            if c == 0 {
                break;
            }
            if skipping_path {
                if c == b' ' {
                    skipping_path = false; // exactly one separator; the rest is -append verbatim
                }
                continue;
            }
            if raw_len < CMDLINE_MAX {
                buf[raw_len] = c;
                raw_len += 1;
            }
        }
        unsafe { *CMDLINE_LEN.get() = raw_len };
    }
    mem_top
}

fn cmdline() -> &'static [u8] {
    unsafe {
        let all: &[u8; CMDLINE_MAX] = &*CMDLINE.get();
        &all[..*CMDLINE_LEN.get()]
    }
}

#[no_mangle]
pub extern "C" fn rust_bsp_main() -> ! {
    // Ring 3 (boot.rs did the ring-0 part: descriptor tables, PIC masked).
    console::init();
    let mem_top = read_multiboot();
    unsafe { *CFG.get() = config::parse(cmdline()) };
    let c = cfg();

    Line::new().str("FLEET BOOT proto=").u64(PROTO as u64).str(" cmdline=\"").escaped(cmdline()).str("\"");
    for (a, b) in c.bad.iter().flatten() {
        Line::new().str("FLEET ERR bad cmdline word \"").escaped(&cmdline()[*a..*b]).str("\" (ignored)");
    }

    // CPUs and the LAPIC
    let cpus = unsafe { &mut *CPUS.get() };
    acpi::discover(cpus);
    if cpus.lapic_base != 0 && cpus.lapic_base < 0x1_0000_0000 && cpus.lapic_base & 0xfff == 0 {
        apic::set_base(cpus.lapic_base);
    }
    apic::enable();
    let bsp_id = apic::id();
    {
        let ids = unsafe { &mut *smp::CPU_APIC_IDS.get() };
        ids[0] = bsp_id;
        let mut n = 1;
        let mut bsp_listed = false;
        for &id in &cpus.ids[..cpus.n] {
            if id == bsp_id {
                bsp_listed = true;
            } else if n < MAX_CPUS {
                ids[n] = id;
                n += 1;
            }
        }
        unsafe { *smp::NCPUS.get() = n as u32 };
        let exp = cpus.enabled + if bsp_listed { 0 } else { 1 };
        EXPECTED.store(exp.max(1) as u32, Relaxed);
    }

    time::calibrate();
    PERCPU[0].online.store(1, Release);
    Line::new()
        .str("fleet-guest: version=")
        .str(VERSION)
        .str(" workload=")
        .str(c.workload.name())
        .str(" hb_ms=")
        .u64(c.hb_ms)
        .str(" cpus=")
        .u64(expected() as u64)
        .str(" from=")
        .str(cpus.source.name())
        .str(" rsdp=")
        .hex(cpus.rsdp)
        .str(" lapic=")
        .hex(unsafe { *apic::LAPIC_BASE.get() })
        .str(" bsp_apic_id=")
        .u64(bsp_id as u64)
        .str(" tsc_khz=")
        .u64(time::tsc_per_ms())
        .str(" lapic_khz=")
        .u64(time::lapic_per_ms())
        .str(" mem_top=")
        .hex(mem_top);

    let skip = c.skip_cpu.map(|k| k as usize);
    let b = smp::start_aps(expected(), mem_top, c.ap_timeout_ms, skip);
    Line::new()
        .str("FLEET READY cpus=")
        .u64(b.online as u64)
        .str("/")
        .u64(expected() as u64)
        .str(" bringup_us=")
        .u64(b.elapsed_us);

    for i in 0..smp::ncpus() {
        if PERCPU[i].online.load(Acquire) != 0 {
            PARTICIPANT[i].store(1, Relaxed);
        }
    }
    GO.store(1, Release);
    if b.online > 1 {
        apic::send_wake_all_others(); // APs parked in hlt until now (see rust_ap_main)
    }
    if c.workload == Workload::Idle {
        apic::timer_periodic(c.tick());
    }
    let mut bsp = Bsp::new(c);
    bsp.check_faults(0);
    bsp.run()
}

// ------------------------------------------------------------------------------------------
// APs

#[no_mangle]
pub extern "C" fn rust_ap_main(idx: u32) -> ! {
    let i = idx as usize;
    apic::enable();
    PERCPU[i].online.store(1, Release);
    ONLINE.fetch_add(1, AcqRel);
    if cfg().workload == Workload::Idle {
        apic::timer_periodic(cfg().tick());
        idle_forever(i)
    }
    // Busy workloads start together after READY: until then sleep in ring 0 (so that
    // spinning early APs don't starve the ones still booting on a small host).
    arch::sleep_until_go();
    match cfg().workload {
        Workload::Spin => spin_forever(i),
        _ => {
            if PARTICIPANT[i].load(Relaxed) == 0 {
                Line::new().str("fleet-guest: cpu ").u64(i as u64).str(" came online after READY, not joining smp-test");
                halt_forever();
            }
            smp_forever(i)
        }
    }
}

// ------------------------------------------------------------------------------------------
// Workloads (ring 3)

const SPIN_CHUNK: u32 = 1024;

#[inline(always)]
fn spin_chunk(c: &AtomicU64, n: &mut u64, iters: u32) {
    for _ in 0..iters {
        *n = n.wrapping_add(1);
        unsafe { core::ptr::write_volatile(c.as_ptr(), *n) };
    }
}

fn stop_counting(i: usize) -> ! {
    apic::timer_stop();
    PERCPU[i].stalled.store(1, Release);
    halt_forever()
}

/// Honour a pending `crash`/`fault` request for CPU i (cold path).
#[inline(never)]
#[cold]
fn crash_now(i: usize, what: u8) {
    CRASH_REQ[i].store(0, Relaxed);
    if what == 1 {
        panic!("crash requested on the console (cpu {})", i);
    }
    unsafe { asm!("ud2", options(nomem, nostack)) } // -> #UD -> FLEET PANIC
}

#[inline(always)]
fn requests(i: usize) {
    let c = CRASH_REQ[i].load(Relaxed);
    if c != 0 {
        crash_now(i, c);
    }
}

/// Idle workload: sleep between LAPIC timer ticks (timer_isr counts them).
fn idle_forever(i: usize) -> ! {
    loop {
        arch::wait_for_interrupt();
        if STALL_REQ[i].load(Relaxed) != 0 {
            stop_counting(i)
        }
        requests(i);
    }
}

fn spin_forever(i: usize) -> ! {
    let c = &PERCPU[i].count;
    let mut n = c.load(Relaxed);
    loop {
        spin_chunk(c, &mut n, 4 * SPIN_CHUNK);
        if STALL_REQ[i].load(Relaxed) != 0 {
            stop_counting(i)
        }
        requests(i);
    }
}

#[inline(always)]
fn lock_xadd(p: &AtomicU64, v: u64) -> u64 {
    let mut r = v;
    unsafe { asm!("lock xadd qword ptr [{p}], {r}", p = in(reg) p.as_ptr(), r = inout(reg) r, options(nostack)) };
    r
}

struct SmpCpu {
    n: u64,
    last_old: u64,
    last_epoch: u64,
}

impl SmpCpu {
    fn new(i: usize) -> SmpCpu {
        SmpCpu { n: PERCPU[i].count.load(Relaxed), last_old: 0, last_epoch: 0 }
    }
    /// 64 shared atomic adds, publishing our contribution after each one.
    #[inline(always)]
    fn chunk(&mut self, i: usize) {
        let me = &PERCPU[i].count;
        for _ in 0..64 {
            let old = lock_xadd(&SHARED.0, 1);
            if self.n > 0 && old <= self.last_old {
                fatal(i, format_args!("smp-test: lock xadd went backwards ({} after {})", old, self.last_old));
            }
            self.last_old = old;
            self.n += 1;
            me.store(self.n, Release);
        }
    }
    /// Acknowledge a pending quiesce request and wait for the BSP to release it.
    #[inline(always)]
    fn quiesce_point(&mut self, i: usize) {
        let e = EPOCH.0.load(Acquire);
        if e != self.last_epoch {
            PERCPU[i].ack.store(e, Release);
            while RELEASE.0.load(Acquire) < e {
                pause();
            }
            self.last_epoch = e;
        }
    }
}

fn smp_forever(i: usize) -> ! {
    let mut s = SmpCpu::new(i);
    loop {
        s.quiesce_point(i);
        if STALL_REQ[i].load(Relaxed) != 0 {
            stop_counting(i) // our contribution is published: we stay quiescent for good
        }
        requests(i);
        s.chunk(i);
    }
}

// ------------------------------------------------------------------------------------------
// The BSP: workload share, heartbeats, console commands, fault injection

const QUIESCE_TIMEOUT_MS: u64 = 1000;
const LINE_MAX: usize = 96;

struct Bsp {
    c: &'static Config,
    seq: u64,
    hb_ticks: u64,
    next_hb: u64,
    slack: u64,
    poll_ticks: u64,
    next_poll: u64,
    n: u64,
    smp: SmpCpu,
    epoch: u64,
    line: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
}

impl Bsp {
    fn new(c: &'static Config) -> Bsp {
        let now = rdtsc();
        let hb_ticks = time::ms_to_ticks(c.hb_ms).max(1);
        let (slack, poll_ticks) = match c.workload {
            // we only wake on our own tick: accept a heartbeat up to half a tick early
            Workload::Idle => (time::ms_to_ticks(c.tick()) / 2, 0),
            _ => (0, time::ms_to_ticks(1)),
        };
        Bsp {
            c,
            seq: 0,
            hb_ticks,
            next_hb: now + hb_ticks,
            slack,
            poll_ticks,
            next_poll: now,
            n: 0,
            smp: SmpCpu::new(0),
            epoch: 0,
            line: [0; LINE_MAX],
            len: 0,
            overflow: false,
        }
    }

    fn run(&mut self) -> ! {
        loop {
            if PANICKED.load(Relaxed) {
                halt_forever(); // some CPU panicked: heartbeats stop
            }
            let stalled = STALL_REQ[0].load(Relaxed) != 0;
            if stalled {
                PERCPU[0].stalled.store(1, Relaxed);
            }
            requests(0);
            match self.c.workload {
                Workload::Spin if !stalled => spin_chunk(&PERCPU[0].count, &mut self.n, SPIN_CHUNK),
                Workload::SmpTest if !stalled => self.smp.chunk(0),
                Workload::Idle => arch::wait_for_interrupt(),
                _ => {
                    for _ in 0..64 {
                        pause();
                    }
                }
            }
            let now = rdtsc();
            if now >= self.next_poll {
                self.poll_console();
                self.next_poll = now + self.poll_ticks;
            }
            if now + self.slack >= self.next_hb {
                self.heartbeat(now);
            }
        }
    }

    fn heartbeat(&mut self, now: u64) {
        self.seq += 1;
        if self.c.workload == Workload::SmpTest {
            self.smp_check();
        }
        {
            let mut l = Line::new();
            l.str("FLEET HB seq=").u64(self.seq).str(" up_ms=").u64(time::uptime_ms());
            for i in 0..expected().min(MAX_CPUS) {
                l.str(" c").u64(i as u64).str("=").u64(PERCPU[i].count.load(Acquire));
            }
        }
        self.next_hb += self.hb_ticks;
        if self.next_hb + self.slack <= now {
            self.next_hb = now + self.hb_ticks; // we fell behind (host starved us): don't burst
        }
        self.check_faults(self.seq);
    }

    /// smp-test: quiesce every participant, then the shared counter must equal the sum of
    /// the published per-CPU contributions exactly.
    fn smp_check(&mut self) {
        self.epoch += 1;
        let e = self.epoch;
        EPOCH.0.store(e, Release);
        let deadline = rdtsc() + time::ms_to_ticks(QUIESCE_TIMEOUT_MS);
        let n = smp::ncpus();
        let mut laggard = None;
        'all: for i in 1..n {
            if PARTICIPANT[i].load(Relaxed) == 0 {
                continue;
            }
            let p = &PERCPU[i];
            while p.ack.load(Acquire) < e && p.stalled.load(Acquire) == 0 {
                if rdtsc() > deadline {
                    laggard = Some(i);
                    break 'all;
                }
                pause();
            }
        }
        let mut mismatch = None;
        if laggard.is_none() {
            let shared = SHARED.0.load(SeqCst);
            let sum: u64 = (0..n).map(|i| PERCPU[i].count.load(Acquire)).sum();
            if shared != sum {
                mismatch = Some((shared, sum));
            }
        }
        RELEASE.0.store(e, Release);
        if let Some((shared, sum)) = mismatch {
            fatal(
                0,
                format_args!(
                    "smp-test: shared counter {} != sum of per-cpu contributions {} (heartbeat {})",
                    shared, sum, self.seq
                ),
            );
        }
        if let Some(i) = laggard {
            Line::new()
                .str("FLEET ERR smp-test: cpu ")
                .u64(i as u64)
                .str(" did not quiesce within ")
                .u64(QUIESCE_TIMEOUT_MS)
                .str(" ms; check skipped");
        }
    }

    /// Boot-time faults scheduled "after N heartbeats" (N = 0: right after READY).
    fn check_faults(&mut self, seq: u64) {
        let c = self.c;
        if c.stall_after == Some(seq) {
            if let Some(k) = c.stall_cpu {
                self.stall(k);
            }
        }
        if c.exit_after == Some(seq) {
            do_exit(c.exit_code);
        }
        if c.panic_after == Some(seq) {
            fatal(0, format_args!("injected panic after {} heartbeats (panic_after)", seq));
        }
        if c.reset_after == Some(seq) {
            do_reset();
        }
        if c.hang_after == Some(seq) {
            do_hang();
        }
    }

    fn stall(&mut self, k: u64) {
        if k as usize >= expected().min(MAX_CPUS) {
            Line::new().str("FLEET ERR stall: no cpu ").u64(k);
            return;
        }
        STALL_REQ[k as usize].store(1, Release);
        Line::new().str("FLEET OK stall ").u64(k);
    }

    fn poll_console(&mut self) {
        for _ in 0..64 {
            let Some(b) = console::poll_byte() else { return };
            match b {
                b'\n' | b'\r' => {
                    if self.overflow {
                        Line::new().str("FLEET ERR command too long");
                    } else if self.len > 0 {
                        let mut cmd = [0u8; LINE_MAX];
                        let len = self.len;
                        cmd[..len].copy_from_slice(&self.line[..len]);
                        self.len = 0;
                        self.command(&cmd[..len]);
                    }
                    self.len = 0;
                    self.overflow = false;
                }
                _ if self.len < LINE_MAX => {
                    self.line[self.len] = b;
                    self.len += 1;
                }
                _ => self.overflow = true,
            }
        }
    }

    fn command(&mut self, cmd: &[u8]) {
        let mut w = config::words(cmd);
        let Some((a, b)) = w.next() else { return };
        let verb = &cmd[a..b];
        let arg = w.next().map(|(a, b)| &cmd[a..b]);
        let extra = w.next().is_some();
        let num = arg.and_then(config::parse_u64);
        match (verb, arg.is_some(), extra) {
            (b"panic", false, false) => fatal(0, format_args!("panic requested on the console")),
            (b"hang", false, false) => do_hang(),
            (b"reset", false, false) => do_reset(),
            (b"exit", _, false) if arg.is_none() || num.is_some() => do_exit(num.unwrap_or(0)),
            (b"stall", true, false) if num.is_some() => self.stall(num.unwrap_or(0)),
            (b"crash" | b"fault", _, false) if arg.is_none() || num.is_some() => {
                let k = num.unwrap_or(0);
                if k as usize >= smp::ncpus() || PERCPU[k as usize].online.load(Acquire) == 0 {
                    Line::new().str("FLEET ERR no online cpu ").u64(k);
                } else {
                    Line::new().str("FLEET OK ").bytes(verb).str(" ").u64(k);
                    CRASH_REQ[k as usize].store(if verb == b"crash" { 1 } else { 2 }, Release);
                }
            }
            (b"corrupt", false, false) if self.c.workload == Workload::SmpTest => {
                SHARED.0.fetch_add(1, SeqCst); // an add nobody accounts for: next check must fail
                Line::new().str("FLEET OK corrupt");
            }
            (b"corrupt", false, false) => {
                Line::new().str("FLEET ERR corrupt: only with workload=smp-test");
            }
            _ => {
                let known =
                    matches!(verb, b"panic" | b"hang" | b"reset" | b"exit" | b"stall" | b"corrupt" | b"crash" | b"fault");
                Line::new()
                    .str(if known { "FLEET ERR bad arguments \"" } else { "FLEET ERR unknown command \"" })
                    .escaped(cmd)
                    .str("\"");
            }
        }
    }
}

fn do_exit(code: u64) -> ! {
    Line::new().str("FLEET EXIT code=").u64(code);
    outl(0xf4, code as u32); // isa-debug-exit: QEMU exits with (code << 1) | 1
    Line::new().str("fleet-guest: no isa-debug-exit device at 0xf4; halting instead");
    apic::timer_stop();
    halt_forever()
}

fn do_hang() -> ! {
    Line::new().str("fleet-guest: hanging on request; heartbeats stop");
    apic::timer_stop();
    halt_forever()
}

fn do_reset() -> ! {
    Line::new().str("fleet-guest: reset on request (triple fault)");
    arch::triple_fault()
}
