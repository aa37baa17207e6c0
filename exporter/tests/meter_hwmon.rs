//! hwmon platform power sensors against a temporary sysfs tree.

mod meter_support;

use std::path::Path;

use ergon::meter::hwmon::HwmonMeter;
use ergon::meter::{Meter, MeterConfig, MeterContext, MeterError, RaplInterface, detect};
use ergon::units::{Domain, Joules, Nanos};
use meter_support::SysFixture;

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
