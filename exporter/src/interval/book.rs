//! Stages 4–6 of an interval: split each domain's energy, book the shares
//! into the cumulative counters, and forget what has been dead for longer
//! than the retention window.
//!
//! Splitting is pure arithmetic ([`crate::attribute`]); booking and
//! forgetting own [`State`], the counters the checkpoint saves, so a
//! counter only ever grows while its workload is retained.

use std::collections::HashMap;

use crate::attribute::{self, Attribution, DomainEnergy};
use crate::units::{Domain, Nanos};
use crate::workload::Workload;

use super::State;
use super::group::IntervalUsage;

/// One meter source's domain, split.
pub(super) struct DomainAttribution {
    pub workloads: Attribution<Workload>,
    /// The same energy split per process (`--per-process`, CPU domains).
    pub processes: Option<Attribution<u32>>,
}

/// What splits an interval's energy besides CPU usage.
pub(super) struct Weights<'a> {
    /// Idle shares per `--idle-policy` (empty: idle stays on the node).
    pub idle: &'a HashMap<Workload, f64>,
    /// GPU utilisation per workload, where a GPU was measured.
    pub gpu: Option<&'a HashMap<Workload, f64>>,
    pub per_process: bool,
}

/// Stage 4: every domain's energy split among the workloads that used it.
pub(super) fn split(
    energies: &[DomainEnergy],
    usage: &IntervalUsage,
    weights: &Weights,
) -> Vec<DomainAttribution> {
    energies
        .iter()
        .map(|energy| {
            let workloads = match (weights.gpu, energy.domain) {
                (Some(gpu), Domain::Gpu) => {
                    attribute::attribute_by_weights(energy, gpu, &HashMap::new())
                }
                _ => attribute::attribute(energy, &usage.per_workload, weights.idle),
            };
            let processes = (weights.per_process && energy.domain != Domain::Gpu)
                .then(|| attribute::attribute(energy, &usage.per_process, &HashMap::new()));
            DomainAttribution {
                workloads,
                processes,
            }
        })
        .collect()
}

/// The same attribution, summed per pod (what the per-pod ledger takes).
pub fn by_pod(attribution: &Attribution<Workload>) -> Attribution<String> {
    let mut per_pod: HashMap<String, attribute::WorkloadJoules> = HashMap::new();
    for (workload, joules) in &attribution.per_workload {
        if let Some(uid) = workload.pod_uid() {
            let entry = per_pod.entry(uid.to_owned()).or_default();
            entry.active += joules.active;
            entry.idle += joules.idle;
        }
    }
    Attribution {
        domain: attribution.domain,
        source: attribution.source.clone(),
        basis: attribution.basis,
        per_workload: per_pod,
        node_idle: attribution.node_idle,
        node_active_unattributed: attribution.node_active_unattributed,
        measured: attribution.measured,
        idle: attribution.idle,
        residual: attribution.residual,
    }
}

impl State {
    /// Stage 5: adds one interval's shares and usage to the counters.
    pub(super) fn book(
        &mut self,
        attributions: &[DomainAttribution],
        usage: &IntervalUsage,
        mono: Nanos,
    ) {
        for split in attributions {
            let attribution = &split.workloads;
            // Below f64 resolution of the measured energy a residual is
            // rounding, not energy: keep the counter at an honest 0.
            let residual = attribution.residual.0;
            if residual.abs() > 1e-9 * attribution.measured.0.abs().max(1e-9) {
                *self.residual.entry(attribution.domain).or_default() += residual;
            }
            self.workloads.apply(attribution, mono);
            self.pods.apply(&by_pod(attribution), mono);
            if let Some(processes) = &split.processes {
                self.processes.apply(processes, mono);
            }
        }
        self.workloads.add_usage(&usage.per_workload, mono);
        self.pods.add_usage(&usage.per_pod(), mono);
        self.processes.add_usage(&usage.per_process, mono);
        self.process_labels
            .extend(usage.process_labels.iter().cloned());
        self.busy_ns += usage.cpu.busy_ns;
        self.idle_ns += usage.cpu.idle_ns;
        self.overflow_cgroup_ns += usage.cpu.overflow_cgroup_ns;
        self.overflow_process_ns += usage.cpu.overflow_process_ns;
    }

    /// Stage 6: what still exists keeps its counters; what has not been
    /// seen for the retention window is dropped. Returns the pids dropped,
    /// so their kernel keys can go too.
    pub(super) fn forget_the_dead(
        &mut self,
        alive: &[Workload],
        live_pids: impl Iterator<Item = u32>,
        mono: Nanos,
    ) -> Vec<u32> {
        for workload in alive {
            self.workloads.mark_seen(workload, mono);
            if let Some(uid) = workload.pod_uid() {
                self.pods.mark_seen(&uid.to_owned(), mono);
            }
        }
        for pid in live_pids {
            self.processes.mark_seen(&pid, mono);
        }
        self.workloads.prune(mono);
        self.pods.prune(mono);
        let dropped_pids = self.processes.prune(mono);
        for pid in &dropped_pids {
            self.process_labels.remove(pid);
        }
        dropped_pids
    }
}
