//! `/metrics` latency and size with 500 pods' worth of series, under a
//! steady load of concurrent scrapes.
//!
//! 500 (`--pods`) pod-shaped cgroups each get one process that runs 2 ms and exits;
//! once the release exporter (`--meter model --interval 5s`) shows all 500
//! pods, `--clients` threads (default 4) each send `--scrapes` requests
//! (default 250) back to back, one connection per request like a
//! Prometheus scrape with keep-alive off. Latency is wall clock from
//! connect to the last byte (it is a latency); the exporter's CPU time per
//! scrape comes from its threads' `schedstat` over the load, minus what its
//! interval loop used in an equally long quiet window just after. The
//! exporter's memory (`VmHWM`, `VmRSS`) holding 500 pods' counters is read
//! at the end of the load.
//!
//! Before the load, one client alone sends 100 scrapes: the latency of a
//! scrape with nothing to queue behind.
//!
//! Prints `result scrape.{alone_p50_ms,alone_p99_ms,p50_ms,p99_ms,max_ms,bytes,series,cpu_ms_per_scrape,clients,requests,peak_rss_mib,rss_mib}`.

mod common;

use std::time::{Duration, Instant};

use common::{Exporter, PodActivity, PodSet};

fn main() {
    common::serve_child_role();
    if !common::benchmarking() {
        return;
    }
    common::unwind_on_interrupt();
    let clients = common::numeric_flag("--clients", 4) as usize;
    let per_client = common::numeric_flag("--scrapes", 250) as usize;
    let pods = common::numeric_flag("--pods", 500) as usize;

    // The probe must be attached before the short-lived processes run.
    let exporter = Exporter::start();
    let mut workload = PodSet::start(pods, 1, 0, PodActivity::Once);
    exporter.wait_for_pods(&workload, Duration::from_secs(60));
    workload.reap_exited();
    let body = exporter.scrape();
    let series = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .count();

    // Warm-up (connections, allocator, page cache), then one client alone:
    // the latency of a scrape with nothing to wait behind.
    for _ in 0..20 {
        exporter.scrape();
    }
    let alone_ms: Vec<f64> = (0..100)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(exporter.scrape());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();

    let port = exporter.port();
    let quiet_before = exporter.cpu();
    let load_started = Instant::now();
    let latencies_ms: Vec<f64> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let mut latencies = Vec::with_capacity(per_client);
                    for _ in 0..per_client {
                        let start = Instant::now();
                        let body = common::scrape(port).expect("the exporter answers /metrics");
                        latencies.push(start.elapsed().as_secs_f64() * 1e3);
                        std::hint::black_box(body);
                    }
                    latencies
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("scrape client"))
            .collect()
    });
    let load_length = load_started.elapsed();
    let loaded = exporter.cpu();
    // The interval loop's own CPU over as long a window without scrapes.
    common::pause(load_length);
    let quiet_after = exporter.cpu();
    let (peak_kib, rss_kib) = exporter.memory_kib();
    let load_cpu = loaded.since(&quiet_before);
    let loop_cpu = quiet_after.since(&loaded);
    let requests = latencies_ms.len();
    let cpu_ms_per_scrape =
        (load_cpu.as_secs_f64() - loop_cpu.as_secs_f64()).max(0.0) * 1e3 / requests as f64;
    eprintln!(
        "scrape: {requests} requests by {clients} clients in {load_length:.1?}; exporter CPU {load_cpu:?} under load, {loop_cpu:?} without"
    );

    common::result("scrape.alone_p50_ms", common::quantile(&alone_ms, 0.50));
    common::result("scrape.alone_p99_ms", common::quantile(&alone_ms, 0.99));
    common::result("scrape.p50_ms", common::quantile(&latencies_ms, 0.50));
    common::result("scrape.p99_ms", common::quantile(&latencies_ms, 0.99));
    common::result("scrape.max_ms", common::quantile(&latencies_ms, 1.0));
    common::result("scrape.bytes", body.len() as f64);
    common::result("scrape.series", series as f64);
    common::result("scrape.pods", pods as f64);
    common::result("scrape.cpu_ms_per_scrape", cpu_ms_per_scrape);
    common::result("scrape.clients", clients as f64);
    common::result("scrape.peak_rss_mib", peak_kib as f64 / 1024.0);
    common::result("scrape.rss_mib", rss_kib as f64 / 1024.0);
    common::result("scrape.requests", requests as f64);
    drop(workload);
    drop(exporter);
}
