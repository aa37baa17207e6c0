//! Loads, attaches and reads the kernel programs of `exporter-ebpf`.
//!
//! Hook choice: `tp_btf/sched_switch` is the cheaper hook (measured ~105 ns vs
//! ~141 ns per run for the classic tracepoint on the test machines) but needs
//! kernel BTF; without `/sys/kernel/btf/vmlinux` the classic
//! `tracepoint/sched/sched_switch` is used. fentry/kprobes are not needed,
//! which matters on locked-down kernels where they are refused.

use std::os::fd::OwnedFd;

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use ergon_ebpf::{
    CgroupCounters, CpuState, GLOBAL_PER_PROCESS, GLOBAL_PMU_MASK, MAP_CGROUP_OVERFLOW,
    MAP_CGROUPS, MAP_CPU_STATE, MAP_PMU, MAP_PROCESS_OVERFLOW, MAP_PROCESSES, PROG_TP_BTF,
    PROG_TRACEPOINT, ProcessCounters,
};

use super::{
    HookChoice, ProbeConfig, ProbeError, ProbeInfo, ProcessUsage, UsageSnapshot, comm_to_string,
    pmu,
};

/// The compiled kernel object, built by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ergon-ebpf"));

pub struct EbpfProbe {
    info: ProbeInfo,
    // Keeps the programs attached and the maps alive.
    bpf: Ebpf,
    cgroups: PerCpuHashMap<MapData, u64, CgroupCounters>,
    processes: PerCpuHashMap<MapData, u32, ProcessCounters>,
    cgroup_overflow: PerCpuArray<MapData, CgroupCounters>,
    process_overflow: PerCpuArray<MapData, CgroupCounters>,
    cpu_state: PerCpuArray<MapData, CpuState>,
    logger: Option<aya_log::EbpfLogger<LogToTracing>>,
    _pmu_fds: Vec<OwnedFd>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        map,
        detail: e.to_string(),
    }
}

impl EbpfProbe {
    pub fn start(config: &ProbeConfig) -> Result<EbpfProbe, ProbeError> {
        let cpus = aya::util::online_cpus()
            .map_err(|(path, e)| ProbeError::Load(format!("reading {path}: {e}")))?;
        let events = pmu::open(config.pmu, &cpus);
        let mask = events.mask();
        let per_process: u32 = config.per_process.into();
        let max_processes = if config.per_process {
            config.max_processes.max(1)
        } else {
            1
        };

        // The programs read no kernel struct (no CO-RE relocations), so no
        // relocation against kernel BTF is needed. (aya 0.14's
        // `EbpfLoader::new` parses vmlinux BTF all the same: that parse,
        // ~15 MB for a moment, is the exporter's start-up memory peak; see
        // BENCHMARKS.md.)
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(MAP_CGROUPS, config.max_cgroups.max(1))
            .map_max_entries(MAP_PROCESSES, max_processes)
            .override_global(GLOBAL_PER_PROCESS, &per_process, true)
            .override_global(GLOBAL_PMU_MASK, &mask, true)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;

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

        let hook = attach(&mut bpf, config)?;

        let cgroups = take_map(&mut bpf, MAP_CGROUPS)?;
        let processes = take_map(&mut bpf, MAP_PROCESSES)?;
        let cgroup_overflow = take_map(&mut bpf, MAP_CGROUP_OVERFLOW)?;
        let process_overflow = take_map(&mut bpf, MAP_PROCESS_OVERFLOW)?;
        let cpu_state = take_map(&mut bpf, MAP_CPU_STATE)?;

        // Give the memory of the parsed BTF back to the system: it was the
        // start-up peak and is not needed again.
        // SAFETY: malloc_trim only releases free heap pages.
        unsafe { libc::malloc_trim(0) };
        let info = ProbeInfo {
            mode: "ebpf",
            hook,
            pmu: events.kind,
            fallback_reason: None,
        };
        tracing::info!("eBPF probe attached: {info}");
        Ok(EbpfProbe {
            info,
            bpf,
            cgroups,
            processes,
            cgroup_overflow,
            process_overflow,
            cpu_state,
            logger,
            _pmu_fds: pmu_fds,
        })
    }

    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    /// The loaded accounting program's kernel statistics (`run_time_ns`,
    /// `run_cnt`); both stay zero unless `kernel.bpf_stats_enabled` is on.
    pub fn program_stats(&self) -> Option<(std::time::Duration, u64)> {
        let name = match self.info.hook {
            "tp_btf" => PROG_TP_BTF,
            _ => PROG_TRACEPOINT,
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
        for entry in self.processes.iter() {
            let (tgid, per_cpu) = entry.map_err(map_err(MAP_PROCESSES))?;
            let mut usage = ProcessUsage::default();
            for value in per_cpu.iter() {
                usage.counters.add(&value.counters);
                if usage.cgroup_id == 0 && value.cgroup_id != 0 {
                    usage.cgroup_id = value.cgroup_id;
                    usage.comm = comm_to_string(&value.comm);
                }
            }
            snapshot.processes.insert(tgid, usage);
        }
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
        }
        Ok(snapshot)
    }

