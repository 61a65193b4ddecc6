//! Drift detection and self-heal. One watch per kind and namespace the apps use (kube-runtime
//! watchers, metadata only; cluster-wide for cluster-scoped kinds) sees every change to the
//! objects the apps applied. A change that touches more than status
//! is checked, after a short debounce, against the app's last-known-good render with a
//! server-side dry run; deletion is checked too, and so is every object a watch's initial list
//! did not return (drift while the agent was down). Drifted objects are re-applied when the
//! app has `self_heal` and its sync windows allow it; otherwise the app is reported OutOfSync.
//!
//! The desired state comes from the persisted render, not from Git, so self-heal keeps
//! working offline and after a reboot. Apps that are syncing, or whose last attempt failed
//! (a retry is in charge), are left alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::SyncContext;
use crate::apply::{self, diff, ObjectRef, Plan};
use crate::model::window::{self, Verdict};
use crate::render::Object;
use crate::state::RenderKind;

/// Objects as the watches see them: metadata only.
type Meta = kube::core::PartialObjectMeta<DynamicObject>;

/// What one watch covers: a kind in one namespace, or cluster-wide (`None`): for cluster-scoped
/// kinds, and for a namespaced kind the apps use in [`WIDE_AT`] namespaces or more.
type Scope = (GroupVersionKind, Option<String>);

/// From this many namespaces on, a namespaced kind gets one cluster-wide watch instead of one
/// per namespace. Per namespace, the initial lists stay as small as the apps (a cluster-wide
/// list of a kind the cluster holds many of costs more memory than a few extra watches); but
/// each watch is a connection of its own with its buffers, which adds up with hundreds of
/// namespaces. Where the agent may not list a kind cluster-wide, it keeps one watch per
/// namespace.
const WIDE_AT: usize = 16;

/// Changes closer together than this are checked once.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// A check the API server could not answer is tried again after this.
const RECHECK: Duration = Duration::from_secs(5);

/// An object's identity without its API version: watches and inventories may name different
/// versions of one kind. Group, kind and namespace are shared ([`interned`]): the drift engine
/// keeps three keys per object, and 10,000 objects name a handful of each.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Key {
    group: Arc<str>,
    kind: Arc<str>,
    namespace: Option<Arc<str>>,
    name: Box<str>,
}

impl Key {
    pub(super) fn new(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> Key {
        Key {
            group: interned(group),
            kind: interned(kind),
            namespace: namespace.map(interned),
            name: name.into(),
        }
    }

    fn of(r: &ObjectRef) -> Key {
        Key::new(&r.group, &r.kind, r.namespace.as_deref(), &r.name)
    }
}

/// One shared copy of `text` (groups, kinds and namespaces are few and never freed).
fn interned(text: &str) -> Arc<str> {
    static SEEN: std::sync::Mutex<BTreeSet<Arc<str>>> = std::sync::Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = seen.get(text) {
        return shared.clone();
    }
    let shared: Arc<str> = text.into();
    seen.insert(shared.clone());
    shared
}

pub(super) enum Seen {
    /// Added or changed.
    Changed(GroupVersionKind, Value),
    Deleted(GroupVersionKind, Value),
    /// A watch (re)listed its kind: these objects with our annotation exist.
    Listed(Scope, HashSet<Key>),
    /// A watch failed; it lists again (after a backoff) and says [`Seen::Listed`] when back.
    Lost(Scope),
    /// A cluster-wide watch of a namespaced kind was forbidden: watch it per namespace.
    Refused(Scope),
}

/// One app's desired state: the revision of its last-known-good render and which object of
/// that render each applied object is. The render itself stays on disk until a check needs it:
/// holding every app's plan would keep every rendered object in memory.
struct Desired {
    /// The revision the render is of.
    revision: String,
    /// Each applied object's index in the render's plan.
    objects: HashMap<Key, usize>,
    /// The API version the app's objects of each (group, kind) were applied with: what their
    /// watch asks for. (Kept apart: an object reference per object cost 10,000 of them for
    /// 500 apps.)
    versions: HashMap<(String, String), String>,
}

impl Desired {
    fn load(ctx: &SyncContext, app: &str) -> Option<Desired> {
        let state = ctx.store.load(app).ok()?;
        let record = match ctx.store.load_render(app, RenderKind::Applied) {
            Ok(record) => record?,
            Err(e) => {
                set_aside(ctx, app, &e);
                ctx.board
                    .note(app, &format!("last-known-good render unusable: {e}"));
                return None;
            }
        };
        if state.last_applied_revision.as_deref() != Some(record.revision.as_str()) {
            return None;
        }
        let revision = record.revision;
        let plan = record.plan;
        let default_ns = plan.default_namespace.clone();
        let mut by_key: HashMap<Key, usize> = HashMap::new();
        let rendered = plan
            .objects
            .iter()
            .enumerate()
            .filter(|(_, o)| o.origin != apply::CREATED_NAMESPACE);
        for (i, o) in rendered {
            let key = |namespace: Option<&str>| Key::new(o.group(), o.kind(), namespace, o.name());
            by_key.insert(key(o.namespace().or(default_ns.as_deref())), i);
            by_key.entry(key(None)).or_insert(i);
        }
        let mut versions = HashMap::new();
        let objects = state
            .objects
            .iter()
            .filter_map(|r| {
                let key = Key::of(r);
                let i = *by_key.get(&key)?;
                versions
                    .entry((r.group.clone(), r.kind.clone()))
                    .or_insert_with(|| r.version.clone());
                Some((key, i))
            })
            .collect();
        Some(Desired {
            revision,
            objects,
            versions,
        })
    }

