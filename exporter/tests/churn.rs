//! Churn against the real exporter: short-lived cgroups (each a container
//! whose one task runs ~20 ms and exits, the cgroup then removed) beside
//! steady pod-shaped cgroups, with per-process accounting on, so every
//! short-lived task is a new process too.
//!
//! Checked while it runs, after a warm-up: the series of the churned pods
//! (what it retains of them) stay within 50% of their warm count; its
//! anonymous memory (heap and stacks: where a leak shows) per exported series
//! within 10% of its warm level in the long soak, 35% in the suite's short
//! run (at least 1 MiB); its open fds within 10%; no kernel map fills (an
//! insert the kernel could not allocate for is counted, and only then may
//! the overflow bucket hold anything); every interval conserves energy (node = pods + system buckets + unattributed,
//! compared scrape to scrape); the exited processes leave the kernel's
//! thread map. At the end: the CPU time of every dead cgroup, read from its
//! own `cpu.stat` before removal, is in the exporter's output (its
//! container's series, or the bucket of cgroups that vanished before they
//! could be named).
//!
//! The suite runs a short version (~40 s). `cargo xtask soak --seconds N`
//! runs the long one (10,000 cgroups over two minutes by default) through
//! the same test with `ERGON_SOAK_SECONDS` and `ERGON_SOAK_CGROUPS_PER_SECOND`,
//! and prints the figures BENCHMARKS.md records.

use ergon_testkit as support;

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ergon::probe::map_memory::{Allocated, cgroup_shape, hash_map_bytes, thread_shape};
use support::pods::PodFixture;
use support::{BusyChild, CgroupGuard, ExporterProcess, FakeRapl, Metrics, cpu_lock, unique_uid};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text}: expected a number")),
        Err(_) => default,
    }
}

/// One short-lived cgroup, after its removal.
struct DeadCgroup {
    container_id: String,
    usage_usec: u64,
}

/// Creates short-lived cgroups at `per_second` until `stop`, on `workers`
/// threads, each in one of `pods` pod uids.
fn churn(
    pods: Arc<Vec<String>>,
    per_second: f64,
    workers: usize,
    stop: Arc<AtomicBool>,
    dead: Arc<Mutex<Vec<DeadCgroup>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let per_worker = Duration::from_secs_f64(workers as f64 / per_second);
    (0..workers)
        .map(|worker| {
            let (pods, stop, dead) = (pods.clone(), stop.clone(), dead.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    let uid = &pods[n % pods.len()];
                    n += workers;
                    let container_id = format!("{:0>64}", unique_uid("churn").replace('-', ""));
                    let mut cgroup = CgroupGuard::pod(uid, &container_id);
                    let task = BusyChild::spawn_in(&cgroup.path);
                    std::thread::sleep(Duration::from_millis(20));
                    task.stop();
                    let usage_usec = cgroup.usage_usec();
                    cgroup.remove();
                    dead.lock().unwrap().push(DeadCgroup {
                        container_id,
                        usage_usec,
                    });
                    // A worker that fell behind (a busy machine) does not
                    // catch up in a burst: the exporter retains what exited
                    // in the last retention window, so a burst after the
                    // warm-up would grow the retained series, and the RSS
                    // with them, though nothing leaks. The rate reached is
                    // in the result line.
                    next += per_worker;
                    match next.checked_duration_since(Instant::now()) {
                        Some(wait) => std::thread::sleep(wait),
                        None => next = Instant::now(),
                    }
                }
            })
        })
        .collect()
}

