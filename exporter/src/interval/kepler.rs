//! `--compat kepler`: Kepler 0.11's metric names, labels and semantics,
//! computed from Ergon's own accounting, so Kepler dashboards and alerts
//! keep working after a switch.
//!
//! The mapping (README "Kepler compatibility" has the table):
//!
//! - `zone` is Ergon's `domain` (`package`, `core`, `uncore`, `dram`,
//!   `psys`; also `platform` where a meter measures the whole machine);
//!   `path` is the meter source (`rapl`, `rapl-perf`, `hwmon`, `model`),
//!   since Ergon reads a zone through one of several interfaces.
//! - Node `*_joules_total` = active + idle; `active`/`idle` are Ergon's
//!   split of the same meter reading (`ergon_node_energy_joules_total`).
//! - Workload `*_joules_total` are Ergon's attributed joules (active share,
//!   plus the idle share under `--idle-policy`), per zone.
//! - `*_watts` gauges are the last interval's power: its joules divided by
//!   its length.
//! - `state` is `running` while the cgroup (or process) exists and
//!   `terminated` while its retained counter outlives it.
//! - `runtime` comes from the cgroup path (`unknown` where the path names
//!   none); process `type` is `container` when the process is in a
//!   container, else `regular` (Ergon does not identify VMs: `vm_id` is
//!   empty); process `exe` is its `comm` (the executable's path is not read,
//!   to keep labels bounded and the probe cheap).
//! - GPUs: Ergon attributes all GPUs of a meter together, so
//!   `kepler_node_gpu_*` carry `gpu="all"` and the meter as `vendor`.
//! - `kepler_build_info`'s `goversion` is empty: there is no Go here.
//!
//! Every family but `kepler_node_cpu_info` and `kepler_build_info` carries
//! `node_name`, as Kepler's do.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use crate::export::{Family, Kind, bounded_label};
use crate::units::{Domain, Joules};
use crate::workload::{Runtime, Workload};

use super::Loop;
use super::book::Split;
use super::group::IntervalUsage;

pub const NODE_CPU_JOULES: &str = "kepler_node_cpu_joules_total";
pub const NODE_CPU_WATTS: &str = "kepler_node_cpu_watts";
pub const NODE_CPU_ACTIVE_JOULES: &str = "kepler_node_cpu_active_joules_total";
pub const NODE_CPU_ACTIVE_WATTS: &str = "kepler_node_cpu_active_watts";
pub const NODE_CPU_IDLE_JOULES: &str = "kepler_node_cpu_idle_joules_total";
pub const NODE_CPU_IDLE_WATTS: &str = "kepler_node_cpu_idle_watts";
pub const NODE_CPU_USAGE_RATIO: &str = "kepler_node_cpu_usage_ratio";
pub const NODE_CPU_INFO: &str = "kepler_node_cpu_info";
pub const NODE_GPU_JOULES: &str = "kepler_node_gpu_joules_total";
pub const NODE_GPU_WATTS: &str = "kepler_node_gpu_watts";
pub const NODE_GPU_ACTIVE_JOULES: &str = "kepler_node_gpu_active_joules_total";
pub const NODE_GPU_ACTIVE_WATTS: &str = "kepler_node_gpu_active_watts";
pub const NODE_GPU_IDLE_JOULES: &str = "kepler_node_gpu_idle_joules_total";
pub const NODE_GPU_IDLE_WATTS: &str = "kepler_node_gpu_idle_watts";
pub const CONTAINER_CPU_JOULES: &str = "kepler_container_cpu_joules_total";
pub const CONTAINER_CPU_WATTS: &str = "kepler_container_cpu_watts";
pub const CONTAINER_GPU_JOULES: &str = "kepler_container_gpu_joules_total";
pub const CONTAINER_GPU_WATTS: &str = "kepler_container_gpu_watts";
pub const CONTAINER_CPU_SECONDS: &str = "kepler_container_cpu_seconds_total";
pub const PROCESS_CPU_JOULES: &str = "kepler_process_cpu_joules_total";
pub const PROCESS_CPU_WATTS: &str = "kepler_process_cpu_watts";
pub const PROCESS_CPU_SECONDS: &str = "kepler_process_cpu_seconds_total";
pub const POD_CPU_JOULES: &str = "kepler_pod_cpu_joules_total";
pub const POD_CPU_WATTS: &str = "kepler_pod_cpu_watts";
pub const POD_GPU_JOULES: &str = "kepler_pod_gpu_joules_total";
pub const POD_GPU_WATTS: &str = "kepler_pod_gpu_watts";
pub const BUILD_INFO: &str = "kepler_build_info";

