//! A power model for machines with no meter (cloud VMs, these test machines).
//!
//! `P = cpus × (P_idle + (P_max − P_idle) × utilisation)`, with `P_idle` and
//! `P_max` per vCPU. This is the Cloud Carbon Footprint (CCF) method: its
//! per-vCPU minimum and maximum watts per microarchitecture are averages of
//! SPECpower_ssj2008 results, linearly interpolated by utilisation. The model
//! covers the CPU package only (no DRAM, no GPU) and is exported with
//! `source="model"` so nobody mistakes it for a measurement.
//!
//! Defaults come from [`COEFFICIENT_TABLE`], keyed by microarchitecture,
//! which is recognised from `/proc/cpuinfo` (vendor, family, model, stepping;
//! MIDR implementer/part on Arm). Unknown CPUs get [`GENERIC`]. Configuration
//! replaces both.
//!
//! Where a real meter exists, [`OnlineFit`] learns the machine's own
//! coefficients by least squares on (utilisation, measured package power)
//! pairs, reports the fit's error, and [`ModelFit::save`] writes them as YAML
//! or JSON so VMs on the same hardware can load them ([`load_coefficients`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{EnergySample, Meter, MeterContext, MeterError};
use crate::units::{Domain, Joules, Nanos, Watts};

/// Per-vCPU idle and full-load power.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCoefficients {
    /// Power of one vCPU at 0 % utilisation.
    pub idle_watts_per_cpu: Watts,
    /// Power of one vCPU at 100 % utilisation.
    pub max_watts_per_cpu: Watts,
    /// Where the numbers come from (table row and its source, a fit, configuration).
    #[serde(default = "configured_origin")]
    pub origin: String,
}

fn configured_origin() -> String {
    "configuration".to_string()
}

impl ModelCoefficients {
    /// Package power of `cpus` vCPUs at `utilisation` (clamped to 0..=1).
    pub fn power(&self, cpus: u32, utilisation: f64) -> Watts {
        let utilisation = utilisation.clamp(0.0, 1.0);
        let per_cpu = self.idle_watts_per_cpu.0
            + (self.max_watts_per_cpu.0 - self.idle_watts_per_cpu.0) * utilisation;
        Watts(f64::from(cpus) * per_cpu)
    }

    /// Idle power of `cpus` vCPUs.
    pub fn idle_power(&self, cpus: u32) -> Watts {
        Watts(f64::from(cpus) * self.idle_watts_per_cpu.0)
    }

    /// Reject numbers the model cannot use.
    pub fn validate(&self) -> Result<(), String> {
        let (idle, max) = (self.idle_watts_per_cpu.0, self.max_watts_per_cpu.0);
        if !idle.is_finite() || !max.is_finite() || idle < 0.0 {
            return Err(format!(
                "idle_watts_per_cpu ({idle}) and max_watts_per_cpu ({max}) must be finite and >= 0"
            ));
        }
        if max < idle {
            return Err(format!(
                "max_watts_per_cpu ({max}) is below idle_watts_per_cpu ({idle})"
            ));
        }
        Ok(())
    }
}

/// One row of the bundled table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TableRow {
    pub microarchitecture: &'static str,
    pub idle_watts_per_cpu: f64,
    pub max_watts_per_cpu: f64,
    /// Where the two numbers come from.
    pub source: &'static str,
}

impl TableRow {
    pub fn coefficients(&self) -> ModelCoefficients {
        ModelCoefficients {
            idle_watts_per_cpu: Watts(self.idle_watts_per_cpu),
            max_watts_per_cpu: Watts(self.max_watts_per_cpu),
            origin: format!("{} ({})", self.microarchitecture, self.source),
        }
    }
}

/// CCF's per-processor figures (min_watts_avg / max_watts_avg), which CCF
/// derives from SPECpower_ssj2008 results.
const CCF: &str = "Cloud Carbon Footprint, packages/core/src/compute/ComputeProcessorTypes.ts, from SPECpower_ssj2008";

