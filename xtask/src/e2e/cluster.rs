//! A single-node Kubernetes v1.20.2 on loopback, started from binaries built
//! out of Debian's source package (see `xtask/e2e/kube-build.sh` and
//! shared/CLUSTER.md for why those and not others).
//!
//! Every listener is on 127.0.0.1 and every pod runs on the host network:
//! there is no pod network, and dockerd runs with its bridge, iptables and
//! forwarding off. The node is named after the machine's hostname, which
//! must resolve to 127.0.0.1, so the apiserver reaches the kubelet over
//! loopback (`--kubelet-preferred-address-types=Hostname`).
//!
//! [`Cluster`] owns every process it starts and tears everything down when
//! dropped — on success, on a failed check and on Ctrl-C (the signal only
//! sets a flag; the waits poll it and unwind into the drop). Children run in
//! their own process groups so a terminal's Ctrl-C reaches only xtask, which
//! then stops them in order: kubelet, containers, dockerd, controllers,
//! apiserver, etcd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Ports the cluster listens on (all on 127.0.0.1).
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
pub const APISERVER_PORT: u16 = 6443;
const KUBELET_PORT: u16 = 10250;

/// The pod sandbox image the kubelet asks dockershim for; built locally from
/// the source tree's pause.c and tagged with the name the kubelet expects.
pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";

/// Directories the kubelet, dockershim and the chart (its checkpoint
/// hostPath) write outside our work dir; they are removed on teardown.
const NODE_STATE_DIRS: [&str; 5] = [
    "/var/lib/kubelet",
    "/var/lib/dockershim",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/ergon",
];

/// Cgroup subtrees the node creates in every hierarchy: `kubepods` (the
/// kubelet's QoS tree) and `docker` (image build containers).
const NODE_CGROUPS: [&str; 2] = ["kubepods", "docker"];

/// The Linux capability number of CAP_SYS_RESOURCE.
const CAP_SYS_RESOURCE: u32 = 24;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, sig: i32) -> i32;
}

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag that every wait of the e2e polls.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal(SIGINT, on_signal);
        signal(SIGTERM, on_signal);
    }
}

/// Fails once Ctrl-C (or SIGTERM) was received, so the caller unwinds into
/// the teardown.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C or SIGTERM): tearing the cluster down");
    }
    Ok(())
}

/// Sleeps in small steps so an interrupt is noticed within 100 ms.
pub fn sleep(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    check_interrupted()
}

/// Polls `probe` until it returns `Some`, failing after `timeout` with
/// `what` and the last error in the message.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        check_interrupted()?;
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!("{error:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        sleep(Duration::from_millis(500))?;
    }
}

/// Whether CAP_SYS_RESOURCE is in this process's bounding set; where it is
/// not, runc needs the wrapper (see xtask/e2e/runc-wrapper.sh).
fn has_cap_sys_resource() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("/proc/self/status has no CapBnd line")?
        .trim();
    let bounding = u64::from_str_radix(hex, 16).with_context(|| format!("CapBnd {hex:?}"))?;
    Ok(bounding & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The machine's hostname, which becomes the node name; it must resolve to
/// 127.0.0.1 so apiserver → kubelet traffic stays on loopback.
fn node_name() -> Result<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading /proc/sys/kernel/hostname")?
        .trim()
        .to_lowercase();
    let out = Command::new("getent")
        .args(["ahostsv4", &name])
        .output()
        .context("running getent")?;
    let resolved = String::from_utf8_lossy(&out.stdout);
    if !resolved.lines().any(|l| l.starts_with("127.0.0.1 ")) {
        bail!(
            "the hostname {name:?} does not resolve to 127.0.0.1 (getent ahostsv4 says {:?}); \
             the e2e node is named after it and must be reached on loopback: \
             add `127.0.0.1 {name}` to /etc/hosts",
            resolved.trim()
        );
    }
    Ok(name)
}

