//! What the probe costs a context-switch-heavy workload: throughput of
//! `perf bench sched pipe` and `perf bench sched messaging` with Ergon's
//! probe attached and without it.
//!
//! Throughput is wall clock by nature, and wall clock on a shared machine
//! drifts, so runs alternate in pairs (off/on, then on/off, …) and the figure
//! is the median over pairs of each pair's loss, `1 − on / off` (for
//! messaging, `1 − time_off / time_on`). A drift that lasts longer than one
//! pair hits both halves alike; the smallest and largest pair show how noisy
//! the machine was. Beside it, the CPU time the kernel charged the benchmark
//! (getrusage of the reaped `perf` and its children) per unit of work, which
//! other load on the machine barely moves: the probe runs inside the
//! scheduler and its time is charged to the task switched in.
//!
//! The pinned pipe also runs with only an empty program on the same hook
//! instead of the probe: what any `sched_switch` program costs, the floor
//! under Ergon's figure.
//!
//! The pipe benchmark runs twice: as perf runs it (the kernel places the two
//! tasks on one CPU or two, which swings throughput by ±10 % here), and
//! pinned to one CPU, where every round trip is two switches between its
//! two tasks and nothing else: the worst case, a workload that does nothing
//! but switch. `kernel.bpf_stats_enabled` must be off: its clock reads
//! would be charged to the probe.
//!
//! Flags: `--pairs N` (default 8). Prints `result
//! workload_cost.{pipe,pipe_pinned,pipe_pinned_empty,messaging}.{lost_pct,lost_pct_min,lost_pct_max,cpu_added_pct,...}`.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use ergon::probe::ebpf::{EbpfProbe, ReferenceProgram};
use ergon::probe::{ProbeConfig, ProbeMode};

/// Pinned: ~0.6 s per run here.
const PINNED_ROUND_TRIPS: &str = "300000";
/// Unpinned, a round trip takes 2.5 µs when the kernel keeps both tasks on
/// one CPU and ~40 µs when it puts them on two (a cross-CPU wake-up is an
/// IPI, and an IPI in a VM is an exit): 0.15 to 2.5 s per run here.
const UNPINNED_ROUND_TRIPS: &str = "60000";
/// ~0.7 s per run here (10 groups of 40 processes).
const MESSAGING_LOOPS: &str = "100";

/// CPU time of the children this process has reaped.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// One run's result: its figure (ops/s or seconds) and the CPU time the
/// kernel charged it.
#[derive(Clone, Copy)]
struct Run {
    value: f64,
    cpu: Duration,
}

