//! `cargo xtask e2e`: Ergon on a real single-node Kubernetes.
//!
//! Every other deployment test renders manifests offline and talks to a fake
//! API that serves JSON; this one builds the image, installs the chart as an
//! operator would, and checks what the cluster shows (kubectl, Prometheus),
//! never the exporter's internals. It fails — never skips — when a piece of
//! the machine is missing, naming the piece and how to install it.
//!
//! Everything it writes lives under one work directory outside the
//! repository (`/var/cache/ergon-e2e`, or `ERGON_E2E_WORK`): the cached
//! Kubernetes binaries (keyed by the source tarball's sha256 and the build
//! flags), the debootstrap tarball, docker's image store, and `run/` with
//! this run's certificates, etcd data and logs (kept when a check fails).

mod chart;
mod cluster;
mod image;
mod prometheus;
mod stack;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cluster::{Cluster, WorkDir};

use crate::root;

/// Debian packages the e2e needs, with what each is for.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    (
        "docker.io",
        "dockerd, containerd and runc: the container runtime",
    ),
    ("golang-1.19-go", "Go to build the Kubernetes binaries"),
    (
        "golang-github-modern-go-reflect2-dev",
        "reflect2 1.0.2, which Go 1.19 needs in place of the vendored 1.0.1",
    ),
    ("rsync", "make gen_openapi in the Kubernetes tree"),
    ("make", "make gen_openapi"),
    ("gcc", "the static pause binary"),
    ("libc6-dev", "the static pause binary"),
    ("debootstrap", "the Debian base image"),
    ("busybox-static", "the workloads' image"),
    ("openssl", "the cluster's certificates"),
    ("jq", "the runc wrapper edits OCI specs"),
    ("prometheus", "the Prometheus that scrapes the exporter"),
    ("curl", "queries to Prometheus"),
    ("iproute2", "ss: the sockets the pipeline's pods listen on"),
];

/// What to install when a program cannot be started.
pub fn install_hint(program: &str) -> String {
    let package = match program {
        "etcd" => "etcd-server",
        "dockerd" => "docker.io",
        "prometheus" => "prometheus",
        _ => return "run `cargo xtask e2e`, which installs what is missing".into(),
    };
    format!("install it with `apt-get install {package}`")
}

pub fn script(name: &str) -> PathBuf {
    root().join("xtask/e2e").join(name)
}

/// The first `URIs:` of the machine's Debian sources, or deb.debian.org.
pub fn debian_mirror() -> String {
    std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("URIs:"))
                .map(|u| u.trim().to_owned())
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// helm and kubectl from `<repo>/.tools/bin` (tests/setup-tools.sh), else PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = root().join(".tools/bin").join(name);
    if local.is_file() {
        local
    } else {
        PathBuf::from(name)
    }
}

/// Runs `cmd`, echoing it and its output.
pub fn run(cmd: &mut Command) -> Result<()> {
    crate::run(cmd)
}

/// Runs `cmd` with its output captured; on failure the error carries it.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(|_| ())
}

/// Runs `cmd` and returns its stdout; on failure the error carries stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn install_packages() -> Result<()> {
    let packages: Vec<&str> = APT_PACKAGES.iter().map(|(p, _)| *p).collect();
    let missing = crate::missing_packages(&packages);
    crate::apt_install(&missing).with_context(|| {
        let why: Vec<String> = APT_PACKAGES
            .iter()
            .filter(|(p, _)| missing.contains(p))
            .map(|(p, w)| format!("{p} ({w})"))
            .collect();
        format!("the e2e needs {}", why.join(", "))
    })
}

/// The e2e's work directory: `ERGON_E2E_WORK`, else `/var/cache/ergon-e2e`.
fn work_dir() -> Result<WorkDir> {
    let work = WorkDir::new(
        std::env::var_os("ERGON_E2E_WORK")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/ergon-e2e")),
    );
    std::fs::create_dir_all(&work.cache)
        .with_context(|| format!("creating the e2e work dir {}", work.cache.display()))?;
    Ok(work)
}

