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
