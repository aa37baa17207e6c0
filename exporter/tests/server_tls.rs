//! HTTPS with a real TLS client (Debian's curl), certificates made by
//! Debian's openssl, and a certificate rotated while the server runs.

mod server_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ergon::export::{ServerOptions, TlsFiles, tls_acceptor};
use ergon_testkit::tls::self_signed;
use server_support::{Binary, TestServer, report_of_pods};

/// `curl` trusting only `ca`: the HTTP status, or curl's error.
fn curl(port: u16, path: &str, ca: &Path) -> Result<(u16, String), String> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("running curl");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Ok((code.trim().parse().unwrap(), body.to_owned()))
}

#[test]
fn metrics_over_https_and_a_rotated_certificate_is_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (first_cert, first_key) = self_signed(dir.path(), "first");
    let (second_cert, second_key) = self_signed(dir.path(), "second");
    // The files the server reads, replaced in place later as a renewed
    // Secret is.
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    std::fs::copy(&first_cert, &files.cert).unwrap();
    std::fs::copy(&first_key, &files.key).unwrap();
    let options = ServerOptions {
        tls: Some(tls_acceptor(&files).expect("the first pair loads")),
        ..ServerOptions::default()
    };
    let server = TestServer::start(report_of_pods(3), options);

    let (status, body) = curl(server.port, "/metrics", &first_cert).expect("scrape over TLS");
    assert_eq!(status, 200);
    assert!(body.contains("ergon_pod_energy_joules_total{"), "{body}");
    assert_eq!(curl(server.port, "/healthz", &first_cert).unwrap().0, 200);
    // Plain HTTP on the TLS port gets no metrics.
    let plain = server_support::raw_request(
        server.port,
        b"GET /metrics HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        plain.as_deref().is_none_or(|a| !a.contains("ergon_")),
        "{plain:?}"
    );
    // A client that trusts only the second certificate refuses the first.
    assert!(curl(server.port, "/metrics", &second_cert).is_err());

    // Rotation: the key first, then the certificate; in between the pair
    // does not match, and the server keeps the first one.
    let staged = dir.path().join("staged");
    std::fs::copy(&second_key, &staged).unwrap();
    std::fs::rename(&staged, &files.key).unwrap();
    let (status, _) = curl(server.port, "/healthz", &first_cert)
        .expect("a half-rotated pair leaves the first certificate in use");
    assert_eq!(status, 200);
    std::fs::copy(&second_cert, &staged).unwrap();
    std::fs::rename(&staged, &files.cert).unwrap();
    let rotated = Instant::now();
    let served = loop {
        match curl(server.port, "/metrics", &second_cert) {
            Ok(answer) => break answer,
            Err(e) if rotated.elapsed() > Duration::from_secs(5) => {
                panic!("the rotated certificate was not served within 5 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(served.0, 200);
    let old = curl(server.port, "/metrics", &first_cert).unwrap_err();
    assert!(old.to_lowercase().contains("certificate"), "{old}");
}

#[test]
fn unusable_tls_files_are_refused_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "pair");
    let (_, other_key) = self_signed(dir.path(), "other");
    let missing = TlsFiles {
        cert: dir.path().join("absent.crt"),
        key: key.clone(),
    };
    let err = tls_acceptor(&missing).err().unwrap().to_string();
    assert!(err.contains("absent.crt"), "{err}");
    let swapped = TlsFiles {
        cert: key.clone(),
        key: cert.clone(),
    };
    let err = tls_acceptor(&swapped).err().unwrap().to_string();
    assert!(
        err.contains("pair.key") && err.contains("--tls-cert-file"),
        "{err}"
    );
    let mismatched = TlsFiles {
        cert: cert.clone(),
        key: other_key,
    };
    let err = tls_acceptor(&mismatched).err().unwrap().to_string();
    assert!(
        err.contains("other.key") && err.contains("does not belong"),
        "{err}"
    );
}

#[test]
fn the_binary_serves_https_with_the_tls_flags_and_refuses_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "node");
    let exporter = Binary::spawn(&[
        format!("--tls-cert-file={}", cert.display()),
        format!("--tls-key-file={}", key.display()),
    ]);
    let started = Instant::now();
    while !matches!(curl(exporter.port, "/readyz", &cert), Ok((200, _))) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the binary was not ready over HTTPS within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, metrics) = curl(exporter.port, "/metrics", &cert).unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ergon_probe_info{mode=\"procfs\"")
            && metrics.contains("ergon_last_successful_interval_timestamp_seconds"),
        "{metrics}"
    );
    drop(exporter);

    let missing = dir.path().join("missing.crt");
    let (ok, stderr) = Binary::spawn(&[
        format!("--tls-cert-file={}", missing.display()),
        format!("--tls-key-file={}", key.display()),
    ])
    .exit();
    assert!(!ok && stderr.contains("missing.crt"), "{stderr}");
}