    /// The render this desired state was read from, if it is still the app's last-known-good
    /// one (a sync may have replaced it since; the refresh that follows reloads).
    fn plan(&self, ctx: &SyncContext, app: &str) -> Option<Plan> {
        match ctx.store.load_render(app, RenderKind::Applied) {
            Ok(Some(record)) if record.revision == self.revision => Some(record.plan),
            Ok(_) => None,
            Err(e) => {
                set_aside(ctx, app, &e);
                None
            }
        }
    }
}

/// Counts and logs a last-known-good render that cannot be read.
fn set_aside(ctx: &SyncContext, app: &str, e: &crate::state::StateError) {
    ctx.metrics.error(e.metric_label());
    tracing::error!(%app, error = %e, kind = e.metric_label().label(), "last-known-good render set aside");
}

pub(super) struct Drift {
    ctx: Arc<SyncContext>,
    tx: mpsc::Sender<Seen>,
    desired: HashMap<String, Desired>,
    /// The app each watched object belongs to.
    owners: HashMap<Key, Arc<str>>,
    watches: HashMap<Scope, JoinHandle<()>>,
    /// Namespaced kinds (group, kind) the agent may not watch cluster-wide.
    narrow: HashSet<(String, String)>,
    /// Hash of each object's last seen content without status.
    fingerprints: HashMap<Key, u64>,
    pending: HashMap<String, (HashSet<Key>, Instant)>,
    /// What is known to differ, per app, with why.
    drifted: HashMap<String, BTreeMap<Key, String>>,
}

pub(crate) async fn run(ctx: Arc<SyncContext>, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let mut synced = ctx.synced.subscribe();
    let mut drift = Drift::new(ctx, tx);
    drift.load_all().await;
    loop {
        let due = drift.pending.values().map(|(_, at)| *at).min();
        let wait_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = synced.changed() => {
                if changed.is_err() {
                    break;
                }
                let apps = drift.ctx.take_resynced();
                drift.refresh(&apps).await;
            }
            Some(seen) = rx.recv() => {
                if drift.seen(seen) {
                    drift.watch_scopes().await;
                }
            }
            _ = wait_due => drift.check_due().await,
        }
    }
    for ((gvk, ns), task) in drift.watches.drain() {
        task.abort();
        drift
            .ctx
            .set_watched(&gvk.group, &gvk.kind, ns.as_deref(), false);
    }
}

impl Drift {
    pub(super) fn new(ctx: Arc<SyncContext>, tx: mpsc::Sender<Seen>) -> Drift {
        Drift {
            ctx,
            tx,
            desired: HashMap::new(),
            owners: HashMap::new(),
            watches: HashMap::new(),
            narrow: HashSet::new(),
            fingerprints: HashMap::new(),
            pending: HashMap::new(),
            drifted: HashMap::new(),
        }
    }

