//! The fallback probe: samples cgroup v2 `cpu.stat` and `/proc/stat`.
//!
//! A cgroup's `usage_usec` includes its descendants, while the eBPF probe
//! counts only tasks directly in a cgroup. To produce the same shape this
//! probe keeps, per sample, each cgroup's *exclusive* delta: its usage delta
//! minus its live children's deltas. A child removed between two samples has
//! its last slice folded into the parent by the kernel, so that slice lands on
//! the parent here: visible, never lost, never counted twice.
//!
//! Only cgroup v2 is read: its `cpu.stat` exists in every cgroup whether or
//! not the cpu controller is enabled (the hybrid test machines rely on that).
//!
//! One cgroup that cannot be read (`EACCES`, a path longer than `PATH_MAX`,
//! a `cpu.stat` without `usage_usec`) is skipped with its subtree, never the
//! whole sample: its usage is in its parent's, so it lands on the parent,
//! neither lost nor counted twice; when it becomes readable again it starts
//! from a fresh baseline for the same reason. Each skip is counted in
//! `ergon_probe_skipped_total{kind,reason}` and the first of each kind and
//! reason is logged with its path. Only the root cgroup and `/proc/stat` are
//! required. Processes (`--per-process`) that cannot be read are skipped and
//! counted the same way, and a process that has exited leaves the probe's
//! tables at the next sample: a node's pid churn must not grow them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{CgroupCounters, ProbeConfig, ProbeError, ProbeInfo, ProcessUsage, UsageSnapshot};

pub struct ProcfsProbe {
    info: ProbeInfo,
    cgroup_root: PathBuf,
    host_proc: PathBuf,
    per_process: bool,
    ns_per_tick: u64,
    /// Last `usage_usec` (in ns) seen per cgroup id.
    last_usage: HashMap<u64, u64>,
    cumulative: HashMap<u64, CgroupCounters>,
    cpu_baseline: Option<(u64, u64)>,
    process_baseline: HashMap<u32, u64>,
    processes: HashMap<u32, ProcessUsage>,
    first_sample_done: bool,
    process_baselines_taken: bool,
    /// Cgroups skipped at the previous sample, by path: baselined afresh
    /// when readable again (their usage meanwhile went to the parent).
    skipped_paths: HashSet<PathBuf>,
    skipped: BTreeMap<(&'static str, &'static str), u64>,
}

/// A cgroup or process left out of a sample.
struct Skip {
    kind: &'static str,
    path: PathBuf,
    error: ProbeError,
}

impl Skip {
    /// `permission`, `name_too_long`, `unparsable` or `io`.
    fn reason(&self) -> &'static str {
        match &self.error {
            ProbeError::Parse { .. } => "unparsable",
            ProbeError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => "permission",
                Some(libc::ENAMETOOLONG) => "name_too_long",
                _ => "io",
            },
            _ => "io",
        }
    }
}

struct CgroupReading {
    id: u64,
    parent: Option<u64>,
    usage_ns: u64,
    path: PathBuf,
}

