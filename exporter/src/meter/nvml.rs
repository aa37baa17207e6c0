//! NVIDIA GPUs through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1`
//! at run time, so the exporter runs on machines without a driver).
//!
//! Decisions:
//! - Energy per physical GPU from `nvmlDeviceGetTotalEnergyConsumption`
//!   (mJ since the driver loaded; Volta and newer). Where that call is not
//!   supported, power (`nvmlDeviceGetPowerUsage`, mW) × the interval's length.
//!   The counter is 64-bit: a backwards move is a driver reload, counted as a
//!   reset.
//! - MIG: NVML measures energy per physical GPU only, so energy zones are
//!   "gpu-N"; MIG instances are listed (zones "gpu-N-mig-G", G the GPU
//!   instance id) and a process running in one carries that zone, so
//!   attribution can tell instances apart. nvml-wrapper 0.11 has no MIG
//!   enumeration, so those three calls go through `nvml-wrapper-sys`'s
//!   bindings on the same library.
//! - Attribution data: the running compute processes (pids) and per-process
//!   SM utilisation samples since the previous call (NVML keeps a short ring
//!   buffer per GPU; the first call takes whatever it holds). NVML answers
//!   `NOT_FOUND` when no sample is newer than the timestamp: that is "no
//!   samples", not an error.
//! - Failures are per device: a lost GPU (`GPU_IS_LOST`) or an unsupported
//!   call makes that device report nothing for the interval, logged once per
//!   device and call until it works again; the other GPUs carry on. On a
//!   counter-capable GPU the counter keeps counting meanwhile, and its first
//!   reading after the device comes back covers the missed intervals: that
//!   step is judged against the GPU's maximum over the whole time since its
//!   last reading (`counter.rs`), so the outage's energy is counted, unless
//!   the driver restarted the counter (a reset: that energy is unknown and
//!   counted as a rejected reading). A power-only GPU has no reading for
//!   the missed intervals: their energy is unknown, and the GPU shows as
//!   down for them.
//! - Each GPU's maximum power is its enforced power limit
//!   (`nvmlDeviceGetEnforcedPowerLimit`) × the headroom factor of
//!   `limits.rs`, else the `gpu` ceiling: a counter step or power reading
//!   above it is rejected and counted, never added. A GPU that reports
//!   nothing is listed as down in [`Meter::health`] with the failing call
//!   and error.
//! - No library, no driver or no GPU: `open` fails with the reason and
//!   `detect` logs it as one info line; it is never an error for the exporter.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings::{
    NVML_DEVICE_MIG_ENABLE, NvmlLib, nvmlDevice_t, nvmlReturn_enum_NVML_SUCCESS,
};

use super::counter::{CounterStep, EnergyCounter, Wrap};
use super::health::{MeterHealth, Rejection, ZoneLog};
use super::limits::{PowerCeilings, most_units};
use super::{EnergySample, GpuProcessSample, Meter, MeterContext, MeterError};
use crate::units::{Domain, Joules, Watts};

/// The library name NVML's loader searches for when no path is configured.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

enum EnergySource {
    /// Not decided yet (the device was unreachable when opened).
    Unknown,
    Counter(EnergyCounter),
    Power,
}

struct GpuDevice {
    index: u32,
    zone: String,
    energy: EnergySource,
    /// Power-based devices need one sample before they integrate.
    sampled: bool,
    /// Problems already logged: (call, error text).
    logged: HashSet<(&'static str, String)>,
    last_utilisation_timestamp_us: u64,
    mig_instances: Vec<u32>,
}

impl GpuDevice {
    /// Log a problem with `call` once; later identical failures stay quiet.
    /// Energy calls also mark the GPU down in `zones`.
    fn fail(&mut self, zones: &mut ZoneLog, call: &'static str, err: &NvmlError) {
        zones.down_quietly(&self.zone, format!("{call}: {err}"));
        self.log_once(call, err);
    }

    /// Log a problem with `call` once; later identical failures stay quiet.
    fn log_once(&mut self, call: &'static str, err: &NvmlError) {
        if self.logged.insert((call, err.to_string())) {
            tracing::warn!(
                source = "nvml",
                gpu = %self.zone,
                call,
                kind = ?err,
                "GPU reports nothing this interval: {err} (logged once until it recovers)"
            );
        }
    }

