//! Finding the CPUs: RSDP (EBDA, then 0xE0000-0xFFFFF) -> RSDT/XSDT -> MADT, with the
//! Intel MP table as a fallback. Works with SeaBIOS and qboot on pc and q35.

use crate::arch::{phys_u16, phys_u32, phys_u64, phys_u8};

pub const MAX_FOUND: usize = 512;

pub struct CpuList {
    /// APIC ids of the enabled CPUs, in firmware table order.
    pub ids: [u32; MAX_FOUND],
    pub n: usize,
    /// Enabled CPUs in the table (may exceed `n` if the table is huge).
    pub enabled: usize,
    /// Local APIC base from the tables (0: not given, use the architectural default).
    pub lapic_base: u64,
    pub source: Source,
    pub rsdp: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    None = 0,
    Madt,
    MpTable,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Madt => "madt",
            Source::MpTable => "mptable",
        }
    }
}

impl CpuList {
    pub const EMPTY: CpuList =
        CpuList { ids: [0; MAX_FOUND], n: 0, enabled: 0, lapic_base: 0, source: Source::None, rsdp: 0 };
    fn add(&mut self, id: u32) {
        if self.ids[..self.n].contains(&id) {
            return; // duplicate (e.g. the same CPU as LAPIC and x2APIC entry)
        }
        self.enabled += 1;
        if self.n < MAX_FOUND {
            self.ids[self.n] = id;
            self.n += 1;
        }
    }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut s: u8 = 0;
    for i in 0..len {
        s = s.wrapping_add(phys_u8(addr + i));
    }
    s == 0
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    sig.iter().enumerate().all(|(i, &b)| phys_u8(addr + i as u64) == b)
}

fn scan(start: u64, end: u64, sig: &[u8], len: u64) -> Option<u64> {
    let mut a = start & !0xf;
    while a + len <= end {
        if sig_at(a, sig) && checksum_ok(a, len) {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// The RSDP: first KiB of the EBDA, then the BIOS read-only area.
pub fn find_rsdp() -> Option<u64> {
    let ebda = (phys_u16(0x40E) as u64) << 4;
    let found = if ebda >= 0x80000 && ebda < 0xA0000 { scan(ebda, ebda + 1024, b"RSD PTR ", 20) } else { None };
    // (the ACPI 2.0 extended checksum is checked in find_table before trusting the XSDT)
    found.or_else(|| scan(0xE0000, 0x100000, b"RSD PTR ", 20))
}

fn table_ok(addr: u64) -> bool {
    if addr == 0 || addr >= 0x1_0000_0000 {
        return false; // we only map the low 4 GiB
    }
    let len = phys_u32(addr + 4) as u64;
    len >= 36 && len < (1 << 20) && checksum_ok(addr, len)
}

fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let rev = phys_u8(rsdp + 15);
    let ext_ok = rev >= 2 && {
        let len = phys_u32(rsdp + 20) as u64;
        (36..4096).contains(&len) && checksum_ok(rsdp, len)
    };
    let xsdt = if ext_ok { phys_u64(rsdp + 24) } else { 0 };
    let (root, esize) = if xsdt != 0 && table_ok(xsdt) { (xsdt, 8) } else { (phys_u32(rsdp + 16) as u64, 4) };
    if !table_ok(root) {
        return None;
    }
    let len = phys_u32(root + 4) as u64;
    let mut p = root + 36;
    while p + esize <= root + len {
        let t = if esize == 8 { phys_u64(p) } else { phys_u32(p) as u64 };
        if table_ok(t) && sig_at(t, sig) {
            return Some(t);
        }
        p += esize;
    }
    None
}

fn parse_madt(madt: u64, out: &mut CpuList) {
    out.lapic_base = phys_u32(madt + 36) as u64;
    let len = phys_u32(madt + 4) as u64;
    let end = madt + len;
    let mut p = madt + 44;
    while p + 2 <= end {
        let ty = phys_u8(p);
        let l = phys_u8(p + 1) as u64;
        if l < 2 || p + l > end {
            break;
        }
        match ty {
            0 if l >= 8 => {
                // Processor Local APIC: uid(1) apic_id(1) flags(4); bit 0 = enabled
                if phys_u32(p + 4) & 1 != 0 {
                    out.add(phys_u8(p + 3) as u32);
                }
            }
            9 if l >= 16 => {
                // Processor Local x2APIC: reserved(2) x2apic_id(4) flags(4) uid(4)
                if phys_u32(p + 8) & 1 != 0 {
                    out.add(phys_u32(p + 4));
                }
            }
            5 if l >= 12 => {
                // Local APIC address override
                out.lapic_base = phys_u64(p + 4);
            }
            _ => {}
        }
        p += l;
    }
}

fn parse_mptable(out: &mut CpuList) -> bool {
    let ebda = (phys_u16(0x40E) as u64) << 4;
    let fp = (if ebda >= 0x80000 && ebda < 0xA0000 { scan(ebda, ebda + 1024, b"_MP_", 16) } else { None })
        .or_else(|| scan(0x9FC00, 0xA0000, b"_MP_", 16))
        .or_else(|| scan(0xF0000, 0x100000, b"_MP_", 16));
    let Some(fp) = fp else { return false };
    let cfg = phys_u32(fp + 4) as u64;
    if cfg == 0 || !sig_at(cfg, b"PCMP") {
        return false;
    }
    let base_len = phys_u16(cfg + 4) as u64;
    if !checksum_ok(cfg, base_len) {
        return false;
    }
    out.lapic_base = phys_u32(cfg + 36) as u64;
    let count = phys_u16(cfg + 34) as u64;
    let mut p = cfg + 44;
    for _ in 0..count {
        if p >= cfg + base_len {
            break;
        }
        match phys_u8(p) {
            0 => {
                // processor: type, apic id, version, flags (bit 0 enabled)
                if phys_u8(p + 3) & 1 != 0 {
                    out.add(phys_u8(p + 1) as u32);
                }
                p += 20;
            }
            _ => p += 8,
        }
    }
    out.source = Source::MpTable;
    out.n > 0
}

pub fn discover(out: &mut CpuList) {
    *out = CpuList::EMPTY;
    if let Some(rsdp) = find_rsdp() {
        out.rsdp = rsdp;
        if let Some(madt) = find_table(rsdp, b"APIC") {
            parse_madt(madt, out);
            out.source = Source::Madt;
            if out.n > 0 {
                return;
            }
        }
    }
    *out = CpuList { rsdp: out.rsdp, ..CpuList::EMPTY };
    if !parse_mptable(out) {
        *out = CpuList { rsdp: out.rsdp, ..CpuList::EMPTY };
    }
}
