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

    /// Length of one measurement interval (e.g. 5s, 500ms), from 100ms to 1h.
    #[arg(long, env = "ERGON_INTERVAL", default_value = "5s", value_parser = parse_interval)]
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
    /// The same as adding `process` to --metrics.
    #[arg(long, env = "ERGON_PER_PROCESS")]
    pub per_process: bool,

    /// Series families to export, comma-separated (Kepler's levels): node,
    /// pod, container, process. `process` also turns on per-process
    /// accounting (as --per-process). Build, meter and probe health series
    /// are always exported.
    #[arg(
        long,
        env = "ERGON_METRICS",
        value_enum,
        value_delimiter = ',',
        default_value = "node,pod,container"
    )]
    pub metrics: Vec<crate::export::MetricLevel>,

    /// Bound of the kernel's cgroup map; more cgroups go to an overflow bucket.
    #[arg(long, env = "ERGON_MAX_CGROUPS", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(MAX_CGROUPS_RANGE))]
    pub max_cgroups: u32,

    /// Bound of the kernel's process map (with --per-process).
    #[arg(long, env = "ERGON_MAX_PROCESSES", default_value_t = 32768,
          value_parser = clap::value_parser!(u32).range(MAX_PROCESSES_RANGE))]
    pub max_processes: u32,

    /// Most memory the kernel maps may take when full, in MiB. Per-CPU
    /// values cost once per CPU: on big nodes the cgroup map's bound is
    /// lowered to fit (logged). Keep the pod's memory limit above this plus
    /// the exporter's own ~30 MiB peak.
    #[arg(long, env = "ERGON_MAP_MEMORY_BUDGET_MIB",
          default_value_t = crate::probe::map_memory::DEFAULT_BUDGET_MIB,
          value_parser = clap::value_parser!(u64).range(MAP_MEMORY_BUDGET_MIB_RANGE))]
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

    /// The most power one zone of a domain can draw (one socket's package,
    /// one GPU), e.g. `package=400,dram=100` (watts), where the device states
    /// no limit of its own. A reading above a zone's maximum is rejected and
    /// counted in ergon_meter_rejected_readings_total, never added. Defaults,
    /// generous for 2-socket servers and 8-GPU nodes: package=1000, core=1000,
    /// uncore=500, dram=500, psys=3000, gpu=2000, platform=20000.
    #[arg(long, env = "ERGON_MAX_WATTS", value_delimiter = ',')]
    pub max_watts: Vec<String>,

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

    /// Longest time between two kubelet polls, from 1s to 1h; a new pod's
    /// cgroup asks for one sooner (at most one per --interval).
    #[arg(long, env = "ERGON_KUBELET_POLL_PERIOD", default_value = "60s", value_parser = parse_kubelet_poll_period)]
    pub kubelet_poll_period: Duration,

    /// Grid carbon intensity in gCO2e/kWh, exported as
    /// ergon_grid_carbon_intensity_grams_per_kwh: a number from 0 to 10000,
    /// or a file holding one (re-read when it changes, so a
    /// CronJob or sidecar can update it).
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

    /// How long a workload whose cgroup disappeared keeps its final counters,
    /// from 1s to 7d and at least one --interval.
    #[arg(long, env = "ERGON_RETENTION", default_value = "15m", value_parser = parse_retention)]
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

    /// Also push the metrics every interval to this OpenTelemetry collector
    /// over OTLP/HTTP protobuf (e.g. http://otel-collector:4318; /v1/metrics
    /// is appended when no path is given).
    #[arg(long, env = "ERGON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

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

/// Accepted `--interval`: shorter intervals cost more CPU than they measure
/// (and RAPL counters update every ~1 ms); longer ones leave `rate()` blind.
pub const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// Accepted `--retention`: a week of a gone workload's counters is already
/// more series than most Prometheus servers want to keep.
pub const RETENTION_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));
/// Accepted `--max-cgroups`: each entry is kernel memory, per CPU.
pub const MAX_CGROUPS_RANGE: std::ops::RangeInclusive<i64> = 1..=1_048_576;
/// Accepted `--max-processes`: up to the kernel's own `pid_max` limit.
pub const MAX_PROCESSES_RANGE: std::ops::RangeInclusive<i64> = 1..=4_194_304;
/// Accepted `--idle-watts` per domain: above any single machine's draw, so
/// a typo (`2000000` for `20`) is refused rather than billed.
pub const MAX_IDLE_WATTS: f64 = 100_000.0;
/// Accepted `--max-watts` per domain: the same bound, for the same reason
/// (a ceiling that high would let any reading through).
pub const MAX_WATTS: f64 = MAX_IDLE_WATTS;
/// Accepted `--kubelet-poll-period`: more often than every second would
/// load the kubelet for names that change once per pod start (a new pod asks
/// for a poll sooner anyway); rarer than hourly leaves renamed pods stale.
pub const KUBELET_POLL_PERIOD_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// Accepted `--map-memory-budget-mib`: at least one MiB for the maps, at
/// most 64 GiB (far beyond the 1M-cgroup bound on any CPU count), so the
/// byte count can never overflow.
pub const MAP_MEMORY_BUDGET_MIB_RANGE: std::ops::RangeInclusive<u64> = 1..=65_536;
/// Accepted `--carbon-intensity`, in gCO2e/kWh. The dirtiest generation
/// (lignite, oil-fired peakers, small diesel sets) emits about 1,000-1,500
/// over its life cycle and grid averages stay below 1,200; ten thousand
/// leaves room for any real grid and still refuses a unit slip (kg for g is
/// harmless, mg for g is not).
pub const MAX_CARBON_INTENSITY: f64 = 10_000.0;
/// Most `--pod-labels` keys: each adds a label to every `ergon_pod_labels`
/// series.
pub const MAX_POD_LABELS: usize = 32;
/// Largest configuration file read: settings are a few hundred bytes.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Parses `5s`, `500ms`, `15m`, `1h`, `7d`, or bare seconds. Durations that
/// do not fit in a [`Duration`] are an error, never a panic.
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
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is too long a duration"))
}

