//! RAPL through powercap sysfs (`/sys/class/powercap/intel-rapl:*`).
//!
//! Kernel facts this reader is built on:
//! - Each socket is a top-level zone `intel-rapl:N` named `package-N` (or
//!   `package-N-die-M` on multi-die parts); its sub-zones `intel-rapl:N:M` are
//!   named `core`, `uncore` or `dram` without a socket number, so the socket
//!   comes from the parent's name. A platform zone named `psys` may sit at the
//!   top level. AMD parts use the same `intel-rapl` driver and expose package
//!   and core only.
//! - `intel-rapl-mmio:N` zones (client parts) are the same hardware domains
//!   through MMIO registers. Where the MSR interface already has that domain,
//!   the MMIO zone is skipped: reading both would count the joules twice.
//! - `energy_uj` is a cumulative counter that wraps at `max_energy_range_uj`
//!   (see `counter.rs`); since Linux 5.10 it is readable by root only.
//! - sysfs attributes are regenerated on every read at offset 0, so each zone's
//!   file is opened once and re-read with `pread`: one syscall per zone per
//!   interval, no path walk.
//! - Zones come and go with the `intel_rapl_msr` module and CPU hotplug. The
//!   zone list is re-read every `rescan_every` samples and after any failed
//!   read; a new zone's first reading is its baseline, a vanished zone's last
//!   partial interval cannot be read and is logged.
//! - One zone whose `name`, `max_energy_range_uj` or `energy_uj` cannot be
//!   read or parsed (a psys zone reading `garbage`, a counter the kernel made
//!   root-only) is skipped with a WARN naming the file and what it held; the
//!   other zones are read and the zone shows as down in [`Meter::health`]
//!   until a re-listing finds it readable. The meter is absent only when no
//!   zone at all can be read.
//! - Each zone's maximum power is its largest `constraint_*_max_power_uw` or
//!   `constraint_*_power_limit_uw` (see `limits.rs`); a reading above it is
//!   rejected and counted. "Above" is judged over the time since the zone's
//!   last reading, so a zone unreadable for a few intervals (whose counter
//!   kept counting) has the whole outage's energy counted when it reads
//!   again (`counter.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::counter::{CounterStep, EnergyCounter, Wrap};
use super::health::{MeterHealth, ZoneLog};
use super::limits::{PowerCeilings, most_units};
use super::{
    EnergySample, Meter, MeterContext, MeterError, distinct_domains, parse_u64, read_trimmed,
    readings_or_error,
};
use crate::units::{Domain, Joules, Watts};

/// Samples between two re-listings of the zones (a minute at 1 s intervals).
pub const DEFAULT_RESCAN_EVERY: u32 = 60;

const MSR_PREFIX: &str = "intel-rapl:";
const MMIO_PREFIX: &str = "intel-rapl-mmio:";

/// A powercap RAPL zone as listed in sysfs.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneInfo {
    /// The sysfs entry: "intel-rapl:0:1".
    pub id: String,
    pub domain: Domain,
    /// "package-0", "core-0", "dram-1", "psys".
    pub zone: String,
    pub dir: PathBuf,
    /// The counter's range in µJ (0 when the file is missing).
    pub max_energy_range_uj: u64,
    /// The largest `constraint_*_max_power_uw` / `constraint_*_power_limit_uw`.
    pub max_power: Option<Watts>,
    /// Constraint files whose content could not be parsed, each with an
    /// error naming the file and what it held: they state no limit.
    pub unusable_limits: Vec<(PathBuf, String)>,
}

/// A zone listed in sysfs but unusable, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokenZone {
    /// The sysfs entry: "intel-rapl:1".
    pub id: String,
    /// Its zone label where its name was readable ("psys"), else the id.
    pub zone: String,
    /// The error, naming the file and what it held.
    pub reason: String,
}

/// What one listing of the powercap zones found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneScan {
    pub zones: Vec<ZoneInfo>,
    pub broken: Vec<BrokenZone>,
}

/// The largest power limit a zone's constraints state (zero values state
/// nothing), and the constraint files whose content could not be parsed,
/// each an error naming the file and what it held. A file the kernel
/// refuses to read states nothing and is no fault: on ordinary Intel
/// hardware some constraints (a core zone's, PL2/PL4's maximum) answer
/// ENODATA or EOPNOTSUPP.
fn zone_max_power(dir: &Path) -> (Option<Watts>, Vec<(PathBuf, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (None, Vec::new());
    };
    let mut unusable = Vec::new();
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.starts_with("constraint_")
                && (name.ends_with("_max_power_uw") || name.ends_with("_power_limit_uw"))
        })
        .collect();
    names.sort();
    let max = names
        .iter()
        .filter_map(|name| {
            let path = dir.join(name);
            let raw = std::fs::read(&path).ok()?;
            match parse_u64(&path, &raw) {
                Ok(microwatts) => Some(microwatts),
                Err(err) => {
                    unusable.push((path, err.to_string()));
                    None
                }
            }
        })
        .max()
        .filter(|microwatts| *microwatts > 0)
        .map(|microwatts| Watts(microwatts as f64 / 1e6));
    (max, unusable)
}

