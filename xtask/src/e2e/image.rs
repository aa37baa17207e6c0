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

/// A Debian image made with `debootstrap --variant=minbase` and `docker
/// import`: what can be installed, since nothing can be pulled.
pub struct DebootstrapImage {
    pub image: &'static str,
    /// The cached tarball's name: a new package list takes a new name.
    pub tarball: &'static str,
    /// `debootstrap --include`: packages beyond minbase (none: "").
    pub packages: &'static str,
    /// Another architecture than the host's (`--arch`, Debian's name; also
    /// Docker's). Its tree is debootstrap's first stage only (`--foreign`:
    /// the packages unpacked, not configured), which needs no emulation and
    /// holds what an image of the exporter needs from its base: glibc and
    /// its loader.
    pub arch: Option<&'static str>,
}

/// The exporter's base. The Containerfile's runtime stage installs
/// ca-certificates only when they are missing, so with this base it runs
/// no apt-get (the build has no network).
pub const DEBIAN: DebootstrapImage = DebootstrapImage {
    image: DEBIAN_IMAGE,
    tarball: "debian-bookworm-minbase.tar",
    packages: "ca-certificates",
    arch: None,
};

/// The arm64 base of the exporter's arm64 image (see [`build_ergon_arm64`]).
pub const DEBIAN_ARM64: DebootstrapImage = DebootstrapImage {
    image: "ergon-e2e/debian-arm64:bookworm",
    tarball: "debian-bookworm-minbase-arm64-foreign.tar",
    packages: "",
    arch: Some("arm64"),
};

fn image_exists(cluster: &Cluster, image: &str) -> bool {
    super::run_quiet(cluster.docker().args(["image", "inspect", image])).is_ok()
}

/// `docker build --network=none -t image` of a context directory under the
/// run dir holding `files` and `dockerfile`.
pub fn build_local(
    cluster: &Cluster,
    image: &str,
    files: &[(&Path, &str)],
    dockerfile: &str,
) -> Result<()> {
    let name = image.replace(['/', ':'], "-");
    let dir = cluster.work.run.join("images").join(&name);
    fs::create_dir_all(&dir)?;
    for (from, to) in files {
        fs::copy(from, dir.join(to)).with_context(|| {
            format!("copying {} into the {image} image context", from.display())
        })?;
    }
    fs::write(dir.join("Dockerfile"), dockerfile)?;
    super::run_quiet(
        cluster
            .docker()
            .args(["build", "--network=none", "-t", image])
            .arg(&dir),
    )
    .with_context(|| format!("building the {image} image"))
}

/// `k8s.gcr.io/pause:3.2` from the pause binary built with the cluster.
pub fn build_pause(cluster: &Cluster) -> Result<()> {
    let pause = cluster.bin_dir().join("pause");
    build_local(
        cluster,
        PAUSE_IMAGE,
        &[(&pause, "pause")],
        "FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n",
    )
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
    build_local(
        cluster,
        BUSYBOX_IMAGE,
        &[(busybox, "busybox")],
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n",
    )
}

/// A Debian image: its debootstrap tarball (made once, see
/// [`debootstrap_tarball`]) `docker import`ed into the node's image store
/// (kept between runs).
pub fn import_debootstrap(cluster: &Cluster, wanted: &DebootstrapImage) -> Result<()> {
    if image_exists(cluster, wanted.image) {
        return Ok(());
    }
    let tarball = debootstrap_tarball(&cluster.work.cache, wanted, None)?;
    if let Some(arch) = wanted.arch {
        // dockerd 20.10 ignores `docker import --platform` (experimental
        // there): the image would say amd64. BuildKit's `FROM scratch` takes
        // the platform asked for, and `ADD` unpacks the tree without
        // running anything of that platform.
        let dir = cluster.work.run.join("images").join(format!("base-{arch}"));
        fs::create_dir_all(&dir)?;
        let context_tar = dir.join("rootfs.tar");
        let _ = fs::remove_file(&context_tar);
        fs::hard_link(&tarball, &context_tar)
            .or_else(|_| fs::copy(&tarball, &context_tar).map(|_| ()))
            .with_context(|| format!("putting {} into a build context", tarball.display()))?;
        fs::write(
            dir.join("Dockerfile"),
            "FROM scratch\nADD rootfs.tar /\nCMD [\"/bin/bash\"]\n",
        )?;
        let built = super::run_quiet(
            cluster
                .docker()
                .args(["build", "--platform", &format!("linux/{arch}")])
                .args(["--network=none", "-t", wanted.image])
                .arg(&dir),
        );
        let _ = fs::remove_dir_all(&dir);
        return built
            .with_context(|| format!("building {} from {}", wanted.image, tarball.display()));
    }
    super::run_quiet(
        cluster
            .docker()
            .args(["import", "--change", "CMD [\"/bin/bash\"]"])
            .arg(&tarball)
            .arg(wanted.image),
    )
    .with_context(|| format!("docker import of {}", tarball.display()))
}

