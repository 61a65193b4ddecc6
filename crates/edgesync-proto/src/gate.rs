//! Rollout gates. The hub publishes one retained gate per app; each agent finds its stage in it
//! ([`Gate::stage_for`]) and runs at most the revision that stage allows. A gate is signed by
//! the hub's Ed25519 key over its canonical JSON ([`Gate::canonical`]), in the SSHSIG format
//! of `ssh-keygen -Y sign` with the namespace [`NAMESPACE`]; an agent trusts only the keys it
//! is configured with, so whoever can publish on the broker can at most hold a node back (the
//! agent also refuses a revision its tracked branch does not contain; that check is the
//! agent's, it needs Git).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

/// The SSHSIG namespace of gate signatures: a commit signature can never pass for a gate.
pub const NAMESPACE: &str = "edgesync-gate";

/// Nodes fall into this many buckets by name; a stage's share is a range of them.
pub const BUCKETS: u32 = 10_000;

/// The schema this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A node's bucket: the first 8 bytes of SHA-256 of its name, modulo [`BUCKETS`]. Stable across
/// revisions and hub restarts, so a node's stage never moves between rollouts of one policy.
pub fn bucket(node: &str) -> u32 {
    let digest = Sha256::digest(node.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(BUCKETS)) as u32
}

/// One stage of a rollout and the revision its nodes may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// Labels a node must all carry to be in this stage (empty: no label condition).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Buckets `[from, to)` of this stage, when it is a share of the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<(u32, u32)>,
    /// The commit this stage may run.
    pub revision: String,
}

impl Stage {
    fn holds(&self, bucket: u32, labels: &BTreeMap<String, String>) -> bool {
        let labelled = !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v));
        let shared = self
            .buckets
            .is_some_and(|(from, to)| from <= bucket && bucket < to);
        labelled || shared
    }
}

/// The gate of one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub schema_version: u32,
    pub app: String,
    /// The rollout this gate belongs to (the hub's name for it).
    pub rollout: String,
    /// When the hub issued it, in Unix seconds; an agent never takes a gate older than one it
    /// has taken (a replayed old gate cannot undo a newer one).
    pub issued: u64,
    /// The revision the fleet ran before this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    pub stages: Vec<Stage>,
    /// The SSHSIG armour over [`Gate::canonical`]; empty while unsigned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("gate is not valid JSON or has unknown fields: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("gate schema version {0} is not supported (this agent reads {SCHEMA_VERSION})")]
    Schema(u32),
    #[error("gate has no stages")]
    NoStages,
    #[error("gate is not signed")]
    Unsigned,
    #[error("gate signature is malformed: {0}")]
    Signature(ssh_key::Error),
    #[error("gate is signed by {0}, which is not a trusted hub key")]
    Untrusted(String),
    #[error("gate signature does not match its content")]
    Forged,
    #[error("cannot sign the gate: {0}")]
    Sign(ssh_key::Error),
}

impl Gate {
    /// An unsigned gate of one stage letting every node of `app` run `revision` (a rollout
    /// complete, or a test's gate).
    pub fn everyone(app: &str, issued: u64, revision: &str) -> Gate {
        Gate {
            schema_version: SCHEMA_VERSION,
            app: app.to_string(),
            rollout: format!("{app}-{issued}"),
            issued,
            previous: None,
            stages: vec![Stage {
                name: "everyone".into(),
                selector: BTreeMap::new(),
                buckets: Some((0, BUCKETS)),
                revision: revision.to_string(),
            }],
            signature: String::new(),
        }
    }

    /// Parses a gate from the broker, checking its shape (not yet its signature).
    pub fn parse(bytes: &[u8]) -> Result<Gate, GateError> {
        let gate: Gate = serde_json::from_slice(bytes)?;
        if gate.schema_version != SCHEMA_VERSION {
            return Err(GateError::Schema(gate.schema_version));
        }
        if gate.stages.is_empty() {
            return Err(GateError::NoStages);
        }
        Ok(gate)
    }

    /// The bytes that are signed: the gate without its signature, as JSON with object keys
    /// sorted and no whitespace.
    pub fn canonical(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        let value = serde_json::to_value(&unsigned).unwrap_or_default();
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        out
    }

    /// Signs the gate with the hub's key.
    pub fn sign(&mut self, key: &PrivateKey) -> Result<(), GateError> {
        let sig = key
            .sign(NAMESPACE, HashAlg::Sha512, &self.canonical())
            .map_err(GateError::Sign)?;
        self.signature = sig.to_pem(LineEnding::LF).map_err(GateError::Sign)?;
        Ok(())
    }

