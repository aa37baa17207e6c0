//! What the running exporter costs the node, one workload at a time: the
//! measurement shared by `exporter_cost` (the fixed sizes of the main table)
//! and `scaling` (cost against the number of live cgroups).
//!
//! Each workload gets its window of the measured time in every round, the
//! workloads running in order and then in reverse (ABCD DCBA), each window
//! with a fresh exporter and a fresh workload: the rest of the machine (its
//! cgroups, its context switches) is part of the exporter's work, and its
//! drift over the run must hit every workload alike. CPU is the exporter's
//! threads' `sum_exec_runtime` (`/proc/<pid>/task/*/schedstat`); memory is
//! `VmHWM` and `VmRSS` at the end of the window, the larger of the windows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Exporter, PodActivity, PodSet};

const SCRAPE_EVERY: Duration = Duration::from_secs(5);
/// Each workload's measured time is split over this many windows.
pub const ROUNDS: usize = 2;

/// One workload: `pods` pod-shaped cgroups of `processes` processes, the
/// first `busy` of them running 20 % of a CPU, the rest as `activity` says.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub pods: usize,
    pub processes: usize,
    pub busy: usize,
    pub activity: PodActivity,
}

impl Workload {
    /// `<pods>x<processes>`, the key of its results.
    pub fn name(&self) -> String {
        format!("{}x{}", self.pods, self.processes)
    }
}

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
                        if let Some(body) = super::scrape(port) {
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
pub struct Window {
    pub cpu: Duration,
    pub elapsed: Duration,
    pub peak_kib: u64,
    pub rss_kib: u64,
    pub startup_peak_kib: u64,
    pub scrape_bytes: usize,
}

fn measure(workload: &Workload, window: Duration) -> Window {
    let name = workload.name();
    eprintln!(
        "exporter cost {name}: starting {} pods × {} processes",
        workload.pods, workload.processes
    );
    let started = Instant::now();
    let pods = PodSet::start(
        workload.pods,
        workload.processes,
        workload.busy,
        workload.activity,
    );
    eprintln!(
        "exporter cost {name}: workload up in {:.1?}",
        started.elapsed()
    );
    let exporter = Exporter::start();
    let (startup_peak_kib, _) = exporter.memory_kib();
    exporter.wait_for_pods(&pods, Duration::from_secs(120));
    // Ready means one whole interval was measured already: the window
    // opens in steady state with or without pods.
    let scraper = Scraper::start(exporter.port());

    let before = exporter.cpu();
    let started = Instant::now();
    super::pause(window);
    let after = exporter.cpu();
    let elapsed = started.elapsed();
    let (peak_kib, rss_kib) = exporter.memory_kib();
    let scrape_bytes = scraper.last_bytes.load(Ordering::Relaxed);
    drop(scraper);
    let cpu = after.since(&before);
    eprintln!(
        "exporter cost {name}: {cpu:?} CPU in {elapsed:.1?}; VmHWM {peak_kib} KiB, VmRSS {rss_kib} KiB"
    );
    drop(exporter);
    drop(pods);
    Window {
        cpu,
        elapsed,
        peak_kib,
        rss_kib,
        startup_peak_kib,
        scrape_bytes,
    }
}

/// Measures every workload for `duration` in all, in [`ROUNDS`] windows
/// (ABCD DCBA), and prints `result <prefix>.<pods>x<processes>.{cpu_ms_per_min,
/// peak_rss_mib,rss_mib,startup_peak_rss_mib,scrape_bytes}` and
/// `<prefix>.window_s`.
pub fn measure_and_print(prefix: &str, workloads: &[Workload], duration: Duration) {
    let window = duration / ROUNDS as u32;
    let mut windows: Vec<Vec<Window>> = workloads.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..workloads.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            windows[index].push(measure(&workloads[index], window));
        }
    }
    for (workload, measured) in workloads.iter().zip(&windows) {
        let key = |what: &str| format!("{prefix}.{}.{what}", workload.name());
        let cpu: Duration = measured.iter().map(|w| w.cpu).sum();
        let elapsed: Duration = measured.iter().map(|w| w.elapsed).sum();
        let largest = |of: fn(&Window) -> u64| measured.iter().map(of).max().unwrap_or(0);
        super::result(
            &key("cpu_ms_per_min"),
            cpu.as_secs_f64() * 1e3 * 60.0 / elapsed.as_secs_f64(),
        );
        super::result(&key("peak_rss_mib"), mib(largest(|w| w.peak_kib)));
        super::result(&key("rss_mib"), mib(largest(|w| w.rss_kib)));
        super::result(
            &key("startup_peak_rss_mib"),
            mib(largest(|w| w.startup_peak_kib)),
        );
        super::result(
            &key("scrape_bytes"),
            largest(|w| w.scrape_bytes as u64) as f64,
        );
    }
    super::result(&format!("{prefix}.window_s"), duration.as_secs_f64());
}