/// Per-vCPU watts by microarchitecture; each row names its source.
pub const COEFFICIENT_TABLE: &[TableRow] = &[
    TableRow {
        microarchitecture: "Sandy Bridge",
        idle_watts_per_cpu: 2.17,
        max_watts_per_cpu: 8.58,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Ivy Bridge",
        idle_watts_per_cpu: 3.04,
        max_watts_per_cpu: 8.25,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Haswell",
        idle_watts_per_cpu: 1.00,
        max_watts_per_cpu: 4.74,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Broadwell",
        idle_watts_per_cpu: 0.71,
        max_watts_per_cpu: 3.69,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Skylake",
        idle_watts_per_cpu: 0.65,
        max_watts_per_cpu: 4.26,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Cascade Lake",
        idle_watts_per_cpu: 0.64,
        max_watts_per_cpu: 3.97,
        source: CCF,
    },
    TableRow {
        microarchitecture: "Coffee Lake",
        idle_watts_per_cpu: 1.14,
        max_watts_per_cpu: 5.42,
        source: CCF,
    },
    TableRow {
        microarchitecture: "AMD EPYC 1st Gen",
        idle_watts_per_cpu: 0.82,
        max_watts_per_cpu: 2.55,
        source: CCF,
    },
    TableRow {
        microarchitecture: "AMD EPYC 2nd Gen",
        idle_watts_per_cpu: 0.47,
        max_watts_per_cpu: 1.69,
        source: CCF,
    },
    TableRow {
        microarchitecture: "AMD EPYC 3rd Gen",
        idle_watts_per_cpu: 0.45,
        max_watts_per_cpu: 2.02,
        source: CCF,
    },
    // CCF gives Graviton2 the AMD EPYC 2nd Gen figures (no SPECpower result exists for it).
    TableRow {
        microarchitecture: "AWS Graviton2",
        idle_watts_per_cpu: 0.47,
        max_watts_per_cpu: 1.69,
        source: CCF,
    },
];

/// The fallback for CPUs the table does not know.
pub const GENERIC: TableRow = TableRow {
    microarchitecture: "generic",
    idle_watts_per_cpu: 0.74,
    max_watts_per_cpu: 3.5,
    source: "Cloud Carbon Footprint, packages/aws/src/domain/AwsFootprintEstimationConstants.ts: \
             MIN_WATTS_AVG and MAX_WATTS_AVG, the average over AWS's processors",
};

/// What `/proc/cpuinfo` says about the CPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuIdentity {
    pub vendor: String,
    pub family: Option<u32>,
    pub model: Option<u32>,
    pub stepping: Option<u32>,
    pub model_name: String,
    /// Arm MIDR fields ("CPU implementer", "CPU part").
    pub arm_implementer: Option<u32>,
    pub arm_part: Option<u32>,
    /// Number of `processor` entries.
    pub cpus: u32,
}

fn parse_int(text: &str) -> Option<u32> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Parse `/proc/cpuinfo`; the first processor's fields describe the CPU.
pub fn parse_cpuinfo(text: &str) -> CpuIdentity {
    let mut identity = CpuIdentity::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => identity.cpus += 1,
            "vendor_id" if identity.vendor.is_empty() => identity.vendor = value.to_string(),
            "cpu family" if identity.family.is_none() => identity.family = parse_int(value),
            "model" if identity.model.is_none() => identity.model = parse_int(value),
            "stepping" if identity.stepping.is_none() => identity.stepping = parse_int(value),
            "model name" if identity.model_name.is_empty() => {
                identity.model_name = value.to_string()
            }
            "CPU implementer" if identity.arm_implementer.is_none() => {
                identity.arm_implementer = parse_int(value)
            }
            "CPU part" if identity.arm_part.is_none() => identity.arm_part = parse_int(value),
            _ => {}
        }
    }
    identity
}

