//! Turns the loop's cumulative state into the metric families of
//! `/metrics`: names, HELP texts and label sets are the contract of
//! DESIGN.md, and the dashboards and alerts depend on them.
//!
//! Names (`namespace`, `pod`, `container`) come from the counters
//! themselves ([`SeriesNames`]), refreshed from the pod directory every
//! interval by [`remember_names`]: a series keeps its labels for as long as
//! its counter is exported, after the API deleted the pod, after the
//! directory forgot it and after an exporter restart, so it never flips to
//! a second series with empty names.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::attribute::SeriesNames;
use crate::export::{Family, Kind, Published, Report, bounded_label};
use crate::probe::Probe;
use crate::units::Domain;
use crate::workload::{PodDirectory, PodMeta, Workload};

use super::{Loop, State, kepler};
use crate::config::Compat;

pub const BUILD_INFO: &str = "ergon_build_info";
pub const PROBE_INFO: &str = "ergon_probe_info";
pub const METER_UP: &str = "ergon_meter_up";
pub const METER_ZONE_UP: &str = "ergon_meter_zone_up";
pub const METER_REJECTED: &str = "ergon_meter_rejected_readings_total";
pub const NODE_ENERGY: &str = "ergon_node_energy_joules_total";
pub const NODE_POWER: &str = "ergon_node_power_watts";
pub const NODE_UNATTRIBUTED: &str = "ergon_node_unattributed_joules_total";
pub const NODE_CPU_SECONDS: &str = "ergon_node_cpu_seconds_total";
pub const POD_ENERGY: &str = "ergon_pod_energy_joules_total";
pub const POD_LABELS: &str = "ergon_pod_labels";
pub const CONTAINER_ENERGY: &str = "ergon_container_energy_joules_total";
pub const CONTAINER_CPU_SECONDS: &str = "ergon_container_cpu_seconds_total";
pub const CONTAINER_CPU_CYCLES: &str = "ergon_container_cpu_cycles_total";
pub const SYSTEM_ENERGY: &str = "ergon_system_energy_joules_total";
pub const SYSTEM_CPU_SECONDS: &str = "ergon_system_cpu_seconds_total";
pub const PROCESS_ENERGY: &str = "ergon_process_energy_joules_total";
pub const RESIDUAL: &str = "ergon_attribution_residual_joules_total";
pub const PROBE_OVERFLOW_SECONDS: &str = "ergon_probe_overflow_cpu_seconds_total";
pub const PROBE_RUN_TIME: &str = "ergon_probe_run_time_seconds_total";
pub const PROBE_RUNS: &str = "ergon_probe_runs_total";
pub const PROBE_MAP_MEMORY: &str = "ergon_probe_map_memory_bytes";
pub const MODEL_FIT_WATTS: &str = "ergon_model_fit_watts_per_cpu";
pub const MODEL_FIT_RMSE: &str = "ergon_model_fit_rmse_watts";
pub const MODEL_FIT_SAMPLES: &str = "ergon_model_fit_samples";
pub const UNKNOWN_POD_CGROUPS: &str = "ergon_unknown_pod_cgroups";
pub const PROBE_SKIPPED: &str = "ergon_probe_skipped_total";
pub const PROBE_INSERT_FAILURES: &str = "ergon_probe_map_insert_failures_total";
pub const KEPLER_CONTAINER: &str = "kepler_container_joules_total";
pub const KEPLER_NODE: &str = "kepler_node_platform_joules_total";
pub const CHECKPOINT_REJECTED: &str = "ergon_checkpoint_rejected_total";
pub const CHECKPOINT_WRITING: &str = "ergon_checkpoint_writing";

const CONTAINER_LABELS: &[&str] = &["namespace", "pod", "container", "container_id"];
const CONTAINER_DOMAIN_LABELS: &[&str] =
    &["namespace", "pod", "container", "container_id", "domain"];

