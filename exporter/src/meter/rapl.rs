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

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::counter::{CounterStep, EnergyCounter, Wrap};
use super::{
    EnergySample, Meter, MeterContext, MeterError, distinct_domains, parse_u64, read_trimmed,
    readings_or_error,
};
use crate::units::{Domain, Joules};

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
}

/// List the RAPL zones under `host_sys/class/powercap`.
pub fn scan_zones(host_sys: &Path) -> Result<Vec<ZoneInfo>, MeterError> {
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

    let mut names: HashMap<String, String> = HashMap::new();
    for id in &ids {
        names.insert(id.clone(), read_trimmed(&powercap.join(id).join("name"))?);
    }

    let mut zones: Vec<ZoneInfo> = Vec::new();
    let mut mmio: Vec<ZoneInfo> = Vec::new();
    for id in &ids {
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
        let max_energy_range_uj = match std::fs::read_to_string(&range_path) {
            Ok(text) => parse_u64(&range_path, &text)?,
            Err(err) if err.kind() == ErrorKind::NotFound => 0,
            Err(err) => return Err(MeterError::io(&range_path, err)),
        };
        let info = ZoneInfo {
            id: id.clone(),
            domain,
            zone,
            dir,
            max_energy_range_uj,
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
    Ok(zones)
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
            let parent = names.get(&format!("{prefix}:{parent_index}"))?;
            let domain = top_level_domain(name)?;
            let socket = parent.strip_prefix("package-").unwrap_or(parent);
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
    /// The last read failed (and was logged once); the file is re-opened at
    /// the next re-listing, since a reloaded driver leaves the old file dead.
    failed: bool,
}

/// Reads every powercap RAPL zone's `energy_uj`.
pub struct RaplMeter {
    host_sys: PathBuf,
    zones: Vec<OpenZone>,
    rescan_every: u32,
    samples_since_scan: u32,
    rescan_needed: bool,
    read_buffer: [u8; 32],
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
    /// Open every zone. Fails when there is none, or when a counter cannot be
    /// read (the permission error says how to run the exporter).
    pub fn open(host_sys: &Path, rescan_every: u32) -> Result<RaplMeter, MeterError> {
        let infos = scan_zones(host_sys)?;
        if infos.is_empty() {
            return Err(MeterError::Absent(format!(
                "no RAPL zones under {}: the CPU has no RAPL, the intel_rapl_msr module is not loaded, \
                 or this is a VM that hides it",
                host_sys.join("class/powercap").display()
            )));
        }
        let mut zones = Vec::with_capacity(infos.len());
        for info in infos {
            zones.push(RaplMeter::open_zone(info)?);
        }
        let mut meter = RaplMeter {
            host_sys: host_sys.to_path_buf(),
            zones,
            rescan_every: rescan_every.max(1),
            samples_since_scan: 0,
            rescan_needed: false,
            read_buffer: [0; 32],
        };
        // Prove every counter is readable now, not at the first interval.
        for index in 0..meter.zones.len() {
            meter.read_zone(index)?;
        }
        Ok(meter)
    }

    fn open_zone(info: ZoneInfo) -> Result<OpenZone, MeterError> {
        let (energy_path, energy_file) = open_energy(&info.dir)?;
        let counter = EnergyCounter::new(Wrap::at(info.max_energy_range_uj));
        Ok(OpenZone {
            info,
            energy_path,
            energy_file,
            counter,
            failed: false,
        })
    }

    /// The zones read, in order: "package-0", "core-0", …
    pub fn zones(&self) -> Vec<String> {
        self.zones
            .iter()
            .map(|zone| zone.info.zone.clone())
            .collect()
    }

    fn read_zone(&mut self, index: usize) -> Result<u64, MeterError> {
        let zone = &self.zones[index];
        let length = zone
            .energy_file
            .read_at(&mut self.read_buffer, 0)
            .map_err(|err| {
                if err.kind() == ErrorKind::PermissionDenied {
                    MeterError::PermissionDenied {
                        path: zone.energy_path.clone(),
                    }
                } else {
                    MeterError::io(&zone.energy_path, err)
                }
            })?;
        let text = std::str::from_utf8(&self.read_buffer[..length]).unwrap_or("");
        parse_u64(&zone.energy_path, text)
    }

    /// Re-list zones: keep the ones still there (and their counters), open new
    /// ones, drop vanished ones.
    fn rescan(&mut self) {
        self.samples_since_scan = 0;
        self.rescan_needed = false;
        let infos = match scan_zones(&self.host_sys) {
            Ok(infos) => infos,
            Err(err) => {
                tracing::warn!(
                    source = "rapl",
                    "re-listing RAPL zones failed, keeping the known ones: {err}"
                );
                return;
            }
        };
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
                    if zone.failed {
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
                    Err(err) => {
                        tracing::warn!(source = "rapl", zone = %info.zone, "RAPL zone appeared but cannot be read: {err}");
                        self.rescan_needed = true;
                    }
                },
            }
        }
        for gone in old.into_iter().flatten() {
            tracing::info!(
                source = "rapl",
                zone = %gone.info.zone,
                id = %gone.info.id,
                "RAPL zone vanished; the energy since its last reading cannot be read"
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

    fn sample(&mut self, _ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        self.samples_since_scan += 1;
        if self.rescan_needed || self.samples_since_scan >= self.rescan_every {
            self.rescan();
        }
        let mut samples = Vec::with_capacity(self.zones.len());
        let mut first_error = None;
        for index in 0..self.zones.len() {
            let reading = self.read_zone(index);
            let zone = &mut self.zones[index];
            let microjoules = match reading {
                Ok(microjoules) => microjoules,
                Err(err) => {
                    // A vanished zone reads ENODEV/ENOENT; re-list next interval.
                    self.rescan_needed = true;
                    if !zone.failed {
                        tracing::warn!(source = "rapl", zone = %zone.info.zone, "reading RAPL zone failed: {err}");
                        zone.failed = true;
                    }
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            zone.failed = false;
            let step = zone.counter.advance(microjoules);
            if let CounterStep::Reset { previous, current } = step {
                tracing::warn!(
                    source = "rapl",
                    zone = %zone.info.zone,
                    path = %zone.energy_path.display(),
                    previous_uj = previous,
                    current_uj = current,
                    "energy counter moved backwards by more than a wrap: counted as a reset (0 J this interval)"
                );
            }
            samples.push(EnergySample {
                domain: zone.info.domain,
                zone: zone.info.zone.clone(),
                joules: Joules::from_microjoules(step.units()),
            });
        }
        readings_or_error(samples, first_error)
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
