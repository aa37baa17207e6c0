//! Energy meters: every source of joules behind one trait.
//!
//! Shaped like node_exporter's collectors: one file per backend, each found
//! at start by [`detect`], each forced or disabled by one setting of
//! [`MeterConfig`]:
//!
//! | file            | `source` label | measures                                        |
//! |-----------------|----------------|-------------------------------------------------|
//! | `rapl.rs`       | `rapl`         | powercap sysfs RAPL zones (Intel, AMD)          |
//! | `perf_power.rs` | `rapl-perf`    | the same RAPL counters through the perf `power` PMU |
//! | `nvml.rs`       | `nvml`         | NVIDIA GPUs (energy counter or power × time)    |
//! | `hwmon.rs`      | `hwmon`        | platform power meters (ACPI power meter)        |
//! | `model.rs`      | `model`        | an estimate from CPU utilisation, where nothing measures |
//!
//! Decisions:
//! - A meter reports energy *since its previous sample* per zone (a socket's
//!   package, a GPU…). Cumulative counters and their wrap-around are handled
//!   inside the meter ([`counter`]), so the caller only ever adds joules.
//!   The first sample of a meter is a baseline and reports zero joules.
//! - Domains overlap by nature (a package contains its cores and uncore; psys
//!   contains the packages and DRAM). A meter reports each domain it sees;
//!   callers add joules within a domain, never across domains.
//! - Only one RAPL interface is read at a time (both read the same hardware
//!   counters; reading both would count every joule twice).
//! - Every path is under a configurable root (`host_sys`, `host_proc`), so
//!   tests point meters at temporary trees and the DaemonSet at `/host/sys`.
//! - A missing backend is never an error: [`detect`] logs one line per
//!   backend saying what it found or why not, and the exporter carries on
//!   with what exists (falling back to the model for the CPUs).
//! - A broken *zone* never costs the meter: a zone (RAPL zone, perf event,
//!   hwmon sensor, GPU) whose files cannot be read or parsed is skipped with
//!   a WARN naming the file and what it held, the other zones are read, and
//!   [`Meter::health`] lists it as down with the reason ([`health`]).
//! - No impossible reading is counted: a reading implying more power than
//!   the zone can draw ([`limits`]) is rejected and counted, never added;
//!   counter gaps are decided with the elapsed time ([`counter`]).

pub mod counter;
pub mod health;
pub mod hwmon;
pub mod limits;
pub mod model;
pub mod nvml;
pub mod perf_power;
pub mod rapl;

use std::path::{Path, PathBuf};

use crate::units::{Domain, Joules, Nanos, Watts};

pub use health::{MeterHealth, Rejection, ZoneHealth};
pub use limits::PowerCeilings;
pub use model::{ModelCoefficients, ModelMeter, OnlineFit};

/// What the caller knows about the interval being sampled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeterContext {
    /// Time since the previous sample (meters that integrate power use it).
    pub elapsed: Nanos,
    /// Busy fraction of all CPUs over this interval, 0..=1, from the probe.
    pub cpu_utilisation: Option<f64>,
    /// Online CPUs (vCPUs on a VM).
    pub cpus: u32,
}

/// Energy one zone used since the previous sample of the same meter.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergySample {
    pub domain: Domain,
    /// Which instance of the domain: "package-0", "dram-1", "psys", "gpu-0".
    pub zone: String,
    /// Energy since the previous sample, >= 0; zero on the first sample.
    pub joules: Joules,
}

/// One process's use of a GPU over the last interval, for attribution by
/// pid → cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuProcessSample {
    pub pid: u32,
    /// The GPU ("gpu-0") or MIG instance ("gpu-0-mig-1") the process runs on.
    pub zone: String,
    /// SM utilisation averaged over the interval's samples, 0..=100. Zero when
    /// the driver reported the process running but gave no sample for it.
    pub utilisation_percent: f64,
}

