//! What the benchmarks share: the result lines `cargo xtask bench` reads,
//! CPU time from the kernel, pod-shaped cgroups full of sleeping and waking
//! processes, the release exporter, and clean-up on panic and on Ctrl-C.
//!
//! Decisions:
//! - Cost figures are CPU time the kernel charged (`getrusage`,
//!   `/proc/<pid>/task/*/schedstat`), never wall-clock time: on a shared
//!   2-core machine the wall clock measures the neighbours too. Latency and
//!   throughput are wall clock by nature and are compared against a baseline
//!   taken in the same run.
//! - Every cgroup lives under `ergonbench-<pid>.slice`, so a run never
//!   touches another run's (or the tests') cgroups, and a run that was
//!   killed outright (SIGKILL, so no destructor ran) is swept by the next one.
//! - Child processes get `PR_SET_PDEATHSIG = SIGKILL`, so they die with the
//!   benchmark whatever way it ends. Ctrl-C sets a flag that the waiting
//!   loops turn into a panic, so every guard's `Drop` runs.
//! - Benchmark binaries do nothing unless cargo passes `--bench`:
//!   `cargo test --all-targets` runs `harness = false` benches too, and a
//!   test run must not spend minutes loading probes and starting pods.
#![allow(dead_code)]

pub use ergon_testkit as support;

pub mod cost;
pub mod scrape_load;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use support::CgroupGuard;

/// Prints one figure for `cargo xtask bench`: `result <key> <value>`.
pub fn result(key: &str, value: f64) {
    println!("result {key} {value}");
}

/// True when cargo runs this binary as a benchmark (`cargo bench`), false
/// under `cargo test`, which only checks that it starts.
pub fn benchmarking() -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        eprintln!("not measuring: run with `cargo bench` or `cargo xtask bench`");
    }
    bench
}

/// The start of a benchmark that runs pods and an exporter: serves the
/// child role if this process is one of its children, returns false under
/// `cargo test`, and otherwise makes Ctrl-C unwind through the guards.
pub fn start_measuring() -> bool {
    serve_child_role();
    if !benchmarking() {
        return false;
    }
    unwind_on_interrupt();
    true
}

/// The value of `--name VALUE` or `--name=VALUE` on the command line.
pub fn flag(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

/// `--name` as a number, or `default`; a value that is no number stops the
/// benchmark with a message naming the flag.
pub fn numeric_flag(name: &str, default: u64) -> u64 {
    match flag(name) {
        None => default,
        Some(value) => value.trim_end_matches('s').parse().unwrap_or_else(|_| {
            panic!("{name} takes a whole number (seconds or a count), got {value:?}")
        }),
    }
}

/// The median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "quantile of nothing");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time (user + system) the kernel charged the calling thread.
pub fn thread_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(
        status,
        0,
        "getrusage failed: {}",
        std::io::Error::last_os_error()
    );
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time of `repeat` calls of `step`, per call, in microseconds.
pub fn cpu_us_per_call(repeat: u32, mut step: impl FnMut()) -> f64 {
    let start = thread_cpu_time();
    for _ in 0..repeat {
        step();
    }
    (thread_cpu_time() - start).as_secs_f64() * 1e6 / f64::from(repeat)
}

// ---------------------------------------------------------------- Ctrl-C

/// The signal that interrupted the benchmark (0 while none has), and the
/// process that sent it.
static INTERRUPTED_BY: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED_FROM: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; si_pid
    // is set for signals sent by kill().
    let sender = unsafe { (*info).si_pid() };
    INTERRUPTED_FROM.store(sender, Ordering::Relaxed);
    INTERRUPTED_BY.store(signal, Ordering::Relaxed);
}

/// From now on Ctrl-C (SIGINT) and SIGTERM make [`pause`] and
/// [`check_interrupt`] panic, which unwinds through every guard.
pub fn unwind_on_interrupt() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to atomics (async-signal-safe);
        // an all-zero sigaction with an empty mask is valid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupt() {
    let signal = INTERRUPTED_BY.load(Ordering::Relaxed);
    if signal != 0 {
        let name = if signal == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        let sender = INTERRUPTED_FROM.load(Ordering::Relaxed);
        let command = std::fs::read(format!("/proc/{sender}/cmdline"))
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
            .unwrap_or_else(|_| "gone".into());
        panic!(
            "interrupted by {name} from pid {sender} ({command}): cleaning up the benchmark's cgroups and processes"
        );
    }
}

