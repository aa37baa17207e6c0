//! The measurement loop: every interval, sample the probe and the meters,
//! attribute the energy, and publish the report `/metrics` serves.
//!
//! It runs on its own thread, never on the HTTP runtime, so a scrape never
//! waits for a measurement and a measurement never waits for a scrape.
//!
//! One interval is six stages, each a call in [`Loop::step`] and
//! [`Loop::account`], each owning its state:
//!
//! 1. **sample** — the probe's cumulative counters per cgroup (and process);
//! 2. **group** ([`group`]) — deltas grouped by workload (container,
//!    pod-level cgroup, or system bucket: nothing lands in "unknown");
//!    owns the cgroup resolver;
//! 3. **measure** ([`measure`]) — every meter's energy per domain and its
//!    idle part; owns the meters, the idle estimator and the online fit;
//! 4. **attribute** ([`book::split`]) — each domain's energy split by usage
//!    (pure arithmetic, [`crate::attribute`]);
//! 5. **book** — the shares added to the cumulative counters of [`State`],
//!    which is checkpointed so a restart never makes a counter go down;
//! 6. **forget the dead** — counters of workloads gone longer than the
//!    retention window dropped, and the kernel's keys of settled cgroups.
//!
//! Domains overlap (package ⊇ core, psys ⊇ package + dram): each is
//! attributed on its own, and dashboards add only disjoint ones.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attribute::{IdleEstimator, LearnedIdleConfig, Ledger};
use crate::config::{Compat, IdlePolicy};
use crate::export::{Published, ServerHandle};
use crate::meter::Meter;
use crate::probe::{Probe, UsageSnapshot};
use crate::units::{Domain, Nanos, Watts};
use crate::workload::{PodDirectory, Workload};

mod book;
mod group;
mod kepler;
mod measure;
mod report;
mod restore;

pub use book::by_pod;
pub use report::catalogue;

use book::Weights;
use group::{Grouping, IntervalUsage};
use measure::Metering;

/// The bucket for CPU time the kernel could not key by cgroup (map full).
pub const OVERFLOW_BUCKET: &str = "overflow";
/// The bucket for GPU work whose process could not be tied to a cgroup.
pub const GPU_UNKNOWN_PROCESS_BUCKET: &str = "gpu-unmapped-processes";

/// What the loop needs besides the probe and meters.
pub struct Settings {
    pub interval: Duration,
    pub idle_policy: IdlePolicy,
    pub idle_watts: Vec<(Domain, Watts)>,
    pub per_process: bool,
    /// Series families to build (`--metrics`).
    pub metrics: crate::export::MetricLevels,
    pub retention: Duration,
    /// Other exporters' metric names to emit too (`--compat`).
    pub compat: Option<Compat>,
    /// This node's name, for series that carry it (Kepler's `node_name`).
    pub node_name: String,
    pub checkpoint: Option<PathBuf>,
    pub host_proc: PathBuf,
    pub cgroup_root: PathBuf,
    /// Where the kubelet makes pod cgroups (`--kubelet-cgroup-root`).
    pub kubelet_roots: crate::workload::KubeletCgroupRoots,
    /// Where to write the online model fit, if anywhere.
    pub model_fit_output: Option<PathBuf>,
    /// `--pod-labels` keys, exported on `ergon_pod_labels`; empty: none.
    pub pod_labels: Vec<String>,
}

/// Everything cumulative: what the checkpoint saves.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub workloads: Ledger<Workload>,
    /// Per pod uid, so a pod's counter does not drop when one of its
    /// containers' cgroups is pruned.
    pub pods: Ledger<String>,
    pub processes: Ledger<u32>,
    /// Labels of processes, kept with their counters (the process may exit).
    pub process_labels: HashMap<u32, (String, String)>,
    pub residual: BTreeMap<Domain, f64>,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub overflow_cgroup_ns: u64,
    pub overflow_process_ns: u64,
}

