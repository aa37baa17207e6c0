//! Grid carbon intensity (`--carbon-intensity`), exported as a gauge so that
//! Prometheus recording rules turn joules into CO₂e:
//!
//! ```text
//! grams CO₂e = joules / 3.6e6 (J per kWh) × ergon_grid_carbon_intensity_grams_per_kwh
//! ```
//!
//! Decisions:
//! - The exporter only carries the number; the arithmetic lives in the
//!   recording rules, where the intensity of each moment multiplies the
//!   energy of that moment (a later intensity never rewrites past CO₂e).
//! - The value is a number, or a file holding one that a CronJob or a
//!   sidecar rewrites from a grid-data service. The file is checked every
//!   interval (one `stat`) and re-read when its modification time or size
//!   changes.
//! - A file that cannot be read or parsed keeps the last good value, logs
//!   one WARN naming the file (again only when the problem changes), and the
//!   staleness shows in `ergon_grid_carbon_intensity_timestamp_seconds`, the
//!   Unix time of the value in use (the file's modification time; a fixed
//!   number has none, it never goes stale). Until a first good value there is
//!   no intensity series at all: an absent series makes CO₂e absent, where a
//!   0 would claim carbon-free power.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

pub const CARBON_INTENSITY: &str = "ergon_grid_carbon_intensity_grams_per_kwh";
pub const CARBON_INTENSITY_TIMESTAMP: &str = "ergon_grid_carbon_intensity_timestamp_seconds";
pub const CARBON_INTENSITY_HELP: &str = "Carbon intensity of the grid's electricity in gCO2e/kWh \
     (--carbon-intensity). CO2e grams = joules / 3.6e6 * this.";
pub const CARBON_INTENSITY_TIMESTAMP_HELP: &str = "Unix time of the carbon intensity in use: when \
     its file last changed (absent for a fixed --carbon-intensity). Alert when it falls behind the \
     grid data's period.";

/// Grams of CO₂-equivalent emitted per kilowatt-hour drawn from the grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GramsPerKwh(pub f64);

/// What `--carbon-intensity` names.
#[derive(Clone, Debug, PartialEq)]
pub enum CarbonSource {
    Fixed(GramsPerKwh),
    File(PathBuf),
}

impl CarbonSource {
    /// A number is a fixed intensity; anything else is a file path.
    pub fn parse(text: &str) -> Result<CarbonSource, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("--carbon-intensity is empty: give gCO2e/kWh (e.g. 350) or a file".into());
        }
        if text.parse::<f64>().is_ok() {
            return parse_intensity(text)
                .map(CarbonSource::Fixed)
                .map_err(|reason| format!("--carbon-intensity `{text}`: {reason}"));
        }
        Ok(CarbonSource::File(PathBuf::from(text)))
    }
}

/// `350`, `412.5\n`: a finite, non-negative number of gCO₂e/kWh.
pub fn parse_intensity(text: &str) -> Result<GramsPerKwh, String> {
    let text = text.trim();
    let value: f64 = text.parse().map_err(|_| {
        format!(
            "`{}` is not a number of gCO2e/kWh (write one number, e.g. 350)",
            text.chars().take(40).collect::<String>()
        )
    })?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "{value} is not a carbon intensity (a finite number ≥ 0 of gCO2e/kWh)"
        ));
    }
    Ok(GramsPerKwh(value))
}

#[derive(Debug, Default)]
struct Reading {
    /// The value in use and the Unix time it is from (`None`: fixed).
    value: Option<(GramsPerKwh, Option<f64>)>,
    /// The file's (modification time, size) when last read.
    seen: Option<(SystemTime, u64)>,
    /// The problem last logged, so one problem is one WARN.
    problem: Option<String>,
}

/// The intensity in use, shared by the refreshing task and the registry
/// (it is a [`Collector`] of both gauges). Cloning shares it.
#[derive(Clone)]
pub struct CarbonIntensity {
    source: CarbonSource,
    reading: Arc<Mutex<Reading>>,
    intensity: prometheus::Gauge,
    timestamp: prometheus::Gauge,
}

