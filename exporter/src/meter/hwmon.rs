//! Platform power meters through hwmon (`/sys/class/hwmon/hwmon*/power*_*`).
//!
//! hwmon power attributes are in microwatts: `powerN_average` is averaged by
//! the device over `powerN_average_interval`, `powerN_input` is instantaneous.
//! Each interval's energy is the reading × the interval's length; the average
//! is preferred where both exist, because it covers the interval instead of
//! one instant of it.
//!
//! Which chips count as the *platform*: only those named in the
//! configuration (default: the ACPI power meter, chip name `power_meter`,
//! which measures the whole system at its power supply). Many other hwmon
//! chips report power too — amdgpu for a GPU, some PMBus regulators for one
//! rail — and counting them as the platform would be wrong, so they are
//! skipped (with a debug line) unless named.
//!
//! A chip with power sensors whose `name` cannot be read, is not UTF-8 or
//! is no name a driver gives (empty, whitespace or control bytes, longer
//! than 64 bytes) might be the platform meter: it is skipped
//! with a WARN naming the file and what it held and listed as down under its
//! device ("hwmon3"); where it is the only candidate the meter is unusable,
//! never silently absent. A `powerN_max`/`_crit` that cannot be parsed is
//! logged once and ignored (the other limit or the ceiling applies).
//!
//! A sensor that cannot be opened, read or parsed is skipped with a WARN
//! naming the file and what it held, and listed as down in
//! [`Meter::health`]; the other sensors are read, and the broken one is
//! re-opened at every sample until it reads again (a sensor that vanishes
//! with its driver comes back under the same path). A reading above the
//! sensor's `powerN_max`/`powerN_crit` (× the factor of `limits.rs`), or
//! else the platform ceiling, is rejected and counted.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::health::{MeterHealth, Rejection, ZoneLog};
use super::limits::PowerCeilings;
use super::{
    EnergySample, Meter, MeterContext, MeterError, parse_u64, read_u64, readings_or_error,
};
use crate::units::{Domain, Joules, Watts};

/// hwmon chip names read as whole-platform meters by default.
pub const DEFAULT_PLATFORM_CHIPS: &[&str] = &["power_meter"];

struct PowerSensor {
    zone: String,
    path: PathBuf,
    /// `None` after a failed open or read: re-opened at the next sample.
    file: Option<File>,
    /// The larger of `powerN_max` and `powerN_crit`.
    max_power: Option<Watts>,
}

/// Integrates hwmon platform power sensors over each interval.
pub struct HwmonMeter {
    sensors: Vec<PowerSensor>,
    baseline_taken: bool,
    /// A full buffer means the file holds more than any reading.
    read_buffer: [u8; 64],
    log: ZoneLog,
    ceilings: PowerCeilings,
}

/// The larger of a sensor's `_max` and `_crit` limits (µW in sysfs). A
/// limit file that is there but cannot be read or parsed is logged (once:
/// limits are read when the meter opens) and ignored, so the platform
/// ceiling applies where no other limit does.
fn sensor_max_power(chip_dir: &Path, sensor: &str, zone: &str) -> Option<Watts> {
    ["max", "crit"]
        .iter()
        .filter_map(
            |limit| match read_u64(&chip_dir.join(format!("{sensor}_{limit}"))) {
                Ok(microwatts) => Some(microwatts),
                Err(MeterError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => None,
                Err(err) => {
                    tracing::warn!(
                        source = "hwmon",
                        zone = %zone,
                        "power limit not used, the sensor is read against its other limit or \
                         else the configured platform ceiling (--max-watts platform=…): {err}"
                    );
                    None
                }
            },
        )
        .max()
        .filter(|microwatts| *microwatts > 0)
        .map(|microwatts| Watts(microwatts as f64 / 1e6))
}

/// Longest chip name read: real ones are a few bytes ("power_meter").
const MAX_CHIP_NAME: usize = 64;

/// A chip's `name`: a short string of printable ASCII without whitespace
/// (hwmon's ABI also forbids '-' and '*', but the kernel only warns about
/// them, so such a chip may exist and be configured), else an error naming
/// the file and what it held. Read with a bound: a file is host input.
fn read_chip_name(path: &Path) -> Result<String, MeterError> {
    use std::io::Read;
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|file| file.take(4096).read_to_end(&mut raw))
        .map_err(|err| MeterError::io(path, err))?;
    let expected = "a hwmon chip name (1 to 64 printable ASCII characters, no whitespace)";
    let name = std::str::from_utf8(raw.trim_ascii())
        .map_err(|_| MeterError::parse(path, expected, &raw))?;
    let valid = !name.is_empty()
        && name.len() <= MAX_CHIP_NAME
        && name.bytes().all(|byte| byte.is_ascii_graphic());
    if !valid {
        return Err(MeterError::parse(path, expected, &raw));
    }
    Ok(name.to_string())
}

fn open_sensor(path: &Path) -> Result<File, MeterError> {
    File::open(path).map_err(|err| MeterError::io(path, err))
}

/// Read a sensor's power in µW into `buffer`.
fn read_microwatts(file: &File, path: &Path, buffer: &mut [u8; 64]) -> Result<u64, MeterError> {
    let length = file
        .read_at(buffer, 0)
        .map_err(|err| MeterError::io(path, err))?;
    if length == buffer.len() {
        return Err(MeterError::parse(path, "a power in microwatts", buffer));
    }
    parse_u64(path, &buffer[..length])
}

