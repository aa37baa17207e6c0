//! The perf `power` PMU's sysfs description. Fields: type, cpumask, event
//! name, event terms, scale, unit, the `event` format.
#![no_main]

use ergon::meter::perf_power::parse_power_pmu;
use ergon_fuzz::{Tree, component, fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pmu_type, cpumask, event, terms, scale, unit, format] = fields(data);
    let tree = Tree::new();
    let pmu = "bus/event_source/devices/power";
    tree.write(&format!("{pmu}/type"), pmu_type);
    tree.write(&format!("{pmu}/cpumask"), cpumask);
    let event = component(event, "energy-pkg").replace('.', "_");
    tree.write(&format!("{pmu}/events/{event}"), terms);
    tree.write(&format!("{pmu}/events/{event}.scale"), scale);
    tree.write(&format!("{pmu}/events/{event}.unit"), unit);
    tree.write(&format!("{pmu}/format/event"), format);
    let _ = parse_power_pmu(tree.path());
});
