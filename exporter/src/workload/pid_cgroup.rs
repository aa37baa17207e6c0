//! Process → cgroup, from `/proc/<pid>/cgroup`, also from inside a cgroup
//! namespace.
//!
//! The kernel writes the cgroup path in `/proc/<pid>/cgroup` relative to the
//! cgroup namespace root of the process that *reads* the file (see
//! cgroup_namespaces(7)), not of the process it describes. An exporter in a
//! container with its own cgroup namespace (the default for unprivileged
//! containers on cgroup v2) reads `0::/../../kubepods/…` for a host process;
//! joined onto the host's cgroup mount that lands outside it, and GPU energy
//! went to `gpu-unmapped-processes`, per-process cgroup ids to 0.
//!
//! The rule: a path from `/proc/<pid>/cgroup` is relative to *our own*
//! namespace root `R`, so the host path is `R` joined with it, `..` resolved
//! (a path that climbs above the host's root is refused). `R` is found once
//! and cached per cgroup mount (a process's namespace root never changes):
//! our own path `P` in our namespace comes from `/proc/self/cgroup`; if our
//! pid is in `<mount>/P/cgroup.procs` we are in the host's namespace
//! (`R = /`, one read); otherwise the mount is searched for the directory
//! `D` whose `cgroup.procs` holds our pid, and `R` is `D` less `P`.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The cgroup v2 id (the directory's inode in the host's cgroup2 mount at
/// `cgroup_root`) of a live process, `None` if it is gone or its cgroup
/// cannot be placed in that mount.
pub fn cgroup_id_of_pid(host_proc: &Path, cgroup_root: &Path, pid: u32) -> Option<u64> {
    let path = cgroup_path_of_pid(host_proc, cgroup_root, pid)?;
    std::fs::metadata(cgroup_root.join(path.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

/// The host path (relative to `cgroup_root`, starting with `/`) of a live
/// process's cgroup v2.
pub fn cgroup_path_of_pid(host_proc: &Path, cgroup_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(host_proc.join(pid.to_string()).join("cgroup")).ok()?;
    let relative = v2_path(&text)?;
    // Where we are not found in the mount (a fixture tree, a partial mount),
    // a path without `..` is taken as the host's, as it is in the host's
    // namespace; one that climbs cannot be placed.
    let namespace_root = own_namespace_root(cgroup_root)
        .or_else(|| (!relative.contains("..")).then(|| "/".to_owned()))?;
    join_cgroup_paths(&namespace_root, relative)
}

/// The cgroup v2 line's path (`0::<path>`) of a `/proc/<pid>/cgroup` text.
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
}

/// `relative` (which may start with `..`) resolved against the absolute
/// cgroup path `base`; `None` if it climbs above the root.
pub fn join_cgroup_paths(base: &str, relative: &str) -> Option<String> {
    let mut components: Vec<&str> = base.split('/').filter(|c| !c.is_empty()).collect();
    for component in relative.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                components.pop()?;
            }
            name => components.push(name),
        }
    }
    Some(format!("/{}", components.join("/")))
}

/// Mounts whose namespace root is kept: the exporter uses one.
const MAX_CACHED_MOUNTS: usize = 4;

type Found = Option<HashMap<PathBuf, Option<String>>>;
/// The namespace root found per mount, at most [`MAX_CACHED_MOUNTS`].
static FOUND: Mutex<Found> = Mutex::new(None);

/// Our cgroup namespace's root as a path in the host mount at
/// `cgroup_root`, found once per mount (see the module docs).
fn own_namespace_root(cgroup_root: &Path) -> Option<String> {
    let mut found = FOUND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let found = found.get_or_insert_with(HashMap::new);
    if let Some(root) = found.get(cgroup_root) {
        return root.clone();
    }
    // Searched once per mount, found or not: a miss would otherwise walk the
    // whole mount for every process asked about. The exporter has one
    // mount; a caller that makes a new one per run (the fuzzers, tests)
    // must not grow the map without bound, so past a few it starts over.
    let root = search_own_namespace_root(cgroup_root);
    if found.len() >= MAX_CACHED_MOUNTS {
        found.clear();
    }
    found.insert(cgroup_root.to_owned(), root.clone());
    root
}