/// The cold Kubernetes build, started by `cargo xtask test` before its Rust
/// steps and joined before the e2e.
///
/// Why: the build is ~6.5 minutes of both cores on a fresh machine, and the
/// host tests leave the CPU mostly idle for minutes (they wait for the
/// exporter's intervals). Run at the lowest priority (`nice -n 19`), the
/// build takes what the Rust compilers leave and costs them almost nothing.
/// Its output goes to `<work>/kube-build.log`; if it fails, the e2e runs
/// the build again in the foreground, where its error is seen.
pub struct Prepared {
    thread: std::thread::JoinHandle<Result<()>>,
    log: PathBuf,
    /// The build's process group (its own, so the whole build can be
    /// reniced).
    group: u32,
    /// The debootstrap tarballs of the e2e's images (the exporter's base,
    /// the pipeline's components), made beside the build: mostly download
    /// and dpkg, ~2 minutes cold. Its output goes to `<work>/debootstrap.log`.
    images: std::thread::JoinHandle<Result<()>>,
}

/// Installs the e2e's packages (in the foreground: apt holds a lock) and
/// starts the Kubernetes build in the background.
pub fn prepare_in_background() -> Result<Prepared> {
    let work = work_dir()?;
    install_packages()?;
    let cache = work.cache.clone();
    let log = work.cache.join("kube-build.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("nice")
            .args(["-n", "19", "bash"])
            .arg(script("kube-build.sh"))
            .env("ERGON_E2E_WORK", &work.cache)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("running xtask/e2e/kube-build.sh")?
    };
    let group = child.id();
    let thread = std::thread::spawn(move || {
        let status = child
            .wait()
            .context("waiting for xtask/e2e/kube-build.sh")?;
        if !status.success() {
            bail!("the background Kubernetes build failed ({status})");
        }
        Ok(())
    });
    let images_log = cache.join("debootstrap.log");
    let images_file = std::fs::File::create(&images_log)
        .with_context(|| format!("creating {}", images_log.display()))?;
    let images = std::thread::spawn(move || {
        for wanted in [
            &image::DEBIAN,
            &stack::PIPELINE_DEBIAN,
            &image::DEBIAN_ARM64,
        ] {
            image::debootstrap_tarball(&cache, wanted, Some(&images_file))?;
        }
        Ok(())
    });
    eprintln!(
        "e2e: building Kubernetes and debootstrapping the images' bases in the background at \
         low priority (logs: {}, {})",
        log.display(),
        images_log.display()
    );
    Ok(Prepared {
        thread,
        log,
        group,
        images,
    })
}

impl Prepared {
    /// Waits for the background build; a failure is reported with its
    /// log's tail (the e2e then retries in the foreground).
    pub fn join(self) {
        let start = Instant::now();
        // Whatever is left of the build is now what the run waits for: back
        // to normal priority (a busy machine would otherwise starve it).
        if !self.thread.is_finished() {
            let _ = Command::new("renice")
                .args(["-n", "0", "-g", &self.group.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // A failure is only reported: the e2e makes what is missing again
        // in the foreground, where its error is seen.
        match self.images.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("e2e: background debootstrap failed: {e:#}"),
            Err(_) => eprintln!("e2e: the background debootstrap thread panicked"),
        }
        let result = self
            .thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the build thread panicked")));
        match result {
            Ok(()) => eprintln!(
                "e2e: background Kubernetes build done (waited {:.0} s for it)",
                start.elapsed().as_secs_f64()
            ),
            Err(e) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("e2e: {e:#}; the last lines of {}:", self.log.display());
                for line in tail.iter().rev() {
                    eprintln!("  {line}");
                }
            }
        }
    }
}

/// The four Kubernetes binaries and pause, built once and cached by content.
fn kube_binaries(work: &WorkDir) -> Result<PathBuf> {
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script("kube-build.sh"))
        .env("ERGON_E2E_WORK", &work.cache)
        .stderr(Stdio::inherit())
        .output()
        .context("running xtask/e2e/kube-build.sh")?;
    if !out.status.success() {
        bail!(
            "building Kubernetes v1.20.2 from Debian's source package failed ({}); \
             its output is above",
            out.status
        );
    }
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!(
        "e2e: Kubernetes binaries in {bin} ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(bin))
}

/// `cargo xtask e2e` (no arguments; `ERGON_E2E_WORK`, `ERGON_BIN` and
/// `ERGON_BIN_ARM64` in the environment). Without `ERGON_BIN_ARM64`, the
/// aarch64 exporter for the arm64 image is cross-built first (dev profile;
/// minutes when `target/cross` is cold).
pub fn run_all(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("`cargo xtask e2e` takes no arguments (got {args:?})");
    }
    let arm64_bin = match std::env::var_os("ERGON_BIN_ARM64") {
        Some(path) => PathBuf::from(path),
        None if only_stack()? => PathBuf::new(),
        None => crate::cross::build_dev()?,
    };
    run_with(&arm64_bin)
}

