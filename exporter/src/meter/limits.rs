//! The most power each zone can draw, so that a reading no device could
//! produce is rejected instead of added: Kepler users saw 9 kW on two 35 W
//! PCs and 300 kW while a VM booted, from counters that jumped or wrapped
//! wrongly.
//!
//! A zone's maximum power comes from, first found:
//! 1. what the device says it can draw — powercap: the zone's largest
//!    `constraint_*_max_power_uw` or `constraint_*_power_limit_uw`; hwmon: the
//!    sensor's `power*_max` or `power*_crit`; NVML: the GPU's enforced power
//!    limit — times [`DEVICE_LIMIT_FACTOR`];
//! 2. else the configured ceiling of the zone's domain (`--max-watts`), as is.
//!
//! Why a factor over the device's limit: the limits are averages the
//! firmware enforces over a time window (RAPL's PL1 over seconds, PL2 over
//! milliseconds to seconds), spikes above them last milliseconds, and the
//! loop's clock and the counter's update clock differ by a little. An
//! interval's average can therefore exceed the limit somewhat, never by
//! twice. Power limits (`power_limit_uw`) count beside the hardware maxima
//! (`max_power_uw`) because client parts state their TDP as the maximum
//! and run at PL2, well above it, for tens of seconds. The ceilings are per zone (one socket's package, one GPU), set high
//! enough for 2-socket servers and 8-GPU nodes, and still orders of magnitude
//! below the readings they exist to reject.

use std::collections::BTreeMap;

use crate::units::{Domain, Nanos, Watts};

/// How far above a device's own limit an interval's average may go.
pub const DEVICE_LIMIT_FACTOR: f64 = 2.0;

/// Default ceilings per zone, in watts, where the device states no limit.
pub const DEFAULT_CEILINGS: [(Domain, f64); 7] = [
    // One socket: the largest server parts draw ~500 W.
    (Domain::Package, 1000.0),
    (Domain::Core, 1000.0),
    (Domain::Uncore, 500.0),
    // One socket's DIMMs: 12 channels × 2 DIMMs × ~15 W.
    (Domain::Dram, 500.0),
    // The platform as RAPL sees it (client and some server parts).
    (Domain::Psys, 3000.0),
    // One GPU: the largest accelerators draw ~1.2 kW.
    (Domain::Gpu, 2000.0),
    // A whole node at its power supply (8-GPU servers draw ~10 kW).
    (Domain::Platform, 20000.0),
];

/// The configured ceiling per domain (`--max-watts package=1000,dram=500`).
#[derive(Clone, Debug, PartialEq)]
pub struct PowerCeilings(BTreeMap<Domain, Watts>);

impl Default for PowerCeilings {
    fn default() -> Self {
        PowerCeilings(
            DEFAULT_CEILINGS
                .into_iter()
                .map(|(domain, watts)| (domain, Watts(watts)))
                .collect(),
        )
    }
}

impl PowerCeilings {
    /// The ceiling of `domain`.
    pub fn get(&self, domain: Domain) -> Watts {
        self.0.get(&domain).copied().unwrap_or(Watts(f64::INFINITY))
    }

    /// Replace the ceiling of `domain`.
    pub fn set(&mut self, domain: Domain, watts: Watts) {
        self.0.insert(domain, watts);
    }

    /// A zone's maximum power: the device's own limit × [`DEVICE_LIMIT_FACTOR`]
    /// where it states one (a positive, finite value), else the ceiling.
    pub fn zone_max(&self, domain: Domain, device_limit: Option<Watts>) -> Watts {
        match device_limit {
            Some(Watts(watts)) if watts.is_finite() && watts > 0.0 => {
                Watts(watts * DEVICE_LIMIT_FACTOR)
            }
            _ => self.get(domain),
        }
    }
}

/// The most counter units a zone drawing at most `max` can count in
/// `elapsed`, for [`super::counter::counter_step`]; `None` where no time
/// has elapsed (the first interval, whose readings are baselines).
pub fn most_units(max: Watts, elapsed: Nanos, joules_per_unit: f64) -> Option<u64> {
    if elapsed.0 == 0 {
        return None;
    }
    // `as` saturates: an infinite ceiling allows any reading.
    Some((max.0 * elapsed.as_secs_f64() / joules_per_unit).floor() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_limits_win_over_ceilings_with_headroom() {
        let ceilings = PowerCeilings::default();
        assert_eq!(
            ceilings.zone_max(Domain::Package, Some(Watts(35.0))),
            Watts(70.0)
        );
        assert_eq!(ceilings.zone_max(Domain::Package, None), Watts(1000.0));
        assert_eq!(
            ceilings.zone_max(Domain::Package, Some(Watts(0.0))),
            Watts(1000.0)
        );
        assert_eq!(
            most_units(Watts(70.0), Nanos(2_000_000_000), 1e-6),
            Some(140_000_000)
        );
        assert_eq!(most_units(Watts(70.0), Nanos(0), 1e-6), None);
        assert_eq!(
            most_units(Watts(f64::INFINITY), Nanos(1), 1e-6),
            Some(u64::MAX)
        );
    }
}
