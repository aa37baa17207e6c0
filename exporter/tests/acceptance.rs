//! End to end, on the real kernel: pod-shaped cgroups with busy processes, a
//! fake RAPL tree advancing at a known power, a loopback Kubernetes API in
//! its real JSON format, the real `ergon` binary, and (for the rate check) a
//! real Prometheus.

use ergon_testkit as support;

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

use std::time::Duration;

use support::pods::{KubeApi as Api, PodFixture as TestPod};
use support::{ExporterProcess, FakeRapl, Metrics, cpu_lock};

fn pod_energy(metrics: &Metrics, pod: &TestPod) -> f64 {
    metrics.sum(
        "ergon_pod_energy_joules_total",
        &[("pod_uid", pod.uid.as_str()), ("domain", "package")],
    )
}

fn exporter_args(rapl: &FakeRapl, api: &Api, extra: &[&str]) -> Vec<String> {
    let mut args = support::pods::exporter_args(rapl, api);
    args.push("--interval=500ms".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn pods_get_energy_in_proportion_to_their_work_and_nothing_is_lost() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pods = [
        TestPod::start("vehicle-pipeline", "vehicle-api-7d9f", 1),
        TestPod::start("vehicle-pipeline", "inference-predictor-5c8b", 2),
        TestPod::start("vehicle-pipeline", "influxdb-0", 4),
    ];
    let api = Api::start(&pods.iter().collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(200));
    let exporter = ExporterProcess::start(ERGON.as_ref(), &exporter_args(&rapl, &api, &[]));
    std::thread::sleep(Duration::from_secs(4));
    let metrics = exporter.metrics();
    // Names from the API, energy in ratio 1:2:4.
    for pod in &pods {
        let named = metrics
            .select(
                "ergon_pod_energy_joules_total",
                &[("pod_uid", pod.uid.as_str())],
            )
            .any(|(labels, _)| {
                labels["pod"] == pod.name && labels["namespace"] == "vehicle-pipeline"
            });
        assert!(named, "pod {} not named in {:?}", pod.name, metrics.samples);
    }
    let unit = pod_energy(&metrics, &pods[0]);
    assert!(unit > 0.0, "no energy for the first pod");
    let cpu = |pod: &TestPod| {
        metrics.sum(
            "ergon_container_cpu_seconds_total",
            &[("container_id", pod.container_id.as_str())],
        )
    };
    for (pod, expected) in pods.iter().zip([1.0, 2.0, 4.0]) {
        let ratio = pod_energy(&metrics, pod) / unit;
        let cpu_ratio = cpu(pod) / cpu(&pods[0]);
        assert!(
            (ratio - expected).abs() / expected < 0.05,
            "{}: energy ratio {ratio:.3}, expected {expected} (CPU-time ratio {cpu_ratio:.3})",
            pod.name
        );
    }
    // Containers carry their names too.
    let matching = [("container_id", pods[2].container_id.as_str())];
    let container = metrics
        .select("ergon_container_energy_joules_total", &matching)
        .next()
        .expect("container series");
    assert_eq!(container.0["container"], "main");

    // Conservation: pods + system buckets + what stays on the node = the meter.
    let node = metrics.sum("ergon_node_energy_joules_total", &[("domain", "package")]);
    let pods_total = metrics.sum("ergon_pod_energy_joules_total", &[("domain", "package")]);
    let system = metrics.sum("ergon_system_energy_joules_total", &[("domain", "package")]);
    let kept = metrics.sum(
        "ergon_node_unattributed_joules_total",
        &[("domain", "package")],
    );
    let accounted = pods_total + system + kept;
    assert!(node > 0.0);
    assert!(
        (accounted - node).abs() / node < 0.005,
        "pods {pods_total} + system {system} + node {kept} = {accounted} vs meter {node}"
    );
    // The meter read the fake counter's power (40 W), not something else.
    let watts = metrics.sum(
        "ergon_node_power_watts",
        &[("domain", "package"), ("source", "rapl")],
    );
    assert!(
        (watts - 40.0).abs() < 4.0,
        "power gauge {watts} W, counter advances at 40 W"
    );

    // promtool finds nothing to complain about in a real scrape.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by `cargo xtask setup` (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exporter.metrics_text().as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}"
    );

    // A real Prometheus scrapes it and rate() sees energy.
    let prometheus = support::prometheus::Prometheus::start(exporter.port);
    let rate = prometheus.query_until_positive("sum(rate(ergon_pod_energy_joules_total[30s]))");
    assert!(rate > 0.0);
}