fn port_in_use(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Where the e2e keeps what it caches (binaries, base images, docker's image
/// store) and where one run keeps its state (certificates, etcd, logs).
#[derive(Clone)]
pub struct WorkDir {
    pub cache: PathBuf,
    pub run: PathBuf,
}

impl WorkDir {
    pub fn new(cache: PathBuf) -> WorkDir {
        let run = cache.join("run");
        WorkDir { cache, run }
    }
    pub fn logs(&self) -> PathBuf {
        self.run.join("logs")
    }
    pub fn pki(&self) -> PathBuf {
        self.run.join("pki")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.run.join("admin.kubeconfig")
    }
    pub fn docker_socket(&self) -> PathBuf {
        self.run.join("docker.sock")
    }
    fn docker_data_root(&self) -> PathBuf {
        self.cache.join("docker")
    }
}

struct Started {
    name: &'static str,
    child: Child,
}

/// The running node. Dropping it tears everything down.
pub struct Cluster {
    pub work: WorkDir,
    pub node: String,
    bin: PathBuf,
    processes: Vec<Started>,
    /// Cgroup subtrees that existed before we started (not ours to remove).
    cgroups_before: Vec<PathBuf>,
    /// Set by the caller when a check failed: logs are kept and their tails
    /// printed.
    pub failed: bool,
}

impl Cluster {
    /// Starts etcd, the control plane, dockerd and the kubelet, and waits for
    /// the node to be Ready. `bin` holds the four Kubernetes binaries.
    pub fn start(work: WorkDir, bin: PathBuf) -> Result<Cluster> {
        let node = node_name()?;
        for (port, who) in [
            (ETCD_CLIENT_PORT, "etcd"),
            (APISERVER_PORT, "kube-apiserver"),
            (KUBELET_PORT, "kubelet"),
        ] {
            if port_in_use(port) {
                bail!(
                    "127.0.0.1:{port} is already in use (the e2e's {who} needs it): \
                     stop whatever listens there (`ss -ltnp sport = :{port}`)"
                );
            }
        }
        // A previous run that was killed (SIGKILL, power loss) may have left
        // processes and node state behind: clear them before starting.
        clean_leftovers(&work);
        let cgroups_before = node_cgroups();
        let _ = fs::remove_dir_all(&work.run);
        fs::create_dir_all(work.logs())
            .with_context(|| format!("creating {}", work.logs().display()))?;
        let mut cluster = Cluster {
            work,
            node,
            bin,
            processes: Vec::new(),
            cgroups_before,
            // Until the node is up: a failed start keeps and prints the logs.
            failed: true,
        };
        cluster.boot()?;
        cluster.failed = false;
        Ok(cluster)
    }

    fn boot(&mut self) -> Result<()> {
        let started = Instant::now();
        let pki = self.work.pki();
        super::run_quiet(
            Command::new("bash")
                .arg(super::script("certs.sh"))
                .arg(&pki)
                .arg(&self.node),
        )
        .context("generating the cluster's certificates with openssl (xtask/e2e/certs.sh)")?;
        self.write_kubeconfigs()?;

        let etcd_data = self.work.run.join("etcd");
        self.spawn(
            "etcd",
            Command::new("etcd").args([
                "--name=e2e",
                &format!("--data-dir={}", etcd_data.display()),
                &format!("--listen-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
                &format!("--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                &format!("--initial-cluster=e2e=http://127.0.0.1:{ETCD_PEER_PORT}"),
                "--listen-metrics-urls=",
            ]),
        )?;
        wait_for("etcd to listen", Duration::from_secs(30), || {
            self.check_alive()?;
            Ok(port_in_use(ETCD_CLIENT_PORT).then_some(()))
        })?;

        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver = self.bin.join("kube-apiserver");
        self.spawn(
            "kube-apiserver",
            Command::new(&apiserver).args([
                "--advertise-address=127.0.0.1",
                "--bind-address=127.0.0.1",
                &format!("--secure-port={APISERVER_PORT}"),
                "--insecure-port=0",
                &format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
                &format!("--client-ca-file={}", p("ca.crt")),
                &format!("--tls-cert-file={}", p("apiserver.crt")),
                &format!("--tls-private-key-file={}", p("apiserver.key")),
                &format!(
                    "--kubelet-client-certificate={}",
                    p("apiserver-kubelet-client.crt")
                ),
                &format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                &format!("--kubelet-certificate-authority={}", p("ca.crt")),
                "--kubelet-preferred-address-types=Hostname",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                &format!("--service-account-key-file={}", p("sa.pub")),
                &format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                // The apiserver refuses a loopback endpoint for the
                // `kubernetes` Service; pods reach it at 127.0.0.1:6443.
                "--endpoint-reconciler-type=none",
            ]),
        )?;
        wait_for(
            "the apiserver to be healthy",
            Duration::from_secs(90),
            || {
                self.check_alive()?;
                Ok(self.kubectl_ok(&["get", "--raw", "/readyz"]).then_some(()))
            },
        )?;

        let run = self.work.run.clone();
        let kc = |name: &str| run.join(format!("{name}.kubeconfig")).display().to_string();
        self.spawn(
            "kube-controller-manager",
            Command::new(self.bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={}", kc("controller-manager")),
                &format!("--authentication-kubeconfig={}", kc("controller-manager")),
                &format!("--authorization-kubeconfig={}", kc("controller-manager")),
                "--bind-address=127.0.0.1",
                "--secure-port=10257",
                "--port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                &format!("--service-account-private-key-file={}", p("sa.key")),
                &format!("--root-ca-file={}", p("ca.crt")),
            ]),
        )?;
        self.spawn(
            "kube-scheduler",
            Command::new(self.bin.join("kube-scheduler")).args([
                &format!("--kubeconfig={}", kc("scheduler")),
                &format!("--authentication-kubeconfig={}", kc("scheduler")),
                &format!("--authorization-kubeconfig={}", kc("scheduler")),
                "--bind-address=127.0.0.1",
                "--secure-port=10259",
                "--port=0",
                "--leader-elect=false",
            ]),
        )?;

        self.start_dockerd()?;
        super::image::build_pause(self)?;
        self.start_kubelet()?;

        self.set_node_addresses()?;
        let node = self.node.clone();
        wait_for(
            &format!("node {node} to be Ready"),
            Duration::from_secs(120),
            || {
                self.check_alive()?;
                let out = self.kubectl(&[
                    "get",
                    "node",
                    &node,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ]);
                Ok(matches!(out, Ok(ref s) if s.trim() == "True").then_some(()))
            },
        )?;
        // Pod creation is forbidden until the controller-manager has made the
        // `default` ServiceAccount.
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                self.check_alive()?;
                Ok(self
                    .kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"])
                    .then_some(()))
            },
        )?;
        eprintln!(
            "e2e: node {} Ready {:.0} s after starting etcd",
            self.node,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The kubelet refuses a loopback `--node-ip` ("nodeIP can't be loopback
    /// address") and then leaves the node without addresses: hostNetwork
    /// pods get no IP (the chart's `--listen=$(POD_IP):…` is then empty) and
    /// `kubectl logs` fails ("no preferred addresses found"). Without
    /// `--node-ip` it would pick the machine's outward address. So the
    /// addresses are set once through the status subresource; the kubelet's
    /// failing address setter leaves them as they are.
    fn set_node_addresses(&mut self) -> Result<()> {
        let node = self.node.clone();
        wait_for(
            &format!("node {node} to register"),
            Duration::from_secs(60),
            || {
                self.check_alive()?;
                Ok(self.kubectl_ok(&["get", "node", &node]).then_some(()))
            },
        )?;
        let patch = format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"127.0.0.1"}},{{"type":"Hostname","address":"{node}"}}]}}}}"#
        );
        self.kubectl(&[
            "patch",
            "node",
            &node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .map(|_| ())
        .context("setting the node's addresses to 127.0.0.1")
    }

    fn write_kubeconfigs(&self) -> Result<()> {
        let pki = self.work.pki();
        for (name, cert) in [
            ("admin", "admin"),
            ("controller-manager", "controller-manager"),
            ("scheduler", "scheduler"),
            ("kubelet", "kubelet-client"),
        ] {
            let text = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    \
                 server: https://127.0.0.1:{APISERVER_PORT}\n    certificate-authority: {ca}\n\
                 users:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    \
                 client-key: {key}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    \
                 user: {name}\ncurrent-context: e2e\n",
                ca = pki.join("ca.crt").display(),
                crt = pki.join(format!("{cert}.crt")).display(),
                key = pki.join(format!("{cert}.key")).display(),
            );
            let path = self.work.run.join(format!("{name}.kubeconfig"));
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn start_dockerd(&mut self) -> Result<()> {
        let socket = self.work.docker_socket();
        let mut dockerd = Command::new("dockerd");
        dockerd.args([
            &format!("--host=unix://{}", socket.display()),
            &format!("--data-root={}", self.work.docker_data_root().display()),
            &format!(
                "--exec-root={}",
                self.work.run.join("docker-exec").display()
            ),
            &format!("--pidfile={}", self.work.run.join("docker.pid").display()),
            // No pod network: no bridge, no NAT, no forwarding, no iptables.
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--log-driver=json-file",
            "--exec-opt=native.cgroupdriver=cgroupfs",
        ]);
        if !has_cap_sys_resource()? {
            let wrapper = super::script("runc-wrapper.sh");
            eprintln!(
                "e2e: CAP_SYS_RESOURCE is not in the bounding set: runc runs through {}",
                wrapper.display()
            );
            dockerd.args([
                &format!("--add-runtime=ergon-runc={}", wrapper.display()),
                "--default-runtime=ergon-runc",
            ]);
        }
        self.spawn("dockerd", &mut dockerd)?;
        wait_for("dockerd to answer", Duration::from_secs(60), || {
            self.check_alive()?;
            Ok(super::run_quiet(self.docker().arg("info"))
                .is_ok()
                .then_some(()))
        })?;
        // Containers of an earlier run live in the cached image store.
        let leftover = self.docker_output(&["ps", "-aq"])?;
        let ids: Vec<&str> = leftover.split_whitespace().collect();
        if !ids.is_empty() {
            super::run_quiet(self.docker().args(["rm", "-f"]).args(&ids))?;
        }
        Ok(())
    }

    fn start_kubelet(&mut self) -> Result<()> {
        let pki = self.work.pki();
        let config = self.work.run.join("kubelet-config.yaml");
        fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 address: 127.0.0.1\nport: {KUBELET_PORT}\nreadOnlyPort: 0\nhealthzBindAddress: 127.0.0.1\n\
                 authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: true\n  \
                 x509:\n    clientCAFile: {ca}\nauthorization:\n  mode: Webhook\n\
                 tlsCertFile: {crt}\ntlsPrivateKeyFile: {key}\ncgroupDriver: cgroupfs\n\
                 failSwapOn: false\nserializeImagePulls: false\n\
                 evictionHard:\n  memory.available: 100Mi\n  nodefs.available: 2%\n  imagefs.available: 2%\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n",
                ca = pki.join("ca.crt").display(),
                crt = pki.join("kubelet.crt").display(),
                key = pki.join("kubelet.key").display(),
            ),
        )?;
        let mut kubelet = Command::new(self.bin.join("kubelet"));
        kubelet.args([
            &format!("--config={}", config.display()),
            &format!(
                "--kubeconfig={}",
                self.work.run.join("kubelet.kubeconfig").display()
            ),
            "--container-runtime=docker",
            &format!(
                "--docker-endpoint=unix://{}",
                self.work.docker_socket().display()
            ),
            &format!("--hostname-override={}", self.node),
            "--node-ip=127.0.0.1",
            &format!("--pod-infra-container-image={PAUSE_IMAGE}"),
        ]);
        self.spawn("kubelet", &mut kubelet)
    }

    /// Starts `cmd` in its own process group with its output in
    /// `<run>/logs/<name>.log`.
    pub fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let log_path = self.work.logs().join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!(
                    "could not start {name} ({:?}): {}",
                    cmd.get_program(),
                    super::install_hint(name)
                )
            })?;
        self.processes.push(Started { name, child });
        Ok(())
    }

    /// The directory of the Kubernetes binaries (and `pause`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Fails naming the first component that has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for started in &mut self.processes {
            if let Some(status) = started.child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log is {}",
                    started.name,
                    self.work
                        .logs()
                        .join(format!("{}.log", started.name))
                        .display()
                );
            }
        }
        Ok(())
    }

    /// The docker CLI of the docker.io package, talking to our dockerd.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("/usr/bin/docker");
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.work.docker_socket().display()),
        )
        .env("DOCKER_BUILDKIT", "1");
        cmd
    }

    pub fn docker_output(&self, args: &[&str]) -> Result<String> {
        super::output(self.docker().args(args))
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(super::tool("kubectl"));
        cmd.env("KUBECONFIG", self.work.kubeconfig());
        cmd
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        super::output(self.kubectl_command().args(args))
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.kubectl(args).is_ok()
    }

    /// Prints the last lines of every component's log.
    fn print_log_tails(&self) {
        let Ok(entries) = fs::read_dir(self.work.logs()) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            eprintln!(
                "----- last {} lines of {} -----",
                tail.len(),
                path.display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }

    fn teardown(&mut self) {
        // Reverse start order: kubelet first, so it does not restart the
        // containers removed before dockerd stops.
        while let Some(mut started) = self.processes.pop() {
            if started.name == "dockerd"
                && let Ok(ids) = self.docker_output(&["ps", "-aq"])
            {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let _ = super::run_quiet(self.docker().args(["rm", "-f"]).args(&ids));
                }
            }
            stop(&mut started);
        }
        clean_leftovers(&self.work);
        remove_cgroups(&self.cgroups_before);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.failed {
            self.print_log_tails();
        }
        eprintln!("e2e: tearing the cluster down");
        self.teardown();
        if self.failed {
            eprintln!(
                "e2e: logs and state of this run are kept in {}",
                self.work.run.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.work.run);
        }
    }
}