    fn recovered(&mut self, call: &'static str) {
        self.logged.retain(|(logged_call, _)| *logged_call != call);
    }
}

/// Reads NVIDIA GPUs' energy and process usage.
pub struct NvmlMeter {
    devices: Vec<GpuDevice>,
    log: ZoneLog,
    ceilings: PowerCeilings,
    /// Raw bindings for the calls nvml-wrapper lacks (MIG enumeration).
    raw: Option<NvmlLib>,
    // Declared last: dropped after `raw`, and shuts NVML down.
    nvml: Nvml,
}

fn absent_reason(library: &OsStr, err: NvmlError) -> MeterError {
    let text = match err {
        NvmlError::LibloadingError(load) => {
            format!(
                "cannot load {} ({load}): no NVIDIA driver installed here",
                library.to_string_lossy()
            )
        }
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
        NvmlError::FailedToLoadSymbol(symbol) => {
            format!(
                "{} lacks an NVML function ({symbol}): driver too old",
                library.to_string_lossy()
            )
        }
        other => format!("NVML did not initialise: {other}"),
    };
    MeterError::Absent(text)
}

impl NvmlMeter {
    /// Load NVML (from `library`, or the loader's search path) and list GPUs.
    pub fn open(library: Option<&Path>) -> Result<NvmlMeter, MeterError> {
        let library_name: &OsStr = library
            .map(|path| path.as_os_str())
            .unwrap_or(OsStr::new(DEFAULT_LIBRARY));
        let nvml = Nvml::builder()
            .lib_path(library_name)
            .init()
            .map_err(|err| absent_reason(library_name, err))?;
        let count = nvml
            .device_count()
            .map_err(|err| MeterError::Absent(format!("NVML cannot count GPUs: {err}")))?;
        if count == 0 {
            return Err(MeterError::Absent(
                "NVML is loaded but finds no GPU".to_string(),
            ));
        }
        // SAFETY: loading the same library again only raises its reference
        // count; NVML is already initialised by `nvml` and outlives `raw`.
        let raw = unsafe { NvmlLib::new(library_name) }.ok();
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut device = GpuDevice {
                index,
                zone: format!("gpu-{index}"),
                energy: EnergySource::Unknown,
                sampled: false,
                logged: HashSet::new(),
                last_utilisation_timestamp_us: 0,
                mig_instances: Vec::new(),
            };
            match nvml.device_by_index(index) {
                Ok(handle) => {
                    device.energy = match handle.total_energy_consumption() {
                        Ok(_) => EnergySource::Counter(EnergyCounter::new(Wrap::Never)),
                        Err(NvmlError::NotSupported) => EnergySource::Power,
                        Err(err) => {
                            device.log_once("nvmlDeviceGetTotalEnergyConsumption", &err);
                            EnergySource::Unknown
                        }
                    };
                    device.mig_instances = raw
                        .as_ref()
                        .map(|raw| list_mig(raw, &handle))
                        .unwrap_or_default();
                    let name = handle
                        .name()
                        .unwrap_or_else(|_| "unknown model".to_string());
                    tracing::info!(
                        source = "nvml",
                        gpu = %device.zone,
                        name = %name,
                        energy = match device.energy {
                            EnergySource::Counter(_) => "total-energy counter",
                            EnergySource::Power => "power × time",
                            EnergySource::Unknown => "undecided (device unreachable)",
                        },
                        mig_instances = ?device.mig_instances,
                        "GPU found"
                    );
                }
                Err(err) => device.log_once("nvmlDeviceGetHandleByIndex", &err),
            }
            devices.push(device);
        }
        let mut log = ZoneLog::new("nvml");
        for device in &devices {
            if let Some((call, err)) = device.logged.iter().next() {
                log.down_quietly(&device.zone, format!("{call}: {err}"));
            }
        }
        Ok(NvmlMeter {
            devices,
            log,
            ceilings: PowerCeilings::default(),
            raw,
            nvml,
        })
    }