impl ProcfsProbe {
    pub fn start(
        config: &ProbeConfig,
        fallback_reason: Option<String>,
    ) -> Result<Self, ProbeError> {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as u64 } else { 100 };
        let mut probe = ProcfsProbe {
            info: ProbeInfo {
                mode: "procfs",
                hook: "none",
                pmu: "none",
                reads: "none",
                fallback_reason,
            },
            cgroup_root: config.cgroup_root.clone(),
            host_proc: config.host_proc.clone(),
            per_process: config.per_process,
            ns_per_tick: 1_000_000_000 / ticks,
            last_usage: HashMap::new(),
            cumulative: HashMap::new(),
            cpu_baseline: None,
            process_baseline: HashMap::new(),
            processes: HashMap::new(),
            first_sample_done: false,
            process_baselines_taken: false,
            skipped_paths: HashSet::new(),
            skipped: BTreeMap::new(),
        };
        let stat = probe.cgroup_root.join("cpu.stat");
        if !stat.exists() {
            return Err(ProbeError::Io {
                path: stat,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no cgroup v2 hierarchy here: point --cgroup-root at the cgroup2 mount",
                ),
            });
        }
        probe.sample()?;
        tracing::info!("procfs probe started on {}", probe.cgroup_root.display());
        Ok(probe)
    }

    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    pub fn sample(&mut self) -> Result<UsageSnapshot, ProbeError> {
        let mut readings = Vec::new();
        let mut skips = Vec::new();
        walk(&self.cgroup_root, None, &mut readings, &mut skips)?;

        let mut deltas: HashMap<u64, i128> = HashMap::with_capacity(readings.len());
        for r in &readings {
            let delta = match self.last_usage.get(&r.id) {
                Some(&prev) => r.usage_ns as i128 - prev as i128,
                // Readable again after it (or an ancestor) was skipped: its
                // usage meanwhile is in the parent's already.
                None if self.skipped_paths.iter().any(|p| r.path.starts_with(p)) => 0,
                // A cgroup created since the last sample: all of its usage is new.
                None if self.first_sample_done => r.usage_ns as i128,
                None => 0,
            };
            deltas.insert(r.id, delta);
        }
        let mut exclusive = deltas.clone();
        for r in &readings {
            if let Some(parent) = r.parent
                && let Some(value) = exclusive.get_mut(&parent)
            {
                *value -= deltas[&r.id];
            }
        }
        self.last_usage.clear();
        for r in &readings {
            self.last_usage.insert(r.id, r.usage_ns);
            let counted = self.cumulative.entry(r.id).or_default();
            // Children and parent are not read atomically: a few µs of skew
            // can make the difference negative; it is not usage.
            let slice = exclusive[&r.id].max(0) as u64;
            counted.cpu_ns = counted.cpu_ns.saturating_add(slice);
        }
        self.first_sample_done = true;
        self.skipped_paths = skips.iter().map(|skip| skip.path.clone()).collect();
        for skip in skips {
            self.count_skip(skip);
        }

        let (idle_ns, busy_ns) = self.read_cpu_times()?;
        let (base_idle, base_busy) = *self.cpu_baseline.get_or_insert((idle_ns, busy_ns));
        if self.per_process {
            self.read_processes();
        }
        Ok(UsageSnapshot {
            cgroups: self.cumulative.clone(),
            processes: self.processes.clone(),
            idle_ns: idle_ns.saturating_sub(base_idle),
            busy_ns: busy_ns.saturating_sub(base_busy),
            skipped: self.skipped.clone(),
            ..Default::default()
        })
    }

    fn count_skip(&mut self, skip: Skip) {
        let reason = skip.reason();
        let count = self.skipped.entry((skip.kind, reason)).or_default();
        *count += 1;
        // The first of each kind and reason is worth a warning; the rest
        // are in the counter (one unreadable cgroup would warn every interval).
        if *count == 1 {
            tracing::warn!(
                "skipping unreadable {} {} (counted in ergon_probe_skipped_total{{kind=\"{}\",reason=\"{reason}\"}}; \
                 its CPU time stays with its parent cgroup): {}",
                skip.kind,
                skip.path.display(),
                skip.kind,
                skip.error
            );
        } else {
            tracing::debug!(
                "skipping unreadable {} {}: {}",
                skip.kind,
                skip.path.display(),
                skip.error
            );
        }
    }

    pub fn forget(&mut self, cgroup_ids: &[u64], pids: &[u32]) {
        for id in cgroup_ids {
            self.cumulative.remove(id);
        }
        for pid in pids {
            self.processes.remove(pid);
            self.process_baseline.remove(pid);
        }
    }

    /// Idle and busy time of all CPUs from the `cpu` line of `/proc/stat`.
    fn read_cpu_times(&self) -> Result<(u64, u64), ProbeError> {
        let path = self.host_proc.join("stat");
        let text = read(&path)?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or_else(|| ProbeError::Parse {
                path: path.clone(),
                detail: "no aggregate `cpu` line".into(),
            })?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| ProbeError::Parse {
                path: path.clone(),
                detail: format!("`{line}`: {e}"),
            })?;
        if fields.len() < 7 {
            return Err(ProbeError::Parse {
                path,
                detail: format!("`{line}` has fewer than 7 fields"),
            });
        }
        // user nice system idle iowait irq softirq [steal guest guest_nice]:
        // steal is time the hypervisor ran someone else; guest is in user.
        let sum = |indices: &[usize]| {
            indices
                .iter()
                .fold(0u64, |sum, &i| sum.saturating_add(fields[i]))
                .saturating_mul(self.ns_per_tick)
        };
        Ok((sum(&[3, 4]), sum(&[0, 1, 2, 5, 6])))
    }

    /// Reads every process's CPU time. The tables are rebuilt from what
    /// `/proc` lists now, so an exited pid's baseline and labels go with it
    /// (and a reused pid starts from zero, as the new process does).
    fn read_processes(&mut self) {
        let Ok(entries) = fs::read_dir(&self.host_proc) else {
            return;
        };
        let first = !self.process_baselines_taken;
        self.process_baselines_taken = true;
        let mut baselines = HashMap::with_capacity(self.process_baseline.len());
        let mut processes = HashMap::with_capacity(self.processes.len());
        let mut skips = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let stat_path = entry.path().join("stat");
            let text = match fs::read_to_string(&stat_path) {
                Ok(text) => text,
                // Processes exit while we read: a missing file is not an error.
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::NotFound)
                        || e.raw_os_error() == Some(libc::ESRCH) =>
                {
                    continue;
                }
                Err(source) => {
                    skips.push(Skip {
                        kind: "process",
                        path: stat_path.clone(),
                        error: ProbeError::Io {
                            path: stat_path,
                            source,
                        },
                    });
                    continue;
                }
            };
            let Some((comm, ticks)) = parse_pid_stat(&text) else {
                skips.push(Skip {
                    kind: "process",
                    path: stat_path.clone(),
                    error: ProbeError::Parse {
                        path: stat_path,
                        detail: "not the `pid (comm) state ...` line of proc_pid_stat(5)".into(),
                    },
                });
                continue;
            };
            let cpu_ns = ticks.saturating_mul(self.ns_per_tick);
            let base = self
                .process_baseline
                .get(&pid)
                .copied()
                .unwrap_or(if first { cpu_ns } else { 0 });
            baselines.insert(pid, base);
            let cgroup_id =
                crate::workload::cgroup_id_of_pid(&self.host_proc, &self.cgroup_root, pid)
                    .unwrap_or(0);
            processes.insert(
                pid,
                ProcessUsage {
                    counters: CgroupCounters {
                        cpu_ns: cpu_ns.saturating_sub(base),
                        ..Default::default()
                    },
                    cgroup_id,
                    comm,
                },
            );
        }
        self.process_baseline = baselines;
        self.processes = processes;
        for skip in skips {
            self.count_skip(skip);
        }
    }

    /// Processes the probe holds a baseline or usage for (for tests of churn).
    pub fn tracked_processes(&self) -> usize {
        self.process_baseline.len().max(self.processes.len())
    }
}