/// Runs `perf bench sched <args>` (on the last CPU only if `pinned`);
/// returns its stdout and CPU time.
fn perf_bench(args: &[&str], pinned: bool) -> (String, Duration) {
    common::check_interrupt();
    let mut cmd = Command::new("perf");
    cmd.args(["bench", "sched"]).args(args);
    if pinned {
        let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        // SAFETY: sched_setaffinity on the child itself; cpu_set_t is plain
        // data. Async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let cpu_before = children_cpu();
    let output = cmd
        .output()
        .expect("perf (Debian package linux-perf) is installed by `cargo xtask setup`");
    let cpu = children_cpu() - cpu_before;
    assert!(
        output.status.success(),
        "perf bench sched {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8(output.stdout).expect("perf prints text"),
        cpu,
    )
}

/// The number before `suffix` on the line that ends with it.
fn number_before(text: &str, suffix: &str) -> f64 {
    text.lines()
        .find_map(|line| line.trim().strip_suffix(suffix))
        .and_then(|rest| rest.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no `<number> {suffix}` in perf's output:\n{text}"))
}

/// Round trips per second.
fn pipe_ops_per_s(pinned: bool) -> Run {
    let round_trips = if pinned {
        PINNED_ROUND_TRIPS
    } else {
        UNPINNED_ROUND_TRIPS
    };
    let (text, cpu) = perf_bench(&["pipe", "-l", round_trips], pinned);
    Run {
        value: number_before(&text, "ops/sec"),
        cpu,
    }
}

fn pipe() -> Run {
    pipe_ops_per_s(false)
}

fn pipe_pinned() -> Run {
    pipe_ops_per_s(true)
}

/// Seconds for the whole run (perf prints `Total time: 0.717 [sec]`).
fn messaging() -> Run {
    let (text, cpu) = perf_bench(&["messaging", "-l", MESSAGING_LOOPS], false);
    Run {
        value: number_before(&text, "[sec]"),
        cpu,
    }
}

struct Pair {
    off: Run,
    on: Run,
}

/// What the `on` half of a pair attaches.
#[derive(Clone, Copy)]
enum Attach {
    /// Ergon's probe as the exporter loads it by default.
    Probe,
    /// Only an empty program on the same hook (`tp_btf`): the floor any
    /// `sched_switch` program pays.
    EmptyProgram,
}

/// Attaches `what`; it stays attached until the box is dropped.
fn attach(what: Attach) -> Box<dyn std::any::Any> {
    let config = ProbeConfig {
        mode: ProbeMode::Ebpf,
        ..ProbeConfig::local()
    };
    match what {
        Attach::Probe => {
            Box::new(EbpfProbe::start(&config).expect("loading the probe (run as root)"))
        }
        Attach::EmptyProgram => Box::new(
            ReferenceProgram::empty("tp_btf", &config.host_sys)
                .expect("loading the empty program (run as root)"),
        ),
    }
}

/// `pairs` alternating pairs of `run`, `what` attached for the `on` half.
fn alternate(name: &str, pairs: u64, run: fn() -> Run, what: Attach) -> Vec<Pair> {
    let mut measured = Vec::new();
    for pair in 0..pairs {
        let one = |attached: bool| -> Run {
            let probe = attached.then(|| attach(what));
            // The same settling time either way, so loading the probe does
            // not land inside the run.
            common::pause(Duration::from_millis(300));
            let value = run();
            drop(probe);
            value
        };
        let (off, on) = if pair % 2 == 0 {
            let off = one(false);
            (off, one(true))
        } else {
            let on = one(true);
            (one(false), on)
        };
        eprintln!(
            "workload_cost {name} pair={pair} off={} ({:?} CPU) on={} ({:?} CPU)",
            off.value, off.cpu, on.value, on.cpu
        );
        measured.push(Pair { off, on });
    }
    measured
}

fn main() {
    if !common::benchmarking() {
        return;
    }
    common::unwind_on_interrupt();
    let stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    assert_eq!(
        stats.trim(),
        "0",
        "kernel.bpf_stats_enabled is on: it inflates the probe's cost; `sysctl -w kernel.bpf_stats_enabled=0` first"
    );
    let pairs = common::numeric_flag("--pairs", 8);

    // Both benchmarks do a fixed amount of work per run, so CPU per run is
    // CPU per unit of work.
    let throughput_lost = |off: f64, on: f64| 1.0 - on / off;
    let time_lost = |off: f64, on: f64| 1.0 - off / on;
    for (name, run, unit, loss, what) in [
        (
            "pipe",
            pipe as fn() -> Run,
            "ops_per_s",
            throughput_lost as fn(f64, f64) -> f64,
            Attach::Probe,
        ),
        (
            "pipe_pinned",
            pipe_pinned,
            "ops_per_s",
            throughput_lost,
            Attach::Probe,
        ),
        (
            "pipe_pinned_empty",
            pipe_pinned,
            "ops_per_s",
            throughput_lost,
            Attach::EmptyProgram,
        ),
        ("messaging", messaging, "s", time_lost, Attach::Probe),
    ] {
        let measured = alternate(name, pairs, run, what);
        let lost: Vec<f64> = measured
            .iter()
            .map(|p| 100.0 * loss(p.off.value, p.on.value))
            .collect();
        let cpu_added: Vec<f64> = measured
            .iter()
            .map(|p| 100.0 * (p.on.cpu.as_secs_f64() / p.off.cpu.as_secs_f64() - 1.0))
            .collect();
        let key = |what: &str| format!("workload_cost.{name}.{what}");
        common::result(&key("lost_pct"), common::median(&lost));
        common::result(&key("lost_pct_min"), common::quantile(&lost, 0.0));
        common::result(&key("lost_pct_max"), common::quantile(&lost, 1.0));
        common::result(&key("cpu_added_pct"), common::median(&cpu_added));
        let offs: Vec<f64> = measured.iter().map(|p| p.off.value).collect();
        let ons: Vec<f64> = measured.iter().map(|p| p.on.value).collect();
        common::result(&key(&format!("off_{unit}")), common::median(&offs));
        common::result(&key(&format!("on_{unit}")), common::median(&ons));
    }
    common::result("workload_cost.pairs", pairs as f64);
}