/// Every family a report can hold, for the registry's descriptions.
pub fn catalogue() -> Vec<Family> {
    use Kind::{Counter, Gauge};
    vec![
        Family::new(
            BUILD_INFO,
            "Ergon's version and the kernel it runs on; always 1.",
            Gauge,
            &["version", "kernel"],
        ),
        Family::new(
            PROBE_INFO,
            "How CPU usage is collected (mode=ebpf|procfs), the sched_switch hook and the counters used; always 1.",
            Gauge,
            &["mode", "hook", "pmu"],
        ),
        Family::new(
            METER_UP,
            "1 if the energy meter was read this interval, 0 if it failed. source=model is an estimate, not a measurement.",
            Gauge,
            &["source"],
        ),
        Family::new(
            METER_ZONE_UP,
            "1 if the meter's zone (RAPL zone, perf event, hwmon sensor, GPU) was read this interval, 0 if it is known but could not be read or parsed; the log and `ergon doctor` say why.",
            Gauge,
            &["source", "zone"],
        ),
        Family::new(
            METER_REJECTED,
            "Readings not counted: reason=above_max_power (more than the zone can draw), ambiguous_gap (a gap long enough for an unseen counter wrap), counter_reset. Each is one zone's interval whose energy is unknown and absent from the energy counters.",
            Counter,
            &["source", "reason"],
        ),
        Family::new(
            NODE_ENERGY,
            "Energy the node's meters measured (or the model estimated, source=model), split into mode=active|idle. Domains overlap (package includes core; psys includes package and dram): do not add them all up.",
            Counter,
            &["domain", "mode", "source"],
        ),
        Family::new(
            NODE_UNATTRIBUTED,
            "Energy that stays on the node, attributed to no workload: mode=idle (under --idle-policy none, all idle energy) or mode=active (an interval in which nothing ran). Pods + system buckets + this = the node's energy.",
            Counter,
            &["domain", "mode", "source"],
        ),
        Family::new(
            NODE_POWER,
            "Average power of the last interval per domain and meter.",
            Gauge,
            &["domain", "source"],
        ),
        Family::new(
            NODE_CPU_SECONDS,
            "CPU time of all the node's CPUs, mode=busy|idle.",
            Counter,
            &["mode"],
        ),
        Family::new(
            POD_ENERGY,
            "Energy attributed to a pod: its cgroups' active share plus, under --idle-policy, its share of idle.",
            Counter,
            &["namespace", "pod", "pod_uid", "domain"],
        ),
        Family::new(
            POD_LABELS,
            "The --pod-labels of a pod as label_<key> labels, kube-state-metrics style; always 1. Join on pod_uid: `ergon_pod_energy_joules_total * on(pod_uid) group_left(label_app) ergon_pod_labels`.",
            Gauge,
            &["namespace", "pod", "pod_uid"],
        ),
        Family::new(
            CONTAINER_ENERGY,
            "Energy attributed to a container in proportion to its CPU usage (cycles where counted, else CPU time).",
            Counter,
            CONTAINER_DOMAIN_LABELS,
        ),
        Family::new(
            CONTAINER_CPU_SECONDS,
            "CPU time of a container, counted at every context switch.",
            Counter,
            CONTAINER_LABELS,
        ),
        Family::new(
            CONTAINER_CPU_CYCLES,
            "CPU cycles of a container (where the CPU exposes a PMU).",
            Counter,
            CONTAINER_LABELS,
        ),
        Family::new(
            SYSTEM_ENERGY,
            "Energy of work that is no pod: system.slice/<unit>, user.slice, kernel, overflow (cgroup map full) and other.",
            Counter,
            &["bucket", "domain"],
        ),
        Family::new(
            SYSTEM_CPU_SECONDS,
            "CPU time of work that is no pod, by bucket.",
            Counter,
            &["bucket"],
        ),
        Family::new(
            PROCESS_ENERGY,
            "Energy attributed to a process (opt-in with --per-process).",
            Counter,
            &["pid", "comm", "container_id", "domain"],
        ),
        Family::new(
            RESIDUAL,
            "Measured energy minus what was attributed or kept on the node; stays at 0 unless a meter reported an unusable value.",
            Counter,
            &["domain"],
        ),
        Family::new(
            PROBE_OVERFLOW_SECONDS,
            "CPU time counted in a map's overflow bucket, on the node but in no cgroup (or process): the map was full (raise --max-cgroups / --max-processes), or a new key could not be allocated for 100 ms (see ergon_probe_map_insert_failures_total).",
            Counter,
            &["map"],
        ),
        Family::new(
            PROBE_RUN_TIME,
            "Time the kernel spent in the accounting program (needs kernel.bpf_stats_enabled=1).",
            Counter,
            &[],
        ),
        Family::new(
            PROBE_RUNS,
            "Runs of the accounting program, one per context switch (needs kernel.bpf_stats_enabled=1).",
            Counter,
            &[],
        ),
        Family::new(
            PROBE_MAP_MEMORY,
            "Kernel memory of each of the probe's BPF maps, as the kernel reports it (memlock in /proc/<pid>/fdinfo); charged to the exporter's memory cgroup since Linux 5.11.",
            Gauge,
            &["map"],
        ),
        Family::new(
            MODEL_FIT_WATTS,
            "Power model fitted online against a real CPU meter, per vCPU: term=idle|max (P = idle + (max - idle) x utilisation). Reusable on VMs of the same hardware with --model-coefficients.",
            Gauge,
            &["term"],
        ),
        Family::new(
            MODEL_FIT_RMSE,
            "Root-mean-square error of the online model fit against the measured power.",
            Gauge,
            &[],
        ),
        Family::new(
            MODEL_FIT_SAMPLES,
            "Intervals the online model fit has seen.",
            Gauge,
            &[],
        ),
        Family::new(
            PROBE_SKIPPED,
            "Cgroups (kind=cgroup, with their subtree: their CPU time stays with the parent) and processes (kind=process) the procfs probe left out of a sample because they could not be read: reason=permission|name_too_long|unparsable|io.",
            Counter,
            &["kind", "reason"],
        ),
        Family::new(
            PROBE_INSERT_FAILURES,
            "Keys the kernel could not add to the probe's maps (map=cgroups|processes), by reason: full (raise --max-cgroups / --max-processes), no_memory (ENOMEM: a non-sleeping allocation found no memory; a cgroup's CPU time then waits on its CPU and is added later), other. What could not be added is in ergon_probe_overflow_cpu_seconds_total.",
            Counter,
            &["map", "reason"],
        ),
        Family::new(
            UNKNOWN_POD_CGROUPS,
            "Pod uids in the kubelet's cgroups that the Kubernetes API does not list for this node: billed by uid, left unnamed. Present only once the pod list has synced; above 0 for long, something made pod cgroups the kubelet does not know.",
            Gauge,
            &[],
        ),
        Family::new(
            KEPLER_CONTAINER,
            "Kepler-compatible container energy (--compat kepler): mode=dynamic|idle, summed over package, dram and gpu.",
            Counter,
            &[
                "container_id",
                "container_name",
                "container_namespace",
                "pod_name",
                "mode",
                "source",
            ],
        ),
        Family::new(
            KEPLER_NODE,
            "Kepler-compatible node energy (--compat kepler), summed over package, dram and gpu.",
            Counter,
            &["source", "mode"],
        ),
        Family::new(
            CHECKPOINT_REJECTED,
            "Checkpoints found at start that could not be used (reason=not_a_file|too_large|format|invalid): moved aside to <checkpoint>.rejected-<time>, counters started from zero.",
            Counter,
            &["reason"],
        ),
        Family::new(
            CHECKPOINT_WRITING,
            "1 if the last save wrote the checkpoint, 0 if it failed or another exporter holds its lock; absent without a checkpoint (--no-checkpoint).",
            Gauge,
            &[],
        ),
    ]
    .into_iter()
    .chain(kepler::catalogue())
    .collect()
}

