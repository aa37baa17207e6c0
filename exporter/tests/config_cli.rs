//! The real `ergon` binary given bad settings, as an operator would give
//! them: on the command line, in `ERGON_*` variables and in the YAML file.
//! Each must end with exit status 2 (as clap's own errors do), one message
//! that names the setting and what it accepts, and no panic or backtrace.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

fn ergon(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(ERGON);
    command.args(args).env("NO_COLOR", "1");
    // The test's own environment must not leak settings in.
    for (name, _) in std::env::vars() {
        if name.starts_with("ERGON_") || name == "NODE_NAME" {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    // A setting that is wrongly accepted starts the exporter: stop it after
    // a while, and the missing exit status 2 fails the test.
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ergon");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("waiting for ergon").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().expect("collecting ergon's output")
}

/// Exit status 2, no panic, and stderr containing every one of `needles`.
fn assert_refused(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(2),
        "expected exit status 2; stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "a panic instead of an error:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr does not mention `{needle}`:\n{stderr}"
        );
    }
}

fn config_file(dir: &Path, text: &str) -> String {
    let path = dir.join("ergon.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn an_interval_too_long_for_a_duration_is_an_error_naming_the_flag_and_range() {
    let output = ergon(&["--interval", "99999999999999999999h"], &[]);
    assert_refused(&output, &["--interval", "100ms", "1h"]);
    let output = ergon(&[], &[("ERGON_INTERVAL", "99999999999999999999h")]);
    assert_refused(&output, &["--interval", "100ms", "1h"]);
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), "interval: 99999999999999999999h\n");
    let output = ergon(&["--config", &file], &[]);
    assert_refused(&output, &["--interval", "100ms", "1h", "ergon.yaml"]);
}

#[test]
fn a_file_key_that_is_no_setting_is_refused_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("help: true\n", "`help`"),
        ("version: true\n", "`version`"),
        ("listn: 127.0.0.1:9102\n", "`listn`"),
        ("doctor: true\n", "`doctor`"),
    ] {
        let file = config_file(dir.path(), text);
        let output = ergon(&["--config", &file], &[]);
        assert_refused(&output, &[key, "ergon.yaml", "not a setting"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.contains("Usage"),
            "{text} acted as a flag:\n{stdout}"
        );
    }
}

#[test]
fn out_of_range_settings_name_the_setting_and_what_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--interval", "10ms"], &["--interval", "100ms"]),
        (&["--retention", "99999999999h"], &["--retention", "7d"]),
        (
            &["--interval", "10s", "--retention", "5s"],
            &["--retention", "--interval"],
        ),
        (&["--max-cgroups", "0"], &["--max-cgroups", "1048576"]),
        (&["--max-processes", "99999999"], &["--max-processes"]),
        (
            &["--idle-watts", "package=1e12"],
            &["--idle-watts", "100000"],
        ),
        (&["--idle-watts", "cpu=20"], &["--idle-watts", "cpu"]),
        (&["--meter", "watt-o-meter"], &["--meter", "watt-o-meter"]),
        (&["--pod-labels", "bad key!"], &["--pod-labels", "bad key!"]),
        (&["--host-proc", missing], &["--host-proc", missing]),
        (&["--host-sys", missing], &["--host-sys", missing]),
        (&["--cgroup-root", missing], &["--cgroup-root", missing]),
        (&["--kube-api", "ftp://api.local"], &["--kube-api", "http"]),
        (&["--node-name", "Not_A_Node"], &["--node-name"]),
        (&["--listen", "localhost"], &["--listen"]),
        (&["--log", "ergon=loud"], &["--log"]),
        (
            &["--checkpoint", &format!("{missing}/sub/checkpoint.json")],
            &["--checkpoint", "directory"],
        ),
    ];
    for (args, needles) in cases {
        let output = ergon(args, &[]);
        assert_refused(&output, needles);
    }
    // The same checks apply to the environment.
    let output = ergon(&[], &[("ERGON_MAX_CGROUPS", "0")]);
    assert_refused(&output, &["--max-cgroups"]);
    let output = ergon(&[], &[("ERGON_HOST_PROC", missing)]);
    assert_refused(&output, &["--host-proc", missing]);
}

