//! Which zones of a meter are read, which are missing and why, and which
//! readings were rejected: what `ergon_meter_zone_up{source,zone}`,
//! `ergon_meter_rejected_readings_total{source,reason}` and `ergon doctor`
//! show.
//!
//! Why per zone: one broken zone (a psys zone whose range file reads garbage,
//! one lost GPU, one hwmon sensor that returns EIO) must not cost the healthy
//! ones, and must not turn a metered node into an estimated one without a
//! trace. Like node_exporter, which skips and logs a broken file and keeps
//! serving: a meter reads every zone it can, and the zones it cannot are
//! listed here with the reason, until they come back.
//!
//! Logging is bounded: a zone going down is one WARN (naming the file and
//! what it held), repeated only if the reason changes; coming back is one
//! INFO. A rejected reading is one WARN per zone and reason until that zone
//! gives an accepted reading again; every rejection is counted.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;

/// Why a reading's energy was not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// More power than the device can draw (see `limits.rs`).
    AboveMaxPower,
    /// A gap long enough for an unseen extra wrap of the counter (see `counter.rs`).
    AmbiguousGap,
    /// The counter restarted (driver reload, firmware): the energy since the
    /// last reading before the restart is unknown.
    CounterReset,
}

impl Rejection {
    /// The `reason` label of `ergon_meter_rejected_readings_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::AboveMaxPower => "above_max_power",
            Rejection::AmbiguousGap => "ambiguous_gap",
            Rejection::CounterReset => "counter_reset",
        }
    }
}

/// One zone a meter knows of.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneHealth {
    pub zone: String,
    /// Read at the last sample.
    pub up: bool,
    /// Why not, for `ergon doctor` and the log.
    pub reason: Option<String>,
}

/// A meter's zones and its rejected readings so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeterHealth {
    /// Sorted by zone.
    pub zones: Vec<ZoneHealth>,
    /// Readings rejected since start, by reason (cumulative).
    pub rejected: BTreeMap<Rejection, u64>,
}

impl MeterHealth {
    /// The zones not read, with their reasons.
    pub fn down(&self) -> impl Iterator<Item = &ZoneHealth> {
        self.zones.iter().filter(|zone| !zone.up)
    }
}

/// The bookkeeping behind [`MeterHealth`] that each meter keeps.
#[derive(Debug)]
pub(crate) struct ZoneLog {
    source: &'static str,
    /// zone → why it is not read.
    down: BTreeMap<String, String>,
    rejected: BTreeMap<Rejection, u64>,
    /// (zone, reason) already warned about since the zone's last accepted reading.
    warned: HashSet<(String, Rejection)>,
}

impl ZoneLog {
    pub(crate) fn new(source: &'static str) -> ZoneLog {
        ZoneLog {
            source,
            down: BTreeMap::new(),
            rejected: BTreeMap::new(),
            warned: HashSet::new(),
        }
    }

    /// `zone` cannot be read, because of `reason`: one WARN per new reason.
    pub(crate) fn down(&mut self, zone: &str, reason: impl Display) {
        let reason = reason.to_string();
        if self.down.get(zone) != Some(&reason) {
            tracing::warn!(
                source = self.source,
                zone = %zone,
                "zone not read, the meter's other zones carry on: {reason}"
            );
            self.down.insert(zone.to_string(), reason);
        }
    }

    /// `zone` cannot be read; the meter has logged why itself (NVML logs
    /// per call and error kind).
    pub(crate) fn down_quietly(&mut self, zone: &str, reason: impl Display) {
        self.down.insert(zone.to_string(), reason.to_string());
    }

    /// `zone` was read.
    pub(crate) fn up(&mut self, zone: &str) {
        if self.down.remove(zone).is_some() {
            tracing::info!(
                source = self.source,
                zone = %zone,
                "zone read again; its first reading is its new baseline where it had gone"
            );
        }
    }

    pub(crate) fn is_down(&self, zone: &str) -> bool {
        self.down.contains_key(zone)
    }

    /// A reading of `zone` was not counted: count it, and warn once per
    /// zone and reason until the zone's next accepted reading.
    pub(crate) fn reject(&mut self, zone: &str, rejection: Rejection, detail: impl Display) {
        *self.rejected.entry(rejection).or_default() += 1;
        if self.warned.insert((zone.to_string(), rejection)) {
            tracing::warn!(
                source = self.source,
                zone = %zone,
                reason = rejection.as_str(),
                "reading rejected, this interval's energy of the zone is unknown (counted in \
                 ergon_meter_rejected_readings_total): {detail}"
            );
        }
    }

    /// A reading of `zone` was counted: later rejections warn again.
    pub(crate) fn accepted(&mut self, zone: &str) {
        if !self.warned.is_empty() {
            self.warned.retain(|(warned_zone, _)| warned_zone != zone);
        }
    }

    /// Health of the zones `read` (up unless marked down) and of those only
    /// marked down.
    pub(crate) fn health<'a>(&self, read: impl IntoIterator<Item = &'a str>) -> MeterHealth {
        let mut zones: BTreeMap<&str, Option<&String>> = BTreeMap::new();
        for zone in read {
            zones.insert(zone, None);
        }
        for (zone, reason) in &self.down {
            zones.insert(zone, Some(reason));
        }
        MeterHealth {
            zones: zones
                .into_iter()
                .map(|(zone, reason)| ZoneHealth {
                    zone: zone.to_string(),
                    up: reason.is_none(),
                    reason: reason.cloned(),
                })
                .collect(),
            rejected: self.rejected.clone(),
        }
    }
}
