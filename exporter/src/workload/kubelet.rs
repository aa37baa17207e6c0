//! Pod metadata from the node's own kubelet (`GET /pods`), instead of a
//! watch on the API server (`--pod-source kubelet`, and the first choice of
//! `auto`).
//!
//! Why: one watch per node loads the API server with as many watches as
//! there are nodes; Kepler moved to the kubelet after a 54-node,
//! 2,260-pod cluster saw API server memory spikes. The kubelet knows exactly
//! this node's pods and answers from memory.
//!
//! Decisions:
//! - The kubelet answers a `PodList` in the API's JSON, so its pods go
//!   through the same conversion ([`super::kube::convert_pod`]) into the
//!   same [`PodDirectory`]; the rest of the exporter cannot tell the sources
//!   apart.
//! - Polled, not watched (the kubelet has no watch): once per `period`
//!   (default 60 s), and early when the interval loop looks up a pod uid the
//!   directory does not know (a new pod's cgroup) — but never twice within
//!   `min_gap` (the measurement interval), so a burst of new pods costs one
//!   request per interval at most, and a cgroup no list explains asks once.
//! - Authentication is the API server's: the ServiceAccount token as bearer
//!   token, which the kubelet checks with a TokenReview and authorizes as
//!   `get` on `nodes/proxy`. The token file is re-read by the client, so
//!   rotated projected tokens keep working. The read-only port
//!   (`http://<node>:10255`, off by default in kubelets) needs neither.
//! - The kubelet's serving certificate is, in many clusters, self-signed by
//!   the kubelet and not issued by the cluster CA; verification against the
//!   CA then fails and the error says so. `--kubelet-insecure-skip-tls-verify`
//!   exists for those clusters, as metrics-server's `--kubelet-insecure-tls`.
//! - Failures keep the last pods (as the watcher does) and retry with a
//!   doubling backoff; 401 and 403 say which permission is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::Instant;

use super::kube::{ConvertedPod, PodDirectory, convert_pod, retry_delay};
// Its sources too: a TLS failure's reason is in the innermost one.
use crate::probe::ebpf::error_chain;

/// Where a pod's ServiceAccount token is mounted.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where a pod's cluster CA bundle is mounted.
pub const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The kubelet's authenticated port.
pub const KUBELET_PORT: u16 = 10250;

/// Settings of the kubelet poller.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The kubelet's base URL, e.g. `https://node-a:10250` or
    /// `http://127.0.0.1:10255`; `/pods` is appended.
    pub url: String,
    /// Bearer token file (re-read as it rotates); `None`: no token.
    pub token_file: Option<PathBuf>,
    /// PEM bundle the kubelet's certificate must chain to (https only).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (kubelets with self-signed serving certs).
    pub insecure_skip_tls_verify: bool,
    /// Pod label keys copied into the metadata; empty means none.
    pub label_allowlist: Vec<String>,
    /// How long a pod gone from the list stays resolvable.
    pub deleted_retention: Duration,
    /// A poll at least this often, even when no unknown pod appears.
    pub period: Duration,
    /// Never two polls closer than this (the measurement interval).
    pub min_gap: Duration,
    /// First retry delay after a failed poll; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl KubeletConfig {
    /// Defaults for `url`: in-cluster token and CA, a 60 s period.
    pub fn new(url: impl Into<String>) -> KubeletConfig {
        KubeletConfig {
            url: url.into(),
            token_file: Some(PathBuf::from(SERVICE_ACCOUNT_TOKEN)),
            ca_file: Some(PathBuf::from(SERVICE_ACCOUNT_CA)),
            insecure_skip_tls_verify: false,
            label_allowlist: Vec::new(),
            deleted_retention: Duration::from_secs(15 * 60),
            period: Duration::from_secs(60),
            min_gap: Duration::from_secs(5),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Why the kubelet could not be asked, or did not answer with pods.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("invalid kubelet URL {url:?} (--kubelet-url): {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "cannot read the CA bundle {} (--kubelet-ca-file) for the kubelet's certificate: {reason}",
        path.display()
    )]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot read the kubelet token file {} (--kubelet-token-file): {reason}", path.display())]
    TokenFile { path: PathBuf, reason: String },
    #[error("cannot build a client for the kubelet at {url}: {reason}")]
    Client { url: String, reason: String },
    #[error(
        "the kubelet at {url} rejected the ServiceAccount token (401 Unauthorized): the kubelet \
         must authenticate bearer tokens with the API server (authentication.webhook.enabled), \
         and --kubelet-token-file must name a valid token; or use --pod-source apiserver"
    )]
    Unauthorized { url: String },
    #[error(
        "the kubelet at {url} forbids reading pods (403 Forbidden: {message}): grant the \
         exporter's ServiceAccount `get` on the `nodes/proxy` resource (the chart does with \
         podSource kubelet or auto); or use --pod-source apiserver"
    )]
    Forbidden { url: String, message: String },
    #[error("the kubelet at {url} answered {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error(
        "cannot reach the kubelet at {url}: {reason} (a certificate error on a kubelet with a \
         self-signed serving certificate: --kubelet-insecure-skip-tls-verify; another address: \
         --kubelet-url)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the kubelet at {url} answered something that is not a PodList: {reason}")]
    NotAPodList { url: String, reason: String },
}

