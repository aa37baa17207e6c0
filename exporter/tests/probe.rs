//! The probes against the real kernel: these load the eBPF programs, run real
//! processes in real cgroups and compare with what the kernel charged them.

use ergon_testkit as support;

use std::time::Duration;

use ergon::probe::{PmuChoice, Probe, ProbeConfig, ProbeMode};
use support::{BusyChild, CgroupGuard, cpu_lock, flush_cpus, relative_error};

fn start(mode: ProbeMode) -> Probe {
    let config = ProbeConfig {
        mode,
        ..ProbeConfig::local()
    };
    Probe::start(&config).unwrap_or_else(|e| panic!("starting the {mode:?} probe: {e}"))
}

fn cgroup_ns(probe: &mut Probe, id: u64) -> u64 {
    probe
        .sample()
        .unwrap()
        .cgroups
        .get(&id)
        .map(|c| c.cpu_ns)
        .unwrap_or(0)
}

#[test]
fn busy_process_in_pod_cgroup_is_counted_within_5_percent() {
    let _lock = cpu_lock();
    let mut probe = start(ProbeMode::Ebpf);
    assert_eq!(probe.info().mode, "ebpf");
    let cgroup = CgroupGuard::pod_shaped("busy");
    // The first switch on each CPU after attaching has no start stamp.
    std::thread::sleep(Duration::from_millis(20));
    let before = cgroup_ns(&mut probe, cgroup.id());
    let child = BusyChild::spawn_in(&cgroup.path);
    std::thread::sleep(Duration::from_millis(300));
    let charged = child.stop();
    flush_cpus();
    let counted = cgroup_ns(&mut probe, cgroup.id()) - before;
    let err = relative_error(counted as f64, charged.as_nanos() as f64);
    assert!(
        err < 0.05,
        "probe counted {counted} ns, kernel charged {charged:?} ({:.2}% off)",
        err * 100.0
    );
}

