//! The NVML meter through nvml-wrapper's real FFI path, against a fake
//! `libnvidia-ml.so` built from tests/fixtures/fake_nvml/fake_nvml.c.

mod meter_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ergon::meter::nvml::NvmlMeter;
use ergon::meter::{
    GpuProcessSample, Meter, MeterConfig, MeterContext, MeterError, RaplInterface, Rejection,
    detect,
};
use ergon::units::{Domain, Nanos};
use meter_support::{capture_logs, rejected, zones_up};
use tempfile::TempDir;

const TWO_SECONDS: MeterContext = MeterContext {
    elapsed: Nanos(2_000_000_000),
    cpu_utilisation: None,
    cpus: 4,
};

/// A fake NVML library in its own directory, with its control file beside it.
struct FakeNvml {
    dir: TempDir,
}

impl FakeNvml {
    fn build(control: &str) -> FakeNvml {
        let dir = tempfile::tempdir().unwrap();
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_nvml/fake_nvml.c");
        let output = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
            .arg(dir.path().join("libnvidia-ml.so.1"))
            .arg(&source)
            .output()
            .expect("a C compiler (cc) to build the fake NVML library");
        assert!(
            output.status.success(),
            "building the fake NVML failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let fake = FakeNvml { dir };
        fake.control(control);
        fake
    }

    fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// Replace the fake's state; it re-reads it on every call.
    fn control(&self, text: &str) {
        std::fs::write(self.dir.path().join("fake_nvml.control"), text).unwrap();
    }

    fn open(&self) -> NvmlMeter {
        NvmlMeter::open(Some(&self.library())).unwrap()
    }
}

fn joules(meter: &mut NvmlMeter) -> BTreeMap<String, f64> {
    meter
        .sample(&TWO_SECONDS)
        .unwrap()
        .into_iter()
        .map(|sample| {
            assert_eq!(sample.domain, Domain::Gpu);
            (sample.zone, sample.joules.0)
        })
        .collect()
}

fn assert_close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() < 1e-9,
        "measured {actual} J, expected {expected} J"
    );
}

#[test]
fn energy_counter_gives_joules_per_gpu() {
    let fake = FakeNvml::build("devices=2\ngpu0.energy_mj=1000\ngpu1.energy_mj=5000\n");
    let mut meter = fake.open();
    assert_eq!(meter.device_count(), 2);
    assert_eq!(
        (meter.source(), meter.is_estimate(), meter.domains()),
        ("nvml", false, vec![Domain::Gpu])
    );
    let baseline = joules(&mut meter);
    assert_eq!(
        baseline,
        BTreeMap::from([("gpu-0".to_string(), 0.0), ("gpu-1".to_string(), 0.0)])
    );

    fake.control("devices=2\ngpu0.energy_mj=3500\ngpu1.energy_mj=7000\n");
    let measured = joules(&mut meter);
    assert_close(measured["gpu-0"], 2.5);
    assert_close(measured["gpu-1"], 2.0);
}

#[test]
fn without_an_energy_counter_power_is_integrated_over_the_interval() {
    let fake = FakeNvml::build("devices=1\ngpu0.energy_mj=not_supported\ngpu0.power_mw=150000\n");
    let mut meter = fake.open();
    assert_eq!(
        joules(&mut meter)["gpu-0"],
        0.0,
        "first sample is a baseline"
    );
    assert_close(joules(&mut meter)["gpu-0"], 300.0);
}