/// List the RAPL zones under `host_sys/class/powercap`. Fails only when the
/// directory itself cannot be listed; an unusable zone is in `broken`.
pub fn scan_zones(host_sys: &Path) -> Result<ZoneScan, MeterError> {
    let powercap = host_sys.join("class/powercap");
    let entries = std::fs::read_dir(&powercap).map_err(|err| {
        if err.kind() == ErrorKind::NotFound {
            MeterError::Absent(format!(
                "no powercap directory at {}: this kernel has no powercap framework",
                powercap.display()
            ))
        } else {
            MeterError::io(&powercap, err)
        }
    })?;
    let mut ids: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with(MSR_PREFIX) || name.starts_with(MMIO_PREFIX))
        .collect();
    ids.sort();

    let mut broken: Vec<BrokenZone> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for id in &ids {
        match read_trimmed(&powercap.join(id).join("name")) {
            Ok(name) => {
                names.insert(id.clone(), name);
            }
            Err(err) => broken.push(BrokenZone {
                id: id.clone(),
                zone: id.clone(),
                reason: err.to_string(),
            }),
        }
    }

    let mut zones: Vec<ZoneInfo> = Vec::new();
    let mut mmio: Vec<ZoneInfo> = Vec::new();
    for id in &ids {
        if !names.contains_key(id) {
            continue;
        }
        let Some((domain, zone)) = classify(id, &names) else {
            tracing::debug!(zone = %id, name = %names[id], "powercap zone of unknown kind, not read");
            continue;
        };
        let dir = powercap.join(id);
        // Some zones (MMIO ones on some client parts) carry power limits only.
        if !dir.join("energy_uj").exists() {
            tracing::debug!(zone = %id, "powercap zone has no energy counter, not read");
            continue;
        }
        let range_path = dir.join("max_energy_range_uj");
        let range = match std::fs::read(&range_path) {
            Ok(raw) => parse_u64(&range_path, &raw),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(0),
            Err(err) => Err(MeterError::io(&range_path, err)),
        };
        let max_energy_range_uj = match range {
            Ok(range) => range,
            Err(err) => {
                broken.push(BrokenZone {
                    id: id.clone(),
                    zone,
                    reason: err.to_string(),
                });
                continue;
            }
        };
        let (max_power, unusable_limits) = zone_max_power(&dir);
        let info = ZoneInfo {
            id: id.clone(),
            domain,
            zone,
            dir,
            max_energy_range_uj,
            max_power,
            unusable_limits,
        };
        if id.starts_with(MMIO_PREFIX) {
            mmio.push(info)
        } else {
            zones.push(info)
        }
    }
    for info in mmio {
        if zones.iter().any(|msr| msr.zone == info.zone) {
            tracing::debug!(zone = %info.id, "MMIO RAPL zone duplicates an MSR zone, not read");
        } else {
            zones.push(info);
        }
    }
    zones.sort_by(|a, b| (a.domain, &a.zone).cmp(&(b.domain, &b.zone)));
    Ok(ZoneScan { zones, broken })
}

/// Domain and zone label of a powercap entry, from its name and its parent's.
fn classify(id: &str, names: &HashMap<String, String>) -> Option<(Domain, String)> {
    let name = names.get(id)?;
    let (prefix, indices) = id.split_once(':')?;
    match indices.split_once(':') {
        None => {
            if let Some(socket) = name.strip_prefix("package-") {
                Some((Domain::Package, format!("package-{socket}")))
            } else if name == "psys" {
                Some((Domain::Psys, "psys".to_string()))
            } else {
                top_level_domain(name).map(|domain| (domain, name.clone()))
            }
        }
        Some((parent_index, _)) => {
            let domain = top_level_domain(name)?;
            // A parent whose name is unreadable is down itself; its sub-zones
            // take the socket from its index, which the kernel numbers alike.
            let socket = match names.get(&format!("{prefix}:{parent_index}")) {
                Some(parent) => parent.strip_prefix("package-").unwrap_or(parent),
                None => parent_index,
            };
            Some((domain, format!("{name}-{socket}")))
        }
    }
}

