//! Cgroup id → path, by walking the cgroup2 mount.
//!
//! The kernel programs key usage by `bpf_get_current_cgroup_id()`, which is
//! the cgroup's kernfs node id; on 64-bit kernels that is exactly the inode
//! number of the cgroup's directory in the cgroup2 mount (the root cgroup is
//! 1). There is no syscall from id to path, so we walk the mount once, keep
//! an id → path map, and walk again only when an id we do not know shows up.
//! `readdir` already returns each entry's inode (`d_ino`) and type, so a walk
//! costs one `getdents` per cgroup and no `stat`. Each directory is read to
//! its end and closed before any child is opened, so a walk holds one
//! directory handle at a time however wide the tree is: 10,000 sibling
//! cgroups must not need 10,000 descriptors (the DaemonSet's limit may be
//! 1024, or less).
//!
//! Two decisions:
//! - **Rescans are rate-limited.** A burst of new containers would otherwise
//!   cost a walk per unknown id; at most one walk happens per
//!   `min_rescan_interval` (default 1 s, below any sensible collection
//!   interval, so each interval costs at most one walk). An id still unknown
//!   after the walk is `None` until the next one is due.
//! - **Vanished cgroups stay resolvable for `retention`** (default 15 min).
//!   A container that exits leaves its last usage in the maps, read after its
//!   directory is gone; its joules must still be named. Entries whose
//!   directory is gone longer than that are dropped at the next walk.
//!
//! Paths are relative to the configured root (`--cgroup-root`); that root
//! must be the host's cgroup2 mount for paths to name host cgroups (a
//! container's namespaced view would show only its own subtree).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cgroup::{KubeletCgroupRoots, Workload, classify_under};

/// Default for how long a vanished cgroup stays resolvable.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(15 * 60);
/// Default minimum time between two walks triggered by unknown ids.
pub const DEFAULT_MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A cgroup the resolver knows.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedCgroup {
    /// Relative to the cgroup root, starting with `/` (the root is `/`).
    pub path: String,
    pub workload: Workload,
    vanished_at: Option<Instant>,
}

impl ResolvedCgroup {
    /// Whether the directory was missing at the latest walk (the entry is
    /// kept for the retention window).
    pub fn vanished(&self) -> bool {
        self.vanished_at.is_some()
    }
}

/// What a walk found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Cgroup directories found.
    pub cgroups: usize,
    /// Known cgroups newly found missing (kept for the retention window).
    pub vanished: usize,
    /// Cgroups dropped because they were missing longer than the retention.
    pub dropped: usize,
    /// Sub-directories that could not be read (other than vanishing mid-walk).
    pub unreadable: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(
        "cannot read the cgroup root {}: {source}; point --cgroup-root at the host's cgroup2 mount \
         (the line with fstype cgroup2 in /proc/self/mountinfo)",
        root.display()
    )]
    Root { root: PathBuf, source: io::Error },
}

/// Cgroup id → path and workload, cached; see the module docs.
#[derive(Debug)]
pub struct CgroupResolver {
    root: PathBuf,
    by_id: HashMap<u64, ResolvedCgroup>,
    last_walk: Option<Instant>,
    min_rescan_interval: Duration,
    retention: Duration,
    kubelet_roots: KubeletCgroupRoots,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 mount at `root`. Nothing is read until the
    /// first `resolve` or `refresh`.
    pub fn new(root: PathBuf) -> Self {
        CgroupResolver {
            root,
            by_id: HashMap::new(),
            last_walk: None,
            min_rescan_interval: DEFAULT_MIN_RESCAN_INTERVAL,
            retention: DEFAULT_RETENTION,
            kubelet_roots: KubeletCgroupRoots::default(),
        }
    }

    /// Where the kubelet makes pod cgroups (see [`KubeletCgroupRoots`]);
    /// cgroups shaped like pods anywhere else are not pods.
    pub fn with_kubelet_roots(mut self, roots: KubeletCgroupRoots) -> Self {
        self.kubelet_roots = roots;
        self
    }

    pub fn with_min_rescan_interval(mut self, interval: Duration) -> Self {
        self.min_rescan_interval = interval;
        self
    }

    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of cgroups known, vanished ones included.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The cgroup with this id; an unknown id triggers a walk if one is due.
    pub fn resolve(&mut self, cgroup_id: u64) -> Option<&ResolvedCgroup> {
        self.resolve_at(cgroup_id, Instant::now())
    }

