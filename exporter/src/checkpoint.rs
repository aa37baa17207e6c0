//! Counters that survive exporter restarts.
//!
//! Prometheus' `rate()` and `increase()` treat a counter that goes down as a
//! reset; an exporter upgrade or crash would otherwise make every energy
//! counter start from zero. The cumulative state is written to a file on the
//! host every interval and on SIGTERM, and restored at start when the
//! machine has not rebooted since (same `boot_id`: after a reboot every
//! workload is new anyway).
//!
//! The exporter runs as root and the checkpoint lives in a host directory,
//! so the file is treated as hostile input and written as if someone were
//! waiting to redirect it:
//! - Writing: a temporary file with a random name is created exclusively in
//!   the checkpoint's own directory (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600:
//!   a symlink or file planted there is never followed nor truncated), the
//!   bytes are fsynced, the file is renamed over the checkpoint and the
//!   directory is fsynced, so after a crash either the old or the new
//!   checkpoint is there, whole. A temporary file a killed writer left is
//!   removed by the next writer once it holds the lock.
//! - One writer: an advisory `flock` on `<checkpoint>.lock`. Decision: an
//!   exporter that finds the lock held (a rolling update's surge pod next to
//!   the old one) restores, counts and serves as usual but does not write;
//!   it logs that once and tries the lock again at every save, so it takes
//!   over as soon as the other exporter exits (the kernel releases a flock
//!   with its holder). Waiting instead would leave the new pod unready for
//!   the whole overlap.
//! - Reading: `O_NOFOLLOW`, a regular file only, at most
//!   [`MAX_CHECKPOINT_BYTES`].
//! - Restoring: the caller validates the state (finite, non-negative
//!   counters, no time in the future, …). A checkpoint that cannot be used —
//!   not JSON, another format, too large, not a regular file, invalid — is
//!   renamed aside to `<checkpoint>.rejected-<unix seconds>` (`-<n>` added
//!   where that name is taken) for inspection, reported in the log and
//!   counted (`ergon_checkpoint_rejected_total`), and never used: losing
//!   history is better than refusing to start or exporting impossible
//!   counters. Only the writer (the lock's holder) moves it: another
//!   exporter's file stays where it is.
//! - A boot id that cannot be read matches nothing, not even another
//!   unreadable boot id: without it nobody can tell that the checkpoint is
//!   of this boot.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Bumped when the checkpoint's shape changes incompatibly.
const FORMAT_VERSION: u32 = 1;

const FORMAT: &str = "ergon-checkpoint";

/// The checkpoint's file name inside the state directory (`--state-dir`).
pub const CHECKPOINT_FILE: &str = "ergon-checkpoint.json";

/// Largest checkpoint read back. Full default maps (16,384 cgroups of
/// about 500 bytes each, 32,768 processes of about 300) make about 18 MB;
/// anything much larger was not written by Ergon, and reading it would
/// cost more than the pod's memory limit (64 Mi in the chart). The state is
/// parsed straight into its types, never through a generic JSON tree.
pub const MAX_CHECKPOINT_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format: String,
    version: u32,
    boot_id: String,
    state: T,
}

/// Why a checkpoint was set aside, the `reason` label of
/// `ergon_checkpoint_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectReason {
    /// A symlink, directory or device where the checkpoint should be.
    NotAFile,
    TooLarge,
    /// Not JSON, or not an Ergon checkpoint of this version.
    Format,
    /// The right shape with impossible values.
    Invalid,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotAFile => "not_a_file",
            RejectReason::TooLarge => "too_large",
            RejectReason::Format => "format",
            RejectReason::Invalid => "invalid",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "writing checkpoint {path}: {source} (is the state directory a writable hostPath? move it with --state-dir, or run without one with --no-checkpoint)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading checkpoint {path}: {source}; counters start from zero")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} rejected ({detail}); it was moved to {} for inspection and counters start from zero",
        aside.as_deref().map_or_else(|| "nowhere (renaming failed)".into(), |p| p.display().to_string())
    )]
    Rejected {
        path: PathBuf,
        reason: RejectReason,
        detail: String,
        aside: Option<PathBuf>,
    },
    #[error(
        "checkpoint {path} is from another boot (it has {found:?}, this boot is {current:?}); ignoring it"
    )]
    OtherBoot {
        path: PathBuf,
        found: String,
        current: String,
    },
    #[error(
        "cannot tell whether checkpoint {path} is of this boot: the boot id (/proc/sys/kernel/random/boot_id under --host-proc) is unreadable; ignoring it"
    )]
    UnknownBoot { path: PathBuf },
}

