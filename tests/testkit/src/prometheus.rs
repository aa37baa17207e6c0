//! A real Prometheus server (Debian's package) on a loopback port, scraping
//! one exporter every second; stopped and its data removed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(exporter_port: u16) -> Prometheus {
        let data = tempfile::tempdir().unwrap();
        let config = data.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ergon\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
            ),
        )
        .unwrap();
        let port = super::free_port();
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prometheus is installed by `cargo xtask setup` (Debian package prometheus)");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus {
            child,
            port,
            _data: data,
        };
        for _ in 0..300 {
            if super::http_get(port, "/-/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return prometheus;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus did not become ready on port {port}");
    }

    /// The scalar value of an instant query's first result, if any.
    pub fn query(&self, promql: &str) -> Option<f64> {
        self.query_all(promql)
            .into_iter()
            .next()
            .map(|(_, value)| value)
    }

    /// Every result of an instant query: its labels and value.
    pub fn query_all(
        &self,
        promql: &str,
    ) -> Vec<(serde_json::Map<String, serde_json::Value>, f64)> {
        let Some(value) = self.api(&format!("/api/v1/query?query={}", encode(promql))) else {
            return Vec::new();
        };
        let results = value["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        results
            .into_iter()
            .filter_map(|result| {
                let labels = result["metric"].as_object()?.clone();
                let value = result["value"][1].as_str()?.parse().ok()?;
                Some((labels, value))
            })
            .collect()
    }

    /// The values of `label` on the series of `metric`, as Grafana's
    /// `label_values(metric, label)` asks for them.
    pub fn label_values(&self, label: &str, metric: &str) -> Vec<String> {
        let path = format!(
            "/api/v1/label/{label}/values?match%5B%5D={}",
            encode(metric)
        );
        self.api(&path)
            .and_then(|value| value["data"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    fn api(&self, path: &str) -> Option<serde_json::Value> {
        let reply = super::http_get(self.port, path)?;
        let body = reply.split_once("\r\n\r\n")?.1;
        // Chunked or not, the JSON object is the part between the braces.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        serde_json::from_str(json).ok()
    }

    /// Polls `promql` until it is positive (up to 30 s), returning it.
    pub fn query_until_positive(&self, promql: &str) -> f64 {
        for _ in 0..150 {
            if let Some(value) = self.query(promql)
                && value > 0.0
            {
                return value;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("`{promql}` never became positive in Prometheus");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
