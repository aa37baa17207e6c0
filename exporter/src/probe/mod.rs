//! What ran where: cumulative per-cgroup CPU usage, from eBPF or from `/proc`.
//!
//! The eBPF probe ([`ebpf`]) counts at every `sched_switch` into per-CPU maps
//! keyed by cgroup v2 id. Keying by cgroup rather than by process is what makes
//! a process that lives 20 ms still count: its cgroup's counter outlives it,
//! and so does its energy. Where the kernel refuses eBPF (no `CAP_BPF`, a
//! locked-down kernel) the exporter falls back to [`procfs`], which reads each
//! cgroup's `cpu.stat` and `/proc/stat`: coarser (it samples instead of
//! counting, and a cgroup removed between two samples leaves its last slice to
//! its parent) but never blind. Which one runs is decided once, logged with the
//! reason, and exported as `ergon_probe_info`.
//!
//! Both produce the same [`UsageSnapshot`]: cumulative counters since the probe
//! started, summed over CPUs. Downstream code takes deltas between snapshots.

pub mod ebpf;
mod kernel_btf;
pub mod map_memory;
mod pmu;
pub mod procfs;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use ergon_ebpf::CgroupCounters;
pub use map_memory::{MapAllocation, MapMemory};

/// How usage is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// eBPF where the kernel allows it, else procfs (logged with the reason).
    Auto,
    /// eBPF only: fail if it cannot load.
    Ebpf,
    /// `/proc` and cgroupfs sampling only.
    Procfs,
}

/// Which `sched_switch` hook the eBPF probe attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookChoice {
    /// `tp_btf` where the kernel has BTF, else the classic tracepoint.
    Auto,
    TpBtf,
    Tracepoint,
}

/// Which counters feed the `cycles`, `instructions` and `cache_misses` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PmuChoice {
    /// Hardware counters where the CPU exposes them, else none.
    Auto,
    /// No counters: usage is CPU time only.
    Off,
    /// A software clock event in the cycles slot. For testing the counter
    /// path on machines without a PMU; its "cycles" are nanoseconds.
    Software,
}

/// Settings of the probe, taken from the exporter's configuration.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub mode: ProbeMode,
    pub hook: HookChoice,
    pub pmu: PmuChoice,
    /// Count per process (tgid) too. Off by default: it costs a second map
    /// update per switch.
    pub per_process: bool,
    /// Bound of the cgroup map; keys beyond it go to the overflow bucket.
    pub max_cgroups: u32,
    /// Bound of the thread map (per-process accounting).
    pub max_processes: u32,
    /// How the kernel's hash maps get their memory.
    pub map_allocation: MapAllocation,
    /// Let the programs read the outgoing task's pid, cgroup id and run
    /// queue clock through `task_struct` at the offsets found in the
    /// kernel's BTF (no helper call per switch; the classic tracepoint gets
    /// the task from `bpf_get_current_task_btf`). Off, where the offsets are
    /// not found, or where the kernel refuses those programs (retried once,
    /// logged), they call `bpf_get_current_pid_tgid`,
    /// `bpf_get_current_cgroup_id` and `bpf_ktime_get_ns`: the portable
    /// path, which a test forces.
    pub read_task_fields: bool,
    /// What the kernel maps may cost at worst (every entry used); the cgroup
    /// map's bound is lowered to fit it on nodes with many CPUs.
    pub map_memory_budget_bytes: u64,
    /// Host `/proc` (the procfs fallback reads `stat` and `<pid>/stat`).
    pub host_proc: PathBuf,
    /// Host `/sys` (for BTF and the tracefs mount).
    pub host_sys: PathBuf,
    /// The cgroup v2 mount whose directory inodes are cgroup ids.
    pub cgroup_root: PathBuf,
}

