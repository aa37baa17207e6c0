//! Map layouts shared by Ergon's kernel programs and user space.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into BPF
//! maps and user space reads the same bytes back. Keep the two halves in one
//! crate so a field added on one side cannot be missed on the other.
#![no_std]

/// Name of the per-CPU hash map keyed by cgroup v2 id, allocated on demand
/// (`BPF_F_NO_PREALLOC`).
pub const MAP_CGROUPS: &str = "CGROUPS";
/// Name of the hash map keyed by thread id, allocated on demand, filled only
/// when per-process accounting is switched on. Not per-CPU: one thread runs
/// on one CPU at a time, so its own switch-outs are its value's only writer.
pub const MAP_THREADS: &str = "THREADS";
/// The same two maps, preallocated: used with the `*_prealloc` programs on
/// kernels that refuse (or warn about) run-time allocation in tracing
/// programs. The pair not in use is loaded with one entry.
pub const MAP_CGROUPS_PREALLOC: &str = "CGROUPS_PREALLOC";
pub const MAP_THREADS_PREALLOC: &str = "THREADS_PREALLOC";
/// Per-CPU array of one [`CgroupCounters`]: what did not fit in `CGROUPS`.
pub const MAP_CGROUP_OVERFLOW: &str = "CGROUP_OVERFLOW";
/// Per-CPU array of one [`CgroupCounters`]: what did not fit in `THREADS`.
pub const MAP_PROCESS_OVERFLOW: &str = "PROCESS_OVERFLOW";
/// Per-CPU array of one [`CpuState`].
pub const MAP_CPU_STATE: &str = "CPU_STATE";
/// `PERF_EVENT_ARRAY`s, indexed by CPU, holding one hardware (or, in tests,
/// software clock) counter each.
pub const MAP_PMU: [&str; 3] = ["PMU_CYCLES", "PMU_INSTRUCTIONS", "PMU_CACHE_MISSES"];

/// Global set at load time: non-zero turns per-process accounting on.
pub const GLOBAL_PER_PROCESS: &str = "PER_PROCESS";
/// Global set at load time: bit `i` set means `MAP_PMU[i]` holds counters.
pub const GLOBAL_PMU_MASK: &str = "PMU_MASK";
/// Global set at load time: byte offset of `pid` in the kernel's
/// `struct task_struct` (from its BTF), read by the `tp_btf` programs; 0
/// makes them ask `bpf_get_current_pid_tgid` instead.
pub const GLOBAL_TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
/// Global set at load time: byte offsets of `task_struct.cgroups`,
/// `css_set.dfl_cgrp`, `cgroup.kn` and `kernfs_node.id` (from the kernel's
/// BTF), the path to the cgroup id the programs follow; zeros make them
/// call `bpf_get_current_cgroup_id` instead.
pub const GLOBAL_CGROUP_ID_PATH: &str = "CGROUP_ID_PATH";
/// Global set at load time: byte offsets of `task_struct.se.cfs_rq`,
/// `cfs_rq.rq` and `rq.clock` (from the kernel's BTF), the path to the run
/// queue's clock the programs read as "now"; zeros make them call
/// `bpf_ktime_get_ns` instead.
pub const GLOBAL_RQ_CLOCK_PATH: &str = "RQ_CLOCK_PATH";

/// Program names, as the loader finds them in the object: the accounting
/// programs on maps allocated on demand...
pub const PROG_TP_BTF: &str = "sched_switch_btf";
pub const PROG_TRACEPOINT: &str = "sched_switch_tp";
/// ...and the same programs on the preallocated maps (the fallback).
pub const PROG_TP_BTF_PREALLOC: &str = "sched_switch_btf_prealloc";
pub const PROG_TRACEPOINT_PREALLOC: &str = "sched_switch_tp_prealloc";
/// Programs that do nothing, on the same hooks: the benchmark's baseline.
pub const PROG_EMPTY_TP_BTF: &str = "empty_sched_switch_btf";
pub const PROG_EMPTY_TRACEPOINT: &str = "empty_sched_switch_tp";
/// The benchmark's ladder on `tp_btf`, each rung one step more of the
/// accounting program than the one before (empty, then these rungs, then
/// the full program): the clock read (the run queue's clock, as the
/// program reads it), the cgroup id (through the task's BTF-typed fields),
/// the cgroup map's lookup and update at every switch, the per-CPU state.
/// The two `*_helper` rungs price the helper calls those reads replace
/// (`bpf_ktime_get_ns`; `bpf_get_current_cgroup_id` after the run queue's
/// clock): the fallback where the kernel has no BTF. Every rung is loaded
/// with the accounting program's globals.
pub const PROG_LADDER_BTF: [(&str, &str); 6] = [
    ("clock_helper", "ladder_clock_helper_btf"),
    ("clock", "ladder_clock_btf"),
    ("cgroup_id_helper", "ladder_cgroup_id_helper_btf"),
    ("cgroup_id", "ladder_cgroup_id_btf"),
    ("map_update", "ladder_map_update_btf"),
    ("cpu_state", "ladder_cpu_state_btf"),
];