    pub fn forget(&mut self, cgroup_ids: &[u64], pids: &[u32]) {
        for id in cgroup_ids {
            // A key that is already gone is fine: forgetting is idempotent.
            let _ = self.cgroups.remove(id);
        }
        for pid in pids {
            let _ = self.processes.remove(pid);
        }
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

fn attach(bpf: &mut Ebpf, config: &ProbeConfig) -> Result<&'static str, ProbeError> {
    let btf_path = config.host_sys.join("kernel/btf/vmlinux");
    let try_btf = match config.hook {
        HookChoice::Tracepoint => false,
        HookChoice::TpBtf => true,
        HookChoice::Auto => btf_path.exists(),
    };
    if try_btf {
        let attached = Btf::parse_file(&btf_path, aya::Endianness::default())
            .map_err(|e| format!("parsing {}: {e}", btf_path.display()))
            .and_then(|btf| attach_btf(bpf, &btf));
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
            btf_path.display()
        );
    }
    let program: &mut TracePoint = bpf
        .program_mut(PROG_TRACEPOINT)
        .ok_or_else(|| ProbeError::Load(format!("program {PROG_TRACEPOINT} missing")))?
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

fn attach_btf(bpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    let program: &mut BtfTracePoint = bpf
        .program_mut(PROG_TP_BTF)
        .ok_or_else(|| format!("program {PROG_TP_BTF} missing"))?
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

/// The benchmark's baseline: a program that does nothing, loaded on the same
/// hook as the accounting program, so that `bpf_stats` of both can be
/// compared under the same context-switch storm.
pub struct EmptyProgram {
    bpf: Ebpf,
    name: &'static str,
}

impl EmptyProgram {
    pub fn attach(
        hook: &'static str,
        host_sys: &std::path::Path,
    ) -> Result<EmptyProgram, ProbeError> {
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .load(EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;
        let name = if hook == "tp_btf" {
            let btf = Btf::parse_file(
                host_sys.join("kernel/btf/vmlinux"),
                aya::Endianness::default(),
            )
            .map_err(|e| ProbeError::Load(error_chain(&e)))?;
            let program: &mut BtfTracePoint = bpf
                .program_mut(ergon_ebpf::PROG_EMPTY_TP_BTF)
                .ok_or_else(|| ProbeError::Load("empty tp_btf program missing".into()))?
                .try_into()
                .map_err(|e| ProbeError::Load(error_chain(&e)))?;
            program
                .load("sched_switch", &btf)
                .map_err(|e| ProbeError::Load(error_chain(&e)))?;
            program
                .attach()
                .map_err(|e| ProbeError::Attach(error_chain(&e)))?;
            ergon_ebpf::PROG_EMPTY_TP_BTF
        } else {
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
            ergon_ebpf::PROG_EMPTY_TRACEPOINT
        };
        Ok(EmptyProgram { bpf, name })
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
