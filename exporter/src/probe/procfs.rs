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

use std::collections::HashMap;
use std::fs;
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
}

struct CgroupReading {
    id: u64,
    parent: Option<u64>,
    usage_ns: u64,
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
        walk(&self.cgroup_root, None, &mut readings)?;

        let mut deltas: HashMap<u64, i128> = HashMap::with_capacity(readings.len());
        for r in &readings {
            let delta = match self.last_usage.get(&r.id) {
                Some(&prev) => r.usage_ns as i128 - prev as i128,
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
            ..Default::default()
        })
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

    fn read_processes(&mut self) {
        let Ok(entries) = fs::read_dir(&self.host_proc) else {
            return;
        };
        let first = self.process_baseline.is_empty() && self.processes.is_empty();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes exit while we read: a missing file is not an error.
            let Some((comm, ticks)) = fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| parse_pid_stat(&s))
            else {
                continue;
            };
            let cpu_ns = ticks.saturating_mul(self.ns_per_tick);
            let base = *self
                .process_baseline
                .entry(pid)
                .or_insert(if first { cpu_ns } else { 0 });
            let cgroup_id = fs::read_to_string(entry.path().join("cgroup"))
                .ok()
                .and_then(|s| {
                    let rel = s
                        .lines()
                        .find_map(|l| l.strip_prefix("0::"))?
                        .trim()
                        .to_owned();
                    fs::metadata(self.cgroup_root.join(rel.trim_start_matches('/'))).ok()
                })
                .map(|m| m.ino())
                .unwrap_or(0);
            let usage = self.processes.entry(pid).or_default();
            usage.counters.cpu_ns = cpu_ns.saturating_sub(base);
            usage.cgroup_id = cgroup_id;
            usage.comm = comm;
        }
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

fn walk(dir: &Path, parent: Option<u64>, out: &mut Vec<CgroupReading>) -> Result<(), ProbeError> {
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        // Removed while we walked.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && parent.is_some() => return Ok(()),
        Err(source) => {
            return Err(ProbeError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let id = meta.ino();
    let stat_path = dir.join("cpu.stat");
    let text = match fs::read_to_string(&stat_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && parent.is_some() => return Ok(()),
        Err(source) => {
            return Err(ProbeError::Io {
                path: stat_path,
                source,
            });
        }
    };
    let usage_usec = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ProbeError::Parse {
            path: stat_path.clone(),
            detail: "no numeric `usage_usec` line".into(),
        })?;
    out.push(CgroupReading {
        id,
        parent,
        usage_ns: usage_usec.saturating_mul(1000),
    });
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&entry.path(), Some(id), out)?;
        }
    }
    Ok(())
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
        // A counter that read garbage is reported with its path.
        fs::write(root.path().join("a/cpu.stat"), "usage_usec lots\n").unwrap();
        let err = probe.sample().unwrap_err().to_string();
        assert!(
            err.contains("a/cpu.stat") && err.contains("usage_usec"),
            "{err}"
        );
    }
}