/// Refreshes every counter's [`SeriesNames`] from the pod directory; a pod
/// the directory does not know keeps the names it had. Names are stored as
/// exported (bounded), which also bounds the checkpoint.
pub(super) fn remember_names(state: &mut State, pods: &PodDirectory) {
    name_series(
        state,
        |uid| pods.pod(uid),
        |uid, container_id| pods.missed_container(uid, container_id),
    );
}

/// `pod` looks a pod up; `unnamed` is told of a container id that a known
/// pod's metadata does not name yet (so the pod source can ask again).
fn name_series(
    state: &mut State,
    pod: impl Fn(&str) -> Option<Arc<PodMeta>>,
    unnamed: impl Fn(&str, &str),
) {
    let update = |names: &mut Option<SeriesNames>, fresh: SeriesNames| {
        if names.as_ref() != Some(&fresh) {
            *names = Some(fresh);
        }
    };
    for (uid, counters) in state.pods.workloads_mut() {
        if let Some(meta) = pod(uid) {
            let fresh = SeriesNames {
                namespace: bounded_label(&meta.namespace),
                pod: bounded_label(&meta.name),
                container: String::new(),
                sandbox: false,
            };
            update(&mut counters.names, fresh);
        }
    }
    for (workload, counters) in state.workloads.workloads_mut() {
        let Workload::Container {
            pod_uid,
            container_id,
            ..
        } = workload
        else {
            continue;
        };
        let Some(meta) = pod(pod_uid) else { continue };
        let known = counters
            .names
            .as_ref()
            .map(|names| names.container.clone())
            .filter(|name| !name.is_empty());
        let (container, sandbox) = match (meta.containers.get(container_id), known) {
            (Some(name), _) => (bounded_label(name), false),
            // A restarted container's old id leaves the pod's status: its
            // counter keeps the container name it had.
            (None, Some(name)) => (name, false),
            // The status lags the runtime: not named yet; ask again.
            (None, None) if meta.containers_pending => {
                unnamed(pod_uid, container_id);
                (String::new(), false)
            }
            // Every container of the pod has its id and this is none of
            // them: the sandbox, folded into the pod.
            (None, None) => (String::new(), true),
        };
        let fresh = SeriesNames {
            namespace: bounded_label(&meta.namespace),
            pod: bounded_label(&meta.name),
            container,
            sandbox,
        };
        update(&mut counters.names, fresh);
    }
}