#[test]
fn exited_pods_keep_their_energy_and_restarts_never_lower_a_counter() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(30.0);
    let mut short = TestPod::start("vehicle-pipeline", "job-once", 1);
    let long = TestPod::start("vehicle-pipeline", "vehicle-api-restart", 1);
    let api = Api::start(&[&short, &long]);
    let checkpoint = tempfile::tempdir().unwrap();
    let checkpoint_arg = format!(
        "--checkpoint={}",
        checkpoint.path().join("ergon.json").display()
    );
    let args = exporter_args(&rapl, &api, &[&checkpoint_arg, "--retention=6s"]);
    let mut exporter = ExporterProcess::start(ERGON.as_ref(), &args);
    exporter.eventually("the short pod has energy", |m| pod_energy(m, &short) > 0.0);

    // Its processes exit and its cgroup goes: the final value stays.
    short.stop();
    short.cgroup.remove();
    std::thread::sleep(Duration::from_millis(1500));
    let after_exit = pod_energy(&exporter.metrics(), &short);
    assert!(after_exit > 0.0, "an exited pod's energy vanished");
    std::thread::sleep(Duration::from_millis(1000));
    let later = exporter.metrics();
    assert_eq!(
        pod_energy(&later, &short),
        after_exit,
        "an exited pod kept counting"
    );

    // Killed without warning and restarted: no counter goes down.
    let before: Vec<_> = later
        .samples
        .iter()
        .filter(|(name, _, _)| support::persisted_counter(name))
        .cloned()
        .collect();
    exporter.kill();
    let exporter = ExporterProcess::start(ERGON.as_ref(), &args);
    let after = exporter.metrics();
    for (name, labels, value) in &before {
        let now = after
            .samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v);
        if let Some(now) = now {
            assert!(
                now >= *value,
                "{name}{labels:?} went down: {value} -> {now}"
            );
        } else {
            panic!("{name}{labels:?} disappeared after a restart");
        }
    }

    // After the retention window the exited pod is dropped; the live one stays.
    exporter.eventually("the exited pod is dropped after retention", |m| {
        pod_energy(m, &short) == 0.0 && pod_energy(m, &long) > 0.0
    });
}

#[test]
fn an_api_outage_keeps_uids_flowing_and_names_come_back() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(30.0);
    let known = TestPod::start("vehicle-pipeline", "grafana-6b7c", 1);
    let mut api = Api::start(&[&known]);
    let exporter = ExporterProcess::start(ERGON.as_ref(), &exporter_args(&rapl, &api, &[]));
    exporter.eventually("the known pod is named", |m| {
        m.select("ergon_pod_energy_joules_total", &[("pod", "grafana-6b7c")])
            .next()
            .is_some()
    });

    api.stop();
    // A pod that starts during the outage is counted under its uid.
    let late = TestPod::start("vehicle-pipeline", "mlflow-5f4d", 1);
    let during = exporter.eventually("the new pod counted by uid", |m| pod_energy(m, &late) > 0.0);
    let unnamed = during
        .select(
            "ergon_pod_energy_joules_total",
            &[("pod_uid", late.uid.as_str())],
        )
        .all(|(labels, _)| labels["pod"].is_empty());
    assert!(unnamed, "a pod the API never described got a name");
    assert!(
        pod_energy(&during, &known) > 0.0,
        "known pods stopped flowing in the outage"
    );

    api.state.lock().unwrap().put(late.api_object());
    api.restart();
    exporter.eventually("names come back with the API", |m| {
        m.select("ergon_pod_energy_joules_total", &[("pod", "mlflow-5f4d")])
            .next()
            .is_some()
    });
}
