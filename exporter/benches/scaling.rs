//! How the exporter's cost grows with its work (issue 13 item 4): with
//! live cgroups, and not with the tasks in them; and `/metrics` with the
//! number of pods.
//!
//! Exporter CPU per minute and memory (`common::cost`, the same
//! measurement as `exporter_cost`: fresh exporter and workload per window,
//! ABCD DCBA, CPU time the kernel charged its threads) at 0, 100, 1,000 and
//! 5,000 live pod-shaped cgroups of one process each, and at 100 cgroups of
//! 50 processes (as many tasks as the largest size, the cgroups of the
//! smallest). Every process wakes every 4 s for 20 µs, so every cgroup runs
//! in every 5 s interval while the whole workload stays a small load of its
//! own (5,000 cgroups: about 0.5 % of one CPU). `--duration` is each
//! size's measured time (default 60 s, in two windows).
//!
//! `/metrics` latency, size and CPU per scrape (`common::scrape_load`, the
//! same measurement as `scrape`) at 100, 500 and 2,000 pods (`--pods`, a
//! comma-separated list), `--clients` (default 4) × `--scrapes` (default
//! 250) requests each.
//!
//! Prints `result scaling.cgroups.<pods>x<processes>.{cpu_ms_per_min,…}`,
//! `scaling.cgroups.window_s` and `scaling.scrape.<pods>.{p50_ms,p99_ms,…}`.

mod common;

use std::time::Duration;

use common::PodActivity;
use common::cost::Workload;

/// (cgroups, processes per cgroup).
const CGROUP_SIZES: &[(usize, usize)] = &[(0, 0), (100, 1), (1_000, 1), (5_000, 1), (100, 50)];

fn main() {
    if !common::start_measuring() {
        return;
    }
    let duration = Duration::from_secs(common::numeric_flag("--duration", 60));
    let clients = common::numeric_flag("--clients", 4) as usize;
    let per_client = common::numeric_flag("--scrapes", 250) as usize;
    let pod_sizes: Vec<usize> = common::flag("--pods")
        .unwrap_or_else(|| "100,500,2000".into())
        .split(',')
        .map(|size| {
            size.trim().parse().unwrap_or_else(|_| {
                panic!("--pods takes comma-separated pod counts, e.g. 100,500,2000; got {size:?}")
            })
        })
        .collect();

    let workloads: Vec<Workload> = CGROUP_SIZES
        .iter()
        .map(|&(pods, processes)| Workload {
            pods,
            processes,
            busy: 0,
            activity: PodActivity::Light,
        })
        .collect();
    common::cost::measure_and_print("scaling.cgroups", &workloads, duration);

    for &pods in &pod_sizes {
        let prefix = format!("scaling.scrape.{pods}");
        common::scrape_load::measure_and_print(&prefix, pods, clients, per_client);
    }
}
