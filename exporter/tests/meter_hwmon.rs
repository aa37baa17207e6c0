//! hwmon platform power sensors against a temporary sysfs tree.

mod meter_support;

use std::collections::BTreeMap;
use std::path::Path;

use ergon::meter::hwmon::HwmonMeter;
use ergon::meter::{
    Meter, MeterConfig, MeterContext, MeterError, RaplInterface, Rejection, detect,
};
use ergon::units::{Domain, Joules, Nanos};
use meter_support::{
    BAD_VALUES, SysFixture, capture_logs, line_with, run_as_nobody_around, zones_up,
};

/// Add `class/hwmon/<device>` (a symlink to its device directory, as sysfs has it).
fn add_chip(root: &Path, device: &str, chip: &str, files: &[(&str, &str)]) {
    let dir = root
        .join("devices/platform")
        .join(device)
        .join("hwmon")
        .join(device);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("name"), format!("{chip}\n")).unwrap();
    for (name, value) in files {
        std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }
    std::fs::create_dir_all(root.join("class/hwmon")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("class/hwmon").join(device)).unwrap();
}

const TWO_SECONDS: MeterContext = MeterContext {
    elapsed: Nanos(2_000_000_000),
    cpu_utilisation: None,
    cpus: 1,
};

#[test]
fn the_acpi_power_meter_is_integrated_over_the_interval_as_platform_energy() {
    let fixture = SysFixture::new();
    // The average is preferred over the instantaneous reading.
    add_chip(
        fixture.path(),
        "hwmon0",
        "power_meter",
        &[
            ("power1_average", "120000000"),
            ("power1_input", "999000000"),
            ("power1_average_interval", "1000"),
        ],
    );
    add_chip(
        fixture.path(),
        "hwmon1",
        "amdgpu",
        &[("power1_average", "35000000")],
    );
    add_chip(
        fixture.path(),
        "hwmon2",
        "coretemp",
        &[("temp1_input", "45000")],
    );

    let mut meter = HwmonMeter::open(fixture.path(), &["power_meter".to_string()]).unwrap();
    assert_eq!(meter.zones(), vec!["power_meter-hwmon0-power1"]);
    assert_eq!(
        (meter.source(), meter.is_estimate(), meter.domains()),
        ("hwmon", false, vec![Domain::Platform])
    );
    assert_eq!(
        meter.sample(&TWO_SECONDS).unwrap()[0].joules,
        Joules::ZERO,
        "baseline"
    );
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    assert_eq!(sample.len(), 1);
    assert_eq!(sample[0].domain, Domain::Platform);
    assert!((sample[0].joules.0 - 240.0).abs() < 1e-9, "{:?}", sample[0]);

    // Only _input exists: it is used.
    let fixture = SysFixture::new();
    add_chip(
        fixture.path(),
        "hwmon0",
        "power_meter",
        &[("power2_input", "50000000")],
    );
    let mut meter = HwmonMeter::open(fixture.path(), &["power_meter".to_string()]).unwrap();
    meter.sample(&TWO_SECONDS).unwrap();
    assert!((meter.sample(&TWO_SECONDS).unwrap()[0].joules.0 - 100.0).abs() < 1e-9);
}

#[test]
fn chips_not_named_as_platform_meters_are_skipped() {
    let fixture = SysFixture::new();
    add_chip(
        fixture.path(),
        "hwmon1",
        "amdgpu",
        &[("power1_average", "35000000")],
    );
    let err = HwmonMeter::open(fixture.path(), &["power_meter".to_string()])
        .err()
        .unwrap();
    assert!(matches!(err, MeterError::Absent(_)), "{err}");
    // Named explicitly, it is read.
    let meter = HwmonMeter::open(fixture.path(), &["amdgpu".to_string()]).unwrap();
    assert_eq!(meter.zones(), vec!["amdgpu-hwmon1-power1"]);
}

#[test]
fn detect_adds_hwmon_beside_the_cpu_meter() {
    let fixture = SysFixture::intel_two_socket();
    add_chip(
        fixture.path(),
        "hwmon3",
        "power_meter",
        &[("power1_average", "200000000")],
    );
    let config = MeterConfig {
        host_sys: fixture.path().to_path_buf(),
        host_proc: fixture.write_cpuinfo("processor : 0\n"),
        rapl: RaplInterface::Auto,
        nvml: false,
        ..MeterConfig::default()
    };
    let sources: Vec<&str> = detect(&config).iter().map(|meter| meter.source()).collect();
    assert_eq!(sources, vec!["rapl", "hwmon"]);
}

