//! A real `ergon` process without the capabilities eBPF needs takes the
//! procfs fallback, says why in its log, and still serves usage; one that
//! may not `chroot` loads the probe all the same, with aya's parse of the
//! kernel's BTF that the chroot avoids, and says so once.

use ergon_testkit as support;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use support::{LoggedChild, free_port, http_get};

/// A real `ergon` on a free port, logging at info, with the capabilities
/// `dropped` removed from its bounding set, so that even root cannot hold
/// them after exec.
fn exporter_without(dropped: &'static [i32]) -> (LoggedChild, u16) {
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
    // SAFETY: prctl is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for &cap in dropped {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    (LoggedChild::spawn(&mut command), port)
}

#[test]
fn without_bpf_capabilities_the_exporter_falls_back_and_says_why() {
    // CAP_SYS_ADMIN (21), CAP_PERFMON (38), CAP_BPF (39).
    let (mut exporter, port) = exporter_without(&[21, 38, 39]);
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

#[test]
fn without_chroot_the_probe_still_loads_and_the_log_says_what_it_costs() {
    // CAP_SYS_CHROOT (18).
    let (mut exporter, _port) = exporter_without(&[18]);
    let line = exporter.wait_for_line("could not chroot", Duration::from_secs(30));
    assert!(
        line.contains("CAP_SYS_CHROOT") && line.contains("memory peak"),
        "the line must say what is lost and what would avoid it: {line}"
    );
    let attached = exporter.wait_for_line("eBPF probe attached", Duration::from_secs(30));
    assert!(attached.contains("mode=ebpf"), "{attached}");
}
