//! The fuzz targets' bodies (see `fuzz_targets/`). Written against the
//! crate's public API only and with `super::` paths, so that
//! `exporter/tests/fuzz_corpus.rs` can include this library as a module and
//! replay the corpus without cargo-fuzz.

use std::time::Duration;

use clap::Parser;
use ergon::config::Cli;
use ergon::interval::State;
use ergon::meter::hwmon::{DEFAULT_PLATFORM_CHIPS, HwmonMeter};
use ergon::meter::perf_power::parse_power_pmu;
use ergon::meter::rapl::{RaplMeter, scan_zones};
use ergon::meter::{Meter, MeterContext};
use ergon::probe::procfs::ProcfsProbe;
use ergon::probe::{HookChoice, PmuChoice, ProbeConfig, ProbeMode};
use ergon::units::Nanos;
use ergon::workload::cgroup::{
    KubeletCgroupRoots, MAX_BUCKET_BYTES, Workload, bounded_label, classify, classify_under,
};

use super::{Tree, component, fields};

/// Powercap (RAPL) sysfs: zone names, `max_energy_range_uj`, `energy_uj`
/// read twice, a power limit, a sub-zone. Fields: name, range, energy,
/// energy again, limit, sub-zone name, sub-zone energy.
pub fn powercap(data: &[u8]) {
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
}

/// hwmon sysfs: chip name, the power sensor's file name, its value read
/// twice, its label and its maximum. Fields: name, sensor file, value,
/// value again, label, max.
pub fn hwmon(data: &[u8]) {
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
}

/// The perf `power` PMU's sysfs description. Fields: type, cpumask, event
/// name, event terms, scale, unit, the `event` format.
pub fn perf_power(data: &[u8]) {
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
}

/// The procfs probe's inputs: `/proc/stat`, `/proc/<pid>/stat`,
/// `/proc/<pid>/cgroup` and the cgroups' `cpu.stat`. Fields: /proc/stat,
/// <pid>/stat, <pid>/cgroup, root cpu.stat, child cpu.stat, /proc/stat
/// again, <pid>/stat again, child cgroup name.
pub fn procfs(data: &[u8]) {
    let [
        stat,
        pid_stat,
        pid_cgroup,
        root_cpu,
        child_cpu,
        stat_again,
        pid_stat_again,
        child,
    ] = fields(data);
    let proc = Tree::new();
    let cgroups = Tree::new();
    let stat_path = proc.write("stat", stat);
    let pid_stat_path = proc.write("42/stat", pid_stat);
    proc.write("42/cgroup", pid_cgroup);
    cgroups.write("cpu.stat", root_cpu);
    let child = component(child, "kubepods.slice");
    cgroups.write(&format!("{child}/cpu.stat"), child_cpu);
    let config = ProbeConfig {
        mode: ProbeMode::Procfs,
        hook: HookChoice::Auto,
        pmu: PmuChoice::Off,
        per_process: true,
        max_cgroups: 16,
        max_processes: 16,
        map_allocation: ergon::probe::MapAllocation::Auto,
        map_memory_budget_bytes: 1 << 20,
        host_proc: proc.path().to_owned(),
        host_sys: proc.path().to_owned(),
        cgroup_root: cgroups.path().to_owned(),
        // Fields the eBPF probe adds later do not concern this parser.
        ..ProbeConfig::local()
    };
    let Ok(mut probe) = ProcfsProbe::start(&config, None) else {
        return;
    };
    std::fs::write(&stat_path, stat_again).unwrap();
    std::fs::write(&pid_stat_path, pid_stat_again).unwrap();
    let _ = probe.sample();
}