const NODE_CPU: &[&str] = &["zone", "path", "node_name"];
const NODE_GPU: &[&str] = &["gpu", "gpu_uuid", "gpu_name", "vendor", "node_name"];
const CONTAINER_CPU: &[&str] = &[
    "container_id",
    "container_name",
    "runtime",
    "state",
    "zone",
    "pod_id",
    "node_name",
];
const CONTAINER_GPU: &[&str] = &[
    "container_id",
    "container_name",
    "runtime",
    "state",
    "pod_id",
    "node_name",
];
const PROCESS_CPU: &[&str] = &[
    "pid",
    "comm",
    "exe",
    "type",
    "state",
    "container_id",
    "vm_id",
    "zone",
    "node_name",
];
const PROCESS_SECONDS: &[&str] = &[
    "pid",
    "comm",
    "exe",
    "type",
    "container_id",
    "vm_id",
    "node_name",
];
const POD_CPU: &[&str] = &[
    "pod_id",
    "pod_name",
    "pod_namespace",
    "state",
    "zone",
    "node_name",
];
const POD_GPU: &[&str] = &["pod_id", "pod_name", "pod_namespace", "state", "node_name"];

/// The Kepler 0.11 families, for the catalogue.
pub fn catalogue() -> Vec<Family> {
    use Kind::{Counter, Gauge};
    let counter = |name, help, labels| Family::new(name, help, Counter, labels);
    let gauge = |name, help, labels| Family::new(name, help, Gauge, labels);
    vec![
        counter(
            NODE_CPU_JOULES,
            "Kepler-compatible: the node's energy per RAPL zone (active + idle).",
            NODE_CPU,
        ),
        gauge(
            NODE_CPU_WATTS,
            "Kepler-compatible: the node's power per RAPL zone over the last interval.",
            NODE_CPU,
        ),
        counter(
            NODE_CPU_ACTIVE_JOULES,
            "Kepler-compatible: the active part of the node's energy per zone.",
            NODE_CPU,
        ),
        gauge(
            NODE_CPU_ACTIVE_WATTS,
            "Kepler-compatible: the active part of the node's power per zone.",
            NODE_CPU,
        ),
        counter(
            NODE_CPU_IDLE_JOULES,
            "Kepler-compatible: the idle part of the node's energy per zone.",
            NODE_CPU,
        ),
        gauge(
            NODE_CPU_IDLE_WATTS,
            "Kepler-compatible: the idle part of the node's power per zone.",
            NODE_CPU,
        ),
        gauge(
            NODE_CPU_USAGE_RATIO,
            "Kepler-compatible: busy share of all CPUs over the last interval.",
            &["node_name"],
        ),
        gauge(
            NODE_CPU_INFO,
            "Kepler-compatible: one series per logical CPU of /proc/cpuinfo; always 1.",
            &[
                "processor",
                "vendor_id",
                "model_name",
                "physical_id",
                "core_id",
            ],
        ),
        counter(
            NODE_GPU_JOULES,
            "Kepler-compatible: GPU energy (all GPUs of the meter).",
            NODE_GPU,
        ),
        gauge(
            NODE_GPU_WATTS,
            "Kepler-compatible: GPU power over the last interval.",
            NODE_GPU,
        ),
        counter(
            NODE_GPU_ACTIVE_JOULES,
            "Kepler-compatible: the active part of GPU energy.",
            NODE_GPU,
        ),
        gauge(
            NODE_GPU_ACTIVE_WATTS,
            "Kepler-compatible: the active part of GPU power.",
            NODE_GPU,
        ),
        counter(
            NODE_GPU_IDLE_JOULES,
            "Kepler-compatible: the idle part of GPU energy.",
            NODE_GPU,
        ),
        gauge(
            NODE_GPU_IDLE_WATTS,
            "Kepler-compatible: the idle part of GPU power.",
            NODE_GPU,
        ),
        counter(
            CONTAINER_CPU_JOULES,
            "Kepler-compatible: energy attributed to a container per zone.",
            CONTAINER_CPU,
        ),
        gauge(
            CONTAINER_CPU_WATTS,
            "Kepler-compatible: a container's power per zone over the last interval.",
            CONTAINER_CPU,
        ),
        counter(
            CONTAINER_GPU_JOULES,
            "Kepler-compatible: GPU energy attributed to a container.",
            CONTAINER_GPU,
        ),
        gauge(
            CONTAINER_GPU_WATTS,
            "Kepler-compatible: a container's GPU power over the last interval.",
            CONTAINER_GPU,
        ),
        counter(
            CONTAINER_CPU_SECONDS,
            "Kepler-compatible: CPU time of a container.",
            CONTAINER_GPU,
        ),
        counter(
            PROCESS_CPU_JOULES,
            "Kepler-compatible: energy attributed to a process per zone (--per-process).",
            PROCESS_CPU,
        ),
        gauge(
            PROCESS_CPU_WATTS,
            "Kepler-compatible: a process's power per zone over the last interval (--per-process).",
            PROCESS_CPU,
        ),
        counter(
            PROCESS_CPU_SECONDS,
            "Kepler-compatible: CPU time of a process (--per-process).",
            PROCESS_SECONDS,
        ),
        counter(
            POD_CPU_JOULES,
            "Kepler-compatible: energy attributed to a pod per zone.",
            POD_CPU,
        ),
        gauge(
            POD_CPU_WATTS,
            "Kepler-compatible: a pod's power per zone over the last interval.",
            POD_CPU,
        ),
        counter(
            POD_GPU_JOULES,
            "Kepler-compatible: GPU energy attributed to a pod.",
            POD_GPU,
        ),
        gauge(
            POD_GPU_WATTS,
            "Kepler-compatible: a pod's GPU power over the last interval.",
            POD_GPU,
        ),
        gauge(
            BUILD_INFO,
            "Kepler-compatible: the exporter's build; always 1.",
            &["arch", "branch", "revision", "version", "goversion"],
        ),
    ]
}

