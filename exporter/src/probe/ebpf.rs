//! Loads, attaches and reads the kernel programs of `exporter-ebpf`.
//!
//! Hook choice: `tp_btf/sched_switch` is the cheaper hook (35 ns added per
//! switch over an empty program against 46 ns for the classic tracepoint,
//! `cargo bench --bench probe_cost` on the test VM) but needs kernel BTF;
//! without `/sys/kernel/btf/vmlinux` the classic
//! `tracepoint/sched/sched_switch` is used. fentry/kprobes are not needed,
//! which matters on locked-down kernels where they are refused.
//!
//! Where the kernel has BTF, the programs read what they need from the task
//! switched out at offsets found in it (`kernel_btf`): no helper call per
//! switch. Without BTF they call helpers (126–156 ns added on the same VM);
//! a kernel that refuses the direct reads gets the helper programs after
//! one log line with the verifier's reason.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use ergon_ebpf::{
    CgroupCounters, CpuState, GLOBAL_CGROUP_ID_PATH, GLOBAL_PER_PROCESS, GLOBAL_PMU_MASK,
    GLOBAL_RQ_CLOCK_PATH, GLOBAL_TASK_PID_OFFSET, MAP_CGROUP_OVERFLOW, MAP_CGROUPS,
    MAP_CGROUPS_PREALLOC, MAP_CPU_STATE, MAP_PMU, MAP_PROCESS_OVERFLOW, MAP_THREADS,
    MAP_THREADS_PREALLOC, PROG_TP_BTF, PROG_TP_BTF_PREALLOC, PROG_TRACEPOINT,
    PROG_TRACEPOINT_PREALLOC, ThreadCounters,
};

use super::kernel_btf::{self, KernelFacts};
use super::map_memory::{self, Allocated, MapAllocation, MapMemory};
use super::{
    HookChoice, ProbeConfig, ProbeError, ProbeInfo, ProcessUsage, UsageSnapshot, comm_to_string,
    pmu,
};

/// The compiled kernel object, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ergon-ebpf"));

/// The programs and maps of one allocation variant (see `exporter-ebpf`).
struct Variant {
    tp_btf: &'static str,
    tracepoint: &'static str,
    cgroups: &'static str,
    threads: &'static str,
    /// The other variant's maps, loaded with one entry.
    unused: [&'static str; 2],
}

impl Variant {
    fn of(allocated: Allocated) -> Variant {
        match allocated {
            Allocated::OnDemand => Variant {
                tp_btf: PROG_TP_BTF,
                tracepoint: PROG_TRACEPOINT,
                cgroups: MAP_CGROUPS,
                threads: MAP_THREADS,
                unused: [MAP_CGROUPS_PREALLOC, MAP_THREADS_PREALLOC],
            },
            Allocated::Prealloc => Variant {
                tp_btf: PROG_TP_BTF_PREALLOC,
                tracepoint: PROG_TRACEPOINT_PREALLOC,
                cgroups: MAP_CGROUPS_PREALLOC,
                threads: MAP_THREADS_PREALLOC,
                unused: [MAP_CGROUPS, MAP_THREADS],
            },
        }
    }
}

/// How the maps were sized and allocated, for logs, `ergon doctor` and the
/// tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub allocated: Allocated,
    pub bounds: map_memory::MapBounds,
    /// Possible CPUs: what per-CPU values are paid for.
    pub possible_cpus: u64,
    pub budget_bytes: u64,
}

/// Per-process bookkeeping on top of the thread map: threads are summed per
/// process, and the keys of exited threads are removed from the kernel map
/// promptly while their counts stay in their process's total.
#[derive(Default)]
struct ThreadBook {
    /// Counts of removed thread keys, per process (tgid), with the process's
    /// last labels: part of the process's total until the loop forgets it.
    retired: HashMap<u32, ProcessUsage>,
    /// Thread ids found without `/proc/<tid>` at the previous sample.
    dead_before: HashSet<u32>,
    /// Thread ids per process at the last sample (for `forget`).
    threads_of: HashMap<u32, Vec<u32>>,
}