fn top_level_domain(name: &str) -> Option<Domain> {
    match name {
        "core" => Some(Domain::Core),
        "uncore" => Some(Domain::Uncore),
        "dram" => Some(Domain::Dram),
        "psys" => Some(Domain::Psys),
        _ => None,
    }
}

struct OpenZone {
    info: ZoneInfo,
    energy_path: PathBuf,
    energy_file: File,
    counter: EnergyCounter,
}

/// Reads every powercap RAPL zone's `energy_uj`.
pub struct RaplMeter {
    host_sys: PathBuf,
    zones: Vec<OpenZone>,
    rescan_every: u32,
    samples_since_scan: u32,
    rescan_needed: bool,
    /// A full buffer means the file holds more than any counter value.
    read_buffer: [u8; 64],
    /// Zones down and why, rejected readings; a zone whose read failed is
    /// re-opened at the next re-listing (a reloaded driver leaves the old
    /// file dead).
    log: ZoneLog,
    ceilings: PowerCeilings,
    /// Unusable constraint files already warned about: each is named once,
    /// not at every re-listing (bounded by the zones' constraint files).
    warned_limits: std::collections::HashSet<PathBuf>,
}

/// Read a zone's counter into `buffer`; a full buffer means the file holds
/// more than any counter value.
fn read_counter(zone: &OpenZone, buffer: &mut [u8; 64]) -> Result<u64, MeterError> {
    let length = zone.energy_file.read_at(buffer, 0).map_err(|err| {
        if err.kind() == ErrorKind::PermissionDenied {
            MeterError::PermissionDenied {
                path: zone.energy_path.clone(),
            }
        } else {
            MeterError::io(&zone.energy_path, err)
        }
    })?;
    if length == buffer.len() {
        return Err(MeterError::parse(
            &zone.energy_path,
            "a decimal unsigned integer",
            buffer,
        ));
    }
    parse_u64(&zone.energy_path, &buffer[..length])
}

fn open_energy(dir: &Path) -> Result<(PathBuf, File), MeterError> {
    let path = dir.join("energy_uj");
    match File::open(&path) {
        Ok(file) => Ok((path, file)),
        Err(err) if err.kind() == ErrorKind::PermissionDenied => {
            Err(MeterError::PermissionDenied { path })
        }
        Err(err) => Err(MeterError::io(&path, err)),
    }
}

impl RaplMeter {
    /// Open every zone that can be read; the others are logged and listed
    /// as down. Fails when there is no zone, or when none can be read (the
    /// error is the first zone's, or the first permission error, which says
    /// how to run the exporter).
    pub fn open(host_sys: &Path, rescan_every: u32) -> Result<RaplMeter, MeterError> {
        let scan = scan_zones(host_sys)?;
        if scan.zones.is_empty() && scan.broken.is_empty() {
            return Err(MeterError::Absent(format!(
                "no RAPL zones under {}: the CPU has no RAPL, the intel_rapl_msr module is not loaded, \
                 or this is a VM that hides it",
                host_sys.join("class/powercap").display()
            )));
        }
        let mut meter = RaplMeter {
            host_sys: host_sys.to_path_buf(),
            zones: Vec::with_capacity(scan.zones.len()),
            rescan_every: rescan_every.max(1),
            samples_since_scan: 0,
            rescan_needed: false,
            read_buffer: [0; 64],
            log: ZoneLog::new("rapl"),
            ceilings: PowerCeilings::default(),
            warned_limits: Default::default(),
        };
        meter.warn_unusable_limits(&scan.zones);
        let mut first_error: Option<MeterError> = None;
        for broken in scan.broken {
            meter.log.down(&broken.zone, &broken.reason);
            first_error.get_or_insert(MeterError::NoZoneReadable(broken.reason));
        }
        for info in scan.zones {
            let zone = info.zone.clone();
            // Prove each counter is readable now, not at the first interval.
            match RaplMeter::open_zone(info).and_then(|open| {
                read_counter(&open, &mut meter.read_buffer)?;
                Ok(open)
            }) {
                Ok(open) => meter.zones.push(open),
                Err(err) => {
                    meter.log.down(&zone, &err);
                    // The first error, unless a later one is a permission
                    // error: that one says how to run the exporter.
                    let permission =
                        |err: &MeterError| matches!(err, MeterError::PermissionDenied { .. });
                    if first_error.is_none()
                        || (permission(&err) && !first_error.as_ref().is_some_and(permission))
                    {
                        first_error = Some(err);
                    }
                }
            }
        }
        match first_error {
            Some(err) if meter.zones.is_empty() => Err(err),
            _ => Ok(meter),
        }
    }