/// Writes a range bound the way the flags take it (`100ms`, `1h`, `7d`).
fn duration_text(duration: Duration) -> String {
    let millis = duration.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if millis >= size && millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

fn parse_duration_in(text: &str, (min, max): (Duration, Duration)) -> Result<Duration, String> {
    let range = format!(
        "use a duration from {} to {}",
        duration_text(min),
        duration_text(max)
    );
    let duration = parse_duration(text).map_err(|e| format!("{e}: {range}"))?;
    if duration < min || duration > max {
        return Err(format!("`{}` is out of range: {range}", text.trim()));
    }
    Ok(duration)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, INTERVAL_RANGE)
}

fn parse_retention(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, RETENTION_RANGE)
}

fn parse_kubelet_poll_period(text: &str) -> Result<Duration, String> {
    parse_duration_in(text, KUBELET_POLL_PERIOD_RANGE)
}

/// Errors in the configuration, from any of its three sources.
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
    /// A flag or variable clap refused (or `--help`/`--version`).
    #[error("{0}")]
    Flags(clap::Error),
    /// A value clap refused that the configuration file supplied.
    #[error("{error}in the configuration file {path} (its keys are read as these flags)")]
    FileFlags { path: PathBuf, error: clap::Error },
    /// A value that parsed but is out of its accepted range.
    #[error("{0}")]
    Invalid(String),
    /// [`ConfigError::Invalid`] where the flags and variables alone pass:
    /// the configuration file gave the value (or one it conflicts with).
    #[error("{message} (in the configuration file {path})")]
    FileInvalid { path: PathBuf, message: String },
}

/// Turns the YAML file's keys into `--key=value` arguments, skipping keys
/// whose environment variable is set (environment beats the file).
fn file_args(path: &Path, env_set: impl Fn(&str) -> bool) -> Result<Vec<String>, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let Some(bytes) = crate::read_at_most(path, MAX_CONFIG_FILE_BYTES).map_err(read_error)? else {
        return Err(ConfigError::Format {
            path: path.to_owned(),
            detail: format!(
                "it is larger than {MAX_CONFIG_FILE_BYTES} bytes; settings take a few hundred: \
                 is it the right file?"
            ),
        });
    };
    let text = String::from_utf8(bytes)
        .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    settings_from_yaml(&text, env_set).map_err(|detail| ConfigError::Format {
        path: path.to_owned(),
        detail,
    })
}

/// The flags a YAML configuration text sets, as `--key=value` arguments.
/// Only keys that are settings are accepted (not `help`, `version`,
/// `config` or a subcommand); keys whose environment variable is set
/// (`env_set`) are skipped. Public for the fuzzers: it parses operator input
/// and must never panic.
pub fn settings_from_yaml(
    text: &str,
    env_set: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    use clap::CommandFactory;
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let map = match value {
        serde_yaml::Value::Mapping(map) => map,
        // An empty file (or only comments) sets nothing.
        serde_yaml::Value::Null => return Ok(Vec::new()),
        _ => return Err("the top level is not a mapping".into()),
    };
    let command = Cli::command();
    let settings: Vec<&clap::Arg> = command
        .get_arguments()
        .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version" | "config"))
        .filter(|arg| arg.get_long().is_some())
        .collect();
    let mut args = Vec::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| format!("key {key:?} is not a string"))?;
        let long = key.replace('_', "-");
        let Some(arg) = settings
            .iter()
            .find(|arg| arg.get_long() == Some(long.as_str()))
        else {
            let names: Vec<&str> = settings.iter().filter_map(|arg| arg.get_long()).collect();
            return Err(format!(
                "`{key}` is not a setting; the settings are: {}",
                names.join(", ")
            ));
        };
        if let Some(env) = arg.get_env()
            && env_set(&env.to_string_lossy())
        {
            continue;
        }
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let scalar = |v: &serde_yaml::Value| -> Result<String, String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                other => Err(format!(
                    "`{key}` (--{long}): write a string, number or list, not {}",
                    yaml_kind(other)
                )),
            }
        };
        match value {
            serde_yaml::Value::Bool(true) if is_switch => args.push(format!("--{long}")),
            serde_yaml::Value::Bool(false) if is_switch => {}
            other if is_switch => {
                return Err(format!(
                    "`{key}` (--{long}) is a switch: write true or false, not {}",
                    yaml_kind(&other)
                ));
            }
            serde_yaml::Value::Sequence(items) => {
                let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
                args.push(format!("--{long}={}", items.join(",")));
            }
            other => args.push(format!("--{long}={}", scalar(&other)?)),
        }
    }
    Ok(args)
}