    /// Checks every object of `app` now, as after a watch's relist.
    #[cfg(test)]
    pub(super) async fn check_app(&mut self, app: &str) {
        let keys = self
            .desired
            .get(app)
            .map(|d| d.objects.keys().cloned().collect())
            .unwrap_or_default();
        self.check(app, keys).await;
        self.publish_open(app);
    }

    /// Loads every app's desired state, and watches the kinds they use.
    pub(super) async fn load_all(&mut self) {
        let apps: HashSet<String> = self
            .ctx
            .config
            .apps
            .iter()
            .map(|a| a.name.clone())
            .collect();
        self.refresh(&apps).await;
    }

    /// Reloads the desired state of `apps` (synced or rolled back since the last look; the
    /// others' is as it was), and watches the kinds the apps use.
    pub(super) async fn refresh(&mut self, apps: &HashSet<String>) {
        for app in apps {
            if let Some(old) = self.desired.remove(app) {
                for key in old.objects.keys() {
                    if self.owners.get(key).is_some_and(|owner| **owner == **app) {
                        self.owners.remove(key);
                    }
                }
            }
            if let Some(desired) = Desired::load(&self.ctx, app) {
                let owner: Arc<str> = app.as_str().into();
                for key in desired.objects.keys() {
                    self.owners.insert(key.clone(), owner.clone());
                }
                self.desired.insert(app.clone(), desired);
            }
            // The app's sync replaced whatever drift was known of it.
            if self.drifted.remove(app).is_some() {
                tracing::debug!(%app, "drift cleared by a sync");
                if !self.pending.contains_key(app) {
                    self.ctx.set_drift_open(app, false);
                }
            }
        }
        self.watch_scopes().await;
    }

    /// The watches the apps' objects need: per kind, one per namespace, or one cluster-wide;
    /// true for a cluster-wide watch of a namespaced kind.
    fn scopes(&self) -> HashMap<Scope, bool> {
        let mut namespaces: HashMap<GroupVersionKind, HashSet<Option<String>>> = HashMap::new();
        for desired in self.desired.values() {
            for ((group, kind), version) in &desired.versions {
                let used = namespaces
                    .entry(GroupVersionKind::gvk(group, version, kind))
                    .or_default();
                let of_kind = desired
                    .objects
                    .keys()
                    .filter(|k| *k.group == **group && *k.kind == **kind);
                for key in of_kind {
                    let namespace = key.namespace.as_deref();
                    if !used.iter().any(|n| n.as_deref() == namespace) {
                        used.insert(namespace.map(str::to_string));
                    }
                }
            }
        }
        let mut scopes = HashMap::new();
        for (gvk, namespaces) in namespaces {
            let narrow = self.narrow.contains(&(gvk.group.clone(), gvk.kind.clone()));
            if namespaces.len() >= WIDE_AT && !narrow {
                scopes.insert((gvk, None), true);
            } else {
                scopes.extend(namespaces.into_iter().map(|ns| ((gvk.clone(), ns), false)));
            }
        }
        scopes
    }

    /// Starts the watches [`Self::scopes`] asks for and stops those no longer needed.
    pub(super) async fn watch_scopes(&mut self) {
        let scopes = self.scopes();
        let ctx = self.ctx.clone();
        self.watches.retain(|scope, task| {
            let keep = scopes.contains_key(scope);
            if !keep {
                task.abort();
                let (gvk, ns) = scope;
                ctx.set_watched(&gvk.group, &gvk.kind, ns.as_deref(), false);
            }
            keep
        });
        for (scope, wide) in scopes {
            if self.watches.contains_key(&scope) {
                continue;
            }
            let (gvk, namespace) = &scope;
            let Some(kube) = self.ctx.kube.as_ref() else {
                return;
            };
            match kube.api_resource(gvk).await {
                Ok(resource) => {
                    let client = kube.watch_client().clone();
                    let api: Api<Meta> = match namespace {
                        Some(ns) => Api::namespaced_with(client, ns, &resource),
                        None => Api::all_with(client, &resource),
                    };
                    let task = tokio::spawn(watch_kind(api, scope.clone(), wide, self.tx.clone()));
                    self.watches.insert(scope, task);
                }
                Err(e) => tracing::debug!(kind = %gvk.kind, "cannot watch yet: {e}"),
            }
        }
    }

