//! CPU cost of reading every meter once per interval, with two sockets' worth
//! of RAPL zones (package, core, uncore, dram per socket, plus psys) in a
//! temporary powercap tree. The meters are the ones `detect` finds there.
//!
//! CPU time, not wall-clock time: getrusage(RUSAGE_THREAD) user + system,
//! so other load on the machine does not count. Prints
//! `result meter_read.cpu_us_per_interval <value>`. Target: under 50 µs.

mod common;
#[path = "../tests/meter_support/mod.rs"]
mod meter_support;

use ergon::meter::{Meter, MeterConfig, MeterContext, detect};
use ergon::units::Nanos;
use meter_support::SysFixture;

const WARMUP_INTERVALS: u32 = 1_000;
const MEASURED_INTERVALS: u32 = 20_000;

/// One interval: every meter sampled once; returns the number of zones read.
fn read_all(meters: &mut [Box<dyn Meter>], ctx: &MeterContext) -> usize {
    let mut zones = 0;
    for meter in meters.iter_mut() {
        zones += meter.sample(ctx).expect("fixture meters read").len();
    }
    zones
}

fn main() {
    if !common::benchmarking() {
        return;
    }
    let fixture = SysFixture::intel_two_socket_full();
    let config = MeterConfig {
        host_sys: fixture.path().to_path_buf(),
        host_proc: fixture.write_cpuinfo("processor : 0\nprocessor : 1\n"),
        ..MeterConfig::default()
    };
    let mut meters = detect(&config);
    let sources: Vec<&str> = meters.iter().map(|meter| meter.source()).collect();
    assert_eq!(
        sources,
        vec!["rapl"],
        "the fixture should give exactly the powercap meter"
    );
    let ctx = MeterContext {
        elapsed: Nanos(1_000_000_000),
        cpu_utilisation: Some(0.3),
        cpus: 2,
    };

    for _ in 0..WARMUP_INTERVALS {
        read_all(&mut meters, &ctx);
    }
    let zones = read_all(&mut meters, &ctx);
    let per_interval = common::cpu_us_per_call(MEASURED_INTERVALS, || {
        std::hint::black_box(read_all(&mut meters, &ctx));
    });
    eprintln!("{zones} zones from {sources:?}, {MEASURED_INTERVALS} intervals");
    common::result("meter_read.cpu_us_per_interval", per_interval);
    common::result("meter_read.zones", zones as f64);
}
