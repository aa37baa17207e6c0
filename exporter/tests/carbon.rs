//! `--carbon-intensity FILE` on the real binary: the gauge follows the file
//! as a CronJob rewrites it, and a broken file keeps the last value with a
//! WARN naming the file while the timestamp shows the value's age.

use ergon_testkit as support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{LoggedChild, Metrics};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");
const INTENSITY: &str = "ergon_grid_carbon_intensity_grams_per_kwh";
const TIMESTAMP: &str = "ergon_grid_carbon_intensity_timestamp_seconds";

fn scrape(port: u16) -> Option<Metrics> {
    let reply = support::http_get(port, "/metrics")?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| Metrics::parse(body))
}

fn eventually(port: u16, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(port);
        if let Some(metrics) = metrics.as_ref().filter(|m| check(m)) {
            return Metrics {
                samples: metrics.samples.clone(),
            };
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not reached; last scrape: {:?}",
            metrics.map(|m| m
                .samples
                .into_iter()
                .filter(|s| s.0.contains("carbon"))
                .collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` and stamps the file with `unix_seconds` (as a CronJob
/// writing at that time would).
fn write_at(path: &std::path::Path, text: &str, unix_seconds: u64) {
    std::fs::write(path, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(unix_seconds))
        .unwrap();
}

#[test]
fn the_gauge_follows_a_rewritten_file_and_a_broken_one_keeps_the_last_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grid-intensity");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    write_at(&file, "350\n", now - 600);
    let port = support::free_port();
    let mut exporter = LoggedChild::spawn(
        std::process::Command::new(ERGON)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .args([
                "--no-checkpoint",
                "--probe=procfs",
                "--meter=model",
                "--interval=500ms",
            ])
            .arg(format!("--carbon-intensity={}", file.display()))
            .env("ERGON_LOG", "warn")
            .env("NO_COLOR", "1"),
    );
    let metrics = eventually(port, "the first value", |m| m.sum(INTENSITY, &[]) == 350.0);
    assert_eq!(metrics.sum(TIMESTAMP, &[]), (now - 600) as f64);

    write_at(&file, "97.5\n", now - 60);
    let metrics = eventually(port, "the rewritten value", |m| {
        m.sum(INTENSITY, &[]) == 97.5
    });
    assert_eq!(metrics.sum(TIMESTAMP, &[]), (now - 60) as f64);

    // The grid-data service failed and the CronJob wrote its error page.
    write_at(&file, "<html>502 Bad Gateway</html>\n", now);
    let line = exporter.wait_for_line("carbon intensity file", Duration::from_secs(20));
    assert!(
        line.contains("WARN") && line.contains("grid-intensity"),
        "{line}"
    );
    let metrics = scrape(port).unwrap();
    assert_eq!(
        metrics.sum(INTENSITY, &[]),
        97.5,
        "the last good value was dropped"
    );
    assert_eq!(metrics.sum(TIMESTAMP, &[]), (now - 60) as f64);
}

#[test]
fn a_fixed_intensity_is_exported_and_a_negative_one_stops_the_start() {
    let port = support::free_port();
    let _exporter = LoggedChild::spawn(
        std::process::Command::new(ERGON)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .args([
                "--no-checkpoint",
                "--probe=procfs",
                "--meter=model",
                "--interval=500ms",
            ])
            .arg("--carbon-intensity=412")
            .env("NO_COLOR", "1"),
    );
    eventually(port, "the fixed value", |m| m.sum(INTENSITY, &[]) == 412.0);

    let output = std::process::Command::new(ERGON)
        .args([
            "--no-checkpoint",
            "--listen=127.0.0.1:0",
            "--carbon-intensity=-5",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--carbon-intensity `-5`"), "{stderr}");
}