    fn key_of(gvk: &GroupVersionKind, object: &Value) -> Key {
        let meta = |k: &str| {
            object
                .pointer(&format!("/metadata/{k}"))
                .and_then(Value::as_str)
        };
        Key::new(
            &gvk.group,
            &gvk.kind,
            meta("namespace"),
            meta("name").unwrap_or_default(),
        )
    }

    fn queue(&mut self, app: String, key: Key) {
        self.ctx.set_drift_open(&app, true);
        let entry = self
            .pending
            .entry(app)
            .or_insert_with(|| (HashSet::new(), Instant::now() + DEBOUNCE));
        entry.0.insert(key);
    }

    /// Has `keys` of `app` checked again in `after` (or sooner, if a check is due sooner).
    fn recheck(&mut self, app: &str, keys: HashSet<Key>, after: Duration) {
        self.ctx.set_drift_open(app, true);
        let entry = self
            .pending
            .entry(app.to_string())
            .or_insert_with(|| (HashSet::new(), Instant::now() + after));
        entry.0.extend(keys);
    }

    /// Takes in what a watch saw; true when the set of watches must change.
    fn seen(&mut self, seen: Seen) -> bool {
        // A watch stopped since (its scope changed) may have left news in the channel: what
        // it listed or lost says nothing of the watches running now.
        if let Seen::Listed(scope, _) | Seen::Lost(scope) | Seen::Refused(scope) = &seen {
            if !self.watches.contains_key(scope) {
                return false;
            }
        }
        match seen {
            Seen::Changed(gvk, object) => {
                let key = Self::key_of(&gvk, &object);
                let Some(app) = self.owners.get(&key).cloned() else {
                    return false;
                };
                // edgesync's own write (a sync's or a heal's) is rated when that is done: with
                // one cluster-wide watch, each apply of a large sync would otherwise have its
                // app's objects read again, while the sync still runs.
                if !written_last_by_us(&object) {
                    self.ctx.changed_by_others(&app);
                }
                let print = fingerprint(&object);
                let changed = self.fingerprints.insert(key.clone(), print) != Some(print);
                if changed && touched_by_others(&object) {
                    self.queue(app.to_string(), key);
                }
            }
            Seen::Deleted(gvk, object) => {
                let key = Self::key_of(&gvk, &object);
                self.fingerprints.remove(&key);
                if let Some(app) = self.owners.get(&key).cloned() {
                    self.ctx.changed_by_others(&app);
                    self.queue(app.to_string(), key);
                }
            }
            Seen::Lost((gvk, namespace)) => {
                self.ctx
                    .set_watched(&gvk.group, &gvk.kind, namespace.as_deref(), false);
            }
            Seen::Refused(scope) => {
                let (gvk, namespace) = &scope;
                tracing::warn!(kind = %gvk.kind, group = %gvk.group, "may not watch this kind cluster-wide: watching it per namespace");
                self.ctx
                    .set_watched(&gvk.group, &gvk.kind, namespace.as_deref(), false);
                if let Some(task) = self.watches.remove(&scope) {
                    task.abort();
                }
                self.narrow.insert((gvk.group.clone(), gvk.kind.clone()));
                return true;
            }
            Seen::Listed((gvk, namespace), present) => {
                self.ctx
                    .set_watched(&gvk.group, &gvk.kind, namespace.as_deref(), true);
                let missing: Vec<(String, Key)> = self
                    .owners
                    .iter()
                    .filter(|(k, _)| *k.group == *gvk.group && *k.kind == *gvk.kind)
                    .filter(|(k, _)| {
                        namespace.is_none() || k.namespace.as_deref() == namespace.as_deref()
                    })
                    .filter(|(k, _)| !present.contains(k))
                    .map(|(k, app)| (app.to_string(), k.clone()))
                    .collect();
                for (app, key) in missing {
                    // Gone while no watch looked: its app's health is news too.
                    self.ctx.changed_by_others(&app);
                    self.queue(app, key);
                }
            }
        }
        false
    }

