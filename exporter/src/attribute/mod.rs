//! One interval's energy → joules per workload. Pure arithmetic, no I/O.
//!
//! Per interval and per meter source of a domain:
//!
//! 1. `E` is what the meter measured; `E_idle` is the idle estimate
//!    ([`IdleEstimator`]), clamped to `[0, E]` here whatever the caller
//!    passes, so no split can go negative or exceed the measurement;
//!    `E_active = E − E_idle`.
//! 2. `E_active` is split in proportion to usage across *every* workload
//!    that ran (pods, system buckets, the kernel): by CPU cycles when every
//!    workload that used CPU time also has a cycle count (a PMU is present
//!    and counted it), otherwise by CPU time. Mixing the two would compare
//!    cycles with nanoseconds, so one missing cycle count drops the whole
//!    interval to CPU time. With no usage at all, `E_active` stays on the
//!    node as `node_active_unattributed` rather than vanishing.
//! 3. `E_idle` is split by the caller's idle weights (`--idle-policy`:
//!    pods' CPU requests, 1.0 per pod, or none); with no positive weight it
//!    stays on the node as `node_idle`.
//! 4. `residual = E − (Σ workloads + node_idle + node_active_unattributed)`,
//!    computed in f64 from the meter's value as given: ~1e-16·E from
//!    rounding when the input is sane; a negative or NaN meter value (which
//!    attributes nothing) shows up in it instead of being hidden.
//!
//! GPU energy goes through the same split with weights from per-process
//! utilisation ([`gpu_usage_by_workload`], [`attribute_by_weights`]).
//! [`Ledger`] accumulates the results into counters that never decrease.
//!
//! Each key's fraction `weight / Σweights` depends on the interval's usage,
//! not on the domain: an interval computes its [`Shares`] once and every
//! domain multiplies them by its joules. The per-process split, thousands of
//! keys over every CPU domain, is booked from one [`SharedSplit`] in one
//! visit per process instead of a map per domain (issue 13; BENCHMARKS.md).

mod gpu;
mod idle;
mod ledger;

use std::collections::HashMap;
use std::hash::Hash;

use crate::units::{Domain, Joules};

pub use gpu::{GpuProcessSample, gpu_usage_by_workload};
pub use idle::{IdleBasis, IdleEstimate, IdleEstimator, LearnedIdleConfig};
pub use ledger::{DEFAULT_RETENTION, Ledger, NodeCounters, SeriesNames, WorkloadCounters};

/// One workload's usage in one interval (deltas, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub cpu_ns: u64,
    /// Zero where no PMU counted cycles.
    pub cycles: u64,
}

/// One meter source's energy for one domain and interval.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainEnergy {
    pub domain: Domain,
    /// The meter that measured it (`rapl:package-0`, `nvml:0`, `model`…).
    pub source: String,
    /// Measured this interval.
    pub energy: Joules,
    /// Idle estimate for the interval, from [`IdleEstimator`].
    pub idle: Joules,
}

/// What the active part was split by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActiveBasis {
    Cycles,
    CpuTime,
    /// Caller-supplied weights ([`attribute_by_weights`], e.g. GPU utilisation).
    Weights,
    /// Nothing was used: the active energy stayed on the node.
    NoUsage,
}

/// A workload's share of one interval's energy.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadJoules {
    pub active: Joules,
    pub idle: Joules,
}

impl WorkloadJoules {
    pub fn total(&self) -> Joules {
        self.active + self.idle
    }
}

/// The split of one [`DomainEnergy`].
#[derive(Clone, Debug)]
pub struct Attribution<K> {
    pub domain: Domain,
    pub source: String,
    pub basis: ActiveBasis,
    /// Only workloads that received energy.
    pub per_workload: HashMap<K, WorkloadJoules>,
    /// Idle energy no workload was given (all of it under `--idle-policy none`).
    pub node_idle: Joules,
    /// Active energy of an interval in which nothing was used.
    pub node_active_unattributed: Joules,
    /// The energy split: the meter's value, or 0 when that was negative or not
    /// a number.
    pub measured: Joules,
    /// The idle part of `measured` (the estimate clamped to `[0, measured]`).
    pub idle: Joules,
    /// Meter value − everything handed out; see the module docs.
    pub residual: Joules,
}

impl<K> Attribution<K> {
    /// The active part of `measured`.
    pub fn active(&self) -> Joules {
        self.measured - self.idle
    }
}

/// Splits one interval's energy by usage (cycles or CPU time, see the module
/// docs) and its idle part by `idle_weights`.
pub fn attribute<K: Eq + Hash + Clone>(
    energy: &DomainEnergy,
    usage: &HashMap<K, Usage>,
    idle_weights: &HashMap<K, f64>,
) -> Attribution<K> {
    Shares::of_usage(usage).split(energy, &Shares::of_weights(idle_weights))
}

