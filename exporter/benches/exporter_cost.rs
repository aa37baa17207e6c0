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
//! sleep; two pods instead run 20 % of a CPU each. The window starts one
//! interval after the exporter shows every pod (so cgroup discovery is done)
//! and lasts `--duration` seconds (default 60; a periodic 60 s cgroup walk of the
//! exporter falls inside it). CPU time is the exporter's threads'
//! `sum_exec_runtime` from `/proc/<pid>/task/*/schedstat` (nanoseconds,
//! charged by the kernel, so other load on the machine does not count);
//! memory is `VmHWM` (peak, startup included) and `VmRSS` at the end.
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

fn measure(pods: usize, processes: usize, window: Duration) {
    let name = format!("{pods}x{processes}");
    eprintln!("exporter_cost {name}: starting {pods} pods × {processes} processes");
    let workload = PodSet::start(pods, processes, BUSY_PODS, PodActivity::Mostly);
    let exporter = Exporter::start();
    let (startup_peak_kib, _) = exporter.memory_kib();
    exporter.wait_for_pods(&workload, Duration::from_secs(60));
    let scraper = Scraper::start(exporter.port());
    // One more interval before the window opens, so every workload's window
    // starts in the same steady state (with no pods, the wait above ends as
    // soon as the exporter is ready).
    common::pause(SCRAPE_EVERY);

    let before = exporter.cpu();
    let started = Instant::now();
    common::pause(window);
    let after = exporter.cpu();
    let elapsed = started.elapsed();
    let (peak_kib, rss_kib) = exporter.memory_kib();
    let scrape_bytes = scraper.last_bytes.load(Ordering::Relaxed);
    drop(scraper);

    let cpu = after.since(&before);
    let cpu_ms_per_min = cpu.as_secs_f64() * 1e3 * 60.0 / elapsed.as_secs_f64();
    eprintln!(
        "exporter_cost {name}: {cpu:?} CPU in {elapsed:.1?}; VmHWM {peak_kib} KiB, VmRSS {rss_kib} KiB"
    );
    common::result(
        &format!("exporter_cost.{name}.cpu_ms_per_min"),
        cpu_ms_per_min,
    );
    common::result(&format!("exporter_cost.{name}.peak_rss_mib"), mib(peak_kib));
    common::result(&format!("exporter_cost.{name}.rss_mib"), mib(rss_kib));
    common::result(
        &format!("exporter_cost.{name}.startup_peak_rss_mib"),
        mib(startup_peak_kib),
    );
    common::result(
        &format!("exporter_cost.{name}.scrape_bytes"),
        scrape_bytes as f64,
    );
    drop(exporter);
    drop(workload);
}

fn main() {
    common::serve_child_role();
    if !common::benchmarking() {
        return;
    }
    common::unwind_on_interrupt();
    let window = Duration::from_secs(common::numeric_flag("--duration", 60));
    for &(pods, processes) in SIZES {
        measure(pods, processes, window);
    }
    common::result("exporter_cost.window_s", window.as_secs_f64());
}
