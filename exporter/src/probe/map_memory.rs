//! What the kernel maps cost, and how big they may be.
//!
//! Since Linux 5.11 a BPF map's memory is charged to the memory cgroup of the
//! process that creates it: the exporter's pod pays for its maps, inside its
//! memory limit. Per-CPU values are paid once per *possible* CPU, so a map
//! that costs 2.6 MB on a 2-CPU test VM costs ~250 MB on a 192-CPU node, and
//! the pod is OOM-killed (or the load fails with ENOMEM) exactly on the big
//! nodes where energy matters. Three decisions keep the maps inside the
//! chart's limit on any node:
//!
//! - the hash maps are allocated on demand (`BPF_F_NO_PREALLOC`): they cost
//!   what is in them, not their bound (see `exporter-ebpf` for the kernels
//!   where this falls back to preallocation);
//! - per-process counters are kept per *thread* in a plain (not per-CPU)
//!   hash: a thread runs on one CPU at a time, so its value has one writer,
//!   and 32,768 of them cost ~5 MB whatever the CPU count;
//! - the cgroup map's bound is derived from a memory budget
//!   (`--map-memory-budget-mib`) and the possible-CPU count: its worst case
//!   (every entry used) fits the budget, and the bound is lowered, with a
//!   log line, where `--max-cgroups` would not fit. Cgroups beyond the bound
//!   go to the overflow bucket, never lost.
//!
//! [`hash_map_bytes`] mirrors the kernel's own account of a hash map's
//! memory (`htab_map_mem_usage` in `kernel/bpf/hashtab.c`, the `memlock:`
//! line of `/proc/<pid>/fdinfo/<map fd>`), so the bound, the projection
//! `ergon doctor` prints and the figure the kernel reports agree.
//!
//! Before 5.11 the kernel charges maps against `RLIMIT_MEMLOCK` instead:
//! [`memlock_limit_needed`] says how far to raise it.

use std::path::Path;

/// The chart's default budget for kernel map memory, in MiB: with the
/// process's own start-up peak (~30 MiB, BENCHMARKS.md) it stays inside the
/// chart's 64 MiB limit.
pub const DEFAULT_BUDGET_MIB: u64 = 20;

/// The node size the projection of `ergon doctor` is made for besides this
/// node's own: the largest common x86 servers (2 × 96 cores).
pub const BIG_NODE_CPUS: u64 = 192;

/// The smallest cgroup bound the budget may impose; below it the budget is
/// unrealistic and the log says so.
pub const MIN_CGROUP_ENTRIES: u32 = 256;

/// How the hash maps get their memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapAllocation {
    /// On demand on Linux 6.1+ (where tracing programs may allocate at run
    /// time safely), preallocated before; preallocated as well when the
    /// kernel refuses the on-demand programs.
    Auto,
    /// `BPF_F_NO_PREALLOC`: memory follows the entries in use.
    OnDemand,
    /// Every entry allocated at load: the bound's full cost from the start.
    Prealloc,
}

/// The shape of one BPF hash map, as the kernel sizes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashShape {
    pub key_bytes: u64,
    pub value_bytes: u64,
    pub per_cpu: bool,
}

/// `sizeof(struct htab_elem)` on 64-bit kernels, before the key.
const HTAB_ELEM_BYTES: u64 = 48;
/// `sizeof(struct bucket)`: a list head and a lock, padded to 16.
const BUCKET_BYTES: u64 = 16;
/// `sizeof(struct llist_node)`, one per element allocated on demand.
const LLIST_NODE_BYTES: u64 = 8;
/// `sizeof(struct bpf_htab)` on x86_64 Linux 6.18, measured: the kernel's
/// memlock figure of a map minus the formula's rest, the same for a
/// preallocated and an on-demand map. (Kernels before 6.15 also count 8
/// lock ints per possible CPU, 6 KiB on 192 CPUs: below the projection's
/// precision, so left out.)
pub const HTAB_BASE_BYTES: u64 = 896;

fn round8(bytes: u64) -> u64 {
    bytes.div_ceil(8) * 8
}