/// Sleeps `length`, waking every 100 ms to honour Ctrl-C.
pub fn pause(length: Duration) {
    let end = Instant::now() + length;
    loop {
        check_interrupt();
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

// ----------------------------------------------------- child processes

/// Starts `cmd` inside `cgroup` (it joins before exec, so none of its CPU
/// time lands elsewhere) and makes the kernel kill it if the benchmark dies.
/// Call it from the main thread: the death signal follows the thread that
/// forked.
pub fn spawn_in(cgroup: &Path, mut cmd: Command) -> Child {
    let join = support::cgroup_joiner(cgroup);
    // SAFETY: only async-signal-safe calls (prctl, open, write, close) run
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            join()
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?} in {}: {e}", cgroup.display()))
}

/// What a benchmark binary started as one of its own children does
/// (`<bench> --child waker <period_ms> <spin_us>` or `--child spin <spin_us>`).
/// Returns if this process is not such a child.
pub fn serve_child_role() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--child") {
        return;
    }
    let number = |i: usize| -> u64 {
        args.get(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("child role argument {i} missing in {args:?}"))
    };
    match args.get(2).map(String::as_str) {
        Some("waker") => {
            let (period, spin) = (
                Duration::from_millis(number(3)),
                Duration::from_micros(number(4)),
            );
            loop {
                spin_for(spin);
                std::thread::sleep(period);
            }
        }
        Some("spin") => {
            spin_for(Duration::from_micros(number(3)));
            std::process::exit(0);
        }
        other => panic!("unknown child role {other:?}"),
    }
}

fn spin_for(length: Duration) {
    let end = Instant::now() + length;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// A command that re-runs this benchmark binary in a child role.
pub fn child_command(role: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the benchmark's own path"));
    cmd.arg("--child").args(role);
    cmd
}

// ------------------------------------------------------------- cgroups

/// The cgroup v2 mount.
pub fn cgroup_root() -> PathBuf {
    support::cgroup2_root()
}

const SLICE_PREFIX: &str = "ergonbench-";

/// This run's top cgroup, relative to the cgroup root.
fn own_slice() -> String {
    format!("{SLICE_PREFIX}{}.slice", std::process::id())
}

/// Kills whatever runs below `dir` and removes it, children first. Best
/// effort: used by `Drop` and on leftovers.
fn remove_tree(dir: &Path) {
    // cgroup.kill (Linux 5.14) SIGKILLs every process below, atomically.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..200 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("could not remove cgroup {}", dir.display());
}

/// Removes the slices of earlier runs whose process is gone (killed with
/// SIGKILL, so their guards never ran).
fn sweep_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SLICE_PREFIX)
            .and_then(|rest| rest.strip_suffix(".slice"))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("removing the leftover cgroup {name} of an earlier benchmark run");
            remove_tree(&entry.path());
        }
    }
}

/// How one pod's processes behave.
#[derive(Clone, Copy, Debug)]
pub enum PodActivity {
    /// One process wakes every second for 200 µs; the rest sleep.
    Mostly,
    /// One process runs 20 ms of every 100 ms (20 % of a CPU); the rest sleep.
    Busy,
    /// One process runs for 2 ms and exits; the cgroup stays.
    Once,
    /// One process wakes every 4 s for 20 µs (the rest sleep): the cgroup
    /// runs in every 5 s interval at a negligible load, so thousands of
    /// them are live cgroups without being a CPU load of their own.
    Light,
}

/// `pods` pod-shaped cgroups (systemd driver, containerd; one container
/// each) with `processes_per_pod` processes in the container: one active
/// process as `activity` says (the first `busy_pods` pods are
/// [`PodActivity::Busy`]) and `sleep infinity` for the rest. Killed and
/// removed on drop.
pub struct PodSet {
    pods: Vec<Pod>,
    /// Declared after `pods`: the parents are removed after the pods.
    parents: CgroupGuard,
}

struct Pod {
    uid: String,
    processes: Vec<Child>,
    cgroup: CgroupGuard,
}

impl PodSet {
    pub fn start(
        pods: usize,
        processes_per_pod: usize,
        busy_pods: usize,
        activity: PodActivity,
    ) -> PodSet {
        assert!(pods == 0 || processes_per_pod >= 1, "a pod needs a process");
        let root = cgroup_root();
        sweep_leftovers(&root);
        let parents_relative = format!("{}/kubepods.slice/kubepods-burstable.slice", own_slice());
        let parents = CgroupGuard::create(&parents_relative);
        let mut set = PodSet {
            pods: Vec::with_capacity(pods),
            parents,
        };
        for index in 0..pods {
            check_interrupt();
            let uid = support::unique_uid("bnch");
            let container_id = format!(
                "{:0>64x}",
                (u64::from(std::process::id()) << 24) | index as u64
            );
            let cgroup = CgroupGuard::create(&format!(
                "{parents_relative}/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
                uid.replace('-', "_")
            ));
            let activity = if index < busy_pods {
                PodActivity::Busy
            } else {
                activity
            };
            let mut processes = Vec::with_capacity(processes_per_pod);
            let active = match activity {
                PodActivity::Mostly => child_command(&["waker", "1000", "200"]),
                PodActivity::Busy => child_command(&["waker", "80", "20000"]),
                PodActivity::Once => child_command(&["spin", "2000"]),
                PodActivity::Light => child_command(&["waker", "4000", "20"]),
            };
            processes.push(spawn_in(&cgroup.path, active));
            for _ in 1..processes_per_pod {
                let mut sleeper = Command::new("sleep");
                sleeper.arg("infinity");
                processes.push(spawn_in(&cgroup.path, sleeper));
            }
            set.pods.push(Pod {
                uid,
                processes,
                cgroup,
            });
        }
        set
    }

