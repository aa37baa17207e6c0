//! `/metrics` latency and size with 500 pods' worth of series, under a
//! steady load of concurrent scrapes (`common::scrape_load`).
//!
//! `--pods` (default 500) pod-shaped cgroups, `--clients` threads (default
//! 4) each sending `--scrapes` requests (default 250) back to back, after
//! one client alone sent 100 (the baseline).
//!
//! Prints `result scrape.{alone_p50_ms,alone_p99_ms,p50_ms,p99_ms,max_ms,bytes,series,cpu_ms_per_scrape,clients,requests,peak_rss_mib,rss_mib}`.

mod common;

fn main() {
    if !common::start_measuring() {
        return;
    }
    let clients = common::numeric_flag("--clients", 4) as usize;
    let per_client = common::numeric_flag("--scrapes", 250) as usize;
    let pods = common::numeric_flag("--pods", 500) as usize;
    common::scrape_load::measure_and_print("scrape", pods, clients, per_client);
}