/// Before the first interval: a restarted exporter serves the counters it
/// restored at once, so no scrape finds them missing.
pub(super) fn publish_restored(measure: &mut Loop, published: &Published) {
    let state = &measure.state;
    let restored =
        state.workloads.node().next().is_some() || state.pods.workloads().next().is_some();
    if restored {
        remember_names(&mut measure.state, &measure.pods);
        published.publish(build(measure));
    }
}

/// Whether these are the names of a pod's sandbox container (see
/// [`SeriesNames::sandbox`]).
pub(super) fn is_sandbox(names: &Option<SeriesNames>) -> bool {
    names.as_ref().is_some_and(|names| names.sandbox)
}

pub(super) fn names_of(names: &Option<SeriesNames>) -> (String, String, String) {
    names.as_ref().map_or_else(Default::default, |names| {
        (
            bounded_label(&names.namespace),
            bounded_label(&names.pod),
            bounded_label(&names.container),
        )
    })
}

/// Domains that do not overlap, for totals (Kepler's sum).
fn disjoint(domain: Domain) -> bool {
    matches!(domain, Domain::Package | Domain::Dram | Domain::Gpu)
}

fn family<'a>(families: &'a mut [Family], name: &str) -> &'a mut Family {
    families
        .iter_mut()
        .find(|f| f.name == name)
        .expect("every name is in the catalogue")
}