    /// Use this `gpu` ceiling for GPUs whose power limit cannot be read.
    pub fn with_ceilings(mut self, ceilings: PowerCeilings) -> NvmlMeter {
        self.ceilings = ceilings;
        self
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// MIG instances by zone name ("gpu-0-mig-1"), as listed at start.
    pub fn mig_instances(&self) -> Vec<String> {
        self.devices
            .iter()
            .flat_map(|device| {
                device
                    .mig_instances
                    .iter()
                    .map(move |instance| mig_zone(device.index, *instance))
            })
            .collect()
    }

    /// Whether the raw bindings used for MIG loaded.
    pub fn has_mig_bindings(&self) -> bool {
        self.raw.is_some()
    }
}

fn mig_zone(index: u32, gpu_instance: u32) -> String {
    format!("gpu-{index}-mig-{gpu_instance}")
}

/// GPU instance ids of a device's MIG instances; empty where MIG is off or unsupported.
fn list_mig(raw: &NvmlLib, device: &nvml_wrapper::Device<'_>) -> Vec<u32> {
    match device.mig_mode() {
        Ok(mode) if mode.current == NVML_DEVICE_MIG_ENABLE => {}
        _ => return Vec::new(),
    }
    let (Ok(max_count), Ok(by_index), Ok(instance_id)) = (
        raw.nvmlDeviceGetMaxMigDeviceCount.as_ref(),
        raw.nvmlDeviceGetMigDeviceHandleByIndex.as_ref(),
        raw.nvmlDeviceGetGpuInstanceId.as_ref(),
    ) else {
        return Vec::new();
    };
    let mut instances = Vec::new();
    // SAFETY: the handle is valid while `device` borrows the live `Nvml`; the
    // out-pointers point at locals of the right types.
    unsafe {
        let parent: nvmlDevice_t = device.handle();
        let mut count = 0u32;
        if max_count(parent, &mut count) != nvmlReturn_enum_NVML_SUCCESS {
            return Vec::new();
        }
        for slot in 0..count {
            let mut mig: nvmlDevice_t = std::ptr::null_mut();
            // Empty slots answer NOT_FOUND.
            if by_index(parent, slot, &mut mig) != nvmlReturn_enum_NVML_SUCCESS {
                continue;
            }
            let mut id = 0u32;
            if instance_id(mig, &mut id) == nvmlReturn_enum_NVML_SUCCESS {
                instances.push(id);
            }
        }
    }
    instances.sort_unstable();
    instances
}

impl Meter for NvmlMeter {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn is_estimate(&self) -> bool {
        false
    }

    fn domains(&self) -> Vec<Domain> {
        vec![Domain::Gpu]
    }

    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        let mut samples = Vec::with_capacity(self.devices.len());
        for device in &mut self.devices {
            let zones = &mut self.log;
            // Time since this GPU's counter was last read: the intervals it
            // did not answer in count, so the energy of an outage is judged
            // against the outage's maximum, not one interval's.
            let span = match &mut device.energy {
                EnergySource::Counter(counter) => counter.elapse(ctx.elapsed),
                EnergySource::Unknown | EnergySource::Power => ctx.elapsed,
            };
            let handle = match self.nvml.device_by_index(device.index) {
                Ok(handle) => {
                    device.recovered("nvmlDeviceGetHandleByIndex");
                    handle
                }
                Err(err) => {
                    device.fail(zones, "nvmlDeviceGetHandleByIndex", &err);
                    continue;
                }
            };
            if matches!(device.energy, EnergySource::Unknown) {
                match handle.total_energy_consumption() {
                    Ok(_) => device.energy = EnergySource::Counter(EnergyCounter::new(Wrap::Never)),
                    Err(NvmlError::NotSupported) => device.energy = EnergySource::Power,
                    Err(err) => {
                        device.fail(zones, "nvmlDeviceGetTotalEnergyConsumption", &err);
                        continue;
                    }
                }
            }
            // mW; where the limit cannot be read, the `gpu` ceiling applies.
            let limit = handle
                .enforced_power_limit()
                .ok()
                .map(|milliwatts| Watts(f64::from(milliwatts) / 1e3));
            let max = self.ceilings.zone_max(Domain::Gpu, limit);
            let joules = match &mut device.energy {
                EnergySource::Unknown => continue,
                EnergySource::Counter(counter) => match handle.total_energy_consumption() {
                    Ok(millijoules) => {
                        let step = counter.advance(millijoules, most_units(max, span, 1e-3));
                        device.recovered("nvmlDeviceGetTotalEnergyConsumption");
                        match step {
                            CounterStep::Reset { previous, current } => zones.reject(
                                &device.zone,
                                Rejection::CounterReset,
                                format!(
                                    "GPU energy counter moved backwards from {previous} to \
                                     {current} mJ (driver reload?): counted as a reset (0 J this \
                                     interval)"
                                ),
                            ),
                            CounterStep::Implausible { units, .. }
                            | CounterStep::Ambiguous { units, .. } => {
                                zones.reject(
                                    &device.zone,
                                    step.rejection().expect("a rejected step"),
                                    format!(
                                        "GPU energy counter advanced {:.1} J in {:.3} s; the GPU \
                                         draws at most {:.0} W",
                                        units as f64 / 1e3,
                                        span.as_secs_f64(),
                                        max.0
                                    ),
                                );
                                zones.up(&device.zone);
                                continue;
                            }
                            _ => zones.accepted(&device.zone),
                        }
                        Joules(step.units() as f64 / 1e3)
                    }
                    Err(err) => {
                        device.fail(zones, "nvmlDeviceGetTotalEnergyConsumption", &err);
                        continue;
                    }
                },
                EnergySource::Power => match handle.power_usage() {
                    Ok(milliwatts) => {
                        device.recovered("nvmlDeviceGetPowerUsage");
                        let watts = Watts(f64::from(milliwatts) / 1e3);
                        if watts.0 > max.0 {
                            zones.reject(
                                &device.zone,
                                Rejection::AboveMaxPower,
                                format!(
                                    "GPU power reads {milliwatts} mW; the GPU draws at most {:.0} W",
                                    max.0
                                ),
                            );
                            zones.up(&device.zone);
                            continue;
                        }
                        zones.accepted(&device.zone);
                        if device.sampled {
                            watts.over(ctx.elapsed)
                        } else {
                            Joules::ZERO
                        }
                    }
                    Err(err) => {
                        device.fail(zones, "nvmlDeviceGetPowerUsage", &err);
                        continue;
                    }
                },
            };
            zones.up(&device.zone);
            device.sampled = true;
            samples.push(EnergySample {
                domain: Domain::Gpu,
                zone: device.zone.clone(),
                joules,
            });
        }
        Ok(samples)
    }