#[test]
fn file_values_of_the_wrong_shape_name_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needles) in [
        (
            "per_process: yes-please\n",
            &["--per-process", "ergon.yaml"][..],
        ),
        ("listen: {port: 1}\n", &["`listen`", "ergon.yaml"][..]),
        ("max-cgroups: -1\n", &["--max-cgroups", "ergon.yaml"][..]),
        ("listen:\n", &["`listen`", "ergon.yaml"][..]),
    ] {
        let file = config_file(dir.path(), text);
        let output = ergon(&["--config", &file], &[]);
        assert_refused(&output, needles);
    }
}

/// The same bad value given as a flag, as its `ERGON_*` variable and as a
/// key of the YAML file: refused each time, naming the flag and `needles`
/// (and the file, for the file).
fn refused_from_every_source(flag: &str, variable: &str, value: &str, needles: &[&str]) {
    let mut named = vec![flag];
    named.extend_from_slice(needles);
    let output = ergon(&[&format!("{flag}={value}")], &[]);
    assert_refused(&output, &named);
    let output = ergon(&[], &[(variable, value)]);
    assert_refused(&output, &named);
    let dir = tempfile::tempdir().unwrap();
    let key = flag.trim_start_matches("--");
    // Quoted: the value reaches the flag's parser as written.
    let file = config_file(dir.path(), &format!("{key}: '{value}'\n"));
    named.push("ergon.yaml");
    let output = ergon(&["--config", &file], &[]);
    assert_refused(&output, &named);
}

#[test]
fn the_kubelet_poll_period_is_ranged_in_every_source() {
    // 1e19 s overflowed the poller's `Instant + period` (a panic in its
    // task, pod names silently frozen); 1 µs polled the kubelet in a loop.
    for value in ["10000000000000000000", "0.000001", "1ns", "500ms", "2h"] {
        refused_from_every_source(
            "--kubelet-poll-period",
            "ERGON_KUBELET_POLL_PERIOD",
            value,
            &["1s", "1h"],
        );
    }
}

#[test]
fn the_map_memory_budget_is_ranged_in_every_source() {
    // 2^64-1 MiB overflowed `mib * 1024 * 1024`; 0 left no map memory.
    for value in ["18446744073709551615", "17592186044416", "0"] {
        refused_from_every_source(
            "--map-memory-budget-mib",
            "ERGON_MAP_MEMORY_BUDGET_MIB",
            value,
            &["1", "65536"],
        );
    }
}

#[test]
fn carbon_intensity_is_a_number_in_range_or_a_file_in_an_existing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/intensity");
    for value in [
        "35O",
        "350gCO2",
        "-5",
        "20000",
        "NaN",
        "inf",
        missing.to_str().unwrap(),
    ] {
        refused_from_every_source(
            "--carbon-intensity",
            "ERGON_CARBON_INTENSITY",
            value,
            &[value, "10000"],
        );
    }
}

#[test]
fn kubelet_cgroup_roots_and_max_watts_are_checked_with_the_rest() {
    refused_from_every_source(
        "--kubelet-cgroup-root",
        "ERGON_KUBELET_CGROUP_ROOT",
        "kubelet.slice",
        &["kubelet.slice", "absolute"],
    );
    refused_from_every_source(
        "--max-watts",
        "ERGON_MAX_WATTS",
        "package=1e6",
        &["package=1e6", "100000"],
    );
}

#[test]
fn the_otlp_endpoint_and_tls_files_are_checked_before_anything_starts() {
    for value in ["https://collector:4318", "http://collector:43x8", "http://"] {
        refused_from_every_source(
            "--otlp-endpoint",
            "ERGON_OTLP_ENDPOINT",
            value,
            &[value, "http://otel-collector:4318"],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let present = dir.path().join("tls.crt");
    std::fs::write(&present, "not checked here\n").unwrap();
    let present = present.to_str().unwrap();
    let missing = dir.path().join("missing.key");
    let missing = missing.to_str().unwrap();
    let a_directory = dir.path().to_str().unwrap();
    for (cert, key, named) in [
        (missing, present, "--tls-cert-file"),
        (present, missing, "--tls-key-file"),
        (a_directory, present, "--tls-cert-file"),
    ] {
        let output = ergon(&["--tls-cert-file", cert, "--tls-key-file", key], &[]);
        let path = if named == "--tls-cert-file" {
            cert
        } else {
            key
        };
        assert_refused(&output, &[named, path]);
    }
}