/// The table's microarchitecture for a CPU, if it has one.
///
/// Intel family 6 model numbers are from Intel's SDM / the kernel's
/// `arch/x86/include/asm/intel-family.h`; model 0x55 is Skylake-SP at
/// steppings 0–4 and Cascade Lake at 5–7. AMD EPYC generations are family
/// 0x17 model 0x01 (Naples, Zen), 0x17 model 0x31 (Rome, Zen 2) and 0x19
/// model 0x01 (Milan, Zen 3), checked against "EPYC" in the model name since
/// desktop Ryzen parts share those numbers. Arm implementer 0x41 part 0xd0c is
/// Neoverse N1, the core of AWS Graviton2.
pub fn microarchitecture(cpu: &CpuIdentity) -> Option<&'static str> {
    let (family, model, stepping) = (cpu.family, cpu.model, cpu.stepping.unwrap_or(0));
    let name = match cpu.vendor.as_str() {
        "GenuineIntel" if family == Some(6) => match model? {
            0x2A | 0x2D => "Sandy Bridge",
            0x3A | 0x3E => "Ivy Bridge",
            0x3C | 0x3F | 0x45 | 0x46 => "Haswell",
            0x3D | 0x47 | 0x4F | 0x56 => "Broadwell",
            0x4E | 0x5E => "Skylake",
            0x55 if stepping <= 4 => "Skylake",
            0x55 if (5..=7).contains(&stepping) => "Cascade Lake",
            0x9E if stepping >= 10 => "Coffee Lake",
            _ => return None,
        },
        "AuthenticAMD" if cpu.model_name.contains("EPYC") => match (family?, model?) {
            (0x17, 0x01) => "AMD EPYC 1st Gen",
            (0x17, 0x31) => "AMD EPYC 2nd Gen",
            (0x19, 0x01) => "AMD EPYC 3rd Gen",
            _ => return None,
        },
        _ if cpu.arm_implementer == Some(0x41) && cpu.arm_part == Some(0xd0c) => "AWS Graviton2",
        _ => return None,
    };
    Some(name)
}

/// The table row for a CPU, or the generic fallback.
pub fn table_row(cpu: &CpuIdentity) -> TableRow {
    microarchitecture(cpu)
        .and_then(|name| {
            COEFFICIENT_TABLE
                .iter()
                .find(|row| row.microarchitecture == name)
        })
        .copied()
        .unwrap_or(GENERIC)
}

/// Estimates CPU package energy from utilisation.
///
/// It integrates a power over the interval's elapsed time, so unlike a
/// counter it needs no baseline: the loop's baseline call (elapsed 0, and
/// no utilisation yet) yields nothing, and the first measured interval
/// already has its joules. A baseline of its own would lose that interval,
/// whose CPU time is counted all the same.
pub struct ModelMeter {
    coefficients: ModelCoefficients,
    cpus: u32,
}

impl ModelMeter {
    pub fn new(coefficients: ModelCoefficients, cpus: u32) -> ModelMeter {
        ModelMeter { coefficients, cpus }
    }

    /// Coefficients from `overrides`, else the table row for the CPU in
    /// `host_proc/cpuinfo` (generic when unreadable or unknown).
    pub fn for_host(host_proc: &Path, overrides: Option<ModelCoefficients>) -> ModelMeter {
        let cpuinfo_path = host_proc.join("cpuinfo");
        let cpu = match std::fs::read_to_string(&cpuinfo_path) {
            Ok(text) => parse_cpuinfo(&text),
            Err(err) => {
                tracing::warn!(path = %cpuinfo_path.display(), "cannot read cpuinfo, using the generic model: {err}");
                CpuIdentity::default()
            }
        };
        let cpus = cpu.cpus.max(1);
        let coefficients = overrides.unwrap_or_else(|| table_row(&cpu).coefficients());
        ModelMeter::new(coefficients, cpus)
    }

    pub fn coefficients(&self) -> &ModelCoefficients {
        &self.coefficients
    }

    pub fn cpus(&self) -> u32 {
        self.cpus
    }
}

impl Meter for ModelMeter {
    fn source(&self) -> &'static str {
        "model"
    }

    fn is_estimate(&self) -> bool {
        true
    }

    fn domains(&self) -> Vec<Domain> {
        vec![Domain::Package]
    }

    fn sample(&mut self, ctx: &MeterContext) -> Result<Vec<EnergySample>, MeterError> {
        let utilisation = ctx
            .cpu_utilisation
            .filter(|value| value.is_finite())
            .ok_or(MeterError::NoUtilisation)?;
        if ctx.cpus > 0 {
            self.cpus = ctx.cpus;
        }
        let joules = self
            .coefficients
            .power(self.cpus, utilisation)
            .over(ctx.elapsed);
        // One zone: the model sees all CPUs at once, not sockets.
        Ok(vec![EnergySample {
            domain: Domain::Package,
            zone: "package".to_string(),
            joules,
        }])
    }

    fn idle_power(&self) -> Option<Watts> {
        Some(self.coefficients.idle_power(self.cpus))
    }
}