pub struct EbpfProbe {
    info: ProbeInfo,
    layout: MapLayout,
    // Keeps the programs attached and the maps alive.
    bpf: Ebpf,
    cgroups: PerCpuHashMap<MapData, u64, CgroupCounters>,
    threads: aya::maps::HashMap<MapData, u32, ThreadCounters>,
    cgroup_overflow: PerCpuArray<MapData, CgroupCounters>,
    process_overflow: PerCpuArray<MapData, CgroupCounters>,
    cpu_state: PerCpuArray<MapData, CpuState>,
    logger: Option<aya_log::EbpfLogger<LogToTracing>>,
    /// Every map of the object with its fd, whichever part holds it.
    map_fds: Vec<(String, i32)>,
    host_proc: PathBuf,
    book: ThreadBook,
    insert_failures: InsertFailureLog,
    _pmu_fds: Vec<OwnedFd>,
}

/// Logs the maps' failed inserts (other than a full map, which the kernel
/// program logs itself) with the cgroup map's last errno, at most once a
/// minute.
#[derive(Default)]
struct InsertFailureLog {
    logged: u64,
    last: Option<std::time::Instant>,
}

impl InsertFailureLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn note(&mut self, snapshot: &UsageSnapshot) {
        // A full map is logged by the kernel program itself.
        let [_, cgroups_no_memory, cgroups_other] = snapshot.cgroup_insert_failures;
        let [_, threads_no_memory, threads_other] = snapshot.process_insert_failures;
        let cgroups = cgroups_no_memory + cgroups_other;
        let threads = threads_no_memory + threads_other;
        if cgroups + threads <= self.logged
            || self.last.is_some_and(|at| at.elapsed() < Self::EVERY)
        {
            return;
        }
        let errno = std::io::Error::from_raw_os_error(snapshot.last_cgroup_insert_errno);
        tracing::warn!(
            "the kernel could not add new keys to the probe's maps although they are not \
             full ({cgroups} cgroups since start, last error: {errno}; {threads} threads): a \
             cgroup's CPU time waits on its CPU and is added at a later switch, a thread's \
             slice goes to the overflow bucket (ergon_probe_overflow_cpu_seconds_total) and \
             its next switch tries again. ENOMEM means a non-sleeping allocation found no \
             memory: the exporter's memory cgroup at its limit (raise the memory limit) or a \
             moment's shortage while many cgroups are created. Counted in \
             ergon_probe_map_insert_failures_total"
        );
        self.logged = cgroups + threads;
        self.last = Some(std::time::Instant::now());
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        map,
        detail: e.to_string(),
    }
}

/// The map data behind any kind of map (every variant holds one).
fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map::*;
    match map {
        Array(d)
        | ArrayOfMaps(d)
        | BloomFilter(d)
        | CgroupArray(d)
        | CgroupStorage(d)
        | CgrpStorage(d)
        | CpuMap(d)
        | DevMap(d)
        | DevMapHash(d)
        | HashMap(d)
        | HashOfMaps(d)
        | InodeStorage(d)
        | LpmTrie(d)
        | LruHashMap(d)
        | PerCpuArray(d)
        | PerCpuCgroupStorage(d)
        | PerCpuHashMap(d)
        | PerCpuLruHashMap(d)
        | PerfEventArray(d)
        | ProgramArray(d)
        | Queue(d)
        | ReusePortSockArray(d)
        | RingBuf(d)
        | SockHash(d)
        | SockMap(d)
        | SkStorage(d)
        | Stack(d)
        | StackTraceMap(d)
        | Unsupported(d)
        | XskMap(d) => d,
    }
}

fn kernel_release(host_proc: &Path) -> Option<(u32, u32)> {
    std::fs::read_to_string(host_proc.join("sys/kernel/osrelease"))
        .ok()
        .and_then(|text| map_memory::kernel_version(&text))
}

impl EbpfProbe {
    /// Loads and attaches the accounting programs. With
    /// [`MapAllocation::Auto`], a kernel that refuses the programs on maps
    /// allocated on demand gets the preallocated variant, logged once.
    pub fn start(config: &ProbeConfig) -> Result<EbpfProbe, ProbeError> {
        let kernel = kernel_release(&config.host_proc);
        let allocated = match config.map_allocation {
            MapAllocation::OnDemand => Allocated::OnDemand,
            MapAllocation::Prealloc => Allocated::Prealloc,
            MapAllocation::Auto => {
                let chosen = map_memory::auto_allocation(kernel);
                if chosen == Allocated::Prealloc {
                    let release = kernel.map_or("of unknown release".into(), |(major, minor)| {
                        format!("{major}.{minor}")
                    });
                    tracing::info!(
                        "kernel {release} predates safe run-time allocation in tracing \
                         programs (6.1): kernel maps are preallocated"
                    );
                }
                chosen
            }
        };
        match EbpfProbe::start_fields(config, allocated, kernel) {
            // A refusal of BPF as such (EPERM) is not about allocation.
            Err(e)
                if config.map_allocation == MapAllocation::Auto
                    && allocated == Allocated::OnDemand
                    && !super::is_permission_error(&e) =>
            {
                tracing::warn!(
                    "the kernel refused the probe on maps allocated on demand ({e}); using \
                     preallocated maps (their full size is charged from the start; see \
                     ergon_probe_map_memory_bytes)"
                );
                EbpfProbe::start_fields(config, Allocated::Prealloc, kernel)
            }
            result => result,
        }
    }

