//! A kustomization from Git, with a resource and a patch beside it: the input is split at NUL
//! bytes into kustomization.yaml, resource.yaml and patch.yaml, and built by the native engine.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let Ok(dir) = tempfile::tempdir() else { return };
    let app = dir.path().join("app");
    if std::fs::create_dir(&app).is_err() {
        return;
    }
    for name in ["kustomization.yaml", "resource.yaml", "patch.yaml"] {
        let text = parts.next().unwrap_or_default();
        if std::fs::write(app.join(name), text).is_err() {
            return;
        }
    }
    let _ = edgesync::render::render(dir.path(), std::path::Path::new("app"));
});