impl CarbonIntensity {
    /// A fixed value is in use at once; a file is read by the first
    /// [`refresh`](Self::refresh).
    pub fn new(source: CarbonSource) -> CarbonIntensity {
        let intensity = prometheus::Gauge::new(CARBON_INTENSITY, CARBON_INTENSITY_HELP)
            .expect("a valid metric name");
        let timestamp =
            prometheus::Gauge::new(CARBON_INTENSITY_TIMESTAMP, CARBON_INTENSITY_TIMESTAMP_HELP)
                .expect("a valid metric name");
        let mut reading = Reading::default();
        if let CarbonSource::Fixed(value) = source {
            reading.value = Some((value, None));
        }
        CarbonIntensity {
            source,
            reading: Arc::new(Mutex::new(reading)),
            intensity,
            timestamp,
        }
    }

    /// The value in use and, for a file, its Unix time.
    pub fn current(&self) -> Option<(GramsPerKwh, Option<f64>)> {
        self.lock().value
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reading> {
        self.reading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the file if it changed; a fixed value needs nothing.
    pub fn refresh(&self) {
        let CarbonSource::File(path) = &self.source else {
            return;
        };
        let mut reading = self.lock();
        let seen = std::fs::metadata(path).and_then(|meta| Ok((meta.modified()?, meta.len())));
        let outcome = match seen {
            Ok(seen) if reading.seen == Some(seen) => return,
            Ok(seen) => {
                reading.seen = Some(seen);
                read_bounded(path)
                    .and_then(|text| parse_intensity(&text))
                    .map(|value| (value, Some(unix_seconds(seen.0))))
            }
            Err(e) => {
                reading.seen = None;
                Err(e.to_string())
            }
        };
        match outcome {
            Ok(value) => {
                if reading.problem.take().is_some() || reading.value.is_none() {
                    tracing::info!(
                        file = %path.display(),
                        grams_per_kwh = value.0.0,
                        "carbon intensity read"
                    );
                }
                reading.value = Some(value);
            }
            Err(reason) => {
                if reading.problem.as_deref() != Some(reason.as_str()) {
                    warn_unusable(path, &reason, reading.value);
                    reading.problem = Some(reason);
                }
            }
        }
    }
}

/// The most a carbon intensity file may hold: it holds one number, so a
/// larger file is refused unparsed (a wrong path, a device, a file that
/// grows) and costs no unbounded allocation.
pub const MAX_CARBON_FILE_BYTES: u64 = 4096;

/// The file's text, at most [`MAX_CARBON_FILE_BYTES`] of it; a larger file
/// is an error (which the caller's WARN names with the file).
fn read_bounded(path: &Path) -> Result<String, String> {
    let bytes = crate::read_at_most(path, MAX_CARBON_FILE_BYTES)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "larger than {MAX_CARBON_FILE_BYTES} bytes, which no single number of gCO2e/kWh is"
            )
        })?;
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