    /// [`EbpfProbe::start_with`] reading the task's fields directly where
    /// the kernel's BTF gives their offsets; where the kernel refuses those
    /// programs (a verifier older than the reads, a kernel without
    /// `bpf_get_current_task_btf` for the classic tracepoint), once more
    /// with the helpers, logged once.
    fn start_fields(
        config: &ProbeConfig,
        allocated: Allocated,
        kernel: Option<(u32, u32)>,
    ) -> Result<EbpfProbe, ProbeError> {
        if !config.read_task_fields {
            return EbpfProbe::start_with(config, allocated, kernel, false);
        }
        match EbpfProbe::start_with(config, allocated, kernel, true) {
            Err(e) if verifier_refused(&e) => {
                tracing::warn!(
                    "the kernel refused the probe that reads the switched-out task's fields \
                     directly ({}); using helper calls instead (bpf_ktime_get_ns, \
                     bpf_get_current_cgroup_id: the same counts, ~100 ns more per context \
                     switch, see BENCHMARKS.md)",
                    verifier_reason(&e)
                );
                EbpfProbe::start_with(config, allocated, kernel, false)
            }
            result => result,
        }
    }

    fn start_with(
        config: &ProbeConfig,
        allocated: Allocated,
        kernel: Option<(u32, u32)>,
        task_fields: bool,
    ) -> Result<EbpfProbe, ProbeError> {
        let cpus = aya::util::online_cpus()
            .map_err(|(path, e)| ProbeError::Load(format!("reading {path}: {e}")))?;
        let possible_cpus = aya::util::nr_cpus()
            .map_err(|(path, e)| ProbeError::Load(format!("reading {path}: {e}")))?
            as u64;
        let variant = Variant::of(allocated);
        let bounds = config.map_bounds(config.per_process, possible_cpus, allocated);
        if bounds.cgroups_lowered {
            tracing::warn!(
                "cgroup map bound lowered from {} to {} so that the kernel maps fit the \
                 {} MiB budget on {possible_cpus} possible CPUs (per-CPU values); cgroups beyond \
                 it are counted in the overflow bucket. Raise --map-memory-budget-mib, and the \
                 pod's memory limit with it, to keep more apart",
                config.max_cgroups,
                bounds.cgroups,
                config.map_memory_budget_bytes / (1024 * 1024)
            );
        }
        raise_memlock_if_needed(kernel, bounds.full_bytes);
        let layout = MapLayout {
            allocated,
            bounds,
            possible_cpus,
            budget_bytes: config.map_memory_budget_bytes,
        };

        let events = pmu::open(config.pmu, &cpus);
        let mask = events.mask();
        let per_process: u32 = config.per_process.into();

        let facts = kernel_facts(config);
        let globals = TaskGlobals::of(facts.filter(|_| task_fields));
        // The programs need no relocation against kernel BTF (no CO-RE
        // reads; the offsets of the fields they read come as globals).
        let mut bpf = loader_without_kernel_btf()
            .btf(None)
            .map_max_entries(variant.cgroups, bounds.cgroups)
            .map_max_entries(variant.threads, bounds.threads)
            .map_max_entries(variant.unused[0], 1)
            .map_max_entries(variant.unused[1], 1)
            .override_global(GLOBAL_PER_PROCESS, &per_process, true)
            .override_global(GLOBAL_PMU_MASK, &mask, true)
            .override_global(GLOBAL_TASK_PID_OFFSET, &globals.task_pid_offset, true)
            .override_global(GLOBAL_CGROUP_ID_PATH, &globals.cgroup_id_path, true)
            .override_global(GLOBAL_RQ_CLOCK_PATH, &globals.rq_clock_path, true)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;
        // Before anything takes a map out of `bpf`: fds stay what they are.
        let map_fds = bpf
            .maps()
            .map(|(name, map)| (name.to_owned(), map_data(map).fd().as_fd().as_raw_fd()))
            .collect();

        let logger = match aya_log::EbpfLogger::init_with_logger(&mut bpf, LogToTracing) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!("eBPF log forwarding not available: {e}");
                None
            }
        };

        let mut pmu_fds = Vec::new();
        for set in events.sets {
            let name = MAP_PMU[set.slot];
            let map = bpf
                .map(name)
                .ok_or_else(|| ProbeError::Load(format!("map {name} missing from object")))?;
            let aya::maps::Map::PerfEventArray(data) = map else {
                return Err(ProbeError::Load(format!(
                    "map {name} is not a PERF_EVENT_ARRAY"
                )));
            };
            for (cpu, fd) in set.per_cpu {
                pmu::install(data.fd(), cpu, &fd).map_err(|e| {
                    ProbeError::Load(format!("installing counter of CPU {cpu} into {name}: {e}"))
                })?;
                pmu_fds.push(fd);
            }
        }

        let hook = attach(&mut bpf, config, facts, &variant)?;

        let cgroups = take_map(&mut bpf, variant.cgroups)?;
        let threads = take_map(&mut bpf, variant.threads)?;
        let cgroup_overflow = take_map(&mut bpf, MAP_CGROUP_OVERFLOW)?;
        let process_overflow = take_map(&mut bpf, MAP_PROCESS_OVERFLOW)?;
        let cpu_state = take_map(&mut bpf, MAP_CPU_STATE)?;

        // Give what loading freed (the object's parse, the verifier log
        // buffers) back to the system before the exporter's own state grows.
        // SAFETY: malloc_trim only releases free heap pages.
        unsafe { libc::malloc_trim(0) };
        let info = ProbeInfo {
            mode: "ebpf",
            hook,
            pmu: events.kind,
            reads: globals.reads(),
            fallback_reason: None,
        };
        tracing::info!(
            "eBPF probe attached: {info}; maps {} (cgroups ≤ {}, threads ≤ {}, at most {} KiB \
             on {possible_cpus} possible CPUs)",
            allocated.name(),
            bounds.cgroups,
            bounds.threads,
            bounds.full_bytes / 1024
        );
        Ok(EbpfProbe {
            info,
            layout,
            bpf,
            cgroups,
            threads,
            cgroup_overflow,
            process_overflow,
            cpu_state,
            logger,
            map_fds,
            host_proc: config.host_proc.clone(),
            book: ThreadBook::default(),
            insert_failures: InsertFailureLog::default(),
            _pmu_fds: pmu_fds,
        })
    }

    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    pub fn layout(&self) -> &MapLayout {
        &self.layout
    }

    /// Memory of every map of the probe, as the kernel reports it
    /// (`memlock:` of `/proc/self/fdinfo/<fd>`).
    pub fn map_memory(&self) -> Result<Vec<MapMemory>, ProbeError> {
        let fdinfo = Path::new("/proc/self/fdinfo");
        self.map_fds
            .iter()
            .map(|(name, fd)| {
                let read =
                    map_memory::read_fdinfo(fdinfo, *fd).map_err(|source| ProbeError::Io {
                        path: fdinfo.join(fd.to_string()),
                        source,
                    })?;
                let (map_id, bytes) = read.ok_or_else(|| ProbeError::Parse {
                    path: fdinfo.join(fd.to_string()),
                    detail: format!("no map_id/memlock lines for map {name}"),
                })?;
                Ok(MapMemory {
                    name: name.clone(),
                    map_id,
                    bytes,
                })
            })
            .collect()
    }

    /// The loaded accounting program's kernel statistics (`run_time_ns`,
    /// `run_cnt`); both stay zero unless `kernel.bpf_stats_enabled` is on.
    pub fn program_stats(&self) -> Option<(std::time::Duration, u64)> {
        let variant = Variant::of(self.layout.allocated);
        let name = match self.info.hook {
            "tp_btf" => variant.tp_btf,
            _ => variant.tracepoint,
        };
        let info = match self.bpf.program(name)? {
            aya::programs::Program::BtfTracePoint(p) => p.info().ok()?,
            aya::programs::Program::TracePoint(p) => p.info().ok()?,
            _ => return None,
        };
        Some((info.run_time(), info.run_count()))
    }

    pub fn sample(&mut self) -> Result<UsageSnapshot, ProbeError> {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
        let mut snapshot = UsageSnapshot::default();
        for entry in self.cgroups.iter() {
            let (cgroup_id, per_cpu) = entry.map_err(map_err(MAP_CGROUPS))?;
            snapshot.cgroups.insert(cgroup_id, sum(per_cpu.iter()));
        }
        snapshot.processes = self.sample_processes()?;
        let overflow = self
            .cgroup_overflow
            .get(&0, 0)
            .map_err(map_err(MAP_CGROUP_OVERFLOW))?;
        snapshot.cgroup_overflow = sum(overflow.iter());
        let overflow = self
            .process_overflow
            .get(&0, 0)
            .map_err(map_err(MAP_PROCESS_OVERFLOW))?;
        snapshot.process_overflow = sum(overflow.iter());
        let states = self.cpu_state.get(&0, 0).map_err(map_err(MAP_CPU_STATE))?;
        for state in states.iter() {
            snapshot.idle_ns += state.idle_ns;
            snapshot.busy_ns += state.busy_ns;
            snapshot.overflowed_cgroup_keys += state.overflowed_cgroup_keys;
            snapshot.overflowed_process_keys += state.overflowed_process_keys;
            for reason in 0..3 {
                snapshot.cgroup_insert_failures[reason] += state.cgroup_insert_failures[reason];
                snapshot.process_insert_failures[reason] += state.thread_insert_failures[reason];
            }
            if state.last_cgroup_insert_error != 0 {
                snapshot.last_cgroup_insert_errno =
                    i32::try_from(-state.last_cgroup_insert_error).unwrap_or(i32::MAX);
            }
        }
        self.insert_failures.note(&snapshot);
        Ok(snapshot)
    }

    /// Threads summed per process, plus what retired threads left. A thread
    /// found without `/proc/<tid>` at two samples in a row has had its final
    /// switch-out counted (it leaves `/proc` just before its last switch):
    /// its count moves to `retired` and its key leaves the kernel map, so
    /// exited threads never fill it.
    fn sample_processes(&mut self) -> Result<HashMap<u32, ProcessUsage>, ProbeError> {
        let mut processes: HashMap<u32, ProcessUsage> = self.book.retired.clone();
        let mut threads_of: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut dead_now = HashSet::new();
        let mut retire = Vec::new();
        for entry in self.threads.iter() {
            let (tid, thread) = entry.map_err(map_err(MAP_THREADS))?;
            let usage = processes.entry(thread.tgid).or_default();
            usage.counters.add(&thread.counters);
            // The main thread names the process; any thread until it is seen.
            if tid == thread.tgid || usage.cgroup_id == 0 {
                usage.cgroup_id = thread.cgroup_id;
                usage.comm = comm_to_string(&thread.comm);
            }
            threads_of.entry(thread.tgid).or_default().push(tid);
            if !self.host_proc.join(tid.to_string()).exists() {
                if self.book.dead_before.contains(&tid) {
                    retire.push((tid, thread));
                } else {
                    dead_now.insert(tid);
                }
            }
        }
        for (tid, thread) in retire {
            let retired = self.book.retired.entry(thread.tgid).or_default();
            retired.counters.add(&thread.counters);
            let labels = &processes[&thread.tgid];
            retired.cgroup_id = labels.cgroup_id;
            retired.comm = labels.comm.clone();
            // Gone already is fine: the count was read above and is kept.
            let _ = self.threads.remove(&tid);
        }
        self.book.dead_before = dead_now;
        self.book.threads_of = threads_of;
        Ok(processes)
    }

    pub fn forget(&mut self, cgroup_ids: &[u64], pids: &[u32]) {
        for id in cgroup_ids {
            // A key that is already gone is fine: forgetting is idempotent.
            let _ = self.cgroups.remove(id);
        }
        for pid in pids {
            self.book.retired.remove(pid);
            for tid in self.book.threads_of.remove(pid).unwrap_or_default() {
                let _ = self.threads.remove(&tid);
            }
        }
    }
}