/// Power sensors of one chip directory: "power1" → the file to read.
fn power_files(chip_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(chip_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut sensors: Vec<(String, PathBuf)> = Vec::new();
    for name in &names {
        let Some(sensor) = name
            .strip_suffix("_average")
            .or_else(|| name.strip_suffix("_input"))
        else {
            continue;
        };
        let is_power = sensor
            .strip_prefix("power")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_power {
            continue;
        }
        let average = format!("{sensor}_average");
        let chosen = if names.contains(&average) {
            average
        } else {
            name.clone()
        };
        if !sensors.iter().any(|(known, _)| known == sensor) {
            sensors.push((sensor.to_string(), chip_dir.join(chosen)));
        }
    }
    sensors
}

impl HwmonMeter {
    /// Find the power sensors of the named chips under `host_sys/class/hwmon`.
    pub fn open(host_sys: &Path, chips: &[String]) -> Result<HwmonMeter, MeterError> {
        let hwmon_dir = host_sys.join("class/hwmon");
        let entries = match std::fs::read_dir(&hwmon_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => {
                return Err(MeterError::Absent(format!(
                    "no hwmon directory at {}",
                    hwmon_dir.display()
                )));
            }
            Err(err) => return Err(MeterError::io(&hwmon_dir, err)),
        };
        let mut devices: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        devices.sort();
        let mut sensors = Vec::new();
        let mut log = ZoneLog::new("hwmon");
        let mut first_error = None;
        for device in devices {
            let chip_dir = hwmon_dir.join(&device);
            let found = power_files(&chip_dir);
            if found.is_empty() {
                continue;
            }
            // A chip with power sensors whose name cannot be read may be the
            // platform meter: down under its device ("hwmon3"), with why.
            let chip = match read_chip_name(&chip_dir.join("name")) {
                Ok(chip) => chip,
                Err(err) => {
                    log.down(&device, &err);
                    first_error.get_or_insert(MeterError::NoZoneReadable(err.to_string()));
                    continue;
                }
            };
            if !chips.contains(&chip) {
                tracing::debug!(chip = %chip, device = %device, "hwmon chip has power sensors but is not a configured platform meter");
                continue;
            }
            for (sensor, path) in found {
                let zone = format!("{chip}-{device}-{sensor}");
                sensors.push(PowerSensor {
                    max_power: sensor_max_power(&chip_dir, &sensor, &zone),
                    zone,
                    path,
                    file: None,
                });
            }
        }
        if sensors.is_empty() {
            return Err(first_error.unwrap_or_else(|| {
                MeterError::Absent(format!(
                    "no power sensor of the platform meter chips {chips:?} under {}",
                    hwmon_dir.display()
                ))
            }));
        }
        let mut meter = HwmonMeter {
            sensors,
            baseline_taken: false,
            read_buffer: [0; 64],
            log,
            ceilings: PowerCeilings::default(),
        };
        // Prove each sensor readable now; the meter is absent only when none is.
        for sensor in &mut meter.sensors {
            let reading = open_sensor(&sensor.path).and_then(|file| {
                read_microwatts(&file, &sensor.path, &mut meter.read_buffer)?;
                Ok(file)
            });
            match reading {
                Ok(file) => sensor.file = Some(file),
                Err(err) => {
                    meter.log.down(&sensor.zone, &err);
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) if meter.sensors.iter().all(|sensor| sensor.file.is_none()) => Err(err),
            _ => Ok(meter),
        }
    }

    /// Use this platform ceiling for sensors that state no limit.
    pub fn with_ceilings(mut self, ceilings: PowerCeilings) -> HwmonMeter {
        self.ceilings = ceilings;
        self
    }

    pub fn zones(&self) -> Vec<String> {
        self.sensors
            .iter()
            .map(|sensor| sensor.zone.clone())
            .collect()
    }
}

impl Meter for HwmonMeter {
    fn source(&self) -> &'static str {
        "hwmon"
    }

    fn is_estimate(&self) -> bool {
        false
    }

    fn domains(&self) -> Vec<Domain> {
        vec![Domain::Platform]
    }

    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        let integrate = self.baseline_taken;
        self.baseline_taken = true;
        let mut samples = Vec::with_capacity(self.sensors.len());
        let mut first_error = None;
        for sensor in &mut self.sensors {
            let file = match sensor.file.take() {
                Some(file) => Ok(file),
                None => open_sensor(&sensor.path),
            };
            let reading = file.and_then(|file| {
                let microwatts = read_microwatts(&file, &sensor.path, &mut self.read_buffer)?;
                sensor.file = Some(file);
                Ok(microwatts)
            });
            let microwatts = match reading {
                Ok(microwatts) => microwatts,
                Err(err) => {
                    self.log.down(&sensor.zone, &err);
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            self.log.up(&sensor.zone);
            let watts = Watts(microwatts as f64 / 1e6);
            let max = self.ceilings.zone_max(Domain::Platform, sensor.max_power);
            if watts.0 > max.0 {
                self.log.reject(
                    &sensor.zone,
                    Rejection::AboveMaxPower,
                    format!(
                        "{} reads {} µW ({:.0} W); the sensor measures at most {:.0} W",
                        sensor.path.display(),
                        microwatts,
                        watts.0,
                        max.0
                    ),
                );
                continue;
            }
            self.log.accepted(&sensor.zone);
            let joules = if integrate {
                watts.over(ctx.elapsed)
            } else {
                Joules::ZERO
            };
            samples.push(EnergySample {
                domain: Domain::Platform,
                zone: sensor.zone.clone(),
                joules,
            });
        }
        readings_or_error(samples, first_error)
    }

    fn health(&self) -> MeterHealth {
        self.log
            .health(self.sensors.iter().map(|sensor| sensor.zone.as_str()))
    }
}
