//! The counter checkpoint, as read back at start (a file on the host that
//! outlives the exporter, so anything may be in it).
#![no_main]

use ergon::interval::State;
use ergon_fuzz::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tree = Tree::new();
    let path = tree.write("checkpoint.json", data);
    let mut checkpoint = ergon::checkpoint::Checkpoint::new(path, Some("fuzz-boot-id".to_owned()));
    let _ = checkpoint.load::<State>(|_| Ok(()));
});
