//! An in-memory [`Cluster`] for engine tests: objects keyed by identity (group, kind,
//! namespace, name) with uids and resourceVersions, a few cluster-scoped kinds, and knobs to
//! make objects fail, inventories unreadable, or other nodes hold objects. Health is always
//! Healthy and waves never wait. What it does not model (admission, defaulting, garbage
//! collection) the integration tests against the real control plane cover.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::cluster::{Cluster, DryRun, ListedMeta};
use super::kube::CallError;
use super::{Inventory, InventoryRecord, ObjectFailure, ObjectRef, Outcome, Plan, APP_ANNOTATION};
use crate::render::Object;

const CLUSTER_SCOPED: [&str; 5] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
];

#[derive(Default)]
struct World {
    objects: BTreeMap<ObjectRef, Value>,
    next_uid: u64,
    next_version: u64,
    inventories: BTreeMap<(String, String), (Inventory, Inventory)>,
}

#[derive(Default)]
pub(crate) struct FakeCluster {
    world: Mutex<World>,
    /// Objects (by name) whose apply is refused, as an invalid object is.
    pub(crate) refuse: Mutex<BTreeSet<String>>,
    /// Every inventory read fails.
    pub(crate) inventory_unreadable: Mutex<bool>,
    /// What other nodes run.
    pub(crate) elsewhere: Mutex<Inventory>,
    /// Kinds discovery does not know (a CRD not installed yet, or discovery failing).
    pub(crate) unknown_kinds: Mutex<BTreeSet<String>>,
    /// Calls made, by name: `apply`, `delete`, ...
    pub(crate) calls: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeCluster {
    /// The reference `object` gets in the cluster, as the API server's scope rules give it.
    pub(crate) fn reference(object: &Object, default_ns: Option<&str>) -> ObjectRef {
        let cluster_scoped = CLUSTER_SCOPED.contains(&object.kind());
        ObjectRef {
            group: object.group().to_string(),
            version: object.version().to_string(),
            kind: object.kind().to_string(),
            namespace: if cluster_scoped {
                None
            } else {
                object.namespace().or(default_ns).map(str::to_string)
            },
            name: object.name().to_string(),
        }
    }

    /// The live object at `object`'s identity.
    pub(crate) fn live(&self, object: &ObjectRef) -> Option<Value> {
        lock(&self.world).objects.get(object).cloned()
    }

    /// Names of every object of `kind` that exists.
    pub(crate) fn names(&self, kind: &str) -> Vec<String> {
        lock(&self.world)
            .objects
            .keys()
            .filter(|o| o.kind == kind)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Writes `value` at `object` as someone else would (no edgesync annotation unless given).
    pub(crate) fn put(&self, object: ObjectRef, mut value: Value) {
        let mut world = lock(&self.world);
        world.next_version += 1;
        world.next_uid += 1;
        let (uid, version) = (world.next_uid, world.next_version);
        value["metadata"]["uid"] = json!(format!("uid-{uid}"));
        value["metadata"]["resourceVersion"] = json!(version.to_string());
        world.objects.insert(object, value);
    }

    pub(crate) fn count(&self, call: &str) -> usize {
        lock(&self.calls).iter().filter(|c| *c == call).count()
    }

    fn call(&self, name: &str) {
        lock(&self.calls).push(name.to_string());
    }

    /// Applies one object, recording the result in `outcome`.
    fn upsert(&self, object: &Object, plan: &Plan, outcome: &mut Outcome) {
        let oref = Self::reference(object, plan.default_namespace.as_deref());
        if lock(&self.refuse).contains(object.name()) {
            outcome.failures.push(ObjectFailure {
                object: oref,
                message: "refused by the fake API server".into(),
                transient: false,
            });
            return;
        }
        self.store(&oref, object);
        let health = crate::health::assess(&Value::Object(object.value.clone()));
        outcome.rated.push((oref.clone(), health));
        outcome.applied.push(oref);
    }

    /// Writes `object` at `oref`, keeping its uid if it exists, with a new resourceVersion.
    fn store(&self, oref: &ObjectRef, object: &Object) {
        let mut world = lock(&self.world);
        world.next_version += 1;
        let version = world.next_version;
        let uid = match world.objects.get(oref) {
            Some(live) => live["metadata"]["uid"].clone(),
            None => {
                world.next_uid += 1;
                json!(format!("uid-{}", world.next_uid))
            }
        };
        let mut value = Value::Object(object.value.clone());
        value["metadata"]["uid"] = uid;
        value["metadata"]["resourceVersion"] = json!(version.to_string());
        world.objects.remove(oref);
        world.objects.insert(oref.clone(), value);
    }
}

impl Cluster for FakeCluster {
    fn apply<'a>(&'a self, plan: &'a Plan, _wave_timeout: Duration) -> BoxFuture<'a, Outcome> {
        self.call("apply");
        let mut outcome = Outcome::default();
        for object in &plan.objects {
            self.upsert(object, plan, &mut outcome);
        }
        Box::pin(async move { outcome })
    }

    fn dry_run<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<DryRun, ObjectFailure>> {
        let oref = Self::reference(object, plan.default_namespace.as_deref());
        let live = self.live(&oref);
        let mut wanted = Value::Object(object.value.clone());
        if let Some(live) = &live {
            wanted["metadata"]["uid"] = live["metadata"]["uid"].clone();
            wanted["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
        }
        Box::pin(async move { Ok((oref, wanted, live)) })
    }

    fn get<'a>(&'a self, object: &'a ObjectRef) -> BoxFuture<'a, Result<Option<Value>, CallError>> {
        self.call("get");
        let live = self.live(object);
        Box::pin(async move { Ok(live) })
    }

    /// A hook: applied as `apply` applies; a `generateName` gets a counter for a name. A Job
    /// or Pod is finished at once (its status says so), as the test cluster's fake nodes do.
    fn create<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<ObjectRef, ObjectFailure>> {
        self.call("create");
        let mut object = object.clone();
        if object.name().is_empty() {
            let prefix = object.value["metadata"]["generateName"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let n = lock(&self.world).next_uid + 1;
            object.value["metadata"]["name"] = json!(format!("{prefix}{n}"));
        }
        let failed = lock(&self.refuse).contains(object.name());
        match object.kind() {
            "Job" if failed => {
                object.value.insert("status".into(), json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], "failed": 1}));
            }
            "Job" => {
                object.value.insert(
                    "status".into(),
                    json!({"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}),
                );
            }
            "Pod" => {
                let phase = if failed { "Failed" } else { "Succeeded" };
                object
                    .value
                    .insert("status".into(), json!({"phase": phase}));
            }
            _ => {}
        }
        let oref = Self::reference(&object, plan.default_namespace.as_deref());
        // A refused Job or Pod is created, and fails; anything else refused is not created.
        let result = if failed && !matches!(object.kind(), "Job" | "Pod") {
            Err(ObjectFailure {
                object: oref,
                message: "refused by the fake API server".into(),
                transient: false,
            })
        } else {
            self.store(&oref, &object);
            Ok(oref)
        };
        Box::pin(async move { result })
    }

    fn delete_unchanged<'a>(
        &'a self,
        object: &'a ObjectRef,
        live: &'a Value,
        _propagation: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>> {
        self.call("delete");
        let mut world = lock(&self.world);
        let same = world.objects.get(object).map(|now| {
            now["metadata"]["uid"] == live["metadata"]["uid"]
                && now["metadata"]["resourceVersion"] == live["metadata"]["resourceVersion"]
        });
        let result = match same {
            None => Ok(true),
            Some(true) => {
                world.objects.remove(object);
                Ok(true)
            }
            Some(false) => Ok(false),
        };
        Box::pin(async move { result })
    }

    fn is_namespaced<'a>(&'a self, object: &'a Object) -> BoxFuture<'a, Option<bool>> {
        let namespaced = !CLUSTER_SCOPED.contains(&object.kind());
        let known = !lock(&self.unknown_kinds).contains(object.kind());
        Box::pin(async move { known.then_some(namespaced) })
    }

    fn list_meta<'a>(
        &'a self,
        kind: &'a ObjectRef,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ListedMeta>, CallError>> {
        let listed = lock(&self.world)
            .objects
            .iter()
            .filter(|(o, _)| {
                o.group == kind.group
                    && o.kind == kind.kind
                    && o.namespace.as_deref() == Some(namespace)
            })
            .map(|(o, v)| {
                let managed = v
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(APP_ANNOTATION))
                    .is_some();
                (o.name.clone(), managed, false)
            })
            .collect();
        Box::pin(async move { Ok(listed) })
    }

    fn save_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
        record: InventoryRecord<'a>,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        lock(&self.world).inventories.insert(
            (node.to_string(), app.to_string()),
            (record.inventory.clone(), record.objects.clone()),
        );
        Box::pin(async move { Ok(()) })
    }

    fn load_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Inventory, Inventory)>, CallError>> {
        let result = if *lock(&self.inventory_unreadable) {
            Err(CallError {
                message: "inventory ConfigMap unreadable".into(),
                transient: false,
            })
        } else {
            Ok(lock(&self.world)
                .inventories
                .get(&(node.to_string(), app.to_string()))
                .cloned())
        };
        Box::pin(async move { result })
    }

    fn delete_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        lock(&self.world)
            .inventories
            .remove(&(node.to_string(), app.to_string()));
        Box::pin(async move { Ok(()) })
    }

    fn held_by_other_nodes<'a>(
        &'a self,
        _node: &'a str,
    ) -> BoxFuture<'a, Result<Inventory, CallError>> {
        let held = lock(&self.elsewhere).clone();
        Box::pin(async move { Ok(held) })
    }
}
