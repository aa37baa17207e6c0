//! The perf `power` PMU reader: parsing real-shaped sysfs fixtures, and a
//! real `perf_event_open` failing where the PMU does not exist.

mod meter_support;

use std::path::Path;
use std::time::{Duration, Instant};

use ergon::meter::perf_power::{PerfPowerMeter, PowerEvent, parse_power_pmu};
use ergon::meter::{
    EnergySample, Meter, MeterConfig, MeterContext, MeterError, PowerCeilings, RaplInterface,
    Rejection, detect,
};
use ergon::units::{Domain, Nanos, Watts};
use meter_support::{BAD_VALUES, SysFixture, capture_logs, line_with, run_as_nobody_around};

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
    std::fs::write(events.join("energy-pkg.scale"), "-1\n").unwrap();
    let pmu = parse_power_pmu(fixture.path()).unwrap();
    let broken: std::collections::BTreeMap<_, _> = pmu.broken.into_iter().collect();
    let unit = &broken["energy-ram"];
    assert!(
        unit.contains("energy-ram.unit") && unit.contains("Joules") && unit.contains("Watts"),
        "{unit}"
    );
    let scale = &broken["energy-pkg"];
    assert!(
        scale.contains("energy-pkg.scale") && scale.contains("positive"),
        "{scale}"
    );

    // With no usable event left, the PMU is unusable and says why.
    for name in ["energy-cores", "energy-gpu", "energy-psys"] {
        std::fs::write(events.join(format!("{name}.unit")), "Watts\n").unwrap();
    }
    let err = parse_power_pmu(fixture.path()).unwrap_err().to_string();
    assert!(err.contains(".unit") && err.contains("Joules"), "{err}");
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

/// `perf_event_attr.type` of the kernel's software PMU: its events (config 0
/// is cpu-clock, nanoseconds of CPU time) open on every machine, so the perf
/// meter's read path runs for real where no RAPL PMU exists.
const PERF_TYPE_SOFTWARE: u32 = 1;

/// A fake power PMU whose package event is the software cpu-clock with
/// `scale` joules per nanosecond, and whose dram event cannot open.
fn write_software_pmu(root: &Path, scale: &str) {
    write_pmu(root, PERF_TYPE_SOFTWARE, "0");
    let events = root.join("bus/event_source/devices/power/events");
    for name in ["energy-cores", "energy-gpu", "energy-psys"] {
        for suffix in ["", ".scale", ".unit"] {
            std::fs::remove_file(events.join(format!("{name}{suffix}"))).unwrap();
        }
    }
    std::fs::write(events.join("energy-pkg"), "event=0x00\n").unwrap();
    std::fs::write(events.join("energy-pkg.scale"), format!("{scale}\n")).unwrap();
    // No software event has this number: perf_event_open refuses it.
    std::fs::write(events.join("energy-ram"), "event=0xff\n").unwrap();
}

fn sample_after(meter: &mut PerfPowerMeter, wait: Duration) -> Vec<EnergySample> {
    let start = Instant::now();
    std::thread::sleep(wait);
    let ctx = MeterContext {
        elapsed: Nanos(start.elapsed().as_nanos() as u64),
        cpu_utilisation: None,
        cpus: 1,
    };
    meter.sample(&ctx).unwrap()
}

#[test]
fn an_event_that_does_not_open_costs_only_itself_and_real_counts_are_read() {
    let fixture = SysFixture::new();
    // 1 nJ per ns of CPU time: at most 1 W.
    write_software_pmu(fixture.path(), "1e-9");
    let (meter, logs) = capture_logs(|| PerfPowerMeter::open(fixture.path()));
    let mut meter = meter.expect("the package event opens");
    assert_eq!(meter.zones(), vec!["package-0"]);
    let down: Vec<_> = meter.health().down().cloned().collect();
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0].zone, "dram-0");
    let reason = down[0].reason.clone().unwrap();
    assert!(
        reason.contains("perf_event_open") && reason.contains("energy-ram"),
        "{reason}"
    );
    assert_eq!(
        logs.lines_with(&["WARN", "dram-0", "energy-ram"]).len(),
        1,
        "{}",
        logs.text()
    );
    sample_after(&mut meter, Duration::ZERO);
    let samples = sample_after(&mut meter, Duration::from_millis(50));
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert!(
        samples[0].joules.0 > 0.0 && samples[0].joules.0 <= 0.1,
        "{samples:?}"
    );
}