    async fn check_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(app, _)| app.clone())
            .collect();
        for app in due {
            if let Some((keys, _)) = self.pending.remove(&app) {
                self.check(&app, keys).await;
            }
            self.publish_open(&app);
        }
    }

    /// Tells the sync engine whether `app` has a change waiting or drift not healed.
    fn publish_open(&self, app: &str) {
        let open =
            self.pending.contains_key(app) || self.drifted.get(app).is_some_and(|d| !d.is_empty());
        self.ctx.set_drift_open(app, open);
    }

    /// Compares `keys` of `app` with the render, and heals or reports what differs.
    async fn check(&mut self, app: &str, keys: HashSet<Key>) {
        let Some(config) = self.ctx.config.app(app).cloned() else {
            return;
        };
        // Held until the heal is done: a sync or rollback waits, and one in flight makes
        // this check wait until it is done (and the desired state is reloaded): a sync that
        // finds its render unchanged applies nothing, so what changed must still be looked at.
        let Some(_writer) = self.ctx.try_writer(app) else {
            self.recheck(app, keys, DEBOUNCE);
            return;
        };
        let Ok(state) = self.ctx.store.load(app) else {
            return;
        };
        if state.last_error.is_some() {
            return;
        }
        let Some(desired) = self.desired.get(app) else {
            return;
        };
        // A sync or rollback finished since the render was loaded: healing back to the old
        // render would bring back what it just pruned.
        if state.last_applied_revision.as_deref() != Some(desired.revision.as_str()) {
            self.recheck(app, keys, DEBOUNCE);
            return;
        }
        let Some(plan) = desired.plan(&self.ctx, app) else {
            return;
        };
        let Comparison {
            drifted,
            clean,
            retry,
        } = compare(&self.ctx, app, &plan, &desired.objects, keys).await;
        if !retry.is_empty() {
            self.recheck(app, retry, RECHECK);
        }
        let known = self.drifted.entry(app.to_string()).or_default();
        for key in &clean {
            known.remove(key);
        }
        if drifted.is_empty() {
            if known.is_empty() && !clean.is_empty() {
                self.drifted.remove(app);
                self.ctx.board.in_sync(app);
            }
            return;
        }
        let described: Vec<String> = drifted
            .iter()
            .map(|(k, _, why)| format!("{} {}: {why}", k.kind, display(k)))
            .collect();
        let held = self_heal_held(&self.ctx, &config);
        if config.self_heal && held.is_none() {
            tracing::info!(%app, "self-heal: {}", described.join("; "));
            let plan = Plan {
                objects: drifted.iter().map(|(_, o, _)| o.clone()).collect(),
                waves: vec![0; drifted.len()],
                ..plan
            };
            let outcome = self.ctx.cluster.apply(&plan, RECHECK).await;
            self.ctx.object_changed(app);
            self.ctx.metrics.self_heal(app, outcome.failures.is_empty());
            if outcome.failures.is_empty() {
                self.ctx.board.healed(app, &described);
            } else {
                for f in &outcome.failures {
                    tracing::warn!(%app, object = %f.object, "self-heal failed: {}", f.message);
                }
                let keys: HashSet<Key> = drifted.into_iter().map(|(k, _, _)| k).collect();
                self.recheck(app, keys, RECHECK);
            }
            return;
        }
        for (key, _, why) in drifted {
            known.insert(key, why);
        }
        self.ctx
            .board
            .out_of_sync(app, &drift_message(known, held.as_deref()));
    }
}

/// What one look at an app's objects found.
struct Comparison {
    /// Objects that differ from the render, and how.
    drifted: Vec<(Key, Object, String)>,
    /// Objects as the render has them.
    clean: Vec<Key>,
    /// Objects to look at again: the API server was away.
    retry: HashSet<Key>,
}

