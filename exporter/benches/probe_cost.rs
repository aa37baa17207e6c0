//! Probe cost per context switch, from the kernel's own `bpf_stats`.
//!
//! Loads Ergon's accounting program and an empty program on the same hook,
//! turns `kernel.bpf_stats_enabled` on, drives a context-switch storm
//! (`perf bench sched pipe`), and reads `run_time_ns / run_cnt` of both.
//! Both programs run at every switch of the same storm, so the difference is
//! what Ergon adds; the empty program carries the hook's dispatch and the
//! stats' own clock reads, which therefore cancel. Three storms per hook,
//! median of the differences; both hooks (`tp_btf` and the classic
//! tracepoint) are measured.
//!
//! Position matters: the first program on the hook after a context switch
//! runs ~50 ns slower than the same program later in the chain (measured
//! here with two copies of Ergon's program attached one after the other:
//! 156 and 108 ns). So a *leader*, one more empty program, is attached
//! first and takes that cost (reported as `leader_ns`); Ergon's program
//! comes second, before the empty reference and the ladder, so it still
//! pays for every cache miss on its own data, and the empty reference it is
//! compared with sits in a position like its own.
//!
//! On `tp_btf` the same storms also price the probe's anatomy, the way
//! cloudflare/ebpf_exporter benchmarks empty, simple and complex probes: a
//! ladder of programs (`ergon_ebpf::PROG_LADDER_BTF`), each one step more of
//! the accounting program than the last (the empty program, then the clock
//! read, the cgroup id, the cgroup map's lookup and update, the per-CPU
//! state, and finally the full program), with two side rungs for the helper
//! calls the first two steps replace, all attached at once, so each step's
//! cost is the difference of neighbours in one run.
//!
//! Each hook is measured twice: as it runs where the kernel has BTF (the
//! task's fields read directly; `tp_btf`, `tracepoint`) and with helper
//! calls, as it runs where the kernel has none (`tp_btf_helpers`,
//! `tracepoint_helpers`).
//!
//! Prints `result probe_cost.foreign_programs` (other `sched_switch`
//! programs found loaded at the start: a run with any is flattered) and
//! `result probe_cost.<hook>[_helpers].{ergon_ns,empty_ns,added_ns,leader_ns,switches}`
//! and `result probe_cost.tp_btf.ladder.<rung>_ns` (median of the storms).
//! Run: `cargo xtask bench` (as root), or alone:
//! `cargo bench -p ergon --bench probe_cost`.

mod common;

use std::process::Command;
use std::time::Duration;

use ergon::probe::ebpf::{EbpfProbe, ReferenceProgram};
use ergon::probe::{HookChoice, PmuChoice, ProbeConfig, ProbeMode};

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
const STORMS_PER_HOOK: usize = 3;
/// Round trips of the pipe per storm (~1 s here).
const ROUND_TRIPS: &str = "400000";

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

fn storm() {
    let status = Command::new("perf")
        .args(["bench", "sched", "pipe", "-l", ROUND_TRIPS])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("perf (Debian package linux-perf) is installed by `cargo xtask setup`");
    assert!(status.success(), "perf bench sched pipe failed: {status}");
}

/// `(run time, runs)` between two readings of `bpf_stats`.
fn between(before: Option<(Duration, u64)>, after: Option<(Duration, u64)>) -> (Duration, u64) {
    let ((time_0, runs_0), (time_1, runs_1)) = (
        before.expect("program stats readable"),
        after.expect("program stats readable"),
    );
    (time_1 - time_0, runs_1 - runs_0)
}

fn ns_per_run((time, runs): (Duration, u64)) -> f64 {
    assert!(runs > 0, "the program never ran: is it attached?");
    time.as_nanos() as f64 / runs as f64
}

/// Programs already loaded with `sched_switch` in their name (other
/// exporters, other sessions' tests). Attached ahead of ours on the hook,
/// they read the same task and cgroup data first and flatter every figure
/// behind them, so a run that had any is to be discounted.
fn foreign_sched_switch_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.contains("sched_switch")))
        .count()
}

