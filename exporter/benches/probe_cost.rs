//! Probe cost per context switch, from the kernel's own `bpf_stats`.
//!
//! Loads Ergon's accounting program and an empty program on the same hook,
//! turns `kernel.bpf_stats_enabled` on, drives a context-switch storm
//! (`perf bench sched pipe`), and prints `run_time_ns / run_cnt` of both.
//! The difference is what Ergon adds per switch; the empty program carries
//! the hook's own dispatch cost, so machine noise cancels.
//!
//! Run: `cargo xtask bench` (as root).

use std::process::Command;
use std::time::Duration;

use ergon::probe::ebpf::{EbpfProbe, EmptyProgram};
use ergon::probe::{HookChoice, PmuChoice, ProbeConfig, ProbeMode};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Restores `kernel.bpf_stats_enabled` on drop.
struct StatsOn(String);
impl StatsOn {
    fn enable() -> StatsOn {
        let before = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
        std::fs::write(STATS, "1").expect("enabling bpf_stats needs root");
        StatsOn(before.trim().to_owned())
    }
}
impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS, &self.0);
    }
}

fn per_run(stats: Option<(Duration, u64)>) -> (f64, u64) {
    let (time, runs) = stats.expect("program stats readable");
    (time.as_nanos() as f64 / runs.max(1) as f64, runs)
}

fn storm() {
    // 200k round trips of a pipe between two tasks: ~800k switches.
    let status = Command::new("perf")
        .args(["bench", "sched", "pipe", "-l", "200000"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("perf (Debian package linux-perf) is installed by `cargo xtask setup`");
    assert!(status.success(), "perf bench failed");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (hook, choice) in [
        ("tp_btf", HookChoice::TpBtf),
        ("tracepoint", HookChoice::Tracepoint),
    ] {
        let config = ProbeConfig {
            mode: ProbeMode::Ebpf,
            hook: choice,
            pmu: PmuChoice::Off,
            ..ProbeConfig::local()
        };
        let probe = EbpfProbe::start(&config).expect("loading the probe (run as root)");
        let empty =
            EmptyProgram::attach(hook, &config.host_sys).expect("loading the empty program");
        let stats = StatsOn::enable();
        let (probe_before, empty_before) = (probe.program_stats(), empty.stats());
        storm();
        let (probe_after, empty_after) = (probe.program_stats(), empty.stats());
        drop(stats);
        let diff = |a: Option<(Duration, u64)>, b: Option<(Duration, u64)>| {
            let (a, b) = (a.unwrap(), b.unwrap());
            Some((a.0 - b.0, a.1 - b.1))
        };
        let (ergon_ns, runs) = per_run(diff(probe_after, probe_before));
        let (empty_ns, _) = per_run(diff(empty_after, empty_before));
        println!(
            "probe_cost hook={hook} switches={runs} ergon_ns_per_switch={ergon_ns:.1} \
             empty_ns_per_switch={empty_ns:.1} added_ns_per_switch={:.1}",
            ergon_ns - empty_ns
        );
    }
}
