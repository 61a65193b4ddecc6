//! The one place edgesync deletes what it applied: the prune after a complete sync, the prune
//! of a rollback, and the removal of apps that left the node all go through [`delete_owned`].
//! An object is deleted only if it still carries the app's annotation, does not opt out
//! (`Prune=false`, `Delete=false`), and is unchanged since it was read (uid and
//! resourceVersion preconditions): whoever touched it in between wins. What an app of another
//! node on the same cluster runs (its inventory ConfigMap says so) is never deleted.

use crate::apply::kube::CallError;
use crate::apply::{self, Cluster, ObjectFailure, ObjectRef};

/// What a deletion pass did with each candidate.
#[derive(Debug, Default)]
pub(crate) struct Deletion {
    pub(crate) deleted: Vec<ObjectRef>,
    /// Gone already, or no longer the app's: the inventory forgets these.
    pub(crate) forgotten: Vec<ObjectRef>,
    /// Changed between the read and the delete: left in place and looked at again next time.
    pub(crate) changed: Vec<ObjectRef>,
    pub(crate) failures: Vec<ObjectFailure>,
}

/// Deletes `candidates` (in the order given) that still belong to `app` of `node`, and that
/// no app of another node on this cluster runs.
pub(crate) async fn delete_owned(
    cluster: &dyn Cluster,
    node: &str,
    app: &str,
    candidates: Vec<ObjectRef>,
    propagation: &str,
) -> Deletion {
    let mut done = Deletion::default();
    if candidates.is_empty() {
        return done;
    }
    let elsewhere = match cluster.held_by_other_nodes(node).await {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(%app, "nothing deleted: {e}");
            done.failures = candidates
                .into_iter()
                .map(|object| ObjectFailure {
                    object,
                    message: format!("not deleted: what other nodes run is unknown: {e}"),
                    transient: e.transient,
                })
                .collect();
            return done;
        }
    };
    for object in candidates {
        if elsewhere.contains(&object) {
            tracing::info!(%app, %object, "not deleted: an app of another node runs it");
            done.forgotten.push(object);
            continue;
        }
        match delete_one(cluster, app, &object, propagation).await {
            Ok(Fate::Deleted) => done.deleted.push(object),
            Ok(Fate::Forgotten) => done.forgotten.push(object),
            Ok(Fate::Changed) => done.changed.push(object),
            Err(e) => done.failures.push(ObjectFailure {
                object,
                message: e.message,
                transient: e.transient,
            }),
        }
    }
    done
}

enum Fate {
    Deleted,
    Forgotten,
    Changed,
}

/// A busy object (a controller writing its status) changes between read and delete now and
/// then: it is read and judged again this many times.
const ATTEMPTS: usize = 3;

async fn delete_one(
    cluster: &dyn Cluster,
    app: &str,
    object: &ObjectRef,
    propagation: &str,
) -> Result<Fate, CallError> {
    for _ in 0..ATTEMPTS {
        let Some(live) = cluster.get(object).await? else {
            return Ok(Fate::Forgotten);
        };
        if let Some(reason) = apply::keep_reason(&live, app) {
            tracing::info!(%app, %object, "not deleted: {reason}");
            return Ok(Fate::Forgotten);
        }
        if cluster.delete_unchanged(object, &live, propagation).await? {
            tracing::info!(%app, %object, "deleted");
            return Ok(Fate::Deleted);
        }
    }
    tracing::info!(%app, %object, "not deleted: it kept changing while being read");
    Ok(Fate::Changed)
}
