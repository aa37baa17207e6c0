//! Configuration: command-line flags, `ERGON_*` environment variables and an
//! optional YAML file, merged once at start.
//!
//! Precedence is flag > environment > file > default. The file is applied by
//! turning its keys into flags placed *before* the real ones (clap keeps the
//! last occurrence), skipping keys whose environment variable is set; so one
//! parser validates all three sources and every error names the flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::probe::{HookChoice, PmuChoice, ProbeConfig, ProbeMode};

/// The exporter's default port; the DaemonSet, Service and ServiceMonitor use
/// the same.
pub const DEFAULT_PORT: u16 = 9102;

/// Where the exporter keeps its state unless told otherwise; the DaemonSet
/// mounts this host directory read-write.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ergon";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IdlePolicy {
    /// Idle energy stays on the node (`mode="idle"`).
    None,
    /// Idle energy split among pods by their CPU requests.
    CpuRequests,
    /// Idle energy split evenly among pods.
    Equal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compat {
    /// Also emit Kepler 0.11's metric names (`kepler_node_cpu_joules_total`,
    /// `kepler_container_cpu_joules_total`, …) so Kepler dashboards and
    /// alerts keep working.
    Kepler,
    /// Also emit the names of Kepler 0.9 and earlier
    /// (`kepler_container_joules_total`, `kepler_node_platform_joules_total`).
    #[value(name = "kepler-0.9")]
    Kepler09,
}

/// Where pod names, container names and labels come from (`--pod-source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PodSource {
    /// The kubelet if it answers at start, else the API server watch (one
    /// log line says why).
    Auto,
    /// Poll the node's kubelet `/pods` (RBAC: `get` on `nodes/proxy`); no
    /// load on the API server.
    Kubelet,
    /// Watch this node's pods on the API server (RBAC: `list`, `watch` on
    /// `pods`).
    Apiserver,
}