/// The kernel's memlock figure for a hash map of this shape bounded at
/// `max_entries` and holding `in_use` elements, with `cpus` possible CPUs. A
/// preallocated map's figure does not depend on what is in it.
pub fn hash_map_bytes(
    shape: HashShape,
    max_entries: u64,
    in_use: u64,
    cpus: u64,
    allocation: Allocated,
) -> u64 {
    let value = round8(shape.value_bytes);
    let elem = HTAB_ELEM_BYTES + round8(shape.key_bytes) + if shape.per_cpu { 8 } else { value };
    let buckets = max_entries.max(1).next_power_of_two();
    let mut bytes = HTAB_BASE_BYTES + BUCKET_BYTES * buckets;
    match allocation {
        Allocated::Prealloc => {
            // Non-per-CPU maps keep one spare element per CPU for updates.
            let elems = if shape.per_cpu {
                max_entries
            } else {
                max_entries + cpus
            };
            bytes += elem * elems;
            bytes += if shape.per_cpu {
                value * cpus * max_entries
            } else {
                8 * cpus
            };
        }
        Allocated::OnDemand => {
            bytes += (elem + LLIST_NODE_BYTES) * in_use;
            if shape.per_cpu {
                bytes += (LLIST_NODE_BYTES + 8) * in_use + value * cpus * in_use;
            }
        }
    }
    bytes
}

/// Which allocation a loaded map really has (after [`MapAllocation::Auto`]
/// was decided).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocated {
    OnDemand,
    Prealloc,
}

impl Allocated {
    pub fn name(self) -> &'static str {
        match self {
            Allocated::OnDemand => "on-demand",
            Allocated::Prealloc => "prealloc",
        }
    }
}

/// The cgroup map: per-CPU `u64` cgroup id → `CgroupCounters`.
pub fn cgroup_shape() -> HashShape {
    HashShape {
        key_bytes: 8,
        value_bytes: std::mem::size_of::<ergon_ebpf::CgroupCounters>() as u64,
        per_cpu: true,
    }
}

/// The thread map: `u32` thread id → `ThreadCounters`, one value.
pub fn thread_shape() -> HashShape {
    HashShape {
        key_bytes: 4,
        value_bytes: std::mem::size_of::<ergon_ebpf::ThreadCounters>() as u64,
        per_cpu: false,
    }
}

/// Bounds of the two hash maps, and what they cost when full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapBounds {
    pub cgroups: u32,
    pub threads: u32,
    /// Worst case of both maps (every entry used), in bytes.
    pub full_bytes: u64,
    /// The cgroup bound was lowered from `--max-cgroups` to fit the budget.
    pub cgroups_lowered: bool,
}

/// The largest bounds, up to the configured ones, whose worst case fits
/// `budget_bytes` on a node with `cpus` possible CPUs. The thread map (one
/// value per thread, independent of the CPU count) is served first; the
/// per-CPU cgroup map takes what is left.
pub fn bounds_for_budget(
    max_cgroups: u32,
    max_threads: u32,
    budget_bytes: u64,
    cpus: u64,
    allocation: Allocated,
) -> MapBounds {
    let full = |shape, n: u32| hash_map_bytes(shape, n as u64, n as u64, cpus, allocation);
    let threads_bytes = full(thread_shape(), max_threads);
    let left = budget_bytes.saturating_sub(threads_bytes);
    let fits = |n: u32| full(cgroup_shape(), n) <= left;
    let cgroups = if fits(max_cgroups) {
        max_cgroups
    } else {
        // The cost grows with n; bisect for the largest n that fits.
        let (mut lo, mut hi) = (0u32, max_cgroups);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        lo.max(MIN_CGROUP_ENTRIES.min(max_cgroups))
    };
    MapBounds {
        cgroups,
        threads: max_threads,
        full_bytes: threads_bytes + full(cgroup_shape(), cgroups),
        cgroups_lowered: cgroups < max_cgroups,
    }
}

impl super::ProbeConfig {
    /// The map bounds this configuration gets on a node with `cpus`
    /// possible CPUs; without per-process accounting the thread map keeps
    /// one entry.
    pub fn map_bounds(&self, per_process: bool, cpus: u64, allocation: Allocated) -> MapBounds {
        let threads = if per_process {
            self.max_processes.max(1)
        } else {
            1
        };
        bounds_for_budget(
            self.max_cgroups.max(1),
            threads,
            self.map_memory_budget_bytes,
            cpus,
            allocation,
        )
    }
}

