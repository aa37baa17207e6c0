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

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{EnergySample, Meter, MeterContext, MeterError, parse_u64, readings_or_error};
use crate::units::{Domain, Joules};

/// hwmon chip names read as whole-platform meters by default.
pub const DEFAULT_PLATFORM_CHIPS: &[&str] = &["power_meter"];

struct PowerSensor {
    zone: String,
    path: PathBuf,
    file: File,
    failed: bool,
}

/// Integrates hwmon platform power sensors over each interval.
pub struct HwmonMeter {
    sensors: Vec<PowerSensor>,
    baseline_taken: bool,
    read_buffer: [u8; 32],
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
        for device in devices {
            let chip_dir = hwmon_dir.join(&device);
            let Ok(chip) =
                std::fs::read_to_string(chip_dir.join("name")).map(|name| name.trim().to_string())
            else {
                continue;
            };
            let found = power_files(&chip_dir);
            if found.is_empty() {
                continue;
            }
            if !chips.contains(&chip) {
                tracing::debug!(chip = %chip, device = %device, "hwmon chip has power sensors but is not a configured platform meter");
                continue;
            }
            for (sensor, path) in found {
                let file = File::open(&path).map_err(|err| MeterError::io(&path, err))?;
                sensors.push(PowerSensor {
                    zone: format!("{chip}-{device}-{sensor}"),
                    path,
                    file,
                    failed: false,
                });
            }
        }
        if sensors.is_empty() {
            return Err(MeterError::Absent(format!(
                "no power sensor of the platform meter chips {chips:?} under {}",
                hwmon_dir.display()
            )));
        }
        Ok(HwmonMeter {
            sensors,
            baseline_taken: false,
            read_buffer: [0; 32],
        })
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
            let reading = sensor
                .file
                .read_at(&mut self.read_buffer, 0)
                .map_err(|err| MeterError::io(&sensor.path, err))
                .and_then(|length| {
                    parse_u64(
                        &sensor.path,
                        std::str::from_utf8(&self.read_buffer[..length]).unwrap_or(""),
                    )
                });
            let microwatts = match reading {
                Ok(microwatts) => microwatts,
                Err(err) => {
                    if !sensor.failed {
                        tracing::warn!(source = "hwmon", zone = %sensor.zone, "reading power sensor failed: {err}");
                        sensor.failed = true;
                    }
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            sensor.failed = false;
            let joules = if integrate {
                Joules(microwatts as f64 / 1e6 * ctx.elapsed.as_secs_f64())
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
}
