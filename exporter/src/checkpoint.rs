//! Counters that survive exporter restarts.
//!
//! Prometheus' `rate()` and `increase()` treat a counter that goes down as a
//! reset; an exporter upgrade or crash would otherwise make every energy
//! counter start from zero. The cumulative state is written to a file on the
//! host (atomically: a temporary file, fsync, rename) every few intervals and
//! on SIGTERM, and restored at start when the machine has not rebooted since
//! (same `boot_id`: after a reboot every workload is new anyway).
//!
//! A checkpoint that is corrupt, of another format version or of another
//! boot is reported and ignored: losing history is better than refusing to
//! start.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Bumped when the checkpoint's shape changes incompatibly.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format: String,
    version: u32,
    boot_id: String,
    state: T,
}

const FORMAT: &str = "ergon-checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "writing checkpoint {path}: {source} (is the checkpoint directory a writable hostPath?)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is not an Ergon checkpoint of this version ({detail}); ignoring it, counters start from zero"
    )]
    Foreign { path: PathBuf, detail: String },
    #[error(
        "checkpoint {path} is from another boot (it has {found}, this boot is {current}); ignoring it"
    )]
    OtherBoot {
        path: PathBuf,
        found: String,
        current: String,
    },
}

/// This boot's id (`/proc/sys/kernel/random/boot_id` under the host's /proc).
pub fn boot_id(host_proc: &Path) -> String {
    std::fs::read_to_string(host_proc.join("sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes `state` to `path` atomically.
pub fn save<T: Serialize>(path: &Path, boot_id: &str, state: &T) -> Result<(), CheckpointError> {
    let write_err = |source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    };
    let envelope = Envelope {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        boot_id: boot_id.to_owned(),
        state,
    };
    let bytes = serde_json::to_vec(&envelope).map_err(|e| write_err(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// Reads the state saved at `path`, if there is one of this boot.
/// `Ok(None)` when no checkpoint exists yet.
pub fn load<T: DeserializeOwned>(path: &Path, boot_id: &str) -> Result<Option<T>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let foreign = |detail: String| CheckpointError::Foreign {
        path: path.to_owned(),
        detail,
    };
    let envelope: Envelope<serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| foreign(e.to_string()))?;
    if envelope.format != FORMAT || envelope.version != FORMAT_VERSION {
        return Err(foreign(format!(
            "format {:?} version {}",
            envelope.format, envelope.version
        )));
    }
    if envelope.boot_id != boot_id {
        return Err(CheckpointError::OtherBoot {
            path: path.to_owned(),
            found: envelope.boot_id,
            current: boot_id.to_owned(),
        });
    }
    serde_json::from_value(envelope.state)
        .map(Some)
        .map_err(|e| foreign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ergon-checkpoint.json");
        assert_eq!(load::<Vec<u64>>(&path, "boot-a").unwrap(), None);
        save(&path, "boot-a", &vec![1u64, 2, 3]).unwrap();
        assert_eq!(
            load::<Vec<u64>>(&path, "boot-a").unwrap(),
            Some(vec![1, 2, 3])
        );
        let err = load::<Vec<u64>>(&path, "boot-b").unwrap_err();
        assert!(matches!(err, CheckpointError::OtherBoot { .. }), "{err}");
        std::fs::write(&path, b"{ not json").unwrap();
        let err = load::<Vec<u64>>(&path, "boot-a").unwrap_err().to_string();
        assert!(err.contains("not an Ergon checkpoint"), "{err}");
        std::fs::write(
            &path,
            br#"{"format":"other","version":1,"boot_id":"boot-a","state":[]}"#,
        )
        .unwrap();
        assert!(load::<Vec<u64>>(&path, "boot-a").is_err());
        // Counters come back bit for bit: a restored value one ULP lower
        // would be a counter going down (serde_json's default float parser
        // is not exact; the workspace enables `float_roundtrip`).
        let values = vec![1.8097035082307378_f64, 0.1 + 0.2, 1e-300, 123456.789012345];
        save(&path, "boot-a", &values).unwrap();
        let restored = load::<Vec<f64>>(&path, "boot-a").unwrap().unwrap();
        for (a, b) in values.iter().zip(&restored) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
        }
        // Right envelope, wrong state shape.
        save(&path, "boot-a", &"text").unwrap();
        assert!(load::<Vec<u64>>(&path, "boot-a").is_err());
    }
}
