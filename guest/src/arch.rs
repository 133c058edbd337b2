//! Thin wrappers over x86 instructions, port I/O, MMIO and the ring-3 -> ring-0 services.

use core::arch::asm;
use core::cell::UnsafeCell;

/// A plain global that asm and Rust share. All synchronisation is by protocol (documented at
/// each use), never by the type system.
#[repr(transparent)]
pub struct Racy<T>(UnsafeCell<T>);
unsafe impl<T> Sync for Racy<T> {}
impl<T> Racy<T> {
    pub const fn new(v: T) -> Self {
        Racy(UnsafeCell::new(v))
    }
    #[inline(always)]
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
pub fn pause() {
    core::hint::spin_loop()
}

/// Read a 32-bit MMIO register (physical == virtual here).
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
#[inline(always)]
pub fn mmio_write32(addr: u64, v: u32) {
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Physical memory reads for firmware tables (identity mapped, possibly unaligned).
#[inline(always)]
pub fn phys_u8(addr: u64) -> u8 {
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}
#[inline(always)]
pub fn phys_u16(addr: u64) -> u16 {
    unsafe { core::ptr::read_unaligned(addr as *const u16) }
}
#[inline(always)]
pub fn phys_u32(addr: u64) -> u32 {
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}
#[inline(always)]
pub fn phys_u64(addr: u64) -> u64 {
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

// ---- ring-3 -> ring-0 services: `int3` through the DPL-3 gate 3 (see boot.rs).
// Not `nostack`: an interrupt may be taken in ring 0 while we sleep there, and the compiler
// must not keep anything in the red zone across these.

/// Halt until the next interrupt has been handled, then return (ring 3 can't `hlt`).
#[inline(always)]
pub fn wait_for_interrupt() {
    unsafe { asm!("int3", inout("rax") 0u64 => _) }
}
/// Stop this CPU for good: interrupts off, `hlt` forever.
pub fn halt_forever() -> ! {
    unsafe { asm!("int3", in("rax") 1u64, options(noreturn)) }
}
/// Reset the machine: triple fault (empty IDT + exception); reset ports as a fallback.
pub fn triple_fault() -> ! {
    unsafe { asm!("int3", in("rax") 2u64, options(noreturn)) }
}
/// Sleep until the BSP sets GO (and sends the wake IPI).
pub fn sleep_until_go() {
    unsafe { asm!("int3", inout("rax") 4u64 => _) }
}

#[inline(always)]
pub fn rsp() -> u64 {
    let v: u64;
    unsafe { asm!("mov {}, rsp", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
