//! Drives rollouts and publishes their gates: one retained, signed gate per app at
//! `<gate prefix>/<app>`. A rollout starts when the app's branch moves ([`Driver::follow`],
//! from the fleet repository) or when asked through the API, and moves on from the app's
//! nodes' reports. Its state is saved in the store
//! after every change ([`Driver::saved`], [`Driver::restore`]).

use std::collections::BTreeMap;
use std::time::Instant;

use edgesync_proto::Gate;
use ssh_key::PrivateKey;

use crate::policy::Named;
use crate::rollout::{NodeView, Policy, Rollout};

/// A gate to publish (retained, QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no RolloutPolicy governs app {0}")]
    NoPolicy(String),
    #[error("cannot sign the gate of {app}: {source}")]
    Sign {
        app: String,
        source: edgesync_proto::GateError,
    },
}

pub struct Driver {
    policies: Vec<Named>,
    key: PrivateKey,
    prefix: String,
    rollouts: BTreeMap<String, Rollout>,
    /// The last `issued` per app: every new gate of an app is issued later.
    issued: BTreeMap<String, u64>,
    /// With a lease (`crate::lease`, several replicas): until when this replica may step
    /// rollouts, and who held the lease when last asked. `None`: always (one hub).
    lease: Option<(Option<Instant>, String)>,
}

impl Driver {
    pub fn new(policies: Vec<Named>, key: PrivateKey, prefix: &str) -> Driver {
        Driver {
            policies,
            key,
            prefix: prefix.trim_end_matches('/').to_string(),
            rollouts: BTreeMap::new(),
            issued: BTreeMap::new(),
            lease: None,
        }
    }

    /// Steps rollouts only while a lease says so ([`Driver::lead_until`]): until the first
    /// renewal, not at all.
    pub fn with_lease(mut self) -> Driver {
        self.lease = Some((None, String::new()));
        self
    }

    /// This replica steps rollouts, starts them and publishes their gates now.
    pub fn leading(&self) -> bool {
        match &self.lease {
            None => true,
            Some((until, _)) => until.is_some_and(|t| Instant::now() < t),
        }
    }

    /// Who held the lease when last asked (`None` without a lease).
    pub fn leader(&self) -> Option<&str> {
        self.lease.as_ref().map(|(_, holder)| holder.as_str())
    }

    /// Records a renewal: this replica leads until `until` (`None`: `holder` does).
    pub fn lead_until(&mut self, until: Option<Instant>, holder: &str) {
        if self.lease.is_some() {
            self.lease = Some((until, holder.to_string()));
        }
    }

