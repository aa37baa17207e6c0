//! RAPL through the perf `power` PMU (`/sys/bus/event_source/devices/power/`).
//!
//! Kernel facts this reader is built on:
//! - The PMU's `type` file gives `perf_event_attr.type`; `events/energy-pkg`
//!   holds the event's terms ("event=0x02"), which `format/<term>` maps onto
//!   `config` bits ("config:0-7"); `events/energy-pkg.scale` is joules per
//!   count (2^-32 J on most parts) and `.unit` says "Joules".
//! - RAPL counters are per package: `cpumask` names one CPU per package, and
//!   each event is opened system-wide (pid -1) on that CPU. The package number
//!   comes from that CPU's `topology/physical_package_id`.
//! - The kernel widens the 32-bit RAPL MSR into a 64-bit count, so reads only
//!   grow: no wrap handling beyond resets.
//! - Why prefer it where it opens: one `read(2)` of 8 bytes per event, no text
//!   to parse, and no root-only sysfs file (CAP_PERFMON suffices).
//! - psys is platform-wide, not per package: it is opened once, on the first
//!   CPU of the mask, so a multi-socket machine does not count it twice.
//! - One event whose sysfs description cannot be read or parsed, or that
//!   does not open on one package, is skipped with a WARN naming the file
//!   and what it held (or the event and CPU) and listed as down in
//!   [`Meter::health`]; the others are read. Down events are opened again
//!   from their description every `rescan_every` samples (as powercap zones
//!   are re-listed), from a new baseline; an event whose read fails keeps
//!   its file until then, so a count read after a transient failure covers
//!   the missed intervals. The backend is absent only when no event opens.
//! - A `type` or `cpumask` file that cannot be read or parsed makes every
//!   event unusable (neither the PMU nor the CPUs to open on are known):
//!   `detect` logs it as a WARN naming the file and what it held, never as
//!   an absent meter, and reads powercap where the interface is `auto`.
//! - The PMU states no power limit: each event's maximum is the configured
//!   ceiling of its domain (`limits.rs`); a count above it is rejected.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use perf_event_open_sys::bindings::{PERF_FLAG_FD_CLOEXEC, perf_event_attr};

use super::counter::{CounterStep, EnergyCounter, Wrap};
use super::health::{MeterHealth, ZoneLog};
use super::limits::{PowerCeilings, most_units};
use super::{
    EnergySample, Meter, MeterContext, MeterError, distinct_domains, read_trimmed,
    readings_or_error,
};
use crate::units::{Domain, Joules};

/// One event of the power PMU.
#[derive(Clone, Debug, PartialEq)]
pub struct PowerEvent {
    /// "energy-pkg".
    pub name: String,
    pub domain: Domain,
    /// `perf_event_attr.config`.
    pub config: u64,
    /// Joules per count.
    pub scale: f64,
}

/// The power PMU as sysfs describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct PowerPmu {
    pub dir: PathBuf,
    pub pmu_type: u32,
    /// One CPU per package.
    pub cpus: Vec<u32>,
    pub events: Vec<PowerEvent>,
    /// Events of a known domain whose description is unusable: (event, why).
    pub broken: Vec<(String, String)>,
}

fn event_domain(name: &str) -> Option<Domain> {
    match name {
        "energy-pkg" => Some(Domain::Package),
        "energy-cores" => Some(Domain::Core),
        // PP1, the graphics/uncore plane; powercap calls the same domain "uncore".
        "energy-gpu" => Some(Domain::Uncore),
        "energy-ram" => Some(Domain::Dram),
        "energy-psys" => Some(Domain::Psys),
        _ => None,
    }
}

/// Most CPUs a list may name: above Linux's largest `NR_CPUS` (8192), so a
/// corrupt `0-4294967295` is refused instead of allocated.
pub const MAX_CPUS: usize = 65_536;