/// The kubelet's `/pods` body; `items` is `null` when the node has none.
#[derive(serde::Deserialize)]
struct PodList {
    #[serde(default)]
    items: Option<Vec<Pod>>,
}

/// A client for one kubelet and the conversion settings.
#[derive(Clone)]
struct Kubelet {
    client: kube::Client,
    url: String,
    token_file: Option<PathBuf>,
    label_allowlist: Vec<String>,
}

impl Kubelet {
    fn new(config: &KubeletConfig) -> Result<Kubelet, KubeletError> {
        let url = config.url.trim_end_matches('/').to_owned();
        let uri: hyper::http::Uri =
            url.parse()
                .map_err(|error: hyper::http::uri::InvalidUri| KubeletError::BadUrl {
                    url: url.clone(),
                    reason: error.to_string(),
                })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(KubeletError::BadUrl {
                    url,
                    reason: "use https://<node>:10250, or http://<node>:10255 for the read-only \
                             port"
                        .into(),
                });
            }
        };
        let mut kube_config = kube::Config::new(uri);
        // The kubelet answers from memory; a slow answer is a stuck kubelet.
        kube_config.read_timeout = Some(Duration::from_secs(10));
        kube_config.connect_timeout = Some(Duration::from_secs(5));
        if https {
            kube_config.accept_invalid_certs = config.insecure_skip_tls_verify;
            if let (Some(path), false) = (&config.ca_file, config.insecure_skip_tls_verify) {
                kube_config.root_cert = Some(read_ca(path)?);
            }
        }
        let client = kube::Client::try_from(kube_config).map_err(|e| KubeletError::Client {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        Ok(Kubelet {
            client,
            url,
            token_file: config.token_file.clone(),
            label_allowlist: config.label_allowlist.clone(),
        })
    }

    /// The bearer token, read at every poll so a rotated projected token
    /// is used at once (kube's own token file reader keeps the trailing
    /// newline a hand-written file has, which is no valid header). No file:
    /// no token (the read-only port).
    fn token(&self) -> Result<Option<String>, KubeletError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(token) => Ok(Some(token.trim().to_owned()).filter(|token| !token.is_empty())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(KubeletError::TokenFile {
                path: path.clone(),
                reason: error.to_string(),
            }),
        }
    }

    /// One `GET /pods`.
    async fn pods(&self) -> Result<Vec<ConvertedPod>, KubeletError> {
        let mut request = hyper::http::Request::get("/pods");
        if let Some(token) = self.token()? {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request =
            request
                .body(kube::client::Body::empty())
                .map_err(|error| KubeletError::TokenFile {
                    path: self.token_file.clone().unwrap_or_default(),
                    reason: format!("not usable in an HTTP header: {error}"),
                })?;
        let url = || self.url.clone();
        let response =
            self.client
                .send(request)
                .await
                .map_err(|error| KubeletError::Unreachable {
                    url: url(),
                    reason: error_chain(&error),
                })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| KubeletError::Unreachable {
                url: url(),
                reason: error_chain(&error),
            })?
            .to_bytes();
        let message = || {
            let text = String::from_utf8_lossy(&body);
            text.trim().chars().take(300).collect::<String>()
        };
        match status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(KubeletError::Unauthorized { url: url() }),
            StatusCode::FORBIDDEN => {
                return Err(KubeletError::Forbidden {
                    url: url(),
                    message: message(),
                });
            }
            status => {
                return Err(KubeletError::Status {
                    url: url(),
                    status,
                    message: message(),
                });
            }
        }
        let list: PodList =
            serde_json::from_slice(&body).map_err(|error| KubeletError::NotAPodList {
                url: url(),
                reason: error.to_string(),
            })?;
        Ok(list
            .items
            .unwrap_or_default()
            .iter()
            .map(|pod| convert_pod(pod, &self.label_allowlist))
            .collect())
    }
}

