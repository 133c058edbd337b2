//! COM1 (16550) console: a line-locked writer shared by all CPUs, plus the input poller.
//!
//! The FIFOs stay off: enabling them flushes whatever was already received (a command sent
//! before the guest booted would be lost), and without them QEMU back-pressures the host
//! side in both directions, byte by byte, so nothing is ever dropped. Output waits for
//! LSR.THRE before each byte; input is polled (LSR.DR) from the BSP's heartbeat loop.
//! (Measured: the FIFO made no difference to the cost of a heartbeat, even under KVM.)

use crate::arch::{inb, outb, pause, rdtsc};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
const SCR: u16 = COM1 + 7;

/// 0 = free, otherwise (cpu index + 1) of the holder.
static LOCK: AtomicU32 = AtomicU32::new(0);
static PRESENT: AtomicBool = AtomicBool::new(false);

pub fn init() {
    // Is there a UART at all? (scratch register round trip)
    outb(SCR, 0x5a);
    let present = inb(SCR) == 0x5a;
    PRESENT.store(present, Relaxed);
    outb(IER, 0x00); // polled, no interrupts
    outb(LCR, 0x80); // DLAB
    outb(COM1, 0x01); // 115200 baud (meaningless under QEMU, but proper)
    outb(COM1 + 1, 0x00);
    outb(LCR, 0x03); // 8N1
    outb(FCR, 0x00); // no FIFOs (see above); a no-op after power-on, so nothing is flushed
    outb(MCR, 0x03); // DTR | RTS
}

pub fn present() -> bool {
    PRESENT.load(Relaxed)
}

#[inline]
fn put(b: u8) {
    // Wait for the transmitter. Bounded so that a wedged or absent UART can't freeze a
    // panic path forever.
    let mut spins: u32 = 0;
    while inb(LSR) & 0x20 == 0 {
        spins = spins.wrapping_add(1);
        if spins > 50_000_000 {
            break;
        }
        pause();
    }
    outb(THR, b);
}

/// One output line. Holding it holds the console lock; dropping it ends the line with `\n`.
pub struct Line {
    owned: bool,
}

fn lock(cpu: usize, deadline_ticks: Option<u64>) -> bool {
    let me = cpu as u32 + 1;
    if LOCK.load(Relaxed) == me {
        return false; // re-entered on this CPU (panic while printing): write through
    }
    let start = rdtsc();
    loop {
        if LOCK.compare_exchange_weak(0, me, Acquire, Relaxed).is_ok() {
            return true;
        }
        if let Some(d) = deadline_ticks {
            if rdtsc().wrapping_sub(start) > d {
                return false; // holder is dead (halted/stalled mid-line): steal
            }
        }
        pause();
    }
}

impl Line {
    /// Start a line (waits for the console).
    pub fn new() -> Line {
        let owned = lock(crate::smp::cpu_index(), None);
        Line { owned }
    }
    /// Start a line on a fatal path: never waits more than ~50 ms for the console.
    pub fn new_forced(cpu: usize) -> Line {
        let t = crate::time::tsc_per_ms();
        let d = if t == 0 { 200_000_000 } else { t * 50 };
        let owned = lock(cpu, Some(d));
        if !owned {
            put(b'\n'); // we may be cutting into someone's line
        }
        Line { owned }
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            put(b);
        }
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = v;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }
    pub fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                put(HEX[d as usize]);
            }
        }
        self
    }
    /// Bytes as they go inside a quoted field: `"` -> `\"`, `\` -> `\\`, others outside
    /// 0x20..=0x7e -> `\xNN` (lower-case hex).
    pub fn escaped(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            put_escaped(b);
        }
        self
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_escaped(b: u8) {
    match b {
        b'"' => {
            put(b'\\');
            put(b'"');
        }
        b'\\' => {
            put(b'\\');
            put(b'\\');
        }
        0x20..=0x7e => put(b),
        _ => {
            put(b'\\');
            put(b'x');
            put(HEX[(b >> 4) as usize]);
            put(HEX[(b & 0xf) as usize]);
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        put(b'\n');
        if self.owned {
            LOCK.store(0, Release);
        }
    }
}

/// `core::fmt` sink that escapes for a quoted field (used by panic messages).
pub struct Escaped<'a>(pub &'a mut Line);
impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.escaped(s.as_bytes());
        Ok(())
    }
}

/// Non-blocking read of one received byte.
pub fn poll_byte() -> Option<u8> {
    if !present() {
        return None;
    }
    if inb(LSR) & 0x01 != 0 {
        Some(inb(RBR))
    } else {
        None
    }
}
