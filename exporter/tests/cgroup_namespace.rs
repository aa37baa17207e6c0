//! Process → cgroup from inside a cgroup namespace, on the real kernel: the
//! reader runs in a new cgroup namespace (`unshare(CLONE_NEWCGROUP)`, as a
//! container on cgroup v2 does), so `/proc/<pid>/cgroup` of a process
//! outside it reads `0::/../../kubepods/…`. The mapping must still find the
//! process's real cgroup in the host's mount.

use ergon_testkit as support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ergon::workload::pid_cgroup::{cgroup_id_of_pid, cgroup_path_of_pid};
use ergon::workload::{KubeletCgroupRoots, Workload, classify_under};
use support::CgroupGuard;

const TARGET_PID: &str = "ERGON_TEST_NS_TARGET_PID";
const TARGET_CGROUP: &str = "ERGON_TEST_NS_TARGET_CGROUP";

/// A `sleep` killed on drop.
struct Sleeper(std::process::Child);
impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn processes_outside_our_cgroup_namespace_resolve_to_their_cgroup() {
    let tag = format!("ergontest-ns-{}.slice", std::process::id());
    let uid = "0f9e8d7c-6b5a-4948-8776-655443322110";
    let container = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let target_cgroup =
        CgroupGuard::create(&format!("{tag}/kubepods/burstable/pod{uid}/{container}"));
    // The reader's namespace root: two levels below the common ancestor, so
    // the target is `/../../kubepods/…` from there.
    let reader_cgroup = CgroupGuard::create(&format!("{tag}/exporter/ergon"));
    let target = Sleeper(Command::new("sleep").arg("60").spawn().unwrap());
    std::fs::write(
        target_cgroup.path.join("cgroup.procs"),
        target.0.id().to_string(),
    )
    .unwrap();

    let join = support::cgroup_joiner(&reader_cgroup.path);
    let mut reader = Command::new(std::env::current_exe().unwrap());
    reader
        .args([
            "--exact",
            "reader_in_its_own_cgroup_namespace",
            "--ignored",
            "--nocapture",
        ])
        .env(TARGET_PID, target.0.id().to_string())
        .env(TARGET_CGROUP, target_cgroup.relative());
    // SAFETY: open, write, close and unshare are async-signal-safe.
    unsafe {
        reader.pre_exec(move || {
            join()?;
            // The namespace is rooted at the cgroup just joined.
            if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = reader.output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");
    assert!(log.contains("1 passed"), "the reader did not run: {log}");
    drop(target);
}

/// Run by the test above in a new cgroup namespace.
#[test]
#[ignore = "run by processes_outside_our_cgroup_namespace_resolve_to_their_cgroup"]
fn reader_in_its_own_cgroup_namespace() {
    let pid: u32 = std::env::var(TARGET_PID).unwrap().parse().unwrap();
    let expected_path = format!("/{}", std::env::var(TARGET_CGROUP).unwrap());
    let mount: PathBuf = support::cgroup2_root();
    let view = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        view.contains("0::/../../kubepods/burstable/pod"),
        "not a namespaced view: {view}"
    );
    let expected_id = std::fs::metadata(mount.join(expected_path.trim_start_matches('/')))
        .unwrap()
        .ino();
    // What the code did before: the namespaced path joined onto the mount
    // lands outside it, on nothing.
    let namespaced = view
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim();
    let naive = mount.join(namespaced.trim_start_matches('/'));
    assert_ne!(
        std::fs::metadata(&naive).ok().map(|m| m.ino()),
        Some(expected_id)
    );

    let path = cgroup_path_of_pid(Path::new("/proc"), &mount, pid).expect("the path resolves");
    assert_eq!(path, expected_path);
    let id = cgroup_id_of_pid(Path::new("/proc"), &mount, pid).expect("the id resolves");
    assert_eq!(id, expected_id);
    // And it is the pod it is, under its kubelet root.
    let tag = expected_path.split('/').nth(1).unwrap();
    let roots = KubeletCgroupRoots::parse(&[format!("/{tag}")]).unwrap();
    assert!(matches!(
        classify_under(&path, &roots),
        Workload::Container { .. }
    ));
}
