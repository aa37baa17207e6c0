//! `cargo xtask bench [--duration SECONDS] [--pairs N] [--only NAME,…]`:
//! every benchmark of BENCHMARKS.md in one command, as root.
//!
//! Each benchmark is a `harness = false` target of the `ergon` crate that
//! sets up its own fixed workload (cgroups, processes, the release
//! exporter), measures against its own baseline in the same run, tears the
//! workload down (also on panic and Ctrl-C), and prints `result <key>
//! <value>` lines. This command runs them in order, collects those lines,
//! prints one table, and rewrites the table section of BENCHMARKS.md with the
//! machine, the date and the exact command. Targets live here, beside the
//! table, and a missed target is printed as missed: no figure is asserted
//! anywhere, so a slow machine never fails a build.
//!
//! `--duration` is the measured window per exporter workload (default 60 s;
//! four workloads, and five more in the scaling table), `--pairs` the
//! alternating probe-off/probe-on pairs per workload benchmark (default 8).
//! The defaults take about 25 minutes on a 2-CPU machine, most of it the
//! scaling table's thousands of cgroups set up and torn down per window.
//!
//! The scaling table (issue 13: cost against live cgroups, not tasks;
//! `/metrics` against pods) has a section of its own, so `--only scaling`
//! rewrites just that section; `--only` with other names prints their
//! results and leaves BENCHMARKS.md alone (the main table is written only
//! from a run of every benchmark).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run, setup};

const BEGIN: &str = "<!-- bench-table:begin (written by `cargo xtask bench`) -->";
const END: &str = "<!-- bench-table:end -->";
const SCALING_BEGIN: &str =
    "<!-- scaling-table:begin (written by `cargo xtask bench`, also `--only scaling`) -->";
const SCALING_END: &str = "<!-- scaling-table:end -->";

/// Every benchmark target, in the order a full run takes them.
const BENCHES: &[&str] = &[
    "probe_cost",
    "workload_cost",
    "meter_read",
    "attribution",
    "exporter_cost",
    "scrape",
    "scaling",
];

type Results = BTreeMap<String, f64>;

/// The value of `--name VALUE` or `--name=VALUE` in `args`.
fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

fn whole_number(args: &[String], name: &str, default: u64) -> Result<u64> {
    match option(args, name) {
        None => Ok(default),
        Some(value) => value.trim_end_matches('s').parse().with_context(|| {
            format!("{name} takes a whole number, got {value:?} (e.g. `{name} 60`)")
        }),
    }
}