/// Parse a CPU list as sysfs writes it: "0", "0,36", "0-3,8".
pub fn parse_cpu_list(path: &Path, text: &str) -> Result<Vec<u32>, MeterError> {
    let bad = || {
        MeterError::parse(
            path,
            "a CPU list such as \"0,36\" or \"0-3\"",
            text.as_bytes(),
        )
    };
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (
                    first.parse().map_err(|_| bad())?,
                    last.parse().map_err(|_| bad())?,
                );
                let count = (last as usize).saturating_sub(first as usize) + 1;
                if first > last || cpus.len() + count > MAX_CPUS {
                    return Err(bad());
                }
                cpus.extend(first..=last);
            }
            None => {
                if cpus.len() >= MAX_CPUS {
                    return Err(bad());
                }
                cpus.push(part.parse().map_err(|_| bad())?)
            }
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Bits of `config` a format term occupies: "config:0-7" → (0, 8 bits).
fn parse_format(path: &Path, text: &str) -> Result<(u32, u32), MeterError> {
    let bad = || {
        MeterError::parse(
            path,
            "a perf format such as \"config:0-7\"",
            text.as_bytes(),
        )
    };
    let bits = text.trim().strip_prefix("config:").ok_or_else(bad)?;
    let (low, high) = match bits.split_once('-') {
        Some((low, high)) => (
            low.parse::<u32>().map_err(|_| bad())?,
            high.parse::<u32>().map_err(|_| bad())?,
        ),
        None => {
            let bit = bits.parse::<u32>().map_err(|_| bad())?;
            (bit, bit)
        }
    };
    if low > high || high > 63 {
        return Err(bad());
    }
    Ok((low, high - low + 1))
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Turn an event's terms ("event=0x02,umask=0x1") into `config`.
fn parse_event_config(pmu_dir: &Path, event_path: &Path, terms: &str) -> Result<u64, MeterError> {
    let bad = |expected: &'static str| MeterError::parse(event_path, expected, terms.as_bytes());
    let mut config = 0u64;
    if terms.trim().is_empty() {
        return Err(bad("terms such as \"event=0x02\""));
    }
    for term in terms.trim().split(',').filter(|term| !term.is_empty()) {
        let (key, value) = term
            .split_once('=')
            .ok_or_else(|| bad("terms such as \"event=0x02\""))?;
        let value = parse_number(value.trim()).ok_or_else(|| bad("numeric term values"))?;
        let format_path = pmu_dir.join("format").join(key.trim());
        let (shift, width) = match std::fs::read_to_string(&format_path) {
            Ok(text) => parse_format(&format_path, &text)?,
            // The power PMU has always put `event` in config bits 0-7.
            Err(_) if key.trim() == "event" => (0, 8),
            Err(err) => return Err(MeterError::io(&format_path, err)),
        };
        let mask = if width == 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        if value & !mask != 0 {
            return Err(bad("term values that fit their format's bits"));
        }
        config |= value << shift;
    }
    Ok(config)
}

/// Read the power PMU's description under `host_sys`.
pub fn parse_power_pmu(host_sys: &Path) -> Result<PowerPmu, MeterError> {
    let dir = host_sys.join("bus/event_source/devices/power");
    if !dir.exists() {
        return Err(MeterError::Absent(format!(
            "no perf power PMU at {}: the CPU has no RAPL or the kernel lacks its perf driver",
            dir.display()
        )));
    }
    let type_path = dir.join("type");
    let type_text = read_trimmed(&type_path)?;
    let pmu_type = type_text
        .parse::<u32>()
        .map_err(|_| MeterError::parse(&type_path, "a PMU type number", type_text.as_bytes()))?;
    let cpumask_path = dir.join("cpumask");
    let cpus = parse_cpu_list(&cpumask_path, &read_trimmed(&cpumask_path)?)?;

    let events_dir = dir.join("events");
    let mut names: Vec<String> = std::fs::read_dir(&events_dir)
        .map_err(|err| MeterError::io(&events_dir, err))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !name.contains('.'))
        .collect();
    names.sort();
    let mut events = Vec::new();
    let mut broken = Vec::new();
    let mut first_error = None;
    for name in names {
        let Some(domain) = event_domain(&name) else {
            tracing::debug!(event = %name, "power PMU event of unknown kind, not read");
            continue;
        };
        match parse_event(&dir, &events_dir, &name, domain) {
            Ok(event) => events.push(event),
            Err(err) => {
                broken.push((name, err.to_string()));
                first_error.get_or_insert(err);
            }
        }
    }
    if events.is_empty()
        && let Some(err) = first_error
    {
        return Err(err);
    }
    if events.is_empty() {
        return Err(MeterError::Absent(format!(
            "the perf power PMU at {} lists no energy events",
            dir.display()
        )));
    }
    Ok(PowerPmu {
        dir,
        pmu_type,
        cpus,
        events,
        broken,
    })
}