/// This boot's id (`/proc/sys/kernel/random/boot_id` under the host's /proc);
/// `None` when it cannot be read.
pub fn boot_id(host_proc: &Path) -> Option<String> {
    std::fs::read_to_string(host_proc.join("sys/kernel/random/boot_id"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The checkpoint file of one exporter: where it is, which boot it belongs
/// to, and whether this exporter holds the writer's lock.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    boot_id: Option<String>,
    /// Held for the life of the process once acquired.
    lock: Option<File>,
    /// The "another exporter writes" message was logged.
    told_not_writer: bool,
    /// Set when the checkpoint found at start was rejected.
    rejected: Option<RejectReason>,
    /// A rejected checkpoint stayed in place because another exporter held
    /// the lock: it is set aside when this one takes the lock, before its
    /// first write replaces it.
    aside_pending: bool,
    /// Whether the latest save wrote the file.
    last_save_wrote: bool,
    /// Saves that failed in a row.
    consecutive_failures: u32,
}

impl Checkpoint {
    /// Nothing is touched on disk until [`load`](Self::load) or
    /// [`save`](Self::save).
    pub fn new(path: PathBuf, boot_id: Option<String>) -> Checkpoint {
        Checkpoint {
            path,
            boot_id,
            lock: None,
            told_not_writer: false,
            rejected: None,
            aside_pending: false,
            last_save_wrote: false,
            consecutive_failures: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the checkpoint found at start was set aside, if it was.
    pub fn rejected(&self) -> Option<RejectReason> {
        self.rejected
    }

    /// Whether the latest save wrote the file (false while another exporter
    /// holds the lock, or when writing failed).
    pub fn writing(&self) -> bool {
        self.last_save_wrote
    }

    fn lock_path(&self) -> PathBuf {
        sibling(&self.path, ".lock")
    }

    /// Reads the state saved at `path`, if there is one of this boot that
    /// passes `validate`. `Ok(None)` when no checkpoint exists yet.
    pub fn load<T: DeserializeOwned>(
        &mut self,
        validate: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<Option<T>, CheckpointError> {
        let bytes = match self.read_bounded() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(Unusable::Io(source)) => {
                return Err(CheckpointError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
            Err(Unusable::Reject(reason, detail)) => return Err(self.reject(reason, detail)),
        };
        // The envelope first, skipping the state: its format and boot decide
        // whether the state is worth parsing.
        let envelope: Envelope<serde::de::IgnoredAny> = match serde_json::from_slice(&bytes) {
            Ok(envelope) => envelope,
            Err(e) => return Err(self.reject(RejectReason::Format, e.to_string())),
        };
        if envelope.format != FORMAT || envelope.version != FORMAT_VERSION {
            let detail = format!(
                "format {:?} version {}, expected {FORMAT:?} version {FORMAT_VERSION}",
                envelope.format, envelope.version
            );
            return Err(self.reject(RejectReason::Format, detail));
        }
        let Some(current) = self.boot_id.as_deref() else {
            return Err(CheckpointError::UnknownBoot {
                path: self.path.clone(),
            });
        };
        if envelope.boot_id != current {
            return Err(CheckpointError::OtherBoot {
                path: self.path.clone(),
                found: envelope.boot_id,
                current: current.to_owned(),
            });
        }
        let state: T = match serde_json::from_slice::<Envelope<T>>(&bytes) {
            Ok(envelope) => envelope.state,
            Err(e) => return Err(self.reject(RejectReason::Format, e.to_string())),
        };
        match validate(&state) {
            Ok(()) => Ok(Some(state)),
            Err(detail) => Err(self.reject(RejectReason::Invalid, detail)),
        }
    }

    fn read_bounded(&self) -> Result<Option<Vec<u8>>, Unusable> {
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Unusable::Reject(
                    RejectReason::NotAFile,
                    "it is a symbolic link".into(),
                ));
            }
            Err(e) => return Err(Unusable::Io(e)),
        };
        let metadata = file.metadata().map_err(Unusable::Io)?;
        if !metadata.is_file() {
            return Err(Unusable::Reject(
                RejectReason::NotAFile,
                format!("it is not a regular file ({:?})", metadata.file_type()),
            ));
        }
        let too_large = || {
            Unusable::Reject(
                RejectReason::TooLarge,
                format!("larger than {MAX_CHECKPOINT_BYTES} bytes"),
            )
        };
        if metadata.len() > MAX_CHECKPOINT_BYTES {
            return Err(too_large());
        }
        // Bounded again while reading: the file may grow meanwhile.
        let mut bytes = Vec::new();
        file.take(MAX_CHECKPOINT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(Unusable::Io)?;
        if bytes.len() as u64 > MAX_CHECKPOINT_BYTES {
            return Err(too_large());
        }
        Ok(Some(bytes))
    }

    /// Renames the checkpoint aside and records why. Only the writer moves
    /// it: while another exporter holds the lock (a rolling update's old
    /// pod, which may write a format this one does not read), the file is
    /// that exporter's and stays where it is until this one takes the lock
    /// (then it is set aside before this one's first write). A name already
    /// taken by an earlier rejection (two in one second) is not overwritten.
    fn reject(&mut self, reason: RejectReason, detail: String) -> CheckpointError {
        self.rejected = Some(reason);
        let aside = if matches!(self.take_lock(), Ok(true)) {
            self.set_aside()
        } else {
            self.aside_pending = true;
            None
        };
        CheckpointError::Rejected {
            path: self.path.clone(),
            reason,
            detail,
            aside,
        }
    }

    /// Moves the checkpoint to `<checkpoint>.rejected-<unix seconds>`, or
    /// `…-<seconds>-<n>` where that is taken; the new name, if it moved.
    fn set_aside(&self) -> Option<PathBuf> {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        (0..100u32)
            .map(|n| match n {
                0 => sibling(&self.path, &format!(".rejected-{seconds}")),
                n => sibling(&self.path, &format!(".rejected-{seconds}-{n}")),
            })
            // symlink_metadata: a planted symlink is a name taken, not
            // followed.
            .find(|aside| std::fs::symlink_metadata(aside).is_err())
            // rename(2) moves a symlink itself, never its target.
            .and_then(|aside| std::fs::rename(&self.path, &aside).ok().map(|()| aside))
    }

    /// [`save`](Self::save), reporting failures without flooding the log:
    /// the 1st, 2nd, 4th, 8th… failure in a row is a warning, the others
    /// are debug lines (`ergon_checkpoint_writing` shows the state), and the
    /// first success after failures says so.
    pub fn save_and_report<T: Serialize>(&mut self, state: &T) {
        match self.save(state) {
            Ok(_) => {
                if self.consecutive_failures > 0 {
                    tracing::info!(
                        failures = self.consecutive_failures,
                        "checkpoint {} written again",
                        self.path.display()
                    );
                }
                self.consecutive_failures = 0;
            }
            Err(e) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures.is_power_of_two() {
                    tracing::warn!(failures = self.consecutive_failures, "{e}");
                } else {
                    tracing::debug!(failures = self.consecutive_failures, "{e}");
                }
            }
        }
    }

    /// Writes `state` atomically if this exporter holds (or can take) the
    /// writer's lock. Returns whether it wrote.
    pub fn save<T: Serialize>(&mut self, state: &T) -> Result<bool, CheckpointError> {
        self.last_save_wrote = false;
        let path = self.path.clone();
        let write_err = |source| CheckpointError::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write_err)?;
        }
        if !self.take_lock().map_err(write_err)? {
            return Ok(false);
        }
        let envelope = Envelope {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            boot_id: self.boot_id.clone().unwrap_or_default(),
            state,
        };
        let bytes =
            serde_json::to_vec(&envelope).map_err(|e| write_err(std::io::Error::other(e)))?;
        write_atomically(&path, &bytes).map_err(write_err)?;
        self.last_save_wrote = true;
        Ok(true)
    }

    /// Takes the writer's lock unless held already; false when another
    /// exporter holds it.
    fn take_lock(&mut self) -> std::io::Result<bool> {
        if self.lock.is_some() {
            return Ok(true);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.lock_path())?;
        match file.try_lock() {
            Ok(()) => {
                if self.told_not_writer {
                    tracing::info!(
                        "the other exporter released {}; this one writes the checkpoint {} now",
                        self.lock_path().display(),
                        self.path.display()
                    );
                }
                self.lock = Some(file);
                self.remove_stale_temporaries();
                if std::mem::take(&mut self.aside_pending) {
                    match self.set_aside() {
                        Some(aside) => tracing::warn!(
                            "the checkpoint {} this exporter could not use is kept as {} before \
                             this one writes",
                            self.path.display(),
                            aside.display()
                        ),
                        None => {
                            tracing::debug!("no checkpoint at {} to set aside", self.path.display())
                        }
                    }
                }
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                if !self.told_not_writer {
                    self.told_not_writer = true;
                    tracing::warn!(
                        "another exporter holds {} and writes the checkpoint {}: this one counts \
                         and serves but does not write until that one exits",
                        self.lock_path().display(),
                        self.path.display()
                    );
                }
                Ok(false)
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

enum Unusable {
    Io(std::io::Error),
    Reject(RejectReason, String),
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl Checkpoint {
    /// With the lock held no other exporter is writing: a temporary file
    /// left in the directory is one a killed writer never renamed. Only
    /// names of the form [`write_atomically`] creates are removed, and
    /// `unlink` removes a symlink itself, never its target.
    fn remove_stale_temporaries(&self) {
        let (dir, prefix) = temporary_name_parts(&self.path);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let random = name
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix(TEMPORARY_SUFFIX));
            if random.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()))
            {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::info!(
                        "removed {}, a checkpoint a killed exporter left unfinished",
                        entry.path().display()
                    ),
                    Err(e) => tracing::debug!("removing {}: {e}", entry.path().display()),
                }
            }
        }
    }
}

const TEMPORARY_SUFFIX: &str = ".tmp";

/// The directory of `path` and the prefix of its temporary files
/// (`<name>.<random>.tmp`).
fn temporary_name_parts(path: &Path) -> (&Path, String) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    (dir, format!("{name}."))
}