/// What one cgroup (or process, or the overflow bucket) ran on one CPU.
///
/// Every byte here is paid `CPUs × entries` times in the per-CPU cgroup map
/// (192 CPUs × 16,384 entries = 3 MiB per byte), so nothing is kept that
/// user space does not read: no switch count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupCounters {
    /// Nanoseconds on the CPU.
    pub cpu_ns: u64,
    /// Hardware counter deltas while it ran (zero where there is no PMU).
    pub cycles: u64,
    pub instructions: u64,
    pub cache_misses: u64,
}

impl CgroupCounters {
    pub fn add(&mut self, other: &CgroupCounters) {
        self.cpu_ns = self.cpu_ns.wrapping_add(other.cpu_ns);
        self.cycles = self.cycles.wrapping_add(other.cycles);
        self.instructions = self.instructions.wrapping_add(other.instructions);
        self.cache_misses = self.cache_misses.wrapping_add(other.cache_misses);
    }
}

/// Length of the kernel's `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;

/// What one thread ran, on all CPUs, and where.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    pub counters: CgroupCounters,
    /// The cgroup the thread was in when last switched out.
    pub cgroup_id: u64,
    /// The process (thread group) the thread belongs to.
    pub tgid: u32,
    /// Keeps the layout free of padding (`aya::Pod`); always zero.
    pub reserved: u32,
    /// The thread's command name when last switched out, NUL-padded (never
    /// the command line).
    pub comm: [u8; COMM_LEN],
}

/// Per-CPU bookkeeping of the accounting program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// The programs' clock at the last switch on this CPU (the run queue's
    /// clock, or `bpf_ktime_get_ns` on the helper path); 0 before the first.
    pub last_switch_ns: u64,
    /// PMU counter values at the last switch, one per `MAP_PMU` entry.
    pub last_pmu: [u64; 3],
    /// Nanoseconds the idle task (pid 0) ran on this CPU.
    pub idle_ns: u64,
    /// Nanoseconds any other task ran on this CPU.
    pub busy_ns: u64,
    /// Keys whose counts went to an overflow bucket: their map was full
    /// (`E2BIG`), or (cgroups) their element could not be allocated within
    /// [`PARKED_WAIT_NS`] or with every parked slot taken.
    pub overflowed_cgroup_keys: u64,
    pub overflowed_process_keys: u64,
    /// Failed inserts into the cgroup map and the thread map, by reason
    /// (indexed as [`INSERT_FAILURE_REASONS`]): the map full (`E2BIG`),
    /// `ENOMEM` (an on-demand element is allocated without sleeping, from a
    /// per-CPU cache that the kernel refills asynchronously; a cgroup
    /// map's per-CPU value comes from the percpu allocator's populated
    /// pages, which cgroup creation itself draws on; a memory cgroup at
    /// its limit refuses both), any other errno. A cgroup whose insert
    /// failed for want of memory has its counts parked, not dropped; a
    /// thread's slice goes to the process overflow bucket and its next
    /// switch-out tries again.
    pub cgroup_insert_failures: [u64; 3],
    pub thread_insert_failures: [u64; 3],
    /// The (negative) errno of the last such failure; 0 before any.
    pub last_cgroup_insert_error: i64,
    /// Parked slots in use: checked at every switch, so the common case
    /// costs one load.
    pub parked_count: u64,
    /// The cgroup whose consecutive slices on this CPU are being summed in
    /// `pending` before they go to the cgroup map (0: none). User space
    /// does not read these: they reach the map within 1 ms of CPU time.
    pub pending_cgroup_id: u64,
    pub pending: CgroupCounters,
    /// Counts whose insert failed for want of memory, retried at this CPU's
    /// next switches. User space does not read them either: they reach the
    /// map, or after [`PARKED_WAIT_NS`] the overflow bucket, at the first
    /// switch that can place them.
    pub parked: [ParkedCgroup; PARKED_SLOTS],
}

/// What the indices of [`CpuState::cgroup_insert_failures`] and
/// [`CpuState::thread_insert_failures`] count, as exported (`reason`).
pub const INSERT_FAILURE_REASONS: [&str; 3] = ["full", "no_memory", "other"];

/// Parked slots per CPU: a burst of allocation failures on one CPU rarely
/// touches more than one or two new cgroups before the kernel's refill runs.
pub const PARKED_SLOTS: usize = 4;
/// How long a parked count is tried again before it goes to the overflow
/// bucket: long enough for the kernel's asynchronous refills (an irq_work
/// for map elements, a workqueue for per-CPU memory) on a loaded node,
/// short enough that a lasting shortage (a memory cgroup at its limit)
/// shows in the overflow bucket within the first interval, not unseen.
pub const PARKED_WAIT_NS: u64 = 100_000_000;

/// One parked cgroup count (see [`CpuState::parked`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParkedCgroup {
    /// 0: the slot is free.
    pub cgroup_id: u64,
    /// The programs' clock (see [`CpuState::last_switch_ns`]) when the
    /// first insert failed.
    pub parked_at_ns: u64,
    pub counters: CgroupCounters,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) integer aggregates without padding.
    unsafe impl aya::Pod for super::CgroupCounters {}
    unsafe impl aya::Pod for super::ThreadCounters {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::ParkedCgroup {}
}