/// Stops the churn threads even when an assertion fails, so every cgroup
/// they created is removed before the test's guards go.
struct ChurnGuard {
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for ChurnGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// RSS (bytes), open fds and CPU time (user + system) of a process. Fds
/// on directories of the cgroup tree are left out of the count and
/// returned apart: the cgroup walk holds one only while it reads that
/// directory (the resolver reads each directory whole and closes it before
/// descending), so a scrape that lands inside a walk sees it and one
/// outside does not.
fn process_figures(pid: u32) -> (u64, usize, Duration, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let root = support::cgroup2_root();
    let (mut fds, mut walk_fds) = (0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        match std::fs::read_link(fd.path()) {
            Ok(target) if target.starts_with(&root) => walk_fds += 1,
            Ok(_) => fds += 1,
            // Closed since the listing (a walk ending): not open.
            Err(_) => {}
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after comm.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (
        rss_kib * 1024,
        fds,
        Duration::from_millis(ticks * 1000 / hz),
        walk_fds,
    )
}

/// Cumulative energy counters of one scrape, per series, for the package
/// domain: (node, pods + system buckets + unattributed).
fn energy_series(metrics: &Metrics) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let key = |name: &str, labels: &BTreeMap<String, String>| format!("{name}{labels:?}");
    let collect = |names: &[&str]| {
        names
            .iter()
            .flat_map(|name| {
                metrics
                    .select(name, &[("domain", "package")])
                    .map(move |(labels, value)| (key(name, labels), value))
            })
            .collect::<BTreeMap<_, _>>()
    };
    (
        collect(&["ergon_node_energy_joules_total"]),
        collect(&[
            "ergon_pod_energy_joules_total",
            "ergon_system_energy_joules_total",
            "ergon_node_unattributed_joules_total",
        ]),
    )
}

/// What the series grew by between two scrapes: a series new in `now`
/// counts from zero, one gone (a workload idle for the retention window,
/// pruned) grew by nothing. Every pod of the soak lives throughout, so a
/// pod's series is never pruned and back from zero; a counter that went
/// down fails the test.
fn growth(before: &BTreeMap<String, f64>, now: &BTreeMap<String, f64>) -> f64 {
    now.iter()
        .map(|(series, &value)| {
            let last = before.get(series).copied().unwrap_or(0.0);
            assert!(value >= last, "{series} went down from {last} to {value}");
            value - last
        })
        .sum()
}

fn map_bytes(metrics: &Metrics, map: &str) -> f64 {
    metrics.sum("ergon_probe_map_memory_bytes", &[("map", map)])
}

/// The anonymous part of RSS (heap, stacks): what a leak grows. The rest
/// is the binary's pages and shared libraries, faulted in as code paths
/// first run.
fn anon_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The real exporter with per-process accounting on this machine's cgroups
/// and the fake RAPL counter, and `extra` flags.
fn per_process_exporter(
    rapl: &FakeRapl,
    interval: Duration,
    retention: Duration,
    extra: &[String],
) -> ExporterProcess {
    let mut args = vec![
        rapl.host_sys_arg(),
        format!("--cgroup-root={}", support::cgroup2_root().display()),
        support::kubelet_cgroup_root_arg(),
        "--meter=rapl".into(),
        format!("--interval={}ms", interval.as_millis()),
        "--per-process".into(),
        format!("--retention={}s", retention.as_secs()),
    ];
    args.extend_from_slice(extra);
    ExporterProcess::start(ERGON.as_ref(), &args)
}

/// Cgroup directories under `root`, itself included.
fn count_cgroups(root: &std::path::Path) -> u32 {
    let mut count = 1;
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                count += count_cgroups(&entry.path());
            }
        }
    }
    count
}

/// Entries in the per-CPU cgroup map, from the kernel's memlock figure of
/// it (on demand, each entry costs the same; the empty map's lock bytes
/// scale with the CPUs).
fn cgroup_map_entries(metrics: &Metrics, bound: u64) -> u64 {
    let bytes = map_bytes(metrics, "CGROUPS") as u64;
    // Per-CPU maps hold a value for each possible CPU, as the probe sizes
    // them.
    let cpus = aya::util::nr_cpus().expect("reading the possible CPUs") as u64;
    let empty = hash_map_bytes(cgroup_shape(), bound, 0, cpus, Allocated::OnDemand);
    let one = hash_map_bytes(cgroup_shape(), bound, 1, cpus, Allocated::OnDemand) - empty;
    bytes.saturating_sub(empty) / one
}

fn live_threads() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_dir(e.path().join("task")).ok())
        .map(|tasks| tasks.count())
        .sum()
}