/// One event's code, scale and unit from `events/<name>{,.scale,.unit}`.
fn parse_event(
    pmu_dir: &Path,
    events_dir: &Path,
    name: &str,
    domain: Domain,
) -> Result<PowerEvent, MeterError> {
    let event_path = events_dir.join(name);
    let config = parse_event_config(pmu_dir, &event_path, &read_trimmed(&event_path)?)?;
    let scale_path = events_dir.join(format!("{name}.scale"));
    let scale_text = read_trimmed(&scale_path)?;
    // RAPL energy units are 2^-ESU J (2^-14 to 2^-32 in practice): more
    // than a joule per count is no energy unit.
    let scale = scale_text
        .parse::<f64>()
        .ok()
        .filter(|scale| scale.is_finite() && *scale > 0.0 && *scale <= 1.0)
        .ok_or_else(|| {
            MeterError::parse(
                &scale_path,
                "a positive number of joules per count, at most 1",
                scale_text.as_bytes(),
            )
        })?;
    let unit_path = events_dir.join(format!("{name}.unit"));
    let unit = read_trimmed(&unit_path)?;
    if unit != "Joules" {
        return Err(MeterError::parse(
            &unit_path,
            "the unit \"Joules\"",
            unit.as_bytes(),
        ));
    }
    Ok(PowerEvent {
        name: name.to_string(),
        domain,
        config,
        scale,
    })
}

/// The package a CPU belongs to, from sysfs topology; `fallback` where absent.
fn package_of(host_sys: &Path, cpu: u32, fallback: u32) -> u32 {
    let path = host_sys.join(format!(
        "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
    ));
    read_trimmed(&path)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(fallback)
}

