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
//! for every window. CPU time is the exporter's threads'
//! `sum_exec_runtime` from `/proc/<pid>/task/*/schedstat` (nanoseconds,
//! charged by the kernel, so other processes' CPU time does not count,
//! though what they do still changes the exporter's own work);
//! memory is `VmHWM` (peak, startup included) and `VmRSS` at the end, the
//! larger of the two windows.
//!
//! Prints `result exporter_cost.<pods>x<processes>.{cpu_ms_per_min,peak_rss_mib,rss_mib,startup_peak_rss_mib,scrape_bytes}`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Exporter, PodActivity, PodSet};

const SIZES: &[(usize, usize)] = &[(0, 0), (20, 5), (200, 10), (20, 100)];
const BUSY_PODS: usize = 2;
const SCRAPE_EVERY: Duration = Duration::from_secs(5);
/// Each workload's `--duration` is split over this many windows, run in
/// order and then in reverse (ABCD DCBA), so a drift in what the rest of the
/// machine does (its cgroups and switches are the exporter's work too) hits
/// every workload alike.
const ROUNDS: usize = 2;

/// Scrapes `/metrics` every 5 s like Prometheus, until dropped.
struct Scraper {
    stop: Arc<AtomicBool>,
    last_bytes: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let last_bytes = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, last_bytes) = (stop.clone(), last_bytes.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        if let Some(body) = common::scrape(port) {
                            last_bytes.store(body.len(), Ordering::Relaxed);
                        }
                        next += SCRAPE_EVERY;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Scraper {
            stop,
            last_bytes,
            thread: Some(thread),
        }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One window of one workload.
struct Window {
    cpu: Duration,
    elapsed: Duration,
    peak_kib: u64,
    rss_kib: u64,
    startup_peak_kib: u64,
    scrape_bytes: usize,
}

fn measure(pods: usize, processes: usize, window: Duration) -> Window {
    let name = format!("{pods}x{processes}");
    eprintln!("exporter_cost {name}: starting {pods} pods × {processes} processes");
    let workload = PodSet::start(pods, processes, BUSY_PODS, PodActivity::Mostly);
    let exporter = Exporter::start();
    let (startup_peak_kib, _) = exporter.memory_kib();
    exporter.wait_for_pods(&workload, Duration::from_secs(60));
    // Ready means one whole interval was measured already: the window
    // opens in steady state with or without pods.
    let scraper = Scraper::start(exporter.port());

    let before = exporter.cpu();
    let started = Instant::now();
    common::pause(window);
    let after = exporter.cpu();
    let elapsed = started.elapsed();
    let (peak_kib, rss_kib) = exporter.memory_kib();
    let scrape_bytes = scraper.last_bytes.load(Ordering::Relaxed);
    drop(scraper);
    let cpu = after.since(&before);
    eprintln!(
        "exporter_cost {name}: {cpu:?} CPU in {elapsed:.1?}; VmHWM {peak_kib} KiB, VmRSS {rss_kib} KiB"
    );
    drop(exporter);
    drop(workload);
    Window {
        cpu,
        elapsed,
        peak_kib,
        rss_kib,
        startup_peak_kib,
        scrape_bytes,
    }
}

fn main() {
    common::serve_child_role();
    if !common::benchmarking() {
        return;
    }
    common::unwind_on_interrupt();
    let duration = Duration::from_secs(common::numeric_flag("--duration", 60));
    let window = duration / ROUNDS as u32;
    let mut windows: Vec<Vec<Window>> = SIZES.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..SIZES.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let (pods, processes) = SIZES[index];
            windows[index].push(measure(pods, processes, window));
        }
    }
    for (&(pods, processes), measured) in SIZES.iter().zip(&windows) {
        let key = |what: &str| format!("exporter_cost.{pods}x{processes}.{what}");
        let cpu: Duration = measured.iter().map(|w| w.cpu).sum();
        let elapsed: Duration = measured.iter().map(|w| w.elapsed).sum();
        let largest = |of: fn(&Window) -> u64| measured.iter().map(of).max().unwrap_or(0);
        common::result(
            &key("cpu_ms_per_min"),
            cpu.as_secs_f64() * 1e3 * 60.0 / elapsed.as_secs_f64(),
        );
        common::result(&key("peak_rss_mib"), mib(largest(|w| w.peak_kib)));
        common::result(&key("rss_mib"), mib(largest(|w| w.rss_kib)));
        common::result(
            &key("startup_peak_rss_mib"),
            mib(largest(|w| w.startup_peak_kib)),
        );
        common::result(
            &key("scrape_bytes"),
            largest(|w| w.scrape_bytes as u64) as f64,
        );
    }
    common::result("exporter_cost.window_s", duration.as_secs_f64());
}
