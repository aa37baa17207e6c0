//! Idle power per domain and meter source: what the hardware draws doing
//! nothing, which the idle policy shares differently from the active part.
//!
//! Three sources, first one set wins:
//! 1. a configured wattage for the domain (the operator measured it);
//! 2. the power model's idle term (where the meter *is* the model);
//! 3. learned from the meter: a low percentile of the power seen over a
//!    sliding window of intervals. A plain minimum would be dragged down for
//!    good by one glitched reading (a counter read early, a reset counted as
//!    zero), so the percentile never takes the lowest sample once there are
//!    two; the window's end is the decay: a minimum older than the window
//!    stops counting, so a changed machine (a BIOS power setting, a new
//!    firmware) is relearned. Until `warmup` intervals are in, the estimate
//!    is 0 (all energy active) rather than a guess from too few samples, and
//!    says so ([`IdleBasis::Learning`]).
//!
//! Whatever the source, `E_idle = min(E, P_idle × elapsed)`, never negative.
//! Note that a node busy through the whole window learns its busy power as
//! idle; configure the wattage where that matters.

use std::collections::{HashMap, VecDeque};

use crate::units::{Domain, Joules, Nanos, Watts};

/// How the learned idle power is computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnedIdleConfig {
    /// Intervals kept (720 × 5 s = 1 h).
    pub window: usize,
    /// Which low percentile of the window is the idle power (0.05 = 5th).
    pub percentile: f64,
    /// Intervals needed before the learned value is used.
    pub warmup: usize,
}

impl Default for LearnedIdleConfig {
    fn default() -> Self {
        LearnedIdleConfig {
            window: 720,
            percentile: 0.05,
            warmup: 6,
        }
    }
}

/// Where an idle estimate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleBasis {
    Configured,
    Model,
    Learned,
    /// Fewer than `warmup` intervals seen: idle counted as 0 for now.
    Learning,
}

/// The idle part of one interval's energy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IdleEstimate {
    pub idle: Joules,
    pub power: Watts,
    pub basis: IdleBasis,
}

#[derive(Debug, Default)]
struct PowerWindow {
    watts: VecDeque<f64>,
}

/// Idle power per (domain, source); see the module docs.
#[derive(Debug, Default)]
pub struct IdleEstimator {
    learned_config: LearnedIdleConfig,
    configured: HashMap<Domain, Watts>,
    model: HashMap<(Domain, String), Watts>,
    learned: HashMap<(Domain, String), PowerWindow>,
}

impl IdleEstimator {
    pub fn new(learned_config: LearnedIdleConfig) -> Self {
        IdleEstimator {
            learned_config: LearnedIdleConfig {
                window: learned_config.window.max(1),
                percentile: learned_config.percentile.clamp(0.0, 1.0),
                warmup: learned_config.warmup.max(1),
            },
            ..Default::default()
        }
    }

    /// A configured idle wattage, for every source of `domain` (each RAPL
    /// package socket, each GPU draws it on its own).
    pub fn set_configured(&mut self, domain: Domain, watts: Watts) {
        self.configured.insert(domain, watts);
    }

    /// The power model's idle term for one source.
    pub fn set_model_idle(&mut self, domain: Domain, source: &str, watts: Watts) {
        self.model.insert((domain, source.to_owned()), watts);
    }

    /// Records this interval's power and returns its idle part. Intervals
    /// with no elapsed time or an unusable energy value teach nothing.
    pub fn estimate(
        &mut self,
        domain: Domain,
        source: &str,
        energy: Joules,
        elapsed: Nanos,
    ) -> IdleEstimate {
        let seconds = elapsed.as_secs_f64();
        if seconds > 0.0 && energy.0 >= 0.0 && energy.0.is_finite() {
            let window = self.learned.entry((domain, source.to_owned())).or_default();
            if window.watts.len() == self.learned_config.window {
                window.watts.pop_front();
            }
            window.watts.push_back(energy.0 / seconds);
        }
        let (power, basis) = self.idle_power(domain, source);
        let power_watts = if power.0 > 0.0 && power.0.is_finite() {
            power.0
        } else {
            0.0
        };
        let measured = if energy.0 > 0.0 && energy.0.is_finite() {
            energy.0
        } else {
            0.0
        };
        IdleEstimate {
            idle: Joules((power_watts * seconds).min(measured)),
            power,
            basis,
        }
    }

