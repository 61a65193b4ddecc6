//! The rollout engine, pure: a policy (stages, bake time, failure budget, what to do when it
//! is spent), one rollout's state, and what the nodes report; [`Rollout::step`] moves the
//! rollout on and [`Rollout::gate`] says what each stage may run. The hub calls `step` on every
//! ingested document of a gated app, so a spent budget halts within one message.

use std::collections::{BTreeMap, BTreeSet};

use edgesync_proto::gate::SCHEMA_VERSION;
use edgesync_proto::{Gate, Stage, BUCKETS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub name: String,
    /// Labels a node must all carry (empty: none).
    pub selector: BTreeMap<String, String>,
    /// Share of the fleet in percent, counted from where the previous share stage ended.
    pub share: Option<u32>,
    /// How long every node of the stage must be Healthy at the revision before the next opens.
    pub bake_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Nodes(u64),
    Percent(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Halt,
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub stages: Vec<StageSpec>,
    pub budget: Budget,
    pub on_failure: OnFailure,
}

/// What one node reports of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The revision the node runs.
    pub revision: Option<String>,
    /// The revision it was last asked to run (its status's `target_revision`): a node that
    /// fails to sync the rollout's revision still runs the old one, and fails all the same.
    pub target: Option<String>,
    pub sync: String,
    pub health: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    Progressing,
    Complete,
    Halted { reason: String },
    RolledBack { reason: String },
}

/// Kept in the store as JSON (`Store::save_rollout`), so a restarted hub carries on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    pub app: String,
    pub id: String,
    pub revision: String,
    pub previous: Option<String>,
    /// Stages open to `revision` (the first `opened`).
    pub opened: usize,
    /// When the newest opened stage opened: it is done no sooner than its bake time after,
    /// even while none of its nodes has reported yet.
    pub stage_opened_at: u64,
    pub phase: Phase,
    /// When each node was first seen Synced and Healthy at `revision`, while it stays so.
    healthy_since: BTreeMap<String, u64>,
}

impl Rollout {
    pub fn start(app: &str, revision: &str, previous: Option<&str>, now: u64) -> Rollout {
        Rollout {
            app: app.to_string(),
            id: format!("{app}-{}", revision.chars().take(12).collect::<String>()),
            revision: revision.to_string(),
            previous: previous.map(str::to_string),
            opened: 1,
            stage_opened_at: now,
            phase: Phase::Progressing,
            healthy_since: BTreeMap::new(),
        }
    }

    /// A revision the fleet already runs, every stage open: where the hub starts following an
    /// app's branch when no node runs anything else.
    pub fn settled_at(app: &str, revision: &str, stages: usize, now: u64) -> Rollout {
        Rollout {
            opened: stages,
            phase: Phase::Complete,
            ..Rollout::start(app, revision, None, now)
        }
    }

    /// The revision the stages not opened to this rollout run (all of them after a rollback):
    /// what a rollout replacing this one starts from.
    pub fn settled(&self, stages: usize) -> &str {
        let everywhere = self.phase == Phase::Complete
            || (self.opened >= stages && !matches!(self.phase, Phase::RolledBack { .. }));
        match &self.previous {
            Some(previous) if !everywhere => previous,
            _ => &self.revision,
        }
    }

