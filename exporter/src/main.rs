//! The `ergon` binary: load configuration, start the probe, serve metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use ergon::config::{Cli, Command};
use ergon::export::{self, Published, ServerHandle};
use ergon::probe::Probe;

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
    let published = Published::default();
    let handle = ServerHandle::new(published.clone(), cli.interval);
    let registry = export::registry(published.clone(), &ergon::interval::catalogue());
    let stop = Arc::new(AtomicBool::new(false));

    let measuring = {
        let (published, handle, stop) = (published.clone(), handle.clone(), stop.clone());
        let interval = cli.interval;
        std::thread::Builder::new()
            .name("ergon-interval".into())
            .spawn(move || ergon::interval::run(probe, interval, published, handle, stop))
            .context("starting the measurement thread")?
    };
    tracing::info!("serving metrics on http://{}/metrics", cli.listen);

    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            served = export::serve(listener, handle, registry) => served?,
            _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    measuring
        .join()
        .map_err(|_| anyhow::anyhow!("the measurement thread panicked"))?;
    Ok(())
}
