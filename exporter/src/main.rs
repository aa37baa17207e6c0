//! The `ergon` binary: load configuration, start the probe, meters and pod
//! watcher, measure on a thread, serve metrics on the async runtime.

use anyhow::Context;
use ergon::config::{Cli, Command, PodSource};
use ergon::export::{self, Published, ServerHandle};
use ergon::interval::{Loop, Settings};
use ergon::probe::Probe;
use ergon::workload::{ApiSource, KubeletPoller, PodDirectory, PodWatcher, PodWatcherConfig};

fn main() -> anyhow::Result<()> {
    let cli = Cli::load();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .with_context(|| format!("--log `{}` is not a valid log filter", cli.log))?;
    // Colours only on a terminal: in a container's log they are escape codes.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();

    if let Some(Command::Doctor) = cli.command {
        return ergon::doctor::run(&cli);
    }
    // All checked by `Cli::load` already (an error there exits 2 naming
    // the setting); these only take the values.
    let idle_watts = cli.idle_watts().map_err(anyhow::Error::msg)?;
    let meter_config = cli.meter_config().map_err(anyhow::Error::msg)?;
    let kubelet_roots = cli.kubelet_cgroup_roots().map_err(anyhow::Error::msg)?;
    let carbon_source = cli.carbon_source().map_err(anyhow::Error::msg)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first: a taken port is reported before any probe work.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(cli.listen))
        .with_context(|| {
            format!(
                "cannot listen on {}: is another exporter running? choose another with --listen",
                cli.listen
            )
        })?;

    let probe = Probe::start(&cli.probe_config()).context("starting the probe")?;
    let meters = ergon::meter::detect(&meter_config);
    let watcher = runtime.block_on(start_pod_feed(&cli));
    let pods = watcher
        .as_ref()
        .map(|w| w.directory().clone())
        .unwrap_or_else(PodDirectory::new);

    let settings = Settings {
        interval: cli.interval,
        idle_policy: cli.idle_policy,
        idle_watts,
        per_process: cli.metric_levels().process,
        metrics: cli.metric_levels(),
        retention: cli.retention,
        compat: cli.compat,
        node_name: cli.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string(cli.host_proc.join("sys/kernel/hostname"))
                .map(|name| name.trim().to_owned())
                .unwrap_or_default()
        }),
        checkpoint: cli.usable_checkpoint_path(),
        host_proc: cli.host_proc.clone(),
        cgroup_root: cli.cgroup_root(),
        kubelet_roots,
        model_fit_output: cli.model_fit_output.clone(),
        pod_labels: cli.pod_label_keys(),
    };
    let published = Published::default();
    let handle = ServerHandle::new(published.clone(), cli.interval)
        .with_unhealthy_after(cli.unhealthy_after_failed_intervals);
    let carbon = carbon_source.map(|source| start_carbon(source, cli.interval, &runtime));
    let otlp = match &cli.otlp_endpoint {
        Some(endpoint) => Some(export::otlp::OtlpPush::start(
            &export::otlp::OtlpOptions {
                endpoint: endpoint.clone(),
                interval: cli.interval,
                node_name: cli.node_name.clone().unwrap_or_default(),
                host_name: std::fs::read_to_string(cli.host_proc.join("sys/kernel/hostname"))
                    .map(|name| name.trim().to_owned())
                    .unwrap_or_default(),
            },
            &ergon::interval::catalogue(),
            &handle,
            carbon.as_ref(),
        )?),
        None => None,
    };
    let mut server_options = runtime.block_on(server_options(&cli))?;
    server_options.carbon = carbon;
    let (stop, stop_received) = std::sync::mpsc::channel::<()>();

    let measuring = {
        let (published, handle) = (published.clone(), handle.clone());
        let measure = Loop::new(probe, meters, pods, settings);
        std::thread::Builder::new()
            .name("ergon-interval".into())
            .spawn(move || ergon::interval::run(measure, published, handle, stop_received))
            .context("starting the measurement thread")?
    };
    tracing::info!(
        "serving metrics on {}://{}/metrics{}",
        if server_options.tls.is_some() {
            "https"
        } else {
            "http"
        },
        cli.listen,
        if server_options.auth.is_some() {
            " to authorized bearer tokens"
        } else {
            ""
        }
    );

    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            served = export::serve(listener, handle, server_options) => served?,
            _ = terminate.recv() => tracing::info!("SIGTERM: saving counters and stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: saving counters and stopping"),
        }
        anyhow::Ok(())
    })?;
    // The measurement thread saves the checkpoint before it ends.
    let _ = stop.send(());
    measuring
        .join()
        .map_err(|_| anyhow::anyhow!("the measurement thread panicked"))?;
    // After the last interval published: the final push carries it.
    if let Some(otlp) = otlp {
        otlp.shutdown();
    }
    drop(watcher);
    Ok(())
}