#[test]
fn a_count_above_the_domain_ceiling_is_rejected_and_counted() {
    let fixture = SysFixture::new();
    // 1 J per ns of CPU time: a gigawatt, far above any package's ceiling.
    write_software_pmu(fixture.path(), "1");
    let mut meter = PerfPowerMeter::open(fixture.path()).unwrap();
    sample_after(&mut meter, Duration::ZERO);
    let (samples, logs) = capture_logs(|| sample_after(&mut meter, Duration::from_millis(20)));
    assert!(samples.is_empty(), "never added: {samples:?}");
    assert_eq!(meter.health().rejected[&Rejection::AboveMaxPower], 1);
    assert_eq!(
        logs.lines_with(&[
            "WARN",
            "package-0",
            "above_max_power",
            "--max-watts package"
        ])
        .len(),
        1,
        "{}",
        logs.text()
    );

    // With the ceiling raised beyond it, the same counts are measured.
    let mut ceilings = PowerCeilings::default();
    ceilings.set(Domain::Package, Watts(1e12));
    let mut meter = PerfPowerMeter::open(fixture.path())
        .unwrap()
        .with_ceilings(ceilings);
    sample_after(&mut meter, Duration::ZERO);
    let samples = sample_after(&mut meter, Duration::from_millis(20));
    assert_eq!(samples.len(), 1, "{samples:?}");
}

#[test]
fn a_bad_event_description_costs_only_that_event() {
    for (what, bad) in BAD_VALUES {
        let fixture = SysFixture::new();
        write_pmu(fixture.path(), 21, "0");
        let events = fixture.path().join("bus/event_source/devices/power/events");
        std::fs::write(events.join("energy-ram.scale"), bad).unwrap();
        let pmu = parse_power_pmu(fixture.path()).unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(pmu.events.len(), 4, "{what}");
        assert_eq!(pmu.broken.len(), 1, "{what}");
        let (event, reason) = &pmu.broken[0];
        assert_eq!(event, "energy-ram");
        assert!(
            reason.contains("energy-ram.scale") && !reason.contains('\u{1b}'),
            "{what}: {reason}"
        );
    }
}

const UNPRIVILEGED_VAR: &str = "ERGON_TEST_PERF_UNPRIVILEGED_FIXTURE";

/// The child half of the test below, run as uid 65534.
#[test]
#[ignore = "run as uid 65534 by without_perfmon_the_error_says_what_is_needed"]
fn perf_unprivileged_child() {
    let Ok(root) = std::env::var(UNPRIVILEGED_VAR) else {
        eprintln!("perf_unprivileged_child only runs as the child of its test");
        return;
    };
    match PerfPowerMeter::open(Path::new(&root)) {
        Ok(meter) => println!("BEFORE: opened {:?}", meter.zones()),
        Err(err) => println!("BEFORE: {err}"),
    }
    meter_support::wait_for_parent();
}

#[test]
fn without_perfmon_the_error_says_what_is_needed() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to run the reader as another uid; skipped");
        return;
    }
    let fixture = SysFixture::new();
    write_software_pmu(fixture.path(), "1e-9");
    fixture.make_energy_root_only();
    let output = run_as_nobody_around(
        "perf_unprivileged_child",
        UNPRIVILEGED_VAR,
        fixture.path(),
        || {},
    );
    let line = line_with(&output, "BEFORE:");
    let paranoid: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(2);
    if paranoid > 0 {
        // CPU-wide events need CAP_PERFMON (or paranoid <= 0).
        assert!(
            line.contains("perf_event_open")
                && line.contains("CAP_PERFMON")
                && line.contains("powercap"),
            "{output}"
        );
    } else {
        assert!(line.contains("opened"), "{output}");
    }
}

/// What `bad` looks like in a message once the reader trimmed it: escaped
/// as `shown` escapes it (the closing quote left off: a file that is not
/// UTF-8 is shown untrimmed).
fn found(bad: &[u8]) -> String {
    format!("found \"{}", ergon::meter::shown(bad.trim_ascii()))
}

/// A PMU `type` or `cpumask` that cannot be read or parsed leaves no event
/// usable; it is a WARN naming the file and what it held, never an INFO
/// "meter absent", and `auto` reads powercap instead.
#[test]
fn a_bad_type_or_cpumask_is_a_warning_naming_the_file_and_powercap_takes_over() {
    for file in ["type", "cpumask"] {
        for (what, bad) in BAD_VALUES {
            let fixture = SysFixture::intel_two_socket();
            write_pmu(fixture.path(), PERF_TYPE_SOFTWARE, "0");
            let pmu = fixture.path().join("bus/event_source/devices/power");
            std::fs::write(pmu.join(file), bad).unwrap();
            let forced = MeterConfig {
                host_sys: fixture.path().to_path_buf(),
                host_proc: fixture.write_cpuinfo("processor : 0\n"),
                rapl: RaplInterface::Perf,
                nvml: false,
                hwmon: false,
                ..MeterConfig::default()
            };
            let (meters, logs) = capture_logs(|| detect(&forced));
            let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
            assert_eq!(sources, vec!["model"], "{file} {what}");
            let warnings = logs.lines_with(&[
                "WARN",
                "rapl-perf",
                &format!("devices/power/{file}"),
                &found(bad),
            ]);
            assert_eq!(warnings.len(), 1, "{file} {what}: {}", logs.text());
            assert!(
                !warnings[0].contains('\u{1b}'),
                "no terminal escape reaches the log: {warnings:?}"
            );
            assert!(
                logs.lines_with(&["rapl-perf", "meter absent"]).is_empty(),
                "{file} {what}: {}",
                logs.text()
            );

            let auto = MeterConfig {
                rapl: RaplInterface::Auto,
                ..forced
            };
            let (meters, logs) = capture_logs(|| detect(&auto));
            let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
            assert_eq!(sources, vec!["rapl"], "{file} {what}");
            assert_eq!(
                logs.lines_with(&["WARN", "rapl-perf", &format!("devices/power/{file}")])
                    .len(),
                1,
                "{file} {what}: {}",
                logs.text()
            );
        }
    }
}

