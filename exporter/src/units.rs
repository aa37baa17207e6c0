//! Units in types, so a nanosecond never meets a joule by accident.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// Energy in joules.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, PartialOrd, serde::Serialize, serde::Deserialize,
)]
pub struct Joules(pub f64);

/// Power in watts.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, PartialOrd, serde::Serialize, serde::Deserialize,
)]
pub struct Watts(pub f64);

/// A duration or CPU time in nanoseconds.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Nanos(pub u64);

impl Joules {
    pub const ZERO: Joules = Joules(0.0);
    pub fn from_microjoules(uj: u64) -> Joules {
        Joules(uj as f64 / 1e6)
    }
}

impl Watts {
    /// Energy at this power over `elapsed`.
    pub fn over(self, elapsed: Nanos) -> Joules {
        Joules(self.0 * elapsed.as_secs_f64())
    }
}

impl Nanos {
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

impl Add for Joules {
    type Output = Joules;
    fn add(self, rhs: Joules) -> Joules {
        Joules(self.0 + rhs.0)
    }
}
impl AddAssign for Joules {
    fn add_assign(&mut self, rhs: Joules) {
        self.0 += rhs.0;
    }
}
impl Sub for Joules {
    type Output = Joules;
    fn sub(self, rhs: Joules) -> Joules {
        Joules(self.0 - rhs.0)
    }
}
impl fmt::Display for Joules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} J", self.0)
    }
}
impl fmt::Display for Watts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} W", self.0)
    }
}

/// An energy domain, as the metrics' `domain` label names it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Package,
    Core,
    Uncore,
    Dram,
    Psys,
    Gpu,
    Platform,
}

impl Domain {
    pub const ALL: [Domain; 7] = [
        Domain::Package,
        Domain::Core,
        Domain::Uncore,
        Domain::Dram,
        Domain::Psys,
        Domain::Gpu,
        Domain::Platform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Package => "package",
            Domain::Core => "core",
            Domain::Uncore => "uncore",
            Domain::Dram => "dram",
            Domain::Psys => "psys",
            Domain::Gpu => "gpu",
            Domain::Platform => "platform",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `CLOCK_MONOTONIC` now: the clock of `bpf_ktime_get_ns` and of retention.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