fn chip_dir(root: &Path, device: &str) -> std::path::PathBuf {
    root.join("devices/platform")
        .join(device)
        .join("hwmon")
        .join(device)
}

#[test]
fn a_bad_sensor_costs_only_itself_names_the_file_and_comes_back() {
    for (what, bad) in BAD_VALUES {
        let fixture = SysFixture::new();
        add_chip(
            fixture.path(),
            "hwmon0",
            "power_meter",
            &[
                ("power1_average", "100000000"),
                ("power2_average", "50000000"),
            ],
        );
        let power2 = chip_dir(fixture.path(), "hwmon0").join("power2_average");
        std::fs::write(&power2, bad).unwrap();
        let (meter, logs) =
            capture_logs(|| HwmonMeter::open(fixture.path(), &["power_meter".to_string()]));
        let mut meter = meter.unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(
            zones_up(&meter),
            BTreeMap::from([
                ("power_meter-hwmon0-power1".to_string(), true),
                ("power_meter-hwmon0-power2".to_string(), false)
            ]),
            "{what}"
        );
        let lines = logs.lines_with(&["WARN", "power2", "power2_average"]);
        assert_eq!(lines.len(), 1, "{what}: {}", logs.text());
        assert!(
            lines[0].contains(&format!("found \"{}\"", ergon::meter::shown(bad))),
            "{what}: {}",
            lines[0]
        );
        meter.sample(&TWO_SECONDS).unwrap();
        let sample = meter.sample(&TWO_SECONDS).unwrap();
        assert_eq!(sample.len(), 1, "{what}: {sample:?}");
        assert!((sample[0].joules.0 - 200.0).abs() < 1e-9, "{what}");

        // Fixed: read again, from the next interval.
        std::fs::write(&power2, "50000000\n").unwrap();
        let sample = meter.sample(&TWO_SECONDS).unwrap();
        assert_eq!(sample.len(), 2, "{what}: {sample:?}");
        assert!(zones_up(&meter).iter().all(|(_, up)| *up), "{what}");
    }
}

#[test]
fn a_sensor_that_vanishes_is_down_until_it_comes_back() {
    let fixture = SysFixture::new();
    add_chip(
        fixture.path(),
        "hwmon0",
        "power_meter",
        &[
            ("power1_average", "100000000"),
            ("power2_input", "50000000"),
        ],
    );
    let mut meter = HwmonMeter::open(fixture.path(), &["power_meter".to_string()]).unwrap();
    meter.sample(&TWO_SECONDS).unwrap();
    let power2 = chip_dir(fixture.path(), "hwmon0").join("power2_input");
    // A removed device's open sysfs file stops reading (ENODEV); a tmpfs file
    // keeps its content, so the fixture empties it before removing it.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&power2)
        .unwrap();
    std::fs::remove_file(&power2).unwrap();
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    assert_eq!(sample.len(), 1, "{sample:?}");
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    assert_eq!(sample.len(), 1, "{sample:?}");
    assert!(!zones_up(&meter)["power_meter-hwmon0-power2"]);
    std::fs::write(&power2, "50000000\n").unwrap();
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    assert_eq!(sample.len(), 2, "{sample:?}");
    assert!(zones_up(&meter).iter().all(|(_, up)| *up));
}

#[test]
fn a_reading_above_the_sensors_limit_or_the_ceiling_is_rejected_and_counted() {
    let fixture = SysFixture::new();
    add_chip(
        fixture.path(),
        "hwmon0",
        "power_meter",
        &[
            ("power1_average", "70000000"),
            ("power1_max", "35000000"),
            ("power2_average", "100000000"),
        ],
    );
    let mut meter = HwmonMeter::open(fixture.path(), &["power_meter".to_string()]).unwrap();
    meter.sample(&TWO_SECONDS).unwrap();
    let dir = chip_dir(fixture.path(), "hwmon0");
    // 9 kW on a 35 W PC's meter (limit 35 W × 2), 300 kW on one without a
    // limit (platform ceiling 20 kW).
    std::fs::write(dir.join("power1_average"), "9000000000\n").unwrap();
    std::fs::write(dir.join("power2_average"), "300000000000\n").unwrap();
    let (sample, logs) = capture_logs(|| meter.sample(&TWO_SECONDS).unwrap());
    assert!(sample.is_empty(), "never added: {sample:?}");
    assert_eq!(meter.health().rejected[&Rejection::AboveMaxPower], 2);
    assert_eq!(
        logs.lines_with(&["WARN", "above_max_power"]).len(),
        2,
        "{}",
        logs.text()
    );
    // At the limit's headroom exactly: accepted.
    std::fs::write(dir.join("power1_average"), "70000000\n").unwrap();
    std::fs::write(dir.join("power2_average"), "100000000\n").unwrap();
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    assert_eq!(sample.len(), 2, "{sample:?}");
    assert!((sample[0].joules.0 - 140.0).abs() < 1e-9, "{sample:?}");
}