    fn health(&self) -> MeterHealth {
        self.log
            .health(self.devices.iter().map(|device| device.zone.as_str()))
    }

    fn gpu_processes(&mut self) -> Vec<GpuProcessSample> {
        let mut processes = Vec::new();
        for device in &mut self.devices {
            let Ok(handle) = self.nvml.device_by_index(device.index) else {
                // Already logged by `sample`.
                continue;
            };
            let running = match handle.running_compute_processes() {
                Ok(running) => {
                    device.recovered("nvmlDeviceGetComputeRunningProcesses");
                    running
                }
                Err(err) => {
                    device.log_once("nvmlDeviceGetComputeRunningProcesses", &err);
                    Vec::new()
                }
            };
            // pid → (sum of SM %, samples)
            let mut utilisation: BTreeMap<u32, (f64, u32)> = BTreeMap::new();
            match handle.process_utilization_stats(device.last_utilisation_timestamp_us) {
                Ok(samples) => {
                    device.recovered("nvmlDeviceGetProcessUtilization");
                    for sample in samples {
                        device.last_utilisation_timestamp_us =
                            device.last_utilisation_timestamp_us.max(sample.timestamp);
                        let entry = utilisation.entry(sample.pid).or_default();
                        entry.0 += f64::from(sample.sm_util);
                        entry.1 += 1;
                    }
                }
                Err(NvmlError::NotFound) => {}
                Err(err) => device.log_once("nvmlDeviceGetProcessUtilization", &err),
            }
            let mut seen: HashSet<u32> = HashSet::new();
            for process in running {
                if !seen.insert(process.pid) {
                    continue;
                }
                let zone = match process.gpu_instance_id {
                    Some(instance) => mig_zone(device.index, instance),
                    None => device.zone.clone(),
                };
                let utilisation_percent = utilisation
                    .get(&process.pid)
                    .map(|(sum, count)| sum / f64::from(*count))
                    .unwrap_or(0.0);
                processes.push(GpuProcessSample {
                    pid: process.pid,
                    zone,
                    utilisation_percent,
                });
            }
            // Processes with samples but no compute context (graphics) still used the GPU.
            for (pid, (sum, count)) in utilisation {
                if seen.insert(pid) {
                    processes.push(GpuProcessSample {
                        pid,
                        zone: device.zone.clone(),
                        utilisation_percent: sum / f64::from(count),
                    });
                }
            }
        }
        processes
    }
}
