//! CPU per interval of the attribution step at 500 cgroups (and 5,000 tasks
//! with `--per-process`), and CPU per `/metrics` render for 500 pods.
//!
//! The interval is the measurement loop's work after the probe and meters
//! have been read: cgroup usage deltas grouped by workload (500 containers,
//! one per pod, plus a few system buckets, all of them busy: the worst
//! case), five RAPL domains of a two-socket node (package, core, uncore,
//! dram, psys) each split by the interval's `ergon::attribute::Shares`, the
//! splits and usage added to the per-workload and per-pod `Ledger`s,
//! liveness marked, and expired workloads pruned. With `--per-process`, the
//! same energy split again over 5,000 processes (`SharedSplit`, booked in
//! one pass), as `interval::book` does.
//!
//! The render is what the first scrape after an interval does (later scrapes
//! of the interval reuse its bytes): `ergon::export::render_report` formats
//! a report of 500 pods' series (labels as a Kubernetes API would fill them)
//! in the text format.
//!
//! CPU time of this thread (getrusage RUSAGE_THREAD), averaged over many
//! iterations. Prints `result attribution.{cpu_us_per_interval,
//! per_process_cpu_us_per_interval}` and `result render.{cpu_us,bytes,series,
//! gzip_bytes,openmetrics_bytes,openmetrics_gzip_bytes,gzip_cpu_us}`.
//!
//! `--part cgroups|per-process|render --repeat N` runs that step alone, N
//! times after the same set-up, and prints nothing: for counting
//! instructions, which a shared machine does not disturb. Under
//! `valgrind --tool=callgrind`, the total of `--repeat 2N` minus that of
//! `--repeat N` is N steps with the set-up cancelled (BENCHMARKS.md).

mod common;

use std::collections::HashMap;

use ergon::attribute::{self, DomainEnergy, Ledger, Usage};
use ergon::export::{self, Encoding, Family, Format, Report};
use ergon::interval::catalogue;
use ergon::units::{Domain, Joules, Nanos};
use ergon::workload::{Workload, classify};

const PODS: usize = 500;
const PROCESSES_PER_POD: usize = 10;
const SYSTEM_BUCKETS: &[&str] = &[
    "system.slice/containerd.service",
    "system.slice/kubelet.service",
    "system.slice/systemd-journald.service",
    "user.slice",
    "",
];
const DOMAINS: [Domain; 5] = [
    Domain::Package,
    Domain::Core,
    Domain::Uncore,
    Domain::Dram,
    Domain::Psys,
];
const WARMUP_INTERVALS: u32 = 50;
const MEASURED_INTERVALS: u32 = 1_000;
const MEASURED_RENDERS: u32 = 200;
const INTERVAL_NS: u64 = 5_000_000_000;

/// A small deterministic generator: usage that differs per interval
/// without pulling in a random-number crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// One cgroup as the probe reports it: its id and what it belongs to (the
/// resolver's cache).
struct Cgroup {
    id: u64,
    workload: Workload,
}

struct Node {
    cgroups: Vec<Cgroup>,
    workload_of: HashMap<u64, Workload>,
    /// Processes: pid → cgroup id.
    processes: Vec<(u32, u64)>,
    workloads: Ledger<Workload>,
    pods: Ledger<String>,
    process_ledger: Ledger<u32>,
    random: Lcg,
    now: Nanos,
}

fn pod_uid(index: usize) -> String {
    format!("{index:08x}-0000-4000-8000-{index:012x}")
}

