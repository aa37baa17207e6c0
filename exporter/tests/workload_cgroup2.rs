//! The resolver against real cgroups: pod-shaped cgroups created under this
//! machine's cgroup2 mount (found in /proc/self/mountinfo), a real process
//! moved into one, and the kernel's own cgroup id (from a file handle)
//! compared with what the resolver keys by. Needs root.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use ergon::workload::resolver::cgroup2_mount_point;
use ergon::workload::{CgroupResolver, KubeletCgroupRoots, QosClass, Runtime, Workload};

const UID: &str = "0f9e8d7c-6b5a-4948-8776-655443322110";
const CONTAINER_ID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// Cgroup directories created by a test, removed deepest first on drop
/// (after the processes inside are killed), even when the test fails.
struct CgroupTree {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl CgroupTree {
    fn create(mount: &Path, relative: &str) -> CgroupTree {
        let mut tree = CgroupTree {
            dirs: Vec::new(),
            children: Vec::new(),
        };
        let mut path = mount.to_path_buf();
        for component in relative.split('/') {
            path.push(component);
            std::fs::create_dir(&path)
                .unwrap_or_else(|e| panic!("mkdir {}: {e} (tests need root)", path.display()));
            tree.dirs.push(path.clone());
        }
        tree
    }

    fn leaf(&self) -> &Path {
        self.dirs.last().unwrap()
    }

    fn remove_leaf(&mut self) {
        let leaf = self.dirs.pop().unwrap();
        std::fs::remove_dir(&leaf).unwrap();
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.dirs.iter().rev() {
            if let Err(error) = std::fs::remove_dir(dir) {
                eprintln!("could not remove test cgroup {}: {error}", dir.display());
            }
        }
    }
}

fn mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    cgroup2_mount_point(&mountinfo)
        .expect("no cgroup2 mount in /proc/self/mountinfo: these tests need cgroup v2")
}

fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "ergon-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The kernel's id for a cgroup, as `bpf_get_current_cgroup_id` returns it:
/// cgroupfs file handles carry exactly that 64-bit id.
fn kernel_cgroup_id(path: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; 8],
    }
    let mut handle = Handle {
        handle_bytes: 8,
        handle_type: 0,
        f_handle: [0; 8],
    };
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut mount_id = 0;
    // SAFETY: the handle buffer is 8 bytes, as handle_bytes says; the path is
    // NUL-terminated.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            (&raw mut handle).cast(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "name_to_handle_at {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    assert_eq!(handle.handle_bytes, 8);
    u64::from_ne_bytes(handle.f_handle)
}

/// The test's own kubelet root: its prefix directory under the mount.
fn kubelet_root(prefix: &str) -> KubeletCgroupRoots {
    KubeletCgroupRoots::parse(&[format!("/{prefix}")]).unwrap()
}

#[test]
fn resolves_real_pod_cgroups_by_kernel_id() {
    let mount = mount();
    let prefix = unique_prefix();
    let uid_systemd = UID.replace('-', "_");
    let relative = format!(
        "{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_systemd}.slice/cri-containerd-{CONTAINER_ID}.scope"
    );
    let mut tree = CgroupTree::create(&mount, &relative);

    // A real process in the container cgroup: the kernel's view of its path
    // must be the resolver's.
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id();
    tree.children.push(child);
    std::fs::write(tree.leaf().join("cgroup.procs"), pid.to_string()).unwrap();
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let kernel_path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/<pid>/cgroup")
        .to_owned();

    let cgroup_id = kernel_cgroup_id(tree.leaf());
    assert_eq!(cgroup_id, std::fs::metadata(tree.leaf()).unwrap().ino());

    let mut resolver = CgroupResolver::new(mount.clone()).with_kubelet_roots(kubelet_root(&prefix));
    let resolved = resolver
        .resolve(cgroup_id)
        .expect("the new cgroup resolves")
        .clone();
    assert_eq!(resolved.path, kernel_path);
    assert_eq!(
        resolved.workload,
        Workload::Container {
            pod_uid: UID.into(),
            container_id: CONTAINER_ID.into(),
            runtime: Runtime::Containerd,
            qos: QosClass::Burstable,
        }
    );
    let pod_dir = &tree.dirs[tree.dirs.len() - 2];
    let pod = resolver.resolve(kernel_cgroup_id(pod_dir)).unwrap();
    assert_eq!(
        pod.workload,
        Workload::Pod {
            pod_uid: UID.into(),
            qos: QosClass::Burstable
        }
    );
    // The root cgroup is the kernel's (id 1 on cgroup2).
    assert_eq!(
        resolver.resolve(kernel_cgroup_id(&mount)).unwrap().workload,
        Workload::System {
            bucket: "kernel".into()
        }
    );

    // The container exits and its cgroup is removed: still resolvable.
    for mut child in tree.children.drain(..) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    tree.remove_leaf();
    let stats = resolver.refresh().unwrap();
    assert!(stats.vanished >= 1, "{stats:?}");
    let kept = resolver
        .resolve(cgroup_id)
        .expect("kept for the retention window");
    assert!(kept.vanished());
    assert_eq!(kept.path, kernel_path);
}

