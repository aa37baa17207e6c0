//! Fixtures shared by the meter tests and the meter benchmark: temporary
//! sysfs trees shaped like the kernel's, and a log capture.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ergon::meter::{Meter, Rejection};
use tempfile::TempDir;

/// The kernel's range for a 32-bit counter at Intel's 61.035 µJ energy unit.
pub const INTEL_RANGE_UJ: u64 = 262_143_328_850;
/// AMD's energy unit is 15.26 µJ.
pub const AMD_RANGE_UJ: u64 = 65_532_610_987;

/// A temporary host root with a powercap tree laid out like the kernel's:
/// zones live under `devices/virtual/powercap/intel-rapl/…`, sub-zones inside
/// their parent, and `class/powercap/<id>` are symlinks to them.
pub struct SysFixture {
    pub root: TempDir,
}

impl Default for SysFixture {
    fn default() -> Self {
        SysFixture::new()
    }
}

impl SysFixture {
    pub fn new() -> SysFixture {
        let root = tempfile::tempdir().expect("temporary directory");
        let fixture = SysFixture { root };
        std::fs::create_dir_all(fixture.path().join("class/powercap")).unwrap();
        fixture
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    fn control_dir(id: &str) -> &'static str {
        if id.starts_with("intel-rapl-mmio") {
            "intel-rapl-mmio"
        } else {
            "intel-rapl"
        }
    }

    /// Where zone `id` ("intel-rapl:0:1") lives, following the kernel's nesting.
    pub fn zone_dir(&self, id: &str) -> PathBuf {
        let control = SysFixture::control_dir(id);
        let mut dir = self.path().join("devices/virtual/powercap").join(control);
        let (prefix, indices) = id.split_once(':').unwrap();
        let mut so_far = prefix.to_string();
        for index in indices.split(':') {
            so_far = format!("{so_far}:{index}");
            dir = dir.join(&so_far);
        }
        dir
    }

    /// Add a zone with its `name`, `energy_uj` and `max_energy_range_uj`.
    pub fn add_zone(&self, id: &str, name: &str, energy_uj: u64, range_uj: u64) {
        let control = self
            .path()
            .join("devices/virtual/powercap")
            .join(SysFixture::control_dir(id));
        std::fs::create_dir_all(&control).unwrap();
        std::fs::write(control.join("enabled"), "1\n").unwrap();
        let class_control = self
            .path()
            .join("class/powercap")
            .join(SysFixture::control_dir(id));
        if !class_control.exists() {
            std::os::unix::fs::symlink(&control, &class_control).unwrap();
        }
        let dir = self.zone_dir(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
        std::fs::write(dir.join("max_energy_range_uj"), format!("{range_uj}\n")).unwrap();
        std::fs::write(dir.join("enabled"), "1\n").unwrap();
        std::fs::write(dir.join("energy_uj"), format!("{energy_uj}\n")).unwrap();
        std::os::unix::fs::symlink(&dir, self.path().join("class/powercap").join(id)).unwrap();
    }

    /// Rewrite a zone's counter in place (same inode, as sysfs keeps it), so
    /// a reader holding the file open sees the new value.
    pub fn set_energy(&self, id: &str, energy_uj: u64) {
        let path = self.zone_dir(id).join("energy_uj");
        let mut file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(format!("{energy_uj}\n").as_bytes()).unwrap();
    }

    /// Overwrite one file of a zone in place with raw bytes (garbage,
    /// non-UTF-8, …), as a broken driver might present it.
    pub fn set_zone_file(&self, id: &str, file: &str, content: &[u8]) {
        let path = self.zone_dir(id).join(file);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(content).unwrap();
    }

    pub fn remove_zone(&self, id: &str) {
        std::fs::remove_file(self.path().join("class/powercap").join(id)).unwrap();
        std::fs::remove_dir_all(self.zone_dir(id)).unwrap();
    }

    /// One-socket Intel client: package with core and uncore, psys, and the
    /// MMIO duplicate of package-0 that client parts expose.
    pub fn intel_one_socket() -> SysFixture {
        let fixture = SysFixture::new();
        fixture.add_zone("intel-rapl:0", "package-0", 1_000_000, INTEL_RANGE_UJ);
        fixture.add_zone("intel-rapl:0:0", "core", 400_000, INTEL_RANGE_UJ);
        fixture.add_zone("intel-rapl:0:1", "uncore", 100_000, INTEL_RANGE_UJ);
        fixture.add_zone("intel-rapl:1", "psys", 2_000_000, INTEL_RANGE_UJ);
        fixture.add_zone("intel-rapl-mmio:0", "package-0", 1_000_000, INTEL_RANGE_UJ);
        fixture
    }

    /// Socket `socket`: its package zone and `sub_zones` under it, in order.
    pub fn add_socket(
        &self,
        socket: u32,
        package_uj: u64,
        sub_zones: &[&str],
        sub_uj: u64,
        range_uj: u64,
    ) {
        let package = format!("intel-rapl:{socket}");
        self.add_zone(&package, &format!("package-{socket}"), package_uj, range_uj);
        for (index, name) in sub_zones.iter().enumerate() {
            self.add_zone(&format!("{package}:{index}"), name, sub_uj, range_uj);
        }
    }

    /// Two-socket Intel server: package and dram per socket.
    pub fn intel_two_socket() -> SysFixture {
        let fixture = SysFixture::new();
        for socket in 0..2 {
            fixture.add_socket(socket, 5_000_000, &["dram"], 700_000, INTEL_RANGE_UJ);
        }
        fixture
    }

    /// Two-socket AMD EPYC: package and core only, AMD's counter range.
    pub fn amd_two_socket() -> SysFixture {
        let fixture = SysFixture::new();
        for socket in 0..2 {
            fixture.add_socket(socket, 3_000_000, &["core"], 1_000_000, AMD_RANGE_UJ);
        }
        fixture
    }

    /// Two sockets with every domain (package, core, uncore, dram) plus psys:
    /// the benchmark's "two sockets' worth of zones".
    pub fn intel_two_socket_full() -> SysFixture {
        let fixture = SysFixture::new();
        for socket in 0..2 {
            fixture.add_socket(
                socket,
                5_000_000,
                &["core", "uncore", "dram"],
                1_000_000,
                INTEL_RANGE_UJ,
            );
        }
        fixture.add_zone("intel-rapl:2", "psys", 9_000_000, INTEL_RANGE_UJ);
        fixture
    }

    /// Write `host_proc/cpuinfo` (under `proc/` of the same root) and return
    /// the proc root.
    pub fn write_cpuinfo(&self, text: &str) -> PathBuf {
        let proc_root = self.path().join("proc");
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::write(proc_root.join("cpuinfo"), text).unwrap();
        proc_root
    }

    /// Make every directory traversable and every file readable by others,
    /// except the files named `energy_uj`, which become root-only (0400) as
    /// Linux 5.10 made them.
    pub fn make_energy_root_only(&self) {
        fn walk(dir: &Path) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            for entry in std::fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                if kind.is_symlink() {
                    continue;
                }
                if kind.is_dir() {
                    walk(&entry.path());
                } else {
                    let mode = if entry.file_name() == "energy_uj" {
                        0o400
                    } else {
                        0o444
                    };
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
                        .unwrap();
                }
            }
        }
        walk(self.path());
    }
}