impl Node {
    fn new() -> Node {
        let mut cgroups = Vec::new();
        for index in 0..PODS {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{index:064x}.scope",
                pod_uid(index).replace('-', "_")
            );
            let workload = classify(&path);
            assert!(
                matches!(workload, Workload::Container { .. }),
                "{path} should classify as a container, got {workload:?}"
            );
            cgroups.push(Cgroup {
                id: 10_000 + index as u64,
                workload,
            });
        }
        for (index, path) in SYSTEM_BUCKETS.iter().enumerate() {
            cgroups.push(Cgroup {
                id: 1 + index as u64,
                workload: classify(path),
            });
        }
        let workload_of = cgroups.iter().map(|c| (c.id, c.workload.clone())).collect();
        let processes = (0..PODS * PROCESSES_PER_POD)
            .map(|i| (100_000 + i as u32, 10_000 + (i / PROCESSES_PER_POD) as u64))
            .collect();
        Node {
            cgroups,
            workload_of,
            processes,
            workloads: Ledger::default(),
            pods: Ledger::default(),
            process_ledger: Ledger::default(),
            random: Lcg(42),
            now: Nanos(1),
        }
    }

    /// One interval; `per_process` adds the process split.
    fn interval(&mut self, per_process: bool) {
        self.now = Nanos(self.now.0 + INTERVAL_NS);
        let now = self.now;
        // Deltas as the probe's sample gives them (cgroup id → usage).
        let deltas: Vec<(u64, Usage)> = self
            .cgroups
            .iter()
            .map(|c| {
                (
                    c.id,
                    Usage {
                        cpu_ns: 1 + self.random.next(20_000_000),
                        cycles: 0,
                    },
                )
            })
            .collect();
        let mut usage: HashMap<Workload, Usage> = HashMap::new();
        for (id, used) in &deltas {
            let entry = usage.entry(self.workload_of[id].clone()).or_default();
            entry.cpu_ns += used.cpu_ns;
        }
        // Sized for every process the probe reports, as `interval::group` does.
        let mut process_usage: HashMap<u32, Usage> = HashMap::new();
        if per_process {
            process_usage.reserve(self.processes.len());
            process_usage.extend(
                self.processes
                    .iter()
                    .map(|(pid, _)| {
                        (
                            *pid,
                            Usage {
                                cpu_ns: self.random.next(2_000_000),
                                cycles: 0,
                            },
                        )
                    })
                    .filter(|(_, u)| u.cpu_ns > 0),
            );
        }
        // As `interval::book` does: shares once per interval, multiplied
        // out per domain; the processes' domains booked in one pass.
        let no_idle_weights = HashMap::new();
        let by_usage = attribute::Shares::of_usage(&usage);
        let idle = attribute::Shares::of_weights(&no_idle_weights);
        let energies: Vec<DomainEnergy> = DOMAINS
            .iter()
            .map(|&domain| {
                let measured = 20.0 + self.random.next(1_000) as f64 / 10.0;
                DomainEnergy {
                    domain,
                    source: "rapl".into(),
                    energy: Joules(measured),
                    idle: Joules(measured / 3.0),
                }
            })
            .collect();
        for energy in &energies {
            let split = by_usage.split(energy, &idle);
            self.workloads.apply(&split, now);
            self.pods.apply(&ergon::interval::by_pod(&split), now);
        }
        if per_process {
            let by_process = attribute::SharedSplit::new(
                attribute::Shares::of_usage(&process_usage),
                energies.iter(),
            );
            self.process_ledger.apply_shared(&by_process, now);
        }
        self.workloads.add_usage(&usage, now);
        let mut pod_usage: HashMap<String, Usage> = HashMap::new();
        for (workload, used) in &usage {
            if let Some(uid) = workload.pod_uid() {
                pod_usage.entry(uid.to_owned()).or_default().cpu_ns += used.cpu_ns;
            }
        }
        self.pods.add_usage(&pod_usage, now);
        self.process_ledger.add_usage(&process_usage, now);
        for cgroup in &self.cgroups {
            self.workloads.mark_seen(&cgroup.workload, now);
            if let Some(uid) = cgroup.workload.pod_uid() {
                self.pods.mark_seen(&uid.to_owned(), now);
            }
        }
        self.workloads.prune(now);
        self.pods.prune(now);
        self.process_ledger.prune(now);
    }

    /// The published report of these ledgers: the families `/metrics` shows
    /// for 500 pods, labelled as with a Kubernetes API.
    fn report(&self) -> Report {
        let mut families = catalogue();
        let mut push = |name: &str, labels: Vec<String>, value: f64| {
            families
                .iter_mut()
                .find(|f: &&mut Family| f.name == name)
                .unwrap_or_else(|| panic!("{name} is not in the catalogue"))
                .push(labels, value);
        };
        let pod_name = |uid: &str| format!("vehicle-api-7d9f8b6c5-{}", &uid[..5]);
        for (uid, counters) in self.pods.workloads() {
            for (domain, joules) in &counters.energy {
                push(
                    "ergon_pod_energy_joules_total",
                    vec![
                        "pipeline".into(),
                        pod_name(uid),
                        uid.clone(),
                        domain.as_str().into(),
                    ],
                    joules.total().0,
                );
            }
        }
        for (workload, counters) in self.workloads.workloads() {
            match workload {
                Workload::Container {
                    pod_uid,
                    container_id,
                    ..
                } => {
                    let labels = vec![
                        "pipeline".to_owned(),
                        pod_name(pod_uid),
                        "vehicle-api".to_owned(),
                        container_id.clone(),
                    ];
                    push(
                        "ergon_container_cpu_seconds_total",
                        labels.clone(),
                        counters.cpu_ns as f64 / 1e9,
                    );
                    for (domain, joules) in &counters.energy {
                        let mut with_domain = labels.clone();
                        with_domain.push(domain.as_str().into());
                        push(
                            "ergon_container_energy_joules_total",
                            with_domain,
                            joules.total().0,
                        );
                    }
                }
                Workload::System { bucket } => {
                    push(
                        "ergon_system_cpu_seconds_total",
                        vec![bucket.clone()],
                        counters.cpu_ns as f64 / 1e9,
                    );
                    for (domain, joules) in &counters.energy {
                        push(
                            "ergon_system_energy_joules_total",
                            vec![bucket.clone(), domain.as_str().into()],
                            joules.total().0,
                        );
                    }
                }
                Workload::Pod { .. } => {}
            }
        }
        for (domain, source, counters) in self.workloads.node() {
            for (mode, joules) in [("active", counters.active), ("idle", counters.idle)] {
                push(
                    "ergon_node_energy_joules_total",
                    vec![domain.as_str().into(), mode.into(), source.into()],
                    joules.0,
                );
            }
            push(
                "ergon_node_power_watts",
                vec![domain.as_str().into(), source.into()],
                counters.active.0 / 60.0,
            );
        }
        Report { families }
    }
}

