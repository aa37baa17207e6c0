//! powercap RAPL against temporary sysfs trees shaped like the kernel's.

mod meter_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ergon::meter::rapl::RaplMeter;
use ergon::meter::{
    Meter, MeterConfig, MeterContext, MeterError, ModelChoice, RaplInterface, detect,
};
use ergon::units::{Domain, Nanos};
use meter_support::{INTEL_RANGE_UJ, SysFixture, capture_logs};

const CTX: MeterContext = MeterContext {
    elapsed: Nanos(1_000_000_000),
    cpu_utilisation: Some(0.5),
    cpus: 4,
};

/// Zone → joules of one sample.
fn sample_map(meter: &mut dyn Meter) -> BTreeMap<String, f64> {
    meter
        .sample(&CTX)
        .unwrap()
        .into_iter()
        .map(|sample| (sample.zone, sample.joules.0))
        .collect()
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{what}: measured {actual} J, true {expected} J"
    );
}

#[test]
fn intel_one_socket_reads_package_core_uncore_psys_and_skips_the_mmio_duplicate() {
    let fixture = SysFixture::intel_one_socket();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    assert_eq!(
        meter.zones(),
        vec!["package-0", "core-0", "uncore-0", "psys"]
    );
    assert_eq!(
        meter.domains(),
        vec![Domain::Package, Domain::Core, Domain::Uncore, Domain::Psys]
    );
    assert_eq!(meter.source(), "rapl");
    assert!(!meter.is_estimate());

    let baseline = sample_map(&mut meter);
    assert!(
        baseline.values().all(|joules| *joules == 0.0),
        "first sample is a baseline: {baseline:?}"
    );

    fixture.set_energy("intel-rapl:0", 1_000_000 + 12_500_000);
    fixture.set_energy("intel-rapl:0:0", 400_000 + 8_000_000);
    fixture.set_energy("intel-rapl:0:1", 100_000 + 250_000);
    fixture.set_energy("intel-rapl:1", 2_000_000 + 20_000_001);
    // The MMIO copy moves too; it must not be counted.
    fixture.set_energy("intel-rapl-mmio:0", 1_000_000 + 12_500_000);
    let joules = sample_map(&mut meter);
    assert_close(joules["package-0"], 12.5, "package-0");
    assert_close(joules["core-0"], 8.0, "core-0");
    assert_close(joules["uncore-0"], 0.25, "uncore-0");
    assert_close(joules["psys"], 20.000001, "psys");
    assert_eq!(joules.len(), 4);
}

#[test]
fn intel_two_socket_reads_each_socket_separately() {
    let fixture = SysFixture::intel_two_socket();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    assert_eq!(
        meter.zones(),
        vec!["package-0", "package-1", "dram-0", "dram-1"]
    );
    sample_map(&mut meter);
    fixture.set_energy("intel-rapl:0", 5_000_000 + 90_000_000);
    fixture.set_energy("intel-rapl:1", 5_000_000 + 45_000_000);
    fixture.set_energy("intel-rapl:0:0", 700_000 + 6_000_000);
    fixture.set_energy("intel-rapl:1:0", 700_000 + 3_000_000);
    let joules = sample_map(&mut meter);
    assert_close(joules["package-0"], 90.0, "package-0");
    assert_close(joules["package-1"], 45.0, "package-1");
    assert_close(joules["dram-0"], 6.0, "dram-0");
    assert_close(joules["dram-1"], 3.0, "dram-1");
}

#[test]
fn amd_layout_has_package_and_core_per_socket() {
    let fixture = SysFixture::amd_two_socket();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    assert_eq!(
        meter.zones(),
        vec!["package-0", "package-1", "core-0", "core-1"]
    );
    assert_eq!(meter.domains(), vec![Domain::Package, Domain::Core]);
    sample_map(&mut meter);
    fixture.set_energy("intel-rapl:1:0", 1_000_000 + 33_000_000);
    let joules = sample_map(&mut meter);
    assert_close(joules["core-1"], 33.0, "core-1");
    assert_close(joules["package-0"], 0.0, "package-0");
}

/// Ticks the advancer may take between two samples, so that no interval,
/// however late the sampler runs, holds more than half a counter range.
const MAX_TICKS_PER_INTERVAL: u32 = 10;

/// True state of the fixture's counters, advanced by a thread.
struct TrueEnergy {
    /// id → (current counter reading, cumulative true µJ, rate in µJ per tick, range)
    zones: BTreeMap<String, (u64, u128, u64, u64)>,
    ticks_since_sample: u32,
}