    /// Checks the signature against the trusted keys; returns the key that signed.
    pub fn verify<'k>(&self, trusted: &'k [PublicKey]) -> Result<&'k PublicKey, GateError> {
        if self.signature.is_empty() {
            return Err(GateError::Unsigned);
        }
        let sig = SshSig::from_pem(&self.signature).map_err(GateError::Signature)?;
        let signer = sig.public_key();
        let Some(key) = trusted.iter().find(|k| k.key_data() == signer) else {
            return Err(GateError::Untrusted(
                PublicKey::from(signer.clone())
                    .fingerprint(HashAlg::Sha256)
                    .to_string(),
            ));
        };
        key.verify(NAMESPACE, &self.canonical(), &sig)
            .map_err(|_| GateError::Forged)?;
        Ok(key)
    }

    /// The stage of a node: the first whose selector matches its labels or whose buckets hold
    /// its bucket; a node no stage names is in the last one.
    pub fn stage_for(&self, node: &str, labels: &BTreeMap<String, String>) -> Option<&Stage> {
        let b = bucket(node);
        self.stages
            .iter()
            .find(|s| s.holds(b, labels))
            .or_else(|| self.stages.last())
    }
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            out.push(b'{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&serde_json::Value::String(key.clone()), out);
                out.push(b':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap()
    }

    fn gate() -> Gate {
        Gate {
            schema_version: SCHEMA_VERSION,
            app: "web".into(),
            rollout: "web-1".into(),
            issued: 1_795_000_000,
            previous: Some("a".repeat(40)),
            stages: vec![
                Stage {
                    name: "canary".into(),
                    selector: [("ring".to_string(), "canary".to_string())].into(),
                    buckets: None,
                    revision: "b".repeat(40),
                },
                Stage {
                    name: "ten-percent".into(),
                    selector: BTreeMap::new(),
                    buckets: Some((0, 1_000)),
                    revision: "b".repeat(40),
                },
                Stage {
                    name: "rest".into(),
                    selector: BTreeMap::new(),
                    buckets: Some((1_000, BUCKETS)),
                    revision: "a".repeat(40),
                },
            ],
            signature: String::new(),
        }
    }

    #[test]
    fn a_signed_gate_verifies_and_any_change_to_it_does_not() {
        let hub = key();
        let trusted = [hub.public_key().clone()];
        let mut g = gate();
        assert!(matches!(g.verify(&trusted), Err(GateError::Unsigned)));
        g.sign(&hub).unwrap();
        let text = serde_json::to_vec(&g).unwrap();
        let back = Gate::parse(&text).unwrap();
        back.verify(&trusted).unwrap();

        let mut moved = back.clone();
        moved.stages[2].revision = "c".repeat(40);
        assert!(matches!(moved.verify(&trusted), Err(GateError::Forged)));

        let other = key();
        assert!(matches!(
            back.verify(&[other.public_key().clone()]),
            Err(GateError::Untrusted(_))
        ));
        let mut resigned = back.clone();
        resigned.sign(&other).unwrap();
        assert!(matches!(
            resigned.verify(&trusted),
            Err(GateError::Untrusted(_))
        ));
    }

    #[test]
    fn the_canonical_form_does_not_depend_on_key_order() {
        let g = gate();
        let mut value = serde_json::to_value(&g).unwrap();
        let reordered: serde_json::Map<String, serde_json::Value> = value
            .as_object_mut()
            .unwrap()
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let back: Gate = serde_json::from_value(serde_json::Value::Object(reordered)).unwrap();
        assert_eq!(back.canonical(), g.canonical());
        assert!(!String::from_utf8(g.canonical()).unwrap().contains(' '));
    }

    #[test]
    fn a_node_finds_its_stage_by_labels_then_bucket_else_the_last() {
        let g = gate();
        let canary: BTreeMap<String, String> = [("ring".to_string(), "canary".to_string())].into();
        assert_eq!(g.stage_for("any", &canary).unwrap().name, "canary");
        let none = BTreeMap::new();
        let mut seen = BTreeMap::<String, usize>::new();
        for i in 0..2_000 {
            let node = format!("node-{i}");
            let stage = g.stage_for(&node, &none).unwrap();
            let want = if bucket(&node) < 1_000 {
                "ten-percent"
            } else {
                "rest"
            };
            assert_eq!(stage.name, want);
            *seen.entry(stage.name.clone()).or_default() += 1;
        }
        // About a tenth of the nodes, by name.
        let ten = seen.get("ten-percent").copied().unwrap_or_default();
        assert!((120..=280).contains(&ten), "{ten} of 2,000 in ten-percent");
        assert_eq!(bucket("node-7"), bucket("node-7"));
    }

    #[test]
    fn unknown_fields_and_other_schemas_are_refused() {
        let mut value = serde_json::to_value(gate()).unwrap();
        value["extra"] = serde_json::json!(1);
        assert!(matches!(
            Gate::parse(&serde_json::to_vec(&value).unwrap()),
            Err(GateError::Malformed(_))
        ));
        let mut g = gate();
        g.schema_version = 2;
        assert!(matches!(
            Gate::parse(&serde_json::to_vec(&g).unwrap()),
            Err(GateError::Schema(2))
        ));
        g.schema_version = SCHEMA_VERSION;
        g.stages.clear();
        assert!(matches!(
            Gate::parse(&serde_json::to_vec(&g).unwrap()),
            Err(GateError::NoStages)
        ));
    }
}