/// `(comm, utime + stime in ticks)` from `/proc/<pid>/stat`. The comm is in
/// parentheses and may itself contain spaces and parentheses.
fn parse_pid_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.chars().take(15).collect();
    let rest: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    // Host input: a sum past u64::MAX saturates rather than wrapping small.
    Some((comm, utime.saturating_add(stime)))
}

fn read(path: &Path) -> Result<String, ProbeError> {
    fs::read_to_string(path).map_err(|source| ProbeError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Reads `dir` and its subtree into `out`. An unreadable cgroup below the
/// root is skipped with its subtree (see the module docs); the root must be
/// readable.
fn walk(
    dir: &Path,
    parent: Option<u64>,
    out: &mut Vec<CgroupReading>,
    skips: &mut Vec<Skip>,
) -> Result<(), ProbeError> {
    let (id, usage_ns) = match read_cgroup(dir) {
        Ok(Some(reading)) => reading,
        // Removed while we walked.
        Ok(None) if parent.is_some() => return Ok(()),
        Ok(None) => {
            return Err(ProbeError::Io {
                path: dir.to_owned(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Err(error) if parent.is_some() => {
            skips.push(Skip {
                kind: "cgroup",
                path: dir.to_owned(),
                error,
            });
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    out.push(CgroupReading {
        id,
        parent,
        usage_ns,
        path: dir.to_owned(),
    });
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            // Its children's time stays in its own usage: on this cgroup.
            skips.push(Skip {
                kind: "cgroup",
                path: dir.to_owned(),
                error: ProbeError::Io {
                    path: dir.to_owned(),
                    source,
                },
            });
            return Ok(());
        }
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&entry.path(), Some(id), out, skips)?;
        }
    }
    Ok(())
}

/// A cgroup's id and `usage_usec` (in ns); `None` if it is gone.
fn read_cgroup(dir: &Path) -> Result<Option<(u64, u64)>, ProbeError> {
    let io_error = |path: &Path, source| ProbeError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(dir, source)),
    };
    let stat_path = dir.join("cpu.stat");
    let text = match fs::read_to_string(&stat_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(&stat_path, source)),
    };
    let usage_usec = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ProbeError::Parse {
            path: stat_path.clone(),
            detail: "no numeric `usage_usec` line".into(),
        })?;
    Ok(Some((meta.ino(), usage_usec.saturating_mul(1000))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_stat_with_parentheses_in_comm() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_pid_stat(line), Some(("a (b) c".into(), 10)));
    }

    #[test]
    fn garbled_pid_stat_is_rejected() {
        assert_eq!(parse_pid_stat("42 (x) S 1"), None);
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    /// Found writing the `procfs` fuzz target: counters near u64::MAX
    /// overflowed the sums and products (a panic in debug builds, a wrapped,
    /// tiny value in release).
    #[test]
    fn counters_near_u64_max_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let line = format!("42 (x) S 1 42 42 0 -1 4194560 100 0 0 0 {max} 3 0 0 20 0 1 0 100 0 0");
        assert_eq!(parse_pid_stat(&line), Some(("x".into(), max)));

        let root = tempfile::tempdir().unwrap();
        let proc_dir = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cpu.stat"), format!("usage_usec {max}\n")).unwrap();
        fs::write(
            proc_dir.path().join("stat"),
            format!("cpu  {max} {max} 1 {max} {max} 0 0 0 0 0\n"),
        )
        .unwrap();
        fs::create_dir(proc_dir.path().join("42")).unwrap();
        fs::write(proc_dir.path().join("42/stat"), &line).unwrap();
        let config = ProbeConfig {
            cgroup_root: root.path().to_owned(),
            host_proc: proc_dir.path().to_owned(),
            per_process: true,
            ..ProbeConfig::local()
        };
        let mut probe = ProcfsProbe::start(&config, None).unwrap();
        fs::write(root.path().join("cpu.stat"), "usage_usec 0\n").unwrap();
        probe.sample().unwrap();
        fs::write(root.path().join("cpu.stat"), format!("usage_usec {max}\n")).unwrap();
        let snap = probe.sample().unwrap();
        assert!(snap.cgroups.values().all(|c| c.cpu_ns > 0));
    }

    #[test]
    fn exclusive_usage_subtracts_children_from_a_fixture_tree() {
        let root = tempfile::tempdir().unwrap();
        let write = |rel: &str, usec: u64| {
            let dir = root.path().join(rel);
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join("cpu.stat"),
                format!("usage_usec {usec}\nuser_usec 0\n"),
            )
            .unwrap();
        };
        let proc_dir = tempfile::tempdir().unwrap();
        fs::write(proc_dir.path().join("stat"), "cpu  1 0 1 10 0 0 0 0 0 0\n").unwrap();
        write("", 1000);
        write("a", 600);
        write("a/b", 500);
        let config = ProbeConfig {
            cgroup_root: root.path().to_owned(),
            host_proc: proc_dir.path().to_owned(),
            ..ProbeConfig::local()
        };
        let mut probe = ProcfsProbe::start(&config, None).unwrap();
        write("", 2000); // +1000 total
        write("a", 1100); // +500, of which b +300
        write("a/b", 800);
        let snap = probe.sample().unwrap();
        let id = |rel: &str| fs::metadata(root.path().join(rel)).unwrap().ino();
        assert_eq!(snap.cgroups[&id("")].cpu_ns, 500_000);
        assert_eq!(snap.cgroups[&id("a")].cpu_ns, 200_000);
        assert_eq!(snap.cgroups[&id("a/b")].cpu_ns, 300_000);
        // A counter that reads garbage is skipped with its subtree and
        // counted; its time (and b's) lands on the root, the rest goes on.
        fs::write(root.path().join("a/cpu.stat"), "usage_usec lots\n").unwrap();
        write("", 3000); // +1000
        write("a/b", 900); // +100, inside a's +500 that cannot be read
        let snap = probe
            .sample()
            .expect("one bad cgroup does not stop the sample");
        assert_eq!(snap.cgroups[&id("")].cpu_ns, 500_000 + 1_000_000);
        assert_eq!(snap.cgroups[&id("a")].cpu_ns, 200_000);
        assert_eq!(snap.cgroups[&id("a/b")].cpu_ns, 300_000);
        assert_eq!(snap.skipped[&("cgroup", "unparsable")], 1);
        // Readable again: a and b start from fresh baselines, so what the
        // root already took is not counted a second time.
        write("a", 1700);
        write("a/b", 1000);
        let snap = probe.sample().unwrap();
        assert_eq!(snap.cgroups[&id("")].cpu_ns, 1_500_000);
        assert_eq!(snap.cgroups[&id("a")].cpu_ns, 200_000);
        assert_eq!(snap.cgroups[&id("a/b")].cpu_ns, 300_000);
        // And counted from there on.
        write("", 3100);
        write("a", 1760);
        write("a/b", 1050);
        let snap = probe.sample().unwrap();
        assert_eq!(snap.cgroups[&id("")].cpu_ns, 1_540_000);
        assert_eq!(snap.cgroups[&id("a")].cpu_ns, 210_000);
        assert_eq!(snap.cgroups[&id("a/b")].cpu_ns, 350_000);
        assert_eq!(snap.skipped[&("cgroup", "unparsable")], 1);
    }

    fn fixture(root: &Path, proc_dir: &Path, per_process: bool) -> ProbeConfig {
        fs::write(root.join("cpu.stat"), "usage_usec 1000\n").unwrap();
        fs::write(proc_dir.join("stat"), "cpu  1 0 1 10 0 0 0 0 0 0\n").unwrap();
        ProbeConfig {
            cgroup_root: root.to_owned(),
            host_proc: proc_dir.to_owned(),
            per_process,
            ..ProbeConfig::local()
        }
    }

    /// Makes `depth` nested directories named `name`, each with a
    /// `cpu.stat`, below `base`, through directory handles (the full path
    /// may exceed PATH_MAX, which no path-based call accepts).
    fn deep_tree(base: &Path, name: &str, depth: usize) {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &[u8]| std::ffi::CString::new(p).unwrap();
        let name_c = c(name.as_bytes());
        let stat_c = c(b"cpu.stat");
        // SAFETY: plain syscalls on descriptors this function owns.
        unsafe {
            let mut dir = libc::open(c(base.as_os_str().as_bytes()).as_ptr(), libc::O_DIRECTORY);
            assert!(dir >= 0);
            for _ in 0..depth {
                assert_eq!(libc::mkdirat(dir, name_c.as_ptr(), 0o755), 0);
                let next = libc::openat(dir, name_c.as_ptr(), libc::O_DIRECTORY);
                assert!(next >= 0);
                libc::close(dir);
                dir = next;
                let file =
                    libc::openat(dir, stat_c.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
                assert!(file >= 0);
                let text = b"usage_usec 5\n";
                assert_eq!(
                    libc::write(file, text.as_ptr().cast(), text.len()),
                    text.len() as isize
                );
                libc::close(file);
            }
            libc::close(dir);
        }
    }

    /// The reason label of `ergon_probe_skipped_total`: a permission error
    /// (which root on this test machine cannot provoke on a tmpfs) is told
    /// apart from a path too long, a garbled file and any other I/O error.
    #[test]
    fn skips_are_counted_by_the_reason_the_kernel_gave() {
        let skip = |error| Skip {
            kind: "cgroup",
            path: PathBuf::from("/sys/fs/cgroup/x"),
            error,
        };
        let io = |errno| ProbeError::Io {
            path: PathBuf::from("/sys/fs/cgroup/x/cpu.stat"),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert_eq!(skip(io(libc::EACCES)).reason(), "permission");
        assert_eq!(skip(io(libc::EPERM)).reason(), "permission");
        assert_eq!(skip(io(libc::ENAMETOOLONG)).reason(), "name_too_long");
        assert_eq!(skip(io(libc::EIO)).reason(), "io");
        let parse = ProbeError::Parse {
            path: PathBuf::from("/sys/fs/cgroup/x/cpu.stat"),
            detail: "no usage_usec".into(),
        };
        assert_eq!(skip(parse).reason(), "unparsable");
    }

    #[test]
    fn a_path_longer_than_path_max_is_skipped_and_counted() {
        let root = tempfile::tempdir().unwrap();
        let proc_dir = tempfile::tempdir().unwrap();
        let config = fixture(root.path(), proc_dir.path(), false);
        fs::create_dir(root.path().join("healthy")).unwrap();
        fs::write(root.path().join("healthy/cpu.stat"), "usage_usec 10\n").unwrap();
        // 20 levels of 250 bytes: about 5,000 bytes, over PATH_MAX (4096).
        deep_tree(root.path(), &"d".repeat(250), 20);
        let mut probe = ProcfsProbe::start(&config, None).expect("the sample goes on");
        fs::write(root.path().join("healthy/cpu.stat"), "usage_usec 30\n").unwrap();
        let snap = probe.sample().unwrap();
        let healthy = fs::metadata(root.path().join("healthy")).unwrap().ino();
        assert_eq!(snap.cgroups[&healthy].cpu_ns, 20_000);
        // One skip per sample (the start's and this one): the first level
        // too deep, with its subtree.
        assert_eq!(
            snap.skipped[&("cgroup", "name_too_long")],
            2,
            "{:?}",
            snap.skipped
        );
    }

    #[test]
    fn exited_processes_leave_the_probes_tables() {
        let root = tempfile::tempdir().unwrap();
        let proc_dir = tempfile::tempdir().unwrap();
        let config = fixture(root.path(), proc_dir.path(), true);
        let write_pid = |pid: u32| {
            let dir = proc_dir.path().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join("stat"),
                format!("{pid} (worker) S 1 1 1 0 -1 0 0 0 0 0 3 2 0 0 20 0 1 0 1 0 0"),
            )
            .unwrap();
            fs::write(dir.join("cgroup"), "0::/\n").unwrap();
        };
        write_pid(1);
        let mut probe = ProcfsProbe::start(&config, None).unwrap();
        // Pid churn: 2,000 processes that each live for one sample.
        for pid in 100..2_100 {
            write_pid(pid);
            let snap = probe.sample().unwrap();
            assert!(snap.processes.contains_key(&pid));
            fs::remove_dir_all(proc_dir.path().join(pid.to_string())).unwrap();
        }
        let snap = probe.sample().unwrap();
        assert_eq!(snap.processes.len(), 1, "only pid 1 lives");
        assert_eq!(probe.tracked_processes(), 1);
        // A process whose stat is unreadable garbage is skipped and counted.
        write_pid(7);
        fs::write(proc_dir.path().join("7/stat"), "garbage").unwrap();
        let snap = probe.sample().unwrap();
        assert!(!snap.processes.contains_key(&7));
        assert_eq!(snap.skipped[&("process", "unparsable")], 1);
    }
}
