//! Stage 3 of an interval: read every meter, and estimate each domain's
//! idle part.
//!
//! This stage owns what the meters remember between intervals: the
//! counters' baselines (inside each meter), the idle estimator, and the
//! online fit of CPU power against utilisation, fed only by real
//! (non-estimate) package meters.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::attribute::{self, DomainEnergy, IdleEstimator};
use crate::meter::model::ModelFit;
use crate::meter::{Meter, MeterContext, OnlineFit};
use crate::units::{Domain, Joules, Nanos, Watts};

use super::LastInterval;

pub(super) struct Metering {
    meters: Vec<Box<dyn Meter>>,
    idle: IdleEstimator,
    fit: OnlineFit,
    cpus: u32,
    cpu_model: String,
    /// When the meters were last read. Each interval's length for the meters
    /// is the time between two reads, stamped at the read itself, not the
    /// probe's interval: the two end a few milliseconds apart, more under
    /// load, and dividing one's energy by the other's length would show as
    /// power that was never drawn.
    read_at: Option<Instant>,
}

/// What the meters measured in one interval.
#[derive(Default)]
pub(super) struct Measurement {
    /// One entry per meter source and domain.
    pub energies: Vec<DomainEnergy>,
    /// Per-process GPU utilisation, where a meter measured a GPU.
    pub gpu_processes: Option<Vec<attribute::GpuProcessSample>>,
    /// For the gauges: power, which meters answered, which estimate.
    pub last: LastInterval,
    /// Time between this read of the meters and the previous one.
    pub elapsed: Nanos,
}

impl Metering {
    pub fn new(
        meters: Vec<Box<dyn Meter>>,
        idle: IdleEstimator,
        cpus: u32,
        cpu_model: String,
    ) -> Metering {
        Metering {
            meters,
            idle,
            fit: OnlineFit::new(),
            cpus,
            cpu_model,
            read_at: None,
        }
    }

    /// Reads every counter once so the first interval has a start.
    pub fn take_baselines(&mut self) {
        let ctx = MeterContext {
            elapsed: Nanos(0),
            cpu_utilisation: None,
            cpus: self.cpus,
        };
        for meter in &mut self.meters {
            let _ = meter.sample(&ctx);
        }
        self.read_at = Some(Instant::now());
    }

    /// The energy of the interval that just ended, per meter and domain,
    /// with its idle estimate. A meter that fails is reported down and
    /// skipped; the others still count.
    pub fn measure(&mut self, utilisation: Option<f64>) -> Measurement {
        let elapsed = self.time_since_last_read();
        let ctx = MeterContext {
            elapsed,
            cpu_utilisation: utilisation,
            cpus: self.cpus,
        };
        let mut measurement = Measurement {
            elapsed,
            ..Measurement::default()
        };
        for meter in &mut self.meters {
            let Some(per_domain) = read_meter(meter.as_mut(), &ctx, &mut measurement.last) else {
                continue;
            };
            if per_domain.contains_key(&Domain::Gpu) {
                measurement.gpu_processes = Some(gpu_processes(meter.as_mut()));
            }
            split_idle(&mut self.idle, meter.as_ref(), per_domain, &mut measurement);
        }
        self.learn(&measurement.energies, utilisation, elapsed);
        measurement
    }

    /// Time since the meters were last read (0 before any read), and now
    /// the time of the last read.
    fn time_since_last_read(&mut self) -> Nanos {
        let now = Instant::now();
        let elapsed = self
            .read_at
            .map_or(Nanos(0), |then| Nanos((now - then).as_nanos() as u64));
        self.read_at = Some(now);
        elapsed
    }

    /// Feeds the online fit with the measured (never modelled) package power.
    fn learn(&mut self, energies: &[DomainEnergy], utilisation: Option<f64>, elapsed: Nanos) {
        let Some(utilisation) = utilisation else {
            return;
        };
        let measured: f64 = energies
            .iter()
            .filter(|e| e.domain == Domain::Package && e.source != "model")
            .map(|e| e.energy.0)
            .sum();
        if measured > 0.0 {
            self.fit
                .add_interval(utilisation, Joules(measured), elapsed);
        }
    }

    /// The current online fit, if there are enough samples.
    pub fn model_fit(&self) -> Option<ModelFit> {
        self.fit.fit(self.cpus, &self.cpu_model)
    }

    /// The first meter's source, for series that name one (Kepler's).
    pub fn primary_source(&self) -> &'static str {
        self.meters.first().map(|m| m.source()).unwrap_or("none")
    }
}

/// One meter's energy this interval, per domain; `None` (the meter marked
/// down, with a WARN) when it could not be read. Its health and whether it
/// estimates go into `last` either way.
fn read_meter(
    meter: &mut dyn Meter,
    ctx: &MeterContext,
    last: &mut LastInterval,
) -> Option<BTreeMap<Domain, Joules>> {
    let source = meter.source();
    if meter.is_estimate() {
        last.estimate_sources.push(source);
    }
    let sampled = meter.sample(ctx);
    last.meter_health.insert(source, meter.health());
    let samples = match sampled {
        Ok(samples) => samples,
        Err(e) => {
            last.meter_up.insert(source, false);
            tracing::warn!("meter {source} failed this interval: {e}");
            return None;
        }
    };
    last.meter_up.insert(source, true);
    let mut per_domain: BTreeMap<Domain, Joules> = BTreeMap::new();
    for sample in samples {
        *per_domain.entry(sample.domain).or_default() += sample.joules;
    }
    Some(per_domain)
}

/// Per-process GPU utilisation from a meter that measured a GPU.
fn gpu_processes(meter: &mut dyn Meter) -> Vec<attribute::GpuProcessSample> {
    meter
        .gpu_processes()
        .into_iter()
        .map(|s| attribute::GpuProcessSample {
            pid: s.pid,
            sm_util_percent: s.utilisation_percent.round().clamp(0.0, 100.0) as u32,
        })
        .collect()
}

/// Each domain's energy with its idle part (the estimator's, or the
/// meter's own idle power where it models one), and its power for the
/// gauges.
fn split_idle(
    idle: &mut IdleEstimator,
    meter: &dyn Meter,
    per_domain: BTreeMap<Domain, Joules>,
    measurement: &mut Measurement,
) {
    let source = meter.source();
    let elapsed = measurement.elapsed;
    if let Some(watts) = meter.idle_power() {
        for domain in per_domain.keys() {
            idle.set_model_idle(*domain, source, watts);
        }
    }
    for (domain, energy) in per_domain {
        let idle = idle.estimate(domain, source, energy, elapsed).idle;
        if elapsed.0 > 0 {
            measurement
                .last
                .power
                .insert((domain, source), Watts(energy.0 / elapsed.as_secs_f64()));
        }
        measurement.energies.push(DomainEnergy {
            domain,
            source: source.to_owned(),
            energy,
            idle,
        });
    }
}