/// The Kubernetes API configured: --kube-api, --kubeconfig, or in-cluster.
fn api_source(cli: &Cli) -> Option<ApiSource> {
    if let Some(url) = &cli.kube_api {
        Some(ApiSource::Url(url.clone()))
    } else if let Some(path) = &cli.kubeconfig {
        Some(ApiSource::Kubeconfig(path.clone()))
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        Some(ApiSource::Infer)
    } else {
        None
    }
}

/// TLS and authorization of the server, from the flags; errors say which
/// flag and what to do.
async fn server_options(cli: &Cli) -> anyhow::Result<export::ServerOptions> {
    let mut options = export::ServerOptions::default();
    if let (Some(cert), Some(key)) = (&cli.tls_cert_file, &cli.tls_key_file) {
        let files = export::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        options.tls = Some(export::tls_acceptor(&files)?);
    }
    if cli.authorize_metrics {
        let api = api_source(cli).ok_or_else(|| {
            anyhow::anyhow!(
                "--authorize-metrics checks tokens with the Kubernetes API, and none is \
                 configured: run in a cluster, or pass --kubeconfig or --kube-api"
            )
        })?;
        let client = ergon::workload::kube::build_client(&api)
            .await
            .context("--authorize-metrics")?;
        options.auth = Some(std::sync::Arc::new(export::Authorizer::new(client)));
    }
    Ok(options)
}

/// `--carbon-intensity`: a file is read now and re-read (if changed) every
/// interval on the runtime.
fn start_carbon(
    source: ergon::carbon::CarbonSource,
    interval: std::time::Duration,
    runtime: &tokio::runtime::Runtime,
) -> ergon::carbon::CarbonIntensity {
    let carbon = ergon::carbon::CarbonIntensity::new(source);
    carbon.refresh();
    let refreshed = carbon.clone();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            refreshed.refresh();
        }
    });
    carbon
}

/// Whichever source feeds the pod directory; dropping it stops the feed.
enum PodFeed {
    Kubelet(KubeletPoller),
    Apiserver(PodWatcher),
}

impl PodFeed {
    fn directory(&self) -> &PodDirectory {
        match self {
            PodFeed::Kubelet(poller) => poller.directory(),
            PodFeed::Apiserver(watcher) => watcher.directory(),
        }
    }
}

/// `--pod-source`: the kubelet, the API server, or the kubelet if it answers
/// at start and else the API server (one log line says why).
async fn start_pod_feed(cli: &Cli) -> Option<PodFeed> {
    let kubelet = || cli.kubelet_config();
    match cli.pod_source {
        PodSource::Apiserver => start_pod_watcher(cli).await.map(PodFeed::Apiserver),
        PodSource::Kubelet => {
            let Some(config) = kubelet() else {
                tracing::warn!(
                    "--pod-source kubelet needs the node's name (NODE_NAME, downward API \
                     spec.nodeName) or --kubelet-url; labelling by pod uid only"
                );
                return None;
            };
            match KubeletPoller::spawn(config) {
                Ok(poller) => Some(PodFeed::Kubelet(poller)),
                Err(e) => {
                    tracing::warn!("pod metadata unavailable, labelling by uid only: {e}");
                    None
                }
            }
        }
        PodSource::Auto => {
            let why = match kubelet() {
                None => "no node name (NODE_NAME) or --kubelet-url".to_owned(),
                Some(config) => match KubeletPoller::connect(config).await {
                    Ok(poller) => {
                        tracing::info!("pod metadata from the kubelet (--pod-source auto)");
                        return Some(PodFeed::Kubelet(poller));
                    }
                    Err(e) => e.to_string(),
                },
            };
            tracing::info!(
                "pod metadata from the API server watch: the kubelet is not usable ({why})"
            );
            start_pod_watcher(cli).await.map(PodFeed::Apiserver)
        }
    }
}

/// Starts the pod watch where a Kubernetes API is configured. Without one,
/// workloads are labelled by pod uid and container id only.
async fn start_pod_watcher(cli: &Cli) -> Option<PodWatcher> {
    let api = if let Some(api) = api_source(cli) {
        api
    } else {
        tracing::info!(
            "no Kubernetes API configured (not in a cluster, no --kubeconfig): pods are labelled \
             by pod_uid and container_id only"
        );
        return None;
    };
    let Some(node) = cli.node_name.clone() else {
        tracing::warn!(
            "a Kubernetes API is configured but NODE_NAME is not set: set it (downward API \
             spec.nodeName) so this node's pods get names; labelling by uid only"
        );
        return None;
    };
    let mut config = PodWatcherConfig::new(node, api);
    config.label_allowlist = cli.pod_label_keys();
    config.deleted_retention = cli.retention;
    match PodWatcher::spawn(config).await {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!("pod metadata unavailable, labelling by uid only: {e}");
            None
        }
    }
}