/// Values a broken or hostile driver might put in a numeric sysfs file, by
/// name: none of them is a number a counter or power reading can hold.
pub const BAD_VALUES: &[(&str, &[u8])] = &[
    ("garbage", b"garbage\n"),
    ("empty", b""),
    ("huge", b"123456789012345678901234567890\n"),
    ("negative", b"-5\n"),
    ("non-UTF-8", b"\xff\xfe1\x1b[31m\n"),
];

/// Zone → whether it was read at the last sample, from a meter's health.
pub fn zones_up(meter: &dyn Meter) -> BTreeMap<String, bool> {
    meter
        .health()
        .zones
        .into_iter()
        .map(|zone| (zone.zone, zone.up))
        .collect()
}

/// Why `zone` is down, from a meter's health.
pub fn reason_of(meter: &dyn Meter, zone: &str) -> String {
    meter
        .health()
        .zones
        .into_iter()
        .find(|health| health.zone == zone)
        .and_then(|health| health.reason)
        .unwrap_or_else(|| panic!("{zone} has no reason: {:?}", meter.health()))
}

/// Readings a meter rejected so far for `rejection`.
pub fn rejected(meter: &dyn Meter, rejection: Rejection) -> u64 {
    meter
        .health()
        .rejected
        .get(&rejection)
        .copied()
        .unwrap_or(0)
}

/// Runs the ignored test `child_test` of this test binary as uid/gid 65534
/// (root ignores file modes), with `fixture_var` set to `fixture`. The child
/// prints a line containing `BEFORE:`, then waits for a line on stdin
/// ([`wait_for_parent`]); meanwhile `between` runs here (change a mode). Returns
/// everything the child printed; panics if it failed.
pub fn run_as_nobody_around(
    child_test: &str,
    fixture_var: &str,
    fixture: &Path,
    between: impl FnOnce(),
) -> String {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            child_test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(fixture_var, fixture)
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut output = String::new();
    let mut line = String::new();
    // libtest prints the test's name before its output, on the same line.
    while stdout.read_line(&mut line).unwrap() > 0 {
        let before = line.contains("BEFORE:");
        output.push_str(&std::mem::take(&mut line));
        if before {
            break;
        }
    }
    between();
    // A child that already failed has closed its stdin: its output says why.
    let _ = child.stdin.take().unwrap().write_all(b"go\n");
    stdout.read_to_string(&mut output).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the child failed: {output}");
    output
}

/// The child's side of [`run_as_nobody_around`]: wait until the parent has
/// made its change.
pub fn wait_for_parent() {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

/// The line of `output` containing `marker`.
pub fn line_with<'a>(output: &'a str, marker: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker}: {output}"))
}

/// Log lines captured while a closure runs on this thread.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .map(str::to_string)
            .collect()
    }
}

pub struct CapturedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedWriter;
    fn make_writer(&'a self) -> CapturedWriter {
        CapturedWriter(self.0.clone())
    }
}

/// Run `body` with a subscriber that records its log lines (DEBUG and up).
pub fn capture_logs<T>(body: impl FnOnce() -> T) -> (T, CapturedLogs) {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, body);
    (result, logs)
}
