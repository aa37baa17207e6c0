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
fn healthz_fails_after_the_configured_failed_intervals_says_why_and_recovers() {
    // The procfs probe reads a one-cgroup tree; renaming it away makes
    // every sample fail as a vanished cgroup mount would.
    // Four, not the default three: the flag must reach the health state.
    let mut exporter = Binary::spawn(&["--unhealthy-after-failed-intervals=4".into()]);
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
    // Three failed intervals are tolerated: still healthy 250 ms later.
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(get(port, "/healthz").0, 200, "{}", log.lock().unwrap());
    let (status, why, _) = wait_for(port, "/healthz", 503, Duration::from_secs(5));
    assert_eq!(status, 503, "{}", log.lock().unwrap());
    let failed_after = broke.elapsed();
    assert!(
        failed_after >= Duration::from_millis(400),
        "unhealthy after {failed_after:?}, before four 200 ms intervals"
    );
    assert!(
        why.contains("4 intervals")
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

/// One garbled cgroup costs only itself: it is counted by reason in
/// `ergon_probe_skipped_total`, and the sample, `/healthz` and the liveness
/// gauge go on.
#[test]
fn one_unreadable_cgroup_is_skipped_and_counted_not_the_sample() {
    let exporter = Binary::spawn(&[]);
    let port = exporter.port;
    let broken = exporter.cgroups.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("cpu.stat"), "garbage\n").unwrap();
    let (ready, body, _) = wait_for(port, "/readyz", 200, Duration::from_secs(20));
    assert_eq!(ready, 200, "{body}");
    let skipped = || {
        Metrics::parse(&get(port, "/metrics").1).sum(
            "ergon_probe_skipped_total",
            &[("kind", "cgroup"), ("reason", "unparsable")],
        )
    };
    let started = Instant::now();
    while skipped() < 2.0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = skipped();
    assert!(first >= 2.0, "{}", get(port, "/metrics").1);
    let measured = last_success(port);
    std::thread::sleep(Duration::from_millis(600));
    assert!(skipped() > first, "skipped at every sample");
    assert!(last_success(port) > measured, "the samples still succeed");
    assert_eq!(get(port, "/healthz").0, 200);
}
