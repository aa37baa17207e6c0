//! A real `ergon` process without the capabilities eBPF needs takes the
//! procfs fallback, says why in its log, and still serves usage; one that
//! may not `chroot` loads the probe all the same, with aya's parse of the
//! kernel's BTF that the chroot avoids, and says so once; one holding only
//! the chart's least-privilege capabilities loads the probe without it.

use ergon_testkit as support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use support::{LoggedChild, free_port, http_get};

/// A real `ergon` on a free port, logging at info, with the capabilities
/// `dropped` removed from its bounding set, so that even root cannot hold
/// them after exec; `extra` flags, else no checkpoint (nothing to restore,
/// and no state left in /var/lib/ergon).
fn exporter_without(dropped: Vec<i32>, extra: &[String]) -> (LoggedChild, u16) {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ergon"));
    command
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "200ms",
        ])
        .args(if extra.is_empty() {
            vec!["--no-checkpoint".to_string()]
        } else {
            extra.to_vec()
        })
        .env("ERGON_LOG", "info")
        .env("NO_COLOR", "1");
    // SAFETY: prctl is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for &cap in &dropped {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    (LoggedChild::spawn(&mut command), port)
}

/// `/metrics` once usage appears in it (an interval has seen some cgroup
/// run), or the last answer after 10 s.
fn metrics_with_usage(port: u16) -> String {
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = http_get(port, "/metrics").unwrap_or_default();
        if metrics.contains("ergon_system_cpu_seconds_total") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    metrics
}

#[test]
fn without_bpf_capabilities_the_exporter_falls_back_and_says_why() {
    // CAP_SYS_ADMIN (21), CAP_PERFMON (38), CAP_BPF (39).
    let (mut exporter, port) = exporter_without(vec![21, 38, 39], &[]);
    let fallback_line = exporter.wait_for_line("falling back to procfs", Duration::from_secs(30));
    assert!(
        fallback_line.contains("CAP_BPF") && fallback_line.contains("privileged"),
        "the fallback line must say why and what to do: {fallback_line}"
    );
    // Served, and labelled as procfs.
    let metrics = metrics_with_usage(port);
    assert!(
        metrics.contains(r#"ergon_probe_info{mode="procfs",hook="none",pmu="none"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("ergon_system_cpu_seconds_total"));
}

#[test]
fn without_chroot_the_probe_still_loads_and_the_log_says_what_it_costs() {
    // CAP_SYS_CHROOT (18).
    let (mut exporter, _port) = exporter_without(vec![18], &[]);
    let line = exporter.wait_for_line("could not chroot", Duration::from_secs(30));
    assert!(
        line.contains("CAP_SYS_CHROOT") && line.contains("memory peak"),
        "the line must say what is lost and what would avoid it: {line}"
    );
    let attached = exporter.wait_for_line("eBPF probe attached", Duration::from_secs(30));
    assert!(attached.contains("mode=ebpf"), "{attached}");
}

/// The capabilities of the chart's `securityProfile: least-privilege`
/// (`leastPrivilege.capabilities` in values.yaml, the kustomize overlay):
/// CAP_SYS_CHROOT (18), CAP_PERFMON (38), CAP_BPF (39).
const LEAST_PRIVILEGE: [i32; 3] = [18, 38, 39];

/// ...and reads the meter (a powercap zone whose `energy_uj` is root's and
/// mode 0400, as the kernel makes it: uid 0 reads it as its owner, no
/// DAC-override capability needed) and writes its checkpoint.
#[test]
fn with_only_the_least_privilege_capabilities_the_probe_loads_and_the_meter_is_read() {
    let last: i32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("reading /proc/sys/kernel/cap_last_cap")
        .trim()
        .parse()
        .expect("cap_last_cap is a number");
    let dropped = (0..=last)
        .filter(|cap| !LEAST_PRIVILEGE.contains(cap))
        .collect();
    let rapl = support::FakeRapl::start(40.0);
    let energy = rapl
        .host_sys
        .path()
        .join("class/powercap/intel-rapl:0/energy_uj");
    std::fs::set_permissions(&energy, std::fs::Permissions::from_mode(0o400)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (mut exporter, port) = exporter_without(
        dropped,
        &[
            rapl.host_sys_arg(),
            format!("--cgroup-root={}", support::cgroup2_root().display()),
            "--meter=rapl".into(),
            format!("--state-dir={}", state.path().display()),
        ],
    );
    let attached = exporter.wait_for_line("eBPF probe attached", Duration::from_secs(30));
    assert!(attached.contains("mode=ebpf"), "{attached}");
    // ...and on the cheap path: the verifier let it read the task's fields.
    assert!(
        attached.contains("hook=tp_btf") && attached.contains("reads=fields"),
        "{attached}"
    );
    // The loader's chroot comes before the attach line: had it failed, its
    // line would be in the log by now.
    assert!(
        !exporter
            .log
            .iter()
            .any(|line| line.contains("could not chroot")),
        "the least-privilege set must let the loader skip aya's BTF parse:\n{}",
        exporter.log.join("\n")
    );
    let metrics = metrics_with_usage(port);
    assert!(
        metrics.contains(r#"ergon_probe_info{mode="ebpf""#),
        "served from the probe: {metrics}"
    );
    let body = |answer: &str| {
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    };
    let metrics = support::Metrics::parse(&body(&metrics));
    assert_eq!(
        metrics.sum("ergon_meter_up", &[("source", "rapl")]),
        1.0,
        "the powercap zone is read: {:?}\n{}",
        metrics.samples,
        exporter.log.join("\n")
    );
    // Energy is measured, not estimated: the zone's counter reaches the
    // node's counter.
    let started = std::time::Instant::now();
    let node = || {
        support::Metrics::parse(&body(&http_get(port, "/metrics").unwrap_or_default())).sum(
            "ergon_node_energy_joules_total",
            &[("source", "rapl"), ("domain", "package")],
        )
    };
    while node() <= 0.0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(node() > 0.0, "{}", exporter.log.join("\n"));
    // The checkpoint is written into the state directory.
    let started = std::time::Instant::now();
    let written = || {
        std::fs::read_dir(state.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
    };
    while !written() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        written(),
        "no checkpoint in {}: {}",
        state.path().display(),
        exporter.log.join("\n")
    );
}