fn yaml_kind(value: &serde_yaml::Value) -> &'static str {
    match value {
        serde_yaml::Value::Null => "an empty value",
        serde_yaml::Value::Bool(_) => "a boolean",
        serde_yaml::Value::Number(_) => "a number",
        serde_yaml::Value::String(_) => "a string",
        serde_yaml::Value::Sequence(_) => "a list",
        serde_yaml::Value::Mapping(_) => "a mapping",
        serde_yaml::Value::Tagged(_) => "a tagged value",
    }
}

impl Cli {
    /// Parses the process's arguments, environment and configuration file.
    /// `--help` and `--version` print and exit 0; every error prints one
    /// message naming the setting and exits 2, as clap does.
    pub fn load() -> Cli {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        match Cli::load_from(&args, |name| std::env::var_os(name).is_some()) {
            Ok(cli) => cli,
            Err(ConfigError::Flags(e)) => e.exit(),
            Err(ConfigError::FileFlags { path, error }) => {
                eprint!("{}", error.render());
                eprintln!(
                    "note: the value came from the configuration file {}",
                    path.display()
                );
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }

    /// [`Cli::load`] over explicit arguments, for tests: nothing exits.
    pub fn load_from<T: Into<std::ffi::OsString> + Clone>(
        args: &[T],
        env_set: impl Fn(&str) -> bool,
    ) -> Result<Cli, ConfigError> {
        let first = Cli::try_parse_from(args.iter().cloned()).map_err(ConfigError::Flags)?;
        let Some(path) = first.config.clone() else {
            first.validate()?;
            return Ok(first);
        };
        let args: Vec<std::ffi::OsString> = args.iter().cloned().map(Into::into).collect();
        let mut merged = vec![args[0].clone()];
        merged.extend(file_args(&path, env_set)?.into_iter().map(Into::into));
        merged.extend(args[1..].iter().cloned());
        let cli = Cli::try_parse_from(&merged).map_err(|error| ConfigError::FileFlags {
            path: path.clone(),
            error,
        })?;
        if let Err(error) = cli.validate() {
            // Name the file unless the flags and variables alone are
            // already refused (then the value is theirs).
            if first.validate().is_err() {
                return Err(error);
            }
            return Err(ConfigError::FileInvalid {
                path,
                message: error.to_string(),
            });
        }
        Ok(cli)
    }

    /// Range and existence checks clap's parsers cannot make alone: the
    /// relation between flags, the host paths, and the list-valued flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |text: String| ConfigError::Invalid(text);
        if self.retention < self.interval {
            return Err(invalid(format!(
                "--retention {} is shorter than --interval {}: a gone workload's counters \
                 must outlive one interval; raise --retention",
                duration_text(self.retention),
                duration_text(self.interval)
            )));
        }
        let directories = [
            ("--host-sys", Some(&self.host_sys)),
            ("--host-proc", Some(&self.host_proc)),
            ("--cgroup-root", self.cgroup_root.as_ref()),
        ];
        for (flag, path) in directories {
            if let Some(path) = path
                && !path.is_dir()
            {
                return Err(invalid(format!(
                    "{flag} {}: not a directory; point it at the host's mount (e.g. /host/sys, \
                     /host/proc, /host/sys/fs/cgroup)",
                    path.display()
                )));
            }
        }
        if let Some(path) = &self.kubeconfig
            && !path.is_file()
        {
            return Err(invalid(format!(
                "--kubeconfig {}: no such file",
                path.display()
            )));
        }
        let outputs = [
            ("--checkpoint", &self.checkpoint),
            ("--model-fit-output", &self.model_fit_output),
        ];
        for (flag, path) in outputs {
            let Some(path) = path else { continue };
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(parent) = parent
                && !parent.is_dir()
            {
                return Err(invalid(format!(
                    "{flag} {}: its directory {} does not exist; create it or mount one there",
                    path.display(),
                    parent.display()
                )));
            }
        }
        if let Some(url) = &self.kube_api {
            check_kube_api(url).map_err(invalid)?;
        }
        if let Some(node) = &self.node_name {
            check_node_name(node).map_err(invalid)?;
        }
        check_pod_labels(&self.pod_label_keys()).map_err(invalid)?;
        self.idle_watts().map_err(invalid)?;
        self.meter_config().map_err(invalid)?;
        self.kubelet_cgroup_roots().map_err(invalid)?;
        self.carbon_source().map_err(invalid)?;
        if let Some(endpoint) = &self.otlp_endpoint {
            // The push's own check of its URL, before anything starts.
            crate::export::otlp::metrics_url(endpoint).map_err(|e| invalid(e.to_string()))?;
        }
        // Only that the files are there: their content is loaded (and
        // reloaded as it changes) when the server starts.
        let tls_files = [
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-key-file", &self.tls_key_file),
        ];
        for (flag, path) in tls_files {
            if let Some(path) = path {
                check_readable_file(flag, path).map_err(invalid)?;
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log).map_err(|e| {
            invalid(format!(
                "--log `{}` is not a log filter ({e}): use a level (error, warn, info, debug, \
                 trace) or e.g. `ergon=debug,info`",
                self.log
            ))
        })?;
        Ok(())
    }

    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            mode: self.probe,
            hook: self.hook,
            pmu: self.pmu,
            per_process: self.metric_levels().process,
            max_cgroups: self.max_cgroups,
            max_processes: self.max_processes,
            map_allocation: self.map_allocation,
            read_task_fields: true,
            // Ranged by its parser; saturating for a value set past it.
            map_memory_budget_bytes: self.map_memory_budget_mib.saturating_mul(1024 * 1024),
            host_proc: self.host_proc.clone(),
            host_sys: self.host_sys.clone(),
            cgroup_root: self.cgroup_root(),
        }
    }