/// Before Linux 5.11 map memory counts against `RLIMIT_MEMLOCK`: raise the
/// soft limit (and the hard one, where allowed) to the maps' worst case.
fn raise_memlock_if_needed(kernel: Option<(u32, u32)>, needed_bytes: u64) {
    let Some(kernel) = kernel else { return };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return;
    }
    // Headroom for the small maps and the programs themselves.
    let needed = needed_bytes + 4 * 1024 * 1024;
    let Some(target) = map_memory::memlock_limit_needed(kernel, limit.rlim_cur, needed) else {
        return;
    };
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max.max(target),
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
        tracing::info!(
            "kernel {}.{} charges BPF maps to RLIMIT_MEMLOCK: raised it from {} to {target} bytes",
            kernel.0,
            kernel.1,
            limit.rlim_cur
        );
    } else {
        tracing::warn!(
            "kernel {}.{} charges BPF maps to RLIMIT_MEMLOCK ({} bytes) and raising it to \
             {target} failed ({}): give the exporter CAP_SYS_RESOURCE or `ulimit -l {}`",
            kernel.0,
            kernel.1,
            limit.rlim_cur,
            std::io::Error::last_os_error(),
            target / 1024
        );
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a CgroupCounters>) -> CgroupCounters {
    values.fold(CgroupCounters::default(), |mut total, value| {
        total.add(value);
        total
    })
}