/// The tarball of `wanted`'s debootstrap tree in `cache`, made when missing.
/// With `log`, debootstrap runs at the lowest priority with its output there
/// (the background preparation of `cargo xtask test`); without, in the
/// foreground.
pub fn debootstrap_tarball(
    cache: &Path,
    wanted: &DebootstrapImage,
    log: Option<&fs::File>,
) -> Result<PathBuf> {
    let tarball = cache.join(wanted.tarball);
    if tarball.is_file() {
        return Ok(tarball);
    }
    // One debootstrap of a tree at a time on this machine: another
    // checkout's background preparation may be making it now.
    let lock_path = tarball.with_extension("lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if tarball.is_file() {
        return Ok(tarball);
    }
    let root = cache.join(format!("debootstrap-{}", wanted.tarball));
    let _ = fs::remove_dir_all(&root);
    let mirror = super::debian_mirror();
    eprintln!(
        "e2e: debootstrap {DEBIAN_SUITE} ({}) with {:?} from {mirror} (once; cached in {})",
        wanted.arch.unwrap_or("host"),
        wanted.packages,
        tarball.display()
    );
    let mut debootstrap = Command::new("nice");
    debootstrap.args(["-n", if log.is_some() { "19" } else { "0" }, "debootstrap"]);
    debootstrap.arg("--variant=minbase");
    if !wanted.packages.is_empty() {
        debootstrap.arg(format!("--include={}", wanted.packages));
    }
    if let Some(arch) = wanted.arch {
        debootstrap.args([&format!("--arch={arch}"), "--foreign"]);
    }
    debootstrap.arg(DEBIAN_SUITE).arg(&root).arg(&mirror);
    if let Some(log) = log {
        debootstrap
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
    }
    super::run(&mut debootstrap).context(
        "debootstrap failed: is the Debian mirror reachable? (apt-get install debootstrap)",
    )?;
    // Package caches and lists are not part of an image, nor is the second
    // stage of a foreign tree (its scripts and the packages' .debs).
    let _ = fs::remove_dir_all(root.join("debootstrap"));
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = Command::new("find")
            .arg(root.join(dir))
            .args(["-type", "f", "-delete"])
            .status();
    }
    let partial = tarball.with_extension("tar.partial");
    super::run_quiet(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
    )?;
    fs::rename(&partial, &tarball)?;
    let _ = fs::remove_dir_all(&root);
    Ok(tarball)
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
    import_debootstrap(cluster, &DEBIAN)?;
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