/// Splits one interval's energy by arbitrary non-negative active weights
/// (non-finite and negative weights count as 0), e.g. GPU utilisation.
pub fn attribute_by_weights<K: Eq + Hash + Clone>(
    energy: &DomainEnergy,
    active_weights: &HashMap<K, f64>,
    idle_weights: &HashMap<K, f64>,
) -> Attribution<K> {
    Shares::of_weights(active_weights).split(energy, &Shares::of_weights(idle_weights))
}

/// Each key's fraction of one interval's weights, `weight / Σweights`, for
/// the keys with a positive, finite weight; empty when no weight is positive.
/// A split gives each key `joules × fraction`: the product the split made
/// when it summed the weights per domain, so the joules are the same f64.
#[derive(Clone, Debug)]
pub struct Shares<'a, K> {
    basis: ActiveBasis,
    fractions: Vec<(&'a K, f64)>,
}

impl<'a, K: Eq + Hash + Clone> Shares<'a, K> {
    /// Shares by usage: cycles when every workload that used CPU time also
    /// has a cycle count, else CPU time (see the module docs).
    pub fn of_usage(usage: &'a HashMap<K, Usage>) -> Self {
        let pmu_counted = usage.values().all(|u| u.cpu_ns == 0 || u.cycles > 0);
        let total_cycles: u128 = usage.values().map(|u| u128::from(u.cycles)).sum();
        let total_cpu_ns: u128 = usage.values().map(|u| u128::from(u.cpu_ns)).sum();
        let (basis, by): (ActiveBasis, fn(&Usage) -> u64) = if pmu_counted && total_cycles > 0 {
            (ActiveBasis::Cycles, |u| u.cycles)
        } else if total_cpu_ns > 0 {
            (ActiveBasis::CpuTime, |u| u.cpu_ns)
        } else {
            (ActiveBasis::NoUsage, |_| 0)
        };
        Shares::new(basis, usage.iter().map(|(key, u)| (key, by(u) as f64)))
    }

    /// Shares by caller-supplied weights (GPU utilisation, idle weights).
    pub fn of_weights(weights: &'a HashMap<K, f64>) -> Self {
        Shares::new(
            ActiveBasis::Weights,
            weights.iter().map(|(key, weight)| (key, *weight)),
        )
    }