/// A source of energy readings.
pub trait Meter: Send {
    /// The metrics' `source` label: "rapl", "rapl-perf", "nvml", "model", "hwmon".
    fn source(&self) -> &'static str;
    /// True only for estimates (the model), so nobody mistakes one for a measurement.
    fn is_estimate(&self) -> bool;
    /// The domains this meter reports.
    fn domains(&self) -> Vec<Domain>;
    /// Energy per zone since the previous call.
    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError>;
    /// GPU processes seen since the previous call (GPU meters only).
    fn gpu_processes(&mut self) -> Vec<GpuProcessSample> {
        Vec::new()
    }
    /// The idle power this meter assumes (the model's idle term).
    fn idle_power(&self) -> Option<Watts> {
        None
    }
    /// Which zones were read at the last sample, which not and why, and the
    /// readings rejected so far.
    fn health(&self) -> MeterHealth {
        MeterHealth::default()
    }
}

/// Why a meter could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error(
        "permission denied reading {}: RAPL energy counters (energy_uj) have been readable only by root since \
         Linux 5.10 (PLATYPUS, CVE-2020-8694); run the exporter as root: in Kubernetes with \
         securityContext runAsUser: 0 and privileged: true (the DaemonSet's default), on a host with sudo",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
    /// `found` is what the file held, escaped and truncated ([`shown`]).
    #[error("{}: expected {expected}, found \"{found}\"", path.display())]
    Parse {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    /// The backend does not exist on this host; the text says what is missing.
    #[error("{0}")]
    Absent(String),
    /// The backend exists but none of its zones can be used; the text is the
    /// first zone's problem.
    #[error("no zone can be read: {0}")]
    NoZoneReadable(String),
    #[error(
        "perf_event_open of power/{event} (PMU type {pmu_type}, config {config:#x}) on CPU {cpu} failed: {source}; \
         this kernel or CPU offers no usable RAPL perf PMU (it needs a CPU with RAPL, the kernel's \
         power PMU and CAP_PERFMON or perf_event_paranoid <= 0); use the powercap interface or the model"
    )]
    PerfOpen {
        event: String,
        pmu_type: u32,
        config: u64,
        cpu: u32,
        source: std::io::Error,
    },
    #[error("NVML: {0}")]
    Nvml(String),
    #[error("the model needs this interval's CPU utilisation from the probe, and none was given")]
    NoUtilisation,
    #[error("coefficients file {}: {message}", path.display())]
    Coefficients { path: PathBuf, message: String },
}

impl MeterError {
    /// `path` held `raw`, which is not `expected`.
    pub(crate) fn parse(path: &Path, expected: &'static str, raw: &[u8]) -> MeterError {
        MeterError::Parse {
            path: path.to_path_buf(),
            expected,
            found: shown(raw),
        }
    }

    /// An I/O error on `path`.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> MeterError {
        MeterError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// At most this many bytes of a file's content go into a message.
const SHOWN_BYTES: usize = 40;

/// A file's content for a log line or an error: bytes that are not printable
/// ASCII escaped (`\xff`, `\n`), at most [`SHOWN_BYTES`] of them, the rest
/// counted. Sysfs and driver files are host input: a message must not carry
/// a terminal escape or a megabyte.
pub fn shown(raw: &[u8]) -> String {
    let head = &raw[..raw.len().min(SHOWN_BYTES)];
    let mut text = head.escape_ascii().to_string();
    if raw.len() > head.len() {
        text.push_str(&format!("… ({} bytes)", raw.len()));
    }
    text
}

/// Read a small sysfs/procfs file as UTF-8 text and trim it.
pub(crate) fn read_trimmed(path: &Path) -> Result<String, MeterError> {
    let raw = std::fs::read(path).map_err(|err| MeterError::io(path, err))?;
    match std::str::from_utf8(&raw) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(_) => Err(MeterError::parse(path, "UTF-8 text", &raw)),
    }
}

/// Parse a decimal unsigned integer as sysfs writes it (surrounding
/// whitespace allowed).
pub(crate) fn parse_u64(path: &Path, raw: &[u8]) -> Result<u64, MeterError> {
    std::str::from_utf8(raw.trim_ascii())
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| MeterError::parse(path, "a decimal unsigned integer", raw))
}

/// Read and parse a file holding one decimal unsigned integer.
pub(crate) fn read_u64(path: &Path) -> Result<u64, MeterError> {
    let raw = std::fs::read(path).map_err(|err| MeterError::io(path, err))?;
    parse_u64(path, &raw)
}

/// Which RAPL interface to read.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RaplInterface {
    /// The perf `power` PMU where it opens (one read per package and domain,
    /// no file parsing), else powercap sysfs.
    #[default]
    Auto,
    Perf,
    Powercap,
    Off,
}

