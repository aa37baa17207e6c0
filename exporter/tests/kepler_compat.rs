//! `--compat kepler` speaks Kepler 0.11: a real Prometheus scrapes the real
//! exporter measuring named pods, and the queries Kepler's dashboards make
//! (by zone, top-k containers, pods, namespaces and processes, and the
//! `label_values` of their variables) all return data.

use std::time::Duration;

use ergon_testkit as support;
use support::pods::{KubeApi as Api, NODE, PodFixture as TestPod};
use support::prometheus::Prometheus;
use support::{ExporterProcess, FakeRapl, cpu_lock};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

fn start(compat: &str, rapl: &FakeRapl, api: &Api) -> ExporterProcess {
    let mut args = support::pods::exporter_args(rapl, api);
    args.extend([
        "--interval=500ms".into(),
        format!("--compat={compat}"),
        "--per-process".into(),
    ]);
    ExporterProcess::start(ERGON.as_ref(), &args)
}

/// Polls until `promql` returns at least one series (30 s at most).
fn results(
    prometheus: &Prometheus,
    promql: &str,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    for _ in 0..150 {
        let found = prometheus.query_all(promql);
        if !found.is_empty() {
            return found.into_iter().map(|(labels, _)| labels).collect();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("`{promql}` returned no data from Prometheus");
}

#[test]
fn kepler_dashboards_queries_return_data() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pods = [
        TestPod::start("vehicle-pipeline", "vehicle-api-7d9f", 1),
        TestPod::start("vehicle-pipeline", "influxdb-0", 2),
    ];
    let api = Api::start(&pods.iter().collect::<Vec<_>>());
    let exporter = start("kepler", &rapl, &api);
    let prometheus = Prometheus::start(exporter.port);

    // Node power by zone, with node_name, the way Kepler's node panel asks.
    let zones = results(
        &prometheus,
        "sum by (zone, node_name) (rate(kepler_node_cpu_joules_total[5s])) > 0",
    );
    assert!(
        zones
            .iter()
            .any(|l| l["zone"] == "package" && l["node_name"] == NODE),
        "{zones:?}"
    );
    let watts = prometheus
        .query("sum(kepler_node_cpu_watts{zone=\"package\"})")
        .expect("node watts");
    assert!(
        (watts - 40.0).abs() < 6.0,
        "node power {watts} W, the meter advances at 40 W"
    );
    for promql in [
        "kepler_node_cpu_active_watts{zone=\"package\"} > 0",
        "kepler_node_cpu_idle_joules_total{zone=\"package\"} > 0",
        "kepler_node_cpu_usage_ratio > 0",
        "kepler_node_cpu_info",
        "kepler_build_info",
    ] {
        results(&prometheus, promql);
    }

    // Top-k containers, pods, namespaces and processes.
    let containers = results(
        &prometheus,
        "topk(5, sum by (container_name, pod_id) (rate(kepler_container_cpu_joules_total{zone=\"package\"}[5s])))",
    );
    assert!(
        containers
            .iter()
            .any(|l| l["container_name"] == "main"
                && pods.iter().any(|p| l["pod_id"] == p.uid.as_str())),
        "{containers:?}"
    );
    let by_pod = results(
        &prometheus,
        "topk(5, sum by (pod_name, pod_namespace) (rate(kepler_pod_cpu_joules_total{state=\"running\"}[5s])) > 0)",
    );
    for pod in &pods {
        assert!(
            by_pod.iter().any(|l| l["pod_name"] == pod.name.as_str()),
            "{} missing from {by_pod:?}",
            pod.name
        );
    }
    results(
        &prometheus,
        "topk(5, sum by (pod_namespace) (kepler_pod_cpu_watts{pod_namespace=\"vehicle-pipeline\"}))",
    );
    results(
        &prometheus,
        "topk(5, sum by (pid, comm) (rate(kepler_process_cpu_joules_total{type=\"container\"}[5s])) > 0)",
    );
    results(
        &prometheus,
        "topk(5, rate(kepler_container_cpu_seconds_total{runtime!=\"\", state=\"running\"}[5s]) > 0)",
    );
    results(&prometheus, "kepler_process_cpu_seconds_total > 0");

    // Grafana variables: label_values(metric, label).
    for (label, metric, expected) in [
        (
            "pod_namespace",
            "kepler_pod_cpu_joules_total",
            "vehicle-pipeline",
        ),
        ("pod_name", "kepler_pod_cpu_joules_total", "influxdb-0"),
        (
            "container_name",
            "kepler_container_cpu_joules_total",
            "main",
        ),
        ("zone", "kepler_node_cpu_joules_total", "package"),
        ("node_name", "kepler_container_cpu_joules_total", NODE),
    ] {
        let values = prometheus.label_values(label, metric);
        assert!(
            values.iter().any(|v| v == expected),
            "label_values({metric}, {label}) = {values:?}, expected {expected}"
        );
    }

    // The old names are not served under the new mode.
    let text = exporter.metrics_text();
    assert!(!text.contains("kepler_container_joules_total"));
}

#[test]
fn kepler_0_9_keeps_the_old_names() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(20.0);
    let pod = TestPod::start("vehicle-pipeline", "redis-0", 1);
    let api = Api::start(&[&pod]);
    let exporter = start("kepler-0.9", &rapl, &api);
    let metrics = exporter.eventually("Kepler 0.9 container series", |m| {
        m.sum("kepler_container_joules_total", &[("pod_name", "redis-0")]) > 0.0
    });
    assert!(metrics.sum("kepler_node_platform_joules_total", &[]) > 0.0);
    assert!(
        !exporter
            .metrics_text()
            .contains("kepler_node_cpu_joules_total"),
        "0.9 mode emits 0.11 names"
    );
}
