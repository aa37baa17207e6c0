//! Helpers shared by the fuzz targets: splitting one input into the files
//! of a host tree, and writing that tree where the parsers expect it.
//!
//! Inputs are plain bytes with NUL (`\0`) between fields, because sysfs and
//! procfs text never holds a NUL: a corpus file is the real content of a
//! few files joined by NULs, readable and easy to seed from fixtures.

use std::path::{Path, PathBuf};

/// The `\0`-separated fields of `data`; missing ones are empty.
pub fn fields<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&[][..]; N];
    for (slot, field) in out.iter_mut().zip(data.split(|b| *b == 0)) {
        *slot = field;
    }
    out
}

/// A temporary directory standing in for a host's `/sys` or `/proc`,
/// removed on drop (also when the target panics and libFuzzer unwinds).
pub struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        // /dev/shm where it exists: the targets write a few files per run.
        let base = Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        };
        Tree {
            dir: dir.expect("a temporary directory for the fuzzed tree"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `content` at `relative`, creating its directories.
    pub fn write(&self, relative: &str, content: &[u8]) -> PathBuf {
        let path = self.dir.path().join(relative);
        std::fs::create_dir_all(path.parent().expect("a file below the root"))
            .expect("creating the fuzzed tree");
        std::fs::write(&path, content).expect("writing the fuzzed tree");
        path
    }
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

/// A name taken from fuzzed bytes that is usable as one path component
/// (no `/`, no NUL, not `.` or `..`, not empty), or `fallback`.
pub fn component(bytes: &[u8], fallback: &str) -> String {
    let text = String::from_utf8_lossy(bytes).replace(['/', '\0'], "_");
    let text: String = text.chars().take(64).collect();
    match text.as_str() {
        "" | "." | ".." => fallback.to_owned(),
        _ => text,
    }
}

/// The body of each fuzz target, one function per target of the same name:
/// `fuzz_targets/<name>.rs` hands it libFuzzer's input, and
/// `exporter/tests/fuzz_corpus.rs` replays `corpus/<name>/` through it in
/// plain `cargo test`.
pub mod targets;
