//! End to end: a real Prometheus scraping a real exporter, and every
//! dashboard panel query returning data — against a fixture node here, and
//! against the real cluster of `cargo xtask e2e`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ergon_testkit::pods::{KubeApi, PodFixture};
use serde_json::{Value, json};

use crate::common::*;
use crate::dashboards::*;
use crate::metrics::{COMPONENT_REQUEST_METRICS, MetricOrigin, metric_origin};
use crate::rules::{recording_rule_names, rules_path};
use crate::stack::PIPELINE_COMPONENTS;

/// A child process that is killed and reaped when the guard goes away, on
/// success and on panic alike.
pub struct ChildGuard {
    name: String,
    child: Child,
}

impl ChildGuard {
    fn spawn(name: &str, command: &mut Command, log: &Path) -> ChildGuard {
        let log_file = fs::File::create(log)
            .unwrap_or_else(|error| panic!("creating {}: {error}", log.display()));
        let log_err = log_file.try_clone().expect("clone log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start {name} (`{}`): {error}", describe(command))
            });
        ChildGuard {
            name: name.to_string(),
            child,
        }
    }

    /// Fails with the process' log when it has already exited.
    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET over HTTP/1.0 (the servers then close the connection, no chunking).
/// Returns (status, body).
pub fn http_get(address: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\nHost: {address}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

pub fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `check` until it returns Some or the deadline passes (a readiness
/// deadline for processes starting up, not a timing assertion).
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "gave up waiting for {what} after {deadline:?}"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// Serves the request counters of pipeline components that do not run in
/// the test (Redis' exporter, KServe, InfluxDB, Grafana, MinIO), one path
/// per component, each counter growing on every scrape. Stops on drop.
pub struct ComponentStandIn {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ComponentStandIn {
    fn start() -> ComponentStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let stop_flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut request = [0u8; 4096];
                        let read = stream.read(&mut request).unwrap_or(0);
                        let request = String::from_utf8_lossy(&request[..read]);
                        let path = request.split_whitespace().nth(1).unwrap_or("/");
                        let job = path.trim_start_matches('/');
                        let count = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
                        let body = COMPONENT_REQUEST_METRICS
                            .iter()
                            .find(|(j, _, _)| *j == job)
                            .map(|(_, metric, _)| {
                                let kind = if metric.ends_with("_count") {
                                    "untyped"
                                } else {
                                    "counter"
                                };
                                format!("# TYPE {metric} {kind}\n{metric} {}\n", count * 7)
                            });
                        let response = match body {
                            Some(body) => format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            ),
                            None => {
                                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                            }
                        };
                        let _ = stream.write_all(response.as_bytes());
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ComponentStandIn {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ComponentStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Metric names in a Prometheus text exposition.
pub fn exposition_metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            line.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

pub fn prometheus_query(address: SocketAddr, query: &str) -> Result<Vec<Value>, String> {
    let (status, body) = http_get(
        address,
        &format!("/api/v1/query?query={}", url_encode(query)),
    )
    .map_err(|error| format!("request failed: {error}"))?;
    let answer: Value =
        serde_json::from_str(&body).map_err(|error| format!("HTTP {status}: {error}: {body}"))?;
    if answer["status"] != "success" {
        return Err(format!("HTTP {status}: {}", answer["error"]));
    }
    let result = &answer["data"]["result"];
    Ok(match answer["data"]["resultType"].as_str() {
        Some("scalar") | Some("string") => vec![result.clone()],
        _ => result.as_array().cloned().unwrap_or_default(),
    })
}

/// The values of a `label_values(selector, label)` variable, from the live
/// Prometheus.
pub fn label_values(address: SocketAddr, definition: &str) -> Result<Vec<String>, String> {
    let selector = label_values_selector(definition)
        .ok_or_else(|| format!("unsupported variable query `{definition}`"))?;
    let label = label_values_label(definition).unwrap_or_default();
    let path = format!(
        "/api/v1/label/{label}/values?match[]={}",
        url_encode(selector)
    );
    let (status, body) = http_get(address, &path).map_err(|e| e.to_string())?;
    let answer: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}"))?;
    Ok(answer["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect())
}

/// Fills every variable of a dashboard from the live Prometheus: query
/// variables take their first live value (or `.*` where the dashboard
/// offers All), others their default.
pub fn live_variable_values(
    address: SocketAddr,
    variables: &[TemplateVariable],
    dashboard: &str,
) -> Result<BTreeMap<String, String>, String> {
    let mut values = builtin_variable_values();
    for variable in variables.iter().filter(|v| v.dashboard == dashboard) {
        let value = match variable.kind.as_str() {
            "datasource" => "prometheus".to_string(),
            "query" => {
                let definition = substitute_template_variables(&variable.query, &values);
                let live = label_values(address, &definition)?;
                let first = live.first().ok_or_else(|| {
                    format!("variable {} (`{definition}`) has no values", variable.name)
                })?;
                if variable.include_all {
                    ".*".to_string()
                } else {
                    first.clone()
                }
            }
            _ => variable.query.clone(),
        };
        values.insert(variable.name.clone(), value);
    }
    Ok(values)
}

/// The end-to-end check against a running exporter at `exporter` and a
/// Prometheus at `prometheus` that scrapes it (job `ergon`), itself (job
/// `prometheus`) and the component jobs, and loads the rules. Returns every
/// problem found (empty: all good).
pub fn live_check(repo: &Path, exporter: SocketAddr, prometheus: SocketAddr) -> Vec<String> {
    live_check_dashboards(repo, exporter, prometheus, |_| true)
}

/// [`live_check`] over the dashboards whose file name `include` accepts.
pub fn live_check_dashboards(
    repo: &Path,
    exporter: SocketAddr,
    prometheus: SocketAddr,
    include: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    // 1. Every metric name the dashboards and rules use exists.
    let metrics = match http_get(exporter, "/metrics") {
        Ok((200, body)) => exposition_metric_names(&body),
        Ok((status, body)) => return vec![format!("exporter /metrics answered {status}: {body}")],
        Err(error) => return vec![format!("exporter /metrics: {error}")],
    };
    let recording = recording_rule_names();
    for (name, places) in referenced_metric_names(repo) {
        let present = match metric_origin(&name, &recording) {
            Some(MetricOrigin::Exporter) | None => metrics.contains(&name),
            Some(MetricOrigin::RecordingRule) | Some(MetricOrigin::PrometheusItself) => true,
            Some(MetricOrigin::Component(_)) => true,
        };
        if !present {
            problems.push(format!(
                "metric {name} is not in the exporter's /metrics (used in {places:?})"
            ));
        }
    }
    // 2. Every panel query, variables filled from live values, returns data.
    let variables = dashboard_variables(repo);
    for query in dashboard_queries(repo)
        .into_iter()
        .filter(|q| include(&q.dashboard))
    {
        let values = match live_variable_values(prometheus, &variables, &query.dashboard) {
            Ok(values) => values,
            Err(error) => {
                problems.push(format!("{}: {error}", query.dashboard));
                continue;
            }
        };
        let filled = substitute_template_variables(&query.expr, &values);
        match prometheus_query(prometheus, &filled) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => problems.push(format!("{}: no data for `{filled}`", query.location())),
            Err(error) => problems.push(format!("{}: `{filled}`: {error}", query.location())),
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

#[test]
pub fn live_dashboards_and_rules_return_data_from_a_real_exporter() {
    let Some(ergon_bin) = std::env::var_os("ERGON_BIN") else {
        eprintln!(
            "SKIPPED live_dashboards_and_rules_return_data_from_a_real_exporter: ERGON_BIN is \
             not set (cargo xtask test sets it to the built exporter)"
        );
        return;
    };
    let repo = repo_root();
    let dir = tempfile::tempdir().expect("temp dir");
    // A node's worth of fixtures: every pipeline component as a pod-shaped
    // cgroup with a busy process, the Kubernetes API describing them, and
    // a powercap tree ticking at 60 W.
    let rapl = ergon_testkit::FakeRapl::start(60.0);
    let pods: Vec<PodFixture> = pipeline_pod_names()
        .iter()
        .map(|(namespace, name)| PodFixture::start(namespace, name, 1))
        .collect();
    let api = KubeApi::start(&pods.iter().collect::<Vec<_>>());
    let exporter_port = free_port();
    let exporter_address: SocketAddr = format!("127.0.0.1:{exporter_port}").parse().unwrap();
    let exporter_log = dir.path().join("ergon.log");
    let carbon_file = dir.path().join("grid-intensity");
    fs::write(&carbon_file, "350\n").expect("write the carbon intensity file");
    let mut exporter_command = Command::new(&ergon_bin);
    exporter_command.arg(format!("--listen=127.0.0.1:{exporter_port}"));
    exporter_command.args([
        rapl.host_sys_arg(),
        format!("--cgroup-root={}", ergon_testkit::cgroup2_root().display()),
        ergon_testkit::kubelet_cgroup_root_arg(),
        "--meter=rapl".into(),
        "--idle-watts=package=15".into(),
        "--interval=1s".into(),
        // Its own state, not the machine's /var/lib/ergon.
        format!("--state-dir={}", dir.path().join("state").display()),
        format!("--kube-api={}", api.url()),
        format!("--node-name={}", ergon_testkit::pods::NODE),
        // The CO2e panels and rules multiply by the exporter's intensity; a
        // file (as a CronJob keeps it) also gives its timestamp.
        format!("--carbon-intensity={}", carbon_file.display()),
    ]);
    let mut exporter = ChildGuard::spawn("ergon", &mut exporter_command, &exporter_log);
    wait_for("the exporter's /readyz", Duration::from_secs(60), || {
        exporter.assert_running(&exporter_log);
        match http_get(exporter_address, "/readyz") {
            Ok((200, _)) => Some(()),
            _ => None,
        }
    });

    let stand_in = ComponentStandIn::start();

    // Prometheus: 1 s scrapes and rule evaluations (the rules' own group
    // intervals are overridden so the test need not wait a minute).
    let prometheus_port = free_port();
    let prometheus_address: SocketAddr = format!("127.0.0.1:{prometheus_port}").parse().unwrap();
    let mut rules: Value =
        serde_yaml::from_str(&fs::read_to_string(rules_path()).unwrap()).unwrap();
    for group in rules["groups"].as_array_mut().unwrap() {
        group["interval"] = json!("1s");
    }
    let rules_file = dir.path().join("ergon.rules.yaml");
    fs::write(&rules_file, serde_yaml::to_string(&rules).unwrap()).unwrap();
    let mut scrape_configs = vec![
        json!({"job_name": "ergon", "static_configs": [{"targets": [exporter_address.to_string()]}]}),
        json!({"job_name": "prometheus", "static_configs": [{"targets": [prometheus_address.to_string()]}]}),
    ];
    for (job, _, _) in COMPONENT_REQUEST_METRICS
        .iter()
        .filter(|(job, _, _)| *job != "prometheus")
    {
        scrape_configs.push(json!({
            "job_name": job,
            "metrics_path": format!("/{job}"),
            "static_configs": [{"targets": [stand_in.address.to_string()]}],
        }));
    }
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules_file.display().to_string()],
        "scrape_configs": scrape_configs,
    });
    let config_file = dir.path().join("prometheus.yml");
    fs::write(&config_file, serde_yaml::to_string(&config).unwrap()).unwrap();
    run_ok(
        Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(&config_file),
    );
    let prometheus_log = dir.path().join("prometheus.log");
    let mut prometheus = ChildGuard::spawn(
        "prometheus",
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus_address}")),
        &prometheus_log,
    );
    // Enough samples for rate() over the filled $__rate_interval, and the
    // recording rules evaluated at least once.
    wait_for("Prometheus to hold data", Duration::from_secs(120), || {
        prometheus.assert_running(&prometheus_log);
        exporter.assert_running(&exporter_log);
        let samples = prometheus_query(
            prometheus_address,
            r#"count_over_time(up{job="ergon"}[1m]) >= 5"#,
        )
        .ok()?;
        let rule = prometheus_query(
            prometheus_address,
            "namespace:ergon_pod_energy_kwh:increase1d",
        )
        .ok()?;
        (!samples.is_empty() && !rule.is_empty()).then_some(())
    });

    let problems = live_check(&repo, exporter_address, prometheus_address);
    assert!(
        problems.is_empty(),
        "dashboards and rules against the live exporter:\n{}\n(the pipeline dashboard needs \
         pods named like {:?} in the exporter's metrics)",
        problems.join("\n"),
        pipeline_pod_names()
    );
    drop(prometheus);
    drop(stand_in);
    drop(exporter);
    drop(api);
    drop(pods);
}

/// An address `cargo xtask e2e` passes to the tests it runs on its cluster.
fn cluster_address(name: &str) -> SocketAddr {
    cluster_setting(name)
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not an address (127.0.0.1:PORT): {e}"))
}

fn cluster_setting(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run this test through `cargo xtask e2e`"))
}

/// The same dashboards and rules against the real single-node cluster of
/// `cargo xtask e2e`, which runs this test once its exporter pod and
/// Prometheus (pod discovery through the apiserver, the chart's rules) hold
/// data. The pipeline dashboard is left out: its panels need the pipeline's
/// own request counters, which the cluster does not run.
#[test]
#[ignore = "needs the cluster of `cargo xtask e2e`, which runs it with ERGON_E2E_EXPORTER and \
            ERGON_E2E_PROMETHEUS set"]
pub fn cluster_dashboards_and_rules_return_data() {
    let (exporter, prometheus) = (
        cluster_address("ERGON_E2E_EXPORTER"),
        cluster_address("ERGON_E2E_PROMETHEUS"),
    );
    let include = |dashboard: &str| !dashboard.contains("vehicle-pipeline");
    let checked = dashboard_queries(&repo_root())
        .iter()
        .filter(|q| include(&q.dashboard))
        .count();
    eprintln!("checking {checked} panel queries against the cluster's Prometheus");
    assert!(
        checked >= 10,
        "only {checked} panel queries found in dashboards/"
    );
    let problems = live_check_dashboards(&repo_root(), exporter, prometheus, include);
    assert!(
        problems.is_empty(),
        "dashboards and rules against the e2e cluster:\n{}",
        problems.join("\n")
    );
}

/// The pipeline dashboard against the cluster of `cargo xtask e2e` once it
/// runs part of the stack (ERGON_E2E_PIPELINE_COMPONENTS, by dashboard
/// component name). Every panel query returns data; the panels by
/// component give each running component its own series, above zero; the
/// joules-per-request panel has a series for each component whose request
/// counter the cluster's Prometheus scrapes
/// (ERGON_E2E_PIPELINE_REQUEST_COUNTERS).
#[test]
#[ignore = "needs the cluster of `cargo xtask e2e` running the stack, which runs it with \
            ERGON_E2E_PROMETHEUS and ERGON_E2E_PIPELINE_* set"]
fn cluster_pipeline_dashboard_shows_each_running_component() {
    let prometheus = cluster_address("ERGON_E2E_PROMETHEUS");
    let list = |name: &str| -> Vec<String> {
        cluster_setting(name)
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let running = list("ERGON_E2E_PIPELINE_COMPONENTS");
    let counted = list("ERGON_E2E_PIPELINE_REQUEST_COUNTERS");
    for component in running.iter().chain(&counted) {
        assert!(
            PIPELINE_COMPONENTS.contains(&component.as_str()),
            "{component} is not a pipeline component ({PIPELINE_COMPONENTS:?})"
        );
    }
    let repo = repo_root();
    let dashboard = "ergon-vehicle-pipeline.json";
    let variables = dashboard_variables(&repo);
    let queries: Vec<PanelQuery> = dashboard_queries(&repo)
        .into_iter()
        .filter(|q| q.dashboard == dashboard)
        .collect();
    assert!(
        queries.iter().any(|q| q.legend == "{{component}}"),
        "{dashboard} has no panel by component"
    );
    // The counters need a few scrapes of the new pods before rate() and
    // increase() over the panels' ranges see them move.
    let deadline = Instant::now() + Duration::from_secs(180);
    let shown = loop {
        match pipeline_panels(prometheus, &variables, &queries, &running, &counted) {
            Ok(shown) => break shown,
            Err(problems) if Instant::now() > deadline => panic!(
                "the pipeline dashboard against the e2e cluster, after 180 s:\n{}",
                problems.join("\n")
            ),
            Err(_) => thread::sleep(Duration::from_secs(5)),
        }
    };
    for (panel, by_component) in shown {
        for (component, value) in by_component {
            eprintln!("{dashboard} / {panel}: {component} = {value:.4e}");
        }
    }
}

/// A panel's title and its value per component.
type PanelValues = (String, BTreeMap<String, f64>);

/// Runs every panel query of the pipeline dashboard; returns, per panel by
/// component, each component's value, or every problem found.
fn pipeline_panels(
    prometheus: SocketAddr,
    variables: &[TemplateVariable],
    queries: &[PanelQuery],
    running: &[String],
    counted: &[String],
) -> Result<Vec<PanelValues>, Vec<String>> {
    let values = live_variable_values(prometheus, variables, "ergon-vehicle-pipeline.json")
        .map_err(|error| vec![error])?;
    let mut problems = Vec::new();
    let mut shown = Vec::new();
    for query in queries {
        let filled = substitute_template_variables(&query.expr, &values);
        let result = match prometheus_query(prometheus, &filled) {
            Ok(result) => result,
            Err(error) => {
                problems.push(format!("{}: `{filled}`: {error}", query.location()));
                continue;
            }
        };
        let value_of = |series: &Value| -> f64 {
            series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        if query.legend == "{{component}}" {
            let by_component: BTreeMap<String, f64> = result
                .iter()
                .map(|series| {
                    (
                        series["metric"]["component"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        value_of(series),
                    )
                })
                .collect();
            for component in running {
                match by_component.get(component) {
                    Some(value) if *value > 0.0 => {}
                    other => problems.push(format!(
                        "{}: component {component} runs but shows {other:?} (all: {by_component:?})",
                        query.location()
                    )),
                }
            }
            shown.push((query.panel.clone(), by_component));
        } else if PIPELINE_COMPONENTS.contains(&query.legend.as_str()) {
            // Joules per request: one target per component.
            if counted.contains(&query.legend) {
                match result.first().map(value_of) {
                    Some(value) if value.is_finite() && value > 0.0 => shown.push((
                        query.panel.clone(),
                        BTreeMap::from([(query.legend.clone(), value)]),
                    )),
                    other => problems.push(format!(
                        "{}: {} has a scraped request counter but shows {other:?} for `{filled}`",
                        query.location(),
                        query.legend
                    )),
                }
            }
        } else if result.is_empty() {
            problems.push(format!("{}: no data for `{filled}`", query.location()));
        }
    }
    if problems.is_empty() {
        Ok(shown)
    } else {
        Err(problems)
    }
}
