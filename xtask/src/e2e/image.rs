//! Images for the e2e node, all built locally against its dockerd (nothing
//! can be pulled here): the pod sandbox (`pause`), a Debian base made with
//! debootstrap and `docker import`, the exporter from the project's own
//! `daemonset/Containerfile`, and `FROM scratch` busybox for the workloads.
//!
//! The exporter image takes the binary `cargo xtask test` already built
//! (dev profile, `target/debug/ergon`) through the Containerfile's
//! `ERGON_BINARY=prebuilt` stage, so CI compiles the exporter once, in one
//! profile. It is dynamically linked against the host's glibc; the Debian
//! base is the same release (bookworm) as the build machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::cluster::{Cluster, PAUSE_IMAGE};

/// The local Debian base, imported from a debootstrap tree.
pub const DEBIAN_IMAGE: &str = "ergon-e2e/debian:bookworm";
/// The exporter image the chart installs with `imagePullPolicy: Never`.
pub const ERGON_REPOSITORY: &str = "ergon-e2e/ergon";
pub const ERGON_TAG: &str = "dev";
/// `FROM scratch` + busybox-static: the workloads' image.
pub const BUSYBOX_IMAGE: &str = "ergon-e2e/busybox:static";

const DEBIAN_SUITE: &str = "bookworm";
/// Packages the base carries beyond minbase: the Containerfile's runtime
/// stage installs ca-certificates only when they are missing, so with this
/// base it runs no apt-get (the build has no network).
const DEBIAN_EXTRA_PACKAGES: &str = "ca-certificates";

fn image_exists(cluster: &Cluster, image: &str) -> bool {
    super::run_quiet(cluster.docker().args(["image", "inspect", image])).is_ok()
}

/// A context directory under the run dir holding `files` and a Dockerfile.
fn context(
    cluster: &Cluster,
    name: &str,
    files: &[(&Path, &str)],
    dockerfile: &str,
) -> Result<PathBuf> {
    let dir = cluster.work.run.join("images").join(name);
    fs::create_dir_all(&dir)?;
    for (from, to) in files {
        fs::copy(from, dir.join(to))
            .with_context(|| format!("copying {} into the {name} image context", from.display()))?;
    }
    fs::write(dir.join("Dockerfile"), dockerfile)?;
    Ok(dir)
}

/// `k8s.gcr.io/pause:3.2` from the pause binary built with the cluster.
pub fn build_pause(cluster: &Cluster) -> Result<()> {
    let pause = cluster.bin_dir().join("pause");
    let dir = context(
        cluster,
        "pause",
        &[(&pause, "pause")],
        "FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n",
    )?;
    super::run_quiet(
        cluster
            .docker()
            .args(["build", "--network=none", "-t", PAUSE_IMAGE])
            .arg(&dir),
    )
    .context("building the pause image")
}

/// `ergon-e2e/busybox:static`: the workloads' busy loops.
pub fn build_busybox(cluster: &Cluster) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!(
            "{} is missing: apt-get install busybox-static",
            busybox.display()
        );
    }
    let dir = context(
        cluster,
        "busybox",
        &[(busybox, "busybox")],
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
    )?;
    super::run_quiet(
        cluster
            .docker()
            .args(["build", "--network=none", "-t", BUSYBOX_IMAGE])
            .arg(&dir),
    )
    .context("building the busybox image")
}

/// The Debian base: debootstrap once into the cache (a tarball), then
/// `docker import` into the node's image store (kept between runs).
pub fn import_debian(cluster: &Cluster) -> Result<()> {
    if image_exists(cluster, DEBIAN_IMAGE) {
        return Ok(());
    }
    let tarball = cluster
        .work
        .cache
        .join(format!("debian-{DEBIAN_SUITE}-minbase.tar"));
    if !tarball.is_file() {
        let root = cluster.work.cache.join("debootstrap");
        let _ = fs::remove_dir_all(&root);
        let mirror = super::debian_mirror();
        eprintln!(
            "e2e: debootstrap {DEBIAN_SUITE} from {mirror} (once; cached in {})",
            tarball.display()
        );
        super::run(
            Command::new("debootstrap")
                .args([
                    "--variant=minbase",
                    &format!("--include={DEBIAN_EXTRA_PACKAGES}"),
                    DEBIAN_SUITE,
                ])
                .arg(&root)
                .arg(&mirror),
        )
        .context(
            "debootstrap failed: is the Debian mirror reachable? (apt-get install debootstrap)",
        )?;
        // Package caches and lists are not part of an image.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            let _ = Command::new("find")
                .arg(root.join(dir))
                .args(["-type", "f", "-delete"])
                .status();
        }
        let partial = tarball.with_extension("tar.partial");
        super::run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&partial)
                .arg("."),
        )?;
        fs::rename(&partial, &tarball)?;
        let _ = fs::remove_dir_all(&root);
    }
    super::run_quiet(
        cluster
            .docker()
            .args(["import", "--change", "CMD [\"/bin/bash\"]"])
            .arg(&tarball)
            .arg(DEBIAN_IMAGE),
    )
    .context("docker import of the debootstrap tarball")
}

/// The exporter image from `daemonset/Containerfile`, with local bases and
/// the prebuilt binary.
pub fn build_ergon(cluster: &Cluster, binary: &Path) -> Result<String> {
    if !binary.is_file() {
        bail!(
            "the exporter binary {} does not exist: build it first (`cargo build -p ergon`, \
             which `cargo xtask test` does), or name another with ERGON_BIN",
            binary.display()
        );
    }
    import_debian(cluster)?;
    let dir = cluster.work.run.join("images/ergon");
    fs::create_dir_all(&dir)?;
    fs::copy(binary, dir.join("ergon")).with_context(|| format!("copying {}", binary.display()))?;
    let image = format!("{ERGON_REPOSITORY}:{ERGON_TAG}");
    super::run(
        cluster
            .docker()
            .args(["build", "--network=none", "-t", &image, "-f"])
            .arg(super::root().join("daemonset/Containerfile"))
            .args(["--build-arg", "ERGON_BINARY=prebuilt"])
            .args(["--build-arg", &format!("BUILD_IMAGE={DEBIAN_IMAGE}")])
            .args(["--build-arg", &format!("RUNTIME_IMAGE={DEBIAN_IMAGE}")])
            .arg(&dir),
    )
    .context("docker build of daemonset/Containerfile")?;
    // The image store persists between runs: drop the previous runs'
    // exporter images (200+ MB each with a debug binary).
    super::run_quiet(cluster.docker().args(["image", "prune", "--force"]))?;
    Ok(image)
}