fn warn_unusable(path: &Path, reason: &str, kept: Option<(GramsPerKwh, Option<f64>)>) {
    match kept {
        Some((value, _)) => tracing::warn!(
            "carbon intensity file {} (--carbon-intensity) is unusable: {reason}; keeping the \
             last value, {} gCO2e/kWh, and its timestamp",
            path.display(),
            value.0
        ),
        None => tracing::warn!(
            "carbon intensity file {} (--carbon-intensity) is unusable: {reason}; no intensity \
             is exported until it holds one number of gCO2e/kWh",
            path.display()
        ),
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

impl Collector for CarbonIntensity {
    fn desc(&self) -> Vec<&Desc> {
        self.intensity
            .desc()
            .into_iter()
            .chain(self.timestamp.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some((value, unix_time)) = self.current() else {
            return Vec::new();
        };
        self.intensity.set(value.0);
        let mut families = self.intensity.collect();
        if let Some(unix_time) = unix_time {
            self.timestamp.set(unix_time);
            families.extend(self.timestamp.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(carbon: &CarbonIntensity) -> String {
        let registry = prometheus::Registry::new();
        registry.register(Box::new(carbon.clone())).unwrap();
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
    }

    #[test]
    fn numbers_are_fixed_values_and_other_text_is_a_file() {
        assert_eq!(
            CarbonSource::parse("350"),
            Ok(CarbonSource::Fixed(GramsPerKwh(350.0)))
        );
        assert_eq!(
            CarbonSource::parse(" 12.5 "),
            Ok(CarbonSource::Fixed(GramsPerKwh(12.5)))
        );
        assert_eq!(
            CarbonSource::parse("/etc/ergon/carbon"),
            Ok(CarbonSource::File("/etc/ergon/carbon".into()))
        );
        for bad in ["-3", "NaN", "inf", ""] {
            let error = CarbonSource::parse(bad).unwrap_err();
            assert!(error.contains("--carbon-intensity"), "{bad}: {error}");
        }
        assert!(parse_intensity("412\n").is_ok());
        assert!(
            parse_intensity("four hundred")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn a_fixed_value_is_exported_without_a_timestamp_that_could_go_stale() {
        let carbon = CarbonIntensity::new(CarbonSource::Fixed(GramsPerKwh(350.0)));
        let text = gathered(&carbon);
        assert!(
            text.contains("ergon_grid_carbon_intensity_grams_per_kwh 350\n"),
            "{text}"
        );
        assert!(!text.contains(CARBON_INTENSITY_TIMESTAMP), "{text}");
    }

    #[test]
    fn a_file_is_reread_when_it_changes_and_a_bad_file_keeps_the_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("intensity");
        let carbon = CarbonIntensity::new(CarbonSource::File(file.clone()));
        // Missing: no series at all (0 would claim carbon-free power).
        carbon.refresh();
        assert_eq!(carbon.current(), None);
        assert!(
            !gathered(&carbon).contains(CARBON_INTENSITY),
            "exported before a value"
        );

        std::fs::write(&file, "412.5\n").unwrap();
        let modified = |at: u64| {
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_modified(UNIX_EPOCH + std::time::Duration::from_secs(at))
                .unwrap()
        };
        modified(1_800_000_000);
        carbon.refresh();
        assert_eq!(carbon.current(), Some((GramsPerKwh(412.5), Some(1.8e9))));

        // Rewritten by the CronJob: the new value and its time.
        std::fs::write(&file, "97\n").unwrap();
        modified(1_800_000_900);
        carbon.refresh();
        assert_eq!(
            carbon.current(),
            Some((GramsPerKwh(97.0), Some(1_800_000_900.0)))
        );

        // Garbage: the last value and its (now old) timestamp stay.
        std::fs::write(&file, "<html>502 Bad Gateway</html>\n").unwrap();
        modified(1_800_001_800);
        carbon.refresh();
        assert_eq!(
            carbon.current(),
            Some((GramsPerKwh(97.0), Some(1_800_000_900.0)))
        );
        let text = gathered(&carbon);
        assert!(
            text.contains("ergon_grid_carbon_intensity_grams_per_kwh 97\n"),
            "{text}"
        );
        assert!(
            text.contains("ergon_grid_carbon_intensity_timestamp_seconds 1800000900\n"),
            "{text}"
        );

        // Deleted: still the last value.
        std::fs::remove_file(&file).unwrap();
        carbon.refresh();
        assert_eq!(carbon.current().map(|(v, _)| v), Some(GramsPerKwh(97.0)));
    }

    #[test]
    fn a_file_larger_than_the_bound_is_refused_unparsed_and_keeps_the_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("intensity");
        let carbon = CarbonIntensity::new(CarbonSource::File(file.clone()));
        std::fs::write(&file, "97\n").unwrap();
        carbon.refresh();
        assert_eq!(carbon.current().map(|(v, _)| v), Some(GramsPerKwh(97.0)));

        // A number that would parse, padded with whitespace past the bound:
        // refused by size alone (nothing past the bound is read), and the
        // reason the WARN gives (with the file's name) says so.
        let padded = format!("412{}", "\n".repeat(MAX_CARBON_FILE_BYTES as usize));
        assert!(parse_intensity(&padded).is_ok());
        std::fs::write(&file, &padded).unwrap();
        carbon.refresh();
        assert_eq!(carbon.current().map(|(v, _)| v), Some(GramsPerKwh(97.0)));
        let problem = carbon.lock().problem.clone().unwrap_or_default();
        assert!(problem.contains("larger than 4096 bytes"), "{problem}");

        // At the bound exactly: read.
        let full = format!("412{}", "\n".repeat(MAX_CARBON_FILE_BYTES as usize - 3));
        std::fs::write(&file, &full).unwrap();
        carbon.refresh();
        assert_eq!(carbon.current().map(|(v, _)| v), Some(GramsPerKwh(412.0)));
        assert_eq!(carbon.lock().problem, None);
    }
}
