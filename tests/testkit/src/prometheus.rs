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
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let reply = super::http_get(self.port, &format!("/api/v1/query?query={encoded}"))?;
        let body = reply.split_once("\r\n\r\n")?.1;
        // Chunked or not, the JSON object is the part between the braces.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        value["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
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