    /// A WARN for each constraint file that could not be used, once: the
    /// zone is still read, judged by its other limits or by the configured
    /// ceiling of its domain.
    fn warn_unusable_limits(&mut self, zones: &[ZoneInfo]) {
        for info in zones {
            for (path, reason) in &info.unusable_limits {
                if self.warned_limits.insert(path.clone()) {
                    tracing::warn!(
                        source = "rapl",
                        "rapl zone {}: {reason}; this power limit is not used: the zone's other \
                         limits, else the configured ceiling (--max-watts), decide which readings \
                         are impossible",
                        info.zone
                    );
                }
            }
        }
    }

    /// Use these ceilings for zones whose constraints state no limit.
    pub fn with_ceilings(mut self, ceilings: PowerCeilings) -> RaplMeter {
        self.ceilings = ceilings;
        self
    }

    fn open_zone(info: ZoneInfo) -> Result<OpenZone, MeterError> {
        let (energy_path, energy_file) = open_energy(&info.dir)?;
        let counter = EnergyCounter::new(Wrap::at(info.max_energy_range_uj));
        Ok(OpenZone {
            info,
            energy_path,
            energy_file,
            counter,
        })
    }

    /// The zones read, in order: "package-0", "core-0", …
    pub fn zones(&self) -> Vec<String> {
        self.zones
            .iter()
            .map(|zone| zone.info.zone.clone())
            .collect()
    }

    /// Re-list zones: keep the ones still there (and their counters), open new
    /// ones, drop vanished ones.
    fn rescan(&mut self) {
        self.samples_since_scan = 0;
        self.rescan_needed = false;
        let scan = match scan_zones(&self.host_sys) {
            Ok(scan) => scan,
            Err(err) => {
                tracing::warn!(
                    source = "rapl",
                    "re-listing RAPL zones failed, keeping the known ones: {err}"
                );
                return;
            }
        };
        for broken in &scan.broken {
            self.log.down(&broken.zone, &broken.reason);
        }
        self.warn_unusable_limits(&scan.zones);
        let infos = scan.zones;
        let mut kept: Vec<OpenZone> = Vec::with_capacity(infos.len());
        let mut old: Vec<Option<OpenZone>> = std::mem::take(&mut self.zones)
            .into_iter()
            .map(Some)
            .collect();
        for info in infos {
            let existing = old.iter_mut().find(|slot| {
                slot.as_ref()
                    .is_some_and(|zone| zone.info.id == info.id && zone.info.zone == info.zone)
            });
            match existing.and_then(Option::take) {
                Some(mut zone) => {
                    if zone.info.max_energy_range_uj != info.max_energy_range_uj {
                        zone.counter.set_wrap(Wrap::at(info.max_energy_range_uj));
                    }
                    zone.info = info;
                    if self.log.is_down(&zone.info.zone) {
                        // Same zone, new file (driver reloaded): the counter's
                        // history stays, a restarted counter reads as a reset.
                        match open_energy(&zone.info.dir) {
                            Ok((path, file)) => {
                                zone.energy_path = path;
                                zone.energy_file = file;
                            }
                            Err(_) => self.rescan_needed = true,
                        }
                    }
                    kept.push(zone);
                }
                None => match RaplMeter::open_zone(info.clone()) {
                    Ok(zone) => {
                        tracing::info!(source = "rapl", zone = %info.zone, id = %info.id, "RAPL zone appeared; its first reading is its baseline");
                        kept.push(zone);
                    }
                    // Tried again at the next re-listing.
                    Err(err) => self.log.down(&info.zone, &err),
                },
            }
        }
        for gone in old.into_iter().flatten() {
            self.log.down(
                &gone.info.zone,
                format!(
                    "RAPL zone {} vanished ({} is gone); the energy since its last reading cannot \
                     be read, and it is read again from a new baseline if it comes back",
                    gone.info.id,
                    gone.info.dir.display()
                ),
            );
        }
        self.zones = kept;
    }
}

