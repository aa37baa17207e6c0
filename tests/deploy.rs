//! Deployment checks: the Helm chart and kustomize bases in `daemonset/`, the
//! Grafana dashboards in `dashboards/`, and the vehicle pipeline in `stack/`,
//! proven with the real tools rather than by reading YAML by eye.
//!
//! Why each check exists:
//! - `helm lint --strict`, `helm template` and `kubectl kustomize` are what an
//!   operator runs; a chart that lints but renders an object the API server
//!   would reject is caught by validating every rendered object against the
//!   `kubernetes-models` schemas (CRDs included), and against their
//!   TypeScript interfaces for unknown fields, which the OpenAPI schemas
//!   let through (a misspelt `hostPid` would otherwise pass). A
//!   deliberately broken object of every schema family must fail, so the
//!   validator is known to bite.
//! - The same exporter ships as a chart and as a kustomize base. The base is
//!   kept equal to the chart's render (minus Helm's own labels), variant by
//!   variant, so the two cannot drift.
//! - Ports, Service names and Secrets are cross-references that no schema
//!   checks: the DaemonSet, Service, ServiceMonitor, scrape annotations,
//!   Prometheus configuration and the exporter's default port must agree;
//!   every datasource URL, DNS discovery name and Ingress backend must name a
//!   Service the stack defines; every Secret the stack references must be
//!   documented for the operator and none may be committed.
//! - `promtool` (Debian's `prometheus` package) checks the rules, the stack's
//!   Prometheus configuration, and every dashboard query's syntax (each is
//!   wrapped as a recording rule).
//! - The end-to-end check needs the exporter binary: `ERGON_BIN` names it.
//!   A real Prometheus scrapes it and every dashboard panel query, with its
//!   template variables filled from the live label values, must return data;
//!   every metric name the dashboards and rules use must be in the
//!   exporter's real `/metrics`. Without `ERGON_BIN` that test says so on
//!   stderr and passes; `cargo xtask test` always sets it.
//!
//! Tools are found in `<repo>/.tools/` (installed by `tests/setup-tools.sh`,
//! which `cargo xtask setup` runs) or on PATH.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ergon_testkit::pods::{KubeApi, PodFixture};
use serde::Deserialize;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Contract facts and tables
// ---------------------------------------------------------------------------

/// The exporter's default port as the exporter contract states it. Used only
/// while `exporter/src/config.rs` does not yet define `DEFAULT_PORT`; once it
/// does, [`exporter_default_port`] reads the constant from there.
const CONTRACT_DEFAULT_PORT: u16 = 9102;

/// Namespace the stack deploys the pipeline into; the dashboards default to it.
const PIPELINE_NAMESPACE: &str = "vehicle-pipeline";

/// Pipeline components and the pod-name prefix that identifies each one's
/// pods in Ergon's metrics (see dashboards/ergon-vehicle-pipeline.json).
const PIPELINE_COMPONENTS: [&str; 8] = [
    "vehicle-api",
    "redis",
    "inference",
    "influxdb",
    "grafana",
    "prometheus",
    "mlflow",
    "minio",
];

