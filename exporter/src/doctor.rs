//! `ergon doctor`: what this node offers Ergon, and how to fix what is off.

use std::path::Path;

use crate::config::Cli;
use crate::probe::{Probe, ProbeMode};

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

fn print(checks: &[Check]) {
    for check in checks {
        let mark = if check.ok { "ok " } else { "OFF" };
        println!("[{mark}] {:<18} {}", check.name, check.detail);
        if let (false, Some(fix)) = (check.ok, &check.fix) {
            println!("      fix: {fix}");
        }
    }
}

pub fn run(cli: &Cli) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let kernel = std::fs::read_to_string(cli.host_proc.join("sys/kernel/osrelease"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    checks.push(Check {
        name: "kernel",
        ok: true,
        detail: kernel,
        fix: None,
    });
    let btf = cli.host_sys.join("kernel/btf/vmlinux");
    checks.push(Check {
        name: "BTF",
        ok: btf.exists(),
        detail: btf.display().to_string(),
        fix: Some("a kernel built with CONFIG_DEBUG_INFO_BTF=y; without it the classic tracepoint is used".into()),
    });
    let tracefs = Path::new("/sys/kernel/tracing/events/sched/sched_switch");
    checks.push(Check {
        name: "tracefs",
        ok: tracefs.exists(),
        detail: "needed only by the classic tracepoint hook".into(),
        fix: Some("mount -t tracefs tracefs /sys/kernel/tracing".into()),
    });
    let cgroup_root = cli.cgroup_root();
    checks.push(Check {
        name: "cgroup v2",
        ok: cgroup_root.join("cgroup.controllers").exists(),
        detail: cgroup_root.display().to_string(),
        fix: Some("mount cgroup2 (unified or hybrid) and pass --cgroup-root".into()),
    });
    let mut config = cli.probe_config();
    if config.mode == ProbeMode::Auto {
        config.mode = ProbeMode::Ebpf;
    }
    match Probe::start(&config) {
        Ok(probe) => checks.push(Check {
            name: "probe",
            ok: true,
            detail: probe.info().to_string(),
            fix: None,
        }),
        Err(e) => checks.push(Check {
            name: "probe",
            ok: false,
            detail: format!("eBPF unavailable: {e}"),
            fix: Some(
                "run privileged or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN; the exporter will \
                 use procfs accounting meanwhile"
                    .into(),
            ),
        }),
    }
    print(&checks);
    Ok(())
}