/// Least-squares fit of `power = a + b × utilisation`, updated one sample at
/// a time (Welford's co-moments: no sums of squares that lose precision over
/// days of samples).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OnlineFit {
    samples: u64,
    mean_utilisation: f64,
    mean_watts: f64,
    /// Σ (u - ū)²
    comoment_uu: f64,
    /// Σ (p - p̄)²
    comoment_pp: f64,
    /// Σ (u - ū)(p - p̄)
    comoment_up: f64,
}

/// A fit's result and its error, in the form written to disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFit {
    pub coefficients: ModelCoefficients,
    /// vCPUs of the machine the fit ran on.
    pub cpus: u32,
    pub samples: u64,
    /// Root-mean-square residual of the fitted power.
    pub rmse_watts: f64,
    /// Share of the power's variance the fit explains, 0..=1.
    pub r_squared: f64,
    /// The CPU the fit ran on (`model name` from cpuinfo), so readers can check
    /// they load it on the same hardware.
    #[serde(default)]
    pub cpu_model: String,
}

impl OnlineFit {
    pub fn new() -> OnlineFit {
        OnlineFit::default()
    }

    /// Add one interval: its CPU utilisation (0..=1) and the measured power.
    /// Non-finite values are ignored.
    pub fn add(&mut self, utilisation: f64, power: Watts) {
        if !utilisation.is_finite() || !power.0.is_finite() {
            return;
        }
        self.samples += 1;
        let count = self.samples as f64;
        let delta_u = utilisation - self.mean_utilisation;
        let delta_p = power.0 - self.mean_watts;
        self.mean_utilisation += delta_u / count;
        self.mean_watts += delta_p / count;
        self.comoment_uu += delta_u * (utilisation - self.mean_utilisation);
        self.comoment_pp += delta_p * (power.0 - self.mean_watts);
        self.comoment_up += delta_u * (power.0 - self.mean_watts);
    }