pub(super) fn build(measure: &Loop) -> Report {
    let mut families = catalogue();
    let state = &measure.state;
    // `--metrics` (export::levels): a level switched off is skipped here,
    // not built and filtered out later.
    let levels = measure.settings.metrics;
    let info = measure.probe.info();
    family(&mut families, BUILD_INFO).push(
        vec![
            env!("CARGO_PKG_VERSION").into(),
            bounded_label(&measure.kernel),
        ],
        1.0,
    );
    family(&mut families, PROBE_INFO).push(
        vec![info.mode.into(), info.hook.into(), info.pmu.into()],
        1.0,
    );
    for (source, up) in &measure.last.meter_up {
        family(&mut families, METER_UP).push(vec![(*source).into()], f64::from(u8::from(*up)));
    }
    for (source, health) in &measure.last.meter_health {
        for zone in &health.zones {
            family(&mut families, METER_ZONE_UP).push(
                vec![(*source).into(), bounded_label(&zone.zone)],
                f64::from(u8::from(zone.up)),
            );
        }
        for (rejection, count) in &health.rejected {
            family(&mut families, METER_REJECTED).push(
                vec![(*source).into(), rejection.as_str().into()],
                *count as f64,
            );
        }
    }
    let mut kepler_node: BTreeMap<(String, &str), f64> = BTreeMap::new();
    for (domain, source, counters) in state.workloads.node().filter(|_| levels.node) {
        let node = family(&mut families, NODE_ENERGY);
        node.push(
            vec![domain.as_str().into(), "active".into(), source.into()],
            counters.active.0,
        );
        node.push(
            vec![domain.as_str().into(), "idle".into(), source.into()],
            counters.idle.0,
        );
        let kept = family(&mut families, NODE_UNATTRIBUTED);
        kept.push(
            vec![domain.as_str().into(), "idle".into(), source.into()],
            counters.idle_kept.0,
        );
        kept.push(
            vec![domain.as_str().into(), "active".into(), source.into()],
            counters.active_unattributed.0,
        );
        if disjoint(domain) {
            *kepler_node
                .entry((source.to_owned(), "dynamic"))
                .or_default() += counters.active.0;
            *kepler_node.entry((source.to_owned(), "idle")).or_default() += counters.idle.0;
        }
    }
    if levels.node {
        for ((domain, source), watts) in &measure.last.power {
            family(&mut families, NODE_POWER)
                .push(vec![domain.as_str().into(), (*source).into()], watts.0);
        }
        let cpu = family(&mut families, NODE_CPU_SECONDS);
        cpu.push(vec!["busy".into()], state.busy_ns as f64 / 1e9);
        cpu.push(vec!["idle".into()], state.idle_ns as f64 / 1e9);
    }

    let mut unknown_pods = 0;
    let label_keys = &measure.settings.pod_labels;
    family(&mut families, POD_LABELS).runtime_label_names = label_keys
        .iter()
        .map(|key| crate::export::pod_label_name(key))
        .collect();
    for (uid, counters) in state.pods.workloads() {
        // Names stay with the counter once known; a uid the API never
        // described on this node stays unnamed and is counted.
        if counters.names.is_none() {
            unknown_pods += 1;
        }
        if !levels.pod {
            continue;
        }
        let (namespace, name, _) = names_of(&counters.names);
        let pod = measure.pods.pod(uid);
        let uid = bounded_label(uid);
        for (domain, joules) in &counters.energy {
            family(&mut families, POD_ENERGY).push(
                vec![
                    namespace.clone(),
                    name.clone(),
                    uid.clone(),
                    domain.as_str().into(),
                ],
                joules.total().0,
            );
        }
        // One info series per named pod, only where labels were asked for:
        // labels never go on the energy series (their cardinality would
        // multiply every series of the pod).
        if let Some(pod) = pod.filter(|_| !label_keys.is_empty()) {
            let mut labels = vec![namespace, name, uid];
            labels.extend(label_keys.iter().map(|key| {
                pod.labels
                    .get(key)
                    .map(|value| bounded_label(value))
                    .unwrap_or_default()
            }));
            family(&mut families, POD_LABELS).push(labels, 1.0);
        }
    }

    if let Some(usage) = &measure.previous {
        for ((kind, reason), count) in &usage.skipped {
            family(&mut families, PROBE_SKIPPED)
                .push(vec![(*kind).into(), (*reason).into()], *count as f64);
        }
        if let Probe::Ebpf(_) = &measure.probe {
            let failures = family(&mut families, PROBE_INSERT_FAILURES);
            for (map, counts) in [
                ("cgroups", usage.cgroup_insert_failures),
                ("processes", usage.process_insert_failures),
            ] {
                for (reason, count) in ergon_ebpf::INSERT_FAILURE_REASONS.iter().zip(counts) {
                    failures.push(vec![map.into(), (*reason).into()], count as f64);
                }
            }
        }
    }
    // Before the first full list every pod is unknown: no figure then.
    if measure.pods.connection().synced {
        family(&mut families, UNKNOWN_POD_CGROUPS).push(vec![], f64::from(unknown_pods));
    }

    let source = measure.metering.primary_source();
    for (workload, counters) in state.workloads.workloads() {
        match workload {
            Workload::Container { .. } if !levels.container => {}
            // The pause container: in the pod's total only.
            Workload::Container { .. } if is_sandbox(&counters.names) => {}
            Workload::System { .. } if !levels.node => {}
            Workload::Container { container_id, .. } => {
                let (namespace, pod_name, container) = names_of(&counters.names);
                let container_id = bounded_label(container_id);
                let labels = vec![namespace, pod_name, container, container_id.clone()];
                family(&mut families, CONTAINER_CPU_SECONDS)
                    .push(labels.clone(), counters.cpu_ns as f64 / 1e9);
                if counters.cycles > 0 {
                    family(&mut families, CONTAINER_CPU_CYCLES)
                        .push(labels.clone(), counters.cycles as f64);
                }
                let (mut dynamic, mut idle) = (0.0, 0.0);
                for (domain, joules) in &counters.energy {
                    let mut with_domain = labels.clone();
                    with_domain.push(domain.as_str().into());
                    family(&mut families, CONTAINER_ENERGY).push(with_domain, joules.total().0);
                    if disjoint(*domain) {
                        dynamic += joules.active.0;
                        idle += joules.idle.0;
                    }
                }
                if measure.settings.compat == Some(Compat::Kepler09) {
                    for (mode, value) in [("dynamic", dynamic), ("idle", idle)] {
                        family(&mut families, KEPLER_CONTAINER).push(
                            vec![
                                container_id.clone(),
                                labels[2].clone(),
                                labels[0].clone(),
                                labels[1].clone(),
                                mode.into(),
                                source.into(),
                            ],
                            value,
                        );
                    }
                }
            }
            Workload::System { bucket } => {
                let bucket = &bounded_label(bucket);
                family(&mut families, SYSTEM_CPU_SECONDS)
                    .push(vec![bucket.clone()], counters.cpu_ns as f64 / 1e9);
                for (domain, joules) in &counters.energy {
                    family(&mut families, SYSTEM_ENERGY).push(
                        vec![bucket.clone(), domain.as_str().into()],
                        joules.total().0,
                    );
                }
            }
            // Pod-level cgroups (sandbox, conmon) and idle shares count in
            // the pod's total only.
            Workload::Pod { .. } => {}
        }
    }
    if measure.settings.compat == Some(Compat::Kepler09) && levels.node {
        for ((source, mode), value) in kepler_node {
            family(&mut families, KEPLER_NODE).push(vec![source, mode.into()], value);
        }
    }

    if measure.settings.per_process && levels.process {
        for (pid, counters) in state.processes.workloads() {
            let (comm, container) = state.process_labels.get(pid).cloned().unwrap_or_default();
            for (domain, joules) in &counters.energy {
                family(&mut families, PROCESS_ENERGY).push(
                    vec![
                        pid.to_string(),
                        bounded_label(&comm),
                        bounded_label(&container),
                        domain.as_str().into(),
                    ],
                    joules.total().0,
                );
            }
        }
    }
    for domain in Domain::ALL {
        let residual = state.residual.get(&domain).copied();
        let measured = state.workloads.node().any(|(d, _, _)| d == domain);
        if measured || residual.is_some() {
            family(&mut families, RESIDUAL)
                .push(vec![domain.as_str().into()], residual.unwrap_or(0.0));
        }
    }
    if let Some(fit) = measure.model_fit() {
        let watts = family(&mut families, MODEL_FIT_WATTS);
        watts.push(vec!["idle".into()], fit.coefficients.idle_watts_per_cpu.0);
        watts.push(vec!["max".into()], fit.coefficients.max_watts_per_cpu.0);
        family(&mut families, MODEL_FIT_RMSE).push(vec![], fit.rmse_watts);
        family(&mut families, MODEL_FIT_SAMPLES).push(vec![], fit.samples as f64);
    }
    let overflow = family(&mut families, PROBE_OVERFLOW_SECONDS);
    overflow.push(
        vec!["cgroups".into()],
        state.overflow_cgroup_ns as f64 / 1e9,
    );
    overflow.push(
        vec!["processes".into()],
        state.overflow_process_ns as f64 / 1e9,
    );
    if let Some(checkpoint) = &measure.checkpoint {
        if let Some(reason) = checkpoint.rejected() {
            family(&mut families, CHECKPOINT_REJECTED).push(vec![reason.as_str().into()], 1.0);
        }
        family(&mut families, CHECKPOINT_WRITING)
            .push(vec![], f64::from(u8::from(checkpoint.writing())));
    }
    if let Probe::Ebpf(ebpf) = &measure.probe
        && let Some((run_time, runs)) = ebpf.program_stats()
    {
        family(&mut families, PROBE_RUN_TIME).push(vec![], run_time.as_secs_f64());
        family(&mut families, PROBE_RUNS).push(vec![], runs as f64);
    }
    match measure.probe.map_memory() {
        Ok(maps) => {
            let gauge = family(&mut families, PROBE_MAP_MEMORY);
            for map in maps {
                gauge.push(vec![map.name], map.bytes as f64);
            }
        }
        Err(e) => tracing::debug!("map memory not readable: {e}"),
    }
    if let Some(node) = &measure.kepler_node {
        kepler::push(&mut families, measure, node);
    }
    Report { families }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_is_in_the_catalogue_once() {
        let names = [
            BUILD_INFO,
            PROBE_INFO,
            METER_UP,
            METER_ZONE_UP,
            METER_REJECTED,
            NODE_ENERGY,
            NODE_POWER,
            NODE_UNATTRIBUTED,
            NODE_CPU_SECONDS,
            POD_ENERGY,
            POD_LABELS,
            CONTAINER_ENERGY,
            CONTAINER_CPU_SECONDS,
            CONTAINER_CPU_CYCLES,
            SYSTEM_ENERGY,
            SYSTEM_CPU_SECONDS,
            PROCESS_ENERGY,
            RESIDUAL,
            PROBE_OVERFLOW_SECONDS,
            PROBE_RUN_TIME,
            PROBE_RUNS,
            PROBE_MAP_MEMORY,
            MODEL_FIT_WATTS,
            MODEL_FIT_RMSE,
            MODEL_FIT_SAMPLES,
            PROBE_SKIPPED,
            PROBE_INSERT_FAILURES,
            UNKNOWN_POD_CGROUPS,
            KEPLER_CONTAINER,
            KEPLER_NODE,
            CHECKPOINT_REJECTED,
            CHECKPOINT_WRITING,
        ];
        let catalogue = catalogue();
        for name in names {
            let found = catalogue.iter().filter(|f| f.name == name).count();
            assert_eq!(found, 1, "{name} is in the catalogue {found} times");
            let family = catalogue.iter().find(|f| f.name == name).unwrap();
            // Prometheus conventions: counters end in _total, gauges do not.
            assert_eq!(
                family.kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}"
            );
        }
        assert_eq!(
            catalogue.len(),
            names.len() + kepler::catalogue().len(),
            "a family without a name constant"
        );
    }

    fn pod_meta(uid: &str, name: &str, containers: &[(&str, &str)]) -> Arc<PodMeta> {
        Arc::new(PodMeta {
            uid: uid.into(),
            namespace: "vehicle-pipeline".into(),
            name: name.into(),
            containers: containers
                .iter()
                .map(|(id, name)| (id.to_string(), name.to_string()))
                .collect(),
            ..PodMeta::default()
        })
    }

    #[test]
    fn names_outlive_the_directory_that_gave_them() {
        use crate::attribute::Usage;
        use crate::units::Nanos;
        use crate::workload::QosClass;
        use std::collections::HashMap;
        let container = Workload::Container {
            pod_uid: "u-1".into(),
            container_id: "c0ffee".into(),
            runtime: crate::workload::cgroup::Runtime::Containerd,
            qos: QosClass::Burstable,
        };
        let used = Usage {
            cpu_ns: 10,
            cycles: 0,
        };
        let mut state = State::new(std::time::Duration::from_secs(900));
        state
            .workloads
            .add_usage(&HashMap::from([(container.clone(), used)]), Nanos(1));
        state
            .pods
            .add_usage(&HashMap::from([("u-1".to_owned(), used)]), Nanos(1));
        let mut directory = HashMap::from([(
            "u-1".to_owned(),
            pod_meta("u-1", "job-once", &[("c0ffee", "main")]),
        )]);
        name_series(&mut state, |uid| directory.get(uid).cloned(), |_, _| {});
        let expected = SeriesNames {
            namespace: "vehicle-pipeline".into(),
            pod: "job-once".into(),
            container: "main".into(),
            sandbox: false,
        };
        let names = |state: &State| {
            (
                state.workloads.workload(&container).unwrap().names.clone(),
                state
                    .pods
                    .workload(&"u-1".to_owned())
                    .unwrap()
                    .names
                    .clone(),
            )
        };
        let pod_names = SeriesNames {
            container: String::new(),
            ..expected.clone()
        };
        assert_eq!(
            names(&state),
            (Some(expected.clone()), Some(pod_names.clone()))
        );
        // The container restarts under a new id: the old id's counter keeps
        // its container name.
        directory.insert(
            "u-1".into(),
            pod_meta("u-1", "job-once", &[("beef", "main")]),
        );
        name_series(&mut state, |uid| directory.get(uid).cloned(), |_, _| {});
        assert_eq!(
            names(&state),
            (Some(expected.clone()), Some(pod_names.clone()))
        );
        // The directory forgets the pod while its counters are retained.
        directory.clear();
        name_series(&mut state, |uid| directory.get(uid).cloned(), |_, _| {});
        assert_eq!(names(&state), (Some(expected), Some(pod_names)));
    }

    #[test]
    fn the_sandbox_is_folded_into_its_pod_and_a_lagging_container_asks_again() {
        use crate::attribute::Usage;
        use crate::units::Nanos;
        use crate::workload::QosClass;
        use std::cell::RefCell;
        use std::collections::HashMap;
        let container = |id: &str| Workload::Container {
            pod_uid: "u-1".into(),
            container_id: id.into(),
            runtime: crate::workload::cgroup::Runtime::Docker,
            qos: QosClass::Burstable,
        };
        let used = Usage {
            cpu_ns: 10,
            cycles: 0,
        };
        let mut state = State::new(std::time::Duration::from_secs(900));
        state.workloads.add_usage(
            &HashMap::from([(container("pause1"), used), (container("c0ffee"), used)]),
            Nanos(1),
        );
        let names = |state: &State, id: &str| {
            state
                .workloads
                .workload(&container(id))
                .unwrap()
                .names
                .clone()
                .unwrap()
        };
        // The status lists no container yet: both ids may be containers;
        // neither is folded and both ask for another look.
        let asked = RefCell::new(Vec::new());
        let mut meta = Arc::try_unwrap(pod_meta("u-1", "job-once", &[])).unwrap();
        meta.containers_pending = true;
        let pending = Arc::new(meta);
        name_series(
            &mut state,
            |_| Some(Arc::clone(&pending)),
            |uid, id| asked.borrow_mut().push(format!("{uid}/{id}")),
        );
        asked.borrow_mut().sort();
        assert_eq!(*asked.borrow(), ["u-1/c0ffee", "u-1/pause1"]);
        assert!(!names(&state, "pause1").sandbox);
        // Complete: c0ffee is `main`; the id no status names is the sandbox.
        let complete = pod_meta("u-1", "job-once", &[("c0ffee", "main")]);
        name_series(
            &mut state,
            |_| Some(Arc::clone(&complete)),
            |_, id| panic!("{id} asked although the pod is complete"),
        );
        assert_eq!(names(&state, "c0ffee").container, "main");
        assert!(!names(&state, "c0ffee").sandbox);
        assert!(names(&state, "pause1").sandbox);
        assert!(is_sandbox(&Some(names(&state, "pause1"))));
    }
}