/// The exporter's arm64 image from the same `daemonset/Containerfile`, built
/// on this amd64 machine as `docker buildx build --platform linux/arm64`
/// builds it for a registry, with the aarch64 binary `binary` (cross-built,
/// see `xtask/src/cross.rs`) and an arm64 Debian base. Its final stage runs
/// nothing, so no emulation is registered or needed to build it. Checked:
/// the image says linux/arm64; its `ergon` is an aarch64 executable; the CA
/// bundle is there; and `ergon --version` runs on the image's own loader and
/// glibc under qemu-user (`qemu-aarch64 -L <the image's files>`).
pub fn check_ergon_arm64(cluster: &Cluster, binary: &Path) -> Result<()> {
    const IMAGE: &str = "ergon-e2e/ergon:arm64";
    if !binary.is_file() {
        bail!(
            "the aarch64 exporter {} does not exist: `cargo xtask test` builds it, or name one \
             with ERGON_BIN_ARM64",
            binary.display()
        );
    }
    let machine = elf_machine(binary)?;
    if machine != EM_AARCH64 {
        bail!(
            "{} is not an aarch64 executable (ELF machine {machine:#x})",
            binary.display()
        );
    }
    import_debootstrap(cluster, &DEBIAN_ARM64)?;
    let dir = cluster.work.run.join("images/ergon-arm64");
    fs::create_dir_all(&dir)?;
    fs::copy(binary, dir.join("ergon")).with_context(|| format!("copying {}", binary.display()))?;
    super::run(
        cluster
            .docker()
            .args(["build", "--platform", "linux/arm64", "--network=none"])
            .args(["-t", IMAGE, "-f"])
            .arg(super::root().join("daemonset/Containerfile"))
            .args(["--build-arg", "ERGON_BINARY=prebuilt"])
            .args(["--build-arg", &format!("BUILD_IMAGE={DEBIAN_IMAGE}")])
            .args([
                "--build-arg",
                &format!("RUNTIME_IMAGE={}", DEBIAN_ARM64.image),
            ])
            .arg(&dir),
    )
    .context("docker build --platform linux/arm64 of daemonset/Containerfile")?;
    let result = check_arm64_image(cluster, IMAGE, &dir);
    let _ = fs::remove_dir_all(&dir);
    super::run_quiet(cluster.docker().args(["image", "rm", "--force", IMAGE]))?;
    result
}

/// `e_machine` of an ELF file.
fn elf_machine(path: &Path) -> Result<u16> {
    use std::io::Read;
    let mut header = [0u8; 20];
    fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .with_context(|| format!("reading the ELF header of {}", path.display()))?;
    if &header[..4] != b"\x7fELF" || header[5] != 1 {
        bail!("{} is not a little-endian ELF file", path.display());
    }
    Ok(u16::from_le_bytes([header[18], header[19]]))
}

const EM_AARCH64: u16 = 0xb7;

fn check_arm64_image(cluster: &Cluster, image: &str, dir: &Path) -> Result<()> {
    let platform = super::output(cluster.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Os}}/{{.Architecture}}",
        image,
    ]))?;
    if platform.trim() != "linux/arm64" {
        bail!("{image} is for {}, not linux/arm64", platform.trim());
    }
    // The image's files, as a node would unpack them.
    let container =
        super::output(
            cluster
                .docker()
                .args(["create", "--platform", "linux/arm64", image]),
        )?;
    let container = container.trim();
    let tar = dir.join("rootfs.tar");
    let exported = super::run_quiet(
        cluster
            .docker()
            .args(["export", "--output"])
            .arg(&tar)
            .arg(container),
    );
    super::run_quiet(cluster.docker().args(["rm", container]))?;
    exported.context("docker export of the arm64 image's container")?;
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    super::run_quiet(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-xf")
            .arg(&tar),
    )?;
    let ergon = rootfs.join("usr/local/bin/ergon");
    let machine = elf_machine(&ergon)?;
    if machine != EM_AARCH64 {
        bail!("the arm64 image's ergon has ELF machine {machine:#x}, not aarch64");
    }
    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let certificates = fs::metadata(&bundle).map(|m| m.len()).unwrap_or(0);
    if certificates == 0 {
        bail!("the arm64 image has no CA bundle at /etc/ssl/certs/ca-certificates.crt");
    }
    let version = super::output(
        Command::new("qemu-aarch64")
            .arg("-L")
            .arg(&rootfs)
            .arg(&ergon)
            .arg("--version"),
    )
    .context("running the arm64 image's ergon under qemu-aarch64 on the image's glibc")?;
    if !version.starts_with("ergon ") {
        bail!("the arm64 image's `ergon --version` printed {version:?}");
    }
    eprintln!(
        "e2e: {image}: linux/arm64, aarch64 ergon, CA bundle {certificates} bytes; on its own \
         glibc under qemu-aarch64: {}",
        version.trim()
    );
    Ok(())
}
