//! The scrape protocol against real clients: Prometheus negotiates
//! OpenMetrics with gzip and stores the data; curl decodes the gzip body;
//! promtool checks both formats. And `--metrics` levels, with the series
//! each level costs for 100 pods (the figures in README).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use ergon_testkit as support;
use support::pods::{KubeApi as Api, PodFixture as TestPod};
use support::prometheus::Prometheus;
use support::{BusyChild, ExporterProcess, FakeRapl, Metrics, cpu_lock};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

/// The `Accept` header Prometheus 2.42 sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn start(rapl: &FakeRapl, api: &Api, extra: &[&str]) -> ExporterProcess {
    let mut args = support::pods::exporter_args(rapl, api);
    args.push("--interval=500ms".into());
    args.extend(extra.iter().map(|a| a.to_string()));
    ExporterProcess::start(ERGON.as_ref(), &args)
}

/// `curl --compressed` with `accept`: the response head and decoded body.
fn curl(port: u16, accept: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "--compressed", "-D", "-", "-H"])
        .arg(format!("Accept: {accept}"))
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl is installed (Debian package curl)");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("curl decoded the gzip body to UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.to_ascii_lowercase(), body.to_owned())
}

/// `promtool check metrics` (reading stdin): its exit code and findings.
fn promtool(body: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), findings)
}

#[test]
fn prometheus_negotiates_openmetrics_with_gzip_and_stores_the_data() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = TestPod::start("vehicle-pipeline", "vehicle-api-7d9f", 1);
    let api = Api::start(&[&pod]);
    let exporter = start(&rapl, &api, &[]);
    let prometheus = Prometheus::start(exporter.port);

    // The exporter counts what it served: Prometheus asked for OpenMetrics
    // and gzip, got them, and parsed them (its OpenMetrics parser rejects a
    // body without `# EOF` or with a counter family named `_total`).
    prometheus.query_until_positive(
        "ergon_scrapes_total{format=\"openmetrics\",encoding=\"gzip\",job=\"ergon\"}",
    );
    let pod_joules = prometheus.query_until_positive(&format!(
        "ergon_pod_energy_joules_total{{pod=\"vehicle-api-7d9f\",pod_uid=\"{}\"}}",
        pod.uid
    ));
    assert!(pod_joules > 0.0);
    prometheus.query_until_positive("up{job=\"ergon\"}");
    // Nothing scraped it in the text format or uncompressed.
    let other = prometheus.query_all(
        "ergon_scrapes_total{format=\"text\"} or ergon_scrapes_total{encoding=\"identity\"}",
    );
    assert!(
        other.is_empty(),
        "Prometheus got what it did not ask for: {other:?}"
    );
}

#[test]
fn curl_decodes_gzip_and_promtool_checks_both_formats() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = TestPod::start("vehicle-pipeline", "influxdb-0", 1);
    let api = Api::start(&[&pod]);
    let exporter = start(&rapl, &api, &["--metrics=node,pod,container,process"]);
    exporter.eventually("the pod's energy is exported", |m| {
        m.sum("ergon_pod_energy_joules_total", &[("pod", "influxdb-0")]) > 0.0
    });

    let (head, text) = curl(exporter.port, "text/plain;version=0.0.4");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(head.contains("vary: accept, accept-encoding"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let metrics = Metrics::parse(&text);
    assert!(metrics.sum("ergon_pod_energy_joules_total", &[("pod", "influxdb-0")]) > 0.0);
    assert!(metrics.sum("ergon_process_energy_joules_total", &[]) > 0.0);
    let (code, findings) = promtool(&text);
    assert_eq!(code, 0, "promtool on the text format: {findings}");

    let (head, openmetrics) = curl(exporter.port, PROMETHEUS_ACCEPT);
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(openmetrics.ends_with("\n# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE ergon_pod_energy_joules counter\n"));
    assert!(openmetrics.contains("# UNIT ergon_pod_energy_joules joules\n"));
    // promtool 2.42 parses the text format only: an OpenMetrics body must
    // parse (exit 1 is a parse error), and the one finding allowed is the
    // format's own difference: a counter's HELP is on its family name,
    // without `_total`, which promtool does not match to the samples.
    let (code, findings) = promtool(&openmetrics);
    assert_ne!(
        code, 1,
        "promtool cannot parse the OpenMetrics body: {findings}"
    );
    for finding in findings.lines() {
        let counter = finding
            .strip_suffix(" no help text")
            .unwrap_or_else(|| panic!("promtool on OpenMetrics: {finding}"));
        let family = counter.strip_suffix("_total").unwrap_or(counter);
        assert!(
            openmetrics.contains(&format!("# HELP {family} ")),
            "{finding}"
        );
    }
    // Both formats hold the same samples.
    let families = |metrics: &Metrics| -> BTreeSet<String> {
        metrics.samples.iter().map(|(n, _, _)| n.clone()).collect()
    };
    assert_eq!(families(&Metrics::parse(&openmetrics)), families(&metrics));
}

/// The metric families of each `--metrics` level.
fn level_of(name: &str) -> Option<&'static str> {
    [
        ("ergon_node_", "node"),
        ("ergon_system_", "node"),
        ("ergon_pod_", "pod"),
        ("ergon_container_", "container"),
        ("ergon_process_", "process"),
    ]
    .into_iter()
    .find(|(prefix, _)| name.starts_with(prefix))
    .map(|(_, level)| level)
}