/// What Kepler's `_watts` gauges and `state` labels need from the last
/// interval; kept only under `--compat kepler`.
#[derive(Default)]
pub struct KeplerInterval {
    seconds: f64,
    utilisation: Option<f64>,
    /// Per (zone, meter source): (active, idle) joules.
    node: BTreeMap<(Domain, String), (Joules, Joules)>,
    workloads: HashMap<Workload, BTreeMap<Domain, Joules>>,
    pods: HashMap<String, BTreeMap<Domain, Joules>>,
    processes: HashMap<u32, BTreeMap<Domain, Joules>>,
    alive: HashSet<Workload>,
    live_pids: HashSet<u32>,
}

impl KeplerInterval {
    pub(super) fn new(split: &Split, usage: &IntervalUsage, seconds: f64) -> KeplerInterval {
        let mut last = KeplerInterval {
            seconds,
            utilisation: usage.cpu.utilisation(),
            alive: usage.alive.iter().cloned().collect(),
            live_pids: usage.process_labels.iter().map(|(pid, _)| *pid).collect(),
            ..Default::default()
        };
        for attribution in &split.workloads {
            let domain = attribution.domain;
            let node = last
                .node
                .entry((domain, attribution.source.clone()))
                .or_default();
            node.0 += Joules(attribution.measured.0 - attribution.idle.0);
            node.1 += attribution.idle;
            for (workload, joules) in &attribution.per_workload {
                *last
                    .workloads
                    .entry(workload.clone())
                    .or_default()
                    .entry(domain)
                    .or_default() += joules.total();
                if let Some(uid) = workload.pod_uid() {
                    *last
                        .pods
                        .entry(uid.to_owned())
                        .or_default()
                        .entry(domain)
                        .or_default() += joules.total();
                }
            }
        }
        if let Some(processes) = &split.processes {
            for (pid, domains) in processes.per_key() {
                let of_pid = last.processes.entry(*pid).or_default();
                for (domain, joules) in domains {
                    *of_pid.entry(domain).or_default() += joules;
                }
            }
        }
        last
    }

    fn watts(&self, joules: Joules) -> f64 {
        if self.seconds > 0.0 {
            joules.0 / self.seconds
        } else {
            0.0
        }
    }

    fn watts_of<K: Eq + std::hash::Hash>(
        &self,
        map: &HashMap<K, BTreeMap<Domain, Joules>>,
        key: &K,
        domain: Domain,
    ) -> f64 {
        self.watts(
            map.get(key)
                .and_then(|d| d.get(&domain))
                .copied()
                .unwrap_or_default(),
        )
    }
}

/// Read once at start: the node's name and its CPUs for `kepler_node_cpu_info`.
pub struct KeplerNode {
    node_name: String,
    /// `[processor, vendor_id, model_name, physical_id, core_id]` per CPU.
    cpus: Vec<[String; 5]>,
}

