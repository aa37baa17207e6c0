//! A real `ergon` whose measurement stalls: `/healthz` fails after the
//! configured number of failed intervals, says why, and recovers; the
//! liveness gauge stops advancing meanwhile.

mod server_support;

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ergon_testkit::{Metrics, http_get};
use server_support::Binary;

fn get(port: u16, path: &str) -> (u16, String) {
    let answer = http_get(port, path).unwrap_or_default();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn last_success(port: u16) -> f64 {
    Metrics::parse(&get(port, "/metrics").1)
        .sum("ergon_last_successful_interval_timestamp_seconds", &[])
}

/// Polls `path` until its status is `want`, at most `within`.
fn wait_for(port: u16, path: &str, want: u16, within: Duration) -> (u16, String, Duration) {
    let started = Instant::now();
    loop {
        let (status, body) = get(port, path);
        if status == want || started.elapsed() > within {
            return (status, body, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn healthz_fails_after_three_failed_intervals_says_why_and_recovers() {
    // The procfs probe reads a one-cgroup tree; renaming it away makes
    // every sample fail as a vanished cgroup mount would.
    let mut exporter = Binary::spawn(&["--unhealthy-after-failed-intervals=3".into()]);
    let port = exporter.port;
    let root = exporter.cgroups.path().to_owned();
    let away = root.with_extension("away");
    let log = Arc::new(Mutex::new(String::new()));
    {
        let log = log.clone();
        let stderr = exporter.child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&(line + "\n"));
            }
        });
    }
    let (ready, body, _) = wait_for(port, "/readyz", 200, Duration::from_secs(20));
    assert_eq!(ready, 200, "{body}\n{}", log.lock().unwrap());
    assert_eq!(get(port, "/healthz").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let before = last_success(port);
    assert!(before > 1.7e9, "{before}");

    std::fs::rename(&root, &away).unwrap();
    let broke = Instant::now();
    // Two failed intervals are tolerated: still healthy 250 ms later.
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(get(port, "/healthz").0, 200, "{}", log.lock().unwrap());
    let (status, why, _) = wait_for(port, "/healthz", 503, Duration::from_secs(5));
    assert_eq!(status, 503, "{}", log.lock().unwrap());
    let failed_after = broke.elapsed();
    assert!(
        failed_after >= Duration::from_millis(400),
        "unhealthy after {failed_after:?}, before three 200 ms intervals"
    );
    assert!(
        why.contains("3 intervals")
            && why.contains(&root.display().to_string())
            && why.contains("sampling"),
        "{why}"
    );
    let logged = log.lock().unwrap().clone();
    assert!(
        logged.contains("/healthz fails from now on")
            && logged.contains(&root.display().to_string()),
        "{logged}"
    );
    // The gauge shows when measurement stopped.
    let stalled = last_success(port);
    assert!(
        stalled >= before && stalled < before + 1.5,
        "{before} {stalled}"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(last_success(port), stalled);

    std::fs::rename(&away, &root).unwrap();
    let (status, body, _) = wait_for(port, "/healthz", 200, Duration::from_secs(5));
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(last_success(port) > stalled);
}