    /// [`resolve`](Self::resolve) with an explicit clock, for callers (and
    /// tests) that own time.
    pub fn resolve_at(&mut self, cgroup_id: u64, now: Instant) -> Option<&ResolvedCgroup> {
        if !self.by_id.contains_key(&cgroup_id)
            && self.rescan_due(now)
            && let Err(error) = self.refresh_at(now)
        {
            // Rate-limited by the rescan interval, so this cannot flood.
            tracing::warn!(%error, cgroup_id, "cgroup walk failed");
        }
        self.by_id.get(&cgroup_id)
    }

    /// Walks the mount now, whatever the rate limit says: new cgroups are
    /// added, missing ones marked vanished, expired ones dropped. Call it now
    /// and then (every minute or so) so vanished cgroups are noticed even
    /// when no unknown id forces a walk.
    pub fn refresh(&mut self) -> Result<WalkStats, ResolverError> {
        self.refresh_at(Instant::now())
    }

    pub fn refresh_at(&mut self, now: Instant) -> Result<WalkStats, ResolverError> {
        // Even a failed walk counts against the rate limit: retrying a broken
        // root for every unknown id is the storm the limit exists to stop.
        self.last_walk = Some(now);
        let root_error = |source| ResolverError::Root {
            root: self.root.clone(),
            source,
        };
        let root_id = std::fs::metadata(&self.root).map_err(root_error)?.ino();
        let root_entries = read_subdirectories(&self.root).map_err(root_error)?;

        let mut stats = WalkStats::default();
        let mut seen = HashSet::new();
        self.found(root_id, "/".to_owned(), &mut seen);
        // Directories found but not yet read: paths only, no open handles.
        let mut pending: Vec<PendingDir> = vec![(self.root.clone(), String::new(), root_entries)];
        while let Some((dir, parent, children)) = pending.pop() {
            for (name, cgroup_id) in children {
                let path = format!("{parent}/{}", name.to_string_lossy());
                self.found(cgroup_id, path.clone(), &mut seen);
                let child_dir = dir.join(&name);
                match read_subdirectories(&child_dir) {
                    Ok(grandchildren) if grandchildren.is_empty() => {}
                    Ok(grandchildren) => pending.push((child_dir, path, grandchildren)),
                    // Removed between readdir and here: the next walk sees it gone.
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => stats.unreadable += 1,
                }
            }
        }
        stats.cgroups = seen.len();

        let retention = self.retention;
        self.by_id.retain(|id, cgroup| {
            if seen.contains(id) {
                return true;
            }
            match cgroup.vanished_at {
                None => {
                    cgroup.vanished_at = Some(now);
                    stats.vanished += 1;
                    true
                }
                Some(since) if now.saturating_duration_since(since) < retention => true,
                Some(_) => {
                    stats.dropped += 1;
                    false
                }
            }
        });
        Ok(stats)
    }

    fn found(&mut self, cgroup_id: u64, path: String, seen: &mut HashSet<u64>) {
        seen.insert(cgroup_id);
        match self.by_id.get_mut(&cgroup_id) {
            // Same directory as before (and back, if it had been missed).
            Some(known) if known.path == path => known.vanished_at = None,
            // New, or an id the kernel handed to a new cgroup.
            _ => {
                let workload = classify_under(&path, &self.kubelet_roots);
                self.by_id.insert(
                    cgroup_id,
                    ResolvedCgroup {
                        path,
                        workload,
                        vanished_at: None,
                    },
                );
            }
        }
    }

    fn rescan_due(&self, now: Instant) -> bool {
        self.last_walk
            .is_none_or(|last| now.saturating_duration_since(last) >= self.min_rescan_interval)
    }
}

/// A directory read but not yet descended into: its path, its path
/// relative to the root, and its sub-directories (name and inode).
type PendingDir = (PathBuf, String, Vec<(std::ffi::OsString, u64)>);

/// The sub-directories of `dir` (name and inode, from `readdir` alone),
/// read to the end so the directory is closed before the caller descends.
fn read_subdirectories(dir: &Path) -> io::Result<Vec<(std::ffi::OsString, u64)>> {
    let mut subdirectories = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subdirectories.push((entry.file_name(), entry.ino()));
        }
    }
    Ok(subdirectories)
}