/// What an agent runs for a gated app, given the gate it holds (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run this revision (the Git target, or the older revision the gate allows).
    Run { revision: String },
    /// Run this older revision than the Git target, and say why (`Waiting`).
    Held { revision: String, reason: String },
    /// The gate cannot be used; keep running what is running, and say why.
    Refused { reason: String },
}

/// How a revision relates to the Git target, as the agent's Git cache tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ancestry {
    /// The same commit.
    Same,
    /// An ancestor of the target on the tracked branch.
    Older,
    /// A descendant of the target (the gate is ahead of what this node fetched).
    Newer,
    /// Neither: not on the tracked branch's history.
    Unrelated,
}

impl Gate {
    /// The revision a node runs: the older of the Git target and what its stage allows, and
    /// never one off the tracked branch. `ancestry` tells how the stage's revision relates to
    /// the target (a Git question, answered by the caller).
    pub fn decide(
        &self,
        node: &str,
        labels: &BTreeMap<String, String>,
        target: &str,
        ancestry: impl Fn(&str) -> Ancestry,
    ) -> Decision {
        let Some(stage) = self.stage_for(node, labels) else {
            return Decision::Refused {
                reason: format!("gate {} has no stage", self.rollout),
            };
        };
        match ancestry(&stage.revision) {
            Ancestry::Same | Ancestry::Newer => Decision::Run {
                revision: target.to_string(),
            },
            Ancestry::Older => Decision::Held {
                revision: stage.revision.clone(),
                reason: format!(
                    "held at {} by rollout {}, stage {}",
                    short(&stage.revision),
                    self.rollout,
                    stage.name
                ),
            },
            Ancestry::Unrelated => Decision::Refused {
                reason: format!(
                    "rollout {} allows {} for stage {}, which is not on the tracked branch",
                    self.rollout,
                    short(&stage.revision),
                    stage.name
                ),
            },
        }
    }
}

fn short(revision: &str) -> String {
    revision.chars().take(12).collect()
}

/// The newest gate an agent has taken per app: a gate issued earlier than the one held is
/// refused, so a replayed old gate cannot undo a newer one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub issued: BTreeMap<String, u64>,
}

impl Taken {
    /// Whether `gate` may replace the one held for its app; records it if so.
    pub fn take(&mut self, gate: &Gate) -> bool {
        let held = self.issued.get(&gate.app).copied().unwrap_or_default();
        if gate.issued < held {
            return false;
        }
        self.issued.insert(gate.app.clone(), gate.issued);
        true
    }
}

#[cfg(test)]
mod decide_tests {
    use super::*;

    fn gate(revision: &str) -> Gate {
        Gate {
            schema_version: SCHEMA_VERSION,
            app: "web".into(),
            rollout: "web-2".into(),
            issued: 10,
            previous: None,
            stages: vec![Stage {
                name: "all".into(),
                selector: BTreeMap::new(),
                buckets: Some((0, BUCKETS)),
                revision: revision.into(),
            }],
            signature: String::new(),
        }
    }

    #[test]
    fn a_node_runs_the_older_of_git_and_its_stage_and_never_off_the_branch() {
        let labels = BTreeMap::new();
        let decide = |stage: &str, a: Ancestry| gate(stage).decide("n1", &labels, "tip", |_| a);
        assert_eq!(
            decide("tip", Ancestry::Same),
            Decision::Run {
                revision: "tip".into()
            }
        );
        assert_eq!(
            decide("next", Ancestry::Newer),
            Decision::Run {
                revision: "tip".into()
            }
        );
        assert!(matches!(
            decide("old", Ancestry::Older),
            Decision::Held { ref revision, ref reason } if revision == "old" && reason.contains("web-2")
        ));
        assert!(matches!(
            decide("evil", Ancestry::Unrelated),
            Decision::Refused { .. }
        ));
    }

    #[test]
    fn an_older_gate_never_replaces_a_newer_one() {
        let mut taken = Taken::default();
        let mut g = gate("a");
        assert!(taken.take(&g));
        g.issued = 5;
        assert!(!taken.take(&g));
        g.issued = 11;
        assert!(taken.take(&g));
    }
}
