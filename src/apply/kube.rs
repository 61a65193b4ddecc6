//! The Kubernetes API, as the apply stage sees it: a client from the node's kubeconfig,
//! discovery of any kind (CRDs included) and server-side apply with field manager `edgesync`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;
use sha2::Digest;
use tokio::sync::Mutex;

use super::{ApplyError, Inventory, ObjectFailure, ObjectRef, Outcome, Phase, Plan, FIELD_MANAGER};
use crate::config::K3S_KUBECONFIG;
use crate::health::{Health, HealthStatus};
use crate::metrics::Metrics;
use crate::render::Object;

const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);
/// Where each app's inventory is kept in the cluster, one ConfigMap per app.
pub(crate) const INVENTORY_NAMESPACE: &str = "edgesync-system";
/// Objects applied at the same time, across every app syncing: a small app's wave goes out at
/// once (Argo CD runs a wave's tasks in parallel, up to its kubectl parallelism limit of 20),
/// while many apps syncing together still share this many requests, and connections.
const APPLY_CONCURRENCY: usize = 16;

/// How long a watch runs before the API server ends it and it is renewed (kube's default).
const WATCH_SECONDS: u32 = 290;

/// Builds two clients: one for calls, which gives up on a server silent for a minute, and
/// one for watches, which are silent while nothing changes and must outlive
/// [`WATCH_SECONDS`] (a shorter read timeout broke every quiet watch each minute, and the
/// apps it covered fell back to being read every 15 s). Order: the configured kubeconfig,
/// `$KUBECONFIG`, in-cluster service account, then the k3s kubeconfig, then
/// `~/.kube/config`.
pub(crate) async fn connect(kubeconfig: Option<&Path>) -> Result<(Client, Client), ApplyError> {
    let mut config = load_config(kubeconfig).await?;
    config.connect_timeout = Some(Duration::from_secs(10));
    // The API server's audit log and metrics tell edgesync's requests apart by this.
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!("edgesync/", env!("CARGO_PKG_VERSION"))),
    ));
    let mut watches = config.clone();
    watches.read_timeout = Some(Duration::from_secs(u64::from(WATCH_SECONDS) + 15));
    config.read_timeout = Some(Duration::from_secs(60));
    let calls = Client::try_from(config).map_err(ApplyError::Client)?;
    let watches = Client::try_from(watches).map_err(ApplyError::Client)?;
    Ok((calls, watches))
}

/// Watch parameters for a client from [`connect`]: ended by the server before the watch
/// client's read timeout.
pub(crate) fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(WATCH_SECONDS)
}

async fn load_config(kubeconfig: Option<&Path>) -> Result<Config, ApplyError> {
    if let Some(path) = kubeconfig {
        return from_file(path).await;
    }
    if std::env::var_os("KUBECONFIG").is_some() {
        return Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(|source| ApplyError::Kubeconfig {
                path: "$KUBECONFIG".into(),
                source,
            });
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Config::incluster().map_err(ApplyError::InCluster);
    }
    let k3s = PathBuf::from(K3S_KUBECONFIG);
    if k3s.is_file() {
        return from_file(&k3s).await;
    }
    Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .map_err(ApplyError::NoCredentials)
}

async fn from_file(path: &Path) -> Result<Config, ApplyError> {
    let err = |source| ApplyError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kc = Kubeconfig::read_from(path).map_err(err)?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(err)
}

/// Server-side applies plans. Discovery results are cached per kind.
pub(crate) struct KubeApplier {
    client: Client,
    /// For watches: a longer read timeout ([`connect`]).
    watch_client: Client,
    resources: Mutex<HashMap<GroupVersionKind, (ApiResource, Scope)>>,
    metrics: Arc<Metrics>,
    /// Set once [`INVENTORY_NAMESPACE`] has been applied.
    inventory_namespace: tokio::sync::OnceCell<()>,
    /// [`APPLY_CONCURRENCY`] permits, one per object being applied.
    in_flight: tokio::sync::Semaphore,
}

