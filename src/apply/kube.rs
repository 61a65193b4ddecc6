//! The Kubernetes API, as the apply stage sees it: a client from the node's kubeconfig,
//! discovery of any kind (CRDs included) and server-side apply with field manager `edgesync`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;
use tokio::sync::Mutex;

use super::{ApplyError, ObjectFailure, ObjectRef, Outcome, Phase, Plan, FIELD_MANAGER};
use crate::config::K3S_KUBECONFIG;
use crate::metrics::Metrics;
use crate::render::Object;

const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds a client. Order: the configured kubeconfig, `$KUBECONFIG`, in-cluster service
/// account, then the k3s kubeconfig, then `~/.kube/config`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, ApplyError> {
    let mut config = load_config(kubeconfig).await?;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(60));
    Client::try_from(config).map_err(|e| ApplyError::Client(e.to_string()))
}

async fn load_config(kubeconfig: Option<&Path>) -> Result<Config, ApplyError> {
    if let Some(path) = kubeconfig {
        return from_file(path).await;
    }
    if std::env::var_os("KUBECONFIG").is_some() {
        return Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(|e| ApplyError::Kubeconfig {
                path: "$KUBECONFIG".into(),
                message: e.to_string(),
            });
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Config::incluster().map_err(|e| ApplyError::NoCredentials(e.to_string()));
    }
    let k3s = PathBuf::from(K3S_KUBECONFIG);
    if k3s.is_file() {
        return from_file(&k3s).await;
    }
    Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .map_err(|e| {
            ApplyError::NoCredentials(format!(
                "set kubernetes.kubeconfig, $KUBECONFIG, run in a pod, or install k3s ({K3S_KUBECONFIG}): {e}"
            ))
        })
}

async fn from_file(path: &Path) -> Result<Config, ApplyError> {
    let err = |e: &dyn std::fmt::Display| ApplyError::Kubeconfig {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(&e))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(&e))
}

/// Server-side applies plans. Discovery results are cached per kind.
pub struct KubeApplier {
    client: Client,
    resources: Mutex<HashMap<GroupVersionKind, (ApiResource, Scope)>>,
    metrics: Arc<Metrics>,
}

impl KubeApplier {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        KubeApplier {
            client,
            resources: Mutex::new(HashMap::new()),
            metrics,
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

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Applies every object of `plan` in order. A failed object does not stop the others;
    /// CRDs are waited on until Established before any later object is applied.
    pub async fn apply(&self, plan: &Plan) -> Outcome {
        let mut outcome = Outcome::default();
        let mut pending_crds: Vec<String> = Vec::new();
        for object in &plan.objects {
            let phase = Phase::of(object);
            if phase == Phase::Resources && !pending_crds.is_empty() {
                for name in pending_crds.drain(..) {
                    if let Err(message) = self.wait_established(&name).await {
                        tracing::warn!(crd = %name, "{message}");
                    }
                }
            }
            match self
                .apply_one(object, plan.default_namespace.as_deref())
                .await
            {
                Ok(applied) => {
                    if phase == Phase::CustomResourceDefinitions {
                        pending_crds.push(applied.name.clone());
                    }
                    tracing::debug!(app = %plan.app, object = %applied, "applied");
                    outcome.applied.push(applied);
                }
                Err(failure) => {
                    tracing::warn!(app = %plan.app, object = %failure.object, origin = %object.origin,
                        "apply failed: {}", failure.message);
                    outcome.failures.push(failure);
                }
            }
        }
        for name in pending_crds {
            if let Err(message) = self.wait_established(&name).await {
                tracing::warn!(crd = %name, "{message}");
            }
        }
        outcome
    }

    async fn apply_one(
        &self,
        object: &Object,
        default_ns: Option<&str>,
    ) -> Result<ObjectRef, ObjectFailure> {
        let gvk = GroupVersionKind::gvk(object.group(), object.version(), object.kind());
        let mut oref = ObjectRef {
            group: gvk.group.clone(),
            version: gvk.version.clone(),
            kind: gvk.kind.clone(),
            namespace: object.namespace().or(default_ns).map(str::to_string),
            name: object.name().to_string(),
        };
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
                })
            }
        };
        let mut body = object.value.clone();
        let api: Api<DynamicObject> = match scope {
            Scope::Cluster => {
                oref.namespace = None;
                if let Some(Value::Object(meta)) = body.get_mut("metadata") {
                    meta.remove("namespace");
                }
                Api::all_with(self.client.clone(), &resource)
            }
            Scope::Namespaced => {
                let Some(ns) = oref.namespace.clone() else {
                    return Err(ObjectFailure {
                        object: oref,
                        message: "namespaced object has no metadata.namespace and the app sets no namespace".into(),
                    });
                };
                if let Some(Value::Object(meta)) = body.get_mut("metadata") {
                    meta.insert("namespace".into(), Value::String(ns.clone()));
                }
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            }
        };
        // Git is the source of truth: take ownership of fields other managers hold.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = Value::Object(body);
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
            Ok(_) => Ok(oref),
            Err(e) => {
                if is_missing_resource(&e) {
                    self.resources.lock().await.remove(&gvk);
                }
                Err(ObjectFailure {
                    object: oref,
                    message: api_message(&e),
                })
            }
        }
    }

    /// The API for `object`'s kind, in its namespace when the kind is namespaced.
    async fn api_for(&self, object: &ObjectRef) -> Result<Api<DynamicObject>, String> {
        let gvk = GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
        let (resource, scope) = self.resource(&gvk).await.map_err(|e| api_message(&e))?;
        Ok(match (scope, &object.namespace) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(self.client.clone(), ns, &resource)
            }
            _ => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// Deletes `object` with `propagation` (`Foreground`, `Background` or `Orphan`). Gone
    /// already counts as deleted.
    pub async fn delete(&self, object: &ObjectRef, propagation: &str) -> Result<(), String> {
        let api = self.api_for(object).await?;
        let params = kube::api::DeleteParams {
            propagation_policy: Some(match propagation {
                "Background" => kube::api::PropagationPolicy::Background,
                "Orphan" => kube::api::PropagationPolicy::Orphan,
                _ => kube::api::PropagationPolicy::Foreground,
            }),
            ..Default::default()
        };
        let result = api.delete(&object.name, &params).await;
        self.count("delete", &result);
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(api_message(&e)),
        }
    }

    /// Whether `object`'s kind is namespaced, if the API server knows the kind yet.
    pub async fn is_namespaced(&self, object: &Object) -> Option<bool> {
        let gvk = GroupVersionKind::gvk(object.group(), object.version(), object.kind());
        let (_, scope) = self.resource(&gvk).await.ok()?;
        Some(matches!(scope, Scope::Namespaced))
    }

    /// The live object, or `None` if it does not exist.
    pub async fn get(&self, object: &ObjectRef) -> Result<Option<Value>, String> {
        let api = self.api_for(object).await?;
        let found = api.get_opt(&object.name).await;
        self.count("get", &found);
        match found {
            Ok(Some(live)) => serde_json::to_value(live)
                .map(Some)
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => Err(api_message(&e)),
        }
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

    async fn wait_established(&self, name: &str) -> Result<(), String> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + CRD_ESTABLISHED_TIMEOUT;
        loop {
            if let Ok(crd) = api.get(name).await {
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "CustomResourceDefinition {name} not Established after {CRD_ESTABLISHED_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
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