fn main() {
    if !common::benchmarking() {
        return;
    }
    common::unwind_on_interrupt();
    let foreign = foreign_sched_switch_programs();
    if foreign > 0 {
        eprintln!(
            "probe_cost: {foreign} other sched_switch program(s) already loaded (`bpftool prog show`): \
             they may run ahead of ours and flatter these figures; discount this run"
        );
    }
    common::result("probe_cost.foreign_programs", foreign as f64);
    // Each hook as it runs where the kernel has BTF (the task's fields read
    // directly), then as it runs where it has none (helper calls): the
    // fallback's price.
    for (label, hook, choice, reads) in [
        ("tp_btf", "tp_btf", HookChoice::TpBtf, "fields"),
        ("tracepoint", "tracepoint", HookChoice::Tracepoint, "fields"),
        ("tp_btf_helpers", "tp_btf", HookChoice::TpBtf, "helpers"),
        (
            "tracepoint_helpers",
            "tracepoint",
            HookChoice::Tracepoint,
            "helpers",
        ),
    ] {
        let config = ProbeConfig {
            mode: ProbeMode::Ebpf,
            hook: choice,
            pmu: PmuChoice::Off,
            read_task_fields: reads == "fields",
            ..ProbeConfig::local()
        };
        let leader =
            ReferenceProgram::empty(hook, &config.host_sys).expect("loading the leading program");
        let probe = EbpfProbe::start(&config).expect("loading the probe (run as root)");
        assert_eq!(
            (probe.info().hook, probe.info().reads),
            (hook, reads),
            "the probe did not load as this measurement needs"
        );
        let empty =
            ReferenceProgram::empty(hook, &config.host_sys).expect("loading the empty program");
        let ladder: Vec<(&str, ReferenceProgram)> = if label == "tp_btf" {
            ergon_ebpf::PROG_LADDER_BTF
                .iter()
                .map(|(rung, program)| {
                    let loaded = ReferenceProgram::tp_btf(program, &config.host_sys)
                        .unwrap_or_else(|e| panic!("loading ladder rung {rung}: {e}"));
                    (*rung, loaded)
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut ladder_ns: Vec<Vec<f64>> = vec![Vec::new(); ladder.len()];
        let _stats = StatsOn::enable();
        let (mut ergon_ns, mut empty_ns, mut added_ns, mut switches, mut leader_ns) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..STORMS_PER_HOOK {
            common::check_interrupt();
            let (probe_before, empty_before) = (probe.program_stats(), empty.stats());
            let leader_before = leader.stats();
            let rungs_before: Vec<_> = ladder.iter().map(|(_, p)| p.stats()).collect();
            storm();
            for ((rung_ns, (_, program)), before) in
                ladder_ns.iter_mut().zip(&ladder).zip(rungs_before)
            {
                rung_ns.push(ns_per_run(between(before, program.stats())));
            }
            let ergon = between(probe_before, probe.program_stats());
            let baseline = between(empty_before, empty.stats());
            leader_ns.push(ns_per_run(between(leader_before, leader.stats())));
            ergon_ns.push(ns_per_run(ergon));
            empty_ns.push(ns_per_run(baseline));
            added_ns.push(ns_per_run(ergon) - ns_per_run(baseline));
            switches.push(ergon.1 as f64);
            eprintln!(
                "probe_cost {label} switches={} ergon_ns={:.1} empty_ns={:.1} leader_ns={:.1}",
                ergon.1,
                ns_per_run(ergon),
                ns_per_run(baseline),
                leader_ns.last().expect("pushed above")
            );
        }
        common::result(
            &format!("probe_cost.{label}.ergon_ns"),
            common::median(&ergon_ns),
        );
        common::result(
            &format!("probe_cost.{label}.empty_ns"),
            common::median(&empty_ns),
        );
        common::result(
            &format!("probe_cost.{label}.added_ns"),
            common::median(&added_ns),
        );
        common::result(
            &format!("probe_cost.{label}.leader_ns"),
            common::median(&leader_ns),
        );
        common::result(
            &format!("probe_cost.{label}.switches"),
            common::median(&switches),
        );
        if !ladder.is_empty() {
            common::result(
                &format!("probe_cost.{label}.ladder.empty_ns"),
                common::median(&empty_ns),
            );
            for ((rung, _), rung_ns) in ladder.iter().zip(&ladder_ns) {
                common::result(
                    &format!("probe_cost.{label}.ladder.{rung}_ns"),
                    common::median(rung_ns),
                );
            }
            common::result(
                &format!("probe_cost.{label}.ladder.full_ns"),
                common::median(&ergon_ns),
            );
        }
    }
}