fn take_map<V: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    bpf: &mut Ebpf,
    name: &'static str,
) -> Result<V, ProbeError> {
    let map = bpf
        .take_map(name)
        .ok_or_else(|| ProbeError::Load(format!("map {name} missing from object")))?;
    V::try_from(map).map_err(map_err(name))
}

/// Where the kernel's BTF is, and whether the hook asked for wants it.
fn wants_btf(config: &ProbeConfig) -> Option<PathBuf> {
    let btf_path = config.host_sys.join("kernel/btf/vmlinux");
    match config.hook {
        HookChoice::Tracepoint => None,
        HookChoice::TpBtf => Some(btf_path),
        HookChoice::Auto => btf_path.exists().then_some(btf_path),
    }
}

/// The facts of the kernel's BTF the programs need: the `tp_btf` hook's
/// attach id, and for both hooks the offsets of the task's fields they read
/// directly. `None` (logged once) sends attaching `tp_btf` to aya's full
/// parse and makes the programs call helpers.
fn kernel_facts(config: &ProbeConfig) -> Option<KernelFacts> {
    let btf_path = config.host_sys.join("kernel/btf/vmlinux");
    // Without the file, only a forced `tp_btf` has something to report.
    if config.hook != HookChoice::TpBtf && !btf_path.exists() {
        return None;
    }
    match kernel_btf::scan(&btf_path) {
        Ok(facts) => {
            if facts.task_pid_offset.is_none()
                || facts.cgroup_id_path.is_none()
                || facts.rq_clock_path.is_none()
            {
                tracing::info!(
                    "{} lacks some of task_struct.pid, the fields to the task's cgroup id and \
                     to its run queue's clock (task_struct.se.cfs_rq, cfs_rq.rq, rq.clock: \
                     CONFIG_FAIR_GROUP_SCHED): the programs ask helpers for what is missing \
                     ({facts:?})",
                    btf_path.display()
                );
            }
            Some(facts)
        }
        Err(e) => {
            tracing::info!(
                "reading {} in one pass failed ({e}): aya parses it whole to attach tp_btf \
                 (start-up memory peak ~15 MB higher) and the programs ask helpers for the \
                 pid, the cgroup id and the time",
                btf_path.display()
            );
            None
        }
    }
}

