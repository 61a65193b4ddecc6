//! The cluster as the sync engine sees it: the calls sync, prune, rollback, removal, health and
//! self-heal make, behind one trait. [`KubeApplier`] is the real one; tests of the engine use
//! an in-memory cluster ([`fake`](super::fake)), so its behaviours (unchanged, partial apply,
//! empty render, apiVersion bump, rollback, conflict, removal) run in milliseconds, while the
//! integration tests against the real control plane stay the contract.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use super::kube::CallError;
use super::{Inventory, InventoryRecord, KubeApplier, ObjectFailure, ObjectRef, Outcome, Plan};
use crate::render::Object;

/// `(name, managed by edgesync, owned by another object)` of one listed object.
pub(crate) type ListedMeta = (String, bool, bool);

/// What a dry-run apply answers: the object's reference, what it would become, and the live
/// object (`None` if it does not exist).
pub(crate) type DryRun = (ObjectRef, Value, Option<Value>);

pub(crate) trait Cluster: Send + Sync {
    /// Applies `plan` wave by wave (see [`KubeApplier::apply`]).
    fn apply<'a>(&'a self, plan: &'a Plan, wave_timeout: Duration) -> BoxFuture<'a, Outcome>;
    /// What a server-side apply of `object` would make, and the live object.
    fn dry_run<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<DryRun, ObjectFailure>>;
    fn get<'a>(&'a self, object: &'a ObjectRef) -> BoxFuture<'a, Result<Option<Value>, CallError>>;
    /// Creates a resource hook (see [`KubeApplier::create`]).
    fn create<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<ObjectRef, ObjectFailure>>;
    /// Deletes `object` if it is still `live` (uid and resourceVersion); `Ok(false)` if not.
    fn delete_unchanged<'a>(
        &'a self,
        object: &'a ObjectRef,
        live: &'a Value,
        propagation: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>>;
    fn is_namespaced<'a>(&'a self, object: &'a Object) -> BoxFuture<'a, Option<bool>>;
    fn list_meta<'a>(
        &'a self,
        kind: &'a ObjectRef,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ListedMeta>, CallError>>;
    fn save_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
        record: InventoryRecord<'a>,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    #[allow(clippy::type_complexity)]
    fn load_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Inventory, Inventory)>, CallError>>;
    fn delete_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// What the apps of other nodes on this cluster run now.
    fn held_by_other_nodes<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Inventory, CallError>>;
}

impl Cluster for KubeApplier {
    fn apply<'a>(&'a self, plan: &'a Plan, wave_timeout: Duration) -> BoxFuture<'a, Outcome> {
        Box::pin(KubeApplier::apply(self, plan, wave_timeout))
    }

    fn dry_run<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<DryRun, ObjectFailure>> {
        Box::pin(KubeApplier::dry_run(self, object, plan))
    }

    fn get<'a>(&'a self, object: &'a ObjectRef) -> BoxFuture<'a, Result<Option<Value>, CallError>> {
        Box::pin(KubeApplier::get(self, object))
    }

    fn create<'a>(
        &'a self,
        object: &'a Object,
        plan: &'a Plan,
    ) -> BoxFuture<'a, Result<ObjectRef, ObjectFailure>> {
        Box::pin(KubeApplier::create(self, object, plan))
    }

    fn delete_unchanged<'a>(
        &'a self,
        object: &'a ObjectRef,
        live: &'a Value,
        propagation: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>> {
        Box::pin(KubeApplier::delete_unchanged(
            self,
            object,
            live,
            propagation,
        ))
    }

    fn is_namespaced<'a>(&'a self, object: &'a Object) -> BoxFuture<'a, Option<bool>> {
        Box::pin(KubeApplier::is_namespaced(self, object))
    }

    fn list_meta<'a>(
        &'a self,
        kind: &'a ObjectRef,
        namespace: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ListedMeta>, CallError>> {
        Box::pin(KubeApplier::list_meta(self, kind, namespace))
    }

    fn save_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
        record: InventoryRecord<'a>,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(KubeApplier::save_inventory(self, app, node, record))
    }

    fn load_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<(Inventory, Inventory)>, CallError>> {
        Box::pin(KubeApplier::load_inventory(self, app, node))
    }

    fn delete_inventory<'a>(
        &'a self,
        app: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(KubeApplier::delete_inventory(self, app, node))
    }

    fn held_by_other_nodes<'a>(
        &'a self,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Inventory, CallError>> {
        Box::pin(KubeApplier::held_by_other_nodes(self, node))
    }
}