    /// The idle power that would be used now, and where it comes from.
    pub fn idle_power(&self, domain: Domain, source: &str) -> (Watts, IdleBasis) {
        if let Some(watts) = self.configured.get(&domain) {
            return (*watts, IdleBasis::Configured);
        }
        let key = (domain, source.to_owned());
        if let Some(watts) = self.model.get(&key) {
            return (*watts, IdleBasis::Model);
        }
        match self.learned.get(&key) {
            Some(window) if window.watts.len() >= self.learned_config.warmup => {
                (Watts(self.low_percentile(window)), IdleBasis::Learned)
            }
            _ => (Watts(0.0), IdleBasis::Learning),
        }
    }

    fn low_percentile(&self, window: &PowerWindow) -> f64 {
        let mut watts: Vec<f64> = window.watts.iter().copied().collect();
        let n = watts.len();
        // Never the single lowest sample once there are two: robust to one outlier.
        let rank = ((self.learned_config.percentile * (n - 1) as f64).floor() as usize)
            .max(1)
            .min(n - 1);
        *watts.select_nth_unstable_by(rank, f64::total_cmp).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Nanos = Nanos(1_000_000_000);

    fn learner(window: usize, warmup: usize) -> IdleEstimator {
        IdleEstimator::new(LearnedIdleConfig {
            window,
            percentile: 0.05,
            warmup,
        })
    }

    #[test]
    fn configured_beats_model_beats_learned() {
        let mut estimator = learner(10, 1);
        let first = estimator.estimate(Domain::Package, "rapl:0", Joules(30.0), SECOND);
        assert_eq!(first.basis, IdleBasis::Learned);
        estimator.set_model_idle(Domain::Package, "rapl:0", Watts(12.0));
        let model = estimator.estimate(Domain::Package, "rapl:0", Joules(30.0), SECOND);
        assert_eq!((model.idle, model.basis), (Joules(12.0), IdleBasis::Model));
        estimator.set_configured(Domain::Package, Watts(8.0));
        let configured = estimator.estimate(Domain::Package, "rapl:0", Joules(30.0), SECOND);
        assert_eq!(
            (configured.idle, configured.basis),
            (Joules(8.0), IdleBasis::Configured)
        );
        // Another source of the same domain gets the configured value too.
        let other = estimator.estimate(Domain::Package, "rapl:1", Joules(30.0), SECOND);
        assert_eq!(other.idle, Joules(8.0));
    }

    #[test]
    fn idle_never_exceeds_the_interval_energy() {
        let mut estimator = learner(10, 1);
        estimator.set_configured(Domain::Dram, Watts(50.0));
        let estimate =
            estimator.estimate(Domain::Dram, "rapl:0", Joules(3.0), Nanos(2_000_000_000));
        assert_eq!(estimate.idle, Joules(3.0));
        let negative = estimator.estimate(Domain::Dram, "rapl:0", Joules(-1.0), SECOND);
        assert_eq!(negative.idle, Joules(0.0));
    }

    #[test]
    fn learning_until_warm_then_robust_to_one_low_outlier() {
        let mut estimator = learner(100, 3);
        let mut estimate =
            |joules: f64| estimator.estimate(Domain::Package, "rapl:0", Joules(joules), SECOND);
        assert_eq!(estimate(40.0).basis, IdleBasis::Learning);
        assert_eq!(estimate(0.5).idle, Joules(0.0)); // the glitch, still learning
        let warm = estimate(30.0);
        assert_eq!(warm.basis, IdleBasis::Learned);
        // Samples 40, 0.5, 30: the 0.5 outlier is skipped.
        assert_eq!(warm.power, Watts(30.0));
        for _ in 0..10 {
            estimate(35.0);
        }
        assert_eq!(estimate(50.0).power, Watts(30.0));
    }

    #[test]
    fn old_minima_leave_the_window() {
        let mut estimator = learner(4, 1);
        for joules in [10.0, 10.0, 20.0, 20.0] {
            estimator.estimate(Domain::Package, "rapl:0", Joules(joules), SECOND);
        }
        assert_eq!(
            estimator.idle_power(Domain::Package, "rapl:0").0,
            Watts(10.0)
        );
        for _ in 0..3 {
            estimator.estimate(Domain::Package, "rapl:0", Joules(20.0), SECOND);
        }
        assert_eq!(
            estimator.idle_power(Domain::Package, "rapl:0").0,
            Watts(20.0)
        );
    }

    #[test]
    fn zero_elapsed_teaches_nothing() {
        let mut estimator = learner(10, 1);
        let estimate = estimator.estimate(Domain::Gpu, "nvml:0", Joules(5.0), Nanos(0));
        assert_eq!(
            (estimate.idle, estimate.basis),
            (Joules(0.0), IdleBasis::Learning)
        );
    }
}