/// SIGTERM to the process group, SIGKILL after 15 s.
fn stop(started: &mut Started) {
    let pid = started.child.id() as i32;
    // SAFETY: signalling a process group we created.
    unsafe { kill(-pid, SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match started.child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                // SAFETY: as above.
                unsafe { kill(-pid, SIGKILL) };
                let _ = started.child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    // Members of the group that outlived their leader.
    // SAFETY: as above; ESRCH when none is left.
    unsafe { kill(-pid, SIGKILL) };
}

/// Processes of this work dir still running (a killed earlier run, or
/// containerd shims that outlived dockerd), found by their command line
/// naming the run directory, then killed by pid; mounts under the kubelet's
/// root and the run dir; the node's state directories.
fn clean_leftovers(work: &WorkDir) {
    let marker = work.run.display().to_string();
    let me = std::process::id();
    for _ in 0..3 {
        let mut found = false;
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                found = true;
                // SAFETY: killing a process of our own run dir by pid.
                unsafe { kill(pid as i32, SIGKILL) };
            }
        }
        if !found {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let roots = [
        PathBuf::from("/var/lib/kubelet"),
        PathBuf::from("/var/lib/dockershim"),
        work.run.clone(),
        work.docker_data_root(),
    ];
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| roots.iter().any(|r| Path::new(m).starts_with(r)))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        let _ = Command::new("umount")
            .args(["-l", mount])
            .stderr(Stdio::null())
            .status();
    }
    for dir in NODE_STATE_DIRS {
        if let Err(error) = fs::remove_dir_all(dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("e2e: could not remove {dir}: {error}");
        }
    }
}

/// Every `kubepods`/`docker` subtree in every cgroup hierarchy.
fn node_cgroups() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for name in NODE_CGROUPS {
            let path = hierarchy.path().join(name);
            if path.is_dir() {
                found.push(path);
            }
        }
        // cgroup v2 only: the subtrees sit directly under /sys/fs/cgroup.
    }
    for name in NODE_CGROUPS {
        let path = Path::new("/sys/fs/cgroup").join(name);
        if path.is_dir() && fs::metadata(path.join("cgroup.procs")).is_ok() {
            found.push(path);
        }
    }
    found
}

/// Removes the node's cgroup subtrees that were not there before it
/// started, deepest first (a cgroup is removable once its processes are
/// gone, which takes the kernel a moment after they exit).
fn remove_cgroups(before: &[PathBuf]) {
    for root in node_cgroups() {
        if before.contains(&root) {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&root, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let mut attempts = 0;
            while let Err(error) = fs::remove_dir(&dir) {
                attempts += 1;
                if error.kind() == std::io::ErrorKind::NotFound || attempts > 20 {
                    if attempts > 20 {
                        eprintln!("e2e: could not remove cgroup {}: {error}", dir.display());
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_dirs(&entry.path(), out);
        }
    }
}