    pub fn uids(&self) -> impl Iterator<Item = &str> {
        self.pods.iter().map(|pod| pod.uid.as_str())
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Waits for processes that exit by themselves ([`PodActivity::Once`]).
    pub fn reap_exited(&mut self) {
        for pod in &mut self.pods {
            pod.processes
                .retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_))));
        }
    }
}

impl Drop for PodSet {
    fn drop(&mut self) {
        let _ = std::fs::write(cgroup_root().join(own_slice()).join("cgroup.kill"), "1");
        for pod in &mut self.pods {
            for child in &mut pod.processes {
                let _ = child.kill();
                let _ = child.wait();
            }
            pod.cgroup.remove();
        }
        self.parents.remove();
    }
}

// ------------------------------------------------------------ exporter

/// The release exporter (`--meter model --interval 5s`, tp_btf probe as
/// detected), killed on drop.
pub struct Exporter {
    process: support::ExporterProcess,
}

/// CPU time of a process, read from outside it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessCpu {
    /// Sum of the threads' `sum_exec_runtime` (`/proc/<pid>/task/*/schedstat`),
    /// nanosecond resolution, live threads only.
    pub threads_ns: u64,
    pub thread_ids: Vec<u32>,
    /// `utime + stime` of `/proc/<pid>/stat` (all threads, exited ones too),
    /// in clock ticks of 10 ms.
    pub stat_ticks: u64,
}

impl ProcessCpu {
    pub fn read(pid: u32) -> ProcessCpu {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let mut thread_ids: Vec<u32> = std::fs::read_dir(proc_dir.join("task"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/task: {e}"))
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        thread_ids.sort_unstable();
        let threads_ns = thread_ids
            .iter()
            .filter_map(|tid| {
                std::fs::read_to_string(proc_dir.join(format!("task/{tid}/schedstat"))).ok()
            })
            .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        let stat = std::fs::read_to_string(proc_dir.join("stat"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, utime 14, stime 15.
        let after_comm = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks =
            |field: usize| -> u64 { fields[field - 3].parse().expect("numeric stat field") };
        ProcessCpu {
            threads_ns,
            thread_ids,
            stat_ticks: ticks(14) + ticks(15),
        }
    }

    /// CPU time from `earlier` to `self`: from the threads' nanosecond
    /// counters where the same threads lived throughout, else from the
    /// 10 ms ticks (an exited thread's time is only there).
    pub fn since(&self, earlier: &ProcessCpu) -> Duration {
        if self.thread_ids == earlier.thread_ids {
            Duration::from_nanos(self.threads_ns - earlier.threads_ns)
        } else {
            eprintln!("threads changed during the window: CPU time from /proc/<pid>/stat ticks");
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
            Duration::from_nanos((self.stat_ticks - earlier.stat_ticks) * 1_000_000_000 / hz)
        }
    }
}

/// Peak and current resident memory of a process, KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("/proc/{pid}/status has no {name}"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

impl Exporter {
    pub fn start() -> Exporter {
        // The pods live under this run's slice, which is their kubelet root.
        let kubelet_root = format!("--kubelet-cgroup-root=/{SLICE_PREFIX}*.slice");
        let args: Vec<String> = [
            "--meter=model",
            "--interval=5s",
            "--log=warn",
            kubelet_root.as_str(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        Exporter {
            process: support::ExporterProcess::start(Path::new(env!("CARGO_BIN_EXE_ergon")), &args),
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn cpu(&self) -> ProcessCpu {
        ProcessCpu::read(self.pid())
    }

    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.pid())
    }

    /// The body of one `/metrics` scrape.
    pub fn scrape(&self) -> String {
        scrape(self.port()).expect("the exporter answers /metrics")
    }

    /// How many of `uids` have a pod energy series. The body's uids are
    /// collected once: looking each uid up in the body took minutes at
    /// thousands of pods.
    pub fn pods_seen<'a>(&self, uids: impl Iterator<Item = &'a str>) -> usize {
        let body = self.scrape();
        let shown: std::collections::HashSet<&str> = body
            .split("pod_uid=\"")
            .skip(1)
            .filter_map(|rest| rest.split_once('"').map(|(uid, _)| uid))
            .collect();
        uids.filter(|uid| shown.contains(uid)).count()
    }

    /// Waits (at most `limit`) until every pod of `pods` has series.
    pub fn wait_for_pods(&self, pods: &PodSet, limit: Duration) {
        let start = Instant::now();
        loop {
            let seen = self.pods_seen(pods.uids());
            if seen == pods.len() {
                eprintln!(
                    "exporter shows all {seen} pods after {:.1?}",
                    start.elapsed()
                );
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "after {limit:?} the exporter shows {seen} of {} pods: the measurement would not be of the intended workload",
                    pods.len()
                );
            }
            pause(Duration::from_millis(500));
        }
    }
}

/// One `GET /metrics` on loopback: the body, or `None` if nothing answered.
pub fn scrape(port: u16) -> Option<String> {
    let reply = support::http_get(port, "/metrics")?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}