    /// Replaces every rollout with the saved ones (at start, and when this replica takes the
    /// lease over: the replica that led before saved every change). An unreadable one is
    /// left out and logged, its `issued` kept.
    pub fn reload(&mut self, saved: Vec<crate::store::SavedRollout>) {
        self.rollouts.clear();
        for saved in saved {
            let rollout = match saved.rollout {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(app = %saved.app, "cannot read the saved rollout, left out: {e}");
                    None
                }
            };
            self.restore(&saved.app, saved.issued, rollout);
        }
    }

    /// The policy of `app`: its own, else the default.
    pub fn policy(&self, app: &str) -> Option<&Policy> {
        self.policies
            .iter()
            .find(|p| p.names(app))
            .or_else(|| self.policies.iter().find(|p| p.apps.is_none()))
            .map(|p| &p.policy)
    }

    /// Replaces the policies (the fleet repository was read again). Rollouts carry on under
    /// the new ones.
    pub fn set_policies(&mut self, policies: Vec<Named>) {
        self.policies = policies;
    }

    /// Follows `app`'s branch, now at `head`: a new revision starts a rollout from the revision
    /// the stages not yet opened run. The first time, with no rollout known, the hub starts
    /// from what the nodes run (`nodes`, the most common revision): a staged rollout when some
    /// run another revision than `head` (a hub whose store was lost mid-rollout must not send
    /// the whole fleet to it), every stage open at `head` when none does. The gate to publish
    /// and what happened, or `None` when `head` is the rollout's revision already.
    pub fn follow(
        &mut self,
        app: &str,
        head: &str,
        nodes: &[NodeView],
        now: u64,
    ) -> Result<Option<(Outgoing, Vec<String>)>, DriverError> {
        let Some(stages) = self.policy(app).map(|p| p.stages.len()) else {
            return Err(DriverError::NoPolicy(app.to_string()));
        };
        let short = |r: &str| r.chars().take(12).collect::<String>();
        let previous = match self.rollouts.get(app) {
            Some(r) if r.revision == head => return Ok(None),
            Some(r) => Some(r.settled(stages).to_string()),
            None => {
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for revision in nodes.iter().filter_map(|n| n.revision.as_deref()) {
                    *counts.entry(revision).or_default() += 1;
                }
                let running = counts.into_iter().max_by_key(|(_, n)| *n).map(|(r, _)| r);
                match running {
                    Some(r) if r != head => Some(r.to_string()),
                    _ => {
                        let rollout = Rollout::settled_at(app, head, stages, now);
                        let said = format!(
                            "rollout {}: the branch is at {} and no node runs another revision: every stage runs it, later revisions roll out in stages",
                            rollout.id,
                            short(head)
                        );
                        self.rollouts.insert(app.to_string(), rollout);
                        return Ok(Some((self.gate(app, now)?, vec![said])));
                    }
                }
            }
        };
        let gate = self.start(app, head, previous.as_deref(), now)?;
        let id = self.rollouts.get(app).map(|r| r.id.as_str()).unwrap_or(app);
        let said = format!(
            "rollout {id}: started, {} after {} (a new commit on the branch)",
            short(head),
            previous.as_deref().map(short).unwrap_or_default()
        );
        Ok(Some((gate, vec![said])))
    }

    pub fn rollouts(&self) -> impl Iterator<Item = &Rollout> {
        self.rollouts.values()
    }

    /// `app`'s rollout and the last `issued` of its gates, to save after every change (before
    /// its gate is published: a restarted hub must never issue a gate older than one out).
    pub fn saved(&self, app: &str) -> Option<(Rollout, u64)> {
        let rollout = self.rollouts.get(app)?.clone();
        Some((rollout, self.issued.get(app).copied().unwrap_or_default()))
    }

    /// Carries on from saved rollouts (a hub restart). An unreadable one is skipped, but its
    /// `issued` is kept: the next gate of that app is still issued later than the last one.
    pub fn restore(&mut self, app: &str, issued: u64, rollout: Option<Rollout>) {
        let last = self.issued.entry(app.to_string()).or_default();
        *last = (*last).max(issued);
        if let Some(rollout) = rollout {
            self.rollouts.insert(app.to_string(), rollout);
        }
    }

    /// Starts a rollout of `revision` for `app` (replacing any), with its first stage open.
    pub fn start(
        &mut self,
        app: &str,
        revision: &str,
        previous: Option<&str>,
        now: u64,
    ) -> Result<Outgoing, DriverError> {
        if self.policy(app).is_none() {
            return Err(DriverError::NoPolicy(app.to_string()));
        }
        self.rollouts.insert(
            app.to_string(),
            Rollout::start(app, revision, previous, now),
        );
        self.gate(app, now)
    }

    /// Moves `app`'s rollout on from its nodes' reports; a new gate when it changed.
    pub fn observe(
        &mut self,
        app: &str,
        nodes: &[NodeView],
        now: u64,
    ) -> Result<(Vec<String>, Option<Outgoing>), DriverError> {
        let Some(policy) = self.policy(app).cloned() else {
            return Ok((Vec::new(), None));
        };
        let Some(rollout) = self.rollouts.get_mut(app) else {
            return Ok((Vec::new(), None));
        };
        let before = (rollout.opened, rollout.phase.clone());
        let said = rollout.step(&policy, nodes, now);
        let changed = before != (rollout.opened, rollout.phase.clone());
        let gate = if changed {
            Some(self.gate(app, now)?)
        } else {
            None
        };
        Ok((said, gate))
    }

    fn gate(&mut self, app: &str, now: u64) -> Result<Outgoing, DriverError> {
        let issued = self
            .issued
            .get(app)
            .map_or(now, |last| now.max(last.saturating_add(1)));
        self.issued.insert(app.to_string(), issued);
        let (Some(rollout), Some(policy)) = (self.rollouts.get(app), self.policy(app)) else {
            return Err(DriverError::NoPolicy(app.to_string()));
        };
        let mut gate: Gate = rollout.gate(policy, issued);
        gate.sign(&self.key).map_err(|source| DriverError::Sign {
            app: app.to_string(),
            source,
        })?;
        Ok(Outgoing {
            topic: format!("{}/{app}", self.prefix),
            payload: serde_json::to_vec(&gate).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Budget, OnFailure, StageSpec};

    fn driver() -> (Driver, ssh_key::PublicKey) {
        let key = PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        let public = key.public_key().clone();
        let policy = Named {
            name: "default".into(),
            apps: None,
            policy: Policy {
                stages: vec![
                    StageSpec {
                        name: "first".into(),
                        selector: BTreeMap::new(),
                        share: Some(50),
                        bake_secs: 0,
                    },
                    StageSpec {
                        name: "rest".into(),
                        selector: BTreeMap::new(),
                        share: Some(50),
                        bake_secs: 0,
                    },
                ],
                budget: Budget::Nodes(0),
                on_failure: OnFailure::Halt,
            },
        };
        (Driver::new(vec![policy], key, "edgesync/gates/"), public)
    }

    #[test]
    fn gates_are_signed_published_per_app_and_issued_later_each_time() {
        let (mut d, public) = driver();
        let first = d.start("web", "new", Some("old"), 100).unwrap();
        assert_eq!(first.topic, "edgesync/gates/web");
        let gate = edgesync_proto::Gate::parse(&first.payload).unwrap();
        gate.verify(std::slice::from_ref(&public)).unwrap();
        assert_eq!(gate.stages[0].revision, "new");
        assert_eq!(gate.stages[1].revision, "old");
        // Every node healthy at what it may run: the next stage opens, in a later gate.
        let nodes: Vec<NodeView> = (0..10)
            .map(|i| {
                let node = format!("n{i}");
                let revision = gate
                    .stage_for(&node, &BTreeMap::new())
                    .unwrap()
                    .revision
                    .clone();
                NodeView {
                    node,
                    labels: BTreeMap::new(),
                    target: Some(revision.clone()),
                    revision: Some(revision),
                    sync: "Synced".into(),
                    health: "Healthy".into(),
                }
            })
            .collect();
        let (said, next) = d.observe("web", &nodes, 100).unwrap();
        let next = edgesync_proto::Gate::parse(&next.expect("a new gate").payload).unwrap();
        assert!(next.issued > gate.issued, "{said:?}");
        assert!(next.stages.iter().all(|s| s.revision == "new"));
        next.verify(&[public]).unwrap();
    }

    fn revisions(out: &Outgoing) -> Vec<String> {
        let gate = edgesync_proto::Gate::parse(&out.payload).unwrap();
        gate.stages.into_iter().map(|s| s.revision).collect()
    }

    fn running(node: &str, revision: &str) -> NodeView {
        NodeView {
            node: node.into(),
            labels: BTreeMap::new(),
            revision: Some(revision.into()),
            target: Some(revision.into()),
            sync: "Synced".into(),
            health: "Healthy".into(),
        }
    }

    #[test]
    fn a_followed_branch_starts_from_what_the_nodes_run() {
        // Nothing runs another revision: every stage at the branch's commit, nothing staged.
        let (mut d, _) = driver();
        let (gate, said) = d.follow("web", "a1", &[], 100).unwrap().unwrap();
        assert_eq!(revisions(&gate), ["a1", "a1"]);
        assert!(said[0].contains("every stage runs it"), "{said:?}");
        assert_eq!(
            d.saved("web").unwrap().0.phase,
            crate::rollout::Phase::Complete
        );
        // The branch has not moved: nothing new.
        assert!(d.follow("web", "a1", &[], 101).unwrap().is_none());
        // It moves: the first stage opens to the new commit, the rest stay.
        let (gate, said) = d.follow("web", "b2", &[], 102).unwrap().unwrap();
        assert_eq!(revisions(&gate), ["b2", "a1"]);
        assert!(said[0].contains("started, b2 after a1"), "{said:?}");
        // It moves again mid-rollout: the stages not opened still run a1, so the new rollout
        // starts from a1, not from the unproven b2.
        let (gate, _) = d.follow("web", "c3", &[], 103).unwrap().unwrap();
        assert_eq!(revisions(&gate), ["c3", "a1"]);

        // A hub whose store was lost while most nodes ran a1: it stages the branch's commit
        // from a1 rather than sending every node to it.
        let (mut fresh, _) = driver();
        let nodes = [
            running("n1", "a1"),
            running("n2", "a1"),
            running("n3", "c3"),
        ];
        let (gate, _) = fresh.follow("web", "c3", &nodes, 200).unwrap().unwrap();
        assert_eq!(revisions(&gate), ["c3", "a1"]);
    }

    #[test]
    fn after_a_complete_or_rolled_back_rollout_the_next_starts_where_the_fleet_is() {
        let (mut d, _) = driver();
        d.follow("web", "a1", &[], 100).unwrap();
        d.follow("web", "b2", &[], 101).unwrap();
        let all_b2 = [running("n1", "b2"), running("n2", "b2")];
        // Bake 0: both stages open, one step each.
        d.observe("web", &all_b2, 102).unwrap();
        d.observe("web", &all_b2, 103).unwrap();
        assert_eq!(
            d.saved("web").unwrap().0.phase,
            crate::rollout::Phase::Complete
        );
        let (gate, _) = d.follow("web", "c3", &[], 104).unwrap().unwrap();
        assert_eq!(revisions(&gate), ["c3", "b2"]);
        // Rolled back: every stage went back to b2, and the next rollout starts there.
        let mut rolled = d.saved("web").unwrap().0;
        rolled.phase = crate::rollout::Phase::RolledBack {
            reason: "test".into(),
        };
        assert_eq!(rolled.settled(2), "b2");
        rolled.opened = 2;
        assert_eq!(rolled.settled(2), "b2");
        rolled.phase = crate::rollout::Phase::Halted {
            reason: "test".into(),
        };
        assert_eq!(
            rolled.settled(2),
            "c3",
            "halted with every stage open: all run c3"
        );
    }

    #[test]
    fn an_app_no_policy_governs_is_not_followed() {
        let (mut d, _) = driver();
        d.set_policies(Vec::new());
        assert!(matches!(
            d.follow("web", "a1", &[], 100),
            Err(DriverError::NoPolicy(_))
        ));
        assert!(d.saved("web").is_none());
    }

    #[test]
    fn a_restored_driver_carries_on_and_issues_later_gates() {
        let (mut d, _) = driver();
        d.start("web", "new", Some("old"), 100).unwrap();
        let (rollout, issued) = d.saved("web").unwrap();
        assert_eq!(issued, 100);
        // The hub restarts (its clock behind the last gate's `issued`): an unreadable row of
        // another app keeps that app's `issued` too.
        let (mut again, _) = driver();
        again.restore("web", issued, Some(rollout.clone()));
        again.restore("api", 500, None);
        assert_eq!(again.rollouts().collect::<Vec<_>>(), [&rollout]);
        // Its first stage has no node and no bake: the next opens, in a gate issued after
        // the last one out, though the clock says earlier.
        let (_, gate) = again.observe("web", &[], 90).unwrap();
        let gate = edgesync_proto::Gate::parse(&gate.expect("a new gate").payload).unwrap();
        assert_eq!(gate.issued, 101);
        let next = again.start("api", "a2", None, 90).unwrap();
        let next = edgesync_proto::Gate::parse(&next.payload).unwrap();
        assert_eq!(next.issued, 501);
    }
}