impl KubeApplier {
    pub(crate) fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        KubeApplier {
            watch_client: client.clone(),
            client,
            resources: Mutex::new(HashMap::new()),
            metrics,
            inventory_namespace: tokio::sync::OnceCell::new(),
            in_flight: tokio::sync::Semaphore::new(APPLY_CONCURRENCY),
        }
    }

    fn count<T>(&self, verb: &str, result: &Result<T, kube::Error>) {
        let code = match result {
            Ok(_) => Some(200),
            Err(kube::Error::Api(status)) => Some(status.code),
            Err(_) => None,
        };
        self.metrics.apply_request(verb, code);
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Watches go through this client: see [`connect`].
    pub(crate) fn with_watch_client(mut self, client: Client) -> Self {
        self.watch_client = client;
        self
    }

    pub(crate) fn watch_client(&self) -> &Client {
        &self.watch_client
    }

    /// What the cluster offers, as `helm template` needs it for `.Capabilities` (Argo CD
    /// passes the same): the server's version, and every `group/version` and
    /// `group/version/Kind` it serves.
    pub(crate) async fn capabilities(&self) -> Result<Capabilities, kube::Error> {
        let version = self.client.apiserver_version().await?;
        let discovery = kube::Discovery::new(self.client.clone()).run().await?;
        let mut api_versions = std::collections::BTreeSet::new();
        for group in discovery.groups() {
            for version in group.versions() {
                for (resource, _) in group.versioned_resources(version) {
                    api_versions.insert(resource.api_version.clone());
                    api_versions.insert(format!("{}/{}", resource.api_version, resource.kind));
                }
            }
        }
        Ok(Capabilities {
            kube_version: release_version(&version),
            api_versions: api_versions.into_iter().collect(),
        })
    }

    /// Applies `plan` wave by wave. Within a wave, namespaces and CRDs go first, one by one
    /// (CRDs waited on until Established), then the other objects concurrently (up to
    /// [`APPLY_CONCURRENCY`] across every app); a failed object does not stop the others of its wave. Before a later wave starts,
    /// the earlier one must be healthy (within `wave_timeout`); a failed or unhealthy wave
    /// stops the sync there, and the objects of later waves are reported as not applied.
    pub(crate) async fn apply(&self, plan: &Plan, wave_timeout: Duration) -> Outcome {
        let mut outcome = Outcome::default();
        let ns = plan.default_namespace.as_deref();
        let waves = plan.by_wave();
        for (n, (wave, objects)) in waves.iter().enumerate() {
            let failed_before = outcome.failures.len();
            let applied_before = outcome.applied.len();
            let (ordered, rest): (Vec<&Object>, Vec<&Object>) = objects
                .iter()
                .partition(|o| Phase::of(o) != Phase::Resources);
            let mut crds = Vec::new();
            for object in ordered {
                let result = self.apply_one(object, plan).await;
                if let Ok((applied, _)) = &result {
                    if Phase::of(object) == Phase::CustomResourceDefinitions {
                        crds.push(applied.name.clone());
                    }
                }
                record(&mut outcome, plan, object, result);
            }
            for name in crds {
                if let Err(e) = self.wait_established(&name).await {
                    tracing::warn!(crd = %name, "{e}");
                }
            }
            // Collected first: a lazy `map` inside the stream trips up the Send check of
            // the spawned sync task (rust-lang/rust#102211).
            let pending: Vec<_> = rest.iter().map(|o| self.apply_one(o, plan)).collect();
            let results: Vec<_> = futures::stream::iter(pending)
                .buffered(APPLY_CONCURRENCY)
                .collect()
                .await;
            for (object, result) in rest.into_iter().zip(results) {
                record(&mut outcome, plan, object, result);
            }
            let Some(later) = waves.get(n + 1..).filter(|l| !l.is_empty()) else {
                break;
            };
            let stop = if outcome.failures.len() > failed_before {
                let failures = &outcome.failures[failed_before..];
                Some((
                    format!("wave {wave} failed"),
                    failures.iter().all(|f| f.transient),
                ))
            } else {
                let applied = &outcome.applied[applied_before..];
                match self.wait_healthy(applied, wave_timeout).await {
                    Ok(()) => None,
                    Err(failure) => {
                        let why = format!("wave {wave} did not become healthy");
                        let transient = failure.transient;
                        outcome.failures.push(failure);
                        Some((why, transient))
                    }
                }
            };
            if let Some((why, transient)) = stop {
                for (_, objects) in later {
                    for object in *objects {
                        outcome.failures.push(ObjectFailure {
                            object: object_ref(object, ns),
                            message: format!("not applied: {why}"),
                            transient,
                        });
                    }
                }
                break;
            }
        }
        outcome
    }

    /// Waits until every object in `objects` is Healthy (or Suspended). Degraded, or still
    /// Progressing after `timeout`, is a failure naming the object.
    async fn wait_healthy(
        &self,
        objects: &[ObjectRef],
        timeout: Duration,
    ) -> Result<(), ObjectFailure> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut waiting = None;
            for object in objects {
                let health = match self.get(object).await {
                    Ok(Some(live)) => crate::health::assess(&live),
                    Ok(None) => crate::health::Health {
                        status: HealthStatus::Missing,
                        message: "does not exist".into(),
                    },
                    Err(e) => {
                        return Err(ObjectFailure {
                            object: object.clone(),
                            message: e.message,
                            transient: e.transient,
                        })
                    }
                };
                match health.status {
                    HealthStatus::Healthy | HealthStatus::Suspended => {}
                    HealthStatus::Degraded => {
                        return Err(ObjectFailure {
                            object: object.clone(),
                            message: format!("Degraded: {}", health.message),
                            transient: false,
                        })
                    }
                    _ => {
                        waiting.get_or_insert((object, health));
                    }
                }
            }
            let Some((object, health)) = waiting else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ObjectFailure {
                    object: object.clone(),
                    message: format!(
                        "still {} after {}: {}",
                        health.status.as_str(),
                        humantime::format_duration(timeout),
                        health.message
                    ),
                    transient: false,
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Applies one object; returns its reference and its health as the API server answered
    /// (the object it returns carries its status).
    async fn apply_one(
        &self,
        object: &Object,
        plan: &Plan,
    ) -> Result<(ObjectRef, Health), ObjectFailure> {
        // Never closed; were it, the apply would go ahead unbounded rather than fail.
        let _permit = self.in_flight.acquire().await.ok();
        if plan.out_of_sync_only {
            let (oref, wanted, live) = self.dry_run(object, plan).await?;
            if let Some(live) = live {
                let ignored = super::diff::ignored_pointers(
                    &plan.ignore_differences,
                    object,
                    oref.namespace.as_deref(),
                    Some(&live),
                );
                let same = super::diff::first_difference(
                    &super::diff::normalize(&wanted, &ignored),
                    &super::diff::normalize(&live, &ignored),
                )
                .is_none();
                if same {
                    return Ok((oref, crate::health::assess(&live)));
                }
            }
        }
        let (oref, answer) = self.patch(object, plan, false).await?;
        Ok((oref, crate::health::assess(&answer)))
    }

    /// What the API server would make of `object` (a server-side dry-run apply), and the live
    /// object, `None` if it does not exist.
    pub(crate) async fn dry_run(
        &self,
        object: &Object,
        plan: &Plan,
    ) -> Result<(ObjectRef, Value, Option<Value>), ObjectFailure> {
        let (oref, wanted) = self.patch(object, plan, true).await?;
        let live = self.get(&oref).await.map_err(|e| ObjectFailure {
            object: oref.clone(),
            message: e.message,
            transient: e.transient,
        })?;
        Ok((oref, wanted, live))
    }

    /// Server-side applies `object` (or dry-runs it), with the plan's ignored fields set to
    /// their live values. Returns the object as the API server answered.
    /// The API for `resource` in the object's scope; `oref` and `body` get the namespace
    /// the scope asks for (none for a cluster-scoped object). `None`: a namespaced object
    /// without a namespace.
    fn scoped_api(
        &self,
        resource: &ApiResource,
        scope: Scope,
        oref: &mut ObjectRef,
        body: &mut serde_json::Map<String, Value>,
    ) -> Option<Api<DynamicObject>> {
        Some(match scope {
            Scope::Cluster => {
                oref.namespace = None;
                if let Some(Value::Object(meta)) = body.get_mut("metadata") {
                    meta.remove("namespace");
                }
                Api::all_with(self.client.clone(), resource)
            }
            Scope::Namespaced => {
                let ns = oref.namespace.clone()?;
                if let Some(Value::Object(meta)) = body.get_mut("metadata") {
                    meta.insert("namespace".into(), Value::String(ns.clone()));
                }
                Api::namespaced_with(self.client.clone(), &ns, resource)
            }
        })
    }

    async fn patch(
        &self,
        object: &Object,
        plan: &Plan,
        dry_run: bool,
    ) -> Result<(ObjectRef, Value), ObjectFailure> {
        let (oref, gvk, api, body) = self.addressed(object, plan).await?;
        // Git is the source of truth: take ownership of fields other managers hold.
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.dry_run = dry_run;
        let mut body = Value::Object(body);
        keep_ignored(&api, object, plan, &oref, &mut body).await?;
        let result = (|| async {
            let result = api.patch(&oref.name, &params, &Patch::Apply(&body)).await;
            self.count("patch", &result);
            result
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(4)
                .with_jitter(),
        )
        .when(is_transient)
        .await;
        match result {
            Ok(answer) => {
                let mut answer = serde_json::to_value(answer).unwrap_or(Value::Null);
                if !dry_run {
                    if let Some(adopted) = self.adopt(&api, &oref, &params, &body, &answer).await {
                        answer = adopted;
                    }
                }
                Ok((oref, answer))
            }
            Err(e) => {
                if is_missing_resource(&e) {
                    self.resources.lock().await.remove(&gvk);
                }
                Err(ObjectFailure {
                    object: oref,
                    message: api_message(&e),
                    transient: is_transient(&e),
                })
            }
        }
    }

    /// Takes over an object that Argo CD (or `kubectl apply`) applied client-side, as
    /// `kubectl apply --server-side` migrates it: the fields those managers hold become
    /// edgesync's, so the next apply removes what Git no longer has instead of leaving it
    /// owned by a tool that is gone. Then applies again. Returns the new answer; `None` when
    /// there was nothing to take over, or the takeover failed (logged; the apply stands).
    async fn adopt(
        &self,
        api: &Api<DynamicObject>,
        oref: &ObjectRef,
        params: &PatchParams,
        body: &Value,
        answer: &Value,
    ) -> Option<Value> {
        let fields = answer.pointer("/metadata/managedFields")?.as_array()?;
        let migrated = super::adopt::migrate_managed_fields(fields, FIELD_MANAGER)?;
        let resource_version = answer.pointer("/metadata/resourceVersion")?.clone();
        // The resourceVersion makes it conditional: a change in between fails it.
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": resource_version,
            "managedFields": migrated,
        }});
        let plain = PatchParams::default();
        let migrated = api.patch(&oref.name, &plain, &Patch::Merge(&patch)).await;
        self.count("patch", &migrated);
        if let Err(e) = migrated {
            tracing::warn!(object = %oref, "cannot take over the fields Argo CD or kubectl applied: {}", api_message(&e));
            return None;
        }
        tracing::info!(object = %oref, "took over the fields Argo CD or kubectl applied client-side");
        let again = api.patch(&oref.name, params, &Patch::Apply(body)).await;
        self.count("patch", &again);
        again.ok().and_then(|a| serde_json::to_value(a).ok())
    }

    /// Creates a resource hook: applied by name, or, with only `generateName`, created under
    /// a name the server makes up. Returns what was created.
    pub(crate) async fn create(
        &self,
        object: &Object,
        plan: &Plan,
    ) -> Result<ObjectRef, ObjectFailure> {
        if !object.name().is_empty() {
            return self.patch(object, plan, false).await.map(|(oref, _)| oref);
        }
        let (mut oref, _, api, body) = self.addressed(object, plan).await?;
        let failed = |oref: &ObjectRef, e: &kube::Error| ObjectFailure {
            object: oref.clone(),
            message: api_message(e),
            transient: is_transient(e),
        };
        let dynamic: DynamicObject =
            serde_json::from_value(Value::Object(body)).map_err(|e| ObjectFailure {
                object: oref.clone(),
                message: format!("not an object the API takes: {e}"),
                transient: false,
            })?;
        let params = kube::api::PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let result = api.create(&params, &dynamic).await;
        self.count("create", &result);
        let created = result.map_err(|e| failed(&oref, &e))?;
        oref.name = created.metadata.name.unwrap_or_default();
        Ok(oref)
    }

    /// Where `object` goes: its reference, kind, the API for it in its scope, and its body
    /// with the namespace that scope asks for.
    async fn addressed(
        &self,
        object: &Object,
        plan: &Plan,
    ) -> Result<
        (
            ObjectRef,
            GroupVersionKind,
            Api<DynamicObject>,
            serde_json::Map<String, Value>,
        ),
        ObjectFailure,
    > {
        let gvk = GroupVersionKind::gvk(object.group(), object.version(), object.kind());
        let mut oref = plan.reference(object);
        let (resource, scope) = match self.resource(&gvk).await {
            Ok(found) => found,
            Err(e) => {
                return Err(ObjectFailure {
                    object: oref,
                    message: format!(
                        "the API server has no resource for {} in {}: {}",
                        gvk.kind,
                        object.api_version(),
                        api_message(&e)
                    ),
                    transient: is_transient(&e),
                })
            }
        };
        let mut body = object.value.clone();
        let Some(api) = self.scoped_api(&resource, scope, &mut oref, &mut body) else {
            return Err(ObjectFailure {
                object: oref,
                message:
                    "namespaced object has no metadata.namespace and the app sets no namespace"
                        .into(),
                transient: false,
            });
        };
        Ok((oref, gvk, api, body))
    }

    /// The API for `object`'s kind, in its namespace when the kind is namespaced. The version
    /// the object was applied at may no longer be served (a CRD or a built-in API that dropped
    /// it): the object is then addressed through the version the API server prefers for its
    /// group and kind, since identity has no version.
    async fn api_for(&self, object: &ObjectRef) -> Result<Api<DynamicObject>, CallError> {
        let gvk = GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
        let (resource, scope) = match self.resource(&gvk).await {
            Ok(found) => found,
            Err(e) if is_missing_resource(&e) => self.preferred_resource(object).await?,
            Err(e) => return Err(e.into()),
        };
        Ok(match (scope, &object.namespace) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(self.client.clone(), ns, &resource)
            }
            _ => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// Deletes `object` with `propagation` (`Foreground`, `Background` or `Orphan`). Gone
    /// already counts as deleted.
    pub(crate) async fn delete(
        &self,
        object: &ObjectRef,
        propagation: &str,
    ) -> Result<(), CallError> {
        self.delete_with(object, propagation, None)
            .await
            .map(|_| ())
    }

    /// Deletes `object` only if it is still the object `live` (same uid and resourceVersion):
    /// one that changed since it was read (another app or a person took it over) is left in
    /// place, and `Ok(false)` says so.
    pub(crate) async fn delete_unchanged(
        &self,
        object: &ObjectRef,
        live: &Value,
        propagation: &str,
    ) -> Result<bool, CallError> {
        let text = |key: &str| {
            live.pointer(&format!("/metadata/{key}"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let preconditions = kube::api::Preconditions {
            uid: text("uid"),
            resource_version: text("resourceVersion"),
        };
        self.delete_with(object, propagation, Some(preconditions))
            .await
    }

    async fn delete_with(
        &self,
        object: &ObjectRef,
        propagation: &str,
        preconditions: Option<kube::api::Preconditions>,
    ) -> Result<bool, CallError> {
        let api = self.api_for(object).await?;
        let params = kube::api::DeleteParams {
            propagation_policy: Some(match propagation {
                "Background" => kube::api::PropagationPolicy::Background,
                "Orphan" => kube::api::PropagationPolicy::Orphan,
                _ => kube::api::PropagationPolicy::Foreground,
            }),
            preconditions,
            ..Default::default()
        };
        let result = api.delete(&object.name, &params).await;
        self.count("delete", &result);
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the app's inventory to its ConfigMap (see [`inventory_name`]) in
    /// [`INVENTORY_NAMESPACE`], creating the namespace: what it owns, what it consists of now,
    /// and the revision.
    pub(crate) async fn save_inventory(
        &self,
        app: &str,
        node: &str,
        record: super::InventoryRecord<'_>,
    ) -> Result<(), CallError> {
        let inventory = pack_inventory(record.inventory)?;
        let objects = pack_inventory(record.objects)?;
        let size = inventory.len() + objects.len();
        if size > INVENTORY_MAX_BYTES {
            return Err(CallError {
                message: format!(
                    "the inventory of app {app} is {size} bytes compressed, more than a ConfigMap holds; it is kept on this node only"
                ),
                transient: false,
            });
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        // The namespace once per process, not on every sync.
        self.inventory_namespace
            .get_or_try_init(|| async {
                let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
                    Api::all(self.client.clone());
                let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": INVENTORY_NAMESPACE}});
                let result = namespaces
                    .patch(INVENTORY_NAMESPACE, &params, &Patch::Apply(&ns))
                    .await;
                self.count("patch", &result);
                result.map(|_| ()).map_err(CallError::from)
            })
            .await?;
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": inventory_name(node, app),
                "namespace": INVENTORY_NAMESPACE,
                "labels": {"app.kubernetes.io/managed-by": "edgesync"},
                "annotations": {super::APP_ANNOTATION: app, "edgesync.io/node": node},
            },
            // The revision whose sync wrote this inventory last (a revision that leaves the
            // render alone does not write it again).
            "data": {
                "revision": record.revision.unwrap_or_default(),
            },
            "binaryData": {
                "inventory.json.gz": inventory,
                "objects.json.gz": objects,
            },
        });
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), INVENTORY_NAMESPACE);
        let result = api
            .patch(&inventory_name(node, app), &params, &Patch::Apply(&body))
            .await;
        self.count("patch", &result);
        result?;
        Ok(())
    }

    /// Deletes the app's inventory ConfigMap (the app left this node).
    pub(crate) async fn delete_inventory(&self, app: &str, node: &str) -> Result<(), CallError> {
        let inventory = ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some(INVENTORY_NAMESPACE.into()),
            name: inventory_name(node, app),
        };
        self.delete(&inventory, "Background").await
    }

    /// The inventory stored in the cluster for `app`: `(inventory, objects)`, `None` if there
    /// is none.
    pub(crate) async fn load_inventory(
        &self,
        app: &str,
        node: &str,
    ) -> Result<Option<(Inventory, Inventory)>, CallError> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), INVENTORY_NAMESPACE);
        let found = api.get_opt(&inventory_name(node, app)).await;
        self.count("get", &found);
        let Some(cm) = found? else {
            return Ok(None);
        };
        Ok(Some((
            stored_inventory(&cm, "inventory")?,
            stored_inventory(&cm, "objects")?,
        )))
    }

    /// What the apps of other nodes on this cluster run now (the `objects` of their inventory
    /// ConfigMaps): with an agent on each node of a multi-node cluster, one node must never
    /// prune or remove what another still runs. One list call; on a single-node cluster it
    /// finds only this node's own ConfigMaps. An inventory that cannot be read is an error:
    /// without it, nothing can be deleted with certainty.
    pub(crate) async fn held_by_other_nodes(&self, node: &str) -> Result<Inventory, CallError> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), INVENTORY_NAMESPACE);
        let params =
            kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=edgesync");
        let listed = api.list(&params).await;
        self.count("list", &listed);
        let mut held = Inventory::new();
        for cm in listed? {
            let owner = cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("edgesync.io/node"));
            if owner.is_none_or(|n| n == node) {
                continue;
            }
            held.extend(stored_inventory(&cm, "objects")?);
        }
        Ok(held)
    }

    /// Objects of `object`'s kind in `namespace`, metadata only: `(name, managed by edgesync,
    /// owned by another object)`.
    pub(crate) async fn list_meta(
        &self,
        object: &ObjectRef,
        namespace: &str,
    ) -> Result<Vec<(String, bool, bool)>, CallError> {
        let gvk = GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
        let resource = self.api_resource(&gvk).await?;
        let api: Api<kube::core::PartialObjectMeta<DynamicObject>> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        let listed = api.list(&Default::default()).await;
        self.count("list", &listed);
        Ok(listed?
            .items
            .into_iter()
            .map(|o| {
                let managed = o
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(super::APP_ANNOTATION));
                let owned = o
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|r| !r.is_empty());
                (o.metadata.name.unwrap_or_default(), managed, owned)
            })
            .collect())
    }

    /// Whether `object`'s kind is namespaced, if the API server knows the kind yet.
    pub(crate) async fn is_namespaced(&self, object: &Object) -> Option<bool> {
        let gvk = GroupVersionKind::gvk(object.group(), object.version(), object.kind());
        let (_, scope) = self.resource(&gvk).await.ok()?;
        Some(matches!(scope, Scope::Namespaced))
    }

    /// The live object, or `None` if it does not exist.
    pub(crate) async fn get(&self, object: &ObjectRef) -> Result<Option<Value>, CallError> {
        let api = self.api_for(object).await?;
        let found = api.get_opt(&object.name).await;
        self.count("get", &found);
        match found {
            Ok(Some(live)) => serde_json::to_value(live).map(Some).map_err(|e| CallError {
                message: e.to_string(),
                transient: false,
            }),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The API resource of a kind, from discovery (cached).
    pub(crate) async fn api_resource(
        &self,
        gvk: &GroupVersionKind,
    ) -> Result<ApiResource, CallError> {
        Ok(self.resource(gvk).await?.0)
    }

    async fn resource(&self, gvk: &GroupVersionKind) -> Result<(ApiResource, Scope), kube::Error> {
        if let Some(found) = self.resources.lock().await.get(gvk) {
            return Ok(found.clone());
        }
        let found = kube::discovery::pinned_kind(&self.client, gvk).await;
        self.count("discover", &found);
        let (resource, caps) = found?;
        let found = (resource, caps.scope);
        self.resources
            .lock()
            .await
            .insert(gvk.clone(), found.clone());
        Ok(found)
    }

    /// The resource of `object`'s group and kind at the version the API server prefers.
    async fn preferred_resource(
        &self,
        object: &ObjectRef,
    ) -> Result<(ApiResource, Scope), CallError> {
        let group = kube::discovery::oneshot::group(&self.client, &object.group).await;
        self.count("discover", &group);
        let group = group?;
        let Some((resource, caps)) = group.recommended_kind(&object.kind) else {
            return Err(CallError {
                message: format!(
                    "the API server no longer serves kind {} in group {:?} at any version",
                    object.kind, object.group
                ),
                transient: false,
            });
        };
        Ok((resource, caps.scope))
    }

    async fn wait_established(&self, name: &str) -> Result<(), NotEstablished> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + CRD_ESTABLISHED_TIMEOUT;
        loop {
            let last_error = match api.get(name).await {
                Ok(crd) => {
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if established {
                        return Ok(());
                    }
                    None
                }
                Err(e) => Some(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(NotEstablished {
                    name: name.to_string(),
                    source: last_error,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One list (`inventory` or `objects`) of an inventory ConfigMap.
fn stored_inventory(
    cm: &k8s_openapi::api::core::v1::ConfigMap,
    key: &str,
) -> Result<Inventory, CallError> {
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    let bad = |message: String| {
        CallError {
        message: format!(
            "inventory ConfigMap {INVENTORY_NAMESPACE}/{name}: {key}: {message} (delete the ConfigMap to let its app start afresh, leaving what it applied in place)"
        ),
        transient: false,
    }
    };
    // Written compressed; inventories from before that are plain JSON.
    let packed = cm
        .binary_data
        .as_ref()
        .and_then(|b| b.get(&format!("{key}.json.gz")));
    let plain = cm.data.as_ref().and_then(|d| d.get(key));
    let json = match (packed, plain) {
        (Some(packed), _) => unpack_inventory(&packed.0).map_err(|e| bad(e.to_string()))?,
        (None, Some(text)) => text.clone().into_bytes(),
        (None, None) => return Err(bad("missing".into())),
    };
    serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))
}

/// What an inventory ConfigMap may hold: a ConfigMap is limited to 1 MiB, its metadata
/// included.
const INVENTORY_MAX_BYTES: usize = 1000 * 1024;

/// An inventory as gzipped JSON, base64 for a ConfigMap's `binaryData`: about a tenth of the
/// JSON, so even apps of tens of thousands of objects fit.
fn pack_inventory(inventory: &Inventory) -> Result<String, CallError> {
    use base64::Engine;
    use std::io::Write;
    let failed = |e: &dyn std::fmt::Display| CallError {
        message: format!("cannot encode the inventory: {e}"),
        transient: false,
    };
    let json = serde_json::to_vec(inventory).map_err(|e| failed(&e))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json).map_err(|e| failed(&e))?;
    let packed = gz.finish().map_err(|e| failed(&e))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(packed))
}

fn unpack_inventory(packed: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut json = Vec::new();
    // An inventory is object references: 64 MiB of them is far beyond any app.
    flate2::read::GzDecoder::new(packed)
        .take(64 << 20)
        .read_to_end(&mut json)?;
    Ok(json)
}

/// The inventory ConfigMap of `app` on `node`: `<node>.<app>`, lowercased. A name that is
/// not a valid object name as it stands (a host name with `_`, say) has its other characters
/// replaced and a hash of the original added, so two nodes never share a ConfigMap; names
/// longer than Kubernetes allows end in a hash too.
pub(crate) fn inventory_name(node: &str, app: &str) -> String {
    let original = format!("{node}.{app}").to_ascii_lowercase();
    let labels: Vec<String> = original
        .split('.')
        .map(|label| {
            let mapped: String = label
                .chars()
                .map(|c| match c {
                    'a'..='z' | '0'..='9' | '-' => c,
                    _ => '-',
                })
                .collect();
            mapped.trim_matches('-').to_string()
        })
        .filter(|label| !label.is_empty())
        .collect();
    let name = labels.join(".");
    if name == original && name.len() <= 253 {
        return name;
    }
    let digest = hex::encode(&sha2::Sha256::digest(original.as_bytes())[..8]);
    let head = name
        .get(..name.len().min(236))
        .unwrap_or_default()
        .trim_end_matches(['.', '-']);
    if head.is_empty() {
        digest
    } else {
        format!("{head}.{digest}")
    }
}

/// Records one object's apply result, logging failures.
fn record(
    outcome: &mut Outcome,
    plan: &Plan,
    object: &Object,
    result: Result<(ObjectRef, Health), ObjectFailure>,
) {
    match result {
        Ok((applied, health)) => {
            tracing::debug!(app = %plan.app, object = %applied, "applied");
            outcome.rated.push((applied.clone(), health));
            outcome.applied.push(applied);
        }
        Err(failure) => {
            tracing::warn!(app = %plan.app, object = %failure.object, origin = %object.origin,
                "apply failed: {}", failure.message);
            outcome.failures.push(failure);
        }
    }
}

/// The reference of an object not (yet) applied: its namespace as written, or the app's.
fn object_ref(object: &Object, default_ns: Option<&str>) -> ObjectRef {
    ObjectRef {
        group: object.group().to_string(),
        version: object.version().to_string(),
        kind: object.kind().to_string(),
        namespace: object.namespace().or(default_ns).map(str::to_string),
        name: object.name().to_string(),
    }
}

/// Fields the app's `ignoreDifferences` covers take their live values in `body`, so the apply
/// leaves them as they are.
async fn keep_ignored(
    api: &Api<DynamicObject>,
    object: &Object,
    plan: &Plan,
    oref: &ObjectRef,
    body: &mut Value,
) -> Result<(), ObjectFailure> {
    let covered = plan.ignore_differences.iter().any(|r| {
        r.matches(
            object.group(),
            object.kind(),
            oref.namespace.as_deref(),
            object.name(),
        )
    });
    if !covered {
        return Ok(());
    }
    let live = api.get_opt(&oref.name).await.map_err(|e| ObjectFailure {
        object: oref.clone(),
        message: api_message(&e),
        transient: is_transient(&e),
    })?;
    let live = live.and_then(|l| serde_json::to_value(l).ok());
    let ignored = super::diff::ignored_pointers(
        &plan.ignore_differences,
        object,
        oref.namespace.as_deref(),
        live.as_ref(),
    );
    super::diff::respect_ignored(body, live.as_ref(), &ignored);
    Ok(())
}

/// The cluster as Helm's `.Capabilities` describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// `v1.31.2`, as the server says; `None` for a server that is not a release build
    /// (`v0.0.0-master`, no major version), whose version would fail every constraint.
    pub(crate) kube_version: Option<String>,
    /// `apps/v1`, `apps/v1/Deployment`, `v1`, `v1/ConfigMap`, ...
    pub(crate) api_versions: Vec<String>,
}

/// The server's version when it is a release (`v1.31.2`, `v1.31.2+k3s1`), or one made of its
/// major and minor versions; `None` when neither says a real version.
fn release_version(info: &k8s_openapi::apimachinery::pkg::version::Info) -> Option<String> {
    let numbers = info.git_version.trim_start_matches('v');
    let major = numbers.split('.').next()?.parse::<u32>().ok();
    if major.is_some_and(|m| m > 0) {
        return Some(info.git_version.clone());
    }
    let major: u32 = info.major.trim_end_matches('+').parse().ok()?;
    let minor: u32 = info.minor.trim_end_matches('+').parse().ok()?;
    (major > 0).then(|| format!("v{major}.{minor}.0"))
}

/// A CustomResourceDefinition that did not become Established in time; `source` is why it
/// could not be read, when that was the last word.
#[derive(Debug, thiserror::Error)]
#[error("CustomResourceDefinition {name} not Established after {:?}{}", CRD_ESTABLISHED_TIMEOUT, .source.as_ref().map(|e| format!(" (reading it: {e})")).unwrap_or_default())]
pub(crate) struct NotEstablished {
    name: String,
    source: Option<kube::Error>,
}

/// A failed API call: the server's message, and whether it was the server being away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallError {
    pub(crate) message: String,
    pub(crate) transient: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<kube::Error> for CallError {
    fn from(e: kube::Error) -> Self {
        CallError {
            message: api_message(&e),
            transient: is_transient(&e),
        }
    }
}

/// The API server's own message where there is one; secrets never appear in these.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn is_missing_resource(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helm_gets_a_release_version_or_none() {
        use k8s_openapi::apimachinery::pkg::version::Info;
        let info = |git: &str, major: &str, minor: &str| Info {
            git_version: git.into(),
            major: major.into(),
            minor: minor.into(),
            ..Default::default()
        };
        let k3s = info("v1.31.2+k3s1", "1", "31");
        assert_eq!(release_version(&k3s).as_deref(), Some("v1.31.2+k3s1"));
        let unstamped = info("v0.0.0-master+$Format:%H$", "1", "36+");
        assert_eq!(release_version(&unstamped).as_deref(), Some("v1.36.0"));
        assert_eq!(release_version(&info("v0.0.0-master", "", "")), None);
    }

    fn valid(name: &str) -> bool {
        name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    }

    #[test]
    fn inventory_names_are_valid_object_names_and_distinct() {
        assert_eq!(inventory_name("node-1", "web"), "node-1.web");
        let odd = inventory_name("edge_box_7", "web");
        assert!(valid(&odd), "{odd}");
        assert_ne!(odd, inventory_name("edge-box-7", "web"));
        assert_ne!(odd, inventory_name("edge_box-7", "web"));
        let long = inventory_name(&"n".repeat(300), "web");
        assert!(valid(&long), "{long}");
        for weird in ["_", "-.-", "Ä", "a..b"] {
            let name = inventory_name(weird, "x");
            assert!(valid(&name), "{weird}: {name}");
        }
    }

    #[test]
    fn inventories_pack_and_unpack() {
        let inventory: Inventory = (0..2000)
            .map(|i| ObjectRef {
                group: "apps".into(),
                version: "v1".into(),
                kind: "Deployment".into(),
                namespace: Some("team".into()),
                name: format!("web-{i}"),
            })
            .collect();
        let packed = pack_inventory(&inventory).unwrap();
        let json = serde_json::to_vec(&inventory).unwrap();
        assert!(
            packed.len() * 5 < json.len(),
            "{} vs {}",
            packed.len(),
            json.len()
        );
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(packed)
            .unwrap();
        let back: Inventory = serde_json::from_slice(&unpack_inventory(&bytes).unwrap()).unwrap();
        assert_eq!(back, inventory);
    }
}
