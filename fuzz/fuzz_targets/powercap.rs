//! Powercap (RAPL) sysfs: zone names, `max_energy_range_uj`, `energy_uj`
//! read twice, a power limit, a sub-zone. Fields: name, range, energy,
//! energy again, limit, sub-zone name, sub-zone energy.
#![no_main]

use ergon::meter::rapl::{RaplMeter, scan_zones};
use ergon::meter::{Meter, MeterContext};
use ergon::units::Nanos;
use ergon_fuzz::{Tree, fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [
        name,
        range,
        energy,
        energy_again,
        limit,
        sub_name,
        sub_energy,
    ] = fields(data);
    let tree = Tree::new();
    let zone = "class/powercap/intel-rapl:0";
    let sub = "class/powercap/intel-rapl:0/intel-rapl:0:0";
    tree.write(&format!("{zone}/name"), name);
    tree.write(&format!("{zone}/max_energy_range_uj"), range);
    let energy_path = tree.write(&format!("{zone}/energy_uj"), energy);
    tree.write(&format!("{zone}/constraint_0_max_power_uw"), limit);
    tree.write(&format!("{sub}/name"), sub_name);
    tree.write(&format!("{sub}/energy_uj"), sub_energy);
    // The kernel also lists sub-zones flat under class/powercap.
    let _ = std::os::unix::fs::symlink(
        tree.path().join(sub),
        tree.path().join("class/powercap/intel-rapl:0:0"),
    );
    let _ = scan_zones(tree.path());
    let Ok(mut meter) = RaplMeter::open(tree.path(), 1) else {
        return;
    };
    let ctx = MeterContext {
        elapsed: Nanos(1_000_000_000),
        cpu_utilisation: Some(0.5),
        cpus: 4,
    };
    let _ = meter.sample(&ctx);
    std::fs::write(&energy_path, energy_again).unwrap();
    let _ = meter.sample(&ctx);
    let _ = meter.zones();
});
