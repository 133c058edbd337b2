//! Per-CPU state, descriptor tables (GDT/TSS/IDT) and AP bring-up (INIT-SIPI-SIPI).

use crate::apic;
use crate::arch::{rdtsc, rsp, Racy};
use crate::time;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

/// CPUs we can run (index 0 is always the BSP). More enabled CPUs than this are still
/// counted as "expected" and simply never come online.
pub const MAX_CPUS: usize = 256;
/// Size (and alignment) of every kernel and user stack. The low 8 bytes of each stack hold
/// `STACK_TAG << 32 | cpu index`, which is how code finds its CPU index from `rsp` (the BSP's
/// stacks are zero there: index 0).
pub const STACK_SIZE: usize = 16384;
const STACK_TAG: u64 = 0xF1EE_7000;

/// Physical page the real-mode trampoline is copied to (SIPI vector 0x08).
pub const TRAMP_BASE: u64 = 0x8000;

/// Everything one CPU publishes, in its own cache line. Only the owning CPU writes it
/// (heartbeat readers only load).
#[repr(C, align(64))]
pub struct PerCpu {
    /// Workload progress (spin: loop iterations, idle: timer ticks, smp-test: atomic adds).
    pub count: AtomicU64, // offset 0 (the timer ISR increments it)
    /// smp-test: last quiesce epoch acknowledged.
    pub ack: AtomicU64, // offset 8
    /// Set once this CPU has stopped counting for good (stall).
    pub stalled: AtomicU32, // offset 16 (the timer ISR sets it)
    /// Set when the CPU reached its workload.
    pub online: AtomicU32, // offset 20
}

impl PerCpu {
    const fn new() -> PerCpu {
        PerCpu { count: AtomicU64::new(0), ack: AtomicU64::new(0), stalled: AtomicU32::new(0), online: AtomicU32::new(0) }
    }
}

#[no_mangle]
pub static PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
/// Written by the BSP: "CPU i, stop counting". Read by CPU i (and its timer ISR).
#[no_mangle]
pub static STALL_REQ: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// APIC id of CPU index i (boot.rs looks APs up here to find their index).
#[no_mangle]
pub static CPU_APIC_IDS: Racy<[u32; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);
/// Number of valid entries in CPU_APIC_IDS.
#[no_mangle]
pub static NCPUS: Racy<u32> = Racy::new(1);
#[no_mangle]
pub static AP_KSTACK_TOP: Racy<[u64; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);
#[no_mangle]
pub static AP_USTACK_TOP: Racy<[u64; MAX_CPUS]> = Racy::new([0; MAX_CPUS]);

pub static ONLINE: AtomicU32 = AtomicU32::new(1);

/// 64-bit TSS (104 bytes), as 26 dwords.
type Tss = [u32; 26];
/// All TSSes back to back, then one I/O permission bitmap they all point at (all ports
/// allowed), then the mandatory 0xff terminator byte. See boot.rs for why a bitmap at all.
#[repr(C, align(4096))]
pub struct TssArea {
    tss: [Tss; MAX_CPUS],
    iomap: [u8; 8192],
    term: [u8; 8],
}
/// Offset of the I/O bitmap from the first TSS (boot.rs sets up TSS 0 with it).
pub const IOMAP_OFFSET: usize = MAX_CPUS * 104;
#[no_mangle]
pub static TSS: Racy<TssArea> = Racy::new(TssArea { tss: [[0; 26]; MAX_CPUS], iomap: [0; 8192], term: [0; 8] });

#[repr(C, align(4096))]
pub struct Idt(pub [u64; 512]);
#[no_mangle]
pub static IDT: Racy<Idt> = Racy::new(Idt([0; 512]));

extern "C" {
    static mut gdt: [u64; 6 + 2 * MAX_CPUS];
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static __image_end: u8;
}

/// Index of the CPU running this code (works in ring 0 and ring 3, any of our stacks).
#[inline]
pub fn cpu_index() -> usize {
    let base = rsp() & !(STACK_SIZE as u64 - 1);
    let tag = unsafe { core::ptr::read_volatile(base as *const u64) };
    if tag >> 32 == STACK_TAG {
        (tag & 0xffff_ffff) as usize
    } else {
        0
    }
}