/// The first cgroup2 mount point in a `/proc/<pid>/mountinfo` text, with the
/// kernel's octal escapes (`\040` for a space) undone.
pub fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split(' ').next()?;
        let mount_point = before.split(' ').nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::cgroup::QosClass;

    const UID_SYSTEMD: &str = "1e4b8a3c_5d2f_4a6b_9c8d_7e6f5a4b3c2d";
    const ID: &str = "3f2a9c1b7e6d5c4b3a29180716f5e4d3c2b1a09f8e7d6c5b4a3928170615f4e3";

    fn ino(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    fn pod_tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let scope = root.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        ));
        std::fs::create_dir_all(&scope).unwrap();
        std::fs::create_dir_all(root.path().join("system.slice/containerd.service")).unwrap();
        // Files are no cgroups.
        std::fs::write(root.path().join("system.slice/cgroup.procs"), "").unwrap();
        (root, scope)
    }

    #[test]
    fn resolves_ids_to_paths_and_workloads() {
        let (root, scope) = pod_tree();
        let mut resolver = CgroupResolver::new(root.path().to_path_buf());
        let resolved = resolver
            .resolve(ino(&scope))
            .expect("scope resolves")
            .clone();
        assert!(
            resolved
                .path
                .ends_with(&format!("cri-containerd-{ID}.scope")),
            "{}",
            resolved.path
        );
        assert!(resolved.path.starts_with("/kubepods.slice/"));
        assert!(matches!(
            resolved.workload,
            Workload::Container {
                qos: QosClass::Burstable,
                ..
            }
        ));
        let root_cgroup = resolver.resolve(ino(root.path())).unwrap();
        assert_eq!(root_cgroup.path, "/");
        assert_eq!(
            root_cgroup.workload,
            Workload::System {
                bucket: "kernel".into()
            }
        );
        let service = resolver.resolve(ino(&root.path().join("system.slice/containerd.service")));
        assert_eq!(service.unwrap().path, "/system.slice/containerd.service");
        // 7 directories: root, 4 pod levels, system.slice, containerd.service.
        assert_eq!(resolver.len(), 7);
    }

    #[test]
    fn unknown_ids_rescan_at_most_once_per_interval() {
        let (root, _) = pod_tree();
        let start = Instant::now();
        let mut resolver = CgroupResolver::new(root.path().to_path_buf())
            .with_min_rescan_interval(Duration::from_secs(5));
        assert!(resolver.resolve_at(u64::MAX, start).is_none());
        let new_dir = root.path().join("system.slice/late.service");
        std::fs::create_dir(&new_dir).unwrap();
        // Within the interval: no walk, so the new cgroup is not yet known,
        // however many unknown ids ask.
        for id in 0..100 {
            assert!(
                resolver
                    .resolve_at(u64::MAX - id, start + Duration::from_secs(1))
                    .is_none()
            );
        }
        assert!(
            resolver
                .resolve_at(ino(&new_dir), start + Duration::from_secs(4))
                .is_none()
        );
        // Once the interval has passed, the next unknown id walks.
        let late = resolver.resolve_at(ino(&new_dir), start + Duration::from_secs(5));
        assert_eq!(late.unwrap().path, "/system.slice/late.service");
    }

    #[test]
    fn vanished_cgroups_stay_for_the_retention_window() {
        let (root, scope) = pod_tree();
        let start = Instant::now();
        let retention = Duration::from_secs(900);
        let mut resolver = CgroupResolver::new(root.path().to_path_buf()).with_retention(retention);
        let id = ino(&scope);
        assert!(!resolver.resolve_at(id, start).unwrap().vanished());

        std::fs::remove_dir(&scope).unwrap();
        let stats = resolver
            .refresh_at(start + Duration::from_secs(10))
            .unwrap();
        assert_eq!(stats.vanished, 1);
        let kept = resolver
            .resolve_at(id, start + Duration::from_secs(11))
            .unwrap();
        assert!(kept.vanished());
        assert!(matches!(kept.workload, Workload::Container { .. }));

        let stats = resolver
            .refresh_at(start + Duration::from_secs(10) + retention)
            .unwrap();
        assert_eq!((stats.vanished, stats.dropped), (0, 1));
        assert!(
            resolver
                .resolve_at(id, start + Duration::from_secs(10) + retention)
                .is_none()
        );
    }

    #[test]
    fn a_cgroup_that_comes_back_is_no_longer_vanished() {
        let (root, _) = pod_tree();
        let outside = tempfile::tempdir().unwrap();
        let dir = root.path().join("system.slice/containerd.service");
        let aside = outside.path().join("containerd.service");
        let id = ino(&dir);
        let start = Instant::now();
        let mut resolver = CgroupResolver::new(root.path().to_path_buf());
        resolver.refresh_at(start).unwrap();
        // Out of the tree for one walk (same inode), then back.
        std::fs::rename(&dir, &aside).unwrap();
        resolver.refresh_at(start + Duration::from_secs(1)).unwrap();
        assert!(
            resolver
                .resolve_at(id, start + Duration::from_secs(1))
                .unwrap()
                .vanished()
        );
        std::fs::rename(&aside, &dir).unwrap();
        let stats = resolver.refresh_at(start + Duration::from_secs(2)).unwrap();
        assert_eq!((stats.vanished, stats.dropped), (0, 0));
        let back = resolver
            .resolve_at(id, start + Duration::from_secs(2))
            .unwrap();
        assert_eq!(back.path, "/system.slice/containerd.service");
        assert!(!back.vanished());
    }

    /// The environment variable through which the parent test hands its
    /// tree to the child that runs under the low descriptor limit.
    const WIDE_TREE_ENV: &str = "ERGON_TEST_WIDE_CGROUP_TREE";
    const SIBLINGS: usize = 10_000;

    #[test]
    fn ten_thousand_siblings_resolve_under_256_descriptors() {
        use std::os::unix::process::CommandExt;
        // A walk that kept a handle open per pending sibling runs out of
        // descriptors after about 250 of them (seen: 9,750 unreadable).
        // Every hundredth sibling has a child, which must be reached too.
        let root = tempfile::tempdir().unwrap();
        for i in 0..SIBLINGS {
            std::fs::create_dir(root.path().join(format!("sibling-{i}"))).unwrap();
        }
        for i in (0..SIBLINGS).step_by(100) {
            std::fs::create_dir(root.path().join(format!("sibling-{i}/leaf"))).unwrap();
        }
        // Under emulation (`cargo xtask test` runs these tests for arm64
        // under qemu-user) the test binary is re-run through the same
        // emulator, which the kernel would not find by itself.
        let exe = std::env::current_exe().unwrap();
        let runner = std::env::var("ERGON_TEST_RUNNER").unwrap_or_default();
        let mut runner = runner.split_whitespace();
        let mut child = match runner.next() {
            Some(emulator) => {
                let mut child = std::process::Command::new(emulator);
                child.args(runner).arg(exe);
                child
            }
            None => std::process::Command::new(exe),
        };
        child
            .args([
                "--exact",
                "workload::resolver::tests::wide_tree_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WIDE_TREE_ENV, root.path());
        // SAFETY: setrlimit is async-signal-safe and allocates nothing.
        unsafe {
            child.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: 256,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = child.output().unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{log}");
        assert!(
            log.contains("1 passed"),
            "the child test did not run: {log}"
        );
    }

    /// Run by the test above, in a child process limited to 256 descriptors.
    #[test]
    #[ignore = "run by ten_thousand_siblings_resolve_under_256_descriptors"]
    fn wide_tree_child() {
        let root = PathBuf::from(std::env::var_os(WIDE_TREE_ENV).expect(WIDE_TREE_ENV));
        let mut resolver = CgroupResolver::new(root.clone());
        let stats = resolver.refresh().unwrap();
        assert_eq!(stats.unreadable, 0, "{stats:?}");
        assert_eq!(stats.cgroups, 1 + SIBLINGS + SIBLINGS / 100, "{stats:?}");
        for i in 0..SIBLINGS {
            let sibling = root.join(format!("sibling-{i}"));
            let resolved = resolver
                .resolve(ino(&sibling))
                .expect("every sibling resolves");
            assert_eq!(resolved.path, format!("/sibling-{i}"));
        }
        for i in (0..SIBLINGS).step_by(100) {
            let leaf = root.join(format!("sibling-{i}/leaf"));
            let resolved = resolver.resolve(ino(&leaf)).expect("every leaf resolves");
            assert_eq!(resolved.path, format!("/sibling-{i}/leaf"));
        }
    }

    #[test]
    fn missing_root_is_a_clear_error() {
        let mut resolver = CgroupResolver::new(PathBuf::from("/nonexistent/ergon-cgroup-root"));
        let error = resolver.refresh().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ergon-cgroup-root"), "{error}");
        assert!(error.contains("--cgroup-root"), "{error}");
        // resolve() reports through the log, not a panic.
        assert!(resolver.resolve(1).is_none());
    }

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let escaped = "41 31 0:38 / /host\\040sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_point(escaped),
            Some(PathBuf::from("/host sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_point(&hybrid.lines().take(2).collect::<Vec<_>>().join("\n")),
            None
        );
    }
}