impl ProbeConfig {
    /// Defaults for the host this process runs on.
    pub fn local() -> ProbeConfig {
        let host_sys = PathBuf::from("/sys");
        ProbeConfig {
            mode: ProbeMode::Auto,
            hook: HookChoice::Auto,
            pmu: PmuChoice::Auto,
            per_process: false,
            max_cgroups: 16384,
            max_processes: 32768,
            map_allocation: MapAllocation::Auto,
            read_task_fields: true,
            map_memory_budget_bytes: map_memory::DEFAULT_BUDGET_MIB * 1024 * 1024,
            host_proc: PathBuf::from("/proc"),
            cgroup_root: find_cgroup2_root(&host_sys).unwrap_or_else(|| host_sys.join("fs/cgroup")),
            host_sys,
        }
    }
}

/// The cgroup v2 hierarchy under a host `/sys`: `fs/cgroup` on a unified
/// host, `fs/cgroup/unified` on a hybrid (v1 + v2) one.
pub fn find_cgroup2_root(host_sys: &Path) -> Option<PathBuf> {
    cgroup2_within(&host_sys.join("fs/cgroup"))
}

/// `dir` if it is a cgroup2 hierarchy, else its `unified` sub-directory if
/// that is one. On a hybrid host `/sys/fs/cgroup` is the tmpfs of the v1
/// controllers and cgroup2 sits at `unified`: a `--cgroup-root` (or a
/// chart) naming the former means the latter.
pub fn cgroup2_within(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("unified")]
        .into_iter()
        .find(|dir| dir.join("cgroup.controllers").exists())
}

/// One process's cumulative usage (opt-in accounting).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessUsage {
    pub counters: CgroupCounters,
    pub cgroup_id: u64,
    /// Command name, at most 15 bytes (never the command line).
    pub comm: String,
}

/// Cumulative usage since the probe started, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct UsageSnapshot {
    /// Per cgroup v2 id: time spent by tasks directly in that cgroup.
    pub cgroups: HashMap<u64, CgroupCounters>,
    /// What ran in cgroups that found the cgroup map full.
    pub cgroup_overflow: CgroupCounters,
    /// Per tgid, when per-process accounting is on.
    pub processes: HashMap<u32, ProcessUsage>,
    pub process_overflow: CgroupCounters,
    /// Nanoseconds the CPUs spent idle / running something, all CPUs summed.
    pub idle_ns: u64,
    pub busy_ns: u64,
    /// Number of new cgroup keys that went to the overflow bucket.
    pub overflowed_cgroup_keys: u64,
    pub overflowed_process_keys: u64,
    /// Failed inserts into the kernel's cgroup and thread maps, by reason
    /// (`ergon_ebpf::INSERT_FAILURE_REASONS`: full, no_memory, other),
    /// cumulative (eBPF probe only; see `ergon_ebpf::CpuState`).
    pub cgroup_insert_failures: [u64; 3],
    pub process_insert_failures: [u64; 3],
    /// The errno of the last failed cgroup insert of the highest-numbered
    /// CPU that had one (per CPU the kernel keeps only its last; positive;
    /// 0: none).
    pub last_cgroup_insert_errno: i32,
    /// Cgroups and processes left out of a sample because they could not be
    /// read, per (kind, reason), cumulative (procfs probe only; see
    /// [`procfs`]).
    pub skipped: std::collections::BTreeMap<(&'static str, &'static str), u64>,
}

impl UsageSnapshot {
    /// Sum over every cgroup and the overflow bucket.
    pub fn total_cgroup_ns(&self) -> u64 {
        self.cgroups.values().map(|c| c.cpu_ns).sum::<u64>() + self.cgroup_overflow.cpu_ns
    }
}