#[derive(Debug, Parser)]
#[command(
    name = "ergon",
    version,
    about = "Energy exporter for Kubernetes: joules per pod, container and node",
    long_about = "Ergon counts what every cgroup runs on the CPU (eBPF at sched_switch, or /proc \
                  where eBPF is refused), reads the node's energy meters (RAPL, NVIDIA GPUs, or a \
                  calibrated model on machines without one) and divides each interval's joules \
                  among containers and pods. Prometheus scrapes /metrics.",
    after_help = "Examples:\n  \
        ergon                                   serve on 127.0.0.1:9102 with everything detected\n  \
        ergon --listen 0.0.0.0:9102 --host-sys /host/sys --host-proc /host/proc\n  \
        ergon --probe procfs --meter model      no eBPF, estimated energy\n  \
        ergon --config /etc/ergon/config.yaml   flags override the file, env overrides the file\n  \
        ergon doctor                            print what was detected and how to fix what is off\n\n\
        Every flag can also be set as ERGON_<FLAG> (e.g. ERGON_LISTEN=0.0.0.0:9102).",
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// YAML file of settings (keys are flag names, e.g. `listen: 0.0.0.0:9102`).
    #[arg(long, env = "ERGON_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Address to serve /metrics, /healthz and /readyz on.
    #[arg(long, env = "ERGON_LISTEN", default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
    pub listen: SocketAddr,

    /// Length of one measurement interval (e.g. 5s, 500ms).
    #[arg(long, env = "ERGON_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,

    /// The host's /sys (in a container: a mount of it, e.g. /host/sys).
    #[arg(long, env = "ERGON_HOST_SYS", default_value = "/sys")]
    pub host_sys: PathBuf,

    /// The host's /proc (e.g. /host/proc, with hostPID).
    #[arg(long, env = "ERGON_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,

    /// The cgroup v2 mount. Default: <host-sys>/fs/cgroup, or its `unified`
    /// subdirectory on hybrid hosts (also taken when this names a hybrid
    /// host's v1 /sys/fs/cgroup).
    #[arg(long, env = "ERGON_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Cgroup paths the kubelet makes its `kubepods` cgroup in, comma-separated
    /// (default `/`, the kubelet's own default). Only cgroups laid out there
    /// as the kubelet lays them out are pods: a pod-shaped tree elsewhere
    /// (a user's delegated subtree) is billed to where it is. Nested setups:
    /// `/kubelet.slice` (kind, seen from its node),
    /// `/system.slice/docker-*.scope/kubelet.slice` (kind from the host).
    #[arg(long, env = "ERGON_KUBELET_CGROUP_ROOT", value_delimiter = ',')]
    pub kubelet_cgroup_root: Vec<String>,

    /// How CPU usage is collected.
    #[arg(long, env = "ERGON_PROBE", value_enum, default_value_t = ProbeMode::Auto)]
    pub probe: ProbeMode,

    /// Which sched_switch hook the eBPF probe uses.
    #[arg(long, env = "ERGON_HOOK", value_enum, default_value_t = HookChoice::Auto)]
    pub hook: HookChoice,

    /// Hardware counters for the probe (cycles split energy more exactly than time).
    #[arg(long, env = "ERGON_PMU", value_enum, default_value_t = PmuChoice::Auto)]
    pub pmu: PmuChoice,

    /// Also account and export energy per process (opt-in: more series).
    #[arg(long, env = "ERGON_PER_PROCESS")]
    pub per_process: bool,

    /// Bound of the kernel's cgroup map; more cgroups go to an overflow bucket.
    #[arg(long, env = "ERGON_MAX_CGROUPS", default_value_t = 16384)]
    pub max_cgroups: u32,

    /// Bound of the kernel's process map (with --per-process).
    #[arg(long, env = "ERGON_MAX_PROCESSES", default_value_t = 32768)]
    pub max_processes: u32,

    /// Most memory the kernel maps may take when full, in MiB. Per-CPU
    /// values cost once per CPU: on big nodes the cgroup map's bound is
    /// lowered to fit (logged). Keep the pod's memory limit above this plus
    /// the exporter's own ~30 MiB peak.
    #[arg(long, env = "ERGON_MAP_MEMORY_BUDGET_MIB", default_value_t = crate::probe::map_memory::DEFAULT_BUDGET_MIB)]
    pub map_memory_budget_mib: u64,

    /// How the kernel maps get memory: on-demand (Linux 6.1+), prealloc, or
    /// auto (on demand where safe, else preallocated).
    #[arg(long, env = "ERGON_MAP_ALLOCATION", value_enum, default_value_t = crate::probe::MapAllocation::Auto)]
    pub map_allocation: crate::probe::MapAllocation,

    /// Energy meters to use, comma-separated: auto, rapl, rapl-perf, nvml,
    /// model, hwmon. `auto` detects what the node has and uses the model
    /// only where no CPU meter exists.
    #[arg(
        long,
        env = "ERGON_METER",
        value_delimiter = ',',
        default_value = "auto"
    )]
    pub meter: Vec<String>,

    /// Path of libnvidia-ml.so, where it is not on the loader's path.
    #[arg(long, env = "ERGON_NVML_LIBRARY")]
    pub nvml_library: Option<PathBuf>,

    /// Model coefficients to use instead of the bundled table (a file
    /// written by --model-fit-output on a machine of the same hardware, or
    /// written by hand: idle_watts_per_cpu, max_watts_per_cpu).
    #[arg(long, env = "ERGON_MODEL_COEFFICIENTS")]
    pub model_coefficients: Option<PathBuf>,

    /// Where a real CPU meter exists, fit the model online and write the
    /// fitted coefficients here (.json or .yaml) for VMs of the same hardware.
    #[arg(long, env = "ERGON_MODEL_FIT_OUTPUT")]
    pub model_fit_output: Option<PathBuf>,

    /// Where the idle part of the node's energy goes.
    #[arg(long, env = "ERGON_IDLE_POLICY", value_enum, default_value_t = IdlePolicy::None)]
    pub idle_policy: IdlePolicy,

    /// Fixed idle power per domain, e.g. `package=20,dram=3` (watts). Without
    /// it, idle is the model's idle term or the lowest power observed.
    #[arg(long, env = "ERGON_IDLE_WATTS", value_delimiter = ',')]
    pub idle_watts: Vec<String>,

    /// This node's name (for the pod watch); the DaemonSet sets it from the
    /// downward API.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubeconfig to use outside a cluster.
    #[arg(long, env = "ERGON_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API URL (plain HTTP on loopback, for tests and proxies).
    #[arg(long, env = "ERGON_KUBE_API")]
    pub kube_api: Option<String>,

    /// Where pod metadata comes from: the node's kubelet, the API server, or
    /// auto (the kubelet, else the API server).
    #[arg(long, env = "ERGON_POD_SOURCE", value_enum, default_value_t = PodSource::Auto)]
    pub pod_source: PodSource,

    /// The kubelet's base URL. Default: https://<NODE_NAME>:10250 (the
    /// read-only port, where enabled: http://<node>:10255).
    #[arg(long, env = "ERGON_KUBELET_URL")]
    pub kubelet_url: Option<String>,

    /// Bearer token file for the kubelet (re-read as it rotates).
    #[arg(long, env = "ERGON_KUBELET_TOKEN_FILE", default_value = crate::workload::kubelet::SERVICE_ACCOUNT_TOKEN)]
    pub kubelet_token_file: PathBuf,

    /// CA bundle (PEM) the kubelet's serving certificate must chain to.
    #[arg(long, env = "ERGON_KUBELET_CA_FILE", default_value = crate::workload::kubelet::SERVICE_ACCOUNT_CA)]
    pub kubelet_ca_file: PathBuf,

    /// Do not verify the kubelet's certificate (kubelets whose serving
    /// certificate is self-signed rather than issued by the cluster CA).
    #[arg(long, env = "ERGON_KUBELET_INSECURE_SKIP_TLS_VERIFY")]
    pub kubelet_insecure_skip_tls_verify: bool,

    /// Longest time between two kubelet polls; a new pod's cgroup asks for
    /// one sooner (at most one per --interval).
    #[arg(long, env = "ERGON_KUBELET_POLL_PERIOD", default_value = "60s", value_parser = parse_duration)]
    pub kubelet_poll_period: Duration,

    /// Grid carbon intensity in gCO2e/kWh, exported as
    /// ergon_grid_carbon_intensity_grams_per_kwh: a number, or a file holding
    /// one (re-read when it changes, so a CronJob or sidecar can update it).
    #[arg(long, env = "ERGON_CARBON_INTENSITY")]
    pub carbon_intensity: Option<String>,

    /// Pod label keys exported as labels (opt-in allow-list, comma-separated).
    #[arg(long, env = "ERGON_POD_LABELS", value_delimiter = ',')]
    pub pod_labels: Vec<String>,

    /// Counter checkpoint file, so counters survive restarts of the
    /// exporter. Default: ergon-checkpoint.json in --state-dir.
    #[arg(long, env = "ERGON_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,

    /// Directory for the exporter's state: the counter checkpoint, its lock
    /// and checkpoints set aside as unusable. Default: /var/lib/ergon (where
    /// it cannot be created, Ergon runs without a checkpoint and says so).
    #[arg(long, env = "ERGON_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Keep no checkpoint: every counter starts from zero at each restart.
    #[arg(long, env = "ERGON_NO_CHECKPOINT", conflicts_with_all = ["checkpoint", "state_dir"])]
    pub no_checkpoint: bool,

    /// How long a workload whose cgroup disappeared keeps its final counters.
    #[arg(long, env = "ERGON_RETENTION", default_value = "15m", value_parser = parse_duration)]
    pub retention: Duration,

    /// Also emit another exporter's metric names.
    #[arg(long, env = "ERGON_COMPAT", value_enum)]
    pub compat: Option<Compat>,

    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs
    /// --tls-key-file. Reloaded when the file changes (a renewed Secret).
    #[arg(long, env = "ERGON_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "ERGON_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Serve /metrics only to bearer tokens the Kubernetes API authorizes
    /// (TokenReview, then SubjectAccessReview of `get` on the non-resource
    /// URL /metrics), as kube-rbac-proxy does. /healthz and /readyz stay open.
    #[arg(long, env = "ERGON_AUTHORIZE_METRICS")]
    pub authorize_metrics: bool,

    /// /healthz fails (so the kubelet restarts the exporter) after this many
    /// intervals in a row without a measurement.
    #[arg(
        long,
        env = "ERGON_UNHEALTHY_AFTER_FAILED_INTERVALS",
        default_value_t = crate::export::DEFAULT_UNHEALTHY_AFTER,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub unhealthy_after_failed_intervals: u32,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ergon=debug`.
    #[arg(long, env = "ERGON_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what was detected (kernel, BTF, hook, PMU, meters, cgroups,
    /// Kubernetes) and, for each thing that is off, why and the fix.
    Doctor,
}

/// Parses `5s`, `500ms`, `15m`, `1h`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 5s, 500ms, 15m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
            ));
        }
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the configuration file {path} is not a YAML mapping of flag names to values: {detail}"
    )]
    Format { path: PathBuf, detail: String },
}

/// Turns the YAML file's keys into `--key=value` arguments, skipping keys
/// whose `ERGON_*` variable is set (environment beats the file).
fn file_args(path: &Path, env_set: impl Fn(&str) -> bool) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let format_error = |detail: String| ConfigError::Format {
        path: path.to_owned(),
        detail,
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format_error(e.to_string()))?;
    let serde_yaml::Value::Mapping(map) = value else {
        return Err(format_error("the top level is not a mapping".into()));
    };
    let mut args = Vec::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| format_error(format!("key {key:?} is not a string")))?
            .replace('_', "-");
        if key == "config" {
            return Err(format_error(
                "`config` cannot be set from the file itself".into(),
            ));
        }
        let env_name = format!("ERGON_{}", key.to_uppercase().replace('-', "_"));
        if env_set(&env_name) {
            continue;
        }
        let scalar = |v: &serde_yaml::Value| -> Result<String, ConfigError> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                other => Err(format_error(format!(
                    "`{key}`: unsupported value {other:?}"
                ))),
            }
        };
        match value {
            serde_yaml::Value::Bool(true) => args.push(format!("--{key}")),
            serde_yaml::Value::Bool(false) => {}
            serde_yaml::Value::Sequence(items) => {
                let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
                args.push(format!("--{key}={}", items.join(",")));
            }
            other => args.push(format!("--{key}={}", scalar(&other)?)),
        }
    }
    Ok(args)
}

impl Cli {
    /// Parses the process's arguments, environment and configuration file.
    /// Errors and `--help` exit the process, as clap does.
    pub fn load() -> Cli {
        let args: Vec<String> = std::env::args().collect();
        match Cli::load_from(&args, |name| std::env::var_os(name).is_some()) {
            Ok(cli) => cli,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }

    /// [`Cli::load`] over explicit arguments, for tests.
    pub fn load_from(args: &[String], env_set: impl Fn(&str) -> bool) -> Result<Cli, ConfigError> {
        let first = Cli::try_parse_from(args).unwrap_or_else(|e| e.exit());
        let Some(path) = first.config.clone() else {
            return Ok(first);
        };
        let mut merged = vec![args[0].clone()];
        merged.extend(file_args(&path, env_set)?);
        merged.extend(args[1..].iter().cloned());
        Ok(Cli::try_parse_from(&merged).unwrap_or_else(|e| e.exit()))
    }

    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            mode: self.probe,
            hook: self.hook,
            pmu: self.pmu,
            per_process: self.per_process,
            max_cgroups: self.max_cgroups,
            max_processes: self.max_processes,
            map_allocation: self.map_allocation,
            map_memory_budget_bytes: self.map_memory_budget_mib * 1024 * 1024,
            host_proc: self.host_proc.clone(),
            host_sys: self.host_sys.clone(),
            cgroup_root: self.cgroup_root(),
        }
    }

    /// Where the checkpoint is written: `--checkpoint`, else
    /// `ergon-checkpoint.json` in `--state-dir` (default
    /// [`DEFAULT_STATE_DIR`]); `None` with `--no-checkpoint`.
    pub fn checkpoint_path(&self) -> Option<PathBuf> {
        if self.no_checkpoint {
            return None;
        }
        if let Some(path) = &self.checkpoint {
            return Some(path.clone());
        }
        let dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Some(dir.join(crate::checkpoint::CHECKPOINT_FILE))
    }

    /// [`checkpoint_path`](Self::checkpoint_path), except that where the
    /// *default* state directory cannot be created (a developer's machine,
    /// a read-only root) the exporter runs without a checkpoint and says so
    /// once. A directory the operator chose is never given up silently: its
    /// errors are reported at every save.
    pub fn usable_checkpoint_path(&self) -> Option<PathBuf> {
        self.checkpoint_path_or_none_where(Path::new(DEFAULT_STATE_DIR))
    }

    fn checkpoint_path_or_none_where(&self, default_dir: &Path) -> Option<PathBuf> {
        if self.no_checkpoint {
            return None;
        }
        if self.checkpoint.is_some() || self.state_dir.is_some() {
            return self.checkpoint_path();
        }
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(default_dir)
        {
            Ok(()) => Some(default_dir.join(crate::checkpoint::CHECKPOINT_FILE)),
            Err(e) => {
                tracing::warn!(
                    "cannot create the state directory {} ({e}): running without a checkpoint, \
                     counters restart from zero; choose another with --state-dir, or silence \
                     this with --no-checkpoint",
                    default_dir.display()
                );
                None
            }
        }
    }

    /// The cgroup2 mount: `--cgroup-root` (its `unified` sub-directory when
    /// it names a hybrid host's v1 tmpfs), else detected under `--host-sys`.
    pub fn cgroup_root(&self) -> PathBuf {
        match &self.cgroup_root {
            Some(given) => crate::probe::cgroup2_within(given).unwrap_or_else(|| given.clone()),
            None => crate::probe::find_cgroup2_root(&self.host_sys)
                .unwrap_or_else(|| self.host_sys.join("fs/cgroup")),
        }
    }
}

impl Cli {
    /// `--kubelet-cgroup-root`, checked.
    pub fn kubelet_cgroup_roots(&self) -> Result<crate::workload::KubeletCgroupRoots, String> {
        crate::workload::KubeletCgroupRoots::parse(&self.kubelet_cgroup_root)
    }

    /// `--idle-watts package=20,dram=3` as (domain, watts) pairs.
    pub fn idle_watts(&self) -> Result<Vec<(crate::units::Domain, crate::units::Watts)>, String> {
        self.idle_watts
            .iter()
            .filter(|item| !item.trim().is_empty())
            .map(|item| {
                let (domain, watts) = item.split_once('=').ok_or_else(|| {
                    format!("--idle-watts `{item}`: write DOMAIN=WATTS, e.g. package=20")
                })?;
                let domain = crate::units::Domain::ALL
                    .into_iter()
                    .find(|d| d.as_str() == domain.trim())
                    .ok_or_else(|| {
                        format!(
                            "--idle-watts `{item}`: unknown domain `{domain}` (package, core, \
                             uncore, dram, psys, gpu, platform)"
                        )
                    })?;
                let watts: f64 = watts
                    .trim()
                    .parse()
                    .ok()
                    .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| {
                        format!("--idle-watts `{item}`: `{watts}` is not a non-negative number")
                    })?;
                Ok((domain, crate::units::Watts(watts)))
            })
            .collect()
    }

    /// The meters `--meter` asks for: `auto` detects; a list enables exactly
    /// those.
    pub fn meter_config(&self) -> Result<crate::meter::MeterConfig, String> {
        use crate::meter::{MeterConfig, ModelChoice, RaplInterface};
        let mut config = MeterConfig {
            host_sys: self.host_sys.clone(),
            host_proc: self.host_proc.clone(),
            nvml_library: self.nvml_library.clone(),
            ..MeterConfig::default()
        };
        if let Some(path) = &self.model_coefficients {
            config.model_overrides =
                Some(crate::meter::model::load_coefficients(path).map_err(|e| e.to_string())?);
        }
        let names: Vec<&str> = self
            .meter
            .iter()
            .map(|m| m.trim())
            .filter(|m| !m.is_empty())
            .collect();
        if names.is_empty() || names == ["auto"] {
            return Ok(config);
        }
        config.rapl = RaplInterface::Off;
        config.nvml = false;
        config.hwmon = false;
        config.model = ModelChoice::Off;
        for name in names {
            match name {
                "rapl" => config.rapl = RaplInterface::Powercap,
                "rapl-perf" => config.rapl = RaplInterface::Perf,
                "nvml" => config.nvml = true,
                "hwmon" => config.hwmon = true,
                "model" => config.model = ModelChoice::Always,
                other => {
                    return Err(format!(
                        "--meter: unknown meter `{other}`; use auto or a list of rapl, rapl-perf, \
                         nvml, hwmon, model"
                    ));
                }
            }
        }
        if config.model == ModelChoice::Always && config.rapl != RaplInterface::Off {
            return Err(
                "--meter: `model` estimates what `rapl`/`rapl-perf` measure, and both \
                        would be attributed (counted twice); choose one"
                    .into(),
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(
            parse_duration("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ergon.yaml");
        std::fs::write(
            &file,
            "listen: 127.0.0.1:9200\ninterval: 2s\nper_process: true\nmeter: [model, hwmon]\nhost-sys: /from/file\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        // File alone.
        let cli = Cli::load_from(&args(&["ergon", "--config", path]), |_| false).unwrap();
        assert_eq!(cli.listen.port(), 9200);
        assert_eq!(cli.interval, Duration::from_secs(2));
        assert!(cli.per_process);
        assert_eq!(cli.meter, vec!["model", "hwmon"]);
        // The flag wins over the file.
        let cli = Cli::load_from(
            &args(&["ergon", "--config", path, "--listen", "127.0.0.1:9300"]),
            |_| false,
        )
        .unwrap();
        assert_eq!(cli.listen.port(), 9300);
        // A key whose environment variable is set is not taken from the file.
        let cli = Cli::load_from(&args(&["ergon", "--config", path]), |name| {
            name == "ERGON_HOST_SYS"
        })
        .unwrap();
        assert_eq!(cli.host_sys, PathBuf::from("/sys"));
    }

    #[test]
    fn broken_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, "- just\n- a list\n").unwrap();
        let err = Cli::load_from(
            &args(&["ergon", "--config", file.to_str().unwrap()]),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.yaml") && err.contains("mapping"), "{err}");
        let missing = dir.path().join("missing.yaml");
        let err = Cli::load_from(
            &args(&["ergon", "--config", missing.to_str().unwrap()]),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
    }
    #[test]
    fn the_checkpoint_is_on_by_default_in_the_state_dir() {
        let path = |list: &[&str]| {
            Cli::load_from(&args(list), |_| false)
                .unwrap()
                .checkpoint_path()
        };
        assert_eq!(
            path(&["ergon"]),
            Some(PathBuf::from("/var/lib/ergon/ergon-checkpoint.json"))
        );
        assert_eq!(
            path(&["ergon", "--state-dir", "/srv/ergon"]),
            Some(PathBuf::from("/srv/ergon/ergon-checkpoint.json"))
        );
        assert_eq!(
            path(&["ergon", "--checkpoint", "/tmp/c.json"]),
            Some(PathBuf::from("/tmp/c.json"))
        );
        assert_eq!(path(&["ergon", "--no-checkpoint"]), None);
        let both = Cli::try_parse_from(["ergon", "--no-checkpoint", "--checkpoint", "/tmp/c.json"]);
        assert!(
            both.is_err(),
            "--no-checkpoint with --checkpoint was accepted"
        );
        // An explicit directory is used as given (created at the first save).
        let dir = tempfile::tempdir().unwrap();
        let chosen = dir.path().join("state");
        let cli = Cli::load_from(
            &args(&["ergon", "--state-dir", chosen.to_str().unwrap()]),
            |_| false,
        )
        .unwrap();
        assert_eq!(
            cli.usable_checkpoint_path(),
            Some(chosen.join("ergon-checkpoint.json"))
        );

        // The default directory: created where possible, else no checkpoint
        // (a developer's machine, a read-only root) instead of an error.
        let cli = Cli::load_from(&args(&["ergon"]), |_| false).unwrap();
        let default_dir = dir.path().join("var/lib/ergon");
        assert_eq!(
            cli.checkpoint_path_or_none_where(&default_dir),
            Some(default_dir.join("ergon-checkpoint.json"))
        );
        assert!(default_dir.is_dir());
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        assert_eq!(
            cli.checkpoint_path_or_none_where(&blocker.join("ergon")),
            None
        );
    }

    #[test]
    fn tls_files_come_in_pairs_and_the_health_threshold_is_positive() {
        let cli = Cli::try_parse_from(["ergon"]).unwrap();
        assert_eq!(cli.unhealthy_after_failed_intervals, 3);
        assert!(cli.tls_cert_file.is_none() && !cli.authorize_metrics);
        let err = Cli::try_parse_from(["ergon", "--tls-cert-file", "/tls/tls.crt"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-key-file"), "{err}");
        let cli = Cli::try_parse_from([
            "ergon",
            "--tls-cert-file=/tls/tls.crt",
            "--tls-key-file=/tls/tls.key",
            "--authorize-metrics",
            "--unhealthy-after-failed-intervals=5",
        ])
        .unwrap();
        assert_eq!(cli.tls_key_file, Some(PathBuf::from("/tls/tls.key")));
        assert!(cli.authorize_metrics);
        assert_eq!(cli.unhealthy_after_failed_intervals, 5);
        assert!(Cli::try_parse_from(["ergon", "--unhealthy-after-failed-intervals=0"]).is_err());
    }

    #[test]
    fn cgroup_root_finds_cgroup2_on_hybrid_hosts() {
        let host_sys = tempfile::tempdir().unwrap();
        let cgroup = host_sys.path().join("fs/cgroup");
        std::fs::create_dir_all(cgroup.join("cpuacct")).unwrap();
        std::fs::create_dir_all(cgroup.join("unified")).unwrap();
        std::fs::write(cgroup.join("unified/cgroup.controllers"), "").unwrap();
        let sys = format!("--host-sys={}", host_sys.path().display());
        // Detected under --host-sys.
        let cli = Cli::load_from(&args(&["ergon", &sys]), |_| false).unwrap();
        assert_eq!(cli.cgroup_root(), cgroup.join("unified"));
        // The v1 tmpfs passed as the root (as the chart did): its cgroup2.
        let given = format!("--cgroup-root={}", cgroup.display());
        let cli = Cli::load_from(&args(&["ergon", &given]), |_| false).unwrap();
        assert_eq!(cli.cgroup_root(), cgroup.join("unified"));
        // A unified host: the root itself.
        std::fs::write(cgroup.join("cgroup.controllers"), "").unwrap();
        let cli = Cli::load_from(&args(&["ergon", &sys]), |_| false).unwrap();
        assert_eq!(cli.cgroup_root(), cgroup);
    }

    #[test]
    fn idle_watts_and_meters_are_checked() {
        let cli = Cli::load_from(
            &args(&["ergon", "--idle-watts", "package=20,dram=3.5"]),
            |_| false,
        )
        .unwrap();
        assert_eq!(cli.idle_watts().unwrap().len(), 2);
        let cli = Cli::load_from(&args(&["ergon", "--idle-watts", "cpu=20"]), |_| false).unwrap();
        assert!(
            cli.idle_watts()
                .unwrap_err()
                .contains("unknown domain `cpu`")
        );
        let cli =
            Cli::load_from(&args(&["ergon", "--idle-watts", "package=-1"]), |_| false).unwrap();
        assert!(cli.idle_watts().unwrap_err().contains("non-negative"));
        let cli = Cli::load_from(&args(&["ergon", "--meter", "rapl,model"]), |_| false).unwrap();
        assert!(cli.meter_config().unwrap_err().contains("counted twice"));
        let cli = Cli::load_from(&args(&["ergon", "--meter", "rapl,hwmon"]), |_| false).unwrap();
        let meters = cli.meter_config().unwrap();
        assert!(!meters.nvml && meters.hwmon);
        let cli =
            Cli::load_from(&args(&["ergon", "--meter", "rapl,watt-o-meter"]), |_| false).unwrap();
        assert!(cli.meter_config().unwrap_err().contains("watt-o-meter"));
    }
}