/// Request counters of pipeline components that the dashboards divide energy
/// by: (Prometheus job in the stack, metric name, where the metric comes
/// from). Prometheus' own counter is real in the end-to-end test (it scrapes
/// itself); the others are served there by a stand-in for the component.
const COMPONENT_REQUEST_METRICS: [(&str, &str, &str); 6] = [
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
const PROMETHEUS_SYNTHETIC_METRICS: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// The exporter's metric catalogue as the contract lists it. Dashboards and
/// rules may use only these (checked statically); the end-to-end test checks
/// them against the real `/metrics`.
const EXPORTER_METRICS: [&str; 23] = [
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

// ---------------------------------------------------------------------------
// Paths, tools, processes
// ---------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Finds a tool in `<repo>/.tools/bin` or on PATH, or fails naming the fix.
fn tool(name: &str) -> PathBuf {
    let local = repo_root().join(".tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "`{name}` is neither in {} nor on PATH: run `cargo xtask setup` \
         (it runs tests/setup-tools.sh, which installs helm, kubectl, the \
         kubernetes-models validators and promtool)",
        repo_root().join(".tools/bin").display()
    );
}

/// The validators' node_modules, installed by tests/setup-tools.sh.
fn validator_modules() -> PathBuf {
    let modules = repo_root().join(".tools/validate/node_modules");
    assert!(
        modules.join("kubernetes-models").is_dir(),
        "the kubernetes-models validators are not installed in {}: run \
         `cargo xtask setup` (tests/setup-tools.sh)",
        modules.display()
    );
    modules
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command to completion and returns its output, whatever its status.
fn run_command(command: &mut Command, stdin: Option<&[u8]>) -> Output {
    let what = describe(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{what}`: {error}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_vec();
        // Written from a thread: the child may fill stdout before reading
        // all of stdin.
        let writer = thread::spawn(move || pipe.write_all(&input));
        let output = child
            .wait_with_output()
            .unwrap_or_else(|error| panic!("`{what}` failed to run: {error}"));
        writer
            .join()
            .expect("stdin writer thread")
            .unwrap_or_else(|error| panic!("writing stdin of `{what}`: {error}"));
        return output;
    }
    child
        .wait_with_output()
        .unwrap_or_else(|error| panic!("`{what}` failed to run: {error}"))
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(command: &mut Command) -> String {
    let what = describe(command);
    let output = run_command(command, None);
    assert!(
        output.status.success(),
        "`{what}` failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|_| panic!("`{what}` printed non-UTF-8"))
}

/// A child process that is killed and reaped when the guard goes away, on
/// success and on panic alike.
struct ChildGuard {
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

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// A rendered Kubernetes object and where it came from.
#[derive(Clone, Debug)]
struct Rendered {
    source: String,
    object: Value,
}

impl Rendered {
    fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"].as_str().unwrap_or("")
    }
}

/// Parses a multi-document YAML stream into JSON values (empty documents
/// dropped).
fn parse_yaml_stream(text: &str, source: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value: serde_yaml::Value = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|error| panic!("{source}: invalid YAML: {error}"));
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .unwrap_or_else(|error| panic!("{source}: YAML not representable as JSON: {error}"));
        objects.push(json);
    }
    objects
}

/// The objects of a rendered YAML stream, each tagged with its source.
fn rendered_objects(text: &str, source: &str) -> Vec<Rendered> {
    parse_yaml_stream(text, source)
        .into_iter()
        .map(|object| Rendered {
            source: source.to_string(),
            object,
        })
        .collect()
}

fn chart_dir() -> PathBuf {
    repo_root().join("daemonset/helm/ergon")
}

/// The chart's variants: the default values and each `ci/*-values.yaml`.
fn helm_variants() -> Vec<(String, Option<PathBuf>)> {
    let mut variants = vec![("default".to_string(), None)];
    let mut files: Vec<PathBuf> = fs::read_dir(chart_dir().join("ci"))
        .expect("daemonset/helm/ergon/ci exists")
        .map(|entry| entry.expect("readable ci/ entry").path())
        .filter(|path| path.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches("-values.yaml")
            .to_string();
        variants.push((name, Some(file)));
    }
    variants
}

const HELM_RELEASE: &str = "ergon";
const HELM_NAMESPACE: &str = "ergon-system";

fn helm_template(values: Option<&Path>) -> Vec<Rendered> {
    helm_template_with(HELM_NAMESPACE, values, &[])
}

/// `helm template` of release `ergon` into `namespace`, with a values file
/// and `--set` overrides.
fn helm_template_with(namespace: &str, values: Option<&Path>, sets: &[&str]) -> Vec<Rendered> {
    let mut command = Command::new(tool("helm"));
    command
        .arg("template")
        .arg(HELM_RELEASE)
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    if let Some(values) = values {
        command.arg("--values").arg(values);
    }
    for set in sets {
        command.args(["--set", set]);
    }
    let source = format!(
        "helm template -n {namespace} ({}{})",
        values.map_or("default values".to_string(), |v| v.display().to_string()),
        sets.iter()
            .map(|s| format!(", --set {s}"))
            .collect::<String>()
    );
    let text = run_ok(&mut command);
    rendered_objects(&text, &source)
}

/// Every directory under daemonset/, dashboards/ and stack/ that holds a
/// kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("readable directory entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path
                .file_name()
                .is_some_and(|name| name == "kustomization.yaml")
            {
                found.push(path.parent().unwrap().to_path_buf());
            }
        }
    }
    let mut found = Vec::new();
    for top in ["daemonset", "dashboards", "stack"] {
        walk(&repo_root().join(top), &mut found);
    }
    found.sort();
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn kustomize(dir: &Path) -> Vec<Rendered> {
    let text = run_ok(Command::new(tool("kubectl")).arg("kustomize").arg(dir));
    let source = format!("kubectl kustomize {}", relative(dir));
    rendered_objects(&text, &source)
}

fn stack_render() -> Vec<Rendered> {
    kustomize(&repo_root().join("stack/base"))
}

// ---------------------------------------------------------------------------
// Schema validation (tests/validate/validate.mjs)
// ---------------------------------------------------------------------------

/// One object's validation result.
#[derive(Debug)]
struct Validation {
    source: String,
    kind: String,
    name: String,
    validator: Option<String>,
    errors: Vec<String>,
}

/// Validates objects with the kubernetes-models validators (and the KServe
/// schema in tests/validate/schemas). Returns one result per object.
fn validate_objects(objects: &[Rendered]) -> Vec<Validation> {
    let input: Vec<Value> = objects
        .iter()
        .map(|rendered| json!({"source": rendered.source, "object": rendered.object}))
        .collect();
    let input = serde_json::to_vec(&input).expect("serialise objects");
    let script = repo_root().join("tests/validate/validate.mjs");
    let mut command = Command::new(tool("node"));
    command.arg(&script).arg(validator_modules());
    let output = run_command(&mut command, Some(&input));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let results: Vec<Validation> = stdout
        .lines()
        .map(|line| {
            let report: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("validator printed `{line}`: {error}"));
            Validation {
                source: report["source"].as_str().unwrap_or("").to_string(),
                kind: report["kind"].as_str().unwrap_or("").to_string(),
                name: report["name"].as_str().unwrap_or("").to_string(),
                validator: report["validator"].as_str().map(str::to_string),
                errors: report["errors"]
                    .as_array()
                    .map(|errors| {
                        errors
                            .iter()
                            .map(|e| e.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    assert_eq!(
        results.len(),
        objects.len(),
        "the validator answered for {} of {} objects (exit {}); stderr:\n{}",
        results.len(),
        objects.len(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let any_invalid = results.iter().any(|result| !result.errors.is_empty());
    assert_eq!(
        output.status.code(),
        Some(if any_invalid { 1 } else { 0 }),
        "validator exit status disagrees with its reports; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    results
}

fn assert_all_valid(objects: &[Rendered]) {
    assert!(!objects.is_empty(), "nothing was rendered");
    let failures: Vec<String> = validate_objects(objects)
        .into_iter()
        .filter(|result| !result.errors.is_empty())
        .map(|result| {
            format!(
                "{}: {} {}: {}",
                result.source,
                result.kind,
                result.name,
                result.errors.join("; ")
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "objects failed schema validation:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Tests: rendering and schemas
// ---------------------------------------------------------------------------

#[test]
fn helm_lint_strict_passes_for_every_variant() {
    for (name, values) in helm_variants() {
        let mut command = Command::new(tool("helm"));
        command.args(["lint", "--strict"]).arg(chart_dir());
        if let Some(values) = &values {
            command.arg("--values").arg(values);
        }
        let output = run_ok(&mut command);
        assert!(
            output.contains("0 chart(s) failed"),
            "helm lint for variant {name} did not report success:\n{output}"
        );
    }
}

#[test]
fn every_chart_variant_is_documented() {
    let readme = fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    for (name, values) in helm_variants() {
        if let Some(values) = values {
            let file = format!("ci/{}", values.file_name().unwrap().to_string_lossy());
            assert!(
                readme.contains(&file),
                "variant {name} ({file}) is not described in daemonset/helm/ergon/README.md"
            );
        }
    }
}

#[test]
fn helm_template_renders_valid_objects_for_every_variant() {
    let mut all = Vec::new();
    for (name, values) in helm_variants() {
        let rendered = helm_template(values.as_deref());
        let kinds: BTreeSet<&str> = rendered.iter().map(Rendered::kind).collect();
        for required in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Service",
        ] {
            assert!(
                kinds.contains(required),
                "variant {name} renders no {required} (kinds: {kinds:?})"
            );
        }
        all.extend(rendered);
    }
    assert_all_valid(&all);
}

#[test]
fn kustomize_builds_valid_objects_for_every_kustomization() {
    let dirs = kustomizations();
    for expected in [
        "daemonset/kustomize/base",
        "daemonset/kustomize/overlays/least-privilege",
        "daemonset/kustomize/overlays/no-operator",
        "stack/base",
        "stack/overlays/istio",
        "dashboards",
    ] {
        assert!(
            dirs.contains(&repo_root().join(expected)),
            "{expected} has no kustomization.yaml"
        );
    }
    for component in PIPELINE_COMPONENTS {
        assert!(
            dirs.contains(&repo_root().join("stack/components").join(component)),
            "pipeline component {component} cannot be deployed alone: no stack/components/{component}/kustomization.yaml"
        );
    }
    let mut all = Vec::new();
    for dir in &dirs {
        let rendered = kustomize(dir);
        assert!(!rendered.is_empty(), "{} renders nothing", relative(dir));
        all.extend(rendered);
    }
    assert_all_valid(&all);
}

#[test]
fn crds_are_checked_by_their_own_validators() {
    let mut objects = stack_render();
    objects.extend(kustomize(&repo_root().join("stack/overlays/istio")));
    objects.extend(helm_template(None));
    let results = validate_objects(&objects);
    let validator_of = |kind: &str| -> BTreeSet<String> {
        results
            .iter()
            .filter(|result| result.kind == kind)
            .filter_map(|result| result.validator.clone())
            .collect()
    };
    for (kind, expected) in [
        ("ServiceMonitor", "@kubernetes-models/prometheus-operator"),
        ("PrometheusRule", "@kubernetes-models/prometheus-operator"),
        ("PeerAuthentication", "@kubernetes-models/istio"),
        ("AuthorizationPolicy", "@kubernetes-models/istio"),
        (
            "InferenceService",
            "inferenceservice.serving.kserve.io.v1beta1.json",
        ),
        ("DaemonSet", "kubernetes-models"),
    ] {
        let validators = validator_of(kind);
        assert!(
            !validators.is_empty() && validators.iter().all(|v| v.contains(expected)),
            "{kind} objects were validated by {validators:?}, expected {expected}"
        );
    }
}

/// A valid object of each schema family, the same object broken in one
/// field, and what the break is. The valid one must pass and the broken one
/// fail: the validator bites, and it bites on the break.
fn broken_manifest_cases() -> Vec<(&'static str, Value, Value)> {
    let daemonset = |port: Value, host_pid: Value| {
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "ergon"},
            "spec": {
                "selector": {"matchLabels": {"app": "ergon"}},
                "template": {
                    "metadata": {"labels": {"app": "ergon"}},
                    "spec": {"hostPID": host_pid, "containers": [{
                        "name": "ergon", "image": "ergon:1",
                        "ports": [{"name": "metrics", "containerPort": port}]
                    }]}
                }
            }
        })
    };
    let service_monitor = |interval: &str| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "ergon"},
            "spec": {"selector": {"matchLabels": {"app": "ergon"}},
                     "endpoints": [{"port": "metrics", "interval": interval}]}
        })
    };
    let rule = |expr: Value| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "ergon"},
            "spec": {"groups": [{"name": "g", "rules": [{"record": "a:b", "expr": expr}]}]}
        })
    };
    let peer = |mode: &str| {
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"mode": mode}}
        })
    };
    let isvc = |model: Value| {
        json!({
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "inference"},
            "spec": {"predictor": {"model": model}}
        })
    };
    let service = |port: Value| {
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ergon"},
            "spec": {"ports": [{"name": "metrics", "port": port}]}
        })
    };
    vec![
        (
            "DaemonSet containerPort given as a string",
            daemonset(json!(9102), json!(true)),
            daemonset(json!("9102"), json!(true)),
        ),
        (
            "DaemonSet hostPID given as a string",
            daemonset(json!(9102), json!(true)),
            daemonset(json!(9102), json!("yes")),
        ),
        (
            "DaemonSet field misspelt (hostPid)",
            daemonset(json!(9102), json!(true)),
            {
                let mut broken = daemonset(json!(9102), json!(true));
                let spec = broken["spec"]["template"]["spec"].as_object_mut().unwrap();
                spec.remove("hostPID");
                spec.insert("hostPid".to_string(), json!(true));
                broken
            },
        ),
        (
            "ServiceMonitor endpoint field misspelt (relabellings)",
            service_monitor("30s"),
            {
                let mut broken = service_monitor("30s");
                broken["spec"]["endpoints"][0]["relabellings"] = json!([]);
                broken
            },
        ),
        (
            "Service port missing (null)",
            service(json!(9102)),
            service(Value::Null),
        ),
        (
            "ServiceMonitor interval not a duration",
            service_monitor("30s"),
            service_monitor("every 30 seconds"),
        ),
        (
            "PrometheusRule expr of the wrong type",
            rule(json!("up")),
            rule(json!({"query": "up"})),
        ),
        (
            "PeerAuthentication mode not an mTLS mode",
            peer("STRICT"),
            peer("STRICTEST"),
        ),
        (
            "InferenceService model without modelFormat",
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/m/1"})),
            isvc(json!({"storageUri": "s3://models/m/1"})),
        ),
        (
            "InferenceService field misspelt (storageURI)",
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/m/1"})),
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageURI": "s3://models/m/1"})),
        ),
        (
            "InferenceService embedded Kubernetes type broken (resources.requests)",
            isvc(
                json!({"modelFormat": {"name": "sklearn"}, "resources": {"requests": {"cpu": "1"}}}),
            ),
            isvc(json!({"modelFormat": {"name": "sklearn"}, "resources": {"requests": "1 cpu"}})),
        ),
    ]
}

#[test]
fn validator_rejects_broken_manifests() {
    let cases = broken_manifest_cases();
    let mut objects = Vec::new();
    for (what, valid, broken) in &cases {
        objects.push(Rendered {
            source: format!("valid: {what}"),
            object: valid.clone(),
        });
        objects.push(Rendered {
            source: format!("broken: {what}"),
            object: broken.clone(),
        });
    }
    objects.push(Rendered {
        source: "broken: a kind nobody validates".to_string(),
        object: json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    });
    let results = validate_objects(&objects);
    for result in &results {
        if result.source.starts_with("valid: ") {
            assert!(
                result.errors.is_empty(),
                "{} was rejected: {:?}",
                result.source,
                result.errors
            );
        } else {
            assert!(
                !result.errors.is_empty(),
                "{} passed validation: the validator does not bite",
                result.source
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Tests: chart ≡ kustomize, cross-references
// ---------------------------------------------------------------------------

/// Drops what Helm adds and kustomize does not (its own labels), and the
/// Namespace object the kustomize base carries.
fn normalised(objects: &[Rendered]) -> BTreeMap<(String, String), Value> {
    let mut by_id = BTreeMap::new();
    for rendered in objects {
        if rendered.kind() == "Namespace" {
            continue;
        }
        let mut object = rendered.object.clone();
        let strip = |metadata: &mut Value| {
            if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove("helm.sh/chart");
                labels.remove("app.kubernetes.io/managed-by");
            }
        };
        strip(&mut object["metadata"]);
        if object["spec"]["template"]["metadata"].is_object() {
            strip(&mut object["spec"]["template"]["metadata"]);
        }
        by_id.insert(
            (rendered.kind().to_string(), rendered.name().to_string()),
            object,
        );
    }
    by_id
}

#[test]
fn kustomize_base_and_overlays_equal_the_chart_variants() {
    for (values, dir) in [
        (None, "daemonset/kustomize/base"),
        (
            Some("ci/least-privilege-values.yaml"),
            "daemonset/kustomize/overlays/least-privilege",
        ),
        (
            Some("ci/no-operator-values.yaml"),
            "daemonset/kustomize/overlays/no-operator",
        ),
    ] {
        let helm = normalised(&helm_template(
            values.map(|v| chart_dir().join(v)).as_deref(),
        ));
        let kustomized = normalised(&kustomize(&repo_root().join(dir)));
        let helm_ids: BTreeSet<_> = helm.keys().collect();
        let kustomize_ids: BTreeSet<_> = kustomized.keys().collect();
        assert_eq!(
            helm_ids, kustomize_ids,
            "{dir} and the chart ({values:?}) render different objects"
        );
        for (id, object) in &helm {
            assert_eq!(
                object, &kustomized[id],
                "{dir}: {id:?} differs from the chart's render with {values:?}; change both together"
            );
        }
    }
}

/// The exporter's default port: `DEFAULT_PORT` in exporter/src/config.rs,
/// or the contract's value while that constant does not exist yet.
fn exporter_default_port() -> u16 {
    let config = repo_root().join("exporter/src/config.rs");
    let source = fs::read_to_string(&config).unwrap_or_default();
    let declaration = source
        .lines()
        .find(|line| line.contains("const DEFAULT_PORT"));
    match declaration {
        Some(line) => {
            let value = line
                .split('=')
                .nth(1)
                .map(|rest| rest.trim().trim_end_matches(';').trim().replace('_', ""))
                .unwrap_or_default();
            value.parse().unwrap_or_else(|_| {
                panic!(
                    "{}: cannot read a u16 from `{}`",
                    config.display(),
                    line.trim()
                )
            })
        }
        None => {
            eprintln!(
                "note: {} defines no DEFAULT_PORT yet; using the contract's {CONTRACT_DEFAULT_PORT}",
                config.display()
            );
            CONTRACT_DEFAULT_PORT
        }
    }
}

fn find<'a>(objects: &'a [Rendered], kind: &str, name: &str) -> &'a Rendered {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

#[test]
fn exporter_ports_agree_everywhere() {
    let port = exporter_default_port();
    let values: Value = serde_yaml::from_str(
        &fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    assert_eq!(
        values["port"].as_u64(),
        Some(u64::from(port)),
        "the chart's default port differs from the exporter's default"
    );
    let mut renders = vec![("helm default".to_string(), helm_template(None))];
    renders.push((
        "kustomize base".to_string(),
        kustomize(&repo_root().join("daemonset/kustomize/base")),
    ));
    for (what, objects) in renders {
        let daemonset = &find(&objects, "DaemonSet", "ergon").object;
        let pod = &daemonset["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        let container_port = &container["ports"][0];
        assert_eq!(container_port["name"], "metrics", "{what}");
        assert_eq!(
            container_port["containerPort"],
            json!(port),
            "{what}: containerPort"
        );
        let listen = format!("--listen=0.0.0.0:{port}");
        assert!(
            container["args"]
                .as_array()
                .is_some_and(|args| args.iter().any(|a| a == &json!(listen))),
            "{what}: the DaemonSet does not pass {listen}"
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"], "metrics",
                "{what}: {probe}"
            );
        }
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            json!(port.to_string()),
            "{what}: pod scrape annotation"
        );
        let service = &find(&objects, "Service", "ergon").object;
        assert_eq!(
            service["spec"]["ports"][0]["port"],
            json!(port),
            "{what}: Service port"
        );
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"], "metrics",
            "{what}"
        );
        assert_eq!(service["spec"]["ports"][0]["name"], "metrics", "{what}");
        assert_eq!(
            service["metadata"]["annotations"]["prometheus.io/port"],
            json!(port.to_string()),
            "{what}: Service scrape annotation"
        );
        let monitor = &find(&objects, "ServiceMonitor", "ergon").object;
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics", "{what}");
        // The ServiceMonitor selects the Service by labels it carries.
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("ServiceMonitor matchLabels");
        for (key, value) in selector {
            assert_eq!(
                &service["metadata"]["labels"][key], value,
                "{what}: the ServiceMonitor's selector misses the Service"
            );
        }
    }
    let prometheus = prometheus_config();
    let ergon_job = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["job_name"] == "ergon")
        .expect("the stack's Prometheus has an ergon job");
    assert_eq!(ergon_job["dns_sd_configs"][0]["port"], json!(port));
}

fn prometheus_config_path() -> PathBuf {
    repo_root().join("stack/components/prometheus/prometheus.yml")
}

fn prometheus_config() -> Value {
    serde_yaml::from_str(&fs::read_to_string(prometheus_config_path()).expect("prometheus.yml"))
        .expect("prometheus.yml parses")
}

/// Every Service the stack (pipeline and exporter) defines, by
/// (namespace, name).
fn stack_services(objects: &[Rendered]) -> BTreeMap<(String, String), Value> {
    objects
        .iter()
        .filter(|o| o.kind() == "Service")
        .map(|o| {
            (
                (o.namespace().to_string(), o.name().to_string()),
                o.object.clone(),
            )
        })
        .collect()
}

/// Splits `name.namespace.svc[...]` (as used in URLs and DNS names).
fn service_of_host(host: &str) -> (String, String) {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default().to_string();
    let namespace = parts.next().unwrap_or_default().to_string();
    assert_eq!(
        parts.next(),
        Some("svc"),
        "`{host}` is not a Service address (name.namespace.svc)"
    );
    (namespace, name)
}

fn service_has_port(service: &Value, port: u64) -> bool {
    service["spec"]["ports"]
        .as_array()
        .is_some_and(|ports| ports.iter().any(|p| p["port"] == json!(port)))
}

#[test]
fn datasource_urls_name_services_the_stack_defines() {
    let services = stack_services(&stack_render());
    let path = repo_root().join("dashboards/provisioning/datasources/ergon.yaml");
    let provisioning: Value =
        serde_yaml::from_str(&fs::read_to_string(&path).expect("datasources file")).unwrap();
    let datasources = provisioning["datasources"]
        .as_array()
        .expect("datasources list");
    assert!(
        datasources.len() >= 2,
        "Prometheus and InfluxDB datasources expected"
    );
    for datasource in datasources {
        let url = datasource["url"].as_str().expect("datasource url");
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("datasource URL `{url}` has no http(s) scheme"));
        let authority = rest.split('/').next().unwrap();
        let (host, port) = authority
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("datasource URL `{url}` names no port"));
        let port: u64 = port.parse().expect("numeric port");
        let id = service_of_host(host);
        let service = services.get(&id).unwrap_or_else(|| {
            panic!("datasource `{url}` names Service {id:?}, which the stack does not define")
        });
        assert!(
            service_has_port(service, port),
            "datasource `{url}`: Service {id:?} has no port {port}"
        );
    }
    let kinds: BTreeSet<&str> = datasources
        .iter()
        .filter_map(|d| d["type"].as_str())
        .collect();
    assert!(
        kinds.contains("prometheus") && kinds.contains("influxdb"),
        "{kinds:?}"
    );
}

#[test]
fn prometheus_discovery_names_headless_services_the_stack_defines() {
    let services = stack_services(&stack_render());
    let config = prometheus_config();
    let mut jobs = BTreeSet::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        let job_name = job["job_name"].as_str().unwrap().to_string();
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            let port = sd["port"].as_u64().expect("dns_sd port");
            for name in sd["names"].as_array().unwrap() {
                let host = name.as_str().unwrap();
                let id = service_of_host(host);
                let service = services.get(&id).unwrap_or_else(|| {
                    panic!("job {job_name}: `{host}` is not a Service the stack defines")
                });
                assert_eq!(
                    service["spec"]["clusterIP"], "None",
                    "job {job_name}: Service {id:?} must be headless, or DNS returns one virtual IP instead of every pod"
                );
                assert!(
                    service_has_port(service, port),
                    "job {job_name}: {id:?} has no port {port}"
                );
            }
        }
        jobs.insert(job_name);
    }
    for (job, metric, _) in COMPONENT_REQUEST_METRICS {
        assert!(
            jobs.contains(job),
            "the pipeline dashboard divides by {metric}{{job=\"{job}\"}}, but the stack's Prometheus has no job {job}"
        );
    }
}

#[test]
fn ingress_backends_name_services_with_those_ports() {
    let objects = stack_render();
    let services = stack_services(&objects);
    let ingress = find(&objects, "Ingress", "vehicle-pipeline");
    let mut hosts = BTreeSet::new();
    for rule in ingress.object["spec"]["rules"].as_array().unwrap() {
        hosts.insert(rule["host"].as_str().unwrap().to_string());
        for path in rule["http"]["paths"].as_array().unwrap() {
            let backend = &path["backend"]["service"];
            let id = (
                ingress.namespace().to_string(),
                backend["name"].as_str().unwrap().to_string(),
            );
            let service = services
                .get(&id)
                .unwrap_or_else(|| panic!("Ingress backend {id:?} is not a Service of the stack"));
            let port_name = backend["port"]["name"]
                .as_str()
                .expect("named backend port");
            assert!(
                service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == port_name),
                "Ingress backend {id:?} port {port_name} not on the Service"
            );
        }
    }
    assert!(
        hosts.iter().any(|h| h.starts_with("grafana."))
            && hosts.iter().any(|h| h.starts_with("mlflow.")),
        "the Ingress must give Grafana and MLflow host names: {hosts:?}"
    );
}

#[test]
fn pipeline_services_keep_traffic_on_the_node() {
    let objects = stack_render();
    let vehicle_api = &find(&objects, "Service", "vehicle-api").object["spec"];
    assert_eq!(vehicle_api["type"], "NodePort");
    assert_eq!(vehicle_api["externalTrafficPolicy"], "Local");
    assert_eq!(vehicle_api["internalTrafficPolicy"], "Local");
    let inference = &find(&objects, "Service", "inference-local").object["spec"];
    assert_eq!(inference["internalTrafficPolicy"], "Local");
    let isvc = &find(&objects, "InferenceService", "inference").object;
    let storage = isvc["spec"]["predictor"]["model"]["storageUri"]
        .as_str()
        .expect("storageUri");
    assert!(
        storage.starts_with("s3://"),
        "the model must come from MinIO: {storage}"
    );
    // The Service selects the pods KServe creates for this InferenceService.
    assert_eq!(
        inference["selector"]["serving.kserve.io/inferenceservice"],
        json!(isvc["metadata"]["name"])
    );
}

/// Secret names a rendered object references: env secretKeyRef, envFrom,
/// volumes, ServiceAccount secrets, Ingress TLS.
fn referenced_secrets(object: &Value, found: &mut BTreeSet<String>) {
    match object {
        Value::Object(map) => {
            for key in ["secretKeyRef", "secretRef"] {
                if let Some(name) = map.get(key).and_then(|r| r["name"].as_str()) {
                    found.insert(name.to_string());
                }
            }
            if let Some(name) = map.get("secret").and_then(|s| s["secretName"].as_str()) {
                found.insert(name.to_string());
            }
            if let Some(name) = map.get("secretName").and_then(Value::as_str) {
                found.insert(name.to_string());
            }
            for value in map.values() {
                referenced_secrets(value, found);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| referenced_secrets(item, found)),
        _ => {}
    }
}

#[test]
fn secrets_are_referenced_documented_and_never_committed() {
    let mut objects = stack_render();
    objects.extend(kustomize(&repo_root().join("stack/overlays/istio")));
    let readme = fs::read_to_string(repo_root().join("stack/README.md")).expect("stack README");
    let mut names = BTreeSet::new();
    for rendered in &objects {
        assert_ne!(
            rendered.kind(),
            "Secret",
            "{}: Secret {} is committed; reference an operator-created Secret instead",
            rendered.source,
            rendered.name()
        );
        referenced_secrets(&rendered.object, &mut names);
        if rendered.kind() == "ServiceAccount" {
            for secret in rendered.object["secrets"].as_array().into_iter().flatten() {
                names.insert(secret["name"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(
        names.len() >= 5,
        "expected the stack's Secrets, found {names:?}"
    );
    for name in &names {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "Secret {name} is referenced but not listed in stack/README.md's Secrets table"
        );
    }
}

/// Container images of a rendered object (pods, templates, InferenceService).
fn images(object: &Value, found: &mut Vec<String>) {
    match object {
        Value::Object(map) => {
            if let (Some(Value::String(image)), true) = (map.get("image"), map.contains_key("name"))
            {
                found.push(image.clone());
            }
            map.values().for_each(|value| images(value, found));
        }
        Value::Array(items) => items.iter().for_each(|item| images(item, found)),
        _ => {}
    }
}

#[test]
fn images_are_pinned_by_version() {
    let mut objects = stack_render();
    for (_, values) in helm_variants() {
        objects.extend(helm_template(values.as_deref()));
    }
    let mut all = Vec::new();
    for rendered in &objects {
        images(&rendered.object, &mut all);
    }
    assert!(
        all.len() >= 10,
        "expected the stack's images, found {all:?}"
    );
    for image in all {
        let last = image.rsplit('/').next().unwrap();
        let tag = last.split_once(':').map(|(_, tag)| tag);
        assert!(
            image.contains("@sha256:") || tag.is_some_and(|t| !t.is_empty() && t != "latest"),
            "image `{image}` is not pinned to a version"
        );
    }
}

#[test]
fn least_privilege_variant_drops_privileged_mode() {
    let values = chart_dir().join("ci/least-privilege-values.yaml");
    let objects = helm_template(Some(&values));
    let container =
        &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0];
    let context = &container["securityContext"];
    assert_eq!(context["privileged"], false);
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(context["capabilities"]["add"], json!(["BPF", "PERFMON"]));
    let default = helm_template(None);
    let context = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"]
        [0]["securityContext"];
    assert_eq!(
        context["privileged"], true,
        "the default profile is privileged"
    );
}

/// ClusterRole and ClusterRoleBinding are cluster-scoped: two releases of
/// the same name in two namespaces must not share them (the second install
/// would fail, or uninstalling one would cut the other's API access).
#[test]
fn two_releases_in_two_namespaces_share_no_cluster_scoped_name() {
    let cluster_scoped = |namespace: &str| -> BTreeSet<(String, String)> {
        helm_template_with(namespace, None, &[])
            .iter()
            .filter(|o| matches!(o.kind(), "ClusterRole" | "ClusterRoleBinding"))
            .map(|o| (o.kind().to_string(), o.name().to_string()))
            .collect()
    };
    let (first, second) = (cluster_scoped("team-a"), cluster_scoped("team-b"));
    assert_eq!(first.len(), 2, "a ClusterRole and its binding: {first:?}");
    let shared: Vec<_> = first.intersection(&second).collect();
    assert!(
        shared.is_empty(),
        "release `ergon` in namespaces team-a and team-b share {shared:?}"
    );
    let objects = helm_template_with("team-a", None, &[]);
    let binding = objects
        .iter()
        .find(|o| o.kind() == "ClusterRoleBinding")
        .unwrap();
    let role = objects.iter().find(|o| o.kind() == "ClusterRole").unwrap();
    assert_eq!(
        binding.object["roleRef"]["name"],
        role.object["metadata"]["name"]
    );
}

/// `hostNetwork: true` (clusters without a pod network, and the e2e node):
/// the pod joins the node's network and the exporter listens on the node's
/// address from the downward API, not on every interface of the host.
#[test]
fn host_network_value_listens_on_the_pod_ip_only() {
    let default = helm_template(None);
    let spec = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert!(spec["hostNetwork"].is_null(), "hostNetwork defaults to off");
    let objects = helm_template_with(HELM_NAMESPACE, None, &["hostNetwork=true"]);
    let spec = &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--listen=$(POD_IP):9102"),
        "listens on the pod IP: {args:?}"
    );
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "POD_IP comes from the downward API: {env:?}"
    );
}

#[test]
fn hardened_variant_adds_tls_auth_rbac_and_a_network_policy_the_default_does_not() {
    let hardened = helm_template(Some(&chart_dir().join("ci/hardened-values.yaml")));
    let pod = &find(&hardened, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for flag in [
        "--tls-cert-file=/var/run/ergon/tls/tls.crt",
        "--tls-key-file=/var/run/ergon/tls/tls.key",
        "--authorize-metrics",
    ] {
        assert!(args.contains(&flag), "{flag} missing from {args:?}");
    }
    // A directory mount (no subPath): the kubelet updates a renewed Secret.
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tls")
        .expect("the TLS Secret is mounted");
    assert_eq!(mount["mountPath"], "/var/run/ergon/tls");
    assert!(mount.get("subPath").is_none());
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "ergon-metrics-tls")
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    let endpoint = &find(&hardened, "ServiceMonitor", "ergon").object["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert!(endpoint["bearerTokenFile"].is_string());

    let review_rules = |objects: &[Rendered]| -> Vec<Value> {
        find(objects, "ClusterRole", &format!("{HELM_NAMESPACE}-ergon")).object["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| {
                rule["resources"][0]
                    .as_str()
                    .is_some_and(|r| r.ends_with("reviews"))
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        review_rules(&hardened),
        vec![
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}),
            json!({"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}),
        ]
    );
    let reader = find(
        &hardened,
        "ClusterRole",
        &format!("{HELM_NAMESPACE}-ergon-metrics-reader"),
    );
    assert_eq!(
        reader.object["rules"],
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );

    let policy = &find(&hardened, "NetworkPolicy", "ergon").object["spec"];
    assert_eq!(policy["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "ergon"
    );
    let ingress = policy["ingress"].as_array().unwrap();
    assert_eq!(
        ingress.len(),
        1,
        "one rule: the scrapers, to the metrics port"
    );
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": "metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "prometheus"
    );

    // Off by default: none of it.
    let default = helm_template(None);
    assert!(review_rules(&default).is_empty());
    assert!(
        !default
            .iter()
            .any(|o| o.kind() == "NetworkPolicy" || o.name().ends_with("-metrics-reader"))
    );
    let args = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    assert!(!args.to_string().contains("--tls") && !args.to_string().contains("--authorize"));
}

#[test]
fn daemonset_mounts_host_paths_read_only_and_tolerates_every_taint() {
    let objects = helm_template(None);
    let pod = &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "the DaemonSet must tolerate every taint"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let host_path = volumes[name]["hostPath"]["path"].as_str().unwrap_or("");
        if name == "checkpoint" {
            assert_eq!(host_path, "/var/lib/ergon");
            assert_ne!(
                mount["readOnly"], true,
                "the checkpoint directory must be writable"
            );
        } else {
            assert_eq!(
                mount["readOnly"], true,
                "host mount {name} ({host_path}) must be read-only"
            );
        }
    }
    for host_path in [
        "/sys",
        "/proc",
        "/sys/fs/cgroup",
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
    ] {
        assert!(
            volumes.values().any(|v| v["hostPath"]["path"] == host_path),
            "no hostPath volume for {host_path}"
        );
    }
}

#[test]
fn the_exporter_keeps_its_state_in_the_mounted_directory_unless_told_not_to() {
    let exporter = |objects: &[Rendered]| -> Value {
        find(objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0]
            .clone()
    };
    let args = |container: &Value| -> Vec<String> {
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let state_mount = |container: &Value| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "checkpoint")
            .map(|m| m["mountPath"].as_str().unwrap().to_owned())
    };
    let chart = exporter(&helm_template(None));
    let base = exporter(&kustomize(&repo_root().join("daemonset/kustomize/base")));
    for container in [&chart, &base] {
        let dir = state_mount(container).expect("the state directory is mounted");
        assert!(
            args(container).contains(&format!("--state-dir={dir}")),
            "the exporter's --state-dir is not its mounted state directory {dir}: {:?}",
            args(container)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("no-checkpoint.yaml");
    std::fs::write(&values, "exporter:\n  checkpoint: false\n").unwrap();
    let without = args(&exporter(&helm_template(Some(&values))));
    assert!(
        without.contains(&"--no-checkpoint".to_owned()),
        "{without:?}"
    );
    assert!(
        !without
            .iter()
            .any(|a| a.starts_with("--state-dir") || a.starts_with("--checkpoint")),
        "{without:?}"
    );
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

fn rules_path() -> PathBuf {
    repo_root().join("daemonset/rules/ergon.rules.yaml")
}

#[test]
fn promtool_accepts_the_rules() {
    let output = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(rules_path()),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}

#[test]
fn promtool_accepts_the_stack_prometheus_config() {
    let output = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(prometheus_config_path()),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}

/// The CO2e rules' arithmetic (joules / 3.6e6 × gCO2e/kWh, per pod,
/// namespace and node) against known series: tests/rules/*.test.yaml.
#[test]
fn promtool_rule_unit_tests_pass() {
    let output = run_ok(
        Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(repo_root().join("tests/rules/carbon.test.yaml")),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}

#[test]
fn rules_have_the_promised_records_and_alerts() {
    let rules = rule_expressions(&rules_path());
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for expected in [
        "namespace:ergon_pod_energy_kwh:increase1d",
        "pod:ergon_pod_co2e_grams_per_second:rate5m",
        "namespace:ergon_pod_co2e_grams:increase1d",
        "instance:ergon_node_co2e_grams:increase1d",
        "ErgonCarbonIntensityStale",
        "ErgonExporterDown",
        "ErgonMeterDown",
        "ErgonProbeFellBackToProcfs",
        "ErgonMeasurementStalled",
    ] {
        assert!(
            names.contains(expected),
            "rule {expected} missing: {names:?}"
        );
    }
}

/// Writes each expression as a recording rule and lets promtool parse them:
/// the real PromQL parser, not a pattern.
fn promtool_check_expressions(expressions: &[(String, String)]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(|(index, (_, expr))| json!({"record": format!("check:dashboard_query_{index}"), "expr": expr}))
        .collect();
    let file = dir.path().join("dashboard-queries.rules.yaml");
    let text =
        serde_yaml::to_string(&json!({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
            .expect("serialise rules");
    fs::write(&file, text).expect("write rules");
    let output = run_command(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(&file),
        None,
    );
    if !output.status.success() {
        let listing: Vec<String> = expressions
            .iter()
            .enumerate()
            .map(|(i, (where_, expr))| format!("  {i}: {where_}: {expr}"))
            .collect();
        panic!(
            "promtool rejects dashboard queries:\n{}{}\nqueries:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            listing.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Dashboards: query extraction (used by the static and the live checks)
// ---------------------------------------------------------------------------

/// One PromQL query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    /// As written, with Grafana template variables.
    pub expr: String,
}

impl PanelQuery {
    fn location(&self) -> String {
        format!("{} / {} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

/// A dashboard template variable.
#[derive(Clone, Debug)]
pub struct TemplateVariable {
    pub dashboard: String,
    pub name: String,
    /// Grafana's type: query, custom, textbox, constant, datasource.
    pub kind: String,
    /// For query variables, the `label_values(...)` definition; otherwise
    /// the current (default) value.
    pub query: String,
    pub include_all: bool,
}

fn dashboard_files(repo: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo.join("dashboards"))
        .expect("dashboards/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn load_dashboard(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("readable dashboard"))
        .unwrap_or_else(|error| panic!("{}: invalid JSON: {error}", path.display()))
}

fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(panel);
        // Collapsed rows keep their panels inside.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    panels
}

/// Every PromQL query in dashboards/*.json, with template variables as
/// written. Call [`substitute_template_variables`] to fill them.
pub fn dashboard_queries(repo: &Path) -> Vec<PanelQuery> {
    let mut queries = Vec::new();
    for file in dashboard_files(repo) {
        let dashboard = load_dashboard(&file);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for panel in dashboard_panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(PanelQuery {
                        dashboard: name.clone(),
                        panel: panel["title"].as_str().unwrap_or("").to_string(),
                        ref_id: target["refId"].as_str().unwrap_or("").to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
        }
    }
    queries
}

/// Every template variable of dashboards/*.json.
pub fn dashboard_variables(repo: &Path) -> Vec<TemplateVariable> {
    let mut variables = Vec::new();
    for file in dashboard_files(repo) {
        let dashboard = load_dashboard(&file);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let kind = variable["type"].as_str().unwrap_or("").to_string();
            let query = match kind.as_str() {
                "query" => variable["definition"]
                    .as_str()
                    .or_else(|| variable["query"]["query"].as_str())
                    .or_else(|| variable["query"].as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => variable["current"]["value"]
                    .as_str()
                    .or_else(|| variable["query"].as_str())
                    .unwrap_or("")
                    .to_string(),
            };
            variables.push(TemplateVariable {
                dashboard: name.clone(),
                name: variable["name"].as_str().unwrap_or("").to_string(),
                kind,
                query,
                include_all: variable["includeAll"].as_bool().unwrap_or(false),
            });
        }
    }
    variables
}

/// Values for Grafana's built-in variables that a panel query may use.
pub fn builtin_variable_values() -> BTreeMap<String, String> {
    [
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__range", "5m"),
        ("__range_s", "300"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Fills Grafana template variables (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`) from `values`. Unknown names are left as written, as Grafana
/// does (so `$1` in a `label_replace` replacement survives).
pub fn substitute_template_variables(expr: &str, values: &BTreeMap<String, String>) -> String {
    let bytes = expr.as_bytes();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while i < bytes.len() {
        let rest = &expr[i..];
        if let Some(inner) = rest.strip_prefix("${") {
            if let Some(end) = inner.find('}') {
                let name = inner[..end].split(':').next().unwrap_or("");
                if let Some(value) = values.get(name) {
                    out.push_str(value);
                    i += 2 + end + 1;
                    continue;
                }
            }
        } else if let Some(inner) = rest.strip_prefix("[[") {
            if let Some(end) = inner.find("]]") {
                let name = inner[..end].split(':').next().unwrap_or("");
                if let Some(value) = values.get(name) {
                    out.push_str(value);
                    i += 2 + end + 2;
                    continue;
                }
            }
        } else if let Some(after) = rest.strip_prefix('$') {
            let len = after.bytes().take_while(|&b| is_word(b)).count();
            let name = &after[..len];
            if let Some(value) = values.get(name) {
                out.push_str(value);
                i += 1 + len;
                continue;
            }
        }
        let ch = rest.chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Sample values for every variable, for checks without a live Prometheus:
/// query variables get `.*`-style matches (or a sample name where a single
/// value is needed), others their default.
pub fn sample_variable_values(
    variables: &[TemplateVariable],
    dashboard: &str,
) -> BTreeMap<String, String> {
    let mut values = builtin_variable_values();
    for variable in variables.iter().filter(|v| v.dashboard == dashboard) {
        let value = match variable.kind.as_str() {
            "datasource" => "prometheus".to_string(),
            "query" if variable.include_all => ".*".to_string(),
            "query" => format!("sample-{}", variable.name),
            _ => variable.query.clone(),
        };
        values.insert(variable.name.clone(), value);
    }
    values
}

const PROMQL_AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const PROMQL_KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "start",
];

/// Metric names a PromQL expression selects (after variable substitution).
/// Function and aggregation names, label names in `by (...)`/`on (...)`,
/// matchers, strings, durations and numbers are not metric names.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_group = |mut j: usize, open: char, close: char| -> usize {
        // j points at `open`; returns the index after the matching `close`,
        // stepping over strings.
        let mut depth = 0;
        while j < chars.len() {
            let c = chars[j];
            if c == '"' || c == '\'' || c == '`' {
                j += 1;
                while j < chars.len() && chars[j] != c {
                    if chars[j] == '\\' {
                        j += 1;
                    }
                    j += 1;
                }
            } else if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers (3.6e6, 0x1f) and durations (5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                if (chars[i] == 'e' || chars[i] == 'E')
                    && matches!(chars.get(i + 1), Some('+' | '-'))
                {
                    i += 1;
                }
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                if followed_by_paren {
                    i = skip_group(next, '(', ')');
                }
            } else if PROMQL_AGGREGATIONS.contains(&lower.as_str())
                || PROMQL_KEYWORDS.contains(&lower.as_str())
                || followed_by_paren
                || matches!(lower.as_str(), "inf" | "nan")
            {
                // Function, aggregation or keyword.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The selector of a Grafana `label_values(selector, label)` variable query.
pub fn label_values_selector(definition: &str) -> Option<&str> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(inner.rsplit_once(',')?.0.trim())
}

/// The label of a Grafana `label_values(selector, label)` variable query.
fn label_values_label(definition: &str) -> Option<&str> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(inner.rsplit_once(',')?.1.trim())
}

/// One rule of a Prometheus rule file.
#[derive(Clone, Debug)]
pub struct RuleExpression {
    /// The recorded metric or the alert's name.
    pub name: String,
    pub is_alert: bool,
    pub expr: String,
}

/// Every rule of a Prometheus rule file.
pub fn rule_expressions(path: &Path) -> Vec<RuleExpression> {
    let file: Value = serde_yaml::from_str(&fs::read_to_string(path).expect("rules file"))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut rules = Vec::new();
    for group in file["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let (name, is_alert) = match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(record), _) => (record, false),
                (None, Some(alert)) => (alert, true),
                (None, None) => panic!("{}: rule with neither record nor alert", path.display()),
            };
            rules.push(RuleExpression {
                name: name.to_string(),
                is_alert,
                expr: rule["expr"].as_str().expect("rule expr").to_string(),
            });
        }
    }
    rules
}

/// Every metric name the dashboards (with sample variable values) and the
/// rules use, with where each is used.
pub fn referenced_metric_names(repo: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let variables = dashboard_variables(repo);
    for query in dashboard_queries(repo) {
        let values = sample_variable_values(&variables, &query.dashboard);
        for name in promql_metric_names(&substitute_template_variables(&query.expr, &values)) {
            used.entry(name).or_default().insert(query.location());
        }
    }
    for variable in &variables {
        if variable.kind == "query" {
            let selector = label_values_selector(&variable.query).unwrap_or_else(|| {
                panic!(
                    "{}: variable {} is not label_values(selector, label)",
                    variable.dashboard, variable.name
                )
            });
            for name in promql_metric_names(selector) {
                used.entry(name).or_default().insert(format!(
                    "{} / variable {}",
                    variable.dashboard, variable.name
                ));
            }
        }
    }
    let rules = repo.join("daemonset/rules/ergon.rules.yaml");
    for rule in rule_expressions(&rules) {
        for name in promql_metric_names(&rule.expr) {
            used.entry(name)
                .or_default()
                .insert(format!("ergon.rules.yaml / {}", rule.name));
        }
    }
    used
}

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

fn recording_rule_names() -> BTreeSet<String> {
    rule_expressions(&rules_path())
        .into_iter()
        .filter(|r| !r.is_alert)
        .map(|r| r.name)
        .collect()
}

/// One sample pod per pipeline component, named as its controller would
/// name it, in the pipeline namespace: what the end-to-end fixture must run
/// (as pod-shaped cgroups with matching Kubernetes metadata) for the
/// pipeline dashboard's queries to have data.
pub fn pipeline_pod_names() -> Vec<(String, String)> {
    PIPELINE_COMPONENTS
        .iter()
        .map(|component| {
            let pod = match *component {
                "inference" => "inference-predictor-5d8f7c9b4-x2k8q".to_string(),
                "influxdb" | "prometheus" | "minio" => format!("{component}-0"),
                "vehicle-api" | "redis" => format!("{component}-7xk2p"),
                _ => format!("{component}-6b8d9f5c7-q4w2z"),
            };
            (PIPELINE_NAMESPACE.to_string(), pod)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests: dashboards
// ---------------------------------------------------------------------------

#[test]
fn query_extraction_finds_every_dashboard_query() {
    let repo = repo_root();
    let queries = dashboard_queries(&repo);
    let dashboards: BTreeSet<&str> = queries.iter().map(|q| q.dashboard.as_str()).collect();
    assert_eq!(
        dashboards,
        BTreeSet::from([
            "ergon-cluster-overview.json",
            "ergon-exporter-health.json",
            "ergon-pod-drilldown.json",
            "ergon-vehicle-pipeline.json",
        ])
    );
    // Count the targets independently of the extractor: every non-row panel
    // has targets and each has an expr.
    let mut expected = 0;
    for file in dashboard_files(&repo) {
        for panel in dashboard_panels(&load_dashboard(&file)) {
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().unwrap_or_else(|| {
                panic!(
                    "{}: panel {} has no targets",
                    file.display(),
                    panel["title"]
                )
            });
            assert!(
                !targets.is_empty(),
                "{}: panel {} has no query",
                file.display(),
                panel["title"]
            );
            expected += targets.len();
        }
    }
    assert_eq!(queries.len(), expected);
    let variables = dashboard_variables(&repo);
    for query in &queries {
        let values = sample_variable_values(&variables, &query.dashboard);
        let filled = substitute_template_variables(&query.expr, &values);
        assert!(
            !filled.contains("$__") && !filled.contains("${") && !filled.contains("[["),
            "{}: unfilled variable in `{filled}`",
            query.location()
        );
        for word in filled.split('$').skip(1) {
            assert!(
                word.starts_with(|c: char| c.is_ascii_digit()),
                "{}: unknown variable ${word} in `{}`",
                query.location(),
                query.expr
            );
        }
        assert!(
            !promql_metric_names(&filled).is_empty(),
            "{}: selects no metric: `{filled}`",
            query.location()
        );
    }
}

#[test]
fn substitution_and_metric_name_extraction_handle_grafana_and_promql_forms() {
    let values: BTreeMap<String, String> = [
        ("instance", "node-a"),
        ("__rate_interval", "1m"),
        ("pod", "p"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        substitute_template_variables(
            r#"rate(x{instance=~"$instance",pod="${pod:regex}",c="[[pod]]"}[$__rate_interval]) $1 $unknown"#,
            &values
        ),
        r#"rate(x{instance=~"node-a",pod="p",c="p"}[1m]) $1 $unknown"#
    );
    let names = promql_metric_names(
        r#"sum by (namespace, pod) (rate(a_total{l="b_total"}[5m] offset 1h)) / on(namespace) group_left(x) b:rule:rate5m * 3.6e6 or vector(0) > bool 1 and c"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "a_total".to_string(),
            "b:rule:rate5m".to_string(),
            "c".to_string()
        ])
    );
    let names = promql_metric_names(
        r#"label_replace(rate(m{pod=~"(a|b)-.*"}[1m]), "component", "$1", "pod", "(a|b)-.*") / sum without (cpu) (count(n))"#,
    );
    assert_eq!(names, BTreeSet::from(["m".to_string(), "n".to_string()]));
}

#[test]
fn dashboards_use_only_known_metrics() {
    let repo = repo_root();
    let recording = recording_rule_names();
    let used = referenced_metric_names(&repo);
    let mut unknown = Vec::new();
    for (name, places) in &used {
        match metric_origin(name, &recording) {
            None => unknown.push(format!("{name} (used in {places:?})")),
            Some(_) if name.starts_with("kepler_") => unknown.push(format!(
                "{name}: Kepler compat names are opt-in, dashboards must not need them ({places:?})"
            )),
            Some(_) => {}
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics nothing produces:\n{}",
        unknown.join("\n")
    );
    // Every dashboard reads the exporter.
    assert!(used.contains_key("ergon_pod_energy_joules_total"));
    assert!(used.contains_key("ergon_probe_info") && used.contains_key("ergon_meter_up"));
}

#[test]
fn promtool_parses_every_dashboard_query() {
    let repo = repo_root();
    let variables = dashboard_variables(&repo);
    let expressions: Vec<(String, String)> = dashboard_queries(&repo)
        .into_iter()
        .map(|query| {
            let values = sample_variable_values(&variables, &query.dashboard);
            (
                query.location(),
                substitute_template_variables(&query.expr, &values),
            )
        })
        .collect();
    promtool_check_expressions(&expressions);
}

#[test]
fn dashboards_are_provisionable_and_mark_estimates() {
    let repo = repo_root();
    let kustomization: Value = serde_yaml::from_str(
        &fs::read_to_string(repo.join("dashboards/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let packaged: BTreeSet<String> = kustomization["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["files"].as_array().unwrap().iter())
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let mut uids = BTreeSet::new();
    for file in dashboard_files(&repo) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            packaged.contains(&name),
            "{name} is not in dashboards/kustomization.yaml"
        );
        let dashboard = load_dashboard(&file);
        let uid = dashboard["uid"]
            .as_str()
            .expect("dashboard uid")
            .to_string();
        assert!(uids.insert(uid.clone()), "dashboard uid {uid} used twice");
        let mut marks_estimates = false;
        for panel in dashboard_panels(&dashboard) {
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: panel {} must use the datasource variable",
                panel["title"]
            );
            let shows_source = panel["targets"].as_array().into_iter().flatten().any(|t| {
                t["legendFormat"]
                    .as_str()
                    .is_some_and(|l| l.contains("{{source}}"))
            });
            let has_model_override = panel["fieldConfig"]["overrides"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| {
                    o["matcher"]["options"]
                        .as_str()
                        .is_some_and(|m| m.contains("model"))
                });
            assert!(
                !shows_source || has_model_override,
                "{name}: panel {} shows series by source without marking source=model as an estimate",
                panel["title"]
            );
            let text = panel.to_string();
            marks_estimates |= text.contains(r#"source=\"model\""#) || has_model_override;
        }
        assert!(marks_estimates, "{name}: nothing marks model estimates");
    }
    assert_eq!(
        uids.len(),
        4,
        "cluster overview, pod drill-down, pipeline, exporter health"
    );
}

#[test]
fn pipeline_dashboard_covers_every_component() {
    let repo = repo_root();
    let text = fs::read_to_string(repo.join("dashboards/ergon-vehicle-pipeline.json")).unwrap();
    for component in PIPELINE_COMPONENTS {
        assert!(
            text.contains(component),
            "the pipeline dashboard never mentions {component}"
        );
    }
    // Each sample pod name matches the dashboard's component regex, so the
    // fixture the live test needs is the one this file describes.
    let queries = dashboard_queries(&repo);
    let power = queries
        .iter()
        .find(|q| q.dashboard == "ergon-vehicle-pipeline.json" && q.panel == "Power by component")
        .expect("Power by component panel");
    for (_, pod) in pipeline_pod_names() {
        let component = PIPELINE_COMPONENTS
            .iter()
            .find(|c| pod.starts_with(&format!("{c}-")))
            .unwrap();
        assert!(
            power.expr.contains(&format!("|{component}|"))
                || power.expr.contains(&format!("({component}|"))
                || power.expr.contains(&format!("|{component})"))
        );
    }
}

// ---------------------------------------------------------------------------
// End to end: a real Prometheus scraping a real exporter
// ---------------------------------------------------------------------------

/// GET over HTTP/1.0 (the servers then close the connection, no chunking).
/// Returns (status, body).
fn http_get(address: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
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

fn url_encode(text: &str) -> String {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `check` until it returns Some or the deadline passes (a readiness
/// deadline for processes starting up, not a timing assertion).
fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
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
struct ComponentStandIn {
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
fn exposition_metric_names(text: &str) -> BTreeSet<String> {
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

fn prometheus_query(address: SocketAddr, query: &str) -> Result<Vec<Value>, String> {
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
fn label_values(address: SocketAddr, definition: &str) -> Result<Vec<String>, String> {
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
fn live_variable_values(
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
fn live_check_dashboards(
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
fn live_dashboards_and_rules_return_data_from_a_real_exporter() {
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

/// The same dashboards and rules against the real single-node cluster of
/// `cargo xtask e2e`, which runs this test once its exporter pod and
/// Prometheus (pod discovery through the apiserver, the chart's rules) hold
/// data. The pipeline dashboard is left out: its panels need the pipeline's
/// own request counters, which the cluster does not run.
#[test]
#[ignore = "needs the cluster of `cargo xtask e2e`, which runs it with ERGON_E2E_EXPORTER and \
            ERGON_E2E_PROMETHEUS set"]
fn cluster_dashboards_and_rules_return_data() {
    let address = |name: &str| -> SocketAddr {
        std::env::var(name)
            .unwrap_or_else(|_| {
                panic!("{name} is not set: run this test through `cargo xtask e2e`")
            })
            .parse()
            .unwrap_or_else(|e| panic!("{name} is not an address (127.0.0.1:PORT): {e}"))
    };
    let (exporter, prometheus) = (
        address("ERGON_E2E_EXPORTER"),
        address("ERGON_E2E_PROMETHEUS"),
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

#[test]
fn otlp_endpoint_value_passes_the_flag_and_the_schema_refuses_https() {
    let args = |objects: &[Rendered]| -> Vec<String> {
        find(objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0]
            ["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let default = args(&helm_template(None));
    assert!(
        !default.iter().any(|a| a.starts_with("--otlp-endpoint")),
        "{default:?}"
    );
    let pushed = args(&helm_template_with(
        HELM_NAMESPACE,
        None,
        &["exporter.otlpEndpoint=http://$(HOST_IP):4318"],
    ));
    assert!(
        pushed.contains(&"--otlp-endpoint=http://$(HOST_IP):4318".to_owned()),
        "{pushed:?}"
    );
    let refused = Command::new(tool("helm"))
        .args(["template", "ergon"])
        .arg(chart_dir())
        .args(["--set", "exporter.otlpEndpoint=https://collector:4318"])
        .output()
        .expect("run helm");
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("otlpEndpoint"),
        "the schema let https through: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