/// A software PMU whose package and dram events both count cpu-clock, so
/// both open: the dram event's files are then spoiled one at a time.
fn write_two_event_software_pmu(root: &Path) -> std::path::PathBuf {
    write_software_pmu(root, "1e-9");
    let events = root.join("bus/event_source/devices/power/events");
    std::fs::write(events.join("energy-ram"), "event=0x00\n").unwrap();
    std::fs::write(events.join("energy-ram.scale"), "1e-9\n").unwrap();
    events
}

/// Through the real open path: a bad event file or `.scale` costs only its
/// event, which is down with a WARN naming the file and what it held, and
/// once the file is fixed the event is opened again on a later sample.
#[test]
fn a_bad_event_file_or_scale_costs_only_its_event_and_is_opened_again_once_fixed() {
    for file in ["energy-ram", "energy-ram.scale"] {
        for (what, bad) in BAD_VALUES {
            let fixture = SysFixture::new();
            let events = write_two_event_software_pmu(fixture.path());
            let good = std::fs::read(events.join(file)).unwrap();
            std::fs::write(events.join(file), bad).unwrap();
            let (meter, logs) = capture_logs(|| PerfPowerMeter::open(fixture.path()));
            let mut meter = meter.unwrap_or_else(|err| panic!("{file} {what}: {err}"));
            assert_eq!(meter.zones(), vec!["package-0"], "{file} {what}");
            let down: Vec<_> = meter.health().down().cloned().collect();
            assert_eq!(down.len(), 1, "{file} {what}: {down:?}");
            assert_eq!(down[0].zone, "dram-0");
            let reason = down[0].reason.clone().unwrap();
            assert!(
                reason.contains(&format!("events/{file}")) && reason.contains(&found(bad)),
                "{file} {what}: {reason}"
            );
            let warnings = logs.lines_with(&["WARN", "dram-0", &format!("events/{file}")]);
            assert_eq!(warnings.len(), 1, "{file} {what}: {}", logs.text());
            assert!(!warnings[0].contains('\u{1b}'), "{warnings:?}");

            sample_after(&mut meter, Duration::ZERO);
            std::fs::write(events.join(file), &good).unwrap();
            let mut samples = Vec::new();
            for _ in 0..ergon::meter::rapl::DEFAULT_RESCAN_EVERY {
                samples = sample_after(&mut meter, Duration::from_millis(1));
                if samples.len() == 2 {
                    break;
                }
            }
            assert_eq!(samples.len(), 2, "{file} {what}: opened again {samples:?}");
            assert_eq!(meter.zones(), vec!["package-0", "dram-0"]);
            assert!(meter.health().down().next().is_none(), "{file} {what}");
            // Its first reading was its baseline; the next one counts.
            let samples = sample_after(&mut meter, Duration::from_millis(20));
            let dram = samples.iter().find(|sample| sample.zone == "dram-0");
            assert!(
                dram.is_some_and(|sample| sample.joules.0 > 0.0),
                "{file} {what}: {samples:?}"
            );
        }
    }
}

/// An event the kernel does not open at start is tried again on later
/// samples, not given up for the process's life.
#[test]
fn an_event_that_did_not_open_is_tried_again_on_later_samples() {
    let fixture = SysFixture::new();
    write_software_pmu(fixture.path(), "1e-9");
    let mut meter = PerfPowerMeter::open(fixture.path()).unwrap();
    assert_eq!(meter.zones(), vec!["package-0"]);
    // The kernel now has the event (here: the description names one it has).
    let events = fixture.path().join("bus/event_source/devices/power/events");
    std::fs::write(events.join("energy-ram"), "event=0x00\n").unwrap();
    let mut opened_after = None;
    for sample in 1..=ergon::meter::rapl::DEFAULT_RESCAN_EVERY {
        sample_after(&mut meter, Duration::from_millis(1));
        if meter.zones().len() == 2 {
            opened_after = Some(sample);
            break;
        }
    }
    assert!(opened_after.is_some(), "{:?}", meter.health());
    assert!(zones_up_perf(&meter)["dram-0"]);
}

fn zones_up_perf(meter: &PerfPowerMeter) -> std::collections::BTreeMap<String, bool> {
    meter_support::zones_up(meter)
}