const PERMISSION_CHANGE_VAR: &str = "ERGON_TEST_HWMON_PERMISSION_FIXTURE";

/// The child half of the test below, run as uid 65534.
#[test]
#[ignore = "run as uid 65534 by a_sensor_whose_permission_changes_is_down_until_readable"]
fn hwmon_permission_child() {
    let Ok(root) = std::env::var(PERMISSION_CHANGE_VAR) else {
        eprintln!("hwmon_permission_child only runs as the child of its test");
        return;
    };
    let mut meter =
        HwmonMeter::open(Path::new(&root), &["power_meter".to_string()]).expect("power1 opens");
    meter.sample(&TWO_SECONDS).unwrap();
    let report = |meter: &HwmonMeter, when: &str| {
        let up = zones_up(meter);
        let reason = meter
            .health()
            .down()
            .map(|zone| zone.reason.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "{when}: power1={} power2={} reason={reason}",
            up["power_meter-hwmon0-power1"], up["power_meter-hwmon0-power2"]
        );
    };
    report(&meter, "BEFORE");
    meter_support::wait_for_parent();
    let sample = meter.sample(&TWO_SECONDS).unwrap();
    report(&meter, "AFTER");
    println!("AFTER-SENSORS: {}", sample.len());
}

#[test]
fn a_sensor_whose_permission_changes_is_down_until_readable() {
    use std::os::unix::fs::PermissionsExt;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to run the reader as another uid; skipped");
        return;
    }
    let fixture = SysFixture::new();
    add_chip(
        fixture.path(),
        "hwmon0",
        "power_meter",
        &[
            ("power1_average", "100000000"),
            ("power2_average", "50000000"),
        ],
    );
    fixture.make_energy_root_only();
    let power2 = chip_dir(fixture.path(), "hwmon0").join("power2_average");
    std::fs::set_permissions(&power2, std::fs::Permissions::from_mode(0o400)).unwrap();
    let output = run_as_nobody_around(
        "hwmon_permission_child",
        PERMISSION_CHANGE_VAR,
        fixture.path(),
        || std::fs::set_permissions(&power2, std::fs::Permissions::from_mode(0o444)).unwrap(),
    );
    let before = line_with(&output, "BEFORE:");
    assert!(
        before.contains("power1=true")
            && before.contains("power2=false")
            && before.contains("power2_average")
            && before.contains("Permission denied"),
        "{output}"
    );
    let after = line_with(&output, "AFTER:");
    assert!(after.contains("power2=true"), "{output}");
    assert!(output.contains("AFTER-SENSORS: 2"), "{output}");
}

/// Chip `name` contents no driver writes (empty, whitespace or control
/// bytes, not UTF-8, longer than any name), by what they are. A name such
/// as "garbage" or "-5" is a name: a chip not configured, skipped.
fn bad_chip_names() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", b"".to_vec()),
        ("blank", b"\n".to_vec()),
        ("non-UTF-8", b"\xff\xfe1\x1b[31m\n".to_vec()),
        ("garbage", b"\x00\x01gar bage\x07\n".to_vec()),
        ("huge", vec![b'x'; 100_000]),
    ]
}

/// What a message shows of `bad` (trimmed, escaped, truncated by `shown`;
/// the closing quote left off, as a file that is not UTF-8 is shown whole).
fn found(bad: &[u8]) -> String {
    let shown = ergon::meter::shown(bad.trim_ascii());
    let head = shown.split('…').next().unwrap().to_string();
    format!("found \"{head}")
}