#[test]
fn churn_of_short_lived_cgroups_and_processes_keeps_memory_flat_and_counts_everything() {
    let _lock = cpu_lock();
    let seconds: u64 = env_or("ERGON_SOAK_SECONDS", 40);
    let per_second: f64 = env_or("ERGON_SOAK_CGROUPS_PER_SECOND", 40.0);
    let steady_pods: usize = env_or("ERGON_SOAK_STEADY_PODS", 200);
    let interval = Duration::from_secs(1);
    // Exited workloads and processes keep their counters for the retention
    // window, so the exporter's memory grows with churn × retention until
    // the first of them expire: the warm-up outlasts one retention window,
    // and what is flat after it is flat for good.
    let retention = Duration::from_secs(15);
    let warm_up = Duration::from_secs((seconds / 4).max(20));

    // The steady pods, and 20 pods in which the short-lived containers come
    // and go (as a pod's containers restart). Their cgroups exist before
    // the exporter starts; the sleeping process in each starts after, so
    // the probe sees it run once and the pod stays alive in the exporter
    // (a pod whose tasks never ran under the probe has no counters to keep).
    let mut steady: Vec<PodFixture> = (0..steady_pods)
        .map(|i| PodFixture::start("steady", &format!("steady-{i}"), 0))
        .collect();
    let mut churn_pod_fixtures: Vec<PodFixture> = (0..20)
        .map(|i| PodFixture::start("churn", &format!("churn-{i}"), 0))
        .collect();
    // The cgroup map is bounded below the number of cgroups the run makes:
    // if the keys of dead cgroups stayed in it, it would fill (and the
    // `full` check below fail). What lives now, the steady and churned pods,
    // and the keys of what died in the last intervals (two intervals pass
    // before a dead cgroup's key goes) must fit.
    let room = 600;
    let max_cgroups = count_cgroups(&support::cgroup2_root()) + room;
    let churned_at_least = per_second * seconds as f64 * 0.5;
    assert!(
        churned_at_least > room as f64,
        "the run makes {churned_at_least} cgroups, fewer than the map's room of {room} beyond \
         what lives: it could not show that dead keys leave the map"
    );
    let rapl = FakeRapl::start(40.0);
    let exporter = per_process_exporter(
        &rapl,
        interval,
        retention,
        &[
            "--idle-watts=package=10".into(),
            format!("--max-cgroups={max_cgroups}"),
        ],
    );
    let pid = exporter.child.id();
    for pod in steady.iter_mut().chain(churn_pod_fixtures.iter_mut()) {
        let sleeper = BusyChild::spawn_script_in(&pod.cgroup.path, "exec sleep 3600");
        pod.children.push(sleeper);
    }
    let threads_bound = 32768u64;

    let churn_pods: Arc<Vec<String>> =
        Arc::new(churn_pod_fixtures.iter().map(|p| p.uid.clone()).collect());
    let churn_uids: std::collections::HashSet<String> = churn_pods.iter().cloned().collect();
    let dead = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let guard = ChurnGuard {
        workers: churn(churn_pods, per_second, 4, stop.clone(), dead.clone()),
        stop,
    };
    let start = Instant::now();
    let first = exporter.metrics();
    let other_before = first.sum("ergon_system_cpu_seconds_total", &[("bucket", "other")]);
    let mut previous = energy_series(&first);
    // (RSS, anonymous RSS, fds, CPU time, when) at the end of the warm-up.
    let mut warm: Option<(u64, u64, usize, Duration, Instant)> = None;
    let mut warm_series = None;
    // Twenty seconds after the warm-up cannot tell a small leak from the
    // allocator's response to a busy machine: in one CI run (a cold
    // Kubernetes build beside it) the anonymous memory rose 22% while the
    // series fell. Other processes on the machine have series too (per
    // process): a build beside the test adds hundreds, and the memory that
    // holds them. So memory is bounded per exported series, and the
    // retained state by the churned pods' own series (20 s more of
    // unexpired churn would about double them). The long soak (`cargo
    // xtask soak`, >= 2 minutes) holds memory to 10%.
    let anon_tolerance = if seconds >= 120 { 0.10 } else { 0.35 };
    let (mut rss_max, mut anon_max, mut fds_max, mut threads_map_max) = (0u64, 0u64, 0usize, 0f64);
    let mut walk_fds_max = 0;
    // RSS every ten intervals, for the record (and for a failure's message).
    let mut rss_curve = Vec::new();
    // The most series any scrape held so far.
    let mut series_peak = 0usize;
    let mut intervals_checked = 0;
    // Inserts the kernel could not allocate for, most in one map.
    let mut allocation_failures = 0f64;
    // Per container id, the largest CPU time a scrape showed: a named dead
    // container's series leaves /metrics after the retention window.
    let mut named_seen: HashMap<String, f64> = HashMap::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(interval);
        let metrics = exporter.metrics();
        let now = energy_series(&metrics);
        let node = growth(&previous.0, &now.0);
        let accounted = growth(&previous.1, &now.1);
        assert!(
            (node - accounted).abs() <= 1e-6 * node.max(1.0),
            "interval at {:?}: meter {node} J, pods + system + node {accounted} J",
            start.elapsed()
        );
        previous = now;
        intervals_checked += 1;
        for (labels, value) in metrics.select("ergon_container_cpu_seconds_total", &[]) {
            let seen = named_seen
                .entry(labels["container_id"].clone())
                .or_default();
            *seen = seen.max(value);
        }
        // The maps never fill (issue 9). An insert the kernel could not
        // allocate for (ENOMEM on a node under memory pressure, seen in
        // CI) is counted by reason and may send its slice to the overflow
        // bucket; without one, nothing is in the bucket.
        for map in ["cgroups", "processes"] {
            let failures = |reason| {
                metrics.sum(
                    "ergon_probe_map_insert_failures_total",
                    &[("map", map), ("reason", reason)],
                )
            };
            assert_eq!(failures("full"), 0.0, "the {map} map filled up");
            let overflow = metrics.sum("ergon_probe_overflow_cpu_seconds_total", &[("map", map)]);
            let other_failures = failures("no_memory") + failures("other");
            assert!(
                overflow == 0.0 || other_failures > 0.0,
                "{overflow} s of CPU in the {map} map's overflow bucket, and no failed insert \
                 counted"
            );
            allocation_failures = allocation_failures.max(other_failures);
        }
        let residual = metrics.sum("ergon_attribution_residual_joules_total", &[]);
        assert!(residual.abs() < 1e-6, "attribution residual {residual} J");
        let (rss, fds, cpu, walk_fds) = process_figures(pid);
        if intervals_checked % 10 == 0 {
            rss_curve.push(format!(
                "{:.0}s {:.1} MiB (anon {:.1}), {} series",
                start.elapsed().as_secs_f64(),
                rss as f64 / 1048576.0,
                anon_rss(pid) as f64 / 1048576.0,
                metrics.samples.len()
            ));
        }
        // One directory at a time (a few where a walk overlaps a GPU or
        // process lookup), never one per sibling.
        walk_fds_max = walk_fds_max.max(walk_fds);
        assert!(
            walk_fds <= 4,
            "{walk_fds} cgroup directories open at {:?}",
            start.elapsed()
        );
        if start.elapsed() >= warm_up {
            // A leak grows the anonymous memory. RSS also counts the pages
            // of the (debug, ~50 MB) binary that are resident: they come and
            // go with the code paths run and the page cache's pressure on a
            // busy machine (+2.5 MiB in 4 s in one CI run, anonymous memory
            // flat), so RSS is recorded, not asserted.
            let anon = anon_rss(pid);
            let series = metrics.samples.len();
            series_peak = series_peak.max(series);
            let churned_series = metrics
                .samples
                .iter()
                .filter(|(_, labels, _)| labels.values().any(|v| churn_uids.contains(v)))
                .count();
            let (warm_series, warm_churned) = *warm_series.get_or_insert((series, churned_series));
            assert!(
                warm_churned > 0,
                "no series names a churned pod's uid: the check below would pass on nothing"
            );
            assert!(
                churned_series as f64 <= warm_churned as f64 * 1.5,
                "{churned_series} series of the churned pods at {:?}, {warm_churned} at the \
                 warm-up's end: retained workloads do not expire",
                start.elapsed()
            );
            // Memory that grows with what is exported is not a leak, and
            // the allocator keeps what the most series took after they
            // expire: the bound scales with the peak, not the current
            // count. (A cold CI run's background Kubernetes build gave its
            // processes' series ~4,600 at 31 s against ~3,200 warm, and at
            // 36 s the anonymous memory read +44% over warm against a
            // bound scaled by the count then, which that run did not
            // print: that the series had expired is inferred.)
            let scale = (series_peak as f64 / warm_series as f64).max(1.0);
            let (_, warm_anon, warm_fds, _, _) =
                *warm.get_or_insert((rss, anon, fds, cpu, Instant::now()));
            rss_max = rss_max.max(rss);
            anon_max = anon_max.max(anon);
            fds_max = fds_max.max(fds);
            threads_map_max = threads_map_max.max(map_bytes(&metrics, "THREADS"));
            assert!(
                anon as f64
                    <= (warm_anon as f64 * (1.0 + anon_tolerance))
                        .max(warm_anon as f64 + 1048576.0)
                        * scale,
                "anonymous RSS {anon} bytes, warm {warm_anon} bytes (+{:.1}%) at {:?}; series \
                 {series}, peak {series_peak}, warm {warm_series}; RSS so far: {}",
                (anon as f64 / warm_anon as f64 - 1.0) * 100.0,
                start.elapsed(),
                rss_curve.join("; ")
            );
            assert!(
                fds as f64 <= (warm_fds as f64 * 1.10).max(warm_fds as f64 + 1.0),
                "open fds {fds}, warm {warm_fds}, at {:?}",
                start.elapsed()
            );
        }
    }
    drop(guard);
    // Two intervals to count the last slices and retire the last threads.
    std::thread::sleep(interval * 3);
    let metrics = exporter.metrics();
    let dead = std::mem::take(&mut *dead.lock().unwrap());
    let (_, _, cpu_end, _) = process_figures(pid);
    let (warm_rss, warm_anon, warm_fds, warm_cpu, warm_at) =
        warm.expect("the soak outlasted its warm-up");

    // Every dead cgroup's CPU time: under its container id where the
    // exporter named it while it lived, else in the `other` bucket.
    for (labels, value) in metrics.select("ergon_container_cpu_seconds_total", &[]) {
        let seen = named_seen
            .entry(labels["container_id"].clone())
            .or_default();
        *seen = seen.max(value);
    }
    let named_cpu: Vec<f64> = dead
        .iter()
        .filter_map(|d| named_seen.get(&d.container_id).copied())
        .collect();
    let named: f64 = named_cpu.iter().sum();
    let named_count = named_cpu.len();
    let other =
        metrics.sum("ergon_system_cpu_seconds_total", &[("bucket", "other")]) - other_before;
    let charged: f64 = dead.iter().map(|d| d.usage_usec as f64 / 1e6).sum();
    let found = named + other;
    assert!(
        dead.len() as f64 >= churned_at_least,
        "only {} cgroups churned",
        dead.len()
    );
    assert!(
        found >= charged * 0.95,
        "{} dead cgroups were charged {charged:.3} CPU-s by the kernel; the exporter shows \
         {named:.3} s under their containers ({named_count} named) + {other:.3} s in `other`",
        dead.len()
    );

    // Exited processes left the kernel's thread map: what is in it now is
    // what lives (and what ran since the last sample), not the churn.
    let threads_now = map_bytes(&metrics, "THREADS") as u64;
    let empty = hash_map_bytes(thread_shape(), threads_bound, 0, 1, Allocated::OnDemand);
    let per_thread =
        hash_map_bytes(thread_shape(), threads_bound, 1, 1, Allocated::OnDemand) - empty;
    // The lock bytes scale with CPUs; everything above the empty map is
    // whole entries.
    let entries = threads_now.saturating_sub(empty) / per_thread;
    let live = live_threads() as u64;
    assert!(
        entries <= live + 1000,
        "the thread map holds ~{entries} entries with {live} threads alive after {} processes came and went",
        dead.len()
    );
    // And the dead cgroups left the cgroup map: it holds what lives.
    let cgroup_entries = cgroup_map_entries(&metrics, max_cgroups as u64);
    let live_now = count_cgroups(&support::cgroup2_root()) as u64;
    assert!(
        cgroup_entries <= live_now + 300,
        "the cgroup map holds ~{cgroup_entries} entries with {live_now} cgroups alive after {} \
         came and went",
        dead.len()
    );
    let churned_for = warm_at.elapsed().as_secs_f64();
    let cpu_per_minute = (cpu_end - warm_cpu).as_secs_f64() * 60.0 / churned_for;
    println!(
        "soak result: {seconds} s, {} cgroups and processes churned ({:.0}/s) beside {steady_pods} steady pods; \
         {intervals_checked} intervals conserved; no map full, {allocation_failures:.0} inserts \
         failed for want of memory; \
         RSS warm {:.1} MiB, max {:.1} MiB (+{:.1}%); anonymous warm {:.1} MiB, max {:.1} MiB; \
         fds warm {warm_fds}, max {fds_max} \
         (+ up to {walk_fds_max} cgroup directories during walks); \
         exporter CPU {:.0} ms per minute; CGROUPS map ~{cgroup_entries} entries of {max_cgroups} at the end; THREADS map ~{entries} entries ({:.0} KiB, max {:.0} KiB) of {threads_bound}; \
         dead cgroups' CPU {charged:.3} s, found {found:.3} s ({named_count} named, {named:.3} s; other {other:.3} s); \
         RSS over time: {}",
        dead.len(),
        dead.len() as f64 / seconds as f64,
        warm_rss as f64 / 1048576.0,
        rss_max as f64 / 1048576.0,
        (rss_max as f64 / warm_rss as f64 - 1.0) * 100.0,
        warm_anon as f64 / 1048576.0,
        anon_max as f64 / 1048576.0,
        cpu_per_minute * 1000.0,
        threads_now as f64 / 1024.0,
        threads_map_max / 1024.0,
        rss_curve.join("; "),
    );
}

