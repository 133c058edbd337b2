//! Local APIC (xAPIC, MMIO) helpers. All of these work from ring 3: the LAPIC page is mapped
//! user-accessible, and every CPU sees its own LAPIC at the same address.

use crate::arch::{mmio_read32, mmio_write32, pause, Racy};

/// Physical base of the local APIC (from the MADT; read by boot.rs and the timer ISR).
#[no_mangle]
pub static LAPIC_BASE: Racy<u64> = Racy::new(0xFEE0_0000);

pub const TIMER_VECTOR: u32 = 0x40;
pub const SPURIOUS_VECTOR: u32 = 0xFF;
pub const WAKE_VECTOR: u32 = 0x41;

const REG_ID: u64 = 0x20;
const REG_SVR: u64 = 0xF0;
const REG_ICR_LO: u64 = 0x300;
const REG_ICR_HI: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INIT: u64 = 0x380;
const REG_TIMER_CUR: u64 = 0x390;
const REG_TIMER_DIV: u64 = 0x3E0;

#[inline(always)]
fn base() -> u64 {
    unsafe { *LAPIC_BASE.get() }
}
#[inline(always)]
fn read(reg: u64) -> u32 {
    mmio_read32(base() + reg)
}
#[inline(always)]
fn write(reg: u64, v: u32) {
    mmio_write32(base() + reg, v)
}

pub fn set_base(b: u64) {
    unsafe { *LAPIC_BASE.get() = b }
}

pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Software-enable this CPU's LAPIC with our spurious vector.
pub fn enable() {
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR);
}

fn icr_wait() {
    let mut n = 0u32;
    while read(REG_ICR_LO) & (1 << 12) != 0 {
        n += 1;
        if n > 10_000_000 {
            break;
        }
        pause();
    }
}

pub fn send_init(apic_id: u32) {
    write(REG_ICR_HI, apic_id << 24);
    write(REG_ICR_LO, 0x0000_4500); // INIT, level assert, physical
    icr_wait();
}

pub fn send_sipi(apic_id: u32, page: u32) {
    write(REG_ICR_HI, apic_id << 24);
    write(REG_ICR_LO, 0x0000_4600 | (page & 0xff)); // STARTUP
    icr_wait();
}

/// Fixed IPI to every CPU but ourselves (wakes the APs parked in `hlt`).
pub fn send_wake_all_others() {
    write(REG_ICR_HI, 0);
    write(REG_ICR_LO, 0x000C_0000 | WAKE_VECTOR); // all excluding self, fixed, edge
    icr_wait();
}

pub fn timer_start_oneshot_max() {
    write(REG_TIMER_DIV, 0x3); // divide by 16
    write(REG_LVT_TIMER, 0x1_0000 | TIMER_VECTOR); // masked, one-shot
    write(REG_TIMER_INIT, 0xFFFF_FFFF);
}

pub fn timer_current() -> u32 {
    read(REG_TIMER_CUR)
}

pub fn timer_stop() {
    write(REG_LVT_TIMER, 0x1_0000 | TIMER_VECTOR);
    write(REG_TIMER_INIT, 0);
}

/// Periodic tick on this CPU every `ms` milliseconds (LAPIC timer calibrated at /16).
pub fn timer_periodic(ms: u64) {
    let per_ms = crate::time::lapic_per_ms().max(1);
    let count = (per_ms.saturating_mul(ms)).clamp(1, 0xFFFF_FFFF) as u32;
    write(REG_TIMER_DIV, 0x3);
    write(REG_LVT_TIMER, (1 << 17) | TIMER_VECTOR); // periodic, unmasked
    write(REG_TIMER_INIT, count);
}
