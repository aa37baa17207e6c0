//! Fixtures on the real machine, shared by the exporter's tests and the
//! deployment tests: real cgroups, busy child processes, a fake powercap
//! tree, a loopback Kubernetes API, a real Prometheus, the exporter itself.
//!
//! Everything created here is removed by a guard's `Drop`, so a failing
//! assertion still leaves the machine clean.
pub mod kube_api;
pub mod kubelet;
pub mod pods;
pub mod prometheus;
pub mod tls;

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Tests that measure CPU shares must not run beside each other on a
/// 2-core machine.
pub fn cpu_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The machine's cgroup v2 mount.
pub fn cgroup2_root() -> PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("cgroup.controllers").exists())
        .expect("tests need a cgroup v2 hierarchy (unified or hybrid)")
}

/// The kubelet cgroup root the fixtures' pods sit under (`CgroupGuard::pod`,
/// `pod_shaped`): a test slice, never the host's real `/kubepods*`. The
/// exporter counts pods only under the kubelet's root, so a test that wants
/// its fixtures named as pods passes [`kubelet_cgroup_root_arg`].
pub const KUBELET_CGROUP_ROOT: &str = "/ergontest.slice";

/// `--kubelet-cgroup-root=` for the fixtures' pods.
pub fn kubelet_cgroup_root_arg() -> String {
    format!("--kubelet-cgroup-root={KUBELET_CGROUP_ROOT}")
}

/// A cgroup directory (and its missing parents) that is removed on drop.
pub struct CgroupGuard {
    pub path: PathBuf,
    /// The topmost directory of `relative` (e.g. `ergontest.slice`): parents
    /// up to it are removed by the last guard that leaves them empty.
    top: Option<PathBuf>,
}

