//! Stage 2 of an interval: the probe's snapshot → usage per workload.
//!
//! The kernel counts by cgroup id (and, opt-in, by process); bills are by
//! workload. Every id is resolved to a container, a pod-level cgroup or a
//! system bucket, so nothing lands in "unknown": an id whose directory
//! vanished before it could be walked goes to `other`, CPU time the kernel
//! could not key (map full) to `overflow`. This stage owns the resolver and
//! what it remembers between intervals: which cgroups were already gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::attribute::{self, Usage};
use crate::probe::{CgroupCounters, UsageSnapshot};
use crate::workload::{CgroupResolver, KubeletCgroupRoots, Workload, cgroup_id_of_pid};

use super::{GPU_UNKNOWN_PROCESS_BUCKET, OVERFLOW_BUCKET};

/// Unknown ids trigger walks by themselves; a periodic walk also notices
/// cgroups that vanished, so their retention starts.
const REFRESH_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Grouping {
    resolver: CgroupResolver,
    last_refresh: Instant,
    /// Cgroup ids found vanished at the previous interval.
    gone_before: HashSet<u64>,
    host_proc: PathBuf,
    cgroup_root: PathBuf,
    per_process: bool,
}

/// CPU time of the whole node in one interval, from the probe's per-CPU
/// counters and its overflow buckets.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CpuTime {
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub overflow_cgroup_ns: u64,
    pub overflow_process_ns: u64,
}

impl CpuTime {
    /// Busy share of all CPUs, `None` when nothing was counted.
    pub fn utilisation(&self) -> Option<f64> {
        let total = self.busy_ns + self.idle_ns;
        (total > 0).then(|| self.busy_ns as f64 / total as f64)
    }
}

/// One interval's usage, grouped by what is billed.
#[derive(Default)]
pub(super) struct IntervalUsage {
    pub per_workload: HashMap<Workload, Usage>,
    /// Empty unless `--per-process`.
    pub per_process: HashMap<u32, Usage>,
    /// `(comm, container_id)` of every process seen this interval.
    pub process_labels: Vec<(u32, (String, String))>,
    /// Workloads whose cgroup still exists.
    pub alive: Vec<Workload>,
    /// Cgroup ids whose directory is gone.
    pub gone: Vec<u64>,
    pub cpu: CpuTime,
}

impl IntervalUsage {
    /// The same usage summed per pod uid (what the per-pod ledger takes).
    pub fn per_pod(&self) -> HashMap<String, Usage> {
        let mut pods: HashMap<String, Usage> = HashMap::new();
        for (workload, used) in &self.per_workload {
            if let Some(uid) = workload.pod_uid() {
                let entry = pods.entry(uid.to_owned()).or_default();
                entry.cpu_ns += used.cpu_ns;
                entry.cycles += used.cycles;
            }
        }
        pods
    }
}

fn delta(now: &CgroupCounters, before: Option<&CgroupCounters>) -> Usage {
    let before = before.copied().unwrap_or_default();
    Usage {
        cpu_ns: now.cpu_ns.saturating_sub(before.cpu_ns),
        cycles: now.cycles.saturating_sub(before.cycles),
    }
}

impl Grouping {
    pub fn new(
        cgroup_root: PathBuf,
        host_proc: PathBuf,
        retention: Duration,
        kubelet_roots: KubeletCgroupRoots,
        per_process: bool,
    ) -> Grouping {
        Grouping {
            resolver: CgroupResolver::new(cgroup_root.clone())
                .with_retention(retention)
                .with_kubelet_roots(kubelet_roots),
            last_refresh: Instant::now(),
            gone_before: HashSet::new(),
            host_proc,
            cgroup_root,
            per_process,
        }
    }