    /// `--metrics` with `--per-process` folded in: either one turns on the
    /// process level and the kernel's per-process accounting it needs.
    pub fn metric_levels(&self) -> crate::export::MetricLevels {
        let mut levels = crate::export::MetricLevels::from_levels(&self.metrics);
        levels.process |= self.per_process;
        levels
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
    /// How to poll the kubelet (`--pod-source kubelet`/`auto`): `None`
    /// without a node name or `--kubelet-url` to find it by.
    pub fn kubelet_config(&self) -> Option<crate::workload::KubeletConfig> {
        let node = self.node_name.as_deref().unwrap_or_default();
        let url = match &self.kubelet_url {
            Some(url) => url.clone(),
            None if node.is_empty() => return None,
            None => format!("https://{node}:{}", crate::workload::kubelet::KUBELET_PORT),
        };
        let mut config = crate::workload::KubeletConfig::new(url);
        config.token_file = Some(self.kubelet_token_file.clone());
        config.ca_file = Some(self.kubelet_ca_file.clone());
        config.insecure_skip_tls_verify = self.kubelet_insecure_skip_tls_verify;
        // The same keys as the API server watch: trimmed, no repeats.
        config.label_allowlist = self.pod_label_keys();
        config.deleted_retention = self.retention;
        config.period = self.kubelet_poll_period;
        config.min_gap = self.interval;
        Some(config)
    }

    /// `--carbon-intensity`, checked: a number of gCO2e/kWh from 0 to
    /// [`MAX_CARBON_INTENSITY`], or a readable regular file (or one not
    /// there yet, in an existing directory). A
    /// value that starts like a number is a number (`35O`, a typo, is
    /// refused rather than taken for a file that never appears).
    pub fn carbon_source(&self) -> Result<Option<crate::carbon::CarbonSource>, String> {
        use crate::carbon::{CarbonSource, GramsPerKwh};
        let Some(given) = self.carbon_intensity.as_deref() else {
            return Ok(None);
        };
        let text = given.trim();
        let accepted = format!(
            "give gCO2e/kWh as a number from 0 to {MAX_CARBON_INTENSITY} (e.g. 350), or the \
             path of a file holding one (in an existing directory)"
        );
        if text.is_empty() {
            return Err(format!("--carbon-intensity is empty: {accepted}"));
        }
        let mut chars = text.chars();
        let first = chars.next().unwrap_or_default();
        let second = chars.next().unwrap_or_default();
        let numeric = first.is_ascii_digit()
            || (matches!(first, '+' | '-' | '.') && second.is_ascii_digit())
            || text.parse::<f64>().is_ok();
        if numeric {
            return text
                .parse::<f64>()
                .ok()
                .filter(|value| (0.0..=MAX_CARBON_INTENSITY).contains(value))
                .map(|value| Some(CarbonSource::Fixed(GramsPerKwh(value))))
                .ok_or_else(|| {
                    format!("--carbon-intensity `{text}` is not a carbon intensity: {accepted}")
                });
        }
        let path = PathBuf::from(text);
        // A file another container writes may not be there yet: one not
        // there in an existing directory is awaited (a WARN until it
        // appears, as when it later becomes unreadable); one that is there
        // must be a readable file.
        let awaited = !path.exists() && path.parent().is_some_and(|dir| dir.is_dir());
        if !awaited {
            check_readable_file("--carbon-intensity", &path)
                .map_err(|reason| format!("{reason}; {accepted}"))?;
        }
        Ok(Some(CarbonSource::File(path)))
    }

    /// `--kubelet-cgroup-root`, checked.
    pub fn kubelet_cgroup_roots(&self) -> Result<crate::workload::KubeletCgroupRoots, String> {
        crate::workload::KubeletCgroupRoots::parse(&self.kubelet_cgroup_root)
    }

    /// The `--pod-labels` keys, trimmed, without empty items or repeats.
    pub fn pod_label_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for key in self.pod_labels.iter().map(|k| k.trim()) {
            if !key.is_empty() && !keys.iter().any(|known| known == key) {
                keys.push(key.to_owned());
            }
        }
        keys
    }

