//! What the agent reads back from its state directory after a crash or a power cut: an app's
//! state, its last-known-good render, and a queued outbox message. The first byte picks which.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    edgesync::fuzzing::state_files(dir.path(), data);
});
