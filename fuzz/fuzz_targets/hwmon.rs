//! hwmon sysfs: chip name, the power sensor's file name, its value read
//! twice, its label and its maximum. Fields: name, sensor file, value,
//! value again, label, max.
#![no_main]

use ergon::meter::hwmon::{DEFAULT_PLATFORM_CHIPS, HwmonMeter};
use ergon::meter::{Meter, MeterContext};
use ergon::units::Nanos;
use ergon_fuzz::{Tree, component, fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [name, sensor, value, value_again, label, max] = fields(data);
    let tree = Tree::new();
    let chip = "class/hwmon/hwmon0";
    tree.write(&format!("{chip}/name"), name);
    let sensor = component(sensor, "power1_average");
    let value_path = tree.write(&format!("{chip}/{sensor}"), value);
    let prefix = sensor.split('_').next().unwrap_or("power1");
    tree.write(&format!("{chip}/{prefix}_label"), label);
    tree.write(&format!("{chip}/{prefix}_max"), max);
    let mut chips: Vec<String> = DEFAULT_PLATFORM_CHIPS
        .iter()
        .map(|c| c.to_string())
        .collect();
    chips.push(String::from_utf8_lossy(name).trim().to_owned());
    let Ok(mut meter) = HwmonMeter::open(tree.path(), &chips) else {
        return;
    };
    let ctx = MeterContext {
        elapsed: Nanos(1_000_000_000),
        cpu_utilisation: None,
        cpus: 4,
    };
    let _ = meter.sample(&ctx);
    std::fs::write(&value_path, value_again).unwrap();
    let _ = meter.sample(&ctx);
    let _ = meter.zones();
});