/// Cgroup path classification under the kubelet's cgroup roots, with the
/// invariants the labels rely on. Fields: the path, then
/// `--kubelet-cgroup-root`'s value (comma-separated, as the flag splits it;
/// absent: the default root, as in production without the flag).
pub fn cgroup_path(data: &[u8]) {
    let [path, roots] = fields(data);
    let path = String::from_utf8_lossy(path);
    let roots = String::from_utf8_lossy(roots);
    let values: Vec<&str> = roots.split(',').collect();
    // A value production refuses at start never reaches the classifier:
    // fall back to the default roots, which it does reach.
    let roots = KubeletCgroupRoots::parse(&values).unwrap_or_default();
    let _ = roots.describe();
    for workload in [classify_under(&path, &roots), classify(&path)] {
        match workload {
            Workload::Container {
                pod_uid,
                container_id,
                ..
            } => {
                assert!(!pod_uid.is_empty() && !pod_uid.contains('/'), "{pod_uid:?}");
                assert!(
                    container_id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{container_id:?}"
                );
            }
            Workload::Pod { pod_uid, .. } => {
                assert!(!pod_uid.is_empty() && !pod_uid.contains('/'), "{pod_uid:?}");
            }
            Workload::System { bucket } => {
                assert!(bucket.len() <= MAX_BUCKET_BYTES, "{bucket:?}");
            }
        }
    }
    for max in [0, 1, 9, 10, 64, 128] {
        let bounded = bounded_label(&path, max);
        assert!(
            bounded.len() <= max.max(9) || bounded == path,
            "{max}: {bounded:?}"
        );
    }
}

/// The counter checkpoint, as read back at start (a file on the host that
/// outlives the exporter, so anything may be in it), through the same
/// validation the exporter applies before it trusts a restored state.
pub fn checkpoint(data: &[u8]) {
    let tree = Tree::new();
    let path = tree.write("checkpoint.json", data);
    let mut checkpoint = ergon::checkpoint::Checkpoint::new(path, Some("fuzz-boot-id".to_owned()));
    // A fixed clock and CPU count, so an input replays the same way: a day
    // since boot on 64 CPUs.
    let now = Nanos(86_400_000_000_000);
    let _ = checkpoint.load::<State>(|state| state.validate(now, 64));
}

/// The YAML configuration file, loaded as the exporter loads it (merged
/// with the flags, every check `Cli::validate` makes); what it accepts must
/// then give every value the exporter takes at start without an error or a
/// panic.
pub fn config_yaml(data: &[u8]) {
    // The file is read as the exporter reads it (size bound, UTF-8).
    let tree = Tree::new();
    let path = tree.write("ergon.yaml", data);
    let config = format!("--config={}", path.display());
    // No `ERGON_*` variable of the fuzzing process may decide the outcome.
    let loaded = Cli::load_from(&["ergon", config.as_str()], |_| false);
    // The file's keys as flags, also where the whole file is refused.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(args) = ergon::config::settings_from_yaml(text, |_| false)
        && let Ok(cli) = Cli::try_parse_from(std::iter::once("ergon".to_owned()).chain(args))
    {
        // Pure, and called on values whatever validation says.
        let _ = cli.idle_watts();
        let _ = cli.pod_label_keys();
        let _ = cli.kubelet_cgroup_roots();
        let _ = cli.metric_levels();
        let _ = cli.probe_config();
        let _ = cli.kubelet_config();
    }
    let Ok(cli) = loaded else {
        return;
    };
    // Accepted at load: everything `main` takes afterwards must be too.
    cli.idle_watts().expect("--idle-watts validated");
    cli.meter_config().expect("the meters validated");
    cli.kubelet_cgroup_roots()
        .expect("--kubelet-cgroup-root validated");
    cli.carbon_source().expect("--carbon-intensity validated");
    let probe = cli.probe_config();
    assert!(probe.map_memory_budget_bytes >= 1 << 20, "{probe:?}");
    let _ = cli.metric_levels();
    let _ = cli.checkpoint_path();
    if let Some(kubelet) = cli.kubelet_config() {
        assert!(kubelet.period >= Duration::from_secs(1), "{kubelet:?}");
        assert!(kubelet.period <= Duration::from_secs(3600), "{kubelet:?}");
        assert_eq!(kubelet.label_allowlist, cli.pod_label_keys());
    }
}