fn search_own_namespace_root(cgroup_root: &Path) -> Option<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own_path = v2_path(&own)?.to_owned();
    match find_namespace_root(cgroup_root, &own_path, std::process::id()) {
        Ok(Some(root)) => {
            if root != "/" {
                tracing::info!(
                    "in a cgroup namespace rooted at {root} of {}: /proc/<pid>/cgroup paths are \
                     resolved against it",
                    cgroup_root.display()
                );
            }
            Some(root)
        }
        Ok(None) => {
            tracing::warn!(
                "this process (cgroup {own_path} in its namespace) is in no cgroup under {}: \
                 processes seen from another cgroup namespace cannot be tied to cgroups; mount \
                 the host's cgroup2 hierarchy whole (hostPath /sys/fs/cgroup) and pass it with \
                 --cgroup-root",
                cgroup_root.display()
            );
            None
        }
        Err(error) => {
            tracing::warn!(
                "searching {} for this process's cgroup: {error}",
                cgroup_root.display()
            );
            None
        }
    }
}

/// The host path of the namespace root of a process whose cgroup reads
/// `own_path` in its own namespace and whose pid is `pid`.
pub fn find_namespace_root(
    cgroup_root: &Path,
    own_path: &str,
    pid: u32,
) -> io::Result<Option<String>> {
    let holds_pid = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|line| line.trim() == pid.to_string()))
    };
    let own_components: Vec<String> = own_path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    if !own_path.contains("..") && holds_pid(&cgroup_root.join(own_components.join("/"))) {
        return Ok(Some("/".to_owned()));
    }
    // Depth first, one directory handle open at a time.
    let mut pending = vec![Vec::<String>::new()];
    while let Some(components) = pending.pop() {
        let dir = cgroup_root.join(components.join("/"));
        if components.ends_with(&own_components) && holds_pid(&dir) {
            let root = &components[..components.len() - own_components.len()];
            return Ok(Some(format!("/{}", root.join("/"))));
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if components.is_empty() => return Err(error),
            Err(_) => continue,
        };
        let subdirectories: Vec<String> = entries
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        for name in subdirectories {
            let mut child = components.clone();
            child.push(name);
            pending.push(child);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_against_the_namespace_root() {
        assert_eq!(join_cgroup_paths("/", "/a/b").as_deref(), Some("/a/b"));
        assert_eq!(
            join_cgroup_paths(
                "/kubepods/besteffort/podX/ctr",
                "/../../../burstable/podY/c"
            )
            .as_deref(),
            Some("/kubepods/burstable/podY/c")
        );
        assert_eq!(join_cgroup_paths("/a", "/").as_deref(), Some("/a"));
        // Above the host's root: refused, not clamped.
        assert_eq!(join_cgroup_paths("/a", "/../../b"), None);
    }

    #[test]
    fn the_namespace_root_cache_stays_bounded_over_many_mounts() {
        // The fuzzers (and tests) give every run a new mount: the cache of
        // one entry per mount must not grow with them.
        let mounts: Vec<tempfile::TempDir> =
            (0..100).map(|_| tempfile::tempdir().unwrap()).collect();
        for mount in &mounts {
            assert_eq!(own_namespace_root(mount.path()), None);
            let cached = FOUND
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .as_ref()
                .map_or(0, |found| found.len());
            // Other unit tests running beside this one use the same cache:
            // only the bound holds whatever they add.
            assert!(cached <= MAX_CACHED_MOUNTS, "{cached} mounts cached");
        }
    }

    #[test]
    fn the_v2_line_is_found() {
        let text = "12:cpu,cpuacct:/x\n0::/../../kubepods/pod1/abc\n";
        assert_eq!(v2_path(text), Some("/../../kubepods/pod1/abc"));
        assert_eq!(v2_path("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn the_namespace_root_is_found_by_our_pid() {
        let mount = tempfile::tempdir().unwrap();
        let ns_root = mount.path().join("kubepods/pod1/ctr");
        std::fs::create_dir_all(ns_root.join("sub")).unwrap();
        std::fs::write(mount.path().join("cgroup.procs"), "1\n2\n").unwrap();
        std::fs::write(ns_root.join("sub/cgroup.procs"), "7\n4242\n").unwrap();
        // Our process sits in `/sub` of a namespace rooted at kubepods/pod1/ctr.
        assert_eq!(
            find_namespace_root(mount.path(), "/sub", 4242)
                .unwrap()
                .as_deref(),
            Some("/kubepods/pod1/ctr")
        );
        // The host's namespace: found with one read.
        assert_eq!(
            find_namespace_root(mount.path(), "/kubepods/pod1/ctr/sub", 4242)
                .unwrap()
                .as_deref(),
            Some("/")
        );
        assert_eq!(find_namespace_root(mount.path(), "/", 9999).unwrap(), None);
    }
}