    /// Usage between two snapshots, per workload and per process.
    pub fn group(&mut self, before: &UsageSnapshot, now: &UsageSnapshot) -> IntervalUsage {
        self.refresh_if_due();
        let mut usage = IntervalUsage::default();
        for (id, counters) in &now.cgroups {
            let used = delta(counters, before.cgroups.get(id));
            let (workload, vanished) = self.resolve(*id);
            if vanished {
                usage.gone.push(*id);
            } else {
                usage.alive.push(workload.clone());
            }
            if used.cpu_ns > 0 {
                let entry = usage.per_workload.entry(workload).or_default();
                entry.cpu_ns += used.cpu_ns;
                entry.cycles += used.cycles;
            }
        }
        let overflow = delta(&now.cgroup_overflow, Some(&before.cgroup_overflow));
        if overflow.cpu_ns > 0 {
            usage.per_workload.insert(
                Workload::System {
                    bucket: OVERFLOW_BUCKET.into(),
                },
                overflow,
            );
        }
        usage.cpu = CpuTime {
            busy_ns: now.busy_ns.saturating_sub(before.busy_ns),
            idle_ns: now.idle_ns.saturating_sub(before.idle_ns),
            overflow_cgroup_ns: overflow.cpu_ns,
            overflow_process_ns: now
                .process_overflow
                .cpu_ns
                .saturating_sub(before.process_overflow.cpu_ns),
        };
        if self.per_process {
            self.group_processes(before, now, &mut usage);
        }
        usage
    }

    fn group_processes(
        &mut self,
        before: &UsageSnapshot,
        now: &UsageSnapshot,
        usage: &mut IntervalUsage,
    ) {
        usage.per_process.reserve(now.processes.len());
        usage.process_labels.reserve(now.processes.len());
        for (pid, process) in &now.processes {
            let used = delta(
                &process.counters,
                before.processes.get(pid).map(|p| &p.counters),
            );
            let container = match self.resolve(process.cgroup_id).0 {
                Workload::Container { container_id, .. } => container_id,
                _ => String::new(),
            };
            usage.process_labels.push((
                *pid,
                (crate::export::bounded_label(&process.comm), container),
            ));
            if used.cpu_ns > 0 {
                usage.per_process.insert(*pid, used);
            }
        }
    }

    fn refresh_if_due(&mut self) {
        let now = Instant::now();
        if now - self.last_refresh >= REFRESH_EVERY {
            self.last_refresh = now;
            if let Err(e) = self.resolver.refresh() {
                tracing::warn!("walking the cgroup tree failed: {e}");
            }
        }
    }

    /// The workload of a cgroup id, and whether its directory is gone.
    fn resolve(&mut self, cgroup_id: u64) -> (Workload, bool) {
        match self.resolver.resolve(cgroup_id) {
            Some(resolved) => (resolved.workload.clone(), resolved.vanished()),
            // Not found even after a rescan: gone before it could be walked.
            // Its energy stays visible in the `other` bucket.
            None => (
                Workload::System {
                    bucket: "other".into(),
                },
                true,
            ),
        }
    }

    /// GPU weights per workload from per-process utilisation samples.
    pub fn gpu_weights(
        &mut self,
        samples: &[attribute::GpuProcessSample],
    ) -> HashMap<Workload, f64> {
        let mut of_pid = HashMap::new();
        for sample in samples {
            if let Some(id) = cgroup_id_of_pid(&self.host_proc, &self.cgroup_root, sample.pid) {
                of_pid.insert(sample.pid, self.resolve(id).0);
            }
        }
        attribute::gpu_usage_by_workload(
            samples,
            &of_pid,
            &Workload::System {
                bucket: GPU_UNKNOWN_PROCESS_BUCKET.into(),
            },
        )
    }

    /// Cgroup ids whose kernel keys can go: seen gone at two consecutive
    /// intervals, so their final slices are counted (their tasks exited
    /// before rmdir, and one more sample has passed) and their workload's
    /// ledger holds the total. Forgetting them keeps the bounded map from
    /// filling with the dead.
    pub fn settled_gone(&mut self, gone: &[u64]) -> Vec<u64> {
        let gone_now: HashSet<u64> = gone.iter().copied().collect();
        let settled = gone_now.intersection(&self.gone_before).copied().collect();
        self.gone_before = gone_now;
        settled
    }
}