    fn new(basis: ActiveBasis, weights: impl Iterator<Item = (&'a K, f64)> + Clone) -> Self {
        let usable = |w: &(&'a K, f64)| w.1 > 0.0 && w.1.is_finite();
        let total: f64 = weights.clone().filter(usable).map(|(_, w)| w).sum();
        let fractions = if total > 0.0 && total.is_finite() {
            weights
                .filter(usable)
                .map(|(key, weight)| (key, weight / total))
                .collect()
        } else {
            Vec::new()
        };
        Shares { basis, fractions }
    }

    /// What the active part is split by.
    pub fn basis(&self) -> ActiveBasis {
        self.basis
    }

    /// Keys with a share.
    pub fn len(&self) -> usize {
        self.fractions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fractions.is_empty()
    }

    /// Gives each key `joules × fraction`; returns what is left
    /// undistributed: all of it when nothing has a share or `joules` is not
    /// positive, else 0.
    fn share_out(&self, joules: f64, mut give: impl FnMut(&'a K, f64)) -> f64 {
        if joules <= 0.0 || self.fractions.is_empty() {
            return joules;
        }
        for &(key, fraction) in &self.fractions {
            give(key, joules * fraction);
        }
        0.0
    }

    /// Splits one domain's energy: its active part by these shares, its
    /// idle part by `idle`.
    pub fn split(&self, energy: &DomainEnergy, idle: &Shares<'a, K>) -> Attribution<K> {
        let (measured, idle_joules) = clamped(energy);
        let active = measured - idle_joules;
        let mut per_workload: HashMap<K, WorkloadJoules> =
            HashMap::with_capacity(self.len().max(idle.len()));
        let active_left = self.share_out(active, |key, joules| {
            per_workload.entry(key.clone()).or_default().active = Joules(joules);
        });
        let idle_left = idle.share_out(idle_joules, |key, joules| {
            per_workload.entry(key.clone()).or_default().idle = Joules(joules);
        });
        let handed_out: f64 = per_workload
            .values()
            .map(|w| w.active.0 + w.idle.0)
            .sum::<f64>()
            + idle_left
            + active_left;
        Attribution {
            per_workload,
            ..self.summary(
                energy,
                (measured, idle_joules),
                active_left,
                idle_left,
                handed_out,
            )
        }
    }

    /// The split's figures without the per-key map.
    fn summary(
        &self,
        energy: &DomainEnergy,
        (measured, idle): (f64, f64),
        active_left: f64,
        idle_left: f64,
        handed_out: f64,
    ) -> Attribution<K> {
        Attribution {
            domain: energy.domain,
            source: energy.source.clone(),
            basis: if active_left > 0.0 {
                ActiveBasis::NoUsage
            } else {
                self.basis
            },
            per_workload: HashMap::new(),
            node_idle: Joules(idle_left),
            node_active_unattributed: Joules(active_left),
            measured: Joules(measured),
            idle: Joules(idle),
            residual: Joules(energy.energy.0 - handed_out),
        }
    }
}

/// The meter's value as split: 0 when negative or not a number; and the
/// idle estimate clamped to `[0, measured]` (NaN compares false both ways
/// and ends at 0).
fn clamped(energy: &DomainEnergy) -> (f64, f64) {
    let measured = if energy.energy.0 > 0.0 && energy.energy.0.is_finite() {
        energy.energy.0
    } else {
        0.0
    };
    let idle = if energy.idle.0 > 0.0 {
        energy.idle.0.min(measured)
    } else {
        0.0
    };
    (measured, idle)
}

/// Several domains' energy split by one set of [`Shares`], idle left on the
/// node: the per-process split of every CPU domain. Per key and domain the
/// same joules as [`Shares::split`] with no idle weights, but no map is
/// built per domain: [`Ledger::apply_shared`] books every domain of a key
/// in one visit.
#[derive(Clone, Debug)]
pub struct SharedSplit<'a, K> {
    shares: Shares<'a, K>,
    /// Per domain, the split's figures (`per_workload` empty).
    domains: Vec<Attribution<K>>,
    /// `(domain, active joules)` of the domains whose active energy went to
    /// the shares.
    shared: Vec<(Domain, f64)>,
}

impl<'a, K: Eq + Hash + Clone> SharedSplit<'a, K> {
    pub fn new<'e>(
        shares: Shares<'a, K>,
        energies: impl Iterator<Item = &'e DomainEnergy>,
    ) -> Self {
        let mut domains = Vec::new();
        let mut shared = Vec::new();
        for energy in energies {
            let (measured, idle) = clamped(energy);
            let active = measured - idle;
            // Σ over the keys of `active × fraction`, in the keys' order.
            let mut given = 0.0;
            let active_left = shares.share_out(active, |_, joules| given += joules);
            if active > 0.0 && !shares.is_empty() {
                shared.push((energy.domain, active));
            }
            // No idle weights: the idle part stays on the node.
            let idle_left = idle;
            let handed_out = given + idle_left + active_left;
            domains.push(shares.summary(
                energy,
                (measured, idle),
                active_left,
                idle_left,
                handed_out,
            ));
        }
        SharedSplit {
            shares,
            domains,
            shared,
        }
    }

    /// Per domain: the split's figures, without the per-key map.
    pub fn domains(&self) -> &[Attribution<K>] {
        &self.domains
    }

    /// Each key with a share and its active joules in every domain that had
    /// active energy to split (keys appear once; domains in the order given).
    pub fn per_key(&self) -> impl Iterator<Item = (&'a K, impl Iterator<Item = (Domain, Joules)>)> {
        let shared = &self.shared;
        self.shares
            .fractions
            .iter()
            .filter(move |_| !shared.is_empty())
            .map(move |&(key, fraction)| {
                let joules = shared
                    .iter()
                    .map(move |&(domain, active)| (domain, Joules(active * fraction)));
                (key, joules)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn energy(joules: f64, idle: f64) -> DomainEnergy {
        DomainEnergy {
            domain: Domain::Package,
            source: "rapl:package-0".into(),
            energy: Joules(joules),
            idle: Joules(idle),
        }
    }

    fn usage(entries: &[(&'static str, u64, u64)]) -> HashMap<&'static str, Usage> {
        entries
            .iter()
            .map(|&(key, cpu_ns, cycles)| (key, Usage { cpu_ns, cycles }))
            .collect()
    }

    #[test]
    fn active_split_by_cycles_when_every_runner_has_them() {
        let result = attribute(
            &energy(70.0, 0.0),
            &usage(&[("a", 100, 1), ("b", 100, 2), ("c", 1, 4)]),
            &HashMap::new(),
        );
        assert_eq!(result.basis, ActiveBasis::Cycles);
        assert!((result.per_workload["a"].active.0 - 10.0).abs() < 1e-12);
        assert!((result.per_workload["b"].active.0 - 20.0).abs() < 1e-12);
        assert!((result.per_workload["c"].active.0 - 40.0).abs() < 1e-12);
        assert!(result.residual.0.abs() < 1e-12);
    }

    #[test]
    fn one_missing_cycle_count_falls_back_to_cpu_time() {
        let result = attribute(
            &energy(40.0, 0.0),
            &usage(&[("a", 300, 5), ("b", 100, 0)]),
            &HashMap::new(),
        );
        assert_eq!(result.basis, ActiveBasis::CpuTime);
        assert!((result.per_workload["a"].active.0 - 30.0).abs() < 1e-12);
        assert!((result.per_workload["b"].active.0 - 10.0).abs() < 1e-12);
    }

    #[test]
    fn idle_stays_on_node_without_weights_and_follows_weights_otherwise() {
        let used = usage(&[("a", 1, 0), ("b", 3, 0)]);
        let kept = attribute(&energy(10.0, 6.0), &used, &HashMap::new());
        assert_eq!(kept.node_idle, Joules(6.0));
        assert!((kept.per_workload["a"].active.0 - 1.0).abs() < 1e-12);
        assert_eq!(kept.per_workload["a"].idle, Joules(0.0));

        // cpu-requests: b asked for 3× a's CPU; c used nothing but still pays idle.
        let weights = HashMap::from([("a", 100.0), ("b", 300.0), ("c", 200.0)]);
        let shared = attribute(&energy(10.0, 6.0), &used, &weights);
        assert_eq!(shared.node_idle, Joules(0.0));
        assert!((shared.per_workload["a"].idle.0 - 1.0).abs() < 1e-12);
        assert!((shared.per_workload["b"].idle.0 - 3.0).abs() < 1e-12);
        assert!((shared.per_workload["c"].idle.0 - 2.0).abs() < 1e-12);
        assert_eq!(shared.per_workload["c"].active, Joules(0.0));
        assert!(shared.residual.0.abs() < 1e-12);
    }

    #[test]
    fn no_usage_keeps_active_energy_on_the_node() {
        let result = attribute(&energy(5.0, 2.0), &usage(&[("a", 0, 0)]), &HashMap::new());
        assert_eq!(result.basis, ActiveBasis::NoUsage);
        assert_eq!(result.node_active_unattributed, Joules(3.0));
        assert_eq!(result.node_idle, Joules(2.0));
        assert!(result.per_workload.is_empty());
        assert_eq!(result.residual, Joules(0.0));
    }

    #[test]
    fn idle_estimate_above_the_measurement_is_clamped() {
        let result = attribute(&energy(5.0, 9.0), &usage(&[("a", 1, 0)]), &HashMap::new());
        assert_eq!(result.idle, Joules(5.0));
        assert_eq!(result.active(), Joules(0.0));
        assert_eq!(result.node_idle, Joules(5.0));
        assert_eq!(result.per_workload.get("a"), None);
        for nan_idle in [f64::NAN, -3.0] {
            let result = attribute(
                &energy(5.0, nan_idle),
                &usage(&[("a", 1, 0)]),
                &HashMap::new(),
            );
            assert_eq!(result.idle, Joules(0.0));
            assert_eq!(result.per_workload["a"].active, Joules(5.0));
        }
    }

    #[test]
    fn bad_meter_values_attribute_nothing_and_show_in_the_residual() {
        let negative = attribute(&energy(-2.0, 0.0), &usage(&[("a", 1, 0)]), &HashMap::new());
        assert_eq!(negative.measured, Joules(0.0));
        assert!(negative.per_workload.is_empty());
        assert_eq!(negative.residual, Joules(-2.0));
        let nan = attribute(
            &energy(f64::NAN, 0.0),
            &usage(&[("a", 1, 0)]),
            &HashMap::new(),
        );
        assert!(nan.residual.0.is_nan());
    }

    #[test]
    fn weights_ignore_negative_and_non_finite_values() {
        let weights = HashMap::from([
            ("gpu-a", 1.0),
            ("gpu-b", 3.0),
            ("bad", f64::NAN),
            ("neg", -5.0),
            ("inf", f64::INFINITY),
        ]);
        let result = attribute_by_weights(&energy(8.0, 0.0), &weights, &HashMap::new());
        assert_eq!(result.basis, ActiveBasis::Weights);
        assert_eq!(result.per_workload.len(), 2);
        assert!((result.per_workload["gpu-b"].active.0 - 6.0).abs() < 1e-12);
        let none = attribute_by_weights(
            &energy(8.0, 0.0),
            &HashMap::<&str, f64>::new(),
            &HashMap::new(),
        );
        assert_eq!(none.node_active_unattributed, Joules(8.0));
        assert_eq!(none.basis, ActiveBasis::NoUsage);
    }
}