/// The e2e, with the aarch64 exporter at `arm64_bin` (`cargo xtask test`
/// cross-builds it beside the arm64 unit tests).
pub fn run_with(arm64_bin: &Path) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the e2e starts a Kubernetes node (dockerd, kubelet, cgroups, mounts): run it as root"
        );
    }
    cluster::catch_interrupts();
    let started = Instant::now();
    let work = work_dir()?;
    // One cluster per machine: its ports, docker and cgroups are global.
    let lock_path = work.cache.join("e2e.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        eprintln!(
            "e2e: another e2e on this machine holds {}; waiting for it to finish",
            lock_path.display()
        );
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    install_packages()?;
    let bin = kube_binaries(&work)?;
    let ergon_bin = std::env::var_os("ERGON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/ergon"));

    let mut cluster = Cluster::start(work, bin)?;
    let result = checks(&mut cluster, &ergon_bin, arm64_bin);
    cluster.failed = result.is_err();
    drop(cluster);
    result?;
    eprintln!(
        "e2e: every check{} passed in {:.0} s",
        if only_stack()? {
            " of the stack step (ERGON_E2E_ONLY=stack)"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    drop(lock);
    Ok(())
}

fn checks(cluster: &mut Cluster, ergon_bin: &Path, arm64_bin: &Path) -> Result<()> {
    let step = |what: &str| eprintln!("e2e: === {what}");
    let only_stack = only_stack()?;
    step("images");
    image::build_busybox(cluster)?;
    let image = image::build_ergon(cluster, ergon_bin)?;
    eprintln!("e2e: built {image}");
    if !only_stack {
        step("the arm64 image from the same Containerfile, without emulation");
        image::check_ergon_arm64(cluster, arm64_bin)?;
    }

    step("chart, default (privileged) profile");
    chart::install_operator_crds(cluster)?;
    chart::install(cluster, chart::Profile::Privileged)?;

    step("Prometheus discovering the exporter through the apiserver");
    let discovery = prometheus::start_discovery(cluster)?;
    let prometheus = prometheus::start(cluster, &discovery)?;

    if only_stack {
        eprintln!(
            "e2e: ERGON_E2E_ONLY=stack: skipping the workload, restart, profile and dashboard \
             steps (not a full e2e)"
        );
    } else {
        step("busy pods: real names, joules in the ratio of cpu.stat");
        workloads::start_loops(cluster)?;
        workloads::check_names_and_ratio(cluster, &prometheus)?;

        step("a deleted pod keeps its final counter, then goes after the retention");
        let retention = Duration::from_secs(
            chart::RETENTION
                .trim_end_matches('s')
                .parse()
                .context("chart::RETENTION is in seconds")?,
        );
        workloads::check_deleted_pod(cluster, &prometheus, retention)?;

        step("kubectl rollout restart: no counter decreases");
        check_restart_keeps_counters(cluster, &prometheus, Some(chart::rollout_restart))?;

        step("chart, least-privilege profile (SYS_ADMIN fallback for docker 20.10)");
        chart::install(cluster, chart::Profile::LeastPrivilege)?;
        check_restart_keeps_counters(cluster, &prometheus, None)?;

        step("every dashboard panel query returns data (tests/deploy/live.rs, on this cluster)");
        cluster::wait_for(
            "the recording rules to have been evaluated",
            Duration::from_secs(120),
            || {
                Ok((!prometheus
                    .query("namespace:ergon_pod_energy_kwh:increase1d")?
                    .is_empty())
                .then_some(()))
            },
        )?;
        cluster_test(
            "live::cluster_dashboards_and_rules_return_data",
            &[
                ("ERGON_E2E_EXPORTER", &format!("127.0.0.1:{}", chart::PORT)),
                ("ERGON_E2E_PROMETHEUS", &prometheus.address),
            ],
        )
        .context("the dashboards' panel queries against the cluster's Prometheus")?;

        step("no alert fires or is pending");
        check_no_alerts(&prometheus)?;
        workloads::delete_namespace(cluster)?;
    }

    step("the vehicle pipeline stack: Debian's Redis, InfluxDB and Prometheus, the rest dry run");
    stack::deploy_and_check(cluster, &prometheus)?;

    chart::uninstall(cluster)?;
    Ok(())
}

/// `ERGON_E2E_ONLY=stack` runs only what the stack step needs (the images,
/// the chart, Prometheus, the stack): a shorter loop while working on it.
/// `cargo xtask test` never sets it, and a run with it says it was partial.
fn only_stack() -> Result<bool> {
    match std::env::var("ERGON_E2E_ONLY") {
        Err(_) => Ok(false),
        Ok(only) if only == "stack" => Ok(true),
        Ok(other) => bail!("ERGON_E2E_ONLY={other:?}: the one step that can run alone is `stack`"),
    }
}

/// Fails when an alert fires or is pending.
fn check_no_alerts(prometheus: &prometheus::Prometheus) -> Result<()> {
    let alerts = prometheus.query("ALERTS")?;
    if !alerts.is_empty() {
        bail!("alerts fired or are pending on a healthy node: {alerts:?}");
    }
    Ok(())
}

/// Runs one `#[ignore]`d test of tests/deploy against the cluster, with
/// `env` telling it where the cluster's exporter and Prometheus listen.
fn cluster_test(name: &str, env: &[(&str, &str)]) -> Result<()> {
    let mut cargo = crate::cargo();
    // The whole workspace's feature set, as `cargo xtask test` built the
    // test binaries with: `-p ergon-deploy-tests` alone unifies features
    // differently and recompiles tokio, hyper and serde (a minute in CI).
    cargo
        .args(["test", "--workspace", "--exclude", "ergon-ebpf"])
        .args(["--test", "deploy", name])
        .args(["--", "--ignored", "--exact", "--nocapture"]);
    for (key, value) in env {
        cargo.env(key, value);
    }
    run(&mut cargo)
}

/// Restarts the DaemonSet (with `restart`, or already done by a `helm
/// upgrade`) and checks with `resets()` that no energy counter went down:
/// the checkpoint on the hostPath carries them over.
fn check_restart_keeps_counters(
    cluster: &Cluster,
    prometheus: &prometheus::Prometheus,
    restart: Option<fn(&Cluster) -> Result<String>>,
) -> Result<()> {
    let pod = match restart {
        Some(restart) => restart(cluster)?,
        None => chart::ready_pod(cluster)?,
    };
    eprintln!("e2e: exporter pod after the restart: {pod}");
    // A few scrapes of the new pod.
    cluster::sleep(Duration::from_secs(20))?;
    // Over everything Prometheus has seen, i.e. the whole e2e.
    for counter in workloads::COUNTERS {
        let resets = prometheus.query(&format!("resets({counter}[1h]) > 0"))?;
        if !resets.is_empty() {
            bail!("{counter} decreased across `kubectl rollout restart`: {resets:?}");
        }
        if prometheus.query(counter)?.is_empty() {
            bail!("{counter} is missing after the restart");
        }
    }
    Ok(())
}
