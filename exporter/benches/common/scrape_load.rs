//! `/metrics` latency, size and CPU per scrape with a given number of pods'
//! series: the measurement shared by `scrape` (500 pods, the main table) and
//! `scaling` (100, 500 and 2,000 pods).
//!
//! `pods` pod-shaped cgroups each get one process that runs 2 ms and exits;
//! once the release exporter (`--meter model --interval 5s`) shows every
//! pod, one client alone sends 100 scrapes (the baseline: nothing to queue
//! behind), then `clients` threads each send `per_client` requests back to
//! back, one connection per request like a Prometheus scrape with
//! keep-alive off. Latency is wall clock from connect to the last byte (it
//! is a latency); the exporter's CPU time per scrape comes from its
//! threads' `schedstat` over the load, minus what its interval loop used in
//! an equally long quiet window just after. The exporter's memory
//! (`VmHWM`, `VmRSS`) is read at the end.

use std::time::{Duration, Instant};

use super::{Exporter, PodActivity, PodSet};

/// Measures `pods` pods' scrapes and prints `result <prefix>.{alone_p50_ms,
/// alone_p99_ms,p50_ms,p99_ms,max_ms,bytes,series,pods,cpu_ms_per_scrape,
/// clients,peak_rss_mib,rss_mib,requests}`.
pub fn measure_and_print(prefix: &str, pods: usize, clients: usize, per_client: usize) {
    // The probe must be attached before the short-lived processes run.
    let exporter = Exporter::start();
    let started = Instant::now();
    let mut workload = PodSet::start(pods, 1, 0, PodActivity::Once);
    eprintln!(
        "scrape {pods} pods: workload up in {:.1?}",
        started.elapsed()
    );
    exporter.wait_for_pods(&workload, Duration::from_secs(120));
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
                        let body = super::scrape(port).expect("the exporter answers /metrics");
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
    super::pause(load_length);
    let quiet_after = exporter.cpu();
    let (peak_kib, rss_kib) = exporter.memory_kib();
    let load_cpu = loaded.since(&quiet_before);
    let loop_cpu = quiet_after.since(&loaded);
    let requests = latencies_ms.len();
    let cpu_ms_per_scrape =
        (load_cpu.as_secs_f64() - loop_cpu.as_secs_f64()).max(0.0) * 1e3 / requests as f64;
    eprintln!(
        "scrape {pods} pods: {requests} requests by {clients} clients in {load_length:.1?}; exporter CPU {load_cpu:?} under load, {loop_cpu:?} without"
    );

    let result = |what: &str, value: f64| super::result(&format!("{prefix}.{what}"), value);
    result("alone_p50_ms", super::quantile(&alone_ms, 0.50));
    result("alone_p99_ms", super::quantile(&alone_ms, 0.99));
    result("p50_ms", super::quantile(&latencies_ms, 0.50));
    result("p99_ms", super::quantile(&latencies_ms, 0.99));
    result("max_ms", super::quantile(&latencies_ms, 1.0));
    result("bytes", body.len() as f64);
    result("series", series as f64);
    result("pods", pods as f64);
    result("cpu_ms_per_scrape", cpu_ms_per_scrape);
    result("clients", clients as f64);
    result("peak_rss_mib", peak_kib as f64 / 1024.0);
    result("rss_mib", rss_kib as f64 / 1024.0);
    result("requests", requests as f64);
    drop(workload);
    drop(exporter);
}