impl CgroupGuard {
    /// Creates `relative` (and its missing parents) under the cgroup2 root.
    pub fn create(relative: &str) -> CgroupGuard {
        let root = cgroup2_root();
        let path = root.join(relative.trim_start_matches('/'));
        let top = relative
            .split('/')
            .find(|p| !p.is_empty())
            .map(|first| root.join(first));
        // Another guard may remove an emptied shared parent at the same
        // moment: try again.
        let mut attempt = 0;
        while let Err(e) = std::fs::create_dir_all(&path) {
            attempt += 1;
            if attempt == 20 {
                panic!("creating cgroup {}: {e}", path.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        CgroupGuard { path, top }
    }

    /// A pod-shaped cgroup (systemd driver, containerd) with a unique name.
    pub fn pod_shaped(tag: &str) -> CgroupGuard {
        let uid = unique_uid(tag);
        let id = format!("{:0>64}", format!("{:x}", unique_number()));
        CgroupGuard::create(&format!(
            "ergontest.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        ))
    }

    /// The cgroup v2 id, as `bpf_get_current_cgroup_id` returns it.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().ino()
    }

    /// CPU time the kernel charged the cgroup (`usage_usec` of its
    /// `cpu.stat`): what a probe must count for it, without the time its
    /// processes spent before they joined.
    pub fn usage_usec(&self) -> u64 {
        let stat = std::fs::read_to_string(self.path.join("cpu.stat")).unwrap();
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no usage_usec in {}: {stat}", self.path.display()))
    }

    pub fn relative(&self) -> String {
        self.path
            .strip_prefix(cgroup2_root())
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// Removes the directories now (children first); idempotent.
    pub fn remove(&mut self) {
        let Some(top) = self.top.take() else {
            return;
        };
        // Processes may take a moment to leave after being reaped.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Shared parents up to `top`: the last guard out removes them; one
        // still holding another guard's cgroup is left to that guard.
        let mut dir = self.path.parent();
        while let Some(parent) = dir {
            if !parent.starts_with(&top) || std::fs::remove_dir(parent).is_err() {
                break;
            }
            dir = parent.parent();
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        self.remove();
    }
}

fn unique_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (std::process::id() as u64) << 20 | NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn unique_uid(tag: &str) -> String {
    let n = unique_number();
    let tag: String = tag
        .bytes()
        .map(|b| format!("{:x}", b % 16))
        .take(4)
        .collect();
    format!("{:08x}-{tag:0>4}-4000-8000-{:012x}", n as u32, n)
}

/// For a `pre_exec` hook: moves the child into `cgroup` before it execs,
/// so none of its CPU time lands elsewhere. The returned function only
/// opens, writes and closes (async-signal-safe, no allocation).
pub fn cgroup_joiner(cgroup: &Path) -> impl Fn() -> std::io::Result<()> + Send + Sync + 'static {
    let procs = CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
    move || {
        // SAFETY: a NUL-terminated path and a one-byte buffer.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A busy-looping child started directly inside a cgroup (it joins before
/// exec, so none of its CPU time lands elsewhere). Killed on drop.
pub struct BusyChild {
    child: Option<Child>,
}

impl BusyChild {
    pub fn spawn_in(cgroup: &Path) -> BusyChild {
        BusyChild::spawn(cgroup, None, "while :; do :; done")
    }

    /// A child running `script` (under `/bin/sh`) instead of a busy loop,
    /// e.g. `exec sleep 3600` to keep a steady pod's cgroup populated.
    pub fn spawn_script_in(cgroup: &Path, script: &str) -> BusyChild {
        BusyChild::spawn(cgroup, None, script)
    }

    /// Like [`BusyChild::spawn_in`], pinned to one CPU: busy children that
    /// share one run queue get equal shares, whatever else the machine runs.
    pub fn spawn_pinned(cgroup: &Path, cpu: usize) -> BusyChild {
        BusyChild::spawn(cgroup, Some(cpu), "while :; do :; done")
    }

    fn spawn(cgroup: &Path, cpu: Option<usize>, script: &str) -> BusyChild {
        // SAFETY: cpu_set_t is plain data.
        let affinity = cpu.map(|cpu| unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            set
        });
        let join = cgroup_joiner(cgroup);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        // SAFETY: only async-signal-safe calls (open, write, close,
        // sched_setaffinity) run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                join()?;
                if let Some(set) = &affinity
                    && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        BusyChild {
            child: Some(cmd.spawn().expect("spawning a busy child")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Kills and reaps the child; returns the CPU time the kernel charged it.
    pub fn stop(mut self) -> Duration {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Duration {
        let Some(child) = self.child.take() else {
            return Duration::ZERO;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain syscalls on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::wait4(pid, &mut status, 0, &mut usage);
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            tv(usage.ru_utime) + tv(usage.ru_stime)
        }
    }
}

impl Drop for BusyChild {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Forces a context switch on every online CPU, so that the slice running
/// there is closed and accounted by the probe.
pub fn flush_cpus() {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    for cpu in 0..cpus {
        std::thread::spawn(move || {
            // SAFETY: cpu_set_t is plain data; pinning our own thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            std::thread::sleep(Duration::from_millis(2));
        })
        .join()
        .unwrap();
    }
}

/// Relative difference `|a - b| / b`.
pub fn relative_error(measured: f64, expected: f64) -> f64 {
    (measured - expected).abs() / expected
}

impl CgroupGuard {
    /// A pod-shaped cgroup (systemd driver, containerd) for a given pod uid
    /// and container id, as the kubelet would create it.
    pub fn pod(uid: &str, container_id: &str) -> CgroupGuard {
        CgroupGuard::create(&format!(
            "ergontest.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
            uid.replace('-', "_")
        ))
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET on loopback; `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A running `ergon`, killed on drop.
pub struct ExporterProcess {
    pub child: Child,
    pub port: u16,
    /// The state directory given to an exporter whose arguments chose none,
    /// so tests never share (or leave behind) /var/lib/ergon.
    _state_dir: Option<tempfile::TempDir>,
}

impl ExporterProcess {
    /// Starts the exporter binary `ergon` on a free port and waits until
    /// `/readyz` answers. Without `--checkpoint`, `--state-dir` or
    /// `--no-checkpoint` in `args`, it gets a temporary state directory of
    /// its own, removed on drop.
    pub fn start(ergon: &Path, args: &[String]) -> ExporterProcess {
        let port = free_port();
        let chooses_state = args.iter().any(|arg| {
            ["--checkpoint", "--state-dir", "--no-checkpoint"]
                .iter()
                .any(|flag| arg.starts_with(flag))
        });
        let state_dir =
            (!chooses_state).then(|| tempfile::tempdir().expect("a temporary state directory"));
        let mut command = Command::new(ergon);
        if let Some(dir) = &state_dir {
            command.arg(format!("--state-dir={}", dir.path().display()));
        }
        let child = command
            .arg(format!("--listen=127.0.0.1:{port}"))
            .args(args)
            .env("NO_COLOR", "1")
            // Warnings and errors only: they are what explains a failure.
            .env("ERGON_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting ergon");
        let exporter = ExporterProcess {
            child,
            port,
            _state_dir: state_dir,
        };
        for _ in 0..300 {
            if let Some(reply) = http_get(port, "/readyz")
                && reply.starts_with("HTTP/1.1 200")
            {
                return exporter;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ergon did not become ready on port {port}");
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text())
    }

    /// The body of a `/metrics` scrape.
    pub fn metrics_text(&self) -> String {
        let text = http_get(self.port, "/metrics").expect("scraping /metrics");
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }

    /// Scrapes until `check` holds (15 s at most), or fails with the last
    /// scrape.
    pub fn eventually(&self, what: &str, check: impl Fn(&Metrics) -> bool) -> Metrics {
        for _ in 0..150 {
            let metrics = self.metrics();
            if check(&metrics) {
                return metrics;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{what}: not reached; last scrape: {:?}",
            self.metrics().samples
        );
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ExporterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parsed Prometheus text exposition (names, labels, values).
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = std::collections::BTreeMap::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let mut end = 0;
                let bytes = after.as_bytes();
                while end < bytes.len()
                    && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\'))
                {
                    end += 1;
                }
                map.insert(
                    key.trim_start_matches(',').to_owned(),
                    after[..end].to_owned(),
                );
                rest = &after[(end + 1).min(after.len())..];
            }
            samples.push((name.to_owned(), map, value));
        }
        Metrics { samples }
    }

    /// Sum of `name` over the samples whose labels include all of `matching`.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.select(name, matching).map(|(_, v)| v).sum()
    }

    pub fn select<'a>(
        &'a self,
        name: &'a str,
        matching: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a std::collections::BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, labels, _)| {
                n == name
                    && matching
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, labels, value)| (labels, *value))
    }
}

/// A powercap tree with one package zone whose `energy_uj` a thread advances
/// at a fixed power, written atomically (rename) like a counter would tick.
pub struct FakeRapl {
    pub host_sys: tempfile::TempDir,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// µJ added on top of the steady power ([`FakeRapl::jump`]).
    jumped_uj: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl FakeRapl {
    pub fn start(watts: f64) -> FakeRapl {
        use std::sync::atomic::Ordering;
        let host_sys = tempfile::tempdir().unwrap();
        let zone = host_sys.path().join("class/powercap/intel-rapl:0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("name"), "package-0\n").unwrap();
        std::fs::write(zone.join("max_energy_range_uj"), "262143328850\n").unwrap();
        std::fs::write(zone.join("energy_uj"), format!("{:020}\n", 1_000_000)).unwrap();
        // The probe still needs the kernel's BTF and tracefs under host-sys.
        std::os::unix::fs::symlink("/sys/kernel", host_sys.path().join("kernel")).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let jumped_uj = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = {
            let stop = stop.clone();
            let jumped_uj = jumped_uj.clone();
            let zone = zone.clone();
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                // Rewritten in place with one fixed-width pwrite, as a sysfs
                // attribute changes: readers keep their open file.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(zone.join("energy_uj"))
                    .unwrap();
                // The tests beside it run more busy loops than there are
                // CPUs: at the highest priority the counter keeps up with
                // the clock, as a real meter's does, instead of lagging by
                // a scheduler slice that would read as a power change.
                // SAFETY: setpriority on this thread only.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -20);
                }
                let start = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let uj = 1_000_000
                        + (watts * 1e6 * start.elapsed().as_secs_f64()) as u64
                        + jumped_uj.load(Ordering::Relaxed);
                    file.write_all_at(format!("{uj:020}\n").as_bytes(), 0)
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        FakeRapl {
            host_sys,
            stop,
            jumped_uj,
            ticker: Some(ticker),
        }
    }

    /// Make the counter jump forward by `microjoules` at once (on top of the
    /// steady power), as a broken or hostile counter might.
    pub fn jump(&self, microjoules: u64) {
        self.jumped_uj
            .fetch_add(microjoules, std::sync::atomic::Ordering::Relaxed);
    }

    /// The zone's directory, for tests that add files (constraints) to it.
    pub fn zone_dir(&self) -> std::path::PathBuf {
        self.host_sys.path().join("class/powercap/intel-rapl:0")
    }

    pub fn host_sys_arg(&self) -> String {
        format!("--host-sys={}", self.host_sys.path().display())
    }
}

impl Drop for FakeRapl {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

/// A process whose stderr is read line by line on a thread; killed and
/// reaped on drop, also when an assertion fails.
pub struct LoggedChild {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    pub log: Vec<String>,
}

impl LoggedChild {
    /// Starts `command` with stderr piped (stdout discarded).
    pub fn spawn(command: &mut Command) -> LoggedChild {
        use std::io::{BufRead, BufReader};
        let mut child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LoggedChild {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first line containing `needle`, waiting at most `timeout` for
    /// each line; panics with the log so far when none comes.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        loop {
            match self.lines.recv_timeout(timeout) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a counter is one the checkpoint carries across an exporter
/// restart: the accounting (energy, CPU time, residual, overflow). The
/// exporter's own health counters (scrapes served, readings rejected,
/// checkpoints set aside, the kernel's statistics of the loaded program)
/// count one process's life, as `process_cpu_seconds_total` does, and start
/// again with the new process.
pub fn persisted_counter(name: &str) -> bool {
    name.ends_with("_total")
        && [
            "ergon_node_",
            "ergon_pod_",
            "ergon_container_",
            "ergon_system_",
            "ergon_process_",
            "ergon_attribution_residual_",
            "ergon_probe_overflow_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}