/// Whether the verifier refused a program (`BPF_PROG_LOAD` failed with
/// anything but `EPERM`, which is BPF refused as such).
fn verifier_refused(err: &ProbeError) -> bool {
    let text = err.to_string();
    text.contains("BPF_PROG_LOAD") && !text.contains("Operation not permitted")
}

/// The verifier's reason for a refusal: the last line of its log before the
/// statistics, not the whole log (hundreds of lines).
fn verifier_reason(err: &ProbeError) -> String {
    let text = err.to_string();
    let Some((syscall, log)) = text.split_once("Verifier output:") else {
        return text;
    };
    let reason = log
        .lines()
        .map(str::trim)
        .rfind(|line| {
            !line.is_empty()
                && !["processed ", "stack depth ", "verification time "]
                    .iter()
                    .any(|statistic| line.starts_with(statistic))
        })
        .unwrap_or("no verifier log");
    let syscall = syscall.trim().trim_end_matches('.');
    format!("{syscall}: {reason}")
}

/// The globals that give the programs the offsets of the task's fields;
/// zeros make them call helpers instead.
#[derive(Debug, Default)]
struct TaskGlobals {
    task_pid_offset: u32,
    cgroup_id_path: [u32; 4],
    rq_clock_path: [u32; 3],
}

impl TaskGlobals {
    /// `ProbeInfo::reads`.
    fn reads(&self) -> &'static str {
        let found = [
            self.task_pid_offset != 0,
            self.cgroup_id_path[0] != 0,
            self.rq_clock_path[0] != 0,
        ];
        if found.iter().all(|&f| f) {
            "fields"
        } else if found.iter().any(|&f| f) {
            "fields+helpers"
        } else {
            "helpers"
        }
    }

    fn of(facts: Option<KernelFacts>) -> TaskGlobals {
        let Some(facts) = facts else {
            return TaskGlobals::default();
        };
        TaskGlobals {
            task_pid_offset: facts.task_pid_offset.unwrap_or(0),
            cgroup_id_path: facts.cgroup_id_path.unwrap_or([0; 4]),
            rq_clock_path: facts.rq_clock_path.unwrap_or([0; 3]),
        }
    }
}