/// Compares the live objects `keys` of `app` with the render, by server-side dry run.
async fn compare(
    ctx: &SyncContext,
    app: &str,
    plan: &Plan,
    objects: &HashMap<Key, usize>,
    keys: HashSet<Key>,
) -> Comparison {
    let mut drifted: Vec<(Key, Object, String)> = Vec::new();
    let mut clean = Vec::new();
    let mut retry = HashSet::new();
    for key in keys {
        let Some(object) = objects.get(&key).and_then(|i| plan.objects.get(*i)) else {
            continue;
        };
        match ctx.cluster.dry_run(object, plan).await {
            Ok((oref, wanted, live)) => {
                let why = match live {
                    None => Some("deleted".to_string()),
                    Some(live) => {
                        let ignored = diff::ignored_pointers(
                            &plan.ignore_differences,
                            object,
                            oref.namespace.as_deref(),
                            Some(&live),
                        );
                        diff::first_difference(
                            &diff::normalize(&wanted, &ignored),
                            &diff::normalize(&live, &ignored),
                        )
                        .map(|path| format!("changed at {path}"))
                    }
                };
                match why {
                    Some(why) => drifted.push((key, object.clone(), why)),
                    None => clean.push(key),
                }
            }
            Err(failure) if failure.transient => {
                retry.insert(key);
            }
            Err(failure) => {
                tracing::warn!(%app, object = %failure.object, "drift check failed: {}", failure.message);
            }
        }
    }
    Comparison {
        drifted,
        clean,
        retry,
    }
}

/// Why self-heal must wait for `app`, if it must: a sync window holds it, or one that cannot
/// be read (which holds self-heal as it holds syncs).
fn self_heal_held(ctx: &SyncContext, app: &crate::config::AppConfig) -> Option<String> {
    match super::checks::windows_of(&ctx.projects, app) {
        Ok(windows) => match window::verdict(&windows, jiff::Timestamp::now(), false) {
            Verdict::Allowed => None,
            Verdict::Blocked { reason, .. } => Some(reason),
        },
        Err(e) => Some(e.to_string()),
    }
}

