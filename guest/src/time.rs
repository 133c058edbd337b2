//! Time: TSC (and LAPIC timer) calibrated against the PIT, uptime since kernel entry.

use crate::apic;
use crate::arch::{inb, outb, pause, rdtsc, Racy};
use core::sync::atomic::{AtomicU64, Ordering::*};

/// TSC value at the very first instruction of the kernel (written by boot.rs).
#[no_mangle]
pub static BOOT_TSC: Racy<u64> = Racy::new(0);

static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);
static LAPIC_PER_MS: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;

pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Relaxed)
}
pub fn lapic_per_ms() -> u64 {
    LAPIC_PER_MS.load(Relaxed)
}
pub fn boot_tsc() -> u64 {
    unsafe { *BOOT_TSC.get() }
}

/// Milliseconds since kernel entry.
pub fn uptime_ms() -> u64 {
    let t = tsc_per_ms().max(1);
    rdtsc().wrapping_sub(boot_tsc()) / t
}

pub fn ms_to_ticks(ms: u64) -> u64 {
    ms.saturating_mul(tsc_per_ms())
}
pub fn us_to_ticks(us: u64) -> u64 {
    us.saturating_mul(tsc_per_ms()) / 1000
}
pub fn ticks_to_us(t: u64) -> u64 {
    let per = tsc_per_ms().max(1);
    (t as u128 * 1000 / per as u128) as u64
}

pub fn delay_us(us: u64) {
    let end = rdtsc() + us_to_ticks(us);
    while rdtsc() < end {
        pause();
    }
}

/// One PIT channel-2 one-shot of `latch` PIT ticks; returns (TSC ticks, LAPIC timer ticks).
fn pit_round(latch: u16, lapic: bool) -> (u64, u64) {
    let p61 = inb(0x61);
    outb(0x61, (p61 & !0x02) | 0x01); // gate high, speaker off
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
    outb(0x42, (latch & 0xff) as u8);
    let l0 = if lapic { apic::timer_current() } else { 0 };
    outb(0x42, (latch >> 8) as u8); // counting starts now
    let t0 = rdtsc();
    let mut guard: u64 = 0;
    while inb(0x61) & 0x20 == 0 {
        guard += 1;
        if guard > 100_000_000 {
            break; // no PIT? give up, fall back below
        }
    }
    let t1 = rdtsc();
    let l1 = if lapic { apic::timer_current() } else { 0 };
    outb(0x61, p61);
    (t1.wrapping_sub(t0), l0.wrapping_sub(l1) as u64)
}

/// Calibrate the TSC and the LAPIC timer (divide-by-16) against the PIT: three ~3 ms rounds,
/// median taken. QEMU clocks its APIC bus at 1 GHz (TCG and KVM alike), so the LAPIC timer
/// must come out near 62 500 ticks/ms: when it does not, the vCPU was descheduled inside the
/// PIT window (a loaded host) and the TSC figure from that attempt is wrong too, so try again
/// (up to 8 times, keeping the attempt closest to the expected rate).
pub fn calibrate() {
    const LATCH: u16 = 3580; // ~3.0 ms
    const LAPIC_EXPECTED: u64 = 62_500; // 1 GHz / 16 per ms
    apic::timer_start_oneshot_max();
    let mut best = (u64::MAX, 0u64, 0u64); // (distance from expected, tsc, lapic)
    for _ in 0..8 {
        let mut r = [(0u64, 0u64); 3];
        for x in r.iter_mut() {
            *x = pit_round(LATCH, true);
        }
        // sort by TSC delta, take the middle round
        r.sort_unstable_by_key(|x| x.0);
        let (tsc, lt) = r[1];
        let l = lt * PIT_HZ / (LATCH as u64 * 1000);
        let err = l.abs_diff(LAPIC_EXPECTED);
        if err < best.0 {
            best = (err, tsc, l);
        }
        if err * 100 <= LAPIC_EXPECTED * 10 {
            break; // within 10%: an undisturbed attempt
        }
    }
    let (_, tsc, mut l) = best;
    let mut per_ms = tsc * PIT_HZ / (LATCH as u64 * 1000);
    if per_ms < 1000 {
        per_ms = 1_000_000; // no usable PIT: assume 1 GHz rather than divide by zero
    }
    TSC_PER_MS.store(per_ms, Relaxed);
    if l == 0 {
        l = LAPIC_EXPECTED;
    }
    LAPIC_PER_MS.store(l, Relaxed);
    apic::timer_stop();
}