/// A BTF that `BtfTracePoint::load` can attach `sched_switch` with: the small
/// one made from `facts`, or aya's full parse of the file.
fn sched_switch_btf(facts: Option<KernelFacts>, btf_path: &Path) -> Result<Btf, String> {
    match facts {
        Some(facts) => kernel_btf::attach_btf("sched_switch", facts.sched_switch_typedef_id)
            .map_err(|e| format!("building the attach BTF: {e}")),
        None => Btf::parse_file(btf_path, aya::Endianness::default())
            .map_err(|e| format!("parsing {}: {e}", btf_path.display())),
    }
}

/// `EbpfLoader::new()`, without the parse of `/sys/kernel/btf/vmlinux` that
/// aya 0.14 does there unconditionally (it is dropped again by
/// `.btf(None)`; ~15 MB of heap at its peak). The loader is made on a
/// short-lived thread whose root directory is `/sys/kernel/btf` itself, where
/// that absolute path does not exist, so aya finds no file and parses
/// nothing. `unshare(CLONE_FS)` gives the thread its own root, so no other
/// thread sees the change, and it ends with the thread. Where `chroot` is
/// not allowed (no `CAP_SYS_CHROOT`) the loader parses as before, logged
/// once. The upstream fix is a loader constructor that parses BTF only when
/// a program needs relocating.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    const BTF_DIR: &str = "/sys/kernel/btf";
    if !Path::new(BTF_DIR).is_dir() {
        return EbpfLoader::new();
    }
    let made = std::thread::spawn(|| {
        let dir = std::ffi::CString::new(BTF_DIR).expect("no NUL");
        // SAFETY: plain syscalls on this thread's own filesystem context.
        let unshared = unsafe {
            libc::unshare(libc::CLONE_FS) == 0
                && libc::chroot(dir.as_ptr()) == 0
                && libc::chdir(c"/".as_ptr()) == 0
        };
        if unshared {
            Ok(EbpfLoader::new())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
    .join();
    match made {
        Ok(Ok(loader)) => loader,
        Ok(Err(e)) => {
            tracing::info!(
                "aya parses the kernel BTF while loading (start-up memory peak ~15 MB higher): \
                 the thread that would avoid it could not chroot ({e}; needs CAP_SYS_CHROOT)"
            );
            EbpfLoader::new()
        }
        Err(_) => EbpfLoader::new(),
    }
}

fn attach(
    bpf: &mut Ebpf,
    config: &ProbeConfig,
    facts: Option<KernelFacts>,
    variant: &Variant,
) -> Result<&'static str, ProbeError> {
    if let Some(btf_path) = wants_btf(config) {
        let attached = sched_switch_btf(facts, &btf_path)
            .and_then(|btf| attach_btf(bpf, &btf, variant.tp_btf));
        match attached {
            Ok(()) => return Ok("tp_btf"),
            Err(e) if config.hook == HookChoice::TpBtf => return Err(ProbeError::Attach(e)),
            Err(e) => tracing::info!(
                "tp_btf/sched_switch unavailable ({e}); using the classic tracepoint"
            ),
        }
    } else if config.hook == HookChoice::Auto {
        tracing::info!(
            "no kernel BTF at {}; using the classic sched_switch tracepoint",
            config.host_sys.join("kernel/btf/vmlinux").display()
        );
    }
    let name = variant.tracepoint;
    let program: &mut TracePoint = bpf
        .program_mut(name)
        .ok_or_else(|| ProbeError::Load(format!("program {name} missing")))?
        .try_into()
        .map_err(|e| ProbeError::Load(error_chain(&e)))?;
    program
        .load()
        .map_err(|e| ProbeError::Load(error_chain(&e)))?;
    program.attach("sched", "sched_switch").map_err(|e| {
        ProbeError::Attach(format!(
            "{} (the classic tracepoint needs tracefs mounted at /sys/kernel/tracing)",
            error_chain(&e)
        ))
    })?;
    Ok("tracepoint")
}

fn attach_btf(bpf: &mut Ebpf, btf: &Btf, name: &str) -> Result<(), String> {
    let program: &mut BtfTracePoint = bpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?
        .try_into()
        .map_err(|e| error_chain(&e))?;
    program
        .load("sched_switch", btf)
        .map_err(|e| error_chain(&e))?;
    program.attach().map_err(|e| error_chain(&e))?;
    Ok(())
}

/// An error and its sources on one line: aya's top-level messages alone
/// ("the BPF_PROG_LOAD syscall failed") hide the errno that explains them.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The object for a reference program, with the accounting program's
/// globals (from `facts`, this kernel's), so that the ladder's rungs read
/// what it reads the way it does.
fn load_reference_object(facts: Option<KernelFacts>) -> Result<Ebpf, ProbeError> {
    let globals = TaskGlobals::of(facts);
    loader_without_kernel_btf()
        .btf(None)
        .override_global(GLOBAL_TASK_PID_OFFSET, &globals.task_pid_offset, true)
        .override_global(GLOBAL_CGROUP_ID_PATH, &globals.cgroup_id_path, true)
        .override_global(GLOBAL_RQ_CLOCK_PATH, &globals.rq_clock_path, true)
        .load(EBPF_OBJECT)
        .map_err(|e| ProbeError::Load(error_chain(&e)))
}

/// Forwards aya-log records from the kernel programs into `tracing`.
pub struct LogToTracing;

impl log::Log for LogToTracing {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ergon::ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "ergon::ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "ergon::ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "ergon::ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "ergon::ebpf", "{message}"),
        }
    }
    fn flush(&self) {}
}

