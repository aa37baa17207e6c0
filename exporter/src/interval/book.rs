//! Stages 4–6 of an interval: split each domain's energy, book the shares
//! into the cumulative counters, and forget what has been dead for longer
//! than the retention window.
//!
//! Splitting is pure arithmetic ([`crate::attribute`]); booking and
//! forgetting own [`State`], the counters the checkpoint saves, so a
//! counter only ever grows while its workload is retained.

use std::collections::HashMap;

use crate::attribute::{self, Attribution, DomainEnergy, SharedSplit, Shares};
use crate::units::{Domain, Nanos};
use crate::workload::Workload;

use super::State;
use super::group::IntervalUsage;

/// One interval's energy, split.
pub(super) struct Split<'a> {
    /// Per meter source's domain, among workloads.
    pub workloads: Vec<Attribution<Workload>>,
    /// The CPU domains again, per process (`--per-process`).
    pub processes: Option<SharedSplit<'a, u32>>,
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
/// Shares are computed once per interval (they depend on the usage, not on
/// the domain) and multiplied out per domain.
pub(super) fn split<'a>(
    energies: &[DomainEnergy],
    usage: &'a IntervalUsage,
    weights: &Weights<'a>,
) -> Split<'a> {
    let by_usage = Shares::of_usage(&usage.per_workload);
    let idle = Shares::of_weights(weights.idle);
    let by_gpu = weights.gpu.map(Shares::of_weights);
    let no_idle = HashMap::new();
    let workloads = energies
        .iter()
        .map(|energy| match (&by_gpu, energy.domain) {
            (Some(gpu), Domain::Gpu) => gpu.split(energy, &Shares::of_weights(&no_idle)),
            _ => by_usage.split(energy, &idle),
        })
        .collect();
    let processes = weights.per_process.then(|| {
        SharedSplit::new(
            Shares::of_usage(&usage.per_process),
            energies
                .iter()
                .filter(|energy| energy.domain != Domain::Gpu),
        )
    });
    Split {
        workloads,
        processes,
    }
}

/// The same attribution, summed per pod (what the per-pod ledger takes).
pub fn by_pod(attribution: &Attribution<Workload>) -> Attribution<String> {
    let mut per_pod: HashMap<String, attribute::WorkloadJoules> =
        HashMap::with_capacity(attribution.per_workload.len());
    for (workload, joules) in &attribution.per_workload {
        let Some(uid) = workload.pod_uid() else {
            continue;
        };
        let add = |sum: &mut attribute::WorkloadJoules| {
            sum.active += joules.active;
            sum.idle += joules.idle;
        };
        // Most pods have one container: look up before allocating a key.
        match per_pod.get_mut(uid) {
            Some(sum) => add(sum),
            None => add(per_pod.entry(uid.to_owned()).or_default()),
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
    pub(super) fn book(&mut self, split: &Split, usage: &IntervalUsage, mono: Nanos) {
        for attribution in &split.workloads {
            // Below f64 resolution of the measured energy a residual is
            // rounding, not energy: keep the counter at an honest 0.
            let residual = attribution.residual.0;
            if residual.abs() > 1e-9 * attribution.measured.0.abs().max(1e-9) {
                *self.residual.entry(attribution.domain).or_default() += residual;
            }
            self.workloads.apply(attribution, mono);
            self.pods.apply(&by_pod(attribution), mono);
        }
        if let Some(processes) = &split.processes {
            self.processes.apply_shared(processes, mono);
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
