//! `ergon doctor`: what this node offers Ergon, and how to fix what is off.

use std::path::Path;

use crate::config::Cli;
use crate::probe::ebpf::EbpfProbe;
use crate::probe::{Probe, ProbeConfig, ProbeMode, map_memory};

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

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The kernel maps' memory now (the kernel's own figure) and at worst (every
/// entry used) on this node and on a 192-CPU one, with and without
/// `--per-process`: what the pod's memory limit has to hold.
fn map_memory_checks(probe: &EbpfProbe, config: &ProbeConfig) -> Vec<Check> {
    let layout = probe.layout();
    let mut checks = Vec::new();
    match probe.map_memory() {
        Ok(maps) => {
            let total: u64 = maps.iter().map(|m| m.bytes).sum();
            let mut largest: Vec<_> = maps.iter().filter(|m| m.bytes >= 64 * 1024).collect();
            largest.sort_by_key(|m| std::cmp::Reverse(m.bytes));
            let parts: Vec<String> = largest
                .iter()
                .map(|m| format!("{} {}", m.name, mib(m.bytes)))
                .collect();
            checks.push(Check {
                name: "map memory",
                ok: total <= layout.budget_bytes,
                detail: format!(
                    "{} now, kernel's memlock figure ({}); maps {}",
                    mib(total),
                    if parts.is_empty() {
                        "no map over 64 KiB".into()
                    } else {
                        parts.join(", ")
                    },
                    layout.allocated.name()
                ),
                fix: Some("raise --map-memory-budget-mib and the pod's memory limit".into()),
            });
        }
        Err(e) => checks.push(Check {
            name: "map memory",
            ok: false,
            detail: format!("not readable: {e}"),
            fix: Some("/proc/self/fdinfo must be readable".into()),
        }),
    }
    for cpus in [layout.possible_cpus, map_memory::BIG_NODE_CPUS] {
        let projection: Vec<String> = [(false, "default"), (true, "--per-process")]
            .iter()
            .map(|(per_process, label)| {
                let bounds = config.map_bounds(*per_process, cpus, layout.allocated);
                format!(
                    "{label}: cgroups ≤ {} → {}",
                    bounds.cgroups,
                    mib(bounds.full_bytes)
                )
            })
            .collect();
        checks.push(Check {
            name: if cpus == layout.possible_cpus {
                "maps worst, here"
            } else {
                "maps worst, 192"
            },
            ok: true,
            detail: format!(
                "{cpus} CPUs, every entry used: {} (budget {})",
                projection.join("; "),
                mib(layout.budget_bytes)
            ),
            fix: None,
        });
    }
    checks
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
        Ok(probe) => {
            checks.push(Check {
                name: "probe",
                ok: true,
                detail: probe.info().to_string(),
                fix: None,
            });
            if let Probe::Ebpf(ebpf) = &probe {
                checks.extend(map_memory_checks(ebpf, &config));
            }
        }
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
    let mode = if cli.host_sys.join("fs/cgroup/cgroup.controllers").exists() {
        "unified (v2 only)"
    } else if cli
        .host_sys
        .join("fs/cgroup/unified/cgroup.controllers")
        .exists()
    {
        "hybrid (v1 controllers, v2 at fs/cgroup/unified)"
    } else {
        "v1 only: no cgroup v2 hierarchy"
    };
    checks.push(Check {
        name: "cgroup mode",
        ok: !mode.starts_with("v1"),
        detail: mode.into(),
        fix: Some("boot with systemd.unified_cgroup_hierarchy=1 (or at least hybrid)".into()),
    });

    match cli.meter_config() {
        Ok(config) => {
            let meters = crate::meter::detect(&config);
            let measured: Vec<&str> = meters
                .iter()
                .filter(|m| !m.is_estimate())
                .map(|m| m.source())
                .collect();
            let estimated = meters.iter().any(|m| m.is_estimate());
            checks.push(Check {
                name: "energy meters",
                ok: !measured.is_empty(),
                detail: if measured.is_empty() && estimated {
                    "none measured: energy is estimated by the model (source=\"model\")".into()
                } else {
                    format!("measured by {}", measured.join(", "))
                },
                fix: Some(
                    "RAPL needs /sys/class/powercap (intel_rapl_common) or the perf power PMU and \
                     root to read energy_uj; on VMs, fit the model on the same hardware \
                     (--model-fit-output) and load it with --model-coefficients"
                        .into(),
                ),
            });
            let mut down = Vec::new();
            for meter in &meters {
                for zone in meter.health().down() {
                    down.push(format!(
                        "{} zone {}: {}",
                        meter.source(),
                        zone.zone,
                        zone.reason.as_deref().unwrap_or("not read")
                    ));
                }
            }
            checks.push(Check {
                name: "meter zones",
                ok: down.is_empty(),
                detail: if down.is_empty() {
                    "every zone of every meter found is read".into()
                } else {
                    // The other zones are read; these are missing from the totals.
                    format!("not read: {}", down.join("\n                         "))
                },
                fix: Some(
                    "each line names the file or call and what it gave; fix or reload the driver \
                     (intel_rapl_msr, the hwmon driver, nvidia), check the file's permissions; \
                     the zone is picked up again without a restart"
                        .into(),
                ),
            });
            checks.push(Check {
                name: "NVML",
                ok: meters.iter().any(|m| m.source() == "nvml"),
                detail: "NVIDIA GPUs through libnvidia-ml.so".into(),
                fix: Some(
                    "install the NVIDIA driver on the node and mount libnvidia-ml.so.1 into the \
                     pod (or pass --nvml-library); nodes without GPUs need nothing"
                        .into(),
                ),
            });
        }
        Err(e) => checks.push(Check {
            name: "energy meters",
            ok: false,
            detail: e,
            fix: Some("fix --meter / --model-coefficients".into()),
        }),
    }

    let kube = if cli.kube_api.is_some() || cli.kubeconfig.is_some() {
        Some("configured by flag")
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        Some("in-cluster service account")
    } else {
        None
    };
    checks.push(Check {
        name: "Kubernetes",
        ok: kube.is_some() && cli.node_name.is_some(),
        detail: match (kube, &cli.node_name) {
            (Some(how), Some(node)) => format!("{how}, watching pods of node {node}"),
            (Some(how), None) => format!("{how}, but NODE_NAME is not set"),
            (None, _) => "no API configured: pods are labelled by uid only".into(),
        },
        fix: Some(
            "in the DaemonSet, set NODE_NAME from spec.nodeName and give the service account \
             list and watch on pods; outside a cluster pass --kubeconfig"
                .into(),
        ),
    });
    print(&checks);
    Ok(())
}
