//! A real Prometheus (Debian's package) that discovers the exporter pods
//! from the real apiserver and evaluates the chart's rules.
//!
//! Debian builds Prometheus 2.42 without `kubernetes_sd_configs` (the field
//! is unknown to its config parser: the Kubernetes client libraries are not
//! packaged). Discovery therefore goes through `http_sd_configs` served by a
//! small loopback endpoint here that lists pods from the apiserver on every
//! refresh and hands them over with the `__meta_kubernetes_pod_*` labels
//! kubernetes_sd would set, so the relabelling below is the one an operator
//! writes for pod discovery by `prometheus.io/*` annotations.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::cluster::{self, Cluster};

const PROMETHEUS_PORT: u16 = 39090;

/// The pod-discovery endpoint; stops when dropped.
pub struct Discovery {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Target groups in http_sd's format for every running pod that asks to be
/// scraped, from `kubectl get pods -o json`.
fn target_groups(pods: &Value) -> Value {
    let mut groups = Vec::new();
    for pod in pods["items"].as_array().into_iter().flatten() {
        let annotations = &pod["metadata"]["annotations"];
        if annotations["prometheus.io/scrape"] != "true"
            || pod["status"]["phase"] != "Running"
            || !pod["metadata"]["deletionTimestamp"].is_null()
        {
            continue;
        }
        let (Some(ip), Some(port)) = (
            pod["status"]["podIP"].as_str(),
            annotations["prometheus.io/port"].as_str(),
        ) else {
            continue;
        };
        groups.push(json!({
            "targets": [format!("{ip}:{port}")],
            "labels": {
                "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
                "__meta_kubernetes_pod_name": pod["metadata"]["name"],
                "__meta_kubernetes_pod_node_name": pod["spec"]["nodeName"],
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_path":
                    annotations["prometheus.io/path"].as_str().unwrap_or("/metrics"),
                "__meta_kubernetes_pod_label_app_kubernetes_io_name":
                    pod["metadata"]["labels"]["app.kubernetes.io/name"].as_str().unwrap_or(""),
            }
        }));
    }
    Value::Array(groups)
}

pub fn start_discovery(cluster: &Cluster) -> Result<Discovery> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the discovery endpoint")?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let kubeconfig = cluster.work.kubeconfig();
    let kubectl = super::tool("kubectl");
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let pods = Command::new(&kubectl)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["get", "pods", "--all-namespaces", "-o", "json"])
                    .output();
                let (status, body) = match pods {
                    Ok(out) if out.status.success() => {
                        match serde_json::from_slice::<Value>(&out.stdout) {
                            Ok(pods) => ("200 OK", target_groups(&pods).to_string()),
                            Err(e) => ("500 Internal Server Error", e.to_string()),
                        }
                    }
                    Ok(out) => (
                        "503 Service Unavailable",
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ),
                    Err(e) => ("500 Internal Server Error", e.to_string()),
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
    };
    Ok(Discovery {
        address,
        stop,
        thread: Some(thread),
    })
}

/// Prometheus as a process of the cluster (stopped with it), scraping every
/// 5 s and evaluating daemonset/rules/ergon.rules.yaml.
pub fn start(cluster: &mut Cluster, discovery: &Discovery) -> Result<Prometheus> {
    let dir = cluster.work.run.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let rules = super::root().join("daemonset/rules/ergon.rules.yaml");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 5s
  scrape_timeout: 4s
  evaluation_interval: 5s
rule_files:
  - {rules}
scrape_configs:
  # Every pod that asks to be scraped; its job is its app's name, so the
  # exporter is job "ergon" (what the rules' ErgonExporterDown watches) and
  # the pipeline's redis_exporter job "redis" (what the pipeline dashboard
  # divides by).
  - job_name: pods
    http_sd_configs:
      - url: http://{discovery}/pods
        refresh_interval: 5s
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        target_label: __metrics_path__
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
        regex: (.+)
        target_label: job
      # A node is its `instance` label, as the chart's ServiceMonitor sets it.
      - source_labels: [__meta_kubernetes_pod_node_name]
        target_label: instance
"#,
            rules = rules.display(),
            discovery = discovery.address,
        ),
    )?;
    let address = format!("127.0.0.1:{PROMETHEUS_PORT}");
    cluster.spawn(
        "prometheus",
        Command::new("prometheus").args([
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={address}"),
            "--storage.tsdb.retention.time=1d",
        ]),
    )?;
    let prometheus = Prometheus { address };
    cluster::wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        cluster.check_alive()?;
        Ok(super::run_quiet(
            Command::new("curl").args(["-sf", &format!("http://{}/-/ready", prometheus.address)]),
        )
        .is_ok()
        .then_some(()))
    })?;
    Ok(prometheus)
}

pub struct Prometheus {
    pub address: String,
}

impl Prometheus {
    /// The result vector of an instant query.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        self.api("query", promql, &[])
    }

    /// What Prometheus recorded for the one series `promql` selects from
    /// `start` to `end` (Unix seconds), a point per `step_s` seconds: (time,
    /// value) pairs, none where the series was absent or stale.
    pub fn range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step_s: u32,
    ) -> Result<Vec<(f64, f64)>> {
        let series = self.api(
            "query_range",
            promql,
            &[
                ("start", format!("{start:.3}")),
                ("end", format!("{end:.3}")),
                ("step", format!("{step_s}s")),
            ],
        )?;
        if series.len() > 1 {
            bail!(
                "{promql} selects {} series, not one: {series:?}",
                series.len()
            );
        }
        Ok(series
            .first()
            .and_then(|series| series["values"].as_array())
            .map(|points| {
                points
                    .iter()
                    .filter_map(|point| {
                        let time = point[0].as_f64()?;
                        let value = point[1].as_str()?.parse().ok()?;
                        Some((time, value))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn api(&self, endpoint: &str, promql: &str, params: &[(&str, String)]) -> Result<Vec<Value>> {
        let mut curl = Command::new("curl");
        curl.args([
            "-sfG",
            &format!("http://{}/api/v1/{endpoint}", self.address),
        ])
        .args(["--data-urlencode", &format!("query={promql}")]);
        for (name, value) in params {
            curl.args(["--data-urlencode", &format!("{name}={value}")]);
        }
        let body = super::output(&mut curl)
            .with_context(|| format!("querying Prometheus for {promql}"))?;
        let answer: Value = serde_json::from_str(&body)?;
        if answer["status"] != "success" {
            bail!("Prometheus refused {promql}: {answer}");
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `label` → value of every series `promql` returns.
    pub fn values_by(&self, promql: &str, label: &str) -> Result<Vec<(String, f64)>> {
        Ok(self
            .query(promql)?
            .iter()
            .map(|series| {
                let name = series["metric"][label].as_str().unwrap_or("").to_owned();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (name, value)
            })
            .collect())
    }
}