impl KeplerNode {
    pub fn new(node_name: String, host_proc: &Path) -> KeplerNode {
        let cpuinfo = std::fs::read_to_string(host_proc.join("cpuinfo")).unwrap_or_default();
        KeplerNode {
            node_name: bounded_label(&node_name),
            cpus: parse_cpus(&cpuinfo),
        }
    }
}

/// One row per `processor` block of `/proc/cpuinfo`; missing fields empty.
fn parse_cpus(cpuinfo: &str) -> Vec<[String; 5]> {
    const FIELDS: [&str; 5] = [
        "processor",
        "vendor_id",
        "model name",
        "physical id",
        "core id",
    ];
    cpuinfo
        .split("\n\n")
        .filter_map(|block| {
            let mut row: [String; 5] = Default::default();
            for line in block.lines() {
                let Some((key, value)) = line.split_once(':') else {
                    continue;
                };
                if let Some(i) = FIELDS.iter().position(|f| *f == key.trim()) {
                    row[i] = bounded_label(value.trim());
                }
            }
            (!row[0].is_empty()).then_some(row)
        })
        .collect()
}

fn runtime(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Containerd => "containerd",
        Runtime::CriO => "crio",
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
        Runtime::Unidentified => "unknown",
    }
}

fn state(running: bool) -> String {
    if running { "running" } else { "terminated" }.into()
}

fn family<'a>(families: &'a mut [Family], name: &str) -> &'a mut Family {
    families
        .iter_mut()
        .find(|f| f.name == name)
        .expect("every Kepler name is in the catalogue")
}

