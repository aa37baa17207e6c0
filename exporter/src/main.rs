//! The `ergon` binary: load configuration, start the probe, meters and pod
//! watcher, measure on a thread, serve metrics on the async runtime.

use anyhow::Context;
use ergon::config::{Cli, Command};
use ergon::export::{self, Published, ServerHandle};
use ergon::interval::{Loop, Settings};
use ergon::probe::Probe;
use ergon::workload::{ApiSource, PodDirectory, PodWatcher, PodWatcherConfig};

fn main() -> anyhow::Result<()> {
    let cli = Cli::load();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .with_context(|| format!("--log `{}` is not a valid log filter", cli.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    if let Some(Command::Doctor) = cli.command {
        return ergon::doctor::run(&cli);
    }
    let idle_watts = cli.idle_watts().map_err(anyhow::Error::msg)?;
    let meter_config = cli.meter_config().map_err(anyhow::Error::msg)?;

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
    let watcher = runtime.block_on(start_pod_watcher(&cli));
    let pods = watcher
        .as_ref()
        .map(|w| w.directory().clone())
        .unwrap_or_else(PodDirectory::new);

    let settings = Settings {
        interval: cli.interval,
        idle_policy: cli.idle_policy,
        idle_watts,
        per_process: cli.per_process,
        retention: cli.retention,
        kepler_compat: cli.compat.is_some(),
        checkpoint: cli.checkpoint.clone(),
        host_proc: cli.host_proc.clone(),
        cgroup_root: cli.cgroup_root(),
        model_fit_output: cli.model_fit_output.clone(),
        pod_labels: cli.pod_label_keys(),
    };
    let published = Published::default();
    let handle = ServerHandle::new(published.clone(), cli.interval);
    let (stop, stop_received) = std::sync::mpsc::channel::<()>();

    let measuring = {
        let (published, handle) = (published.clone(), handle.clone());
        let measure = Loop::new(probe, meters, pods, settings);
        std::thread::Builder::new()
            .name("ergon-interval".into())
            .spawn(move || ergon::interval::run(measure, published, handle, stop_received))
            .context("starting the measurement thread")?
    };
    tracing::info!("serving metrics on http://{}/metrics", cli.listen);

    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            served = export::serve(listener, handle) => served?,
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
    drop(watcher);
    Ok(())
}

/// Starts the pod watch where a Kubernetes API is configured. Without one,
/// workloads are labelled by pod uid and container id only.
async fn start_pod_watcher(cli: &Cli) -> Option<PodWatcher> {
    let api = if let Some(url) = &cli.kube_api {
        ApiSource::Url(url.clone())
    } else if let Some(path) = &cli.kubeconfig {
        ApiSource::Kubeconfig(path.clone())
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        ApiSource::Infer
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
