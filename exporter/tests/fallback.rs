//! A real `ergon` process without the capabilities eBPF needs takes the
//! procfs fallback, says why in its log, and still serves usage.

use ergon_testkit as support;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use support::{LoggedChild, free_port, http_get};

#[test]
fn without_bpf_capabilities_the_exporter_falls_back_and_says_why() {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ergon"));
    command
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "200ms",
            // Nothing to restore, and no state left in /var/lib/ergon.
            "--no-checkpoint",
        ])
        .env("ERGON_LOG", "info")
        .env("NO_COLOR", "1");
    // CAP_SYS_ADMIN (21), CAP_PERFMON (38), CAP_BPF (39): dropped from the
    // bounding set, so even root cannot hold them after exec.
    // SAFETY: prctl is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            for cap in [21, 38, 39] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut exporter = LoggedChild::spawn(&mut command);
    let fallback_line = exporter.wait_for_line("falling back to procfs", Duration::from_secs(30));
    assert!(
        fallback_line.contains("CAP_BPF") && fallback_line.contains("privileged"),
        "the fallback line must say why and what to do: {fallback_line}"
    );
    // Served, and labelled as procfs.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = http_get(port, "/metrics").unwrap_or_default();
        // Usage appears once an interval has seen some cgroup run.
        if metrics.contains("ergon_system_cpu_seconds_total") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metrics.contains(r#"ergon_probe_info{mode="procfs",hook="none",pmu="none"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("ergon_system_cpu_seconds_total"));
}
