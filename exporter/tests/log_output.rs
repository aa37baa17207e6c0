//! The exporter's log when stderr is not a terminal (a container's log,
//! `kubectl logs`, a file): plain text. Colour codes there are noise that
//! operators' log pipelines store and grep around.

use std::process::Command;
use std::time::Duration;

use ergon_testkit::{LoggedChild, free_port};

#[test]
fn log_to_a_pipe_has_no_colour_codes() {
    let port = free_port();
    let mut exporter = LoggedChild::spawn(
        Command::new(env!("CARGO_BIN_EXE_ergon"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--probe",
                "procfs",
            ])
            .env("ERGON_LOG", "info")
            .env_remove("NO_COLOR"),
    );
    exporter.wait_for_line("serving metrics", Duration::from_secs(30));
    let coloured: Vec<&String> = exporter
        .log
        .iter()
        .filter(|l| l.contains('\u{1b}'))
        .collect();
    assert!(
        coloured.is_empty(),
        "log lines on a pipe carry ANSI escape codes: {coloured:?}"
    );
}
