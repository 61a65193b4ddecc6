//! A manifest file from Git: YAML (or JSON) documents read as Kubernetes objects.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let name = if data.first() == Some(&b'{') { "a.json" } else { "a.yaml" };
    if std::fs::write(dir.path().join(name), data).is_err() {
        return;
    }
    let _ = edgesync::render::render(dir.path(), std::path::Path::new("."));
});
