//! TLS for the server (`--tls-cert-file`, `--tls-key-file`), off by default.
//!
//! Certificates in a cluster are short-lived: cert-manager renews them and
//! the kubelet swaps the mounted Secret's files in place. Restarting the
//! exporter for that would lose an interval and alert on `/healthz`, so the
//! files are watched instead: every handshake compares the files' identity
//! (device, inode, size, modification time — cheap `stat` calls, no read)
//! with the pair in use, and loads them again when either changed. A pair
//! that does not load (half-written, or a key that does not match the
//! certificate) is logged and the previous pair kept; the next change is
//! tried again. At start, a pair that does not load is an error.
//!
//! rustls with the `ring` provider, the one the Kubernetes client already
//! uses; TLS 1.2 and 1.3, HTTP/1.1 by ALPN.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// The certificate chain and private key files (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the TLS certificate file {path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`): \
         point --tls-cert-file at the certificate chain, leaf first"
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "the TLS key file {path} holds no usable private key ({detail}): point --tls-key-file at \
         a PEM PKCS#8, PKCS#1 or SEC1 key (RSA, ECDSA or Ed25519)"
    )]
    Key { path: PathBuf, detail: String },
    #[error(
        "the private key {key} does not belong to the certificate {cert} ({detail}): give the \
         key the certificate was issued for"
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("setting up TLS: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks one certificate/key pair.
fn load(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            detail: e.to_string(),
        })
}

/// What identifies a version of a file without reading it.
type Stamp = Option<(u64, u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    ))
}

#[derive(Debug)]
struct InUse {
    stamps: [Stamp; 2],
    key: Arc<CertifiedKey>,
}

/// Hands rustls the current pair, reloading it when the files change.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    in_use: Mutex<InUse>,
}

impl ReloadingCert {
    fn current(&self) -> Arc<CertifiedKey> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let stamps = [stamp(&self.files.cert), stamp(&self.files.key)];
        if stamps != in_use.stamps {
            in_use.stamps = stamps;
            match load(&self.files, &self.provider) {
                Ok(key) => {
                    tracing::info!(
                        "TLS certificate {} and key {} reloaded",
                        self.files.cert.display(),
                        self.files.key.display()
                    );
                    in_use.key = key;
                }
                Err(e) => tracing::warn!(
                    "{e}; still serving the previous certificate until the files change again"
                ),
            }
        }
        in_use.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS acceptor serving `files`, reloaded when they change. Fails when
/// the pair does not load now.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = provider();
    let stamps = [stamp(&files.cert), stamp(&files.key)];
    let key = load(files, &provider)?;
    let resolver = ReloadingCert {
        files: files.clone(),
        provider: provider.clone(),
        in_use: Mutex::new(InUse { stamps, key }),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