/// Whether to estimate CPU energy with the model.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelChoice {
    /// Only where no RAPL meter measures the CPUs.
    #[default]
    Auto,
    Off,
    /// Always, beside any real meter (to compare, or to export both).
    Always,
}

/// Everything [`detect`] needs; the CLI, YAML file and environment map onto it.
#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// The host's /sys (`/host/sys` in the DaemonSet).
    pub host_sys: PathBuf,
    /// The host's /proc: `cpuinfo` picks the model's coefficients.
    pub host_proc: PathBuf,
    pub rapl: RaplInterface,
    pub nvml: bool,
    /// Where libnvidia-ml lives; default: the loader's search for `libnvidia-ml.so.1`.
    pub nvml_library: Option<PathBuf>,
    pub model: ModelChoice,
    /// Replace the bundled table's coefficients (from configuration or a fit file).
    pub model_overrides: Option<ModelCoefficients>,
    pub hwmon: bool,
    /// hwmon chip names (`name` file) read as platform meters; see `hwmon.rs`.
    pub hwmon_chips: Vec<String>,
    /// Re-list powercap zones every this many samples (zones also get re-listed
    /// whenever a read fails), so zones that appear or vanish need no restart.
    pub rescan_every: u32,
    /// The most power per zone of each domain where the device states no
    /// limit; readings above a zone's maximum are rejected (see `limits.rs`).
    pub max_watts: PowerCeilings,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            host_sys: PathBuf::from("/sys"),
            host_proc: PathBuf::from("/proc"),
            rapl: RaplInterface::Auto,
            nvml: true,
            nvml_library: None,
            model: ModelChoice::Auto,
            model_overrides: None,
            hwmon: true,
            hwmon_chips: hwmon::DEFAULT_PLATFORM_CHIPS
                .iter()
                .map(|name| name.to_string())
                .collect(),
            rescan_every: rapl::DEFAULT_RESCAN_EVERY,
            max_watts: PowerCeilings::default(),
        }
    }
}

/// Find every configured meter that exists on this host. Logs one line per
/// backend: found (with its domains) or absent (and why).
pub fn detect(config: &MeterConfig) -> Vec<Box<dyn Meter>> {
    let mut meters: Vec<Box<dyn Meter>> = Vec::new();

    let rapl_meter = detect_rapl(config);
    let cpus_measured = rapl_meter.is_some();
    meters.extend(rapl_meter);

    if config.nvml {
        match nvml::NvmlMeter::open(config.nvml_library.as_deref()) {
            Ok(meter) => {
                tracing::info!(
                    source = "nvml",
                    gpus = meter.device_count(),
                    "meter found: NVIDIA GPUs through NVML"
                );
                meters.push(Box::new(meter.with_ceilings(config.max_watts.clone())));
            }
            Err(reason) => tracing::info!(source = "nvml", "meter absent: {reason}"),
        }
    } else {
        tracing::info!(source = "nvml", "meter disabled by configuration");
    }

    if config.hwmon {
        match hwmon::HwmonMeter::open(&config.host_sys, &config.hwmon_chips) {
            Ok(meter) => {
                tracing::info!(source = "hwmon", sensors = ?meter.zones(), "meter found: hwmon platform power sensors");
                meters.push(Box::new(meter.with_ceilings(config.max_watts.clone())));
            }
            Err(reason @ MeterError::Absent(_)) => {
                tracing::info!(source = "hwmon", "meter absent: {reason}")
            }
            Err(reason) => tracing::warn!(
                source = "hwmon",
                "meter unusable, no sensor could be read: {reason}"
            ),
        }
    } else {
        tracing::info!(source = "hwmon", "meter disabled by configuration");
    }

    let use_model = match config.model {
        ModelChoice::Off => {
            tracing::info!(source = "model", "meter disabled by configuration");
            false
        }
        ModelChoice::Always => true,
        ModelChoice::Auto if cpus_measured => {
            tracing::info!(source = "model", "meter not used: RAPL measures the CPUs");
            false
        }
        ModelChoice::Auto => true,
    };
    if use_model {
        let meter = ModelMeter::for_host(&config.host_proc, config.model_overrides.clone());
        tracing::info!(
            source = "model",
            cpus = meter.cpus(),
            idle_watts_per_cpu = meter.coefficients().idle_watts_per_cpu.0,
            max_watts_per_cpu = meter.coefficients().max_watts_per_cpu.0,
            coefficients = %meter.coefficients().origin,
            "meter found: CPU power model (an estimate, exported with source=\"model\")"
        );
        meters.push(Box::new(meter));
    }
    meters
}