/// Open one counting event system-wide on `cpu`.
pub fn open_event(pmu_type: u32, event: &PowerEvent, cpu: u32) -> Result<File, MeterError> {
    // SAFETY: perf_event_attr is plain data; all-zero is its documented default.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = pmu_type;
    attr.size = std::mem::size_of::<perf_event_attr>() as u32;
    attr.config = event.config;
    // SAFETY: attr is initialised and outlives the call; pid -1 with a CPU
    // counts every task on that CPU, as the power PMU requires.
    let fd = unsafe {
        perf_event_open_sys::perf_event_open(
            &mut attr,
            -1,
            cpu as i32,
            -1,
            PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(MeterError::PerfOpen {
            event: event.name.clone(),
            pmu_type,
            config: event.config,
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just returned this descriptor to us; we own it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// One event on one package's CPU: open and read, or down and retried.
struct EventSlot {
    /// "energy-pkg".
    name: String,
    domain: Domain,
    zone: String,
    cpu: u32,
    /// Joules per count, from the description the event was opened with.
    scale: f64,
    /// `None` while the event's description cannot be parsed or the event
    /// does not open: retried at the next retry round.
    file: Option<File>,
    /// The last read of `file` failed: the next reads try the same file (a
    /// count read after a transient failure covers the missed intervals),
    /// and the next retry round opens the event afresh.
    failing: bool,
    counter: EnergyCounter,
}

/// Reads RAPL counters through perf events, one per package and domain.
pub struct PerfPowerMeter {
    pmu_dir: PathBuf,
    pmu_type: u32,
    slots: Vec<EventSlot>,
    log: ZoneLog,
    ceilings: PowerCeilings,
    /// Down events are opened again every this many samples.
    retry_every: u32,
    samples_since_retry: u32,
}

impl PerfPowerMeter {
    /// Parse the PMU under `host_sys` and open its events on the CPUs of its
    /// cpumask. Events that cannot be parsed or opened are logged, listed
    /// as down and tried again every [`PerfPowerMeter::with_rescan_every`]
    /// samples; the backend is absent when none opens (the error is the
    /// first event's).
    pub fn open(host_sys: &Path) -> Result<PerfPowerMeter, MeterError> {
        let pmu = parse_power_pmu(host_sys)?;
        let mut log = ZoneLog::new("rapl-perf");
        let mut first_error = None;
        let mut slots = Vec::new();
        for (position, &cpu) in pmu.cpus.iter().enumerate() {
            let package = package_of(host_sys, cpu, position as u32);
            let zone_of = |domain: Domain| match domain {
                Domain::Psys if position > 0 => None,
                Domain::Psys => Some("psys".to_string()),
                domain => Some(format!("{}-{package}", domain.as_str())),
            };
            for (name, reason) in &pmu.broken {
                let Some(domain) = event_domain(name) else {
                    continue;
                };
                if let Some(zone) = zone_of(domain) {
                    log.down(&zone, reason);
                    slots.push(EventSlot {
                        name: name.clone(),
                        domain,
                        zone,
                        cpu,
                        scale: 0.0,
                        file: None,
                        failing: false,
                        counter: EnergyCounter::new(Wrap::Never),
                    });
                }
            }
            for event in &pmu.events {
                let Some(zone) = zone_of(event.domain) else {
                    continue;
                };
                let file = match open_event(pmu.pmu_type, event, cpu) {
                    Ok(file) => Some(file),
                    Err(err) => {
                        log.down(&zone, &err);
                        first_error.get_or_insert(err);
                        None
                    }
                };
                slots.push(EventSlot {
                    name: event.name.clone(),
                    domain: event.domain,
                    zone,
                    cpu,
                    scale: event.scale,
                    file,
                    failing: false,
                    counter: EnergyCounter::new(Wrap::Never),
                });
            }
        }
        if slots.iter().all(|slot| slot.file.is_none())
            && let Some(err) = first_error
        {
            return Err(err);
        }
        slots.sort_by(|a, b| (a.domain, &a.zone).cmp(&(b.domain, &b.zone)));
        Ok(PerfPowerMeter {
            pmu_dir: pmu.dir,
            pmu_type: pmu.pmu_type,
            slots,
            log,
            ceilings: PowerCeilings::default(),
            retry_every: super::rapl::DEFAULT_RESCAN_EVERY,
            samples_since_retry: 0,
        })
    }

    /// Use these ceilings as the events' maximum power.
    pub fn with_ceilings(mut self, ceilings: PowerCeilings) -> PerfPowerMeter {
        self.ceilings = ceilings;
        self
    }

    /// Open down events again every `samples` samples (the powercap meter's
    /// re-listing period, `MeterConfig::rescan_every`).
    pub fn with_rescan_every(mut self, samples: u32) -> PerfPowerMeter {
        self.retry_every = samples.max(1);
        self
    }

    /// The zones read, in order: "package-0", "dram-0", …
    pub fn zones(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|slot| slot.file.is_some())
            .map(|slot| slot.zone.clone())
            .collect()
    }

    /// Open every down event again from its sysfs description, as the
    /// powercap meter re-lists its zones: a description fixed or an event
    /// the kernel now accepts is read from a new baseline (a new perf event
    /// counts from zero).
    fn retry_down_events(&mut self) {
        let events_dir = self.pmu_dir.join("events");
        for slot in &mut self.slots {
            if slot.file.is_some() && !slot.failing {
                continue;
            }
            let opened = parse_event(&self.pmu_dir, &events_dir, &slot.name, slot.domain)
                .and_then(|event| Ok((open_event(self.pmu_type, &event, slot.cpu)?, event)));
            match opened {
                Ok((file, event)) => {
                    tracing::info!(
                        source = "rapl-perf",
                        zone = %slot.zone,
                        event = %slot.name,
                        "perf power event opened again; its first reading is its baseline"
                    );
                    slot.file = Some(file);
                    slot.scale = event.scale;
                    slot.failing = false;
                    slot.counter = EnergyCounter::new(Wrap::Never);
                }
                // A file whose reads fail keeps its reason; one that never
                // opened says why it still does not.
                Err(err) if slot.file.is_none() => self.log.down(&slot.zone, &err),
                Err(err) => tracing::debug!(
                    source = "rapl-perf",
                    zone = %slot.zone,
                    "re-opening a perf power event whose reads fail failed too: {err}"
                ),
            }
        }
    }
}

impl Meter for PerfPowerMeter {
    fn source(&self) -> &'static str {
        "rapl-perf"
    }

    fn is_estimate(&self) -> bool {
        false
    }

    fn domains(&self) -> Vec<Domain> {
        distinct_domains(
            self.slots
                .iter()
                .filter(|slot| slot.file.is_some())
                .map(|slot| slot.domain),
        )
    }

    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        self.samples_since_retry += 1;
        if self.samples_since_retry >= self.retry_every {
            self.samples_since_retry = 0;
            if self
                .slots
                .iter()
                .any(|slot| slot.file.is_none() || slot.failing)
            {
                self.retry_down_events();
            }
        }
        let mut samples = Vec::with_capacity(self.slots.len());
        let mut first_error = None;
        for event in &mut self.slots {
            // The time since this event's last reading: intervals whose read
            // failed count, so the count read after them is judged against
            // their whole maximum, not one interval's.
            let span = event.counter.elapse(ctx.elapsed);
            let Some(file) = event.file.as_mut() else {
                continue;
            };
            let mut count = [0u8; 8];
            if let Err(err) = file.read_exact(&mut count) {
                let err = MeterError::Read {
                    what: format!("perf power event {} for {}", event.name, event.zone),
                    source: err,
                };
                event.failing = true;
                self.log.down(&event.zone, &err);
                first_error.get_or_insert(err);
                continue;
            }
            event.failing = false;
            self.log.up(&event.zone);
            let max = self.ceilings.get(event.domain);
            let step = event.counter.advance(
                u64::from_ne_bytes(count),
                most_units(max, span, event.scale),
            );
            if let Some(rejection) = step.rejection() {
                let detail = match step {
                    CounterStep::Implausible { units, .. }
                    | CounterStep::Ambiguous { units, .. } => {
                        format!(
                            "perf energy count advanced {:.1} J in {:.3} s; the zone draws at most \
                             {:.0} W (--max-watts {}=…)",
                            units as f64 * event.scale,
                            span.as_secs_f64(),
                            max.0,
                            event.domain.as_str()
                        )
                    }
                    _ => {
                        "perf energy count moved backwards: counted as a reset (0 J this interval)"
                            .to_string()
                    }
                };
                self.log.reject(&event.zone, rejection, detail);
                if !matches!(step, CounterStep::Reset { .. }) {
                    continue;
                }
            } else {
                self.log.accepted(&event.zone);
            }
            samples.push(EnergySample {
                domain: event.domain,
                zone: event.zone.clone(),
                joules: Joules(step.units() as f64 * event.scale),
            });
        }
        readings_or_error(samples, first_error)
    }

    fn health(&self) -> MeterHealth {
        self.log.health(
            self.slots
                .iter()
                .filter(|slot| slot.file.is_some())
                .map(|slot| slot.zone.as_str()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Nanos;

    /// A perf event whose reads fail for five intervals (here: a
    /// non-blocking pipe with nothing in it) and then read again on the same
    /// file: the count covers six intervals and is judged over all six, so
    /// the outage's energy is counted, not rejected as above the ceiling.
    #[test]
    fn a_count_read_after_failed_reads_is_judged_over_the_whole_span() {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which the Files below own.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        let (reader, mut writer) =
            unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let root = tempfile::tempdir().unwrap();
        let mut meter = PerfPowerMeter {
            pmu_dir: root.path().to_path_buf(),
            pmu_type: 0,
            slots: vec![EventSlot {
                name: "energy-pkg".to_string(),
                domain: Domain::Package,
                zone: "package-0".to_string(),
                cpu: 0,
                // One µJ per count.
                scale: 1e-6,
                file: Some(reader),
                failing: false,
                counter: EnergyCounter::new(Wrap::Never),
            }],
            log: ZoneLog::new("rapl-perf"),
            ceilings: PowerCeilings::default(),
            retry_every: 1000,
            samples_since_retry: 0,
        };
        let ctx = MeterContext {
            elapsed: Nanos(1_000_000_000),
            cpu_utilisation: None,
            cpus: 1,
        };
        writer.write_all(&1_000_000u64.to_ne_bytes()).unwrap();
        assert_eq!(meter.sample(&ctx).unwrap()[0].joules, Joules(0.0));
        for _ in 0..5 {
            assert!(meter.sample(&ctx).is_err(), "nothing to read");
            assert!(meter.health().down().any(|zone| zone.zone == "package-0"));
        }
        // 900 W for six seconds: above one interval's 1000 J, within six.
        writer
            .write_all(&(1_000_000u64 + 5_400_000_000).to_ne_bytes())
            .unwrap();
        let samples = meter.sample(&ctx).unwrap();
        assert_eq!(samples.len(), 1, "{:?}", meter.health());
        assert!((samples[0].joules.0 - 5400.0).abs() < 1e-6, "{samples:?}");
        assert!(meter.health().rejected.is_empty());
        assert!(meter.health().down().next().is_none());
    }

    /// Found writing the `perf_power` fuzz target: a cpumask of
    /// `0-4294967295` asked for a 16 GiB list.
    #[test]
    fn cpu_lists_longer_than_any_machine_are_refused() {
        let path = Path::new("cpumask");
        let Err(err) = parse_cpu_list(path, "0-100000000") else {
            panic!("a list of 100 million CPUs was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains("cpumask") && err.contains("0-100000000"),
            "{err}"
        );
        assert!(parse_cpu_list(path, "0-3,5-4294967295").is_err());
        assert_eq!(parse_cpu_list(path, "0-8191").unwrap().len(), 8192);
    }

    #[test]
    fn cpu_lists_parse_ranges_and_commas() {
        let path = Path::new("cpumask");
        assert_eq!(parse_cpu_list(path, "0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list(path, "0,36\n").unwrap(), vec![0, 36]);
        assert_eq!(parse_cpu_list(path, "0-2,8").unwrap(), vec![0, 1, 2, 8]);
        assert!(parse_cpu_list(path, "").is_err());
        assert!(parse_cpu_list(path, "3-1").is_err());
        assert!(
            parse_cpu_list(path, "x")
                .unwrap_err()
                .to_string()
                .contains("cpumask")
        );
    }

    #[test]
    fn formats_give_bit_positions() {
        let path = Path::new("format/event");
        assert_eq!(parse_format(path, "config:0-7\n").unwrap(), (0, 8));
        assert_eq!(parse_format(path, "config:8").unwrap(), (8, 1));
        assert!(parse_format(path, "config1:0-7").is_err());
        assert!(parse_format(path, "config:7-0").is_err());
    }
}