impl State {
    fn new(retention: Duration) -> State {
        State {
            workloads: Ledger::new(retention),
            pods: Ledger::new(retention),
            processes: Ledger::new(retention),
            process_labels: HashMap::new(),
            residual: BTreeMap::new(),
            busy_ns: 0,
            idle_ns: 0,
            overflow_cgroup_ns: 0,
            overflow_process_ns: 0,
        }
    }
}

/// What the last interval measured, for gauges.
#[derive(Default)]
pub struct LastInterval {
    pub power: BTreeMap<(Domain, &'static str), Watts>,
    pub meter_up: BTreeMap<&'static str, bool>,
    pub estimate_sources: Vec<&'static str>,
    /// Per-workload power and liveness, kept only under `--compat kepler`.
    pub kepler: Option<kepler::KeplerInterval>,
    /// Per meter: zones read or missing, readings rejected so far.
    pub meter_health: BTreeMap<&'static str, crate::meter::MeterHealth>,
}

pub struct Loop {
    probe: Probe,
    grouping: Grouping,
    metering: Metering,
    pods: PodDirectory,
    settings: Settings,
    state: State,
    last: LastInterval,
    previous: Option<UsageSnapshot>,
    checkpoint: Option<crate::checkpoint::Checkpoint>,
    intervals: u64,
    kernel: String,
    /// Present under `--compat kepler`.
    kepler_node: Option<kepler::KeplerNode>,
}

impl Loop {
    pub fn new(
        probe: Probe,
        meters: Vec<Box<dyn Meter>>,
        pods: PodDirectory,
        settings: Settings,
    ) -> Loop {
        let mut idle = IdleEstimator::new(LearnedIdleConfig::default());
        for (domain, watts) in &settings.idle_watts {
            idle.set_configured(*domain, *watts);
        }
        let cpus = aya::util::online_cpus()
            .map(|c| c.len() as u32)
            .unwrap_or(1);
        let (checkpoint, state) = restore::restore(&settings, cpus);
        let cpu_model = std::fs::read_to_string(settings.host_proc.join("cpuinfo"))
            .map(|text| crate::meter::model::parse_cpuinfo(&text).model_name)
            .unwrap_or_default();
        let kepler_node = (settings.compat == Some(Compat::Kepler))
            .then(|| kepler::KeplerNode::new(settings.node_name.clone(), &settings.host_proc));
        Loop {
            kepler_node,
            probe,
            grouping: Grouping::new(
                settings.cgroup_root.clone(),
                settings.host_proc.clone(),
                settings.retention,
                settings.kubelet_roots.clone(),
                settings.per_process,
            ),
            metering: Metering::new(meters, idle, cpus, cpu_model),
            pods,
            settings,
            state,
            last: LastInterval::default(),
            previous: None,
            checkpoint,
            intervals: 0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// One interval. The first call only takes the baselines (and serves the
    /// counters restored from a checkpoint: `report::publish_restored`). An
    /// error says why nothing was measured (the last report stays
    /// published).
    pub fn step(&mut self, published: &Published) -> Result<(), String> {
        // Stage 1: sample.
        let usage = match self.probe.sample() {
            Ok(usage) => usage,
            Err(e) => {
                tracing::warn!("sampling the probe failed, keeping the last report: {e}");
                return Err(format!("sampling the probe failed: {e}"));
            }
        };
        let Some(before) = self.previous.take() else {
            self.metering.take_baselines();
            self.previous = Some(usage);
            report::publish_restored(self, published);
            return Ok(());
        };
        let mono = Nanos(crate::units::monotonic_ns());
        self.account(&before, &usage, mono);
        self.previous = Some(usage);
        self.intervals += 1;
        report::remember_names(&mut self.state, &self.pods);
        // Saved before publishing: whatever a scrape saw is in the
        // checkpoint, so even a crash right after cannot make a counter go
        // down on restart.
        self.save_checkpoint();
        if self.intervals.is_multiple_of(12) {
            self.save_fit();
        }
        published.publish(report::build(self));
        Ok(())
    }

    /// Stages 2–6 of one interval, between two snapshots of the probe.
    fn account(&mut self, before: &UsageSnapshot, now: &UsageSnapshot, mono: Nanos) {
        let usage = self.grouping.group(before, now);
        let measurement = self.metering.measure(usage.cpu.utilisation());
        let idle_weights = self.idle_weights(&usage);
        let gpu_weights = measurement
            .gpu_processes
            .as_ref()
            .map(|samples| self.grouping.gpu_weights(samples));
        let weights = Weights {
            idle: &idle_weights,
            gpu: gpu_weights.as_ref(),
            per_process: self.settings.per_process,
        };
        let split = book::split(&measurement.energies, &usage, &weights);
        self.state.book(&split, &usage, mono);
        self.last = measurement.last;
        if self.kepler_node.is_some() {
            let seconds = measurement.elapsed.as_secs_f64();
            self.last.kepler = Some(kepler::KeplerInterval::new(&split, &usage, seconds));
        }
        self.forget_the_dead(&usage, now, mono);
    }

    /// Stage 6: drops counters past retention, and the kernel's keys of
    /// cgroups and processes that are settled gone.
    fn forget_the_dead(&mut self, usage: &IntervalUsage, now: &UsageSnapshot, mono: Nanos) {
        let host_proc = &self.settings.host_proc;
        let live_pids = now
            .processes
            .keys()
            .copied()
            .filter(|pid| host_proc.join(pid.to_string()).exists());
        let dropped_pids = self.state.forget_the_dead(&usage.alive, live_pids, mono);
        let settled = self.grouping.settled_gone(&usage.gone);
        if !settled.is_empty() || !dropped_pids.is_empty() {
            self.probe.forget(&settled, &dropped_pids);
        }
    }

    fn save_checkpoint(&mut self) {
        if let Some(checkpoint) = &mut self.checkpoint {
            checkpoint.save_and_report(&self.state);
        }
    }

    /// Saves the checkpoint and the model fit now (on SIGTERM).
    pub fn shutdown(&mut self) {
        self.save_checkpoint();
        self.save_fit();
    }

    fn save_fit(&self) {
        let (Some(path), Some(fit)) = (&self.settings.model_fit_output, self.model_fit()) else {
            return;
        };
        if let Err(e) = fit.save(path) {
            tracing::warn!("writing the model fit: {e}");
        }
    }

    /// The current online fit, if there are enough samples.
    pub fn model_fit(&self) -> Option<crate::meter::model::ModelFit> {
        self.metering.model_fit()
    }

    /// Idle shares per `--idle-policy`.
    fn idle_weights(&self, usage: &IntervalUsage) -> HashMap<Workload, f64> {
        let pod_key = |uid: &str| Workload::Pod {
            pod_uid: uid.to_owned(),
            qos: crate::workload::QosClass::BestEffort,
        };
        match self.settings.idle_policy {
            IdlePolicy::None => HashMap::new(),
            IdlePolicy::CpuRequests => self
                .pods
                .live_pods()
                .iter()
                .filter(|pod| pod.cpu_request_millicores > 0)
                .map(|pod| (pod_key(&pod.uid), pod.cpu_request_millicores as f64))
                .collect(),
            IdlePolicy::Equal => {
                let mut uids: Vec<String> = self
                    .pods
                    .live_pods()
                    .iter()
                    .map(|p| p.uid.clone())
                    .collect();
                if uids.is_empty() {
                    // No API: the pods the cgroups show.
                    uids = usage
                        .per_workload
                        .keys()
                        .filter_map(|w| w.pod_uid().map(str::to_owned))
                        .collect();
                }
                uids.into_iter().map(|uid| (pod_key(&uid), 1.0)).collect()
            }
        }
    }
}

/// Runs intervals until `stop` receives (or its sender is dropped), then
/// saves the checkpoint.
pub fn run(mut measure: Loop, published: Published, handle: ServerHandle, stop: Receiver<()>) {
    let interval = measure.settings.interval;
    let mut next = Instant::now();
    loop {
        match measure.step(&published) {
            Ok(()) if published.is_ready() => handle.interval_done(),
            Ok(()) => {}
            Err(reason) => handle.interval_failed(&reason),
        }
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now;
        }
        // One wake-up per interval, yet SIGTERM is honoured at once.
        match stop.recv_timeout(next - now) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    measure.shutdown();
}