#[test]
fn a_cgroup_created_later_is_found_by_the_rescan() {
    let mount = mount();
    let prefix = unique_prefix();
    let mut resolver = CgroupResolver::new(mount.clone())
        .with_min_rescan_interval(std::time::Duration::ZERO)
        .with_kubelet_roots(kubelet_root(&prefix));
    resolver.refresh().unwrap();
    let tree = CgroupTree::create(
        &mount,
        &format!("{prefix}/kubepods/besteffort/pod{UID}/{CONTAINER_ID}"),
    );
    let resolved = resolver
        .resolve(kernel_cgroup_id(tree.leaf()))
        .expect("rescan finds it");
    assert_eq!(
        resolved.workload,
        Workload::Container {
            pod_uid: UID.into(),
            container_id: CONTAINER_ID.into(),
            runtime: Runtime::Unidentified,
            qos: QosClass::BestEffort,
        }
    );
    let top = resolver.resolve(kernel_cgroup_id(&tree.dirs[0])).unwrap();
    assert_eq!(top.path, format!("/{prefix}"));
    assert_eq!(
        top.workload,
        Workload::System {
            bucket: "other".into()
        }
    );
}

#[test]
fn a_pod_forged_in_a_delegated_subtree_is_not_that_pod() {
    let mount = mount();
    let prefix = unique_prefix();
    // The genuine pod under the kubelet's root, and the same layout made by
    // a user in their own delegated subtree, each with a real process.
    let mut genuine = CgroupTree::create(
        &mount,
        &format!("{prefix}/kubepods/burstable/pod{UID}/{CONTAINER_ID}"),
    );
    let forger = unique_prefix();
    let forged_relative = format!(
        "{forger}/user.slice/user-4242.slice/user@4242.service/app.slice/kubepods/burstable/pod{UID}/{CONTAINER_ID}"
    );
    let mut forged = CgroupTree::create(&mount, &forged_relative);
    for tree in [&mut genuine, &mut forged] {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        std::fs::write(tree.leaf().join("cgroup.procs"), child.id().to_string()).unwrap();
        tree.children.push(child);
    }
    let mut resolver = CgroupResolver::new(mount.clone()).with_kubelet_roots(kubelet_root(&prefix));
    assert_eq!(
        resolver
            .resolve(kernel_cgroup_id(genuine.leaf()))
            .unwrap()
            .workload,
        Workload::Container {
            pod_uid: UID.into(),
            container_id: CONTAINER_ID.into(),
            runtime: Runtime::Unidentified,
            qos: QosClass::Burstable,
        }
    );
    let forged_cgroup = resolver.resolve(kernel_cgroup_id(forged.leaf())).unwrap();
    assert_eq!(forged_cgroup.path, format!("/{forged_relative}"));
    assert_eq!(forged_cgroup.workload.pod_uid(), None, "{forged_cgroup:?}");
}