    /// `--idle-watts package=20,dram=3` as (domain, watts) pairs.
    pub fn idle_watts(&self) -> Result<Vec<(crate::units::Domain, crate::units::Watts)>, String> {
        domain_watts("--idle-watts", &self.idle_watts, 0.0, MAX_IDLE_WATTS)
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
        let ceilings = domain_watts("--max-watts", &self.max_watts, f64::MIN_POSITIVE, MAX_WATTS)?;
        for (domain, watts) in ceilings {
            config.max_watts.set(domain, watts);
        }
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

/// `DOMAIN=WATTS` items of `flag` as (domain, watts) pairs, each at least
/// `least` and at most `most` watts.
fn domain_watts(
    flag: &str,
    items: &[String],
    least: f64,
    most: f64,
) -> Result<Vec<(crate::units::Domain, crate::units::Watts)>, String> {
    items
        .iter()
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (domain, watts) = item
                .split_once('=')
                .ok_or_else(|| format!("{flag} `{item}`: write DOMAIN=WATTS, e.g. package=20"))?;
            let domain = crate::units::Domain::ALL
                .into_iter()
                .find(|d| d.as_str() == domain.trim())
                .ok_or_else(|| {
                    format!(
                        "{flag} `{item}`: unknown domain `{domain}` (package, core, uncore, dram, \
                         psys, gpu, platform)"
                    )
                })?;
            let watts: f64 = watts
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| (least..=most).contains(w))
                .ok_or_else(|| {
                    let kind = if least > 0.0 {
                        "positive"
                    } else {
                        "non-negative"
                    };
                    format!(
                        "{flag} `{item}`: `{watts}` is not a {kind} number of watts up to {most}"
                    )
                })?;
            Ok((domain, crate::units::Watts(watts)))
        })
        .collect()
}

/// `--kube-api`: an absolute `http://` or `https://` URL with a host.
fn check_kube_api(url: &str) -> Result<(), String> {
    let parsed: hyper::Uri = url.parse().map_err(|e| {
        format!("--kube-api `{url}` is not a URL ({e}): use e.g. https://10.0.0.1:6443")
    })?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !scheme_ok || parsed.host().is_none() {
        return Err(format!(
            "--kube-api `{url}`: use an http:// or https:// URL with a host, e.g. \
             https://10.0.0.1:6443"
        ));
    }
    Ok(())
}

/// A file the exporter will read: it exists, is a regular file (not a
/// directory, a FIFO or a device) and opens for reading. Nothing is read.
fn check_readable_file(flag: &str, path: &Path) -> Result<(), String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) => Err(format!("{flag} {shown}: {e}")),
        Ok(meta) if !meta.is_file() => Err(format!("{flag} {shown}: not a regular file")),
        // Opening a regular file has no side effect.
        Ok(_) => std::fs::File::open(path)
            .map(drop)
            .map_err(|e| format!("{flag} {shown}: cannot be read ({e})")),
    }
}

