//! The catalogue of metric names dashboards and rules may use, and where
//! each comes from: the exporter, a recording rule, Prometheus itself, or a
//! pipeline component's request counter.

use std::collections::BTreeSet;

/// Request counters of pipeline components that the dashboards divide energy
/// by: (Prometheus job in the stack, metric name, where the metric comes
/// from). Prometheus' own counter is real in the end-to-end test (it scrapes
/// itself); the others are served there by a stand-in for the component.
pub const COMPONENT_REQUEST_METRICS: [(&str, &str, &str); 6] = [
    (
        "redis",
        "redis_commands_processed_total",
        "redis_exporter sidecar",
    ),
    (
        "inference",
        "request_predict_seconds_count",
        "KServe model server histogram request_predict_seconds",
    ),
    ("influxdb", "http_api_requests_total", "InfluxDB 2 /metrics"),
    (
        "grafana",
        "grafana_http_request_duration_seconds_count",
        "Grafana /metrics",
    ),
    (
        "prometheus",
        "prometheus_http_requests_total",
        "Prometheus /metrics",
    ),
    (
        "minio",
        "minio_s3_requests_total",
        "MinIO /minio/v2/metrics/cluster",
    ),
];

/// Series Prometheus itself attaches to every scrape target.
pub const PROMETHEUS_SYNTHETIC_METRICS: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// The exporter's metric catalogue as the contract lists it. Dashboards and
/// rules may use only these (checked statically); the end-to-end test checks
/// them against the real `/metrics`.
pub const EXPORTER_METRICS: [&str; 23] = [
    "ergon_node_energy_joules_total",
    "ergon_node_power_watts",
    "ergon_node_cpu_seconds_total",
    "ergon_pod_energy_joules_total",
    "ergon_container_energy_joules_total",
    "ergon_container_cpu_seconds_total",
    "ergon_container_cpu_cycles_total",
    "ergon_system_energy_joules_total",
    "ergon_system_cpu_seconds_total",
    "ergon_process_energy_joules_total",
    "ergon_attribution_residual_joules_total",
    "ergon_build_info",
    "ergon_meter_up",
    "ergon_probe_info",
    "ergon_probe_overflow_cpu_seconds_total",
    "ergon_probe_run_time_seconds_total",
    "ergon_probe_runs_total",
    "ergon_last_successful_interval_timestamp_seconds",
    "ergon_grid_carbon_intensity_grams_per_kwh",
    "ergon_grid_carbon_intensity_timestamp_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    // Kept last: the only compat name listed in the contract; dashboards
    // must not depend on it, which `dashboards_use_only_known_metrics` checks.
    "kepler_container_joules_total",
];

/// Where a metric name used by dashboards or rules comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum MetricOrigin {
    Exporter,
    RecordingRule,
    PrometheusItself,
    Component(&'static str),
}

/// Classifies a metric name, or `None` when nothing known produces it.
pub fn metric_origin(name: &str, recording_rules: &BTreeSet<String>) -> Option<MetricOrigin> {
    if recording_rules.contains(name) {
        Some(MetricOrigin::RecordingRule)
    } else if PROMETHEUS_SYNTHETIC_METRICS.contains(&name) {
        Some(MetricOrigin::PrometheusItself)
    } else if let Some((job, _, _)) = COMPONENT_REQUEST_METRICS
        .iter()
        .find(|(_, m, _)| *m == name)
    {
        Some(MetricOrigin::Component(job))
    } else if EXPORTER_METRICS.contains(&name) {
        Some(MetricOrigin::Exporter)
    } else {
        None
    }
}
