//! Resource hooks on the real control plane: Jobs that run (the fake nodes run pods with
//! `restartPolicy: Never` to completion), in their phase, outside the app's inventory.

use k8s_openapi::api::batch::v1::Job;

use crate::harness::{eventually, Agent, AgentConfig, GitRepo, TestNamespace, WAIT};

fn job(meta: &str, hook: &str, image: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  {meta}\n  annotations:\n{hook}spec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: run\n          image: {image}\n"
    )
}

fn complete(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
        })
}

#[tokio::test]
async fn hooks_run_in_their_phases_and_stay_out_of_the_inventory() {
    let ns = TestNamespace::reserve("hooks").await;
    let repo = GitRepo::new();
    repo.write(
        "app/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"1\"\n",
    );
    repo.write(
        "app/migrate.yaml",
        &job(
            "name: migrate",
            "    argocd.argoproj.io/hook: PreSync\n",
            "busybox:1.36",
        ),
    );
    repo.write(
        "app/smoke.yaml",
        &job(
            "generateName: smoke-",
            "    argocd.argoproj.io/hook: PostSync\n    argocd.argoproj.io/hook-delete-policy: HookSucceeded\n",
            "busybox:1.36",
        ),
    );
    let first = repo.commit("app with hooks");
    let url = repo.url();
    let config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&format!(
            "name = \"hooked\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\nprune = true",
            ns.name
        ));
    let agent = Agent::start(&config);
    config.wait_applied("hooked", &first).await;
    let jobs = ns.api::<Job>();
    let migrate = jobs.get("migrate").await.unwrap();
    assert!(
        complete(&migrate),
        "the PreSync hook ran to completion before the sync was recorded"
    );
    // The PostSync hook ran under a generated name and was deleted once it succeeded.
    eventually("the PostSync hook gone", WAIT, || async {
        let list = jobs.list(&Default::default()).await.ok()?;
        let names: Vec<String> = list
            .items
            .iter()
            .filter_map(|j| j.metadata.name.clone())
            .collect();
        (!names.iter().any(|n| n.starts_with("smoke-"))).then_some(())
    })
    .await;
    let state = config.state("hooked");
    let objects = state["objects"].to_string();
    assert!(
        !objects.contains("Job"),
        "hooks are not the app's objects: {objects}"
    );
    let first_uid = migrate.metadata.uid.clone();

    // A new revision changes the hook's (immutable) Job spec: the old Job is deleted and the
    // new one created, not patched.
    repo.write(
        "app/migrate.yaml",
        &job(
            "name: migrate",
            "    argocd.argoproj.io/hook: PreSync\n",
            "busybox:1.37",
        ),
    );
    repo.write(
        "app/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"2\"\n",
    );
    let second = repo.commit("new migration");
    config.wait_applied("hooked", &second).await;
    let migrate = jobs.get("migrate").await.unwrap();
    assert_ne!(
        migrate.metadata.uid, first_uid,
        "a changed hook is a new run"
    );
    assert!(complete(&migrate));
    assert!(agent.stop().await.success());
}

/// Argo CD's PostDelete hooks (and Helm's `post-delete`): not run at a sync, run once the app
/// left the node and its objects are gone (the app had the resources finalizer).
#[tokio::test]
async fn post_delete_hooks_run_once_a_removed_apps_objects_are_gone() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let ns = TestNamespace::reserve("postdelete").await;
    let repo = GitRepo::new();
    repo.write(
        "app/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"1\"\n",
    );
    repo.write(
        "app/cleanup.yaml",
        &job(
            "name: cleanup",
            "    argocd.argoproj.io/hook: PostDelete\n",
            "busybox:1.36",
        ),
    );
    repo.write(
        "app/farewell.yaml",
        &job(
            "name: farewell",
            "    helm.sh/hook: post-delete\n",
            "busybox:1.36",
        ),
    );
    let sha = repo.commit("app with cleanup hooks");
    let url = repo.url();
    let body = format!(
        "name = \"leaving\"\nrepo = \"{url}\"\npath = \"app\"\nnamespace = \"{}\"\ncreate_namespace = true\ndelete_on_removal = true",
        ns.name
    );
    let mut config = AgentConfig::new()
        .repository(&format!("url = \"{url}\"\npoll_interval = \"1s\""))
        .app(&body);
    let agent = Agent::start(&config);
    config.wait_applied("leaving", &sha).await;
    let jobs = ns.api::<Job>();
    assert!(
        jobs.get_opt("cleanup").await.unwrap().is_none(),
        "PostDelete hooks do not run at a sync"
    );

    // The app leaves the config (another takes its place).
    config.edit(
        &body,
        &format!("name = \"other\"\nrepo = \"{url}\"\npath = \"none\"\nallow_empty = true"),
    );
    config.write();
    let settings = ns.api::<ConfigMap>();
    for hook in ["cleanup", "farewell"] {
        eventually("the PostDelete hook ran", WAIT, || async {
            jobs.get_opt(hook).await.ok()?.filter(complete).map(|_| ())
        })
        .await;
    }
    assert!(
        settings.get_opt("settings").await.unwrap().is_none(),
        "the objects went first"
    );
    eventually("the app forgotten", WAIT, || async {
        config.state("leaving").is_null().then_some(())
    })
    .await;
    assert!(
        agent.log().contains("PostDelete hooks done"),
        "{}",
        agent.log()
    );
    assert!(agent.stop().await.success());
}
