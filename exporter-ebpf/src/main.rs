//! Ergon's kernel programs: CPU accounting at every `sched_switch`.
//!
//! At a switch the outgoing task is still `current` (both for `tp_btf` and the
//! classic tracepoint), so the helpers `bpf_get_current_cgroup_id`,
//! `bpf_get_current_pid_tgid` and `bpf_get_current_comm` describe the task
//! whose slice just ended; where the kernel has BTF the programs read the
//! same facts from that task's fields instead (see "Cost" below). The slice
//! is `now - last switch on this CPU`.
//!
//! No value has two writers at once, so plain `+=` is exact without atomics
//! (bpfel has no 64-bit atomic add in aya-ebpf). Cgroups, whose tasks run on
//! many CPUs at once, are counted in per-CPU values that user space sums.
//! Threads are not: a thread runs on one CPU at a time and is switched out
//! by that CPU with preemption off, so its own switch-outs write its value
//! one after another (the scheduler's migration barriers order them, as
//! they order any of the task's own writes). A per-CPU value per thread
//! would cost `CPUs ×` the memory (402 MB for 32,768 processes on 192
//! CPUs); one value per thread costs 32,768 × ~150 bytes on any node.
//! When a bounded map is full the slice goes to that map's overflow bucket,
//! so the totals stay whole. An on-demand element is allocated without
//! sleeping, so an insert can also fail with `ENOMEM` while the map has
//! room (the kernel refills its per-CPU caches asynchronously; a memory
//! cgroup at its limit refuses them): such a cgroup's counts are parked in
//! the CPU's state and inserted at a later switch, or after 100 ms sent to
//! the overflow bucket, and the failure is counted by reason. A CI run
//! under memory pressure once put a cgroup in the overflow bucket as "map
//! full" with 1,800 of 16,384 entries used.
//!
//! Memory: the hash maps are allocated on demand (`BPF_F_NO_PREALLOC`), so
//! they cost what is in them, not their bound times the CPU count; user
//! space also sizes the bounds from a memory budget (see the loader). Since
//! Linux 6.1 (`bpf_mem_alloc`) run-time allocation is safe in tracing
//! programs; older kernels warn about it (`WARN_ONCE`) or, with
//! `PREEMPT_RT`, refuse it, so every program exists twice: on the on-demand
//! maps and on preallocated twins, and the loader picks one pair.
//!
//! Cost (measured with `cargo bench --bench probe_cost`, see BENCHMARKS.md):
//! a helper call costs 25–80 ns on the test VMs (`bpf_ktime_get_ns` the
//! most: a clock source read), a hash lookup ~50–100, a load of data the
//! scheduler has just touched a few. So where the kernel has BTF the
//! programs call no helper at a switch: the time is the run queue's clock
//! (`prev->se.cfs_rq->rq->clock`, updated by `__schedule` just before the
//! tracepoint), the idle check reads `prev->pid`, the cgroup id
//! `prev->cgroups->dfl_cgrp->kn->id` (the path `bpf_get_current_cgroup_id`
//! follows), all at offsets user space found in the kernel's BTF (aya-ebpf
//! has no CO-RE reads) and hands over as `.rodata` constants the verifier
//! folds. `tp_btf` gets `prev` as its argument; the classic tracepoint asks
//! `bpf_get_current_task_btf` for it (the outgoing task is still
//! `current`) and reads the pid from its record. Without BTF, or where the
//! kernel refuses those reads, user space leaves the offsets at zero and
//! the same programs call `bpf_ktime_get_ns`, `bpf_get_current_pid_tgid`
//! and `bpf_get_current_cgroup_id` (the portable path, ~100 ns more).
//! Consecutive slices of one cgroup on a CPU (a task and the idle task
//! taking turns, or several tasks of one pod) are summed in that CPU's
//! state and reach the cgroup map when the CPU switches out a task of
//! another cgroup, or once 1 ms has piled up: the hash lookup is paid once
//! per run of a cgroup, not once per switch. User space therefore sees at
//! most 1 ms of each CPU's time late (until that CPU's next switch-out),
//! never lost and never twice.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{BPF_ANY, BPF_F_CURRENT_CPU, BPF_F_NO_PREALLOC, bpf_perf_event_value},
        cty::c_void,
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
            bpf_get_current_task_btf, bpf_ktime_get_ns, generated::bpf_perf_event_read_value,
        },
        macros::{btf_tracepoint, map, tracepoint},
        maps::{HashMap, PerCpuArray, PerCpuHashMap, PerfEventArray},
        programs::{BtfTracePointContext, TracePointContext},
    };
    use aya_log_ebpf::warn;
    use ergon_ebpf::{
        CgroupCounters, CpuState, PARKED_SLOTS, PARKED_WAIT_NS, ParkedCgroup, ThreadCounters,
    };

    const ON_DEMAND: u32 = BPF_F_NO_PREALLOC as u32;

    /// Sized by user space at load time (`--max-cgroups` and the memory
    /// budget).
    #[map]
    static CGROUPS: PerCpuHashMap<u64, CgroupCounters> =
        PerCpuHashMap::with_max_entries(4096, ON_DEMAND);
    /// Sized by user space at load time (`--max-processes`).
    #[map]
    static THREADS: HashMap<u32, ThreadCounters> = HashMap::with_max_entries(4096, ON_DEMAND);
    /// The preallocated twins (see the module doc).
    #[map]
    static CGROUPS_PREALLOC: PerCpuHashMap<u64, CgroupCounters> =
        PerCpuHashMap::with_max_entries(1, 0);
    #[map]
    static THREADS_PREALLOC: HashMap<u32, ThreadCounters> = HashMap::with_max_entries(1, 0);
    #[map]
    static CGROUP_OVERFLOW: PerCpuArray<CgroupCounters> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static PROCESS_OVERFLOW: PerCpuArray<CgroupCounters> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);
    #[map]
    static PMU_CYCLES: PerfEventArray<u32> = PerfEventArray::new(0);
    #[map]
    static PMU_INSTRUCTIONS: PerfEventArray<u32> = PerfEventArray::new(0);
    #[map]
    static PMU_CACHE_MISSES: PerfEventArray<u32> = PerfEventArray::new(0);

    #[unsafe(no_mangle)]
    static PER_PROCESS: u32 = 0;
    #[unsafe(no_mangle)]
    static PMU_MASK: u32 = 0;
    /// Byte offset of `pid` in the kernel's `struct task_struct`, from its
    /// BTF (aya-ebpf has no CO-RE reads); 0 where user space did not find it.
    #[unsafe(no_mangle)]
    static TASK_PID_OFFSET: u32 = 0;
    /// Byte offsets of `task_struct.cgroups`, `css_set.dfl_cgrp`,
    /// `cgroup.kn` and `kernfs_node.id`: the path
    /// `bpf_get_current_cgroup_id` follows, read directly by the programs
    /// (see `Task`); zeros where user space did not find them.
    #[unsafe(no_mangle)]
    static CGROUP_ID_PATH: [u32; 4] = [0; 4];
    /// Byte offsets of `task_struct.se.cfs_rq` (the two added),
    /// `cfs_rq.rq` and `rq.clock`: the run queue's clock, which the
    /// scheduler has just updated for this switch, read by the programs
    /// instead of calling `bpf_ktime_get_ns`; zeros where user space did
    /// not find them.
    #[unsafe(no_mangle)]
    static RQ_CLOCK_PATH: [u32; 3] = [0; 3];

    /// What piles up in a CPU's state before it is added to the cgroup map.
    const PENDING_FLUSH_NS: u64 = 1_000_000;
    /// `prev_pid` in the classic tracepoint's record
    /// (`/sys/kernel/tracing/events/sched/sched_switch/format`): after the
    /// 8-byte common header and the 16-byte `prev_comm`, on every kernel.
    const TP_PREV_PID: usize = 24;

    /// Whether the task switched out is the idle task (pid 0).
    struct Switch {
        prev_idle: bool,
    }

    /// The task switched out, as a BTF-typed pointer the verifier lets the
    /// program read directly (it checks each load against the kernel's
    /// types and makes it fault-safe). Each read falls back to its helper
    /// where user space left its offsets at zero (no kernel BTF, or
    /// `ProbeConfig::read_task_fields` off); the classic tracepoint then
    /// does not fetch the pointer at all (null).
    #[derive(Clone, Copy)]
    struct Task(*const u8);

    impl Task {
        /// Loads the pointer at byte `at` of `base`.
        #[inline(always)]
        unsafe fn load(base: *const u8, at: u32) -> *const u8 {
            unsafe { core::ptr::read_volatile(base.add(at as usize) as *const *const u8) }
        }

        /// Now, on this CPU's scheduler clock: `prev->se.cfs_rq->rq->clock`,
        /// which `__schedule` updated (`update_rq_clock`) just before it
        /// picked the next task. Three loads of data the scheduler has just
        /// touched, where `bpf_ktime_get_ns` is a helper call and a clock
        /// source read (the ladder priced it at 38–79 ns on the test VM).
        /// Only differences on one CPU are used, and the run queue's clock
        /// is monotonic per CPU, so the slices telescope: a switch whose
        /// clock update was skipped (`RQCF_ACT_SKIP`, after a yield) gives
        /// a slice a little short and the next one as much longer, never a
        /// loss. Like `bpf_ktime_get_ns` it counts interrupt and steal
        /// time in the slice they interrupted.
        #[inline(always)]
        fn now(self) -> u64 {
            let path = [0, 1, 2].map(|i| global(&RQ_CLOCK_PATH[i]));
            if path[0] == 0 {
                return unsafe { bpf_ktime_get_ns() };
            }
            // SAFETY: BTF-typed loads, see `Task`.
            unsafe {
                let rq = Task::load(Task::load(self.0, path[0]), path[1]);
                core::ptr::read_volatile(rq.add(path[2] as usize) as *const u64)
            }
        }

        /// The task's cgroup v2 id: `prev->cgroups->dfl_cgrp->kn->id`, the
        /// path `bpf_get_current_cgroup_id` follows, in four loads.
        #[inline(always)]
        fn cgroup_id(self) -> u64 {
            let path = [0, 1, 2, 3].map(|i| global(&CGROUP_ID_PATH[i]));
            if path[0] == 0 {
                return unsafe { bpf_get_current_cgroup_id() };
            }
            // SAFETY: BTF-typed loads, see `Task`.
            unsafe {
                let css_set = Task::load(self.0, path[0]);
                let cgroup = Task::load(css_set, path[1]);
                let kernfs_node = Task::load(cgroup, path[2]);
                core::ptr::read_volatile(kernfs_node.add(path[3] as usize) as *const u64)
            }
        }

        /// Whether any field is read through the task pointer.
        #[inline(always)]
        fn wanted() -> bool {
            global(&RQ_CLOCK_PATH[0]) != 0 || global(&CGROUP_ID_PATH[0]) != 0
        }

        /// `prev`, the tracepoint's second argument.
        #[inline(always)]
        fn of_btf(ctx: &BtfTracePointContext) -> Task {
            // sched_switch(bool preempt, struct task_struct *prev,
            //              struct task_struct *next, unsigned int prev_state)
            Task(ctx.arg(1))
        }

        /// The classic tracepoint's record holds no pointers, but at a
        /// switch the outgoing task is still `current`: one helper call,
        /// made only where the kernel has BTF for the fields.
        #[inline(always)]
        fn current() -> Task {
            if Task::wanted() {
                Task(unsafe { bpf_get_current_task_btf() } as *const u8)
            } else {
                Task(core::ptr::null())
            }
        }
    }

    #[inline(always)]
    fn btf_switch(task: Task) -> Switch {
        let offset = global(&TASK_PID_OFFSET);
        if offset == 0 {
            return Switch {
                prev_idle: bpf_get_current_pid_tgid() as u32 == 0,
            };
        }
        let pid = unsafe { core::ptr::read_volatile(task.0.add(offset as usize) as *const i32) };
        Switch {
            prev_idle: pid == 0,
        }
    }

    #[inline(always)]
    fn tp_switch(ctx: &TracePointContext) -> Switch {
        // A direct load from the record (the verifier allows it in
        // tracepoint programs); `read_at` would be a helper call.
        let record = aya_ebpf::EbpfContext::as_ptr(ctx) as *const u8;
        let pid = unsafe { core::ptr::read_volatile(record.add(TP_PREV_PID) as *const i32) };
        Switch {
            prev_idle: pid == 0,
        }
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
        let task = Task::of_btf(&ctx);
        account(&ctx, btf_switch(task), task, &CGROUPS, &THREADS);
        0
    }

    #[tracepoint(category = "sched", name = "sched_switch")]
    pub fn sched_switch_tp(ctx: TracePointContext) -> u32 {
        account(&ctx, tp_switch(&ctx), Task::current(), &CGROUPS, &THREADS);
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch_btf_prealloc(ctx: BtfTracePointContext) -> i32 {
        let task = Task::of_btf(&ctx);
        account(
            &ctx,
            btf_switch(task),
            task,
            &CGROUPS_PREALLOC,
            &THREADS_PREALLOC,
        );
        0
    }

    #[tracepoint(category = "sched", name = "sched_switch")]
    pub fn sched_switch_tp_prealloc(ctx: TracePointContext) -> u32 {
        account(
            &ctx,
            tp_switch(&ctx),
            Task::current(),
            &CGROUPS_PREALLOC,
            &THREADS_PREALLOC,
        );
        0
    }

    /// Baselines for the probe-cost benchmark: same hook, no work.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn empty_sched_switch_btf(_ctx: BtfTracePointContext) -> i32 {
        0
    }

    #[tracepoint(category = "sched", name = "sched_switch")]
    pub fn empty_sched_switch_tp(_ctx: TracePointContext) -> u32 {
        0
    }

    // The benchmark's ladder (`probe_cost`): each rung adds one step of
    // `account` to the one before, on the same hook, so that one storm
    // prices every step, with the same globals as the accounting program
    // (so the same clock and cgroup-id reads). Two side rungs price the
    // helpers those reads replace. Their maps are their own: the rungs
    // never touch what the exporter reads.
    #[map]
    static LADDER_CGROUPS: PerCpuHashMap<u64, CgroupCounters> =
        PerCpuHashMap::with_max_entries(1024, ON_DEMAND);
    #[map]
    static LADDER_CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);
    /// Where a rung stores what it computed, so the compiler keeps the work.
    #[unsafe(no_mangle)]
    static mut LADDER_SINK: u64 = 0;

    #[inline(always)]
    fn sink(value: u64) {
        // SAFETY: a plain store into the object's .bss; racing rungs on
        // other CPUs only overwrite a value nobody reads.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(LADDER_SINK), value) };
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_clock_helper_btf(_ctx: BtfTracePointContext) -> i32 {
        sink(unsafe { bpf_ktime_get_ns() });
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_clock_btf(ctx: BtfTracePointContext) -> i32 {
        sink(Task::of_btf(&ctx).now());
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_cgroup_id_helper_btf(ctx: BtfTracePointContext) -> i32 {
        let now = Task::of_btf(&ctx).now();
        sink(now ^ unsafe { bpf_get_current_cgroup_id() });
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_cgroup_id_btf(ctx: BtfTracePointContext) -> i32 {
        let task = Task::of_btf(&ctx);
        sink(task.now() ^ task.cgroup_id());
        0
    }

    #[inline(always)]
    fn ladder_map_update(cgroup_id: u64, slice_ns: u64) {
        let slice = CgroupCounters {
            cpu_ns: slice_ns,
            ..CgroupCounters::default()
        };
        if let Some(counters) = LADDER_CGROUPS.get_ptr_mut(&cgroup_id) {
            unsafe { (*counters).add(&slice) };
        } else {
            let _ = LADDER_CGROUPS.insert(&cgroup_id, &slice, BPF_ANY as u64);
        }
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_map_update_btf(ctx: BtfTracePointContext) -> i32 {
        let task = Task::of_btf(&ctx);
        let now = task.now();
        ladder_map_update(task.cgroup_id(), now & 0xffff);
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn ladder_cpu_state_btf(ctx: BtfTracePointContext) -> i32 {
        let task = Task::of_btf(&ctx);
        let now = task.now();
        let Some(state) = LADDER_CPU_STATE.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: per-CPU slot, preemption off in sched_switch.
        let state = unsafe { &mut *state };
        let last = state.last_switch_ns;
        state.last_switch_ns = now;
        if last == 0 || now < last {
            return 0;
        }
        ladder_map_update(task.cgroup_id(), now - last);
        0
    }

    #[inline(always)]
    fn global(value: &u32) -> u32 {
        // Globals are patched by the loader; a volatile read stops the
        // compiler from folding the compile-time zero.
        unsafe { core::ptr::read_volatile(value) }
    }

    /// Reads counter `index` on this CPU; `None` where no event is installed.
    #[inline(always)]
    fn read_pmu(map: &PerfEventArray<u32>) -> Option<u64> {
        let mut value = bpf_perf_event_value {
            counter: 0,
            enabled: 0,
            running: 0,
        };
        // PerfEventArray is a transparent wrapper of the map definition, so
        // its address is the map pointer the helper wants.
        let map_ptr = map as *const PerfEventArray<u32> as *mut c_void;
        let rc = unsafe {
            bpf_perf_event_read_value(
                map_ptr,
                BPF_F_CURRENT_CPU,
                &mut value,
                core::mem::size_of::<bpf_perf_event_value>() as u32,
            )
        };
        if rc == 0 { Some(value.counter) } else { None }
    }

    /// `E2BIG`: the hash map holds its `max_entries` (on-demand and
    /// preallocated maps alike).
    const E2BIG: i64 = 7;
    const ENOMEM: i64 = 12;

    /// Adds `counts` to `cgroup_id`'s element, creating it if absent; the
    /// kernel's (negative) errno where it could not be created.
    #[inline(always)]
    fn add_to_cgroup(
        cgroups: &PerCpuHashMap<u64, CgroupCounters>,
        cgroup_id: u64,
        counts: &CgroupCounters,
    ) -> Result<(), i64> {
        if let Some(counters) = cgroups.get_ptr_mut(&cgroup_id) {
            unsafe { (*counters).add(counts) };
            Ok(())
        } else {
            // Only this CPU writes its slot of a per-CPU element, so
            // BPF_ANY cannot overwrite another CPU's counts.
            cgroups
                .insert(&cgroup_id, counts, BPF_ANY as u64)
                .map_err(|e| e as i64)
        }
    }

    /// The index into `INSERT_FAILURE_REASONS` of a failed insert's errno.
    #[inline(always)]
    fn failure_reason(e: i64) -> usize {
        if e == -E2BIG {
            0
        } else if e == -ENOMEM {
            1
        } else {
            2
        }
    }

    #[inline(always)]
    fn to_overflow(state: &mut CpuState, counts: &CgroupCounters) {
        state.overflowed_cgroup_keys += 1;
        if let Some(bucket) = CGROUP_OVERFLOW.get_ptr_mut(0) {
            unsafe { (*bucket).add(counts) };
        }
    }

    /// Tries the parked counts again: into the map when their element can
    /// now be allocated, to the overflow bucket when the map is full or
    /// after `PARKED_WAIT_NS`. Runs at every switch while a slot is in
    /// use.
    #[inline(always)]
    fn retry_parked(cgroups: &PerCpuHashMap<u64, CgroupCounters>, state: &mut CpuState, now: u64) {
        let mut i = 0;
        while i < PARKED_SLOTS {
            let slot = state.parked[i];
            if slot.cgroup_id != 0 {
                let (done, to_bucket) = match add_to_cgroup(cgroups, slot.cgroup_id, &slot.counters)
                {
                    Ok(()) => (true, false),
                    Err(e) if e == -E2BIG => {
                        state.cgroup_insert_failures[0] += 1;
                        (true, true)
                    }
                    Err(_) => {
                        let expired = now.wrapping_sub(slot.parked_at_ns) >= PARKED_WAIT_NS;
                        (expired, expired)
                    }
                };
                if done {
                    state.parked[i] = ParkedCgroup::default();
                    state.parked_count = state.parked_count.saturating_sub(1);
                    if to_bucket {
                        to_overflow(state, &slot.counters);
                    }
                }
            }
            i += 1;
        }
    }

    /// Parks `counts` of a cgroup whose element could not be allocated:
    /// in its own slot if it has one, else in a free one. False when every
    /// slot is taken.
    #[inline(always)]
    fn park(state: &mut CpuState, cgroup_id: u64, counts: &CgroupCounters, now: u64) -> bool {
        let mut free = PARKED_SLOTS;
        let mut i = 0;
        while i < PARKED_SLOTS {
            let id = state.parked[i].cgroup_id;
            if id == cgroup_id {
                state.parked[i].counters.add(counts);
                return true;
            }
            if id == 0 && free == PARKED_SLOTS {
                free = i;
            }
            i += 1;
        }
        if free < PARKED_SLOTS {
            state.parked[free] = ParkedCgroup {
                cgroup_id,
                parked_at_ns: now,
                counters: *counts,
            };
            state.parked_count += 1;
            true
        } else {
            false
        }
    }

    /// Adds what piled up in this CPU's state to its cgroup's counters and
    /// empties it. Where the map is full the counts go to the overflow
    /// bucket; where the element could not be allocated (`ENOMEM`: the
    /// kernel allocates without sleeping here) they are parked and tried
    /// again at this CPU's next switches, so a moment's shortage costs no
    /// attribution.
    #[inline(always)]
    fn flush_pending<C: aya_ebpf::EbpfContext>(
        ctx: &C,
        cgroups: &PerCpuHashMap<u64, CgroupCounters>,
        state: &mut CpuState,
        now: u64,
    ) {
        let cgroup_id = state.pending_cgroup_id;
        if cgroup_id == 0 {
            return;
        }
        let pending = state.pending;
        state.pending_cgroup_id = 0;
        state.pending = CgroupCounters::default();
        match add_to_cgroup(cgroups, cgroup_id, &pending) {
            Ok(()) => {}
            Err(e) if e == -E2BIG => {
                if state.cgroup_insert_failures[0] == 0 {
                    warn!(
                        ctx,
                        "cgroup map full: cgroup {} and later new cgroups go to the overflow bucket; raise --max-cgroups",
                        cgroup_id
                    );
                }
                state.cgroup_insert_failures[0] += 1;
                to_overflow(state, &pending);
            }
            Err(e) => {
                // Counted here, logged by user space with the errno.
                state.cgroup_insert_failures[failure_reason(e)] += 1;
                state.last_cgroup_insert_error = e;
                if !park(state, cgroup_id, &pending, now) {
                    to_overflow(state, &pending);
                }
            }
        }
    }

    #[inline(always)]
    fn account<C: aya_ebpf::EbpfContext>(
        ctx: &C,
        switch: Switch,
        task: Task,
        cgroups: &PerCpuHashMap<u64, CgroupCounters>,
        threads: &HashMap<u32, ThreadCounters>,
    ) {
        let now = task.now();
        // A BTF-typed load that faults reads 0. No kernel gives the run
        // queue's clock as 0, but if one did, stamping it would lose the
        // next slice; skipping the stamp folds this slice into the next.
        if now == 0 {
            return;
        }
        let Some(state) = CPU_STATE.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: per-CPU slot, and sched_switch runs with preemption off, so
        // this program is its only writer.
        let state = unsafe { &mut *state };
        let last = state.last_switch_ns;
        state.last_switch_ns = now;

        let mut pmu_delta = [0u64; 3];
        let mask = global(&PMU_MASK);
        if mask != 0 {
            let maps = [&PMU_CYCLES, &PMU_INSTRUCTIONS, &PMU_CACHE_MISSES];
            let mut i = 0;
            while i < 3 {
                if mask & (1 << i) != 0 {
                    if let Some(value) = read_pmu(maps[i]) {
                        if last != 0 {
                            pmu_delta[i] = value.wrapping_sub(state.last_pmu[i]);
                        }
                        state.last_pmu[i] = value;
                    }
                }
                i += 1;
            }
        }

        // The first switch after attaching has no start stamp: nothing to
        // attribute yet.
        if last == 0 || now < last {
            return;
        }
        let slice_ns = now - last;
        // At every switch, the idle task's included: a CPU that goes quiet
        // after a failure resolves its parked counts at its next wake-up.
        if state.parked_count != 0 {
            retry_parked(cgroups, state, now);
        }
        if switch.prev_idle {
            state.idle_ns += slice_ns;
            return;
        }
        state.busy_ns += slice_ns;

        let slice = CgroupCounters {
            cpu_ns: slice_ns,
            cycles: pmu_delta[0],
            instructions: pmu_delta[1],
            cache_misses: pmu_delta[2],
        };
        let cgroup_id = task.cgroup_id();
        // Cgroup ids start at 1 (the root), so 0 means nothing pending.
        if cgroup_id == state.pending_cgroup_id {
            state.pending.add(&slice);
        } else {
            flush_pending(ctx, cgroups, state, now);
            state.pending_cgroup_id = cgroup_id;
            state.pending = slice;
        }
        if state.pending.cpu_ns >= PENDING_FLUSH_NS {
            flush_pending(ctx, cgroups, state, now);
        }

        if global(&PER_PROCESS) != 0 {
            let pid_tgid = bpf_get_current_pid_tgid();
            let tid = pid_tgid as u32;
            let tgid = (pid_tgid >> 32) as u32;
            let known = threads.get_ptr_mut(&tid);
            if let Some(thread) = known
                && unsafe { (*thread).tgid } == tgid
            {
                // A process is forked in its parent's cgroup and under its
                // parent's name, then moves and execs: keep what it ran as
                // last. (Opt-in mode; the comm read costs a few ns.)
                unsafe {
                    (*thread).counters.add(&slice);
                    (*thread).cgroup_id = cgroup_id;
                    if let Ok(comm) = bpf_get_current_comm() {
                        (*thread).comm = comm;
                    }
                }
            } else {
                // New, or a thread id reused by another process before user
                // space retired the dead thread's key: that key's counts up
                // to the last sample are already booked to the old process,
                // so it restarts from this slice.
                let thread = ThreadCounters {
                    counters: slice,
                    cgroup_id,
                    tgid,
                    reserved: 0,
                    comm: bpf_get_current_comm().unwrap_or([0; 16]),
                };
                if let Err(e) = threads.insert(&tid, &thread, BPF_ANY as u64) {
                    state.thread_insert_failures[failure_reason(e as i64)] += 1;
                    state.overflowed_process_keys += 1;
                    if let Some(bucket) = PROCESS_OVERFLOW.get_ptr_mut(0) {
                        unsafe { (*bucket).add(&slice) };
                    }
                }
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs exist only for bpfel-unknown-none; the exporter's build
    // script builds them. A host build of this binary does nothing.
}
