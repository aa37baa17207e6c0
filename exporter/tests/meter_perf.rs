//! The perf `power` PMU reader: parsing real-shaped sysfs fixtures, and a
//! real `perf_event_open` failing where the PMU does not exist.

mod meter_support;

use std::path::Path;

use ergon::meter::perf_power::{PerfPowerMeter, PowerEvent, parse_power_pmu};
use ergon::meter::{MeterConfig, MeterError, RaplInterface, detect};
use ergon::units::Domain;
use meter_support::{SysFixture, capture_logs};

/// 2^-32 J, what Intel parts report.
const SCALE: &str = "2.3283064365386962890625e-10";

/// A PMU type no PMU on this machine has, so the kernel answers ENOENT.
fn unused_pmu_type() -> u32 {
    let highest = std::fs::read_dir("/sys/bus/event_source/devices")
        .map(|entries| {
            entries
                .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("type")).ok())
                .filter_map(|text| text.trim().parse::<u32>().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    highest + 1000
}

/// A power PMU like an Intel server's: package, cores, ram, psys, gpu.
fn write_pmu(root: &Path, pmu_type: u32, cpumask: &str) {
    let pmu = root.join("bus/event_source/devices/power");
    std::fs::create_dir_all(pmu.join("events")).unwrap();
    std::fs::create_dir_all(pmu.join("format")).unwrap();
    std::fs::write(pmu.join("type"), format!("{pmu_type}\n")).unwrap();
    std::fs::write(pmu.join("cpumask"), format!("{cpumask}\n")).unwrap();
    std::fs::write(pmu.join("format/event"), "config:0-7\n").unwrap();
    for (name, code) in [
        ("energy-cores", 1),
        ("energy-pkg", 2),
        ("energy-ram", 3),
        ("energy-gpu", 4),
        ("energy-psys", 5),
    ] {
        std::fs::write(
            pmu.join("events").join(name),
            format!("event=0x{code:02x}\n"),
        )
        .unwrap();
        std::fs::write(
            pmu.join("events").join(format!("{name}.scale")),
            format!("{SCALE}\n"),
        )
        .unwrap();
        std::fs::write(pmu.join("events").join(format!("{name}.unit")), "Joules\n").unwrap();
    }
}

#[test]
fn event_codes_scales_units_and_cpumask_parse() {
    let fixture = SysFixture::new();
    write_pmu(fixture.path(), 21, "0,36");
    let pmu = parse_power_pmu(fixture.path()).unwrap();
    assert_eq!(pmu.pmu_type, 21);
    assert_eq!(pmu.cpus, vec![0, 36]);
    let scale = 2f64.powi(-32);
    let event = |name: &str, domain, config| PowerEvent {
        name: name.to_string(),
        domain,
        config,
        scale,
    };
    assert_eq!(
        pmu.events,
        vec![
            event("energy-cores", Domain::Core, 1),
            event("energy-gpu", Domain::Uncore, 4),
            event("energy-pkg", Domain::Package, 2),
            event("energy-psys", Domain::Psys, 5),
            event("energy-ram", Domain::Dram, 3),
        ]
    );
}

#[test]
fn a_wider_format_places_terms_at_their_bits() {
    let fixture = SysFixture::new();
    write_pmu(fixture.path(), 21, "0");
    let pmu_dir = fixture.path().join("bus/event_source/devices/power");
    std::fs::write(pmu_dir.join("format/umask"), "config:8-15\n").unwrap();
    std::fs::write(pmu_dir.join("events/energy-pkg"), "event=0x02,umask=0x01\n").unwrap();
    let pmu = parse_power_pmu(fixture.path()).unwrap();
    let package = pmu
        .events
        .iter()
        .find(|event| event.name == "energy-pkg")
        .unwrap();
    assert_eq!(package.config, 0x0102);
}

#[test]
fn bad_unit_or_scale_names_the_file() {
    let fixture = SysFixture::new();
    write_pmu(fixture.path(), 21, "0");
    let events = fixture.path().join("bus/event_source/devices/power/events");
    std::fs::write(events.join("energy-ram.unit"), "Watts\n").unwrap();
    let err = parse_power_pmu(fixture.path()).unwrap_err().to_string();
    assert!(
        err.contains("energy-ram.unit") && err.contains("Joules") && err.contains("Watts"),
        "{err}"
    );

    std::fs::write(events.join("energy-ram.unit"), "Joules\n").unwrap();
    std::fs::write(events.join("energy-pkg.scale"), "-1\n").unwrap();
    let err = parse_power_pmu(fixture.path()).unwrap_err().to_string();
    assert!(
        err.contains("energy-pkg.scale") && err.contains("positive"),
        "{err}"
    );
}

#[test]
fn no_power_pmu_directory_is_absent() {
    let fixture = SysFixture::new();
    let err = PerfPowerMeter::open(fixture.path()).err().unwrap();
    assert!(matches!(err, MeterError::Absent(_)), "{err}");
    assert!(
        err.to_string().contains("bus/event_source/devices/power"),
        "{err}"
    );
}

#[test]
fn opening_an_event_of_a_pmu_the_kernel_lacks_fails_clearly() {
    let fixture = SysFixture::new();
    let pmu_type = unused_pmu_type();
    write_pmu(fixture.path(), pmu_type, "0");
    let err = PerfPowerMeter::open(fixture.path())
        .err()
        .expect("the kernel has no PMU of this type");
    let MeterError::PerfOpen {
        ref event,
        pmu_type: failed_type,
        cpu,
        ref source,
        ..
    } = err
    else {
        panic!("expected a perf_event_open error, got {err}");
    };
    assert_eq!((failed_type, cpu), (pmu_type, 0));
    assert!(event.starts_with("energy-"), "{event}");
    assert!(
        source.raw_os_error().is_some(),
        "a real errno from the kernel: {source:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("perf_event_open") && text.contains(&format!("type {pmu_type}")),
        "{text}"
    );
    assert!(
        text.contains("powercap"),
        "says what to use instead: {text}"
    );
}

#[test]
fn detect_reports_the_perf_backend_absent_and_falls_back() {
    let fixture = SysFixture::intel_two_socket();
    write_pmu(fixture.path(), unused_pmu_type(), "0");
    let proc_root = fixture.write_cpuinfo("processor : 0\n");
    let forced = MeterConfig {
        host_sys: fixture.path().to_path_buf(),
        host_proc: proc_root,
        rapl: RaplInterface::Perf,
        nvml: false,
        hwmon: false,
        ..MeterConfig::default()
    };
    let (meters, logs) = capture_logs(|| detect(&forced));
    let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
    // Forced to perf, which does not open: no RAPL, so the model stands in.
    assert_eq!(sources, vec!["model"]);
    let absent = logs.lines_with(&["rapl-perf", "meter absent", "perf_event_open"]);
    assert_eq!(absent.len(), 1, "{}", logs.text());

    let auto = MeterConfig {
        rapl: RaplInterface::Auto,
        ..forced
    };
    let sources: Vec<&str> = detect(&auto).iter().map(|meter| meter.source()).collect();
    assert_eq!(sources, vec!["rapl"]);
}
