//! What the running exporter costs the node: CPU time per minute and peak
//! resident memory of the release binary (`--meter model --interval 5s`,
//! scraped every 5 s), with pod-shaped cgroups full of mostly sleeping
//! processes.
//!
//! Four workloads, each started before the exporter and torn down after:
//! - no pods: the baseline, what the node's own cgroups cost;
//! - 20 pods × 5 processes and 200 pods × 10 processes (the sizes);
//! - 20 pods × 100 processes: as many tasks as the large size but the small
//!   size's cgroups, which shows whether cost follows active cgroups (it
//!   should: the kernel sums per cgroup) or tasks.
//!
//! In every pod one process wakes every second for 200 µs and the others
//! sleep; two pods instead run 20 % of a CPU each. A window starts once the
//! exporter shows every pod (so cgroup discovery is done).
//! Each workload gets `--duration` seconds (default 60) in two windows, the
//! workloads running in order and then in reverse; a fresh exporter starts
//! for every window (`common::cost`). CPU time is the exporter's threads'
//! `sum_exec_runtime` from `/proc/<pid>/task/*/schedstat` (nanoseconds,
//! charged by the kernel, so other processes' CPU time does not count,
//! though what they do still changes the exporter's own work);
//! memory is `VmHWM` (peak, startup included) and `VmRSS` at the end, the
//! larger of the two windows.
//!
//! Prints `result exporter_cost.<pods>x<processes>.{cpu_ms_per_min,peak_rss_mib,rss_mib,startup_peak_rss_mib,scrape_bytes}`.

mod common;

use std::time::Duration;

use common::PodActivity;
use common::cost::{Workload, measure_and_print};

const SIZES: &[(usize, usize)] = &[(0, 0), (20, 5), (200, 10), (20, 100)];
const BUSY_PODS: usize = 2;

fn main() {
    if !common::start_measuring() {
        return;
    }
    let duration = Duration::from_secs(common::numeric_flag("--duration", 60));
    let workloads: Vec<Workload> = SIZES
        .iter()
        .map(|&(pods, processes)| Workload {
            pods,
            processes,
            busy: BUSY_PODS,
            activity: PodActivity::Mostly,
        })
        .collect();
    measure_and_print("exporter_cost", &workloads, duration);
}