/// Pick the RAPL interface: perf where it opens (cheaper to read), else
/// powercap, or what the configuration forces.
fn detect_rapl(config: &MeterConfig) -> Option<Box<dyn Meter>> {
    let open_perf = || match perf_power::PerfPowerMeter::open(&config.host_sys) {
        Ok(meter) => Some(
            meter
                .with_ceilings(config.max_watts.clone())
                .with_rescan_every(config.rescan_every),
        ),
        // No PMU, or a kernel/CPU that opens none of its events: not here.
        Err(reason @ (MeterError::Absent(_) | MeterError::PerfOpen { .. })) => {
            tracing::info!(source = "rapl-perf", "meter absent: {reason}");
            None
        }
        // A PMU whose `type`, `cpumask` or every event's description cannot
        // be read or parsed: there, but broken; the error names the file.
        Err(reason) => {
            tracing::warn!(
                source = "rapl-perf",
                "meter unusable, no event could be opened: {reason}"
            );
            None
        }
    };
    let open_powercap = || match rapl::RaplMeter::open(&config.host_sys, config.rescan_every) {
        Ok(meter) => Some(meter.with_ceilings(config.max_watts.clone())),
        Err(reason @ MeterError::Absent(_)) => {
            tracing::info!(source = "rapl", "meter absent: {reason}");
            None
        }
        Err(reason) => {
            tracing::warn!(
                source = "rapl",
                "meter unusable, no zone could be read: {reason}"
            );
            None
        }
    };
    let found_perf = |meter: perf_power::PerfPowerMeter| -> Box<dyn Meter> {
        tracing::info!(source = "rapl-perf", domains = ?meter.domains(), zones = ?meter.zones(), "meter found: RAPL through the perf power PMU");
        Box::new(meter)
    };
    let found_powercap = |meter: rapl::RaplMeter| -> Box<dyn Meter> {
        tracing::info!(source = "rapl", domains = ?meter.domains(), zones = ?meter.zones(), "meter found: RAPL through powercap sysfs");
        Box::new(meter)
    };
    match config.rapl {
        RaplInterface::Off => {
            tracing::info!(source = "rapl", "meter disabled by configuration");
            None
        }
        RaplInterface::Perf => open_perf().map(found_perf),
        RaplInterface::Powercap => open_powercap().map(found_powercap),
        RaplInterface::Auto => {
            let perf = open_perf();
            let powercap_domains = rapl::scan_zones(&config.host_sys)
                .ok()
                .filter(|scan| !scan.zones.is_empty())
                .map(|scan| distinct_domains(scan.zones.iter().map(|zone| zone.domain)));
            match (perf, powercap_domains) {
                (Some(perf), Some(powercap_domains)) => {
                    let perf_domains = perf.domains();
                    if perf_domains != powercap_domains {
                        tracing::warn!(
                            perf = ?perf_domains,
                            powercap = ?powercap_domains,
                            "the perf power PMU and powercap sysfs disagree on which RAPL domains exist; \
                             reading perf (set the RAPL interface to powercap to read the other)"
                        );
                    }
                    Some(found_perf(perf))
                }
                (Some(perf), None) => Some(found_perf(perf)),
                (None, _) => open_powercap().map(found_powercap),
            }
        }
    }
}

/// What a meter with several zones returns: the zones it could read, and an
/// error only when it read none (the caller then marks the meter down). Each
/// zone's failure is logged by the meter itself.
pub(crate) fn readings_or_error(
    samples: Vec<EnergySample>,
    first_error: Option<MeterError>,
) -> Result<Vec<EnergySample>, MeterError> {
    match first_error {
        Some(err) if samples.is_empty() => Err(err),
        _ => Ok(samples),
    }
}

/// Sorted, de-duplicated domains of a set of zones.
pub(crate) fn distinct_domains(domains: impl IntoIterator<Item = Domain>) -> Vec<Domain> {
    let mut domains: Vec<Domain> = domains.into_iter().collect();
    domains.sort();
    domains.dedup();
    domains
}
