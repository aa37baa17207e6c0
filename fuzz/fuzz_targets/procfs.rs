//! The procfs probe's inputs: `/proc/stat`, `/proc/<pid>/stat`,
//! `/proc/<pid>/cgroup` and the cgroups' `cpu.stat`. Fields: /proc/stat,
//! <pid>/stat, <pid>/cgroup, root cpu.stat, child cpu.stat, /proc/stat
//! again, <pid>/stat again, child cgroup name.
#![no_main]

use ergon::probe::procfs::ProcfsProbe;
use ergon::probe::{HookChoice, PmuChoice, ProbeConfig, ProbeMode};
use ergon_fuzz::{Tree, component, fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