#[test]
fn a_call_not_supported_silences_that_gpu_for_the_interval_logged_once() {
    let fake = FakeNvml::build("devices=2\ngpu0.energy_mj=1000\ngpu1.energy_mj=1000\n");
    let mut meter = fake.open();
    joules(&mut meter);
    fake.control("devices=2\ngpu0.energy_mj=2000\ngpu1.energy_mj=not_supported\n");
    let (intervals, logs) = capture_logs(|| (0..3).map(|_| joules(&mut meter)).collect::<Vec<_>>());
    assert_close(intervals[0]["gpu-0"], 1.0);
    for interval in &intervals {
        assert!(!interval.contains_key("gpu-1"), "{interval:?}");
        assert!(
            interval.contains_key("gpu-0"),
            "the other GPU carries on: {interval:?}"
        );
    }
    let lines = logs.lines_with(&["gpu-1", "nvmlDeviceGetTotalEnergyConsumption"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(
        lines[0].contains("WARN") && lines[0].contains("kind=NotSupported"),
        "{}",
        lines[0]
    );

    // Supported again: the counter covers the missed intervals, nothing lost.
    fake.control("devices=2\ngpu0.energy_mj=2000\ngpu1.energy_mj=4000\n");
    assert_close(joules(&mut meter)["gpu-1"], 3.0);
}

#[test]
fn a_lost_gpu_reports_nothing_logged_once_and_the_rest_carry_on() {
    let fake = FakeNvml::build("devices=2\ngpu0.energy_mj=1000\ngpu1.energy_mj=1000\n");
    let mut meter = fake.open();
    joules(&mut meter);
    let (intervals, logs) = capture_logs(|| {
        (0..3u64)
            .map(|step| {
                fake.control(&format!(
                    "devices=2\ngpu0.energy_mj={}\ngpu1.lost=1\n",
                    2000 + step * 1000
                ));
                let energy = joules(&mut meter);
                let processes = meter.gpu_processes();
                (energy, processes)
            })
            .collect::<Vec<_>>()
    });
    for (energy, processes) in &intervals {
        assert_close(energy["gpu-0"], 1.0);
        assert!(!energy.contains_key("gpu-1"), "{energy:?}");
        assert!(processes.iter().all(|process| process.zone != "gpu-1"));
    }
    let lost = logs.lines_with(&["gpu-1", "kind=GpuLost"]);
    assert!(!lost.is_empty(), "{}", logs.text());
    // One line per failing call, not one per interval.
    let mut calls: Vec<&str> = lost
        .iter()
        .filter_map(|line| line.split("call=\"").nth(1)?.split('"').next())
        .collect();
    let total = calls.len();
    calls.sort();
    calls.dedup();
    assert_eq!(
        total,
        calls.len(),
        "each failing call logged once: {}",
        logs.text()
    );
}

#[test]
fn process_utilisation_is_averaged_per_interval_and_pids_listed() {
    let fake = FakeNvml::build(
        "devices=1\ngpu0.energy_mj=0\ngpu0.procs=4242:-,777:-\n\
         gpu0.util=4242:100:40,4242:200:60,999:150:10\n",
    );
    let mut meter = fake.open();
    let mut processes = meter.gpu_processes();
    processes.sort_by_key(|process| process.pid);
    let sample = |pid, utilisation_percent: f64| GpuProcessSample {
        pid,
        zone: "gpu-0".into(),
        utilisation_percent,
    };
    // 777 runs but has no sample; 999 has samples but no compute context.
    assert_eq!(
        processes,
        vec![sample(777, 0.0), sample(999, 10.0), sample(4242, 50.0)]
    );

    // Next call: only samples newer than the last seen (200).
    fake.control("devices=1\ngpu0.energy_mj=0\ngpu0.procs=4242:-\ngpu0.util=4242:100:40,4242:200:60,4242:300:90\n");
    assert_eq!(meter.gpu_processes(), vec![sample(4242, 90.0)]);
    // No newer sample: NVML says NOT_FOUND, the process still shows, at zero.
    let (processes, logs) = capture_logs(|| meter.gpu_processes());
    assert_eq!(processes, vec![sample(4242, 0.0)]);
    assert!(
        logs.lines_with(&["WARN"]).is_empty(),
        "NOT_FOUND is no error: {}",
        logs.text()
    );

    fake.control(
        "devices=1\ngpu0.energy_mj=0\ngpu0.procs=4242:-\ngpu0.util_status=not_supported\n",
    );
    let (processes, logs) = capture_logs(|| (meter.gpu_processes(), meter.gpu_processes()).0);
    assert_eq!(processes, vec![sample(4242, 0.0)]);
    assert_eq!(
        logs.lines_with(&["nvmlDeviceGetProcessUtilization", "kind=NotSupported"])
            .len(),
        1,
        "{}",
        logs.text()
    );
}

#[test]
fn mig_instances_are_listed_and_processes_carry_their_instance() {
    let fake = FakeNvml::build(
        "devices=2\ngpu0.energy_mj=10\ngpu0.mig=1,2\ngpu0.procs=31:2,32:-\ngpu1.energy_mj=20\n",
    );
    let mut meter = fake.open();
    assert!(meter.has_mig_bindings());
    assert_eq!(meter.mig_instances(), vec!["gpu-0-mig-1", "gpu-0-mig-2"]);
    let zones: BTreeMap<u32, String> = meter
        .gpu_processes()
        .into_iter()
        .map(|process| (process.pid, process.zone))
        .collect();
    assert_eq!(
        zones,
        BTreeMap::from([(31, "gpu-0-mig-2".to_string()), (32, "gpu-0".to_string())])
    );
    // Energy stays per physical GPU.
    assert_eq!(
        joules(&mut meter).keys().collect::<Vec<_>>(),
        vec!["gpu-0", "gpu-1"]
    );
}

#[test]
fn no_library_no_driver_or_no_gpu_is_absent_with_one_info_line() {
    let missing = Path::new("/nonexistent/ergon-test/libnvidia-ml.so.1");
    let err = NvmlMeter::open(Some(missing)).err().unwrap();
    assert!(matches!(err, MeterError::Absent(_)), "{err}");
    assert!(err.to_string().contains("no NVIDIA driver"), "{err}");

    let no_driver = FakeNvml::build("init=driver_not_loaded\n");
    let err = NvmlMeter::open(Some(&no_driver.library())).err().unwrap();
    assert!(err.to_string().contains("driver is not loaded"), "{err}");

    let no_gpu = FakeNvml::build("devices=0\n");
    let err = NvmlMeter::open(Some(&no_gpu.library())).err().unwrap();
    assert!(err.to_string().contains("no GPU"), "{err}");

    let host = tempfile::tempdir().unwrap();
    let config = MeterConfig {
        host_sys: host.path().to_path_buf(),
        host_proc: host.path().to_path_buf(),
        rapl: RaplInterface::Off,
        nvml_library: Some(missing.to_path_buf()),
        ..MeterConfig::default()
    };
    let (meters, logs) = capture_logs(|| detect(&config));
    assert!(meters.iter().all(|meter| meter.source() != "nvml"));
    let lines = logs.lines_with(&["source=\"nvml\""]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(
        lines[0].contains("INFO") && lines[0].contains("meter absent"),
        "{}",
        lines[0]
    );
}

#[test]
fn detect_finds_the_gpus_through_the_configured_library() {
    let fake =
        FakeNvml::build("devices=3\ngpu0.energy_mj=1\ngpu1.energy_mj=1\ngpu2.power_mw=1000\n");
    let host = tempfile::tempdir().unwrap();
    let config = MeterConfig {
        host_sys: host.path().to_path_buf(),
        host_proc: host.path().to_path_buf(),
        rapl: RaplInterface::Off,
        nvml_library: Some(fake.library()),
        ..MeterConfig::default()
    };
    let (meters, logs) = capture_logs(|| detect(&config));
    let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
    assert_eq!(sources, vec!["nvml", "model"]);
    assert_eq!(logs.lines_with(&["GPU found"]).len(), 3, "{}", logs.text());
    assert_eq!(
        logs.lines_with(&["meter found", "gpus=3"]).len(),
        1,
        "{}",
        logs.text()
    );
}

#[test]
fn one_bad_gpu_is_down_with_the_failing_call_and_the_others_are_read() {
    let fake = FakeNvml::build(
        "devices=3\ngpu0.energy_mj=1000\ngpu1.energy_mj=1000\ngpu2.power_mw=100000\n",
    );
    let mut meter = fake.open();
    joules(&mut meter);
    fake.control("devices=3\ngpu0.energy_mj=3000\ngpu1.lost=1\ngpu2.power_mw=100000\n");
    let measured = joules(&mut meter);
    assert_close(measured["gpu-0"], 2.0);
    assert_close(measured["gpu-2"], 200.0);
    assert!(!measured.contains_key("gpu-1"), "{measured:?}");
    assert_eq!(
        zones_up(&meter),
        BTreeMap::from([
            ("gpu-0".to_string(), true),
            ("gpu-1".to_string(), false),
            ("gpu-2".to_string(), true)
        ])
    );
    let reason = meter_support::reason_of(&meter, "gpu-1");
    assert!(reason.contains("nvmlDevice"), "names the call: {reason}");

    fake.control("devices=3\ngpu0.energy_mj=3000\ngpu1.energy_mj=1500\ngpu2.power_mw=100000\n");
    assert_close(joules(&mut meter)["gpu-1"], 0.5);
    assert!(zones_up(&meter).iter().all(|(_, up)| *up));
}

#[test]
fn a_counter_jump_of_100_times_the_power_limit_is_rejected_and_the_next_interval_measured() {
    // A 300 W GPU: at most 600 W × 2 s = 1200 J per interval.
    let fake = FakeNvml::build(
        "devices=2\ngpu0.energy_mj=1000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=1000\n",
    );
    let mut meter = fake.open();
    joules(&mut meter);
    fake.control(
        "devices=2\ngpu0.energy_mj=120001000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=2000\n",
    );
    let (measured, logs) = capture_logs(|| joules(&mut meter));
    assert!(!measured.contains_key("gpu-0"), "never added: {measured:?}");
    assert_close(measured["gpu-1"], 1.0);
    assert_eq!(rejected(&meter, Rejection::AboveMaxPower), 1);
    assert_eq!(
        logs.lines_with(&["WARN", "gpu-0", "above_max_power"]).len(),
        1,
        "{}",
        logs.text()
    );
    fake.control(
        "devices=2\ngpu0.energy_mj=120501000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=2000\n",
    );
    assert_close(joules(&mut meter)["gpu-0"], 500.0);
}

#[test]
fn garbage_negative_and_huge_driver_values_are_never_counted() {
    // The fake parses values as the C library does (strtoull): garbage reads
    // 0 (a counter that went backwards), -1 reads 2^64-1 (a jump no GPU makes).
    for (what, value, rejection) in [
        ("garbage", "garbage", Rejection::CounterReset),
        ("negative", "-1", Rejection::AboveMaxPower),
        ("huge", "18446744073709551615", Rejection::AboveMaxPower),
    ] {
        let fake = FakeNvml::build("devices=2\ngpu0.energy_mj=5000\ngpu1.energy_mj=5000\n");
        let mut meter = fake.open();
        joules(&mut meter);
        fake.control(&format!(
            "devices=2\ngpu0.energy_mj={value}\ngpu1.energy_mj=6000\n"
        ));
        let measured = joules(&mut meter);
        assert_eq!(measured.get("gpu-0").copied().unwrap_or(0.0), 0.0, "{what}");
        assert_close(measured["gpu-1"], 1.0);
        assert_eq!(rejected(&meter, rejection), 1, "{what}");
    }
    // A power reading of 4 MW (the gpu ceiling is 2 kW) is rejected as well.
    let fake =
        FakeNvml::build("devices=1\ngpu0.energy_mj=not_supported\ngpu0.power_mw=4000000000\n");
    let mut meter = fake.open();
    assert!(joules(&mut meter).is_empty());
    assert_eq!(rejected(&meter, Rejection::AboveMaxPower), 1);
}

#[test]
fn a_gpu_whose_name_is_not_utf8_is_still_measured() {
    let fake = FakeNvml::build("devices=1\ngpu0.energy_mj=1000\n");
    std::fs::write(
        fake.dir.path().join("fake_nvml.control"),
        b"devices=1\ngpu0.name=\xff\xfe\x1b[31m\ngpu0.energy_mj=1000\n",
    )
    .unwrap();
    let mut meter = fake.open();
    joules(&mut meter);
    std::fs::write(
        fake.dir.path().join("fake_nvml.control"),
        b"devices=1\ngpu0.name=\xff\xfe\x1b[31m\ngpu0.energy_mj=2500\n",
    )
    .unwrap();
    assert_close(joules(&mut meter)["gpu-0"], 1.5);
}

#[test]
fn a_gpu_whose_permission_changes_is_down_until_it_answers_again() {
    // NVML answers NO_PERMISSION when the device node (/dev/nvidiaN) is not
    // accessible to the exporter, e.g. after a udev or cgroup device rule
    // changes; the fake returns it for every call on the device.
    let fake = FakeNvml::build("devices=2\ngpu0.energy_mj=1000\ngpu1.energy_mj=1000\n");
    let mut meter = fake.open();
    joules(&mut meter);
    fake.control("devices=2\ngpu0.energy_mj=2000\ngpu1.energy_mj=2000\ngpu1.no_permission=1\n");
    let (measured, logs) = capture_logs(|| joules(&mut meter));
    assert_close(measured["gpu-0"], 1.0);
    assert!(!measured.contains_key("gpu-1"), "{measured:?}");
    assert!(!zones_up(&meter)["gpu-1"]);
    assert!(
        meter_support::reason_of(&meter, "gpu-1").contains("nvmlDevice"),
        "{:?}",
        meter.health()
    );
    assert_eq!(
        logs.lines_with(&["WARN", "gpu-1", "NoPermission"]).len(),
        1,
        "{}",
        logs.text()
    );
    // Allowed again: the counter covers the interval it missed.
    fake.control("devices=2\ngpu0.energy_mj=2000\ngpu1.energy_mj=4000\n");
    assert_close(joules(&mut meter)["gpu-1"], 3.0);
    assert!(zones_up(&meter)["gpu-1"]);
}

/// NVML's strings and numbers as a broken or hostile driver might return
/// them (names of any length and alphabet, counters that are not numbers,
/// process lists of any shape): the meter must neither panic nor produce a
/// zone label that is not `gpu-<index>[-mig-<id>]`. Property-tested rather
/// than fuzzed: every case goes through the real FFI path, which libFuzzer
/// cannot drive without the library.
#[test]
fn nvml_strings_and_numbers_of_any_shape_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let fake = FakeNvml::build("devices=1\n");
    let text = "[^\n\0]{0,200}";
    let number = prop_oneof![
        Just("18446744073709551615".to_string()),
        Just("-1".to_string()),
        "[0-9]{0,25}",
        "[^\n\0]{0,24}"
    ];
    let strategy = (
        text,
        number.clone(),
        number,
        "[0-9:,-]{0,60}",
        "[0-9:,]{0,60}",
        "[0-9,]{0,20}",
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(name, energy, power, procs, util, mig)| {
            fake.control(&format!(
                "devices=2\ngpu0.name={name}\ngpu0.energy_mj={energy}\ngpu0.procs={procs}\n\
                 gpu0.util={util}\ngpu0.mig={mig}\ngpu1.name={name}\ngpu1.energy_mj=not_supported\n\
                 gpu1.power_mw={power}\n"
            ));
            let mut meter = NvmlMeter::open(Some(&fake.library())).unwrap();
            for _ in 0..2 {
                let _ = meter.sample(&TWO_SECONDS);
                for process in meter.gpu_processes() {
                    prop_assert!(process.zone.starts_with("gpu-"), "{}", process.zone);
                    prop_assert!(process.utilisation_percent.is_finite());
                }
                fake.control(&format!(
                    "devices=2\ngpu0.energy_mj={power}\ngpu1.power_mw={energy}\n"
                ));
            }
            for zone in meter.mig_instances() {
                prop_assert!(zone.len() <= 32, "{zone}");
            }
            Ok(())
        })
        .unwrap();
}

/// A GPU unreachable for five intervals: its energy counter kept counting,
/// and the step of its next reading spans six intervals, judged against six
/// intervals' maximum: counted, not rejected. A jump no GPU could make over
/// the whole outage is still rejected.
#[test]
fn a_gpu_back_after_five_intervals_counts_them() {
    // A 300 W GPU: at most 600 W, 1200 J per two-second interval.
    let fake = FakeNvml::build(
        "devices=2\ngpu0.energy_mj=1000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=1000\n",
    );
    let mut meter = fake.open();
    joules(&mut meter);
    for interval in 0..5u64 {
        fake.control(&format!(
            "devices=2\ngpu0.lost=1\ngpu1.energy_mj={}\n",
            1000 + (interval + 1) * 2000
        ));
        let measured = joules(&mut meter);
        assert!(!measured.contains_key("gpu-0"), "{interval}: {measured:?}");
        assert!(!zones_up(&meter)["gpu-0"], "{interval}");
    }
    // Back: twelve seconds at 250 W, 3000 J, more than one interval's 1200 J.
    fake.control(
        "devices=2\ngpu0.energy_mj=3001000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=13000\n",
    );
    let (measured, logs) = capture_logs(|| joules(&mut meter));
    assert_close(measured["gpu-0"], 3000.0);
    assert_eq!(
        rejected(&meter, Rejection::AboveMaxPower),
        0,
        "{}",
        logs.text()
    );
    assert!(zones_up(&meter)["gpu-0"]);

    // Another outage of five intervals, then 100 × what the GPU can draw in
    // the twelve seconds (7200 J): rejected, never added.
    for _ in 0..5 {
        fake.control("devices=2\ngpu0.no_permission=1\ngpu1.energy_mj=13000\n");
        joules(&mut meter);
    }
    fake.control(
        "devices=2\ngpu0.energy_mj=723001000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=13000\n",
    );
    let measured = joules(&mut meter);
    assert!(!measured.contains_key("gpu-0"), "never added: {measured:?}");
    assert_eq!(rejected(&meter, Rejection::AboveMaxPower), 1);
    // The baseline moved on: the next interval is measured.
    fake.control(
        "devices=2\ngpu0.energy_mj=723501000\ngpu0.power_limit_mw=300000\ngpu1.energy_mj=13000\n",
    );
    assert_close(joules(&mut meter)["gpu-0"], 500.0);
}