#[test]
fn fifty_short_lived_processes_are_counted_after_they_are_gone() {
    let _lock = cpu_lock();
    let mut probe = start(ProbeMode::Ebpf);
    std::thread::sleep(Duration::from_millis(20));
    let mut charged = Duration::ZERO;
    let mut ids = Vec::new();
    for _ in 0..50 {
        let mut cgroup = CgroupGuard::pod_shaped("short");
        ids.push(cgroup.id());
        let child = BusyChild::spawn_in(&cgroup.path);
        std::thread::sleep(Duration::from_millis(20));
        charged += child.stop();
        // The cgroup is gone before the probe is read.
        cgroup.remove();
    }
    flush_cpus();
    let snapshot = probe.sample().unwrap();
    let counted: u64 = ids
        .iter()
        .map(|id| snapshot.cgroups.get(id).map(|c| c.cpu_ns).unwrap_or(0))
        .sum();
    let err = relative_error(counted as f64, charged.as_nanos() as f64);
    assert!(
        err < 0.05,
        "50 exited processes: probe counted {counted} ns, kernel charged {charged:?} ({:.2}% off)",
        err * 100.0
    );
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer. CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn idle_plus_busy_covers_every_cpu_all_the_time() {
    let _lock = cpu_lock();
    let mut probe = start(ProbeMode::Ebpf);
    let cpus = aya::util::online_cpus().unwrap().len() as f64;
    std::thread::sleep(Duration::from_millis(20));
    flush_cpus();
    let t0 = monotonic_ns();
    let s0 = probe.sample().unwrap();
    // Some load on one CPU so both idle and busy time move.
    let cgroup = CgroupGuard::pod_shaped("cover");
    let child = BusyChild::spawn_in(&cgroup.path);
    std::thread::sleep(Duration::from_millis(500));
    child.stop();
    std::thread::sleep(Duration::from_millis(500));
    flush_cpus();
    let t1 = monotonic_ns();
    let s1 = probe.sample().unwrap();
    let accounted = (s1.idle_ns - s0.idle_ns + s1.busy_ns - s0.busy_ns) as f64;
    let expected = (t1 - t0) as f64 * cpus;
    let err = relative_error(accounted, expected);
    assert!(
        err < 0.02,
        "idle+busy {accounted} ns vs wall×CPUs {expected} ns ({:.2}% off)",
        err * 100.0
    );
    // Idle may not move while other work saturates the machine; busy must.
    assert!(s1.busy_ns > s0.busy_ns);
}

#[test]
fn procfs_fallback_agrees_with_ebpf_within_10_percent() {
    let _lock = cpu_lock();
    let mut ebpf = start(ProbeMode::Ebpf);
    let cgroup = CgroupGuard::pod_shaped("agree");
    let mut procfs = start(ProbeMode::Procfs);
    assert_eq!(procfs.info().mode, "procfs");
    std::thread::sleep(Duration::from_millis(20));
    let e0 = cgroup_ns(&mut ebpf, cgroup.id());
    let p0 = cgroup_ns(&mut procfs, cgroup.id());
    let child = BusyChild::spawn_in(&cgroup.path);
    std::thread::sleep(Duration::from_millis(400));
    let charged = child.stop();
    flush_cpus();
    let by_ebpf = (cgroup_ns(&mut ebpf, cgroup.id()) - e0) as f64;
    let by_procfs = (cgroup_ns(&mut procfs, cgroup.id()) - p0) as f64;
    let err = relative_error(by_procfs, by_ebpf);
    assert!(
        err < 0.10,
        "procfs {by_procfs} ns vs eBPF {by_ebpf} ns ({:.2}% off; kernel charged {charged:?})",
        err * 100.0
    );
}

#[test]
fn tiny_map_sends_excess_to_overflow_and_keeps_the_total() {
    let _lock = cpu_lock();
    let config = ProbeConfig {
        mode: ProbeMode::Ebpf,
        max_cgroups: 4,
        ..ProbeConfig::local()
    };
    let mut probe = Probe::start(&config).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let s0 = probe.sample().unwrap();
    let cgroups: Vec<CgroupGuard> = (0..8).map(|_| CgroupGuard::pod_shaped("tiny")).collect();
    let mut charged = Duration::ZERO;
    for cgroup in &cgroups {
        let child = BusyChild::spawn_in(&cgroup.path);
        std::thread::sleep(Duration::from_millis(40));
        charged += child.stop();
    }
    flush_cpus();
    let s1 = probe.sample().unwrap();
    assert!(
        s1.cgroups.len() <= 4,
        "map bound not enforced: {}",
        s1.cgroups.len()
    );
    assert!(s1.overflowed_cgroup_keys > s0.overflowed_cgroup_keys);
    let in_map: u64 = cgroups
        .iter()
        .map(|c| s1.cgroups.get(&c.id()).map(|u| u.cpu_ns).unwrap_or(0))
        .sum();
    let overflow = s1.cgroup_overflow.cpu_ns - s0.cgroup_overflow.cpu_ns;
    assert!(overflow > 0, "nothing reached the overflow bucket");
    let err = relative_error((in_map + overflow) as f64, charged.as_nanos() as f64);
    assert!(
        err < 0.05,
        "in map {in_map} + overflow {overflow} ns vs charged {charged:?} ({:.2}% off)",
        err * 100.0
    );
}

#[test]
fn counter_path_with_software_clock_and_per_process_accounting() {
    let _lock = cpu_lock();
    let config = ProbeConfig {
        mode: ProbeMode::Ebpf,
        pmu: PmuChoice::Software,
        per_process: true,
        ..ProbeConfig::local()
    };
    let mut probe = Probe::start(&config).unwrap();
    assert_eq!(probe.info().pmu, "software");
    let cgroup = CgroupGuard::pod_shaped("pmu");
    std::thread::sleep(Duration::from_millis(20));
    let child = BusyChild::spawn_in(&cgroup.path);
    let pid = child.pid();
    std::thread::sleep(Duration::from_millis(300));
    let charged = child.stop();
    flush_cpus();
    let snapshot = probe.sample().unwrap();
    let usage = snapshot.cgroups[&cgroup.id()];
    // cpu-clock counts nanoseconds, so the "cycles" slot must match CPU time.
    let err = relative_error(usage.cycles as f64, usage.cpu_ns as f64);
    assert!(
        err < 0.05,
        "counter {} vs cpu_ns {} ({:.2}% off)",
        usage.cycles,
        usage.cpu_ns,
        err * 100.0
    );
    let process = &snapshot.processes[&pid];
    assert_eq!(process.cgroup_id, cgroup.id());
    assert_eq!(process.comm, "sh");
    let err = relative_error(process.counters.cpu_ns as f64, charged.as_nanos() as f64);
    assert!(
        err < 0.05,
        "process {} ns vs charged {charged:?}",
        process.counters.cpu_ns
    );
}

#[test]
fn classic_tracepoint_counts_like_tp_btf() {
    let _lock = cpu_lock();
    let config = ProbeConfig {
        mode: ProbeMode::Ebpf,
        hook: ergon::probe::HookChoice::Tracepoint,
        ..ProbeConfig::local()
    };
    let mut probe = Probe::start(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(probe.info().hook, "tracepoint");
    let cgroup = CgroupGuard::pod_shaped("classic");
    std::thread::sleep(Duration::from_millis(20));
    let child = BusyChild::spawn_in(&cgroup.path);
    std::thread::sleep(Duration::from_millis(200));
    let charged = child.stop();
    flush_cpus();
    let counted = cgroup_ns(&mut probe, cgroup.id());
    let err = relative_error(counted as f64, charged.as_nanos() as f64);
    assert!(err < 0.05, "tracepoint counted {counted} ns vs {charged:?}");
}
