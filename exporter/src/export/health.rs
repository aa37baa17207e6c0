//! What `/healthz` and `/readyz` answer, and the liveness gauge.
//!
//! The interval loop reports each interval here: measured
//! ([`ServerHandle::interval_done`]) or failed with a reason
//! ([`ServerHandle::interval_failed`]). A loop that keeps failing still
//! serves its last report, whose counters then go flat and read as 0 W;
//! nothing in the numbers says so. Hence:
//!
//! - `/healthz` fails (503) after [`ServerHandle::with_unhealthy_after`]
//!   consecutive failed intervals (default [`DEFAULT_UNHEALTHY_AFTER`]), its
//!   body and the log saying how many and the last error, so the kubelet
//!   restarts an exporter that cannot measure and `kubectl describe` says
//!   why. It is 200 again from the next measured interval.
//! - `/healthz` also fails when no interval has completed for five
//!   intervals plus ten seconds (a loop that hangs rather than fails).
//! - `ergon_last_successful_interval_timestamp_seconds` is the Unix time of
//!   the last measured interval (0 until the first), so an alert
//!   `time() - ergon_last_successful_interval_timestamp_seconds > 60` fires
//!   even where no one restarts the pod.
//! - `/readyz` is 200 once a report has been published.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Published;

/// Failed intervals in a row after which `/healthz` fails.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;

#[derive(Debug, Default)]
struct Liveness {
    last_measured: Option<Instant>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// Liveness shared between the interval loop and the server.
#[derive(Clone)]
pub struct ServerHandle {
    pub published: Published,
    started: Instant,
    liveness: Arc<Mutex<Liveness>>,
    /// An interval older than this makes `/healthz` fail.
    stale_after: Duration,
    unhealthy_after: u32,
    last_success: prometheus::Gauge,
}

impl ServerHandle {
    pub fn new(published: Published, interval: Duration) -> ServerHandle {
        let last_success = prometheus::Gauge::new(
            "ergon_last_successful_interval_timestamp_seconds",
            "Unix time at which the last interval was measured (0: none yet). Alert when it \
             falls behind: the counters are flat because nothing is measured.",
        )
        .expect("a valid metric name");
        ServerHandle {
            published,
            started: Instant::now(),
            liveness: Arc::new(Mutex::new(Liveness::default())),
            stale_after: interval * 5 + Duration::from_secs(10),
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            last_success,
        }
    }

    /// `/healthz` fails after `failed_intervals` failed intervals in a row
    /// (at least 1).
    pub fn with_unhealthy_after(mut self, failed_intervals: u32) -> ServerHandle {
        self.unhealthy_after = failed_intervals.max(1);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ergon_last_successful_interval_timestamp_seconds`: Unix seconds of
    /// the last measured interval, 0 before the first.
    pub fn last_success_seconds(&self) -> f64 {
        self.last_success.get()
    }

    /// An interval was measured and published.
    pub fn interval_done(&self) {
        let mut liveness = self.lock();
        if liveness.consecutive_failures >= self.unhealthy_after {
            tracing::info!(
                "measuring again after {} failed intervals: /healthz is 200 again",
                liveness.consecutive_failures
            );
        }
        liveness.last_measured = Some(Instant::now());
        liveness.consecutive_failures = 0;
        liveness.last_error = None;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_success.set(now.as_secs_f64());
    }

    /// An interval could not be measured, for `reason`.
    pub fn interval_failed(&self, reason: &str) {
        let mut liveness = self.lock();
        liveness.consecutive_failures = liveness.consecutive_failures.saturating_add(1);
        liveness.last_error = Some(reason.to_owned());
        if liveness.consecutive_failures == self.unhealthy_after {
            tracing::error!(
                "/healthz fails from now on: {} intervals in a row without a measurement; last \
                 error: {reason}",
                liveness.consecutive_failures
            );
        }
    }

    /// `Ok` while healthy; otherwise why not, for the body of `/healthz`.
    pub fn health(&self) -> Result<(), String> {
        let liveness = self.lock();
        if liveness.consecutive_failures >= self.unhealthy_after {
            return Err(format!(
                "{} intervals in a row without a measurement; last error: {}",
                liveness.consecutive_failures,
                liveness.last_error.as_deref().unwrap_or("unknown")
            ));
        }
        // Before the first interval: healthy for one stale period after
        // start, which covers loading the probe.
        let since = liveness.last_measured.unwrap_or(self.started).elapsed();
        if since > self.stale_after {
            return Err(format!(
                "the measurement loop has not completed an interval for {}s",
                since.as_secs()
            ));
        }
        Ok(())
    }

    /// The liveness gauge, registered beside the process metrics.
    pub(crate) fn last_success_gauge(&self) -> prometheus::Gauge {
        self.last_success.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_after_n_failed_intervals_and_recovers_with_a_measured_one() {
        let handle =
            ServerHandle::new(Published::default(), Duration::from_secs(5)).with_unhealthy_after(3);
        assert_eq!(handle.last_success_gauge().get(), 0.0);
        handle.interval_done();
        let measured_at = handle.last_success_gauge().get();
        assert!(measured_at > 1.7e9, "{measured_at}");
        assert!(handle.health().is_ok());
        handle.interval_failed("reading /sys/fs/cgroup/cpu.stat: No such file or directory");
        handle.interval_failed("reading /sys/fs/cgroup/cpu.stat: No such file or directory");
        assert!(handle.health().is_ok(), "two failures are tolerated");
        handle.interval_failed("reading /sys/fs/cgroup/cpu.stat: Permission denied");
        let why = handle.health().unwrap_err();
        assert!(
            why.contains("3 intervals") && why.contains("Permission denied"),
            "{why}"
        );
        // The gauge keeps the last measured time while failing.
        assert_eq!(handle.last_success_gauge().get(), measured_at);
        handle.interval_done();
        assert!(handle.health().is_ok());
        // The count restarts: one failure after a success is tolerated.
        handle.interval_failed("again");
        assert!(handle.health().is_ok());
    }

    #[test]
    fn failures_from_the_start_count_too() {
        let handle =
            ServerHandle::new(Published::default(), Duration::from_secs(5)).with_unhealthy_after(1);
        handle.interval_failed("the probe is gone");
        assert!(handle.health().unwrap_err().contains("the probe is gone"));
    }
}
