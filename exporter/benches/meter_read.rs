//! CPU cost of reading every meter once per interval, with two sockets' worth
//! of RAPL zones (package, core, uncore, dram per socket, plus psys) in a
//! temporary powercap tree. The meters are the ones `detect` finds there.
//!
//! CPU time, not wall-clock time: getrusage(RUSAGE_SELF) user + system, so
//! other load on the machine does not count. Prints one line:
//! `meter_read_cpu_us_per_interval=<value>`. Target: under 50 µs.

#[path = "../tests/meter_support/mod.rs"]
mod meter_support;

use ergon::meter::{Meter, MeterConfig, MeterContext, detect};
use ergon::units::Nanos;
use meter_support::SysFixture;

const WARMUP_INTERVALS: u32 = 1_000;
const MEASURED_INTERVALS: u32 = 20_000;

/// User + system CPU time of this process, in microseconds.
fn cpu_time_us() -> f64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(
        status,
        0,
        "getrusage failed: {}",
        std::io::Error::last_os_error()
    );
    let micros = |time: libc::timeval| time.tv_sec as f64 * 1e6 + time.tv_usec as f64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// One interval: every meter sampled once; returns the number of zones read.
fn read_all(meters: &mut [Box<dyn Meter>], ctx: &MeterContext) -> usize {
    let mut zones = 0;
    for meter in meters.iter_mut() {
        zones += meter.sample(ctx).expect("fixture meters read").len();
    }
    zones
}

fn main() {
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
    let start = cpu_time_us();
    for _ in 0..MEASURED_INTERVALS {
        std::hint::black_box(read_all(&mut meters, &ctx));
    }
    let per_interval = (cpu_time_us() - start) / f64::from(MEASURED_INTERVALS);
    eprintln!("{zones} zones from {sources:?}, {MEASURED_INTERVALS} intervals");
    println!("meter_read_cpu_us_per_interval={per_interval:.2}");
}
