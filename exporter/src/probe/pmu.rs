//! Per-CPU counter events installed into the kernel program's
//! `PERF_EVENT_ARRAY`s, which it reads with `bpf_perf_event_read_value` at
//! every switch.
//!
//! aya's `PerfEventArray` is the output (ring) flavour of that map, so the
//! file descriptors are installed with a direct `BPF_MAP_UPDATE_ELEM`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use perf_event_open_sys as sys;

use super::PmuChoice;

/// The events of one counter slot, one fd per online CPU.
pub(crate) struct CounterSet {
    pub slot: usize,
    pub per_cpu: Vec<(u32, OwnedFd)>,
}

/// What could be opened for `choice`.
pub(crate) struct PmuEvents {
    pub kind: &'static str,
    pub sets: Vec<CounterSet>,
}

impl PmuEvents {
    pub fn mask(&self) -> u32 {
        self.sets.iter().fold(0, |mask, set| mask | (1 << set.slot))
    }
}

fn open_counter(type_: u32, config: u64, cpu: u32) -> io::Result<OwnedFd> {
    let mut attr = sys::bindings::perf_event_attr {
        type_,
        size: std::mem::size_of::<sys::bindings::perf_event_attr>() as u32,
        config,
        ..Default::default()
    };
    // SAFETY: attr is a valid, fully initialised perf_event_attr.
    let fd = unsafe {
        sys::perf_event_open(
            &mut attr,
            -1,
            cpu as i32,
            -1,
            sys::bindings::PERF_FLAG_FD_CLOEXEC as u64,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: perf_event_open returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_on_all(slot: usize, type_: u32, config: u64, cpus: &[u32]) -> io::Result<CounterSet> {
    let per_cpu = cpus
        .iter()
        .map(|&cpu| open_counter(type_, config, cpu).map(|fd| (cpu, fd)))
        .collect::<io::Result<Vec<_>>>()?;
    Ok(CounterSet { slot, per_cpu })
}

/// Opens the counters `choice` asks for. Hardware counters that the CPU (or
/// hypervisor) does not expose are simply absent; that is logged, not fatal.
pub(crate) fn open(choice: PmuChoice, cpus: &[u32]) -> PmuEvents {
    match choice {
        PmuChoice::Off => PmuEvents {
            kind: "none",
            sets: Vec::new(),
        },
        PmuChoice::Software => match open_on_all(
            0,
            sys::bindings::PERF_TYPE_SOFTWARE,
            sys::bindings::PERF_COUNT_SW_CPU_CLOCK as u64,
            cpus,
        ) {
            Ok(set) => PmuEvents {
                kind: "software",
                sets: vec![set],
            },
            Err(err) => {
                tracing::warn!(
                    "software cpu-clock event unavailable ({err}); counting CPU time only"
                );
                PmuEvents {
                    kind: "none",
                    sets: Vec::new(),
                }
            }
        },
        PmuChoice::Auto => {
            let wanted = [
                (0, sys::bindings::PERF_COUNT_HW_CPU_CYCLES),
                (1, sys::bindings::PERF_COUNT_HW_INSTRUCTIONS),
                (2, sys::bindings::PERF_COUNT_HW_CACHE_MISSES),
            ];
            let mut sets = Vec::new();
            for (slot, config) in wanted {
                match open_on_all(slot, sys::bindings::PERF_TYPE_HARDWARE, config as u64, cpus) {
                    Ok(set) => sets.push(set),
                    Err(err) => {
                        tracing::info!(
                            "hardware counter {slot} not available ({err}): no PMU exposed here \
                             (common on VMs); energy is split by CPU time"
                        );
                        break;
                    }
                }
            }
            PmuEvents {
                kind: if sets.is_empty() { "none" } else { "hardware" },
                sets,
            }
        }
    }
}

/// Stores `fd` at index `cpu` of a `PERF_EVENT_ARRAY` map.
pub(crate) fn install(map_fd: impl AsFd, cpu: u32, fd: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct MapUpdate {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key: u32 = cpu;
    let value: u32 = fd.as_raw_fd() as u32;
    let attr = MapUpdate {
        map_fd: map_fd.as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    // SAFETY: attr points at live key/value buffers of the map's sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &attr as *const MapUpdate,
            std::mem::size_of::<MapUpdate>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