/// `--part`: one step alone, `repeat` times, after the usual set-up.
fn run_part(part: &str, repeat: u32) {
    let per_process = part != "cgroups";
    let mut node = Node::new();
    for _ in 0..WARMUP_INTERVALS {
        node.interval(per_process);
    }
    match part {
        "cgroups" | "per-process" => {
            for _ in 0..repeat {
                node.interval(per_process);
            }
        }
        "render" => {
            let report = node.report();
            for _ in 0..repeat {
                std::hint::black_box(export::render_report(&report));
            }
        }
        other => panic!("--part takes cgroups, per-process or render, got {other:?}"),
    }
}

fn main() {
    if let Some(part) = common::flag("--part") {
        let repeat = common::numeric_flag("--repeat", 100);
        return run_part(&part, u32::try_from(repeat).expect("--repeat fits in u32"));
    }
    if !common::benchmarking() {
        return;
    }
    let mut last = None;
    for (per_process, key) in [
        (false, "attribution.cpu_us_per_interval"),
        (true, "attribution.per_process_cpu_us_per_interval"),
    ] {
        let mut node = Node::new();
        for _ in 0..WARMUP_INTERVALS {
            node.interval(per_process);
        }
        let per_interval =
            common::cpu_us_per_call(MEASURED_INTERVALS, || node.interval(per_process));
        common::result(key, per_interval);
        last = Some(node);
    }
    // The render below shows the ledgers of the last (per-process) run.
    let node = last.expect("the loop ran");
    common::result("attribution.cgroups", node.cgroups.len() as f64);
    common::result("attribution.processes", node.processes.len() as f64);

    // The formatting a scrape does once per interval (later scrapes of the
    // same interval reuse its bytes).
    let report = node.report();
    let text = export::render_report(&report);
    let series = text
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
        .count();
    let pods = String::from_utf8_lossy(&text)
        .lines()
        .filter(|line| {
            line.starts_with("ergon_pod_energy_joules_total{")
                && line.contains("domain=\"package\"")
        })
        .count();
    assert_eq!(pods, PODS, "the report should hold every pod");
    for _ in 0..10 {
        std::hint::black_box(export::render_report(&report));
    }
    let render_us = common::cpu_us_per_call(MEASURED_RENDERS, || {
        std::hint::black_box(export::render_report(&report));
    });
    common::result("render.cpu_us", render_us);
    common::result("render.bytes", text.len() as f64);
    common::result("render.series", series as f64);
    common::result("render.pods", pods as f64);

    // The other bodies of the same report (made once per interval, by the
    // first scrape that negotiates each): gzip (`Accept-Encoding: gzip`,
    // what Prometheus sends) and OpenMetrics, through the server's own
    // `export::render` (the process metrics' tail included).
    let process = export::process_registry();
    let published = export::Published::default();
    published.publish(report.clone());
    for (format, encoding, key) in [
        (Format::Text, Encoding::Gzip, "render.gzip_bytes"),
        (
            Format::OpenMetrics,
            Encoding::Identity,
            "render.openmetrics_bytes",
        ),
        (
            Format::OpenMetrics,
            Encoding::Gzip,
            "render.openmetrics_gzip_bytes",
        ),
    ] {
        let body = export::render(&published, &process, format, encoding);
        common::result(key, (body.first_ref().len() + body.last_ref().len()) as f64);
    }
    // Compressing: one interval's text and gzip bodies, less the text's own
    // render and the report's clone (measured apart).
    let clone_us = common::cpu_us_per_call(MEASURED_RENDERS, || {
        std::hint::black_box(report.clone());
    });
    let gzip_us = common::cpu_us_per_call(MEASURED_RENDERS / 10, || {
        let published = export::Published::default();
        published.publish(report.clone());
        std::hint::black_box(export::render(
            &published,
            &process,
            Format::Text,
            Encoding::Gzip,
        ));
    });
    common::result("render.gzip_cpu_us", gzip_us - clone_us - render_us);
}
