//! Shared test fixtures: real cgroups, busy child processes, a test lock.
//!
//! Everything created here is removed by a guard's `Drop`, so a failing
//! assertion still leaves the machine clean.
#![allow(dead_code)]

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
    ergon::probe::find_cgroup2_root(Path::new("/sys"))
        .expect("tests need a cgroup v2 hierarchy (unified or hybrid)")
}

/// A cgroup directory (and its missing parents) that is removed on drop.
pub struct CgroupGuard {
    pub path: PathBuf,
    created: Vec<PathBuf>,
}

impl CgroupGuard {
    /// Creates `relative` under the cgroup2 root.
    pub fn create(relative: &str) -> CgroupGuard {
        let root = cgroup2_root();
        let mut created = Vec::new();
        let mut path = root.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
                created.push(path.clone());
            }
        }
        CgroupGuard { path, created }
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

    pub fn relative(&self) -> String {
        self.path
            .strip_prefix(cgroup2_root())
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// Removes the directories now (children first); idempotent.
    pub fn remove(&mut self) {
        while let Some(dir) = self.created.pop() {
            // Processes may take a moment to leave after being reaped.
            for _ in 0..100 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
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

/// A busy-looping child started directly inside a cgroup (it joins before
/// exec, so none of its CPU time lands elsewhere). Killed on drop.
pub struct BusyChild {
    child: Option<Child>,
}

impl BusyChild {
    pub fn spawn_in(cgroup: &Path) -> BusyChild {
        let procs = CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "while :; do :; done"]);
        // SAFETY: only async-signal-safe calls (open, write, close) run
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
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
    let cpus = aya::util::online_cpus().unwrap();
    for cpu in cpus {
        std::thread::spawn(move || {
            // SAFETY: cpu_set_t is plain data; pinning our own thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu as usize, &mut set);
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
