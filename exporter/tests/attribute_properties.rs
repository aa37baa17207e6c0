//! Properties of the energy arithmetic over random inputs: conservation,
//! proportionality, no negative energy, counters that never decrease.

use std::collections::HashMap;
use std::time::Duration;

use ergon::attribute::{
    ActiveBasis, Attribution, DomainEnergy, GpuProcessSample, IdleEstimator, LearnedIdleConfig,
    Ledger, SharedSplit, Shares, Usage, attribute, attribute_by_weights, gpu_usage_by_workload,
};
use ergon::units::{Domain, Joules, Nanos, Watts};
use proptest::prelude::*;

fn energy(domain: Domain, joules: f64, idle: f64) -> DomainEnergy {
    DomainEnergy {
        domain,
        source: format!("meter:{domain}"),
        energy: Joules(joules),
        idle: Joules(idle),
    }
}

/// Usage per workload id; a third of the maps have no cycle counts (no PMU)
/// and some entries used nothing.
fn usage_map() -> impl Strategy<Value = HashMap<u16, Usage>> {
    let entry = (0u64..2_000_000_000_000, 0u64..4_000_000_000_000, 0u8..8);
    (
        prop::collection::hash_map(0u16..64, entry, 0..24),
        any::<bool>(),
    )
        .prop_map(|(entries, pmu)| {
            entries
                .into_iter()
                .map(|(key, (cpu_ns, cycles, shape))| {
                    let usage = match shape {
                        0 => Usage {
                            cpu_ns: 0,
                            cycles: 0,
                        },
                        1 if pmu => Usage { cpu_ns, cycles: 0 }, // one runner without cycles
                        _ if pmu => Usage {
                            cpu_ns,
                            cycles: cycles.max(1),
                        },
                        _ => Usage { cpu_ns, cycles: 0 },
                    };
                    (key, usage)
                })
                .collect()
        })
}

fn idle_weights() -> impl Strategy<Value = HashMap<u16, f64>> {
    prop::collection::hash_map(
        0u16..80,
        prop_oneof![Just(0.0), 0.0..4000.0, Just(1.0)],
        0..16,
    )
}

/// Anything at all, including what a broken meter or caller might pass.
fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0..1e6,
        1 => -1e6..0.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(0.0),
        1 => 0.0..1e-300,
    ]
}

fn handed_out<K>(result: &Attribution<K>) -> f64 {
    result
        .per_workload
        .values()
        .map(|w| w.active.0 + w.idle.0)
        .sum::<f64>()
        + result.node_idle.0
        + result.node_active_unattributed.0
}