pub fn ncpus() -> usize {
    unsafe { *NCPUS.get() as usize }
}

/// Fill CPU `i`'s TSS (ring-0 stack for interrupts from ring 3, shared I/O bitmap) and its
/// GDT descriptor. (The BSP's is done in boot.rs the same way.)
pub fn setup_tss(i: usize, kstack_top: u64) {
    unsafe {
        let area = &mut *TSS.get();
        area.term[0] = 0xff;
        let t = &mut area.tss[i];
        *t = [0; 26];
        t[1] = kstack_top as u32;
        t[2] = (kstack_top >> 32) as u32;
        let base = t.as_ptr() as u64;
        let iomap = area.iomap.as_ptr() as u64;
        t[25] = ((iomap - base) as u32) << 16; // I/O map base (fits: < 64 KiB away)
        let limit: u64 = iomap + 8192 - base; // up to and including the terminator byte
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40) // present, DPL 0, available 64-bit TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let hi = base >> 32;
        let g = core::ptr::addr_of_mut!(gdt) as *mut u64;
        core::ptr::write_volatile(g.add(6 + 2 * i), lo);
        core::ptr::write_volatile(g.add(7 + 2 * i), hi);
    }
}

pub struct Bringup {
    pub started: usize,
    pub online: usize,
    pub elapsed_us: u64,
}

/// Start every AP in CPU_APIC_IDS[1..n] in parallel and wait until `expected` CPUs are
/// online, or `timeout_ms` has passed. `mem_top` bounds where AP stacks may go; `skip` is a
/// test hook (that CPU is never sent INIT/SIPI, as if it were dead).
pub fn start_aps(expected: usize, mem_top: u64, timeout_ms: u64, skip: Option<usize>) -> Bringup {
    let n = ncpus();
    let mut b = Bringup { started: 0, online: 1, elapsed_us: 0 };
    if expected <= 1 {
        return b;
    }
    // AP stacks: past the image and whatever the loader put right after it (multiboot info
    // and command lines, already copied out by now), 16 KiB aligned, kernel+user per CPU.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let base = (image_end + 0x10000 + STACK_SIZE as u64 - 1) & !(STACK_SIZE as u64 - 1);
    let mut startable = n;
    while startable > 1 && base + (startable as u64 - 1) * 2 * STACK_SIZE as u64 > mem_top {
        startable -= 1;
    }
    unsafe {
        let ks = &mut *AP_KSTACK_TOP.get();
        let us = &mut *AP_USTACK_TOP.get();
        for i in 1..startable {
            let k = base + (i as u64 - 1) * 2 * STACK_SIZE as u64;
            let u = k + STACK_SIZE as u64;
            let tag = (STACK_TAG << 32) | i as u64;
            core::ptr::write_volatile(k as *mut u64, tag);
            core::ptr::write_volatile(u as *mut u64, tag);
            ks[i] = k + STACK_SIZE as u64;
            us[i] = u + STACK_SIZE as u64 - 8; // as if a return address had been pushed
            setup_tss(i, ks[i]);
        }
        // the real-mode trampoline
        let src = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - src as usize;
        core::ptr::copy_nonoverlapping(src, TRAMP_BASE as *mut u8, len);
    }
    fence(SeqCst);

    let ids = unsafe { &*CPU_APIC_IDS.get() };
    let t0 = rdtsc();
    let skip = skip.unwrap_or(usize::MAX);
    for i in 1..startable {
        if i != skip && ids[i] < 0xff {
            apic::send_init(ids[i]);
            b.started += 1;
        }
    }
    time::delay_us(100);
    for round in 0..2 {
        for i in 1..startable {
            if i != skip && ids[i] < 0xff && PERCPU[i].online.load(Acquire) == 0 {
                apic::send_sipi(ids[i], (TRAMP_BASE >> 12) as u32);
            }
        }
        if round == 0 {
            time::delay_us(200);
        }
    }
    let deadline = t0 + time::ms_to_ticks(timeout_ms);
    let mut now;
    loop {
        now = rdtsc();
        if ONLINE.load(Acquire) as usize >= expected || now > deadline {
            break;
        }
        crate::arch::pause();
    }
    b.online = ONLINE.load(Acquire) as usize;
    b.elapsed_us = time::ticks_to_us(now - t0);
    b
}