/// Per-process mode: an exited process's counter stays in `/metrics` for
/// the retention window (its value kept, not reset), then goes.
#[test]
fn an_exited_process_keeps_its_series_for_the_retention_window_then_goes() {
    let _lock = cpu_lock();
    let interval = Duration::from_millis(200);
    let retention = Duration::from_secs(3);
    let rapl = FakeRapl::start(40.0);
    let exporter = per_process_exporter(&rapl, interval, retention, &[]);
    let cgroup = CgroupGuard::pod_shaped("exited-process");
    std::thread::sleep(Duration::from_millis(20));
    let child = BusyChild::spawn_in(&cgroup.path);
    let pid = child.pid().to_string();
    let joules = || {
        let metrics = exporter.metrics();
        let series: Vec<f64> = metrics
            .select("ergon_process_energy_joules_total", &[("pid", &pid)])
            .map(|(_, value)| value)
            .collect();
        (!series.is_empty()).then(|| series.iter().sum::<f64>())
    };
    let started = Instant::now();
    while joules().is_none_or(|j| j <= 0.0) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(interval);
    }
    assert!(
        joules().is_some_and(|j| j > 0.0),
        "process {pid} never exported"
    );
    child.stop();
    let exited = Instant::now();
    // Its final slices are counted within a couple of intervals (more on a
    // loaded machine): from two scrapes a second apart that agree, the
    // value holds until the series goes.
    let mut last = joules().expect("the exited process's series is kept");
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = joules().expect("the exited process's series is kept");
        if (now - last).abs() < 1e-9 {
            break;
        }
        assert!(
            exited.elapsed() < retention,
            "process {pid}'s counter still moved {:?} after it exited",
            exited.elapsed()
        );
        last = now;
    }
    let gone_at = loop {
        match joules() {
            Some(now) => {
                assert!(
                    (now - last).abs() < 1e-9,
                    "process {pid} exited {:?} ago; its counter moved from {last} to {now}",
                    exited.elapsed()
                );
            }
            None => break exited.elapsed(),
        }
        assert!(
            exited.elapsed() < retention + Duration::from_secs(10),
            "process {pid} still exported {:?} after it exited (retention {retention:?})",
            exited.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Last seen at most an interval before the exit; pruned once the
    // retention window has passed since.
    assert!(
        gone_at + interval * 2 >= retention,
        "process {pid} was dropped {gone_at:?} after it exited, before the {retention:?} retention"
    );
}
