//! Argo CD Application and AppProject manifests from the fleet repository: read as YAML, each
//! object parsed, and each Application made an app.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    edgesync::fuzzing::argo(dir.path(), data);
});