/// A new file of random name beside `path`, created exclusively, written,
/// fsynced and renamed over `path`; then the directory is fsynced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (dir, prefix) = temporary_name_parts(path);
    let mut temporary = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(TEMPORARY_SUFFIX)
        .make_in(dir, |candidate| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(candidate)
        })?;
    temporary.as_file_mut().write_all(bytes)?;
    temporary.as_file().sync_all()?;
    // On failure the temporary file is removed when `temporary` drops.
    temporary.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn no_check<T>(_: &T) -> Result<(), String> {
        Ok(())
    }

    fn at(path: &Path, boot: &str) -> Checkpoint {
        Checkpoint::new(path.to_owned(), Some(boot.into()))
    }

    fn rejected_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".rejected-"))
            .collect()
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ergon-checkpoint.json");
        assert_eq!(
            at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            None
        );
        at(&path, "boot-a").save(&vec![1u64, 2, 3]).unwrap();
        assert_eq!(
            at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            Some(vec![1, 2, 3])
        );
        let err = at(&path, "boot-b").load::<Vec<u64>>(no_check).unwrap_err();
        assert!(matches!(err, CheckpointError::OtherBoot { .. }), "{err}");
        // Counters come back bit for bit: a restored value one ULP lower
        // would be a counter going down (serde_json's default float parser
        // is not exact; the workspace enables `float_roundtrip`).
        let values = vec![1.8097035082307378_f64, 0.1 + 0.2, 1e-300, 123456.789012345];
        at(&path, "boot-a").save(&values).unwrap();
        let restored = at(&path, "boot-a")
            .load::<Vec<f64>>(no_check)
            .unwrap()
            .unwrap();
        for (a, b) in values.iter().zip(&restored) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
        }
    }

    #[test]
    fn unusable_checkpoints_are_set_aside_and_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        let cases: Vec<(&[u8], RejectReason)> = vec![
            (b"{ not json", RejectReason::Format),
            (
                br#"{"format":"other","version":1,"boot_id":"boot-a","state":[]}"#,
                RejectReason::Format,
            ),
            // Right envelope, wrong state shape.
            (
                br#"{"format":"ergon-checkpoint","version":1,"boot_id":"boot-a","state":"text"}"#,
                RejectReason::Format,
            ),
        ];
        for (bytes, reason) in cases {
            std::fs::write(&path, bytes).unwrap();
            let mut checkpoint = at(&path, "boot-a");
            let err = checkpoint.load::<Vec<u64>>(no_check).unwrap_err();
            assert!(
                matches!(&err, CheckpointError::Rejected { reason: r, aside: Some(_), .. } if *r == reason),
                "{err}"
            );
            assert_eq!(checkpoint.rejected(), Some(reason));
            assert!(!path.exists(), "a rejected checkpoint stayed in place");
            let aside = rejected_files(dir.path());
            assert_eq!(aside.len(), 1, "{aside:?}");
            assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes);
            assert!(err.to_string().contains(".rejected-"), "{err}");
            std::fs::remove_file(&aside[0]).unwrap();
        }
        // Valid shape, values the caller's validation refuses.
        at(&path, "boot-a").save(&vec![f64::MAX, 1.0]).unwrap();
        let mut checkpoint = at(&path, "boot-a");
        let err = checkpoint
            .load::<Vec<f64>>(|v| {
                if v.iter().all(|x| *x < 1e12) {
                    Ok(())
                } else {
                    Err("a counter of 1.8e308 J".into())
                }
            })
            .unwrap_err();
        assert_eq!(checkpoint.rejected(), Some(RejectReason::Invalid));
        assert!(err.to_string().contains("1.8e308 J"), "{err}");
        assert_eq!(rejected_files(dir.path()).len(), 1);
    }

    #[test]
    fn reads_are_bounded_and_symlinks_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        let huge = File::create(&path).unwrap();
        huge.set_len(MAX_CHECKPOINT_BYTES + 1).unwrap();
        let mut checkpoint = at(&path, "boot-a");
        checkpoint.load::<Vec<u64>>(no_check).unwrap_err();
        assert_eq!(checkpoint.rejected(), Some(RejectReason::TooLarge));
        for aside in rejected_files(dir.path()) {
            std::fs::remove_file(aside).unwrap();
        }
        // It took the writer's lock to set the file aside.
        drop(checkpoint);

        let target = dir.path().join("elsewhere.json");
        at(&target, "boot-a").save(&vec![7u64]).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let mut checkpoint = at(&path, "boot-a");
        checkpoint.load::<Vec<u64>>(no_check).unwrap_err();
        assert_eq!(checkpoint.rejected(), Some(RejectReason::NotAFile));
        // The link was moved aside, its target left alone.
        assert!(std::fs::symlink_metadata(&path).is_err());
        assert_eq!(
            at(&target, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            Some(vec![7])
        );
    }

    #[test]
    fn an_unreadable_boot_id_matches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        Checkpoint::new(path.clone(), None)
            .save(&vec![1u64])
            .unwrap();
        let err = Checkpoint::new(path.clone(), None)
            .load::<Vec<u64>>(no_check)
            .unwrap_err();
        assert!(matches!(err, CheckpointError::UnknownBoot { .. }), "{err}");
        let err = at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap_err();
        assert!(matches!(err, CheckpointError::OtherBoot { .. }), "{err}");
        // And the host's id, when readable, is trimmed; empty counts as none.
        let proc_dir = tempfile::tempdir().unwrap();
        assert_eq!(boot_id(proc_dir.path()), None);
        let random = proc_dir.path().join("sys/kernel/random");
        std::fs::create_dir_all(&random).unwrap();
        std::fs::write(random.join("boot_id"), "\n").unwrap();
        assert_eq!(boot_id(proc_dir.path()), None);
        std::fs::write(random.join("boot_id"), "abc-123\n").unwrap();
        assert_eq!(boot_id(proc_dir.path()).as_deref(), Some("abc-123"));
    }

    #[test]
    fn a_planted_symlink_is_never_followed_when_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // The names a writer might use for its temporary file.
        for name in ["ergon-checkpoint.tmp", "ergon-checkpoint.json.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        at(&path, "boot-a").save(&vec![1u64, 2]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "checkpoint mode {mode:o}");
        // Nothing but the checkpoint and its lock was added: no temporary
        // file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ergon-checkpoint.json",
                "ergon-checkpoint.json.lock",
                "ergon-checkpoint.json.tmp",
                "ergon-checkpoint.tmp",
                "victim"
            ]
        );
        // A symlink at the checkpoint's own name is replaced, not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        at(&path, "boot-a").save(&vec![3u64]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }

    #[test]
    fn the_writer_removes_temporaries_a_killed_writer_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let stale = dir.path().join("ergon-checkpoint.json.Ab3xYz.tmp");
        std::fs::write(&stale, b"{half a checkpoint").unwrap();
        let planted = dir.path().join("ergon-checkpoint.json.Qw9rTy.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let unrelated = dir.path().join("ergon-checkpoint.json.keep-me.tmp");
        std::fs::write(&unrelated, b"not ours").unwrap();
        at(&path, "boot-a").save(&vec![1u64]).unwrap();
        assert!(!stale.exists());
        assert!(std::fs::symlink_metadata(&planted).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(unrelated.exists(), "a file of another shape was removed");
    }

    #[test]
    fn failed_saves_are_counted_and_a_later_save_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-directory");
        std::fs::write(&blocker, b"").unwrap();
        let mut checkpoint = at(&blocker.join("ergon-checkpoint.json"), "boot-a");
        let err = checkpoint.save(&vec![1u64]).unwrap_err().to_string();
        assert!(
            err.contains("--state-dir") && err.contains("not-a-directory"),
            "{err}"
        );
        for _ in 0..3 {
            checkpoint.save_and_report(&vec![1u64]);
        }
        assert_eq!(checkpoint.consecutive_failures, 3);
        assert!(!checkpoint.writing());
        std::fs::remove_file(&blocker).unwrap();
        checkpoint.save_and_report(&vec![1u64]);
        assert_eq!(checkpoint.consecutive_failures, 0);
        assert!(checkpoint.writing());
    }

    #[test]
    fn a_rejection_leaves_the_file_to_the_exporter_that_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        // The old pod of a rolling update writes (and holds the lock); the
        // new one cannot read what it finds.
        let mut writer = at(&path, "boot-a");
        assert!(writer.save(&vec![1u64]).unwrap());
        std::fs::write(&path, b"{ a format of a later version").unwrap();
        let mut surge = at(&path, "boot-a");
        let err = surge.load::<Vec<u64>>(no_check).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Rejected { aside: None, .. }),
            "{err}"
        );
        assert!(path.exists(), "the writer's checkpoint was moved aside");
        assert!(rejected_files(dir.path()).is_empty());
        // Once the writer is gone, the surge pod takes over: the file it
        // could not use is kept aside before its first write replaces it.
        drop(writer);
        assert!(surge.save(&vec![2u64]).unwrap());
        let aside = rejected_files(dir.path());
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(
            std::fs::read(&aside[0]).unwrap(),
            b"{ a format of a later version"
        );
        assert_eq!(
            at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            Some(vec![2])
        );
    }

    #[test]
    fn rejections_in_the_same_second_keep_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        for n in 0..3u8 {
            std::fs::write(&path, [b'{', b'0' + n]).unwrap();
            assert!(at(&path, "boot-a").load::<Vec<u64>>(no_check).is_err());
        }
        let mut kept: Vec<Vec<u8>> = rejected_files(dir.path())
            .iter()
            .map(|file| std::fs::read(file).unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, vec![b"{0".to_vec(), b"{1".to_vec(), b"{2".to_vec()]);
    }

    #[test]
    fn a_second_exporter_does_not_write_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ergon-checkpoint.json");
        let mut first = at(&path, "boot-a");
        assert!(first.save(&vec![1u64]).unwrap());
        assert!(first.writing());
        let mut second = at(&path, "boot-a");
        assert!(!second.save(&vec![2u64]).unwrap());
        assert!(!second.writing());
        assert_eq!(
            at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            Some(vec![1])
        );
        assert!(first.save(&vec![3u64]).unwrap());
        drop(first);
        assert!(second.save(&vec![4u64]).unwrap());
        assert_eq!(
            at(&path, "boot-a").load::<Vec<u64>>(no_check).unwrap(),
            Some(vec![4])
        );
    }
}