/// Advances every zone's `energy_uj` by its rate on each tick until dropped.
struct Advancer {
    state: Arc<Mutex<TrueEnergy>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Advancer {
    fn start(fixture: Arc<SysFixture>, zones: &[(&str, u64, u64, u64)]) -> Advancer {
        let state = Arc::new(Mutex::new(TrueEnergy {
            zones: zones
                .iter()
                .map(|(id, start, rate, range)| (id.to_string(), (*start, 0u128, *rate, *range)))
                .collect(),
            ticks_since_sample: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    {
                        let mut state = state.lock().unwrap();
                        // Past the budget, wait for the sampler.
                        if state.ticks_since_sample < MAX_TICKS_PER_INTERVAL {
                            state.ticks_since_sample += 1;
                            for (id, (reading, total, rate, range)) in state.zones.iter_mut() {
                                *reading = (*reading + *rate) % *range;
                                *total += u128::from(*rate);
                                fixture.set_energy(id, *reading);
                            }
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            })
        };
        Advancer {
            state,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Advancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn readings_match_true_joules_while_a_thread_advances_the_counters() {
    let fixture = Arc::new(SysFixture::intel_two_socket());
    // package-0 gets a small range so it wraps many times during the test.
    let small_range = 50_000_000;
    std::fs::write(
        fixture.zone_dir("intel-rapl:0").join("max_energy_range_uj"),
        format!("{small_range}\n"),
    )
    .unwrap();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    let advancer = Advancer::start(
        fixture.clone(),
        &[
            ("intel-rapl:0", 5_000_000, 1_234_567, small_range),
            ("intel-rapl:1", 5_000_000, 700_001, INTEL_RANGE_UJ),
            ("intel-rapl:0:0", 700_000, 90_000, INTEL_RANGE_UJ),
            ("intel-rapl:1:0", 700_000, 45_500, INTEL_RANGE_UJ),
        ],
    );
    let zone_of = |id: &str| match id {
        "intel-rapl:0" => "package-0",
        "intel-rapl:1" => "package-1",
        "intel-rapl:0:0" => "dram-0",
        _ => "dram-1",
    };

    let mut previous_true: BTreeMap<String, u128> = BTreeMap::new();
    let mut measured_total: BTreeMap<String, f64> = BTreeMap::new();
    let mut true_total_since_baseline: BTreeMap<String, u128> = BTreeMap::new();
    for interval in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(3));
        let mut state = advancer.state.lock().unwrap();
        state.ticks_since_sample = 0;
        let joules = sample_map(&mut meter);
        for (id, (_, total, _, _)) in &state.zones {
            let zone = zone_of(id);
            if interval == 0 {
                assert_eq!(joules[zone], 0.0, "baseline");
            } else {
                let true_uj = total - previous_true[id];
                assert_close(
                    joules[zone],
                    true_uj as f64 / 1e6,
                    &format!("{zone} interval {interval}"),
                );
                *measured_total.entry(zone.to_string()).or_default() += joules[zone];
                *true_total_since_baseline
                    .entry(zone.to_string())
                    .or_default() += true_uj;
            }
            previous_true.insert(id.clone(), *total);
        }
    }
    drop(advancer);
    for (zone, true_uj) in true_total_since_baseline {
        assert_close(
            measured_total[&zone],
            true_uj as f64 / 1e6,
            &format!("{zone} total"),
        );
    }
}

#[test]
fn a_wrap_in_the_middle_of_an_interval_loses_nothing() {
    let fixture = SysFixture::intel_two_socket();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    fixture.set_energy("intel-rapl:0", INTEL_RANGE_UJ - 3_000_000);
    sample_map(&mut meter);
    // 3 J to the top, then 4.5 J past zero.
    fixture.set_energy("intel-rapl:0", 4_500_000);
    let (joules, logs) = capture_logs(|| sample_map(&mut meter));
    assert_close(joules["package-0"], 7.5, "package-0 across the wrap");
    assert!(
        logs.lines_with(&["reset"]).is_empty(),
        "a wrap is not a reset: {}",
        logs.text()
    );
}

#[test]
fn a_reset_is_logged_once_and_counted_as_zero() {
    let fixture = SysFixture::intel_two_socket();
    let mut meter = RaplMeter::open(fixture.path(), 60).unwrap();
    fixture.set_energy("intel-rapl:1", 100_000_000_000);
    sample_map(&mut meter);
    // From the middle of the range down to nearly zero: not a wrap.
    fixture.set_energy("intel-rapl:1", 2_000);
    fixture.set_energy("intel-rapl:0", 5_000_000 + 1_000_000);
    let (joules, logs) = capture_logs(|| {
        let after_reset = sample_map(&mut meter);
        fixture.set_energy("intel-rapl:1", 2_000 + 3_000_000);
        let next = sample_map(&mut meter);
        let quiet = sample_map(&mut meter);
        (after_reset, next, quiet)
    });
    let (after_reset, next, quiet) = joules;
    assert_eq!(after_reset["package-1"], 0.0);
    assert_close(after_reset["package-0"], 1.0, "other zones carry on");
    assert_close(
        next["package-1"],
        3.0,
        "the reset reading is the new baseline",
    );
    assert_eq!(quiet["package-1"], 0.0);
    let reset_lines = logs.lines_with(&["reset", "package-1"]);
    assert_eq!(reset_lines.len(), 1, "{}", logs.text());
    assert!(
        reset_lines[0].contains("WARN") && reset_lines[0].contains("energy_uj"),
        "{}",
        reset_lines[0]
    );
}

#[test]
fn zones_that_appear_or_vanish_are_picked_up_without_restart() {
    let fixture = SysFixture::new();
    fixture.add_zone("intel-rapl:0", "package-0", 1_000_000, INTEL_RANGE_UJ);
    let mut meter = RaplMeter::open(fixture.path(), 3).unwrap();
    sample_map(&mut meter);

    fixture.add_zone("intel-rapl:1", "package-1", 8_000_000, INTEL_RANGE_UJ);
    let (seen, logs) = capture_logs(|| (0..3).map(|_| sample_map(&mut meter)).collect::<Vec<_>>());
    let appeared_at = seen
        .iter()
        .position(|joules| joules.contains_key("package-1"))
        .expect("package-1 appears");
    assert_eq!(
        seen[appeared_at]["package-1"], 0.0,
        "a new zone's first reading is its baseline"
    );
    assert_eq!(
        logs.lines_with(&["appeared", "package-1"]).len(),
        1,
        "{}",
        logs.text()
    );

    fixture.set_energy("intel-rapl:1", 8_000_000 + 2_000_000);
    assert_close(
        sample_map(&mut meter)["package-1"],
        2.0,
        "package-1 after appearing",
    );

    fixture.remove_zone("intel-rapl:0");
    let (seen, logs) = capture_logs(|| (0..3).map(|_| sample_map(&mut meter)).collect::<Vec<_>>());
    assert!(!seen.last().unwrap().contains_key("package-0"), "{seen:?}");
    assert_eq!(
        logs.lines_with(&["vanished", "package-0"]).len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(meter.zones(), vec!["package-1"]);
}

const PERMISSION_FIXTURE_VAR: &str = "ERGON_TEST_PERMISSION_FIXTURE";

/// The child half of the test below: it runs in a process switched to an
/// unprivileged uid. Not a test on its own (without the parent's fixture
/// there is nothing to read), hence ignored and a no-op when run directly.
#[test]
#[ignore = "run as uid 65534 by permission_error_names_the_file_and_how_to_run"]
fn permission_child() {
    let Ok(root) = std::env::var(PERMISSION_FIXTURE_VAR) else {
        eprintln!(
            "permission_child only runs as the child of permission_error_names_the_file_and_how_to_run"
        );
        return;
    };
    match RaplMeter::open(std::path::Path::new(&root), 60) {
        Ok(_) => panic!("an unprivileged user opened a root-only energy_uj"),
        Err(err) => println!("OPEN-ERROR: {err}"),
    }
}

#[test]
fn permission_error_names_the_file_and_how_to_run() {
    let fixture = SysFixture::intel_one_socket();
    fixture.make_energy_root_only();
    let energy_file = fixture.path().join("class/powercap/intel-rapl:0/energy_uj");

    // Root ignores file modes, so the read must happen as another user.
    let output = if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::process::CommandExt;
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "permission_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PERMISSION_FIXTURE_VAR, fixture.path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        match stdout
            .lines()
            .find_map(|line| line.split_once("OPEN-ERROR: ").map(|(_, error)| error))
        {
            Some(line) => line.to_string(),
            None => panic!("the child printed no error line: {stdout}"),
        }
    } else {
        RaplMeter::open(fixture.path(), 60)
            .err()
            .expect("unprivileged open fails")
            .to_string()
    };
    assert!(
        output.contains(&energy_file.display().to_string()),
        "names the file: {output}"
    );
    assert!(output.contains("permission denied"), "{output}");
    assert!(
        output.contains("root") && output.contains("privileged"),
        "says how to run: {output}"
    );
    assert!(output.contains("5.10"), "says why: {output}");

    // The same condition as the typed error, for callers that branch on it.
    let typed = MeterError::PermissionDenied {
        path: energy_file.clone(),
    };
    assert_eq!(typed.to_string(), output);
}

#[test]
fn detect_picks_powercap_where_perf_is_absent_and_skips_the_model() {
    let fixture = SysFixture::intel_two_socket();
    let config = MeterConfig {
        host_sys: fixture.path().to_path_buf(),
        host_proc: fixture.write_cpuinfo("processor : 0\n"),
        nvml: false,
        ..MeterConfig::default()
    };
    let (meters, logs) = capture_logs(|| detect(&config));
    let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
    assert_eq!(sources, vec!["rapl"]);
    assert_eq!(
        logs.lines_with(&["rapl-perf", "meter absent"]).len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(
        logs.lines_with(&["source=\"rapl\"", "meter found"]).len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(
        logs.lines_with(&["source=\"model\"", "not used"]).len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(
        logs.lines_with(&["source=\"nvml\"", "disabled"]).len(),
        1,
        "{}",
        logs.text()
    );
    assert_eq!(
        logs.lines_with(&["source=\"hwmon\"", "meter absent"]).len(),
        1,
        "{}",
        logs.text()
    );

    let off = MeterConfig {
        rapl: RaplInterface::Off,
        model: ModelChoice::Off,
        ..config.clone()
    };
    assert!(detect(&off).is_empty());
    let forced_model = MeterConfig {
        model: ModelChoice::Always,
        ..config
    };
    let sources: Vec<&str> = detect(&forced_model)
        .iter()
        .map(|meter| meter.source())
        .collect();
    assert_eq!(sources, vec!["rapl", "model"]);
}