impl Meter for RaplMeter {
    fn source(&self) -> &'static str {
        "rapl"
    }

    fn is_estimate(&self) -> bool {
        false
    }

    fn domains(&self) -> Vec<crate::units::Domain> {
        distinct_domains(self.zones.iter().map(|zone| zone.info.domain))
    }

    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        self.samples_since_scan += 1;
        if self.rescan_needed || self.samples_since_scan >= self.rescan_every {
            self.rescan();
        }
        let mut samples = Vec::with_capacity(self.zones.len());
        let mut first_error = None;
        for zone in &mut self.zones {
            // The time since this zone's last reading: the intervals it could
            // not be read in count, so the energy of an outage is judged
            // against the outage's maximum, not one interval's.
            let span = zone.counter.elapse(ctx.elapsed);
            let microjoules = match read_counter(zone, &mut self.read_buffer) {
                Ok(microjoules) => microjoules,
                Err(err) => {
                    // A vanished zone reads ENODEV/ENOENT; re-list next interval.
                    self.rescan_needed = true;
                    self.log.down(&zone.info.zone, &err);
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            self.log.up(&zone.info.zone);
            let max = self
                .ceilings
                .zone_max(zone.info.domain, zone.info.max_power);
            let step = zone
                .counter
                .advance(microjoules, most_units(max, span, 1e-6));
            match step {
                CounterStep::Reset { previous, current } => self.log.reject(
                    &zone.info.zone,
                    super::Rejection::CounterReset,
                    format!(
                        "energy counter {} moved backwards from {previous} to {current} µJ by more \
                         than a wrap: counted as a reset (0 J this interval)",
                        zone.energy_path.display()
                    ),
                ),
                CounterStep::Implausible { units, .. } | CounterStep::Ambiguous { units, .. } => {
                    let rejection = step.rejection().expect("a rejected step");
                    self.log.reject(
                        &zone.info.zone,
                        rejection,
                        format!(
                            "energy counter {} advanced {} J in {:.3} s ({:.0} W; the zone draws \
                             at most {:.0} W{})",
                            zone.energy_path.display(),
                            Joules::from_microjoules(units),
                            span.as_secs_f64(),
                            Joules::from_microjoules(units).0 / span.as_secs_f64(),
                            max.0,
                            if rejection == super::Rejection::AmbiguousGap {
                                ", so the counter may also have wrapped unseen"
                            } else {
                                ""
                            }
                        ),
                    );
                    continue;
                }
                CounterStep::Baseline | CounterStep::Advanced(_) | CounterStep::Wrapped(_) => {
                    self.log.accepted(&zone.info.zone)
                }
            }
            samples.push(EnergySample {
                domain: zone.info.domain,
                zone: zone.info.zone.clone(),
                joules: Joules::from_microjoules(step.units()),
            });
        }
        readings_or_error(samples, first_error)
    }

    fn health(&self) -> MeterHealth {
        self.log
            .health(self.zones.iter().map(|zone| zone.info.zone.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn sub_zones_take_their_socket_from_the_parent_and_mmio_duplicates_are_skipped() {
        let root = tempfile::tempdir().unwrap();
        let powercap = root.path().join("class/powercap");
        for (id, name) in [
            ("intel-rapl:0", "package-0"),
            ("intel-rapl:0:0", "core"),
            ("intel-rapl:0:1", "dram"),
            ("intel-rapl:1", "psys"),
            ("intel-rapl-mmio:0", "package-0"),
            ("intel-rapl:2", "package-1-die-1"),
            ("intel-rapl:2:0", "uncore"),
            ("intel-rapl:3", "something-new"),
            ("intel-rapl-mmio:1", "package-2"),
        ] {
            write(&powercap.join(id).join("name"), name);
            if id != "intel-rapl-mmio:1" {
                write(&powercap.join(id).join("energy_uj"), "0");
            }
        }
        write(&powercap.join("intel-rapl/enabled"), "1");
        let zones: Vec<(Domain, String)> = scan_zones(root.path())
            .unwrap()
            .zones
            .into_iter()
            .map(|zone| (zone.domain, zone.zone))
            .collect();
        assert_eq!(
            zones,
            vec![
                (Domain::Package, "package-0".to_string()),
                (Domain::Package, "package-1-die-1".to_string()),
                (Domain::Core, "core-0".to_string()),
                (Domain::Uncore, "uncore-1-die-1".to_string()),
                (Domain::Dram, "dram-0".to_string()),
                (Domain::Psys, "psys".to_string()),
            ]
        );
    }

    #[test]
    fn no_powercap_directory_is_absent_not_an_io_error() {
        let root = tempfile::tempdir().unwrap();
        let err = RaplMeter::open(root.path(), 1).err().unwrap();
        assert!(matches!(err, MeterError::Absent(_)), "{err}");
        std::fs::create_dir_all(root.path().join("class/powercap")).unwrap();
        let err = RaplMeter::open(root.path(), 1).err().unwrap();
        assert!(err.to_string().contains("no RAPL zones"), "{err}");
    }
}
