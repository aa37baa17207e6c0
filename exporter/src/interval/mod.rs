//! The measurement loop: every interval, sample the probe and the meters,
//! attribute the energy, and publish the report `/metrics` serves.
//!
//! It runs on its own thread, never on the HTTP runtime, so a scrape never
//! waits for a measurement and a measurement never waits for a scrape.
//!
//! Per interval and per energy domain: usage deltas are grouped by workload
//! (container, pod-level cgroup, or system bucket: nothing lands in
//! "unknown"), the domain's idle part is estimated, and
//! [`attribute`](crate::attribute::attribute) splits the rest. Cumulative
//! counters live in [`State`], which is checkpointed so a restart of the
//! exporter never makes a counter go down. Domains overlap (package ⊇ core,
//! psys ⊇ package + dram): each is attributed on its own, and dashboards add
//! only disjoint ones.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attribute::{
    self, Attribution, DomainEnergy, IdleEstimator, LearnedIdleConfig, Ledger, Usage,
};
use crate::config::IdlePolicy;
use crate::export::{Published, ServerHandle};
use crate::meter::{Meter, MeterContext, OnlineFit};
use crate::probe::{CgroupCounters, Probe, UsageSnapshot};
use crate::units::{Domain, Joules, Nanos, Watts};
use crate::workload::{CgroupResolver, PodDirectory, Workload};

mod report;

pub use report::catalogue;

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
    pub retention: Duration,
    pub kepler_compat: bool,
    pub checkpoint: Option<PathBuf>,
    pub host_proc: PathBuf,
    pub cgroup_root: PathBuf,
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
}

pub struct Loop {
    probe: Probe,
    meters: Vec<Box<dyn Meter>>,
    resolver: CgroupResolver,
    pods: PodDirectory,
    settings: Settings,
    idle: IdleEstimator,
    state: State,
    last: LastInterval,
    previous: Option<(Instant, UsageSnapshot)>,
    boot_id: String,
    cpus: u32,
    intervals: u64,
    kernel: String,
    last_refresh: Instant,
    /// Least-squares fit of measured CPU power against utilisation, fed
    /// only by real (non-estimate) package meters.
    pub(crate) fit: OnlineFit,
    cpu_model: String,
    /// Cgroup ids found vanished at the previous interval.
    gone_before: std::collections::HashSet<u64>,
}

fn delta(now: &CgroupCounters, before: Option<&CgroupCounters>) -> Usage {
    let before = before.copied().unwrap_or_default();
    Usage {
        cpu_ns: now.cpu_ns.saturating_sub(before.cpu_ns),
        cycles: now.cycles.saturating_sub(before.cycles),
    }
}

