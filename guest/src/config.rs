//! Kernel command line: space separated `key=value` words; unknown words are ignored.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Spin,
    Idle,
    SmpTest,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Spin => "spin",
            Workload::Idle => "idle",
            Workload::SmpTest => "smp-test",
        }
    }
}

pub struct Config {
    pub hb_ms: u64,
    pub tick_ms: u64,
    pub workload: Workload,
    pub exit_after: Option<u64>,
    pub exit_code: u64,
    pub panic_after: Option<u64>,
    pub hang_after: Option<u64>,
    pub reset_after: Option<u64>,
    pub stall_cpu: Option<u64>,
    pub stall_after: Option<u64>,
    pub ap_timeout_ms: u64,
    pub skip_cpu: Option<u64>,
    /// Words we recognised but could not parse (reported once after BOOT).
    pub bad: [Option<(usize, usize)>; 4],
}

impl Config {
    pub const fn default() -> Config {
        Config {
            hb_ms: 100,
            tick_ms: 0,
            workload: Workload::Spin,
            exit_after: None,
            exit_code: 0,
            panic_after: None,
            hang_after: None,
            reset_after: None,
            stall_cpu: None,
            stall_after: None,
            ap_timeout_ms: 1000,
            skip_cpu: None,
            bad: [None; 4],
        }
    }

    /// Effective idle tick period (the LAPIC timer's 32-bit count at /16 caps it near 68 s).
    pub fn tick(&self) -> u64 {
        let t = if self.tick_ms != 0 { self.tick_ms } else { self.hb_ms / 2 };
        t.clamp(1, 60_000)
    }
}

pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = if s.len() > 2 && (s.starts_with(b"0x") || s.starts_with(b"0X")) { (&s[2..], 16) } else { (s, 10) };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        } as u64;
        v = v.checked_mul(radix)?.checked_add(d)?;
    }
    Some(v)
}

/// Iterate the whitespace separated words of `s`, yielding (start, end) offsets.
pub fn words(s: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    core::iter::from_fn(move || {
        while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
            i += 1;
        }
        if i >= s.len() {
            return None;
        }
        let start = i;
        while i < s.len() && s[i] != b' ' && s[i] != b'\t' {
            i += 1;
        }
        Some((start, i))
    })
}

pub fn parse(cmdline: &[u8]) -> Config {
    let mut c = Config::default();
    let mut nbad = 0;
    for (a, b) in words(cmdline) {
        let w = &cmdline[a..b];
        let Some(eq) = w.iter().position(|&x| x == b'=') else { continue };
        let (k, v) = (&w[..eq], &w[eq + 1..]);
        let num = parse_u64(v);
        let ok = match k {
            b"hb_ms" => num.filter(|&n| n >= 1).map(|n| c.hb_ms = n).is_some(),
            b"tick_ms" => num.filter(|&n| n >= 1).map(|n| c.tick_ms = n).is_some(),
            b"workload" => match v {
                b"spin" => { c.workload = Workload::Spin; true }
                b"idle" => { c.workload = Workload::Idle; true }
                b"smp-test" => { c.workload = Workload::SmpTest; true }
                _ => false,
            },
            b"exit_after" => num.map(|n| c.exit_after = Some(n)).is_some(),
            b"exit_code" => num.map(|n| c.exit_code = n).is_some(),
            b"panic_after" => num.map(|n| c.panic_after = Some(n)).is_some(),
            b"hang_after" => num.map(|n| c.hang_after = Some(n)).is_some(),
            b"reset_after" => num.map(|n| c.reset_after = Some(n)).is_some(),
            b"stall_cpu" => num.map(|n| c.stall_cpu = Some(n)).is_some(),
            b"stall_after" => num.map(|n| c.stall_after = Some(n)).is_some(),
            b"ap_timeout_ms" => num.map(|n| c.ap_timeout_ms = n).is_some(),
            b"skip_cpu" => num.map(|n| c.skip_cpu = Some(n)).is_some(),
            _ => true, // not ours (console=ttyS0, ...): ignored
        };
        if !ok && nbad < c.bad.len() {
            c.bad[nbad] = Some((a, b));
            nbad += 1;
        }
    }
    if c.stall_cpu.is_some() && c.stall_after.is_none() {
        c.stall_after = Some(0);
    }
    c
}