#[test]
fn a_chip_whose_name_cannot_be_read_is_a_warning_and_down_and_the_others_are_read() {
    for (what, bad) in bad_chip_names() {
        let fixture = SysFixture::new();
        add_chip(
            fixture.path(),
            "hwmon0",
            "power_meter",
            &[("power1_average", "100000000")],
        );
        add_chip(
            fixture.path(),
            "hwmon1",
            "power_meter",
            &[("power1_average", "50000000")],
        );
        let name = chip_dir(fixture.path(), "hwmon1").join("name");
        std::fs::write(&name, &bad).unwrap();
        let (meter, logs) =
            capture_logs(|| HwmonMeter::open(fixture.path(), &["power_meter".to_string()]));
        let mut meter = meter.unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(
            zones_up(&meter),
            BTreeMap::from([
                ("hwmon1".to_string(), false),
                ("power_meter-hwmon0-power1".to_string(), true),
            ]),
            "{what}"
        );
        let reason = meter_support::reason_of(&meter, "hwmon1");
        assert!(
            reason.contains("hwmon1/name") && reason.contains(&found(&bad)),
            "{what}: {reason}"
        );
        let warnings = logs.lines_with(&["WARN", "hwmon1/name"]);
        assert_eq!(warnings.len(), 1, "{what}: {}", logs.text());
        assert!(
            !warnings[0].contains('\u{1b}') && warnings[0].len() < 1000,
            "{what}: {warnings:?}"
        );
        meter.sample(&TWO_SECONDS).unwrap();
        let sample = meter.sample(&TWO_SECONDS).unwrap();
        assert_eq!(sample.len(), 1, "{what}: {sample:?}");
    }
}

#[test]
fn a_lone_chip_whose_name_cannot_be_read_is_a_warning_not_an_absent_meter() {
    for (what, bad) in bad_chip_names() {
        let fixture = SysFixture::new();
        add_chip(
            fixture.path(),
            "hwmon0",
            "power_meter",
            &[("power1_average", "100000000")],
        );
        std::fs::write(chip_dir(fixture.path(), "hwmon0").join("name"), &bad).unwrap();
        let config = MeterConfig {
            host_sys: fixture.path().to_path_buf(),
            host_proc: fixture.write_cpuinfo("processor : 0\n"),
            rapl: RaplInterface::Off,
            nvml: false,
            ..MeterConfig::default()
        };
        let (meters, logs) = capture_logs(|| detect(&config));
        assert!(
            meters.iter().all(|meter| meter.source() != "hwmon"),
            "{what}"
        );
        assert!(
            !logs
                .lines_with(&["WARN", "hwmon", "hwmon0/name", &found(&bad)])
                .is_empty(),
            "{what}: {}",
            logs.text()
        );
        assert!(
            logs.lines_with(&["hwmon", "meter absent"]).is_empty(),
            "{what}: {}",
            logs.text()
        );
    }
}

#[test]
fn a_bad_power_max_or_crit_is_warned_once_and_the_ceiling_applies() {
    for limit in ["power1_max", "power1_crit"] {
        for (what, bad) in BAD_VALUES {
            let fixture = SysFixture::new();
            add_chip(
                fixture.path(),
                "hwmon0",
                "power_meter",
                &[("power1_average", "100000000")],
            );
            let dir = chip_dir(fixture.path(), "hwmon0");
            std::fs::write(dir.join(limit), bad).unwrap();
            let (meter, logs) = capture_logs(|| {
                let mut meter =
                    HwmonMeter::open(fixture.path(), &["power_meter".to_string()]).unwrap();
                for _ in 0..3 {
                    meter.sample(&TWO_SECONDS).unwrap();
                }
                meter
            });
            let mut meter = meter;
            let warnings = logs.lines_with(&["WARN", &format!("hwmon0/{limit}")]);
            assert_eq!(warnings.len(), 1, "{limit} {what}: {}", logs.text());
            assert!(
                warnings[0].contains(&found(bad)) && !warnings[0].contains('\u{1b}'),
                "{limit} {what}: {}",
                warnings[0]
            );
            assert!(
                zones_up(&meter)["power_meter-hwmon0-power1"],
                "{limit} {what}"
            );
            // The platform ceiling (20 kW) applies: 15 kW counts, 30 kW not.
            std::fs::write(dir.join("power1_average"), "15000000000\n").unwrap();
            assert_eq!(
                meter.sample(&TWO_SECONDS).unwrap().len(),
                1,
                "{limit} {what}"
            );
            std::fs::write(dir.join("power1_average"), "30000000000\n").unwrap();
            assert!(
                meter.sample(&TWO_SECONDS).unwrap().is_empty(),
                "{limit} {what}"
            );
            assert_eq!(meter.health().rejected[&Rejection::AboveMaxPower], 1);
        }
    }
}