/// A benchmark's reference program, loaded on the same hook as the
/// accounting program so that `bpf_stats` of both can be compared under the
/// same context-switch storm: the empty program (the baseline), or a rung
/// of the ladder (`ergon_ebpf::PROG_LADDER_BTF`).
pub struct ReferenceProgram {
    bpf: Ebpf,
    name: &'static str,
}

impl ReferenceProgram {
    /// The empty program on `hook` ("tp_btf" or "tracepoint").
    pub fn empty(
        hook: &'static str,
        host_sys: &std::path::Path,
    ) -> Result<ReferenceProgram, ProbeError> {
        if hook == "tp_btf" {
            return ReferenceProgram::tp_btf(ergon_ebpf::PROG_EMPTY_TP_BTF, host_sys);
        }
        let facts = kernel_btf::scan(&host_sys.join("kernel/btf/vmlinux")).ok();
        let mut bpf = load_reference_object(facts)?;
        let program: &mut TracePoint = bpf
            .program_mut(ergon_ebpf::PROG_EMPTY_TRACEPOINT)
            .ok_or_else(|| ProbeError::Load("empty tracepoint program missing".into()))?
            .try_into()
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;
        program
            .load()
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;
        program
            .attach("sched", "sched_switch")
            .map_err(|e| ProbeError::Attach(error_chain(&e)))?;
        Ok(ReferenceProgram {
            bpf,
            name: ergon_ebpf::PROG_EMPTY_TRACEPOINT,
        })
    }

    /// The `tp_btf` program `name` of the object, attached on its own.
    pub fn tp_btf(
        name: &'static str,
        host_sys: &std::path::Path,
    ) -> Result<ReferenceProgram, ProbeError> {
        let btf_path = host_sys.join("kernel/btf/vmlinux");
        let facts = kernel_btf::scan(&btf_path).ok();
        let mut bpf = load_reference_object(facts)?;
        let btf = sched_switch_btf(facts, &btf_path).map_err(ProbeError::Load)?;
        attach_btf(&mut bpf, &btf, name).map_err(ProbeError::Attach)?;
        Ok(ReferenceProgram { bpf, name })
    }

    /// `(run time, runs)` from the kernel's `bpf_stats`.
    pub fn stats(&self) -> Option<(std::time::Duration, u64)> {
        let info = match self.bpf.program(self.name)? {
            aya::programs::Program::BtfTracePoint(p) => p.info().ok()?,
            aya::programs::Program::TracePoint(p) => p.info().ok()?,
            _ => return None,
        };
        Some((info.run_time(), info.run_count()))
    }
}
