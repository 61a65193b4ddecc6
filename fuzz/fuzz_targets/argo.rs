//! Argo CD Application and AppProject manifests from the fleet repository: read as YAML, each
//! object parsed, and each Application made an app.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("app.yaml"), data).is_err() {
        return;
    }
    let Ok(manifests) = edgesync::render::render(dir.path(), std::path::Path::new(".")) else {
        return;
    };
    for object in &manifests.objects {
        if let Ok(Some(parsed)) = edgesync::fleet::argo::parse(object) {
            match parsed.object {
                edgesync::fleet::argo::FleetObject::Application(app) => {
                    let _ = app.to_app_config();
                }
                edgesync::fleet::argo::FleetObject::AppProject(project) => {
                    // Its globs run against real-looking names (hostile patterns must not hang).
                    let p = edgesync::policy::Project::from_spec(&project.name, &project.spec);
                    let _ = p.check_source("https://github.com/org/repo-aaaaaaaaaaaaaaaaaaaaaaaa.git");
                    let _ = p.check_destination("team-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
                    let _ = p.sync_windows("web-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Some("team"));
                    let _ = p.check_kind("apps", "Deployment", true);
                }
            }
        }
    }
});