/// What the probe detected and chose, for logs, `ergon doctor` and
/// `ergon_probe_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// "ebpf" or "procfs".
    pub mode: &'static str,
    /// "tp_btf", "tracepoint" or "none" (procfs).
    pub hook: &'static str,
    /// "hardware", "software" or "none".
    pub pmu: &'static str,
    /// How the programs learn the switched-out task's pid, cgroup id and
    /// the time: "fields" (loads at offsets from the kernel's BTF, the
    /// cheap path), "helpers" (helper calls: no BTF, or the kernel refused
    /// the loads), "fields+helpers" (some offsets missing) or "none"
    /// (procfs).
    pub reads: &'static str,
    /// Why the fallback was taken, when it was.
    pub fallback_reason: Option<String>,
}

impl fmt::Display for ProbeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mode={} hook={} pmu={} reads={}",
            self.mode, self.hook, self.pmu, self.reads
        )
    }
}

/// Errors that stop a probe from starting or sampling.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    #[error("attaching to sched_switch failed: {0}")]
    Attach(String),
    #[error("reading BPF map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
}

/// A running probe of either kind.
pub enum Probe {
    Ebpf(Box<ebpf::EbpfProbe>),
    Procfs(Box<procfs::ProcfsProbe>),
}

impl Probe {
    /// Starts the probe `config.mode` asks for. In `Auto`, an eBPF failure is
    /// logged once with its reason and the procfs fallback starts instead.
    pub fn start(config: &ProbeConfig) -> Result<Probe, ProbeError> {
        match config.mode {
            ProbeMode::Ebpf => Ok(Probe::Ebpf(Box::new(ebpf::EbpfProbe::start(config)?))),
            ProbeMode::Procfs => Ok(Probe::Procfs(Box::new(procfs::ProcfsProbe::start(
                config, None,
            )?))),
            ProbeMode::Auto => match ebpf::EbpfProbe::start(config) {
                Ok(probe) => Ok(Probe::Ebpf(Box::new(probe))),
                Err(err) => {
                    let reason = explain_ebpf_failure(&err);
                    tracing::warn!(
                        "eBPF probe unavailable, falling back to procfs accounting: {reason}"
                    );
                    Ok(Probe::Procfs(Box::new(procfs::ProcfsProbe::start(
                        config,
                        Some(reason),
                    )?)))
                }
            },
        }
    }

    pub fn info(&self) -> &ProbeInfo {
        match self {
            Probe::Ebpf(p) => p.info(),
            Probe::Procfs(p) => p.info(),
        }
    }

    /// Cumulative usage now.
    pub fn sample(&mut self) -> Result<UsageSnapshot, ProbeError> {
        match self {
            Probe::Ebpf(p) => p.sample(),
            Probe::Procfs(p) => p.sample(),
        }
    }

    /// Memory of the kernel maps as the kernel reports it; empty for procfs.
    pub fn map_memory(&self) -> Result<Vec<MapMemory>, ProbeError> {
        match self {
            Probe::Ebpf(p) => p.map_memory(),
            Probe::Procfs(_) => Ok(Vec::new()),
        }
    }

    /// Drops the counters of cgroups and processes that are gone and whose
    /// final values were already taken, so the bounded maps do not fill.
    pub fn forget(&mut self, cgroup_ids: &[u64], pids: &[u32]) {
        match self {
            Probe::Ebpf(p) => p.forget(cgroup_ids, pids),
            Probe::Procfs(p) => p.forget(cgroup_ids, pids),
        }
    }
}

/// Whether the kernel refused BPF itself (EPERM/EACCES), not one program.
pub(crate) fn is_permission_error(err: &ProbeError) -> bool {
    let lower = err.to_string().to_lowercase();
    lower.contains("operation not permitted") || lower.contains("permission denied")
}

/// Turns a load failure into the sentence an operator needs: what was
/// refused and how to allow it.
fn explain_ebpf_failure(err: &ProbeError) -> String {
    let text = err.to_string();
    if is_permission_error(err) {
        format!(
            "{text}. The kernel refused BPF: run the exporter privileged, or with \
             CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (and without a seccomp profile that blocks bpf())"
        )
    } else {
        text
    }
}

/// Converts a command name from the kernel's NUL-padded array.
pub(crate) fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}