/// Adds the Kepler 0.11 series to a report's families.
pub(super) fn push(families: &mut [Family], measure: &Loop, node: &KeplerNode) {
    let state_of = &measure.state;
    let last = measure.last.kepler.as_ref();
    let empty = KeplerInterval::default();
    let last = last.unwrap_or(&empty);
    let node_name = &node.node_name;
    // `--metrics`: a level switched off is skipped, not built and dropped.
    let levels = measure.settings.metrics;

    family(families, BUILD_INFO).push(
        vec![
            std::env::consts::ARCH.into(),
            option_env!("ERGON_GIT_BRANCH").unwrap_or_default().into(),
            option_env!("ERGON_GIT_REVISION").unwrap_or_default().into(),
            env!("CARGO_PKG_VERSION").into(),
            String::new(),
        ],
        1.0,
    );
    for cpu in node.cpus.iter().filter(|_| levels.node) {
        family(families, NODE_CPU_INFO).push(cpu.to_vec(), 1.0);
    }
    if let Some(ratio) = last.utilisation.filter(|_| levels.node) {
        family(families, NODE_CPU_USAGE_RATIO).push(vec![node_name.clone()], ratio);
    }

    for (domain, source, counters) in state_of.workloads.node().filter(|_| levels.node) {
        let (active, idle) = last
            .node
            .get(&(domain, source.to_owned()))
            .copied()
            .unwrap_or_default();
        let (joules, active_joules, idle_joules, watts, active_watts, idle_watts) =
            if domain == Domain::Gpu {
                (
                    NODE_GPU_JOULES,
                    NODE_GPU_ACTIVE_JOULES,
                    NODE_GPU_IDLE_JOULES,
                    NODE_GPU_WATTS,
                    NODE_GPU_ACTIVE_WATTS,
                    NODE_GPU_IDLE_WATTS,
                )
            } else {
                (
                    NODE_CPU_JOULES,
                    NODE_CPU_ACTIVE_JOULES,
                    NODE_CPU_IDLE_JOULES,
                    NODE_CPU_WATTS,
                    NODE_CPU_ACTIVE_WATTS,
                    NODE_CPU_IDLE_WATTS,
                )
            };
        let labels = if domain == Domain::Gpu {
            vec![
                "all".into(),
                String::new(),
                String::new(),
                source.to_owned(),
                node_name.clone(),
            ]
        } else {
            vec![domain.as_str().into(), source.to_owned(), node_name.clone()]
        };
        let total = counters.active.0 + counters.idle.0;
        family(families, joules).push(labels.clone(), total);
        family(families, active_joules).push(labels.clone(), counters.active.0);
        family(families, idle_joules).push(labels.clone(), counters.idle.0);
        family(families, watts).push(labels.clone(), last.watts(active + idle));
        family(families, active_watts).push(labels.clone(), last.watts(active));
        family(families, idle_watts).push(labels, last.watts(idle));
    }

    for (uid, counters) in state_of.pods.workloads().filter(|_| levels.pod) {
        let (namespace, pod, _) = super::report::names_of(&counters.names);
        let running = last.alive.iter().any(|w| w.pod_uid() == Some(uid.as_str()));
        for (domain, joules) in &counters.energy {
            let watts = last.watts_of(&last.pods, uid, *domain);
            let mut labels = vec![uid.clone(), pod.clone(), namespace.clone(), state(running)];
            let (joules_name, watts_name) = if *domain == Domain::Gpu {
                (POD_GPU_JOULES, POD_GPU_WATTS)
            } else {
                labels.push(domain.as_str().into());
                (POD_CPU_JOULES, POD_CPU_WATTS)
            };
            labels.push(node_name.clone());
            family(families, joules_name).push(labels.clone(), joules.total().0);
            family(families, watts_name).push(labels, watts);
        }
    }

    for (workload, counters) in state_of.workloads.workloads().filter(|_| levels.container) {
        let Workload::Container {
            pod_uid,
            container_id,
            runtime: container_runtime,
            ..
        } = workload
        else {
            continue;
        };
        if super::report::is_sandbox(&counters.names) {
            continue;
        }
        let (_, _, container) = super::report::names_of(&counters.names);
        let running = last.alive.contains(workload);
        let base = vec![
            container_id.clone(),
            container,
            runtime(*container_runtime).into(),
            state(running),
        ];
        let mut seconds = base.clone();
        seconds.extend([pod_uid.clone(), node_name.clone()]);
        family(families, CONTAINER_CPU_SECONDS).push(seconds, counters.cpu_ns as f64 / 1e9);
        for (domain, joules) in &counters.energy {
            let watts = last.watts_of(&last.workloads, workload, *domain);
            let mut labels = base.clone();
            let (joules_name, watts_name) = if *domain == Domain::Gpu {
                (CONTAINER_GPU_JOULES, CONTAINER_GPU_WATTS)
            } else {
                labels.push(domain.as_str().into());
                (CONTAINER_CPU_JOULES, CONTAINER_CPU_WATTS)
            };
            labels.extend([pod_uid.clone(), node_name.clone()]);
            family(families, joules_name).push(labels.clone(), joules.total().0);
            family(families, watts_name).push(labels, watts);
        }
    }

    if !measure.settings.per_process || !levels.process {
        return;
    }
    for (pid, counters) in state_of.processes.workloads() {
        let (comm, container_id) = state_of
            .process_labels
            .get(pid)
            .cloned()
            .unwrap_or_default();
        let kind = if container_id.is_empty() {
            "regular"
        } else {
            "container"
        };
        let identity = [pid.to_string(), comm.clone(), comm, kind.into()];
        let mut seconds = identity.to_vec();
        seconds.extend([container_id.clone(), String::new(), node_name.clone()]);
        family(families, PROCESS_CPU_SECONDS).push(seconds, counters.cpu_ns as f64 / 1e9);
        let running = last.live_pids.contains(pid);
        for (domain, joules) in &counters.energy {
            if *domain == Domain::Gpu {
                continue;
            }
            let mut labels = identity.to_vec();
            labels.extend([
                state(running),
                container_id.clone(),
                String::new(),
                domain.as_str().into(),
                node_name.clone(),
            ]);
            let watts = last.watts_of(&last.processes, pid, *domain);
            family(families, PROCESS_CPU_JOULES).push(labels.clone(), joules.total().0);
            family(families, PROCESS_CPU_WATTS).push(labels, watts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_rows_per_processor() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nphysical id\t: 0\ncore id\t\t: 0\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nphysical id\t: 0\ncore id\t\t: 1\n\n";
        let rows = parse_cpus(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1],
            ["1", "GenuineIntel", "Intel(R) Xeon(R)", "0", "1"].map(String::from)
        );
        // Garbage and blocks without a processor line are skipped.
        assert!(parse_cpus("no colon here\n\nmodel name: x\n").is_empty());
    }

    #[test]
    fn every_family_carries_node_name_but_the_two_info_series() {
        for family in catalogue() {
            let has = family.label_names.contains(&"node_name");
            let info = family.name == NODE_CPU_INFO || family.name == BUILD_INFO;
            assert_eq!(has, !info, "{}", family.name);
            assert_eq!(
                family.kind == Kind::Counter,
                family.name.ends_with("_total"),
                "{}",
                family.name
            );
        }
    }
}