/// `--node-name`: Kubernetes node names are RFC 1123 DNS subdomains.
fn check_node_name(node: &str) -> Result<(), String> {
    if is_dns_subdomain(node) {
        Ok(())
    } else {
        Err(format!(
            "--node-name `{node}` is not a Kubernetes node name (lower-case letters, digits, \
             `-` and `.`, at most 253 characters): set it from the downward API's spec.nodeName"
        ))
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// `--pod-labels`: Kubernetes label keys (`[prefix/]name`), at most
/// [`MAX_POD_LABELS`] of them. Each becomes a Prometheus label name, so an
/// invalid key would make `/metrics` unparsable.
fn check_pod_labels(keys: &[String]) -> Result<(), String> {
    if keys.len() > MAX_POD_LABELS {
        return Err(format!(
            "--pod-labels: {} keys; at most {MAX_POD_LABELS} are exported",
            keys.len()
        ));
    }
    let mut label_names: Vec<(String, &str)> = Vec::new();
    for key in keys {
        let label_name = crate::export::pod_label_name(key);
        if let Some((_, other)) = label_names.iter().find(|(name, _)| *name == label_name) {
            return Err(format!(
                "--pod-labels `{other}` and `{key}` would both be exported as `{label_name}`: \
                 keep one"
            ));
        }
        label_names.push((label_name, key));
        let (prefix, name) = match key.split_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok || !prefix.is_none_or(is_dns_subdomain) {
            return Err(format!(
                "--pod-labels `{key}` is not a Kubernetes label key ([prefix/]name: a name of \
                 at most 63 letters, digits, `-`, `_` or `.`, an optional DNS prefix)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The error of loading `list`, as the operator would read it.
    fn refused(list: &[&str]) -> String {
        Cli::load_from(&args(list), |_| false)
            .unwrap_err()
            .to_string()
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
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn durations_too_long_for_a_duration_are_errors_not_panics() {
        let err = parse_duration("99999999999999999999h").unwrap_err();
        assert!(err.contains("too long"), "{err}");
        let err = parse_interval("99999999999999999999h").unwrap_err();
        assert!(err.contains("from 100ms to 1h"), "{err}");
        let err = parse_interval("50ms").unwrap_err();
        assert!(
            err.contains("out of range") && err.contains("100ms"),
            "{err}"
        );
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        let err = parse_retention("8d").unwrap_err();
        assert!(err.contains("from 1s to 7d"), "{err}");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn file_keys_must_be_settings_of_the_right_shape() {
        let refused = |text: &str| settings_from_yaml(text, |_| false).unwrap_err();
        for key in ["help", "version", "config", "doctor", "listn"] {
            let err = refused(&format!("{key}: true\n"));
            assert!(err.contains(&format!("`{key}` is not a setting")), "{err}");
            assert!(err.contains("listen, interval"), "{err}");
        }
        let err = refused("per_process: 1\n");
        assert!(
            err.contains("--per-process") && err.contains("switch"),
            "{err}"
        );
        let err = refused("listen: {port: 1}\n");
        assert!(
            err.contains("`listen`") && err.contains("a mapping"),
            "{err}"
        );
        assert!(refused("- a\n- b\n").contains("mapping"));
        assert_eq!(settings_from_yaml("# nothing\n", |_| false), Ok(vec![]));
        assert_eq!(
            settings_from_yaml("per-process: false\nmax_cgroups: 10\n", |_| false),
            Ok(vec!["--max-cgroups=10".to_string()])
        );
        // The variable that overrides a key is the flag's own (NODE_NAME for
        // node-name), not a name derived from the key.
        assert_eq!(
            settings_from_yaml("node-name: n1\n", |name| name == "NODE_NAME"),
            Ok(vec![])
        );
    }

    #[test]
    fn values_are_checked_against_their_range_and_named() {
        let err = refused(&["ergon", "--interval", "10s", "--retention", "5s"]);
        assert!(
            err.contains("--retention 5s") && err.contains("--interval 10s"),
            "{err}"
        );
        let err = refused(&["ergon", "--max-cgroups", "0"]);
        assert!(err.contains("--max-cgroups"), "{err}");
        let err = refused(&["ergon", "--host-proc", "/nonexistent/proc"]);
        assert!(err.contains("--host-proc /nonexistent/proc"), "{err}");
        let err = refused(&["ergon", "--kube-api", "ftp://api"]);
        assert!(err.contains("--kube-api `ftp://api`"), "{err}");
        let err = refused(&["ergon", "--node-name", "Node_1"]);
        assert!(err.contains("--node-name `Node_1`"), "{err}");
        let err = refused(&["ergon", "--pod-labels", "app,bad key"]);
        assert!(err.contains("--pod-labels `bad key`"), "{err}");
        let err = refused(&["ergon", "--pod-labels", "app.kind,app_kind"]);
        assert!(err.contains("label_app_kind"), "{err}");
        let many: Vec<String> = (0..=MAX_POD_LABELS).map(|i| format!("k{i}")).collect();
        let err = refused(&["ergon", "--pod-labels", &many.join(",")]);
        assert!(err.contains("at most 32"), "{err}");
        let err = refused(&["ergon", "--idle-watts", "package=200000"]);
        assert!(
            err.contains("--idle-watts") && err.contains("100000"),
            "{err}"
        );
        let err = refused(&["ergon", "--log", "ergon=loud"]);
        assert!(err.contains("--log `ergon=loud`"), "{err}");
        let cli = Cli::load_from(
            &args(&[
                "ergon",
                "--pod-labels",
                "app,app.kubernetes.io/name",
                "--node-name",
                "edge-1.example",
                "--kube-api",
                "http://127.0.0.1:8080",
            ]),
            |_| false,
        )
        .unwrap();
        assert_eq!(cli.pod_labels, vec!["app", "app.kubernetes.io/name"]);
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ergon.yaml");
        std::fs::write(
            &file,
            format!(
                "listen: 127.0.0.1:9200\ninterval: 2s\nper_process: true\nmeter: [model, hwmon]\nhost-sys: {}\n",
                dir.path().display()
            ),
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
    fn max_watts_set_ceilings_and_are_checked() {
        use crate::units::{Domain, Watts};
        let cli = Cli::load_from(
            &args(&["ergon", "--max-watts", "package=400,gpu=700"]),
            |_| false,
        )
        .unwrap();
        let ceilings = cli.meter_config().unwrap().max_watts;
        assert_eq!(ceilings.get(Domain::Package), Watts(400.0));
        assert_eq!(ceilings.get(Domain::Gpu), Watts(700.0));
        assert_eq!(ceilings.get(Domain::Dram), Watts(500.0), "defaults stay");
        for (bad, says) in [
            ("package=NaN", "positive"),
            ("gpu=1e6", "100000"),
            ("package=0", "positive"),
            ("package=-5", "positive"),
            ("package=inf", "positive"),
            ("cpu=100", "unknown domain"),
            ("package", "DOMAIN=WATTS"),
        ] {
            // Refused when the settings are loaded, or at the latest when
            // the meters are configured.
            let err = match Cli::load_from(&args(&["ergon", "--max-watts", bad]), |_| false) {
                Err(e) => e.to_string(),
                Ok(cli) => cli.meter_config().unwrap_err(),
            };
            assert!(
                err.contains("--max-watts") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_kubelet_poller_gets_the_same_label_keys_as_the_api_server_watch() {
        // `ERGON_POD_LABELS="app, team"`: " team" would never match a label.
        let cli = Cli::load_from(
            &args(&[
                "ergon",
                "--node-name=node-a",
                "--pod-labels",
                "app, team,app,,",
            ]),
            |_| false,
        )
        .unwrap();
        let config = cli.kubelet_config().unwrap();
        assert_eq!(config.label_allowlist, vec!["app", "team"]);
        assert_eq!(config.label_allowlist, cli.pod_label_keys());
        assert_eq!(config.url, "https://node-a:10250");
        assert_eq!(config.period, Duration::from_secs(60));
        let cli = Cli::load_from(&args(&["ergon"]), |_| false).unwrap();
        assert!(cli.kubelet_config().is_none(), "no node, no kubelet URL");
    }

    #[test]
    fn the_kubelet_poll_period_and_map_budget_have_ranges() {
        for bad in ["10000000000000000000", "0.000001", "1ns", "999ms", "61m"] {
            let err = refused(&["ergon", "--kubelet-poll-period", bad]);
            assert!(
                err.contains("--kubelet-poll-period") && err.contains("from 1s to 1h"),
                "{bad}: {err}"
            );
        }
        let cli = Cli::load_from(&args(&["ergon", "--kubelet-poll-period=1h"]), |_| false).unwrap();
        assert_eq!(cli.kubelet_poll_period, Duration::from_secs(3600));
        for bad in ["18446744073709551615", "17592186044416", "0", "65537"] {
            let err = refused(&["ergon", "--map-memory-budget-mib", bad]);
            assert!(
                err.contains("--map-memory-budget-mib") && err.contains("65536"),
                "{bad}: {err}"
            );
        }
        let cli = Cli::load_from(&args(&["ergon", "--map-memory-budget-mib=65536"]), |_| {
            false
        })
        .unwrap();
        assert_eq!(cli.probe_config().map_memory_budget_bytes, 65536 << 20);
        // Built by hand past the parser: saturates, never wraps or panics.
        let mut cli = cli;
        cli.map_memory_budget_mib = u64::MAX;
        assert_eq!(cli.probe_config().map_memory_budget_bytes, u64::MAX);
    }

    #[test]
    fn carbon_intensity_is_a_number_in_range_or_a_file_in_an_existing_directory() {
        use crate::carbon::{CarbonSource, GramsPerKwh};
        let source = |value: &str| {
            Cli::load_from(
                &args(&["ergon", &format!("--carbon-intensity={value}")]),
                |_| false,
            )
            .map(|cli| cli.carbon_source().unwrap())
        };
        assert_eq!(
            source("350").unwrap(),
            Some(CarbonSource::Fixed(GramsPerKwh(350.0)))
        );
        assert_eq!(
            source(" 0.5 ").unwrap(),
            Some(CarbonSource::Fixed(GramsPerKwh(0.5)))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("intensity");
        std::fs::write(&file, "412\n").unwrap();
        assert_eq!(
            source(file.to_str().unwrap()).unwrap(),
            Some(CarbonSource::File(file.clone()))
        );
        assert_eq!(
            Cli::load_from(&args(&["ergon"]), |_| false)
                .unwrap()
                .carbon_source(),
            Ok(None)
        );
        // Not there yet, in a directory that is: awaited.
        let later = dir.path().join("written-later");
        assert_eq!(
            source(later.to_str().unwrap()).unwrap(),
            Some(CarbonSource::File(later.clone()))
        );
        let missing = dir.path().join("no-such-dir/intensity");
        for bad in [
            "35O",
            "350g",
            "-5",
            "+1e9",
            "20000",
            "NaN",
            "inf",
            ".5x",
            "",
            missing.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ] {
            let err = source(bad).unwrap_err().to_string();
            assert!(
                err.contains("--carbon-intensity") && err.contains("10000"),
                "{bad}: {err}"
            );
            assert!(err.contains(bad.trim()), "{bad}: {err}");
        }
    }

    #[test]
    fn kubelet_cgroup_roots_endpoints_and_tls_files_are_checked_at_load() {
        let err = refused(&["ergon", "--kubelet-cgroup-root", "/,kubelet.slice"]);
        assert!(
            err.contains("--kubelet-cgroup-root `kubelet.slice`"),
            "{err}"
        );
        for bad in [
            "https://collector:4318",
            "http://collector:43x8",
            "http://",
            "http://collector:4318/v1 metrics",
            "collector:4318",
        ] {
            let err = refused(&["ergon", "--otlp-endpoint", bad]);
            assert!(
                err.contains(&format!("--otlp-endpoint `{bad}`"))
                    && err.contains("http://otel-collector:4318"),
                "{bad}: {err}"
            );
        }
        Cli::load_from(
            &args(&[
                "ergon",
                "--otlp-endpoint",
                "http://10.0.0.1:4318/otlp/v1/metrics",
            ]),
            |_| false,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, "-").unwrap();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let err = refused(&["ergon", "--tls-cert-file", cert, "--tls-key-file", key]);
        assert!(err.contains(&format!("--tls-key-file {key}")), "{err}");
        let folder = dir.path().to_str().unwrap();
        let err = refused(&["ergon", "--tls-cert-file", folder, "--tls-key-file", cert]);
        assert!(
            err.contains(&format!("--tls-cert-file {folder}")) && err.contains("regular file"),
            "{err}"
        );
        // Present and readable: the content is checked when TLS is set up.
        Cli::load_from(
            &args(&["ergon", "--tls-cert-file", cert, "--tls-key-file", cert]),
            |_| false,
        )
        .unwrap();
    }

    #[test]
    fn a_value_refused_after_parsing_names_the_file_that_gave_it() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "kubelet-cgroup-root: kubelet.slice\n",
            "carbon-intensity: 35O\n",
            "retention: 1s\ninterval: 2s\n",
        ] {
            let file = dir.path().join("settings.yaml");
            std::fs::write(&file, text).unwrap();
            let err = refused(&["ergon", "--config", file.to_str().unwrap()]);
            assert!(err.contains("settings.yaml"), "{text}: {err}");
        }
        // A flag's own bad value is not blamed on the file.
        let file = dir.path().join("settings.yaml");
        std::fs::write(&file, "interval: 2s\n").unwrap();
        let err = refused(&[
            "ergon",
            "--config",
            file.to_str().unwrap(),
            "--kubelet-cgroup-root=kubelet.slice",
        ]);
        assert!(!err.contains("settings.yaml"), "{err}");
    }

    #[test]
    fn idle_watts_and_meters_are_checked() {
        // Checked when the configuration is loaded, so a bad value stops
        // the exporter before it starts.
        let cli = Cli::load_from(
            &args(&["ergon", "--idle-watts", "package=20,dram=3.5"]),
            |_| false,
        )
        .unwrap();
        assert_eq!(cli.idle_watts().unwrap().len(), 2);
        assert!(refused(&["ergon", "--idle-watts", "cpu=20"]).contains("unknown domain `cpu`"));
        assert!(refused(&["ergon", "--idle-watts", "package=-1"]).contains("non-negative"));
        assert!(refused(&["ergon", "--idle-watts", "package=NaN"]).contains("non-negative"));
        assert!(refused(&["ergon", "--meter", "rapl,model"]).contains("counted twice"));
        let cli = Cli::load_from(&args(&["ergon", "--meter", "rapl,hwmon"]), |_| false).unwrap();
        let meters = cli.meter_config().unwrap();
        assert!(!meters.nvml && meters.hwmon);
        assert!(refused(&["ergon", "--meter", "rapl,watt-o-meter"]).contains("watt-o-meter"));
    }
}
