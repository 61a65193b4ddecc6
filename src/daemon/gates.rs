//! The fleet hub's rollout gates on this node (`[gates]`, apps with `gated`). The MQTT
//! subscriber hands each gate here: it is verified against the hub's keys and kept when it is
//! the app's newest (on disk too, so a node that restarts while the broker is away holds where
//! the hub said), and the app is synced. A sync of a gated app runs the older of its Git target
//! and the revision the gate allows this node's stage (`edgesync_proto::Gate::decide`), never
//! one off the tracked branch; until it hears a gate, a gated app keeps what it runs.
//!
//! Whoever can publish on the broker can at most hold a node back: a gate needs the hub's
//! signature, an older gate never replaces a newer one, and a revision the branch does not
//! contain is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use edgesync_proto::{Ancestry, Decision, Gate};

use super::sync::{blocking, SyncContext, SyncError, Target};
use crate::config::{AppConfig, Config, RepositoryConfig};
use crate::metrics::{ErrorKind, Metrics};
use crate::state::StateStore;
use crate::trigger::{Event, EventSink, GateSink, Source, MAX_MESSAGE_BYTES};

/// The gates this node holds, newest per app, each verified.
pub(crate) struct Gates {
    keys: Vec<ssh_key::PublicKey>,
    filter: String,
    held: Mutex<HashMap<String, Gate>>,
    /// One writer of gate files at a time, so the newest is the one left on disk.
    saving: Mutex<()>,
    /// Per app, the last answer of the Git cache: how the stage's revision relates to the Git
    /// target. Two commits' relation never changes, so a round where neither moved opens no
    /// repository.
    placed: Mutex<HashMap<String, (String, String, Ancestry)>>,
}

impl Gates {
    /// `None` without `[gates]`. The gates kept by earlier runs are verified again: a key
    /// removed from the config since no longer counts.
    pub(crate) fn load(config: &Config, store: &StateStore, metrics: &Metrics) -> Option<Gates> {
        let cfg = config.gates.as_ref()?;
        let gates = Gates {
            keys: cfg.keys(),
            filter: cfg.filter(),
            held: Mutex::default(),
            saving: Mutex::default(),
            placed: Mutex::default(),
        };
        for app in config.apps.iter().filter(|a| a.gated) {
            let bytes = match store.load_gate(&app.name) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) => {
                    metrics.error(e.metric_label());
                    tracing::error!(app = %app.name, "cannot read the kept rollout gate: {e}");
                    continue;
                }
            };
            match gates.check(&app.name, &bytes) {
                Ok(Some(gate)) => {
                    gates.keep(gate);
                }
                Ok(None) => {}
                Err(reason) => {
                    metrics.error(ErrorKind::Gate);
                    tracing::warn!(app = %app.name, "kept rollout gate not used: {reason}");
                }
            }
        }
        Some(gates)
    }

    /// The gate held for `app`.
    pub(crate) fn held(&self, app: &str) -> Option<Gate> {
        self.lock().get(app).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A gate for `app` from outside: `Ok(Some)` when it is new and may replace the one held,
    /// `Ok(None)` when it is the one held (a retained copy delivered again), `Err` with the
    /// reason it is refused. Never quotes the payload.
    fn check(&self, app: &str, payload: &[u8]) -> Result<Option<Gate>, String> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "{} bytes, more than {MAX_MESSAGE_BYTES}",
                payload.len()
            ));
        }
        let gate = Gate::parse(payload).map_err(|e| e.to_string())?;
        if gate.app != app {
            return Err(format!(
                "the gate names app {:?}, not the topic's",
                gate.app
            ));
        }
        gate.verify(&self.keys).map_err(|e| e.to_string())?;
        match self.lock().get(app) {
            Some(held) if held == &gate => Ok(None),
            Some(held) if gate.issued <= held.issued => Err(format!(
                "issued at {}, not after the gate held (rollout {}, issued at {}): a replayed or stale gate",
                gate.issued, held.rollout, held.issued
            )),
            _ => Ok(Some(gate)),
        }
    }

    /// Takes a gate for `app` from outside: verified, and held when it is the newest.
    /// `Ok(true)`: taken (the caller has it saved), `Ok(false)`: it is the one held.
    pub(super) fn taken(&self, app: &str, payload: &[u8]) -> Result<bool, String> {
        match self.check(app, payload)? {
            Some(gate) => Ok(self.keep(gate)),
            None => Ok(false),
        }
    }

    /// Holds `gate` unless a newer one came meanwhile; whether it did.
    fn keep(&self, gate: Gate) -> bool {
        let mut held = self.lock();
        if held.get(&gate.app).is_some_and(|h| h.issued >= gate.issued) {
            return false;
        }
        held.insert(gate.app.clone(), gate);
        true
    }

    /// How `revision` relates to `target`, if the cache was asked before for the same two.
    fn placed(&self, app: &str, target: &str, revision: &str) -> Option<Ancestry> {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed
            .get(app)
            .filter(|(t, r, _)| t == target && r == revision)
            .map(|(_, _, a)| *a)
    }

    fn place(&self, app: &str, target: &str, revision: &str, ancestry: Ancestry) {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.insert(
            app.to_string(),
            (target.to_string(), revision.to_string(), ancestry),
        );
    }

    /// Writes the gate held for `app` (the newest, whichever call comes last).
    pub(super) fn save(
        &self,
        store: &StateStore,
        app: &str,
    ) -> Result<(), crate::state::StateError> {
        let _one = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let Some(gate) = self.held(app) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&gate).unwrap_or_default();
        store.save_gate(app, &bytes)
    }
}