/// `cargo`, without the variables `cargo run` set for xtask itself
/// (`CARGO_MANIFEST_DIR` = xtask/, `CARGO_PKG_*`…). Build scripts that watch
/// them (ring's does) would otherwise see them change between `cargo bench`
/// and `cargo xtask bench`, and each switch would rebuild half the
/// dependency tree in release.
fn bench_cargo() -> Command {
    let mut cmd = cargo();
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// Runs one benchmark target, echoing its output, and returns its results.
fn run_bench(name: &str, args: &[String]) -> Result<Results> {
    let started = std::time::Instant::now();
    let mut cmd = bench_cargo();
    cmd.args(["bench", "-p", "ergon", "--bench", name, "--"])
        .args(args)
        .stdout(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let mut results = Results::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("result ") {
            let (key, value) = rest
                .split_once(' ')
                .with_context(|| format!("malformed result line from {name}: {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("non-numeric result from {name}: {line:?}"))?;
            results.insert(key.to_owned(), value);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("benchmark {name} failed ({status}); its workload was torn down");
    }
    eprintln!("{name}: {:.0?}", started.elapsed());
    Ok(results)
}

/// One row of the table.
struct Row {
    measure: String,
    result: String,
    baseline: String,
    target: String,
    met: Option<bool>,
}

fn get(results: &Results, key: &str) -> Result<f64> {
    results
        .get(key)
        .copied()
        .with_context(|| format!("no `{key}` among the benchmarks' results"))
}

fn rows(r: &Results) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Each hook as it runs where the kernel has BTF (judged), then with
    // helper calls, the fallback where it has none or refuses the direct
    // reads: a reference, not a target.
    for (label, hook, judged) in [
        ("tp_btf", "tp_btf", true),
        ("tracepoint", "tracepoint", true),
        ("tp_btf_helpers", "tp_btf", false),
        ("tracepoint_helpers", "tracepoint", false),
    ] {
        let key = |what: &str| format!("probe_cost.{label}.{what}");
        let added = get(r, &key("added_ns"))?;
        let path = if judged {
            ""
        } else {
            " with helper calls, as without kernel BTF"
        };
        rows.push(Row {
            measure: format!("1. Probe cost per context switch, `{hook}`{path} (bpf_stats)"),
            result: format!(
                "{added:.0} ns added ({:.0} ns Ergon − {:.0} ns empty; {:.0}k switches, median of 3 storms)",
                get(r, &key("ergon_ns"))?,
                get(r, &key("empty_ns"))?,
                get(r, &key("switches"))? / 1e3,
            ),
            baseline: format!(
                "empty program on the same hook, same storm, both behind a leading empty program ({:.0} ns: the first program's extra)",
                get(r, &key("leader_ns"))?,
            ),
            target: if judged { "≤ 80 ns added" } else { "—" }.into(),
            met: judged.then_some(added <= 80.0),
        });
    }
    // The probe's anatomy: each rung's ns per run and what it adds over the
    // rung below, all from the same storms.
    let mut below = get(r, "probe_cost.tp_btf.ladder.empty_ns")?;
    let mut steps = vec![format!("empty {below:.0} ns")];
    for (rung, label, helper) in [
        ("clock", "clock read", Some("clock_helper")),
        ("cgroup_id", "cgroup id", Some("cgroup_id_helper")),
        ("map_update", "map lookup/update", None),
        ("cpu_state", "per-CPU state", None),
        ("full", "full program", None),
    ] {
        let ns = get(r, &format!("probe_cost.tp_btf.ladder.{rung}_ns"))?;
        let mut step = format!("{label} {ns:.0} ns ({:+.0}", ns - below);
        if let Some(helper) = helper {
            let helper_ns = get(r, &format!("probe_cost.tp_btf.ladder.{helper}_ns"))?;
            step.push_str(&format!(
                "; by helper {helper_ns:.0} ns, {:+.0}",
                helper_ns - below
            ));
        }
        step.push(')');
        steps.push(step);
        below = ns;
    }
    rows.push(Row {
        measure: "1. Probe anatomy, `tp_btf` ladder (bpf_stats, each rung adds one step)".into(),
        result: steps.join(" → "),
        baseline: "every rung attached in the same storms; median of 3".into(),
        target: "—".into(),
        met: None,
    });
    let pairs = get(r, "workload_cost.pairs")?;
    // The empty program's row is a reference (what any sched_switch
    // program costs), not Ergon's figure: no target.
    for (name, label, unit, baseline_key, judged) in [
        (
            "pipe",
            "probe attached: `perf bench sched pipe`",
            "round trips/s",
            "off_ops_per_s",
            true,
        ),
        (
            "pipe_pinned",
            "probe attached: `perf bench sched pipe`, pinned to one CPU",
            "round trips/s",
            "off_ops_per_s",
            true,
        ),
        (
            "pipe_pinned_empty",
            "only an empty `tp_btf` program attached (reference): same pinned pipe",
            "round trips/s",
            "off_ops_per_s",
            false,
        ),
        (
            "messaging",
            "probe attached: `perf bench sched messaging`",
            "s per run",
            "off_s",
            true,
        ),
    ] {
        let key = |what: &str| format!("workload_cost.{name}.{what}");
        let lost = get(r, &key("lost_pct"))?;
        let baseline = get(r, &key(baseline_key))?;
        rows.push(Row {
            measure: format!("2. Throughput lost with {label}"),
            result: format!(
                "{lost:.1} % (median of {pairs:.0} pairs; pairs {:.1} … {:.1} %); CPU per run {:+.1} %",
                get(r, &key("lost_pct_min"))?,
                get(r, &key("lost_pct_max"))?,
                get(r, &key("cpu_added_pct"))?,
            ),
            baseline: format!(
                "nothing attached, alternating runs: {} {unit}",
                if baseline >= 100.0 {
                    format!("{baseline:.0}")
                } else {
                    format!("{baseline:.3}")
                }
            ),
            target: if judged { "< 1 % lost" } else { "—" }.into(),
            met: judged.then_some(lost < 1.0),
        });
    }
    // What Ergon's program costs the pinned pipe beyond what any program on
    // the hook costs (issue 13's target), from the two rows above.
    let beyond = |what: &str| -> Result<f64> {
        Ok(get(r, &format!("workload_cost.pipe_pinned.{what}"))?
            - get(r, &format!("workload_cost.pipe_pinned_empty.{what}"))?)
    };
    let (lost_beyond, cpu_beyond) = (beyond("lost_pct")?, beyond("cpu_added_pct")?);
    rows.push(Row {
        measure: "2. Pinned pipe: the probe's loss beyond the empty-program reference".into(),
        result: format!(
            "{lost_beyond:+.1} points of throughput, {cpu_beyond:+.1} points of CPU per run"
        ),
        baseline: "the empty-program row, same run".into(),
        target: "< 2 points".into(),
        met: Some(lost_beyond < 2.0),
    });
    let window = get(r, "exporter_cost.window_s")?;
    for (size, label) in [
        ("0x0", "no pods (baseline: the node's own cgroups)"),
        ("20x5", "20 pods × 5 processes"),
        ("200x10", "200 pods × 10 processes"),
        ("20x100", "20 pods × 100 processes"),
    ] {
        let key = |what: &str| format!("exporter_cost.{size}.{what}");
        let cpu = get(r, &key("cpu_ms_per_min"))?;
        rows.push(Row {
            measure: format!("3. Exporter CPU, {label}, scraped every 5 s"),
            result: format!(
                "{cpu:.1} ms per minute ({:.3} % of one core; {window:.0} s in 2 windows)",
                cpu / 600.0
            ),
            baseline: "own threads' CPU time (schedstat)".into(),
            target: "< 60 ms per minute".into(),
            met: Some(cpu < 60.0),
        });
        let peak = get(r, &key("peak_rss_mib"))?;
        rows.push(Row {
            measure: format!("3. Exporter memory, {label}"),
            result: format!(
                "{peak:.1} MiB peak (VmHWM; {:.1} MiB of it reached at start-up); {:.1} MiB resident at the end",
                get(r, &key("startup_peak_rss_mib"))?,
                get(r, &key("rss_mib"))?,
            ),
            baseline: "—".into(),
            target: "< 16 MiB".into(),
            met: Some(peak < 16.0),
        });
    }
    let p99 = get(r, "scrape.p99_ms")?;
    rows.push(Row {
        measure: format!(
            "4. `/metrics` latency, {:.0} pods, {:.0} concurrent clients ({:.0} scrapes)",
            get(r, "scrape.pods")?,
            get(r, "scrape.clients")?,
            get(r, "scrape.requests")?,
        ),
        result: format!(
            "p50 {:.1} ms, p99 {p99:.1} ms, max {:.1} ms",
            get(r, "scrape.p50_ms")?,
            get(r, "scrape.max_ms")?,
        ),
        baseline: format!(
            "one client alone: p50 {:.1} ms, p99 {:.1} ms",
            get(r, "scrape.alone_p50_ms")?,
            get(r, "scrape.alone_p99_ms")?,
        ),
        target: "p99 < 5 ms".into(),
        met: Some(p99 < 5.0),
    });
    rows.push(Row {
        measure: format!("4. `/metrics` size, {:.0} pods", get(r, "scrape.pods")?),
        result: format!(
            "{:.0} KiB, {:.0} series; {:.2} ms of exporter CPU per scrape",
            get(r, "scrape.bytes")? / 1024.0,
            get(r, "scrape.series")?,
            get(r, "scrape.cpu_ms_per_scrape")?,
        ),
        baseline: "exporter CPU minus an equal quiet window".into(),
        target: "—".into(),
        met: None,
    });
    let scrape_peak = get(r, "scrape.peak_rss_mib")?;
    rows.push(Row {
        measure: format!(
            "4. Exporter memory holding {:.0} pods' series, after the load",
            get(r, "scrape.pods")?
        ),
        result: format!(
            "{scrape_peak:.1} MiB peak (VmHWM); {:.1} MiB resident",
            get(r, "scrape.rss_mib")?,
        ),
        baseline: "—".into(),
        target: "< 16 MiB".into(),
        met: Some(scrape_peak < 16.0),
    });
    let meter_us = get(r, "meter_read.cpu_us_per_interval")?;
    rows.push(Row {
        measure: format!(
            "5. Meter read per interval ({:.0} RAPL zones, two sockets)",
            get(r, "meter_read.zones")?
        ),
        result: format!("{meter_us:.1} µs CPU"),
        baseline: "—".into(),
        target: "< 50 µs".into(),
        met: Some(meter_us < 50.0),
    });
    for (key, label) in [
        (
            "attribution.cpu_us_per_interval",
            format!(
                "5. Attribution per interval, {:.0} cgroups, 5 domains",
                get(r, "attribution.cgroups")?
            ),
        ),
        (
            "attribution.per_process_cpu_us_per_interval",
            format!(
                "5. Attribution per interval, {:.0} cgroups + {:.0} processes (`--per-process`)",
                get(r, "attribution.cgroups")?,
                get(r, "attribution.processes")?
            ),
        ),
    ] {
        let ms = get(r, key)? / 1e3;
        rows.push(Row {
            measure: label,
            result: format!("{ms:.2} ms CPU"),
            baseline: "—".into(),
            target: "< 2 ms".into(),
            met: Some(ms < 2.0),
        });
    }
    let render_ms = get(r, "render.cpu_us")? / 1e3;
    rows.push(Row {
        measure: format!(
            "5. `/metrics` render, {:.0} pods, 5 domains",
            get(r, "render.pods")?
        ),
        result: format!(
            "{render_ms:.2} ms CPU ({:.0} series, {:.0} KiB)",
            get(r, "render.series")?,
            get(r, "render.bytes")? / 1024.0,
        ),
        baseline: "—".into(),
        target: "< 5 ms".into(),
        met: Some(render_ms < 5.0),
    });
    Ok(rows)
}

/// The scaling section: exporter cost per live cgroups, `/metrics` per pods.
fn scaling_tables(r: &Results) -> Result<String> {
    let window = get(r, "scaling.cgroups.window_s")?;
    let mut text = format!(
        "Exporter cost against live cgroups (pod-shaped, every one running in every 5 s \
         interval; {window:.0} s per size in 2 windows, ABCD DCBA, fresh exporter each):\n\n\
         | Live cgroups | Tasks | CPU per minute | Per 1,000 cgroups above none | Peak memory (VmHWM) | Resident at the end (VmRSS) | `/metrics` size |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    let idle = get(r, "scaling.cgroups.0x0.cpu_ms_per_min")?;
    for (cgroups, tasks) in [(0, 0), (100, 1), (1_000, 1), (5_000, 1), (100, 50)] {
        let key = |what: &str| format!("scaling.cgroups.{cgroups}x{tasks}.{what}");
        let cpu = get(r, &key("cpu_ms_per_min"))?;
        let per_thousand = if cgroups > 0 {
            format!("{:+.1} ms", (cpu - idle) * 1_000.0 / cgroups as f64)
        } else {
            "(baseline)".into()
        };
        text.push_str(&format!(
            "| {cgroups} | {} | {cpu:.1} ms ({:.3} % of one core) | {per_thousand} | {:.1} MiB | {:.1} MiB | {:.0} KiB |\n",
            cgroups * tasks,
            cpu / 600.0,
            get(r, &key("peak_rss_mib"))?,
            get(r, &key("rss_mib"))?,
            get(r, &key("scrape_bytes"))? / 1024.0,
        ));
    }
    let mut pods: Vec<u64> = r
        .keys()
        .filter_map(|key| {
            key.strip_prefix("scaling.scrape.")?
                .strip_suffix(".p99_ms")?
                .parse()
                .ok()
        })
        .collect();
    pods.sort_unstable();
    text.push_str(
        "\n`/metrics` against pods (one client alone, then 4 clients back to back; \
         latency is wall clock, CPU per scrape is the exporter's CPU under load minus an \
         equally long quiet window):\n\n\
         | Pods | Series | Body | Alone p50 / p99 | Loaded p50 / p99 / max | Exporter CPU per scrape | Peak memory (VmHWM) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for pods in pods {
        let key = |what: &str| format!("scaling.scrape.{pods}.{what}");
        text.push_str(&format!(
            "| {pods} | {:.0} | {:.0} KiB | {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {:.2} ms | {:.1} MiB |\n",
            get(r, &key("series"))?,
            get(r, &key("bytes"))? / 1024.0,
            get(r, &key("alone_p50_ms"))?,
            get(r, &key("alone_p99_ms"))?,
            get(r, &key("p50_ms"))?,
            get(r, &key("p99_ms"))?,
            get(r, &key("max_ms"))?,
            get(r, &key("cpu_ms_per_scrape"))?,
            get(r, &key("peak_rss_mib"))?,
        ));
    }
    Ok(text)
}

fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| Measure | Result | Baseline (same run) | Target | Met |\n| --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        text.push_str(&format!(
            "| {} | {} | {} | {} | {met} |\n",
            row.measure, row.result, row.baseline, row.target
        ));
    }
    text
}

/// A command's trimmed stdout, or `unknown`.
fn output_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// `nproc`, kernel, CPU model, memory and load: where the numbers come from.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{} CPUs (`nproc`), {cpu_model}, {memory_gib} memory, Linux {}",
        output_of("nproc", &[]),
        output_of("uname", &["-r"]),
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().take(3).collect();
            (fields.len() == 3).then(|| fields.join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Replaces the section of BENCHMARKS.md between `begin` and `end` (or
/// appends one).
fn write_benchmarks_md((begin_marker, end_marker): (&str, &str), section: &str) -> Result<()> {
    let path = root().join("BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{begin_marker}\n{section}{end_marker}");
    let updated = match (existing.find(begin_marker), existing.find(end_marker)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{block}{}",
            &existing[..begin],
            &existing[end + end_marker.len()..]
        ),
        _ => format!("{}\n{block}\n", existing.trim_end()),
    };
    std::fs::write(&path, updated).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("table written to {}", path.display());
    Ok(())
}

pub fn run_all(args: &[String]) -> Result<()> {
    let duration = whole_number(args, "--duration", 60)?;
    let pairs = whole_number(args, "--pairs", 8)?;
    if duration < 10 || pairs < 1 {
        bail!(
            "--duration must be at least 10 (seconds; the exporter's interval is 5 s) and --pairs at least 1"
        );
    }
    let only: Vec<&str> = match option(args, "--only") {
        None => BENCHES.to_vec(),
        Some(list) => list.split(',').map(str::trim).collect(),
    };
    if let Some(unknown) = only.iter().find(|name| !BENCHES.contains(name)) {
        bail!(
            "--only takes benchmark names separated by commas, one of {}; got {unknown:?}",
            BENCHES.join(", ")
        );
    }
    let every = BENCHES.iter().all(|name| only.contains(name));
    let command = std::iter::once("cargo xtask bench".to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    setup()?;
    run(bench_cargo().args(["bench", "-p", "ergon", "--no-run"]))
        .context("building the exporter and its benchmarks (release)")?;
    let started = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let load_before = load_average();

    let mut results = Results::new();
    for &name in BENCHES.iter().filter(|name| only.contains(name)) {
        let flags: Vec<String> = match name {
            "workload_cost" => vec!["--pairs".into(), pairs.to_string()],
            "exporter_cost" | "scaling" => vec!["--duration".into(), duration.to_string()],
            _ => vec![],
        };
        results.extend(run_bench(name, &flags)?);
    }

    let measured = |tables: String| {
        format!(
            "Measured {started} with `{command}` (as root).\n\
             Machine: {}. Load average (1, 5, 15 min) {load_before} before and {} after: \
             other work shared the machine, which is why every figure has a same-run baseline \
             or is CPU time the kernel charged.\n\n{tables}",
            machine(),
            load_average(),
        )
    };
    if only.contains(&"scaling") {
        let section = measured(scaling_tables(&results)?);
        println!("\n{section}");
        write_benchmarks_md((SCALING_BEGIN, SCALING_END), &section)?;
    }
    if every {
        let section = measured(table(&rows(&results)?));
        println!("\n{section}");
        write_benchmarks_md((BEGIN, END), &section)?;
    } else {
        eprintln!(
            "--only: the main table of BENCHMARKS.md is written only by a run of every benchmark"
        );
    }
    Ok(())
}
