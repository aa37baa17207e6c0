//! A meter's broken zone as an operator sees it: the real `ergon` binary on a
//! fake powercap tree whose psys zone reads garbage, through `/metrics` and
//! `ergon doctor`.

use ergon_testkit as support;

use std::path::Path;
use std::time::Duration;

use support::{ExporterProcess, FakeRapl, Metrics};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

/// Adds a top-level psys zone whose range file holds `garbage`.
fn add_broken_psys(host_sys: &Path) {
    let psys = host_sys.join("class/powercap/intel-rapl:1");
    std::fs::create_dir_all(&psys).unwrap();
    std::fs::write(psys.join("name"), "psys\n").unwrap();
    std::fs::write(psys.join("max_energy_range_uj"), "garbage\n").unwrap();
    std::fs::write(psys.join("energy_uj"), "1000000\n").unwrap();
}

fn zone_up(metrics: &Metrics, zone: &str) -> Option<f64> {
    metrics
        .select("ergon_meter_zone_up", &[("source", "rapl"), ("zone", zone)])
        .map(|(_, value)| value)
        .next()
}

#[test]
fn a_broken_zone_is_exported_as_down_and_the_node_stays_metered() {
    let rapl = FakeRapl::start(40.0);
    add_broken_psys(rapl.host_sys.path());
    let exporter = ExporterProcess::start(
        Path::new(ERGON),
        &[
            rapl.host_sys_arg(),
            format!("--cgroup-root={}", support::cgroup2_root().display()),
            "--probe=procfs".into(),
            "--interval=200ms".into(),
        ],
    );
    let mut metrics = exporter.metrics();
    for _ in 0..100 {
        if zone_up(&metrics, "psys").is_some()
            && metrics.sum(
                "ergon_node_energy_joules_total",
                &[("source", "rapl"), ("domain", "package")],
            ) > 0.0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        metrics = exporter.metrics();
    }
    assert_eq!(
        zone_up(&metrics, "psys"),
        Some(0.0),
        "{:?}",
        metrics.samples
    );
    assert_eq!(zone_up(&metrics, "package-0"), Some(1.0));
    assert_eq!(
        metrics.sum("ergon_meter_up", &[("source", "rapl")]),
        1.0,
        "the meter is up: its healthy zone is read"
    );
    assert!(
        metrics.sum(
            "ergon_node_energy_joules_total",
            &[("source", "rapl"), ("domain", "package")]
        ) > 0.0
    );
    assert_eq!(
        metrics
            .select("ergon_meter_up", &[("source", "model")])
            .count(),
        0,
        "not estimated by the model"
    );
}

#[test]
fn doctor_says_which_zone_is_not_read_and_why() {
    let rapl = FakeRapl::start(40.0);
    add_broken_psys(rapl.host_sys.path());
    let output = std::process::Command::new(ERGON)
        .args([
            &rapl.host_sys_arg(),
            "--meter=rapl",
            "--probe=procfs",
            "doctor",
        ])
        .env("ERGON_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.contains("meter zones"))
        .unwrap_or_else(|| {
            panic!(
                "no meter zones line: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert!(
        line.contains("OFF")
            && line.contains("rapl zone psys")
            && line.contains("intel-rapl:1/max_energy_range_uj")
            && line.contains("garbage"),
        "{stdout}"
    );
    assert!(stdout.contains("measured by rapl"), "{stdout}");
}

/// A counter that jumps forward by 100 × what the zone can draw in a second
/// is rejected: `ergon_meter_rejected_readings_total{source="rapl",
/// reason="above_max_power"}` reads 1 on /metrics, and the node's energy
/// never takes the jump.
#[test]
fn a_counter_jump_of_100_times_the_zone_limit_is_rejected_on_metrics() {
    let rapl = FakeRapl::start(40.0);
    // A 50 W part: at most 100 W with the headroom.
    std::fs::write(
        rapl.zone_dir().join("constraint_0_max_power_uw"),
        "50000000\n",
    )
    .unwrap();
    let exporter = ExporterProcess::start(
        Path::new(ERGON),
        &[
            rapl.host_sys_arg(),
            format!("--cgroup-root={}", support::cgroup2_root().display()),
            "--probe=procfs".into(),
            "--interval=200ms".into(),
        ],
    );
    let package = [("source", "rapl"), ("domain", "package")];
    let rejected = |metrics: &Metrics| {
        metrics
            .select(
                "ergon_meter_rejected_readings_total",
                &[("source", "rapl"), ("reason", "above_max_power")],
            )
            .map(|(_, value)| value)
            .next()
    };
    let wait_for = |what: &str, done: &dyn Fn(&Metrics) -> bool| -> Metrics {
        for _ in 0..150 {
            let metrics = exporter.metrics();
            if done(&metrics) {
                return metrics;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what}: {:?}", exporter.metrics().samples);
    };
    let measured = wait_for("package energy measured", &|metrics| {
        metrics.sum("ergon_node_energy_joules_total", &package) > 0.0
    });
    assert_eq!(rejected(&measured), None, "{:?}", measured.samples);

    // 100 × 100 W for a second: 10 kJ at once.
    rapl.jump(10_000_000_000);
    let after = wait_for("the jump rejected", &|metrics| rejected(metrics).is_some());
    assert_eq!(rejected(&after), Some(1.0), "{:?}", after.samples);
    // The next intervals are measured again, and the jump is in none of them.
    let before = after.sum("ergon_node_energy_joules_total", &package);
    let later = wait_for("measured after the jump", &|metrics| {
        metrics.sum("ergon_node_energy_joules_total", &package) > before
    });
    let total = later.sum("ergon_node_energy_joules_total", &package);
    assert!(
        total < 2_000.0,
        "the node's package energy took the jump: {total} J"
    );
    assert_eq!(rejected(&later), Some(1.0), "{:?}", later.samples);
    assert_eq!(
        later.sum(
            "ergon_meter_zone_up",
            &[("source", "rapl"), ("zone", "package-0")]
        ),
        1.0
    );
}