/// What a gated app runs this round.
pub(super) enum Gated {
    /// This target: the Git one, or the older one its stage allows (`held` says why).
    Run {
        target: Target,
        held: Option<String>,
    },
    /// Nothing new: no gate heard yet, or the gate cannot be used (`reason`).
    Keep { reason: String },
}

impl SyncContext {
    /// What `app` runs when the Git target is `target` (of `branch`): the target itself unless
    /// the app is gated.
    pub(super) async fn gated(
        &self,
        repo: &RepositoryConfig,
        app: &AppConfig,
        target: Target,
    ) -> Gated {
        if !app.gated {
            return Gated::Run { target, held: None };
        }
        let Some(gates) = self.gates.as_ref() else {
            // A fleet Application asks for gates on a node without the hub's keys: holding
            // back is the safe side of a rollout.
            return Gated::Keep {
                reason: "gated (edgesync.io/gated), but this node has no [gates] with the hub's keys; keeping what runs".to_string(),
            };
        };
        let Some(gate) = gates.held(&app.name) else {
            return Gated::Keep {
                reason: "gated: no rollout gate heard from the hub yet; keeping what runs"
                    .to_string(),
            };
        };
        let node = &self.config.node;
        let Some(stage) = gate.stage_for(&node.name, &node.labels).cloned() else {
            return Gated::Keep {
                reason: format!("gated: rollout {} has no stage", gate.rollout),
            };
        };
        let ancestry = match gates.placed(&app.name, &target.sha, &stage.revision) {
            Some(known) => Ok(known),
            None => {
                let (source, repo, branch, sha) = (
                    self.source.clone(),
                    repo.clone(),
                    app.revision.clone(),
                    target.sha.clone(),
                );
                let revision = stage.revision.clone();
                let found = blocking(move || {
                    source
                        .ancestry(&repo, &branch, &sha, &revision)
                        .map_err(SyncError::from)
                })
                .await;
                // Unrelated is not kept: a revision the server lacks now may arrive later.
                if let Ok(known @ (Ancestry::Same | Ancestry::Older | Ancestry::Newer)) = &found {
                    gates.place(&app.name, &target.sha, &stage.revision, *known);
                }
                found
            }
        };
        let ancestry = match ancestry {
            Ok(ancestry) => ancestry,
            Err(e) => {
                return Gated::Keep {
                    reason: format!(
                        "gated: cannot place rollout {}'s revision: {e}",
                        gate.rollout
                    ),
                }
            }
        };
        match gate.decide(&node.name, &node.labels, &target.sha, |_| ancestry) {
            Decision::Run { .. } => Gated::Run { target, held: None },
            Decision::Held { revision, reason } => Gated::Run {
                target: Target {
                    sha: revision,
                    tag: None,
                    sources: target.sources,
                },
                held: Some(reason),
            },
            Decision::Refused { reason } => {
                self.metrics.error(ErrorKind::Gate);
                tracing::warn!(app = %app.name, rollout = %gate.rollout, "rollout gate refused: {reason}");
                Gated::Keep {
                    reason: format!("rollout gate refused: {reason}"),
                }
            }
        }
    }
}

/// Takes the gates the MQTT subscriber hears: verifies, keeps, persists, and has the app synced.
pub(super) struct GateReceiver {
    pub(super) ctx: Arc<SyncContext>,
    pub(super) sink: Arc<dyn EventSink>,
    filter: String,
}

impl GateReceiver {
    pub(super) fn new(ctx: Arc<SyncContext>, sink: Arc<dyn EventSink>) -> Option<GateReceiver> {
        let filter = ctx.gates.as_ref()?.filter.clone();
        Some(GateReceiver { ctx, sink, filter })
    }
}

impl GateSink for GateReceiver {
    fn filter(&self) -> &str {
        &self.filter
    }

    fn gate(&self, topic: &str, payload: &[u8]) {
        let ctx = &self.ctx;
        let Some(gates) = ctx.gates.as_ref() else {
            return;
        };
        let app = topic.rsplit('/').next().unwrap_or_default();
        if !ctx.config.app(app).is_some_and(|a| a.gated) {
            ctx.metrics.trigger("gate", "not_gated");
            tracing::debug!(%topic, "rollout gate for an app this node does not gate");
            return;
        }
        if payload.is_empty() {
            // A retained gate cleared on the broker: the one held stays (only the hub's
            // signature can move a node).
            ctx.metrics.trigger("gate", "cleared");
            tracing::info!(%app, "rollout gate cleared on the broker; keeping the one held");
            return;
        }
        match gates.taken(app, payload) {
            Ok(true) => {}
            Ok(false) => {
                ctx.metrics.trigger("gate", "same");
                return;
            }
            Err(reason) => {
                ctx.metrics.error(ErrorKind::Gate);
                ctx.metrics.trigger("gate", "refused");
                tracing::warn!(%app, "rollout gate refused: {reason}");
                ctx.board
                    .note(app, &format!("a rollout gate was refused: {reason}"));
                return;
            }
        }
        if let Some(gate) = gates.held(app) {
            tracing::info!(%app, rollout = %gate.rollout, issued = gate.issued, "rollout gate taken");
        }
        ctx.metrics.trigger("gate", "taken");
        let (ctx, app_name) = (ctx.clone(), app.to_string());
        // Off the async workers (fsync); nothing waits for it: the gate is held already.
        tokio::task::spawn_blocking(move || {
            let Some(gates) = ctx.gates.as_ref() else {
                return;
            };
            if let Err(e) = gates.save(&ctx.store, &app_name) {
                ctx.metrics.error(e.metric_label());
                tracing::error!(app = %app_name, "cannot keep the rollout gate on disk: {e}");
            }
        });
        let _ = self.sink.deliver(Event {
            source: Source::Mqtt,
            repos: Vec::new(),
            branch: None,
            apps: vec![app.to_string()],
            directed: true,
        });
    }
}