    /// Add one interval given as measured energy over its length.
    pub fn add_interval(&mut self, utilisation: f64, energy: Joules, elapsed: Nanos) {
        if elapsed.0 > 0 {
            self.add(utilisation, Watts(energy.0 / elapsed.as_secs_f64()));
        }
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The fitted coefficients for a machine of `cpus` vCPUs; `None` until
    /// there are three samples and the utilisation has varied (a fit on a
    /// constant load cannot separate idle from active power).
    pub fn fit(&self, cpus: u32, cpu_model: &str) -> Option<ModelFit> {
        if self.samples < 3 || cpus == 0 || self.comoment_uu <= 1e-9 * self.samples as f64 {
            return None;
        }
        let slope = self.comoment_up / self.comoment_uu;
        let intercept = self.mean_watts - slope * self.mean_utilisation;
        let residual_sum = (self.comoment_pp - slope * self.comoment_up).max(0.0);
        let rmse_watts = (residual_sum / self.samples as f64).sqrt();
        let r_squared = if self.comoment_pp > 0.0 {
            (1.0 - residual_sum / self.comoment_pp).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let per_cpu = f64::from(cpus);
        Some(ModelFit {
            coefficients: ModelCoefficients {
                idle_watts_per_cpu: Watts(intercept / per_cpu),
                max_watts_per_cpu: Watts((intercept + slope) / per_cpu),
                origin: format!("online least-squares fit over {} samples", self.samples),
            },
            cpus,
            samples: self.samples,
            rmse_watts,
            r_squared,
            cpu_model: cpu_model.to_string(),
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum FileFormat {
    Json,
    Yaml,
}

fn file_format(path: &Path) -> Result<FileFormat, MeterError> {
    match path.extension().and_then(|ext| ext.to_str()) {
        Some("json") => Ok(FileFormat::Json),
        Some("yaml" | "yml") => Ok(FileFormat::Yaml),
        _ => Err(MeterError::Coefficients {
            path: path.to_path_buf(),
            message: "name it *.json, *.yaml or *.yml so the format is known".to_string(),
        }),
    }
}

impl ModelFit {
    /// Write the fit as JSON or YAML (by the file's extension).
    pub fn save(&self, path: &Path) -> Result<(), MeterError> {
        let text = match file_format(path)? {
            FileFormat::Json => serde_json::to_string_pretty(self).map_err(|err| err.to_string()),
            FileFormat::Yaml => serde_yaml::to_string(self).map_err(|err| err.to_string()),
        }
        .map_err(|message| MeterError::Coefficients {
            path: path.to_path_buf(),
            message,
        })?;
        std::fs::write(path, text).map_err(|err| MeterError::io(path, err))
    }
}

/// A coefficients file: a saved [`ModelFit`] or bare [`ModelCoefficients`].
#[derive(Deserialize)]
#[serde(untagged)]
enum CoefficientsFile {
    Fit(ModelFit),
    Bare(ModelCoefficients),
}

/// The most a coefficients file may hold. A saved fit is a few hundred
/// bytes; a larger file is refused before it is parsed, so a wrong path
/// (a log, a device) costs no unbounded allocation.
pub const MAX_COEFFICIENTS_FILE_BYTES: u64 = 1024 * 1024;

/// Read coefficients written by [`ModelFit::save`] or by hand (JSON or YAML).
pub fn load_coefficients(path: &Path) -> Result<ModelCoefficients, MeterError> {
    let bad = |message: String| MeterError::Coefficients {
        path: path.to_path_buf(),
        message,
    };
    let format = file_format(path)?;
    let bytes = crate::read_at_most(path, MAX_COEFFICIENTS_FILE_BYTES)
        .map_err(|err| MeterError::io(path, err))?
        .ok_or_else(|| {
            bad(format!(
                "larger than {MAX_COEFFICIENTS_FILE_BYTES} bytes: not a coefficients file"
            ))
        })?;
    let text = String::from_utf8(bytes).map_err(|err| bad(format!("not UTF-8 text: {err}")))?;
    let file: CoefficientsFile = match format {
        FileFormat::Json => serde_json::from_str(&text).map_err(|err| err.to_string()),
        FileFormat::Yaml => serde_yaml::from_str(&text).map_err(|err| err.to_string()),
    }
    .map_err(|err| {
        bad(format!("expected idle_watts_per_cpu and max_watts_per_cpu (or a saved fit with `coefficients`): {err}"))
    })?;
    let coefficients = match file {
        CoefficientsFile::Fit(fit) => fit.coefficients,
        CoefficientsFile::Bare(coefficients) => coefficients,
    };
    coefficients.validate().map_err(bad)?;
    Ok(ModelCoefficients {
        origin: format!("{} (from {})", coefficients.origin, path.display()),
        ..coefficients
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_utilisation_gives_known_watts() {
        let coefficients = ModelCoefficients {
            idle_watts_per_cpu: Watts(1.0),
            max_watts_per_cpu: Watts(4.0),
            origin: "test".into(),
        };
        assert_eq!(coefficients.power(8, 0.0), Watts(8.0));
        assert_eq!(coefficients.power(8, 1.0), Watts(32.0));
        assert_eq!(coefficients.power(8, 0.5), Watts(20.0));
        assert_eq!(
            coefficients.power(8, 1.7),
            Watts(32.0),
            "utilisation is clamped"
        );
    }

    #[test]
    fn cpuinfo_picks_the_table_row() {
        let cascade = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n\
                       model name\t: Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz\nstepping\t: 7\n\n\
                       processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nstepping\t: 7\n";
        let cpu = parse_cpuinfo(cascade);
        assert_eq!(cpu.cpus, 2);
        assert_eq!(microarchitecture(&cpu), Some("Cascade Lake"));
        assert_eq!(table_row(&cpu).max_watts_per_cpu, 3.97);

        let skylake = cascade.replace("stepping\t: 7", "stepping\t: 4");
        assert_eq!(microarchitecture(&parse_cpuinfo(&skylake)), Some("Skylake"));

        let rome = "processor : 0\nvendor_id : AuthenticAMD\ncpu family : 23\nmodel : 49\n\
                    model name : AMD EPYC 7R32\nstepping : 0\n";
        assert_eq!(
            microarchitecture(&parse_cpuinfo(rome)),
            Some("AMD EPYC 2nd Gen")
        );
        let ryzen = rome.replace("AMD EPYC 7R32", "AMD Ryzen 9 3900X");
        assert_eq!(microarchitecture(&parse_cpuinfo(&ryzen)), None);
        assert_eq!(table_row(&parse_cpuinfo(&ryzen)), GENERIC);

        let graviton2 = "processor : 0\nCPU implementer : 0x41\nCPU part : 0xd0c\n";
        assert_eq!(
            microarchitecture(&parse_cpuinfo(graviton2)),
            Some("AWS Graviton2")
        );
    }

    #[test]
    fn every_row_is_valid_and_names_its_source() {
        for row in COEFFICIENT_TABLE.iter().chain([&GENERIC]) {
            row.coefficients().validate().unwrap();
            assert!(row.source.contains("Cloud Carbon Footprint"), "{row:?}");
        }
    }

    #[test]
    fn model_meter_integrates_power_over_the_interval() {
        let mut meter = ModelMeter::new(GENERIC.coefficients(), 4);
        let ctx = MeterContext {
            elapsed: Nanos(2_000_000_000),
            cpu_utilisation: Some(0.5),
            cpus: 4,
        };
        let baseline = MeterContext {
            elapsed: Nanos(0),
            ..ctx
        };
        assert_eq!(meter.sample(&baseline).unwrap()[0].joules, Joules::ZERO);
        let joules = meter.sample(&ctx).unwrap()[0].joules.0;
        let expected = 4.0 * (0.74 + (3.5 - 0.74) * 0.5) * 2.0;
        assert!((joules - expected).abs() < 1e-9, "{joules} vs {expected}");
        assert_eq!(meter.idle_power(), Some(Watts(4.0 * 0.74)));
        assert!(meter.is_estimate());
        let err = meter
            .sample(&MeterContext {
                cpu_utilisation: None,
                ..ctx
            })
            .unwrap_err();
        assert!(matches!(err, MeterError::NoUtilisation));
    }

    #[test]
    fn the_first_interval_after_start_has_energy() {
        // The loop's baseline call has no utilisation yet (and no elapsed
        // time); the first measured interval must not be lost to it.
        let mut meter = ModelMeter::new(GENERIC.coefficients(), 4);
        let baseline = MeterContext {
            elapsed: Nanos(0),
            cpu_utilisation: None,
            cpus: 4,
        };
        assert!(meter.sample(&baseline).is_err());
        let first = MeterContext {
            elapsed: Nanos(5_000_000_000),
            cpu_utilisation: Some(0.25),
            cpus: 4,
        };
        let joules = meter.sample(&first).unwrap()[0].joules.0;
        let expected = 4.0 * (0.74 + (3.5 - 0.74) * 0.25) * 5.0;
        assert!((joules - expected).abs() < 1e-9, "{joules} vs {expected}");
    }

    #[test]
    fn fit_needs_varied_utilisation() {
        let mut fit = OnlineFit::new();
        for _ in 0..10 {
            fit.add(0.5, Watts(100.0));
        }
        assert!(fit.fit(4, "cpu").is_none());
    }

    #[test]
    fn a_coefficients_file_larger_than_the_bound_is_refused_unparsed() {
        let dir = tempfile::tempdir().unwrap();
        let valid = "idle_watts_per_cpu: 1\nmax_watts_per_cpu: 2\n";
        // Valid YAML, padded with a comment past the bound: refused by size
        // alone, so nothing larger than the bound is ever read or parsed.
        let huge = dir.path().join("huge.yaml");
        let padding = "#".repeat(MAX_COEFFICIENTS_FILE_BYTES as usize);
        std::fs::write(&huge, format!("{valid}{padding}\n")).unwrap();
        let err = load_coefficients(&huge).unwrap_err();
        assert!(matches!(err, MeterError::Coefficients { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("huge.yaml") && message.contains("larger than 1048576 bytes"),
            "{message}"
        );
        // At the bound exactly: read and parsed.
        let full = dir.path().join("full.yaml");
        let padding = "#".repeat(MAX_COEFFICIENTS_FILE_BYTES as usize - valid.len() - 1);
        std::fs::write(&full, format!("{valid}{padding}\n")).unwrap();
        assert_eq!(
            std::fs::metadata(&full).unwrap().len(),
            MAX_COEFFICIENTS_FILE_BYTES
        );
        let loaded = load_coefficients(&full).unwrap();
        assert_eq!(loaded.max_watts_per_cpu, Watts(2.0));
        // Not text: named, not a panic.
        let binary = dir.path().join("binary.json");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let message = load_coefficients(&binary).unwrap_err().to_string();
        assert!(
            message.contains("binary.json") && message.contains("UTF-8"),
            "{message}"
        );
    }
}
