//! The measurement loop: every interval, sample the probe, turn cumulative
//! counters into the report that `/metrics` serves.
//!
//! It runs on its own thread, never on the HTTP runtime, so a scrape never
//! waits for a measurement and a measurement never waits for a scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::export::{Family, Kind, Published, Report, ServerHandle};
use crate::probe::{Probe, UsageSnapshot};

pub const BUILD_INFO: &str = "ergon_build_info";
pub const PROBE_INFO: &str = "ergon_probe_info";
pub const NODE_CPU_SECONDS: &str = "ergon_node_cpu_seconds_total";
pub const CGROUP_CPU_SECONDS: &str = "ergon_cgroup_cpu_seconds_total";
pub const PROBE_OVERFLOW_SECONDS: &str = "ergon_probe_overflow_cpu_seconds_total";
pub const PROBE_RUN_TIME: &str = "ergon_probe_run_time_seconds_total";
pub const PROBE_RUNS: &str = "ergon_probe_runs_total";

/// Every family a report can hold, for the registry's descriptions.
pub fn catalogue() -> Vec<Family> {
    vec![
        Family::new(
            BUILD_INFO,
            "Ergon's version and the kernel it runs on; always 1.",
            Kind::Gauge,
            &["version", "kernel"],
        ),
        Family::new(
            PROBE_INFO,
            "How CPU usage is collected: mode=ebpf|procfs, the sched_switch hook, and which counters; always 1.",
            Kind::Gauge,
            &["mode", "hook", "pmu"],
        ),
        Family::new(
            NODE_CPU_SECONDS,
            "CPU time of all the node's CPUs since the exporter started, by mode=busy|idle.",
            Kind::Counter,
            &["mode"],
        ),
        Family::new(
            CGROUP_CPU_SECONDS,
            "CPU time of tasks directly in each cgroup (v2 id and path).",
            Kind::Counter,
            &["cgroup_id"],
        ),
        Family::new(
            PROBE_OVERFLOW_SECONDS,
            "CPU time counted in a map's overflow bucket because the map was full (raise --max-cgroups / --max-processes).",
            Kind::Counter,
            &["map"],
        ),
        Family::new(
            PROBE_RUN_TIME,
            "Time the kernel spent in the accounting program (needs kernel.bpf_stats_enabled=1).",
            Kind::Counter,
            &[],
        ),
        Family::new(
            PROBE_RUNS,
            "Runs of the accounting program, one per context switch (needs kernel.bpf_stats_enabled=1).",
            Kind::Counter,
            &[],
        ),
    ]
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Builds the report of one interval.
fn report(probe: &Probe, usage: &UsageSnapshot, kernel: &str) -> Report {
    let mut families = catalogue();
    let info = probe.info();
    for family in &mut families {
        match family.name {
            BUILD_INFO => family.push(
                vec![env!("CARGO_PKG_VERSION").into(), kernel.to_owned()],
                1.0,
            ),
            PROBE_INFO => family.push(
                vec![info.mode.into(), info.hook.into(), info.pmu.into()],
                1.0,
            ),
            NODE_CPU_SECONDS => {
                family.push(vec!["busy".into()], usage.busy_ns as f64 / 1e9);
                family.push(vec!["idle".into()], usage.idle_ns as f64 / 1e9);
            }
            CGROUP_CPU_SECONDS => {
                for (id, counters) in &usage.cgroups {
                    family.push(vec![id.to_string()], counters.cpu_ns as f64 / 1e9);
                }
            }
            PROBE_OVERFLOW_SECONDS => {
                family.push(
                    vec!["cgroups".into()],
                    usage.cgroup_overflow.cpu_ns as f64 / 1e9,
                );
                family.push(
                    vec!["processes".into()],
                    usage.process_overflow.cpu_ns as f64 / 1e9,
                );
            }
            PROBE_RUN_TIME | PROBE_RUNS => {
                if let Probe::Ebpf(ebpf) = probe
                    && let Some((run_time, runs)) = ebpf.program_stats()
                {
                    let value = if family.name == PROBE_RUNS {
                        runs as f64
                    } else {
                        run_time.as_secs_f64()
                    };
                    family.push(vec![], value);
                }
            }
            _ => {}
        }
    }
    Report { families }
}

/// Runs intervals until `stop` is set.
pub fn run(
    mut probe: Probe,
    interval: Duration,
    published: Published,
    handle: ServerHandle,
    stop: Arc<AtomicBool>,
) {
    let kernel = kernel_release();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match probe.sample() {
            Ok(usage) => {
                published.publish(report(&probe, &usage, &kernel));
                handle.interval_done();
            }
            // Keep serving the last report; say what failed.
            Err(e) => tracing::warn!("sampling the probe failed, keeping the last report: {e}"),
        }
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now;
        }
        // Sleep in short steps so SIGTERM is honoured promptly.
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
        }
    }
}