/// Linux release `major.minor` from `osrelease` ("6.18.0-1-amd64").
pub fn kernel_version(osrelease: &str) -> Option<(u32, u32)> {
    let mut parts = osrelease.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge map memory against `RLIMIT_MEMLOCK` (whose
/// default, 64 KiB or 8 MiB, is far below the maps' worst case): the limit
/// to raise the soft limit to, or `None` where nothing needs raising.
pub fn memlock_limit_needed(kernel: (u32, u32), current: u64, needed: u64) -> Option<u64> {
    if kernel >= (5, 11) || current >= needed {
        None
    } else {
        Some(needed)
    }
}

/// Auto allocation: on demand from 6.1, where `bpf_mem_alloc` made run-time
/// allocation in tracing programs safe; before, the verifier warns about it
/// (`WARN_ONCE`, a kernel splat) or, on `PREEMPT_RT`, refuses it.
pub fn auto_allocation(kernel: Option<(u32, u32)>) -> Allocated {
    match kernel {
        Some(version) if version >= (6, 1) => Allocated::OnDemand,
        _ => Allocated::Prealloc,
    }
}

/// One loaded map's memory, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    pub map_id: u32,
    pub bytes: u64,
}

/// `(map_id, memlock)` from the text of `/proc/<pid>/fdinfo/<fd>`; `None`
/// where the fd is not a BPF map.
pub fn parse_fdinfo(text: &str) -> Option<(u32, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let map_id = field("map_id:")?.parse().ok()?;
    let memlock = field("memlock:")?.parse().ok()?;
    Some((map_id, memlock))
}

/// Reads one map fd's entry under `fdinfo` (normally `/proc/self/fdinfo`).
pub fn read_fdinfo(fdinfo: &Path, fd: i32) -> std::io::Result<Option<(u32, u64)>> {
    Ok(parse_fdinfo(&std::fs::read_to_string(
        fdinfo.join(fd.to_string()),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn default_bounds_fit_the_budget_on_a_192_cpu_node_with_per_process() {
        for allocation in [Allocated::OnDemand, Allocated::Prealloc] {
            let bounds = bounds_for_budget(16384, 32768, DEFAULT_BUDGET_MIB * MIB, 192, allocation);
            assert!(bounds.full_bytes <= DEFAULT_BUDGET_MIB * MIB, "{bounds:?}");
            assert!(bounds.cgroups_lowered);
            assert_eq!(
                bounds.threads, 32768,
                "the thread map does not scale with CPUs"
            );
            // Enough for a big node's pods and their churn.
            assert!(bounds.cgroups >= 1500, "{bounds:?}");
            // The largest that fits: one more entry would not.
            let more = bounds.cgroups as u64 + 1;
            let over = hash_map_bytes(thread_shape(), 32768, 32768, 192, allocation)
                + hash_map_bytes(cgroup_shape(), more, more, 192, allocation);
            assert!(over > DEFAULT_BUDGET_MIB * MIB);
        }
    }

    #[test]
    fn small_nodes_keep_the_configured_bound() {
        let bounds = bounds_for_budget(
            16384,
            32768,
            DEFAULT_BUDGET_MIB * MIB,
            2,
            Allocated::OnDemand,
        );
        assert_eq!(bounds.cgroups, 16384);
        assert!(!bounds.cgroups_lowered);
    }

    #[test]
    fn per_cpu_values_scale_with_cpus_and_plain_ones_do_not() {
        let cg = |cpus| hash_map_bytes(cgroup_shape(), 1000, 1000, cpus, Allocated::OnDemand);
        let th = |cpus| hash_map_bytes(thread_shape(), 1000, 1000, cpus, Allocated::OnDemand);
        let value = std::mem::size_of::<ergon_ebpf::CgroupCounters>() as u64;
        assert_eq!(cg(192) - cg(2), 190 * value * 1000);
        // Only the spare elements of a preallocated plain map follow CPUs.
        assert_eq!(th(192), th(2));
    }

    #[test]
    fn an_absurd_budget_still_leaves_a_working_map() {
        let bounds = bounds_for_budget(16384, 1, MIB, 192, Allocated::OnDemand);
        assert_eq!(bounds.cgroups, MIN_CGROUP_ENTRIES);
    }

    #[test]
    fn kernel_versions_and_the_memlock_rule() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(memlock_limit_needed((5, 10), 65536, MIB), Some(MIB));
        assert_eq!(memlock_limit_needed((5, 10), 2 * MIB, MIB), None);
        assert_eq!(memlock_limit_needed((5, 11), 65536, MIB), None);
        assert_eq!(auto_allocation(Some((6, 0))), Allocated::Prealloc);
        assert_eq!(auto_allocation(Some((6, 1))), Allocated::OnDemand);
        assert_eq!(auto_allocation(None), Allocated::Prealloc);
    }

    #[test]
    fn fdinfo_of_a_map_and_of_something_else() {
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1058\nmap_type:\t5\nkey_size:\t8\nvalue_size:\t32\nmax_entries:\t16384\nmap_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t9344\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(parse_fdinfo(map), Some((42, 9344)));
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t2\n"), None);
    }
}