fn read_ca(path: &Path) -> Result<Vec<Vec<u8>>, KubeletError> {
    let ca_error = |reason: String| KubeletError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|certificate| certificate.map(|der| der.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(format!("not a PEM certificate bundle: {e}")))?;
    if certificates.is_empty() {
        return Err(ca_error("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

/// A running kubelet poller; dropping it stops the task.
#[derive(Debug)]
pub struct KubeletPoller {
    directory: PodDirectory,
    task: tokio::task::JoinHandle<()>,
}

impl KubeletPoller {
    /// Asks the kubelet once and, if it answered with pods, keeps polling in
    /// a tokio task. For `--pod-source auto`: an error here means "use the
    /// API server instead", and says why.
    pub async fn connect(config: KubeletConfig) -> Result<KubeletPoller, KubeletError> {
        let kubelet = Kubelet::new(&config)?;
        let directory = PodDirectory::new();
        directory.replace_all(kubelet.pods().await?, std::time::Instant::now());
        let task = tokio::spawn(poll(
            kubelet,
            config,
            directory.clone(),
            Some(Instant::now()),
        ));
        Ok(KubeletPoller { directory, task })
    }

    /// Starts polling; only configuration that can never work is an error,
    /// an unreachable or refusing kubelet is retried (and logged) forever.
    pub fn spawn(config: KubeletConfig) -> Result<KubeletPoller, KubeletError> {
        let kubelet = Kubelet::new(&config)?;
        let directory = PodDirectory::new();
        let task = tokio::spawn(poll(kubelet, config, directory.clone(), None));
        Ok(KubeletPoller { directory, task })
    }

    pub fn directory(&self) -> &PodDirectory {
        &self.directory
    }
}

impl Drop for KubeletPoller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The longest the poller ever waits: a longer period or gap (the library
/// takes any `Duration`; `--kubelet-poll-period` is at most an hour) waits
/// this long instead.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

/// `last + delay`, for any `delay`: `Instant + Duration` panics past the
/// clock's range, and a panic here would end the poller's task (pod names
/// frozen, one line in the log).
fn after(last: Instant, delay: Duration) -> Instant {
    let delay = delay.min(LONGEST_WAIT);
    last.checked_add(delay).unwrap_or(last)
}

async fn poll(
    kubelet: Kubelet,
    config: KubeletConfig,
    directory: PodDirectory,
    mut last_poll: Option<Instant>,
) {
    loop {
        if let Some(last) = last_poll {
            let failures = directory.connection().consecutive_failures;
            if failures > 0 {
                tokio::time::sleep_until(after(
                    last,
                    retry_delay(failures, config.retry_initial, config.retry_max),
                ))
                .await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep_until(after(last, config.period)) => {}
                    _ = directory.unknown_pod_seen() => {
                        tokio::time::sleep_until(after(last, config.min_gap)).await;
                    }
                }
            }
        }
        last_poll = Some(Instant::now());
        match kubelet.pods().await {
            Ok(pods) => {
                let failures = directory.connection().consecutive_failures;
                directory.replace_all(pods, std::time::Instant::now());
                if failures > 0 {
                    tracing::info!(failures, "kubelet reachable again; pod names are current");
                }
            }
            Err(error) => {
                let failures = directory.record_failure(error.to_string());
                if failures.is_power_of_two() {
                    tracing::warn!(
                        %error,
                        failures,
                        "pod list from the kubelet failed; exporting by pod uid with the last known names"
                    );
                } else {
                    tracing::debug!(%error, failures, "kubelet still unavailable");
                }
            }
        }
        directory.prune_deleted(config.deleted_retention, std::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_and_ca_files_are_checked_with_the_flag_named() {
        let mut config = KubeletConfig::new("ftp://node-a:10250");
        config.token_file = None;
        let error = Kubelet::new(&config).err().unwrap().to_string();
        assert!(
            error.contains("--kubelet-url") && error.contains("10255"),
            "{error}"
        );

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.crt");
        std::fs::write(&not_pem, "hello\n").unwrap();
        config.url = "https://node-a:10250".into();
        config.ca_file = Some(not_pem);
        let error = Kubelet::new(&config).err().unwrap().to_string();
        assert!(
            error.contains("ca.crt") && error.contains("--kubelet-ca-file"),
            "{error}"
        );
        config.ca_file = Some(dir.path().join("missing.crt"));
        let error = Kubelet::new(&config).err().unwrap().to_string();
        assert!(error.contains("missing.crt"), "{error}");
        // Plain http (the read-only port) needs no CA.
        config.url = "http://127.0.0.1:10255".into();
        assert!(Kubelet::new(&config).is_ok());
    }

    #[test]
    fn an_empty_node_lists_null_items() {
        let list: PodList = serde_json::from_str(
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#,
        )
        .unwrap();
        assert!(list.items.unwrap_or_default().is_empty());
    }
}