/// The app's status message for the objects that differ from Git (`known`).
fn drift_message(known: &BTreeMap<Key, String>, held: Option<&str>) -> String {
    let mut message = format!(
        "{} objects differ from Git: {}",
        known.len(),
        known
            .iter()
            .map(|(k, why)| format!("{} {}: {why}", k.kind, display(k)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if let Some(reason) = held {
        message.push_str(&format!(" (self-heal held: {reason})"));
    }
    message
}

/// What changes when anyone but the status writers changes the object: its generation, labels
/// and annotations, and the managedFields entries of other writers. The watches carry only
/// metadata (far less memory than whole objects), and this is all a drift check needs to know
/// that it should look.
fn fingerprint(object: &Value) -> u64 {
    let meta = object.get("metadata").cloned().unwrap_or(Value::Null);
    let foreign: Vec<&Value> = meta
        .get("managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("manager").and_then(Value::as_str) != Some(apply::FIELD_MANAGER))
        .filter(|e| e.get("subresource").and_then(Value::as_str) != Some("status"))
        .collect();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for key in ["generation", "labels", "annotations"] {
        meta.get(key).map(Value::to_string).hash(&mut hasher);
    }
    for entry in foreign {
        entry.to_string().hash(&mut hasher);
    }
    hasher.finish()
}

/// Whether someone other than edgesync wrote the object (not its status) since edgesync's
/// last apply. Any write to a field edgesync applies moves that field to the writer's
/// managedFields entry, with the time of the write; writes by edgesync itself cannot drift.
fn touched_by_others(object: &Value) -> bool {
    let Some(entries) = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return true;
    };
    let time = |e: &Value| {
        e.get("time")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let ours = entries
        .iter()
        .filter(|e| e.get("manager").and_then(Value::as_str) == Some(apply::FIELD_MANAGER))
        .map(time)
        .max();
    let Some(ours) = ours else {
        return true;
    };
    entries.iter().any(|e| {
        e.get("manager").and_then(Value::as_str) != Some(apply::FIELD_MANAGER)
            && e.get("subresource").and_then(Value::as_str) != Some("status")
            && time(e) >= ours
    })
}

/// Whether edgesync made the object's latest write: its managedFields entry is newer than
/// every other one, status writes included. Times have whole seconds, so a write by someone
/// else in the same second counts as theirs.
fn written_last_by_us(object: &Value) -> bool {
    let Some(entries) = object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return false;
    };
    let (mut ours, mut others): (Option<&str>, Option<&str>) = (None, None);
    for entry in entries {
        let time = entry.get("time").and_then(Value::as_str).unwrap_or("");
        let by_us = entry.get("manager").and_then(Value::as_str) == Some(apply::FIELD_MANAGER)
            && entry.get("subresource").is_none();
        let latest = if by_us { &mut ours } else { &mut others };
        *latest = (*latest).max(Some(time));
    }
    match (ours, others) {
        (Some(ours), Some(others)) => ours > others,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn display(k: &Key) -> String {
    match &k.namespace {
        Some(ns) => format!("{ns}/{}", k.name),
        None => k.name.to_string(),
    }
}

/// Watches one kind in one namespace or cluster-wide, metadata only, and forwards changes to
/// objects edgesync applied. A `wide` watch (a namespaced kind, cluster-wide) that the API
/// server forbids says so and ends.
///
/// A watch that fails is started again from a fresh list rather than resumed: kube-runtime's
/// watcher resumes a failed watch from its last resource version without a list, so nothing
/// would ever say the kind is watched again, and the health monitor would read the kind's
/// objects every 15 s from then on. The list also finds what was deleted meanwhile.
async fn watch_kind(api: Api<Meta>, scope: Scope, wide: bool, tx: mpsc::Sender<Seen>) {
    use backon::BackoffBuilder;
    let gvk = scope.0.clone();
    let ours = |o: &Meta| {
        o.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(apply::APP_ANNOTATION))
    };
    let value = |o: Meta| serde_json::json!({"metadata": o.metadata});
    let backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        let mut listed: HashSet<Key> = HashSet::new();
        let mut events = watcher::watcher(api.clone(), apply::watch_config()).boxed();
        let failure = loop {
            let Some(event) = events.next().await else {
                break None;
            };
            let seen = match event {
                Ok(watcher::Event::Apply(o)) if ours(&o) => Seen::Changed(gvk.clone(), value(o)),
                Ok(watcher::Event::Delete(o)) if ours(&o) => Seen::Deleted(gvk.clone(), value(o)),
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) if ours(&o) => {
                    let v = value(o);
                    listed.insert(Drift::key_of(&gvk, &v));
                    Seen::Changed(gvk.clone(), v)
                }
                Ok(watcher::Event::InitDone) => {
                    delays = backoff();
                    Seen::Listed(scope.clone(), std::mem::take(&mut listed))
                }
                Ok(_) => continue,
                Err(e) if wide && forbidden(&e) => {
                    let _ = tx.send(Seen::Refused(scope)).await;
                    return;
                }
                Err(e) => break Some(e),
            };
            if tx.send(seen).await.is_err() {
                return;
            }
        };
        if let Some(e) = failure {
            tracing::debug!(kind = %gvk.kind, "watch failed, listing again: {e}");
        }
        if tx.send(Seen::Lost(scope.clone())).await.is_err() {
            return;
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
    }
}

/// Whether the API server refused a watch for want of permission.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.is_forbidden(),
        watcher::Error::WatchError(status) => status.is_forbidden(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::written_last_by_us;

    fn object(entries: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": "web", "managedFields": entries}})
    }

    #[test]
    fn only_a_write_newer_than_everyone_elses_is_edgesyncs_own() {
        let ours = |t: &str| json!({"manager": "edgesync", "operation": "Apply", "time": t});
        let status = |t: &str| {
            json!({"manager": "kube-controller-manager", "operation": "Update",
                "subresource": "status", "time": t})
        };
        let edit = |t: &str| json!({"manager": "kubectl-edit", "operation": "Update", "time": t});
        let t1 = "2026-12-01T10:00:01Z";
        let t2 = "2026-12-01T10:00:02Z";
        assert!(written_last_by_us(&object(json!([ours(t1)]))));
        assert!(written_last_by_us(&object(json!([status(t1), ours(t2)]))));
        // A status update after the apply, or in the same second, is news for health.
        assert!(!written_last_by_us(&object(json!([ours(t1), status(t2)]))));
        assert!(!written_last_by_us(&object(json!([ours(t1), status(t1)]))));
        assert!(!written_last_by_us(&object(json!([ours(t1), edit(t2)]))));
        // No entry of edgesync's, or none at all: not ours.
        assert!(!written_last_by_us(&object(json!([edit(t1)]))));
        assert!(!written_last_by_us(&json!({"metadata": {"name": "web"}})));
    }
}