fn used(usage: &Usage, basis: ActiveBasis) -> u64 {
    match basis {
        ActiveBasis::Cycles => usage.cycles,
        _ => usage.cpu_ns,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn conservation(joules in 0.0..1e7f64, idle in -10.0..2e7f64, usage in usage_map(), weights in idle_weights()) {
        let result = attribute(&energy(Domain::Package, joules, idle), &usage, &weights);
        let tolerance = 1e-9 * joules.max(1e-300);
        prop_assert!((handed_out(&result) - joules).abs() <= tolerance, "{} vs {joules}", handed_out(&result));
        prop_assert!(result.residual.0.abs() <= tolerance, "residual {}", result.residual.0);
        prop_assert_eq!(result.measured, Joules(joules));
        prop_assert!((result.active().0 + result.idle.0 - joules).abs() <= tolerance);
    }

    #[test]
    fn proportionality(joules in 1e-3..1e7f64, idle_share in 0.0..0.99f64, usage in usage_map()) {
        let result = attribute(&energy(Domain::Core, joules, joules * idle_share), &usage, &HashMap::new());
        let runners: Vec<(u16, u64, f64)> = usage
            .iter()
            .map(|(key, u)| (*key, used(u, result.basis), result.per_workload.get(key).map_or(0.0, |w| w.active.0)))
            .collect();
        for (key, amount, active) in &runners {
            // Nothing used, nothing given (and something used, something given).
            prop_assert_eq!(*amount == 0, *active == 0.0, "workload {} used {} got {}", key, amount, active);
        }
        for (a_key, a_used, a_joules) in &runners {
            for (b_key, b_used, b_joules) in &runners {
                if *a_used == 0 || *b_used == 0 {
                    continue;
                }
                let expected = *a_used as f64 / *b_used as f64;
                let actual = a_joules / b_joules;
                prop_assert!(
                    ((actual - expected) / expected).abs() < 1e-9,
                    "{a_key}:{b_key} joules ratio {actual} vs usage ratio {expected}"
                );
            }
        }
    }

    #[test]
    fn no_negative_energy_for_any_input(
        joules in any_f64(),
        idle in any_f64(),
        usage in usage_map(),
        weights in prop::collection::hash_map(0u16..80, any_f64(), 0..16),
    ) {
        let results = [
            attribute(&energy(Domain::Dram, joules, idle), &usage, &weights),
            attribute_by_weights(&energy(Domain::Gpu, joules, idle), &weights, &weights),
        ];
        for result in results {
            let all = result
                .per_workload
                .values()
                .flat_map(|w| [w.active.0, w.idle.0])
                .chain([result.node_idle.0, result.node_active_unattributed.0, result.measured.0, result.idle.0]);
            for value in all {
                prop_assert!(value >= 0.0 && value.is_finite(), "{value} from E={joules} idle={idle}");
            }
            prop_assert!(result.idle.0 <= result.measured.0);
            if joules.is_finite() && joules >= 0.0 {
                prop_assert!(result.residual.0.abs() <= 1e-9 * joules.max(1e-300));
            }
        }
    }

    #[test]
    fn idle_estimates_stay_within_the_interval_energy(
        intervals in prop::collection::vec((any_f64(), 0u64..20_000_000_000), 1..60),
        configured in prop::option::of(0.0..500.0f64),
    ) {
        let mut estimator = IdleEstimator::new(LearnedIdleConfig { window: 16, percentile: 0.05, warmup: 2 });
        if let Some(watts) = configured {
            estimator.set_configured(Domain::Package, Watts(watts));
        }
        for (joules, elapsed) in intervals {
            let estimate = estimator.estimate(Domain::Package, "rapl:0", Joules(joules), Nanos(elapsed));
            prop_assert!(estimate.idle.0 >= 0.0 && estimate.idle.0.is_finite());
            if joules.is_finite() && joules >= 0.0 {
                prop_assert!(estimate.idle.0 <= joules);
            } else {
                prop_assert_eq!(estimate.idle, Joules(0.0));
            }
        }
    }

    #[test]
    fn gpu_weights_lose_no_sample(
        samples in prop::collection::vec((0u32..40, 0u32..150), 0..50),
        mapped in prop::collection::hash_map(0u32..40, 0u8..4, 0..20),
    ) {
        let samples: Vec<GpuProcessSample> = samples
            .into_iter()
            .map(|(pid, sm_util_percent)| GpuProcessSample { pid, sm_util_percent })
            .collect();
        let workload_of_pid: HashMap<u32, u8> = mapped;
        let weights = gpu_usage_by_workload(&samples, &workload_of_pid, &u8::MAX);
        let total: f64 = weights.values().sum();
        let expected: f64 = samples.iter().map(|s| f64::from(s.sm_util_percent.min(100))).sum();
        prop_assert_eq!(total, expected);
        for sample in samples.iter().filter(|s| s.sm_util_percent > 0) {
            let owner = workload_of_pid.get(&sample.pid).copied().unwrap_or(u8::MAX);
            prop_assert!(weights[&owner] > 0.0);
        }
    }

    #[test]
    fn ledger_counters_never_decrease(
        steps in prop::collection::vec(
            (any_f64(), any_f64(), usage_map(), idle_weights(), 0u64..400, prop::sample::select(Domain::ALL.to_vec())),
            1..40,
        ),
    ) {
        let mut ledger: Ledger<u16> = Ledger::new(Duration::from_secs(300));
        let mut now = 0u64;
        for (joules, idle, usage, weights, seconds, domain) in steps {
            let before_workloads: HashMap<u16, _> = ledger.workloads().map(|(k, c)| (*k, c.clone())).collect();
            let before_node: Vec<_> = ledger.node().map(|(d, s, c)| ((d, s.to_owned()), *c)).collect();

            now += seconds * 1_000_000_000;
            let result = attribute(&energy(domain, joules, idle), &usage, &weights);
            ledger.apply(&result, Nanos(now));
            ledger.add_usage(&usage, Nanos(now));
            if let Some(key) = usage.keys().next() {
                ledger.mark_seen(key, Nanos(now));
            }
            let dropped = ledger.prune(Nanos(now));

            for (key, before) in &before_workloads {
                let Some(after) = ledger.workload(key) else {
                    prop_assert!(dropped.contains(key), "workload {} vanished without being pruned", key);
                    continue;
                };
                prop_assert!(after.cpu_ns >= before.cpu_ns && after.cycles >= before.cycles);
                prop_assert!(after.last_seen >= before.last_seen);
                for (domain, joules_before) in &before.energy {
                    let joules_after = after.energy[domain];
                    prop_assert!(joules_after.active.0 >= joules_before.active.0);
                    prop_assert!(joules_after.idle.0 >= joules_before.idle.0);
                }
            }
            let after_node: HashMap<_, _> = ledger.node().map(|(d, s, c)| ((d, s.to_owned()), *c)).collect();
            for (key, before) in before_node {
                let after = after_node[&key];
                prop_assert!(after.active.0 >= before.active.0 && after.idle.0 >= before.idle.0);
                prop_assert!(after.idle_kept.0 >= before.idle_kept.0);
                prop_assert!(after.active_unattributed.0 >= before.active_unattributed.0);
                prop_assert!(after.active.0.is_finite() && after.idle.0.is_finite());
            }
        }
    }

    /// The per-process path (shares once per interval, every domain booked
    /// in one visit per key) books bit for bit what a split and an `apply`
    /// per domain book, whatever the meters report (two sources of one
    /// domain, zero, negative, NaN).
    #[test]
    fn one_pass_over_domains_books_what_a_split_per_domain_books(
        intervals in prop::collection::vec(
            (
                usage_map(),
                prop::collection::vec(
                    (prop::sample::select(Domain::ALL.to_vec()), any_f64(), any_f64(), 0u8..2),
                    0..7,
                ),
            ),
            1..6,
        ),
    ) {
        let mut per_domain: Ledger<u16> = Ledger::new(Duration::from_secs(300));
        let mut one_pass: Ledger<u16> = Ledger::new(Duration::from_secs(300));
        for (step, (usage, energies)) in intervals.into_iter().enumerate() {
            let now = Nanos(step as u64 * 5_000_000_000);
            let energies: Vec<DomainEnergy> = energies
                .into_iter()
                .map(|(domain, joules, idle, source)| DomainEnergy {
                    domain,
                    source: format!("meter:{domain}-{source}"),
                    energy: Joules(joules),
                    idle: Joules(idle),
                })
                .collect();
            let splits: Vec<Attribution<u16>> = energies
                .iter()
                .map(|energy| attribute(energy, &usage, &HashMap::new()))
                .collect();
            for split in &splits {
                per_domain.apply(split, now);
            }
            let shared = SharedSplit::new(Shares::of_usage(&usage), energies.iter());
            one_pass.apply_shared(&shared, now);
            for (split, summary) in splits.iter().zip(shared.domains()) {
                prop_assert_eq!(split.basis, summary.basis);
                prop_assert_eq!(split.measured, summary.measured);
                prop_assert_eq!(split.idle, summary.idle);
                prop_assert_eq!(split.node_idle, summary.node_idle);
                prop_assert_eq!(split.node_active_unattributed, summary.node_active_unattributed);
                let (a, b) = (split.residual.0, summary.residual.0);
                prop_assert!(a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * split.measured.0, "residual {} vs {}", a, b);
            }
            let mut keys: Vec<u16> = per_domain.workloads().map(|(k, _)| *k).collect();
            keys.sort_unstable();
            let mut one_pass_keys: Vec<u16> = one_pass.workloads().map(|(k, _)| *k).collect();
            one_pass_keys.sort_unstable();
            prop_assert_eq!(&keys, &one_pass_keys);
            for key in &keys {
                prop_assert_eq!(per_domain.workload(key), one_pass.workload(key), "workload {}", key);
            }
            let node = |ledger: &Ledger<u16>| {
                let mut node: Vec<_> = ledger.node().map(|(d, s, c)| (d, s.to_owned(), *c)).collect();
                node.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
                node
            };
            prop_assert_eq!(node(&per_domain), node(&one_pass));
        }
    }
}
