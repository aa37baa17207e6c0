//! GPU usage per workload, from per-process utilisation samples.
//!
//! NVML reports, per device, samples of each process's SM (streaming
//! multiprocessor) utilisation in percent over its sampling period. A
//! process's weight for the interval is the sum of its samples' SM percent:
//! samples cover equal periods, so the sum is proportional to the GPU time it
//! held. Samples name processes, not cgroups; the caller maps pid → workload
//! (through `/proc/<pid>/cgroup`), and a pid it cannot map (exited, or in no
//! container) is weighed into the caller's node bucket, so its share of the
//! GPU's joules is neither lost nor given to someone else.

use std::collections::HashMap;
use std::hash::Hash;

/// One utilisation sample of one process on one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuProcessSample {
    pub pid: u32,
    /// SM utilisation over the sample period, 0–100.
    pub sm_util_percent: u32,
}

/// Active weights for [`attribute_by_weights`](super::attribute_by_weights):
/// summed SM percent per workload; unmapped pids go to `node_bucket`.
pub fn gpu_usage_by_workload<K: Eq + Hash + Clone>(
    samples: &[GpuProcessSample],
    workload_of_pid: &HashMap<u32, K>,
    node_bucket: &K,
) -> HashMap<K, f64> {
    let mut weights: HashMap<K, f64> = HashMap::new();
    for sample in samples.iter().filter(|s| s.sm_util_percent > 0) {
        let workload = workload_of_pid.get(&sample.pid).unwrap_or(node_bucket);
        // NVML documents 0–100; a larger value is a driver quirk, capped so
        // one bad sample cannot take over the device.
        *weights.entry(workload.clone()).or_default() += f64::from(sample.sm_util_percent.min(100));
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::{DomainEnergy, attribute_by_weights};
    use crate::units::{Domain, Joules};

    fn sample(pid: u32, sm_util_percent: u32) -> GpuProcessSample {
        GpuProcessSample {
            pid,
            sm_util_percent,
        }
    }

    #[test]
    fn samples_sum_per_workload_and_unknown_pids_go_to_the_node_bucket() {
        let pids = HashMap::from([(10, "inference"), (11, "inference"), (20, "training")]);
        let samples = [
            sample(10, 30),
            sample(11, 10),
            sample(20, 60),
            sample(20, 60),
            sample(99, 20),
            sample(98, 0),
        ];
        let weights = gpu_usage_by_workload(&samples, &pids, &"node");
        assert_eq!(
            weights,
            HashMap::from([("inference", 40.0), ("training", 120.0), ("node", 20.0)])
        );

        let gpu = DomainEnergy {
            domain: Domain::Gpu,
            source: "nvml:0".into(),
            energy: Joules(360.0),
            idle: Joules(0.0),
        };
        let result = attribute_by_weights(&gpu, &weights, &HashMap::new());
        assert!((result.per_workload["training"].active.0 - 240.0).abs() < 1e-9);
        assert!((result.per_workload["node"].active.0 - 40.0).abs() < 1e-9);
        assert!(result.residual.0.abs() < 1e-9);
    }

    #[test]
    fn out_of_range_samples_are_capped() {
        let pids = HashMap::from([(1, "a"), (2, "b")]);
        let weights = gpu_usage_by_workload(&[sample(1, 5000), sample(2, 100)], &pids, &"node");
        assert_eq!(weights["a"], weights["b"]);
    }
}