    /// The gate for this rollout (unsigned): opened stages run the new revision, the rest the
    /// previous one (or the new one when there is none: a first rollout has nothing to hold).
    pub fn gate(&self, policy: &Policy, issued: u64) -> Gate {
        let old = self
            .previous
            .clone()
            .unwrap_or_else(|| self.revision.clone());
        let mut cumulative = 0u32;
        let stages = policy
            .stages
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let buckets = spec.share.map(|percent| {
                    let from = cumulative;
                    let to = (cumulative + percent.min(100) * (BUCKETS / 100)).min(BUCKETS);
                    cumulative = to;
                    (from, to)
                });
                let open = i < self.opened && !matches!(self.phase, Phase::RolledBack { .. });
                Stage {
                    name: spec.name.clone(),
                    selector: spec.selector.clone(),
                    buckets,
                    revision: if open {
                        self.revision.clone()
                    } else {
                        old.clone()
                    },
                }
            })
            .collect();
        Gate {
            schema_version: SCHEMA_VERSION,
            app: self.app.clone(),
            rollout: self.id.clone(),
            issued,
            previous: self.previous.clone(),
            stages,
            signature: String::new(),
        }
    }

    /// Moves the rollout on from what the nodes report at `now`; returns what happened, for
    /// the hub's events.
    pub fn step(&mut self, policy: &Policy, nodes: &[NodeView], now: u64) -> Vec<String> {
        let mut said = Vec::new();
        if self.phase != Phase::Progressing {
            return said;
        }
        let gate = self.gate(policy, now);
        let stage_of = |n: &NodeView| {
            gate.stages
                .iter()
                .position(|s| Some(s) == gate.stage_for(&n.node, &n.labels))
                .unwrap_or(0)
        };
        let at_revision = |n: &NodeView| n.revision.as_deref() == Some(self.revision.as_str());
        // Who is healthy at the revision, since when.
        let mut seen = BTreeSet::new();
        for n in nodes {
            if at_revision(n) && n.sync == "Synced" && n.health == "Healthy" {
                self.healthy_since.entry(n.node.clone()).or_insert(now);
                seen.insert(n.node.clone());
            }
        }
        self.healthy_since.retain(|node, _| seen.contains(node));

        // The failure budget, over the opened stages.
        let opened: Vec<&NodeView> = nodes.iter().filter(|n| stage_of(n) < self.opened).collect();
        let targets = |n: &NodeView| n.target.as_deref() == Some(self.revision.as_str());
        let failing = opened
            .iter()
            .filter(|n| {
                (at_revision(n) && (n.sync == "Failed" || n.health == "Degraded"))
                    || (targets(n) && n.sync == "Failed")
            })
            .count() as u64;
        let allowed = match policy.budget {
            Budget::Nodes(k) => k,
            Budget::Percent(p) => opened.len() as u64 * u64::from(p.min(100)) / 100,
        };
        if failing > allowed {
            let reason = format!(
                "{failing} of {} nodes in the opened stages failing at {} (budget {allowed})",
                opened.len(),
                self.revision.chars().take(12).collect::<String>()
            );
            // A first rollout has nothing to go back to: it halts, and says so.
            let back = match (policy.on_failure, &self.previous) {
                (OnFailure::Rollback, Some(previous)) => Some(previous.clone()),
                _ => None,
            };
            let done = match (&back, policy.on_failure) {
                (Some(previous), _) => format!(
                    "rolled back to {}",
                    previous.chars().take(12).collect::<String>()
                ),
                (None, OnFailure::Rollback) => {
                    "halted (no previous revision to roll back to)".into()
                }
                (None, OnFailure::Halt) => "halted".into(),
            };
            said.push(format!("rollout {}: {done}: {reason}", self.id));
            self.phase = match back {
                Some(_) => Phase::RolledBack { reason },
                None => Phase::Halted { reason },
            };
            return said;
        }

        // The newest opened stage is done when all its nodes baked.
        while self.opened <= policy.stages.len() {
            let current = self.opened - 1;
            let bake = policy
                .stages
                .get(current)
                .map(|s| s.bake_secs)
                .unwrap_or_default();
            let members: Vec<&NodeView> = nodes.iter().filter(|n| stage_of(n) == current).collect();
            // Nodes that have not reported yet are not members yet: a stage is never done
            // before its bake time has passed since it opened.
            let waited = now.saturating_sub(self.stage_opened_at) >= bake;
            let baked = waited
                && members.iter().all(|n| {
                    self.healthy_since
                        .get(&n.node)
                        .is_some_and(|since| now.saturating_sub(*since) >= bake)
                });
            if !baked {
                break;
            }
            if self.opened == policy.stages.len() {
                self.phase = Phase::Complete;
                said.push(format!("rollout {}: complete", self.id));
                break;
            }
            self.opened += 1;
            self.stage_opened_at = now;
            said.push(format!(
                "rollout {}: stage {} open",
                self.id,
                policy.stages[self.opened - 1].name
            ));
            if !members.is_empty() {
                // One stage per step once nodes are involved: the next stage's nodes have
                // not been looked at under the new gate yet.
                break;
            }
        }
        said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on_failure: OnFailure) -> Policy {
        Policy {
            stages: vec![
                StageSpec {
                    name: "canary".into(),
                    selector: [("ring".to_string(), "canary".to_string())].into(),
                    share: None,
                    bake_secs: 60,
                },
                StageSpec {
                    name: "half".into(),
                    selector: BTreeMap::new(),
                    share: Some(50),
                    bake_secs: 60,
                },
                StageSpec {
                    name: "rest".into(),
                    selector: BTreeMap::new(),
                    share: Some(50),
                    bake_secs: 0,
                },
            ],
            budget: Budget::Nodes(0),
            on_failure,
        }
    }

    /// 20 nodes, two of them canaries, each running what its stage allows with `health`
    /// (the new revision's health, for nodes that run it).
    fn fleet(r: &Rollout, p: &Policy, health: &str) -> Vec<NodeView> {
        let gate = r.gate(p, 0);
        (0..20)
            .map(|i| {
                let labels: BTreeMap<String, String> = if i < 2 {
                    [("ring".to_string(), "canary".to_string())].into()
                } else {
                    BTreeMap::new()
                };
                let node = format!("node-{i}");
                let revision = gate.stage_for(&node, &labels).unwrap().revision.clone();
                let health = if revision == r.revision {
                    health
                } else {
                    "Healthy"
                };
                NodeView {
                    node,
                    labels,
                    target: Some(revision.clone()),
                    revision: Some(revision),
                    sync: "Synced".into(),
                    health: health.into(),
                }
            })
            .collect()
    }

    #[test]
    fn a_good_revision_goes_through_every_stage_after_its_bake() {
        let p = policy(OnFailure::Halt);
        let mut r = Rollout::start("web", "new", Some("old"), 1_000);
        let mut t = 1_000;
        r.step(&p, &fleet(&r, &p, "Healthy"), t);
        assert_eq!(r.opened, 1, "the canaries bake first");
        t += 60;
        let said = r.step(&p, &fleet(&r, &p, "Healthy"), t);
        assert_eq!((r.opened, said.len()), (2, 1), "{said:?}");
        // Half of the rest now runs the new revision; it bakes too.
        r.step(&p, &fleet(&r, &p, "Healthy"), t);
        assert_eq!(r.opened, 2);
        t += 60;
        r.step(&p, &fleet(&r, &p, "Healthy"), t);
        assert_eq!(r.opened, 3);
        r.step(&p, &fleet(&r, &p, "Healthy"), t);
        assert_eq!(r.phase, Phase::Complete);
        assert!(r.gate(&p, t).stages.iter().all(|s| s.revision == "new"));
    }

    #[test]
    fn a_bad_revision_halts_in_the_first_stage_or_rolls_back() {
        let p = policy(OnFailure::Halt);
        let mut r = Rollout::start("web", "bad", Some("old"), 1_000);
        r.step(&p, &fleet(&r, &p, "Degraded"), 1_000);
        assert!(matches!(r.phase, Phase::Halted { .. }), "{:?}", r.phase);
        let gate = r.gate(&p, 1_001);
        assert_eq!(
            gate.stages[0].revision, "bad",
            "halted: the canaries keep it"
        );
        assert_eq!(gate.stages[1].revision, "old");

        let p = policy(OnFailure::Rollback);
        let mut r = Rollout::start("web", "bad", Some("old"), 1_000);
        r.step(&p, &fleet(&r, &p, "Degraded"), 1_000);
        assert!(matches!(r.phase, Phase::RolledBack { .. }));
        assert!(r.gate(&p, 1_001).stages.iter().all(|s| s.revision == "old"));

        // A first rollout has no previous revision: it halts, and says why.
        let mut r = Rollout::start("web", "bad", None, 1_000);
        let said = r.step(&p, &fleet(&r, &p, "Degraded"), 1_000);
        assert!(matches!(r.phase, Phase::Halted { .. }), "{:?}", r.phase);
        assert!(said[0].contains("no previous revision"), "{said:?}");
    }

    #[test]
    fn a_node_that_fails_to_sync_the_revision_spends_the_budget() {
        let p = policy(OnFailure::Halt);
        let mut r = Rollout::start("web", "bad", Some("old"), 1_000);
        let mut nodes = fleet(&r, &p, "Healthy");
        // A canary could not apply the revision (a render error): it still runs the old one.
        nodes[0].revision = Some("old".into());
        nodes[0].target = Some("bad".into());
        nodes[0].sync = "Failed".into();
        r.step(&p, &nodes, 1_000);
        assert!(matches!(r.phase, Phase::Halted { .. }), "{:?}", r.phase);
        // Held back by its gate (Waiting at the old revision) is not failing.
        let mut r = Rollout::start("web", "new", Some("old"), 1_000);
        let mut nodes = fleet(&r, &p, "Healthy");
        nodes[5].target = Some("new".into());
        nodes[5].sync = "Waiting".into();
        r.step(&p, &nodes, 1_000);
        assert_eq!(r.phase, Phase::Progressing);
    }

    #[test]
    fn the_shares_cover_every_bucket_once() {
        let p = policy(OnFailure::Halt);
        let gate = Rollout::start("web", "new", Some("old"), 1_000).gate(&p, 0);
        assert_eq!(gate.stages[1].buckets, Some((0, BUCKETS / 2)));
        assert_eq!(gate.stages[2].buckets, Some((BUCKETS / 2, BUCKETS)));
    }

    #[test]
    fn a_stage_whose_nodes_have_not_reported_waits_its_bake_time() {
        let p = policy(OnFailure::Halt);
        let mut r = Rollout::start("web", "new", Some("old"), 1_000);
        // Only nodes of later stages have reported: the canary stage has no members yet.
        let later: Vec<NodeView> = fleet(&r, &p, "Healthy").into_iter().skip(2).collect();
        r.step(&p, &later, 1_010);
        assert_eq!(r.opened, 1, "not before the canaries' bake time");
        r.step(&p, &later, 1_060);
        assert_eq!(
            r.opened, 2,
            "no canary at all after the bake time: the stage passes"
        );
    }
}