/// Series per level, and of the families every level keeps.
fn series_by_level(metrics: &Metrics) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for (name, _, _) in &metrics.samples {
        let level = if name.starts_with("ergon_") {
            level_of(name).unwrap_or("always")
        } else {
            "process metrics"
        };
        *counts.entry(level).or_default() += 1;
    }
    counts
}

/// 100 pods, one exporter per level: each exports its level's families and
/// no other level's, and the series counts are printed for README.
#[test]
fn metrics_levels_switch_families_off_for_100_pods() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pods: Vec<TestPod> = (0..100)
        .map(|i| TestPod::start("fleet", &format!("worker-{i:03}"), 0))
        .collect();
    let api = Api::start(&pods.iter().collect::<Vec<_>>());
    let levels = ["node", "pod", "container", "process", "node,pod,container"];
    let exporters: Vec<ExporterProcess> = levels
        .iter()
        .map(|level| start(&rapl, &api, &[&format!("--metrics={level}")]))
        .collect();
    let kepler = start(&rapl, &api, &["--metrics=pod", "--compat=kepler"]);
    // Every pod runs once, after every probe is attached.
    std::thread::sleep(Duration::from_millis(100));
    let runs: Vec<BusyChild> = pods
        .iter()
        .map(|pod| {
            BusyChild::spawn_script_in(
                &pod.cgroup.path,
                "i=0; while [ $i -lt 200 ]; do i=$((i+1)); done",
            )
        })
        .collect();
    // The default exporter sees every pod by name; the others measured the
    // same runs.
    let all_named = |m: &Metrics| {
        m.select("ergon_pod_energy_joules_total", &[])
            .filter(|(labels, _)| labels["namespace"] == "fleet")
            .count()
            >= 100
    };
    exporters[4].eventually("all 100 pods are exported", all_named);
    exporters[1].eventually("all 100 pods are exported at level pod", all_named);
    exporters[2].eventually("all 100 pods' containers are exported", |m| {
        m.select("ergon_container_cpu_seconds_total", &[])
            .filter(|(labels, _)| labels["namespace"] == "fleet")
            .count()
            >= 100
    });
    drop(runs);

    // Kepler's names follow the same levels.
    let kepler = kepler.eventually("Kepler's pod series", |m| {
        m.select("kepler_pod_cpu_joules_total", &[]).count() >= 100
    });
    let kepler_families: BTreeSet<&str> =
        kepler.samples.iter().map(|(n, _, _)| n.as_str()).collect();
    for off in [
        "kepler_node_cpu_joules_total",
        "kepler_node_cpu_info",
        "kepler_container_cpu_joules_total",
        "kepler_container_cpu_seconds_total",
        "kepler_process_cpu_joules_total",
    ] {
        assert!(
            !kepler_families.contains(off),
            "--metrics=pod exported {off}"
        );
    }

    for (level, exporter) in levels.iter().zip(&exporters) {
        let text = exporter.metrics_text();
        let metrics = Metrics::parse(&text);
        let counts = series_by_level(&metrics);
        let chosen: Vec<&str> = level.split(',').collect();
        for (name, _, _) in &metrics.samples {
            if let Some(of) = level_of(name) {
                assert!(
                    chosen.contains(&of),
                    "--metrics={level} exported {name} (level {of})"
                );
            }
        }
        for always in ["ergon_build_info", "ergon_meter_up", "ergon_scrapes_total"] {
            assert!(
                metrics.samples.iter().any(|(n, _, _)| n == always),
                "--metrics={level} lost {always}"
            );
        }
        for of in &chosen {
            assert!(
                counts.get(of).is_some_and(|n| *n > 0),
                "--metrics={level}: {counts:?}"
            );
        }
        eprintln!(
            "series at --metrics={level} with 100 pods: {counts:?}, body {} bytes",
            text.len()
        );
    }
}