impl Loop {
    pub fn new(
        probe: Probe,
        meters: Vec<Box<dyn Meter>>,
        pods: PodDirectory,
        settings: Settings,
    ) -> Loop {
        let boot_id = crate::checkpoint::boot_id(&settings.host_proc);
        let mut state = State::new(settings.retention);
        if let Some(path) = &settings.checkpoint {
            match crate::checkpoint::load::<State>(path, &boot_id) {
                Ok(Some(restored)) => {
                    tracing::info!("counters restored from checkpoint {}", path.display());
                    state = restored;
                    state.workloads.set_retention(settings.retention);
                    state.pods.set_retention(settings.retention);
                    state.processes.set_retention(settings.retention);
                }
                Ok(None) => tracing::info!("no checkpoint at {} yet", path.display()),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let mut idle = IdleEstimator::new(LearnedIdleConfig::default());
        for (domain, watts) in &settings.idle_watts {
            idle.set_configured(*domain, *watts);
        }
        let cpus = aya::util::online_cpus()
            .map(|c| c.len() as u32)
            .unwrap_or(1);
        let cpu_model = std::fs::read_to_string(settings.host_proc.join("cpuinfo"))
            .map(|text| crate::meter::model::parse_cpuinfo(&text).model_name)
            .unwrap_or_default();
        Loop {
            probe,
            meters,
            resolver: CgroupResolver::new(settings.cgroup_root.clone())
                .with_retention(settings.retention),
            pods,
            settings,
            idle,
            state,
            last: LastInterval::default(),
            previous: None,
            boot_id,
            cpus,
            intervals: 0,
            last_refresh: Instant::now(),
            fit: OnlineFit::new(),
            gone_before: Default::default(),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }

    /// One interval. The first call only takes the baselines.
    pub fn step(&mut self, published: &Published) {
        let usage = match self.probe.sample() {
            Ok(usage) => usage,
            Err(e) => {
                tracing::warn!("sampling the probe failed, keeping the last report: {e}");
                return;
            }
        };
        let now = Instant::now();
        let Some((then, before)) = self.previous.take() else {
            let ctx = MeterContext {
                elapsed: Nanos(0),
                cpu_utilisation: None,
                cpus: self.cpus,
            };
            for meter in &mut self.meters {
                // Baselines: counters are read once so the first interval
                // has a start.
                let _ = meter.sample(&ctx);
            }
            self.previous = Some((now, usage));
            return;
        };
        let elapsed = Nanos((now - then).as_nanos() as u64);
        // Unknown ids trigger walks by themselves; this periodic one also
        // notices cgroups that vanished, so their retention starts.
        if now - self.last_refresh >= Duration::from_secs(60) {
            self.last_refresh = now;
            if let Err(e) = self.resolver.refresh() {
                tracing::warn!("walking the cgroup tree failed: {e}");
            }
        }
        let mono = Nanos(crate::units::monotonic_ns());
        self.account(&before, &usage, elapsed, mono);
        self.previous = Some((now, usage));
        self.intervals += 1;
        // Saved before publishing: whatever a scrape saw is in the
        // checkpoint, so even a crash right after cannot make a counter go
        // down on restart.
        if let Some(path) = &self.settings.checkpoint {
            self.save_checkpoint(path.clone());
        }
        if self.intervals.is_multiple_of(12) {
            self.save_fit();
        }
        published.publish(report::build(self));
    }

    fn save_checkpoint(&self, path: PathBuf) {
        if let Err(e) = crate::checkpoint::save(&path, &self.boot_id, &self.state) {
            tracing::warn!("{e}");
        }
    }

    /// Saves the checkpoint and the model fit now (on SIGTERM).
    pub fn shutdown(&self) {
        if let Some(path) = &self.settings.checkpoint {
            self.save_checkpoint(path.clone());
        }
        self.save_fit();
    }

    fn save_fit(&self) {
        let (Some(path), Some(fit)) = (
            &self.settings.model_fit_output,
            self.fit.fit(self.cpus, &self.cpu_model),
        ) else {
            return;
        };
        if let Err(e) = fit.save(path) {
            tracing::warn!("writing the model fit: {e}");
        }
    }

    /// The current online fit, if there are enough samples.
    pub fn model_fit(&self) -> Option<crate::meter::model::ModelFit> {
        self.fit.fit(self.cpus, &self.cpu_model)
    }

    fn workload_of(&mut self, cgroup_id: u64) -> Workload {
        self.resolve(cgroup_id).0
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

    fn account(
        &mut self,
        before: &UsageSnapshot,
        now: &UsageSnapshot,
        elapsed: Nanos,
        mono: Nanos,
    ) {
        // Usage per workload.
        let mut usage: HashMap<Workload, Usage> = HashMap::new();
        let ids: Vec<(u64, Usage)> = now
            .cgroups
            .iter()
            .map(|(id, counters)| (*id, delta(counters, before.cgroups.get(id))))
            .collect();
        let mut alive = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, used) in ids {
            let (workload, vanished) = self.resolve(id);
            if vanished {
                gone.push(id);
            } else {
                alive.push(workload.clone());
            }
            if used.cpu_ns > 0 {
                let entry = usage.entry(workload).or_default();
                entry.cpu_ns += used.cpu_ns;
                entry.cycles += used.cycles;
            }
        }
        let overflow = delta(&now.cgroup_overflow, Some(&before.cgroup_overflow));
        if overflow.cpu_ns > 0 {
            usage.insert(
                Workload::System {
                    bucket: OVERFLOW_BUCKET.into(),
                },
                overflow,
            );
        }
        let busy = now.busy_ns.saturating_sub(before.busy_ns);
        let idle_ns = now.idle_ns.saturating_sub(before.idle_ns);
        self.state.busy_ns += busy;
        self.state.idle_ns += idle_ns;
        self.state.overflow_cgroup_ns += overflow.cpu_ns;
        self.state.overflow_process_ns += now
            .process_overflow
            .cpu_ns
            .saturating_sub(before.process_overflow.cpu_ns);
        let utilisation = if busy + idle_ns > 0 {
            Some(busy as f64 / (busy + idle_ns) as f64)
        } else {
            None
        };

        let idle_weights = self.idle_weights(&usage);
        let process_usage = self.process_usage(before, now);

        // Energy per meter and domain.
        let ctx = MeterContext {
            elapsed,
            cpu_utilisation: utilisation,
            cpus: self.cpus,
        };
        self.last = LastInterval::default();
        let mut energies = Vec::new();
        let mut gpu_samples = None;
        for meter in &mut self.meters {
            let source = meter.source();
            if meter.is_estimate() {
                self.last.estimate_sources.push(source);
            }
            match meter.sample(&ctx) {
                Ok(samples) => {
                    self.last.meter_up.insert(source, true);
                    let mut per_domain: BTreeMap<Domain, Joules> = BTreeMap::new();
                    for sample in samples {
                        *per_domain.entry(sample.domain).or_default() += sample.joules;
                    }
                    if let Some(watts) = meter.idle_power() {
                        for domain in per_domain.keys() {
                            self.idle.set_model_idle(*domain, source, watts);
                        }
                    }
                    if per_domain.contains_key(&Domain::Gpu) {
                        let samples: Vec<_> = meter
                            .gpu_processes()
                            .into_iter()
                            .map(|s| attribute::GpuProcessSample {
                                pid: s.pid,
                                sm_util_percent: s.utilisation_percent.round().clamp(0.0, 100.0)
                                    as u32,
                            })
                            .collect();
                        gpu_samples = Some(samples);
                    }
                    for (domain, energy) in per_domain {
                        let idle = self.idle.estimate(domain, source, energy, elapsed).idle;
                        if elapsed.0 > 0 {
                            self.last
                                .power
                                .insert((domain, source), Watts(energy.0 / elapsed.as_secs_f64()));
                        }
                        energies.push(DomainEnergy {
                            domain,
                            source: source.to_owned(),
                            energy,
                            idle,
                        });
                    }
                }
                Err(e) => {
                    self.last.meter_up.insert(source, false);
                    tracing::warn!("meter {source} failed this interval: {e}");
                }
            }
        }

        if let Some(utilisation) = utilisation {
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
        let gpu_weights = gpu_samples.map(|samples| self.gpu_weights(&samples));
        for energy in &energies {
            let attribution = match (&gpu_weights, energy.domain) {
                (Some(weights), Domain::Gpu) => {
                    attribute::attribute_by_weights(energy, weights, &HashMap::new())
                }
                _ => attribute::attribute(energy, &usage, &idle_weights),
            };
            // Below f64 resolution of the measured energy a residual is
            // rounding, not energy: keep the counter at an honest 0.
            let residual = attribution.residual.0;
            if residual.abs() > 1e-9 * attribution.measured.0.abs().max(1e-9) {
                *self.state.residual.entry(energy.domain).or_default() += residual;
            }
            self.state.workloads.apply(&attribution, mono);
            self.state.pods.apply(&by_pod(&attribution), mono);
            if self.settings.per_process && energy.domain != Domain::Gpu {
                let by_process = attribute::attribute(energy, &process_usage, &HashMap::new());
                self.state.processes.apply(&by_process, mono);
            }
        }
        self.state.workloads.add_usage(&usage, mono);
        let pod_usage: HashMap<String, Usage> =
            usage
                .iter()
                .fold(HashMap::new(), |mut pods, (workload, used)| {
                    if let Some(uid) = workload.pod_uid() {
                        let entry: &mut Usage = pods.entry(uid.to_owned()).or_default();
                        entry.cpu_ns += used.cpu_ns;
                        entry.cycles += used.cycles;
                    }
                    pods
                });
        self.state.pods.add_usage(&pod_usage, mono);
        self.state.processes.add_usage(&process_usage, mono);

        // Liveness: what still exists keeps its counters.
        for workload in &alive {
            self.state.workloads.mark_seen(workload, mono);
            if let Some(uid) = workload.pod_uid() {
                self.state.pods.mark_seen(&uid.to_owned(), mono);
            }
        }
        for pid in now.processes.keys() {
            if self.settings.host_proc.join(pid.to_string()).exists() {
                self.state.processes.mark_seen(pid, mono);
            }
        }
        self.state.workloads.prune(mono);
        self.state.pods.prune(mono);
        let dropped_pids = self.state.processes.prune(mono);
        for pid in &dropped_pids {
            self.state.process_labels.remove(pid);
        }
        // A cgroup seen gone at two consecutive intervals has had its final
        // slices counted (its tasks exited before rmdir, and one more sample
        // has passed): its workload's ledger holds the total, and the
        // kernel's key can go, so the bounded map does not fill with the
        // dead.
        let gone_now: std::collections::HashSet<u64> = gone.into_iter().collect();
        let forget: Vec<u64> = gone_now.intersection(&self.gone_before).copied().collect();
        self.gone_before = gone_now;
        if !forget.is_empty() || !dropped_pids.is_empty() {
            self.probe.forget(&forget, &dropped_pids);
        }
    }

    fn idle_weights(&self, usage: &HashMap<Workload, Usage>) -> HashMap<Workload, f64> {
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
                        .keys()
                        .filter_map(|w| w.pod_uid().map(str::to_owned))
                        .collect();
                }
                uids.into_iter().map(|uid| (pod_key(&uid), 1.0)).collect()
            }
        }
    }

    fn gpu_weights(&mut self, samples: &[attribute::GpuProcessSample]) -> HashMap<Workload, f64> {
        let mut of_pid = HashMap::new();
        for sample in samples {
            if let Some(id) = cgroup_id_of_pid(
                &self.settings.host_proc,
                &self.settings.cgroup_root,
                sample.pid,
            ) {
                of_pid.insert(sample.pid, self.workload_of(id));
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

    fn process_usage(
        &mut self,
        before: &UsageSnapshot,
        now: &UsageSnapshot,
    ) -> HashMap<u32, Usage> {
        if !self.settings.per_process {
            return HashMap::new();
        }
        let mut usage = HashMap::new();
        for (pid, process) in &now.processes {
            let used = delta(
                &process.counters,
                before.processes.get(pid).map(|p| &p.counters),
            );
            let container = match self.workload_of(process.cgroup_id) {
                Workload::Container { container_id, .. } => container_id,
                _ => String::new(),
            };
            self.state.process_labels.insert(
                *pid,
                (crate::export::bounded_label(&process.comm), container),
            );
            if used.cpu_ns > 0 {
                usage.insert(*pid, used);
            }
        }
        usage
    }
}

/// The cgroup v2 id of a live process, from `/proc/<pid>/cgroup`.
fn cgroup_id_of_pid(
    host_proc: &std::path::Path,
    cgroup_root: &std::path::Path,
    pid: u32,
) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(host_proc.join(pid.to_string()).join("cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    std::fs::metadata(cgroup_root.join(path.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
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

/// Runs intervals until `stop` receives (or its sender is dropped), then
/// saves the checkpoint.
pub fn run(mut measure: Loop, published: Published, handle: ServerHandle, stop: Receiver<()>) {
    let interval = measure.settings.interval;
    let mut next = Instant::now();
    loop {
        measure.step(&published);
        if published.is_ready() {
            handle.interval_done();
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
