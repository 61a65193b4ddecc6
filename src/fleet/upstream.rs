//! The fleet repository as the fleet hub (`edgesync-hub`) reads it: the Applications' Git
//! sources (which repository and branch each app follows, so the hub sees a new revision when
//! the agents will) and the `RolloutPolicy` documents kept beside them. The same Git cache,
//! transports, credentials and renderer as the agent's, so the hub reads what the nodes read.
//!
//! Blocking (Git I/O): the hub calls it from a blocking thread.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RepositoryConfig;
use crate::fleet::argo::{self, FleetObject};
use crate::source::{GitSource, SourceError};

/// The API group and kind of the hub's rollout policies.
const POLICY_GROUP: &str = "edgesync.io";
const POLICY_KIND: &str = "RolloutPolicy";

/// The fleet branch's head ([`Upstream::commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetHead {
    /// The commit the branch (or tag) points to.
    pub commit: String,
    /// The annotated tag the revision resolves through, if it does.
    tag: Option<crate::source::TagRef>,
}

/// Whether `object` is one of the hub's `RolloutPolicy` documents (kept beside the
/// Applications; the agents leave them alone).
pub(crate) fn is_policy(object: &crate::render::Object) -> bool {
    object.group() == POLICY_GROUP && object.kind() == POLICY_KIND
}

/// Why the fleet repository (or an app's) could not be read. The message names the
/// repository (credentials redacted) and what failed; never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// About the commit's content, not the way to it ([`Upstream::refused`]).
    content: bool,
}

impl From<SourceError> for UpstreamError {
    fn from(e: SourceError) -> Self {
        UpstreamError {
            message: e.to_string(),
            source: Some(Box::new(e)),
            content: false,
        }
    }
}

/// The Git source an app follows: the one its sync resolves (its primary source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSource {
    pub name: String,
    pub repo: String,
    /// Branch, tag or commit (`targetRevision`).
    pub revision: String,
    /// The `edgesync.io/gated` annotation is set: the nodes follow the hub's gates for it.
    pub gated: bool,
}

/// A `RolloutPolicy` document of the fleet, as JSON, and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub origin: String,
    pub value: serde_json::Value,
}

/// What one fleet commit holds for the hub.
#[derive(Debug, Clone, Default)]
pub struct FleetRead {
    pub commit: String,
    pub apps: Vec<AppSource>,
    pub policies: Vec<Document>,
    /// What could not be read or is not followed (named by file and object); the rest of the
    /// read stands.
    pub problems: Vec<String>,
}

/// The fleet repository at a branch and directory, with the credentials of
/// `[[repositories]]` entries.
#[derive(Debug, Clone)]
pub struct Upstream {
    source: GitSource,
    repositories: Vec<RepositoryConfig>,
    repo: String,
    revision: String,
    path: String,
    /// With keys: a fleet commit is read only if one of them signed it (as the agents'
    /// `[signatures] fleet`).
    keyring: Option<crate::signature::Keyring>,
}

impl Upstream {
    /// `cache_dir` holds the Git cache (`cache_dir/git`).
    pub fn new(
        cache_dir: &Path,
        repositories: Vec<RepositoryConfig>,
        repo: &str,
        revision: &str,
        path: &str,
    ) -> Upstream {
        crate::source::transport::register();
        Upstream {
            source: GitSource::new(cache_dir),
            repositories,
            repo: repo.to_string(),
            revision: revision.to_string(),
            path: path.to_string(),
            keyring: None,
        }
    }

    /// Reads a fleet commit only if a key of these files signed it (or the annotated tag the
    /// revision names): OpenPGP public keys and OpenSSH public keys, as the agents'
    /// `[signatures]` take them.
    pub fn require_signatures(
        mut self,
        gpg_keys: &[std::path::PathBuf],
        ssh_keys: &[std::path::PathBuf],
    ) -> Result<Upstream, UpstreamError> {
        let keyring =
            crate::signature::Keyring::load(gpg_keys, ssh_keys).map_err(|e| UpstreamError {
                message: format!("signature keys: {e}"),
                source: Some(Box::new(e)),
                content: false,
            })?;
        if keyring.key_ids().is_empty() {
            return Err(UpstreamError {
                message: "signature keys: the files hold no key".into(),
                source: None,
                content: false,
            });
        }
        self.keyring = Some(keyring);
        Ok(self)
    }

    /// `repo@revision:path`, credentials redacted: for messages and the hub's page.
    pub fn describe(&self) -> String {
        format!(
            "{}@{}:{}",
            crate::source::redact(&self.repo),
            self.revision,
            self.path
        )
    }

    fn repository(&self, url: &str) -> RepositoryConfig {
        RepositoryConfig::of(&self.repositories, url)
    }

    /// The commits `revisions` point to in repository `url`, from one listing of its refs
    /// (no objects are fetched).
    pub fn heads(
        &self,
        url: &str,
        revisions: &[&str],
    ) -> Result<BTreeMap<String, Result<String, UpstreamError>>, UpstreamError> {
        let refs = self.source.remote_refs(&self.repository(url))?;
        Ok(revisions
            .iter()
            .map(|r| (r.to_string(), refs.resolve(r).map_err(UpstreamError::from)))
            .collect())
    }

    /// The fleet branch's head now, read in one ls-remote: its commit, and the annotated tag
    /// the revision names if it does (its signature vouches for the commit first).
    pub fn commit(&self) -> Result<FleetHead, UpstreamError> {
        let refs = self.source.remote_refs(&self.repository(&self.repo))?;
        Ok(FleetHead {
            commit: refs.resolve(&self.revision)?,
            tag: refs.annotated_tag(&self.revision),
        })
    }

    /// Whether `error` (from [`Upstream::read`]) is about the commit itself (unsigned, signed
    /// by an unknown key, unreadable manifests), not the way to it: the commit is not worth
    /// reading again until the branch moves.
    pub fn refused(error: &UpstreamError) -> bool {
        error.content
    }

    fn error(&self, message: String) -> UpstreamError {
        UpstreamError {
            message: format!(
                "fleet repository {}@{}: {message}",
                crate::source::redact(&self.repo),
                self.revision
            ),
            source: None,
            content: false,
        }
    }

    /// Reads the fleet at `head`: its Applications' Git sources and its `RolloutPolicy`
    /// documents, under the fleet path (plain YAML or a kustomization, as the agent reads it).
    /// ApplicationSets and app-of-apps children are not followed (said in `problems`).
    pub fn read(&self, head: &FleetHead) -> Result<FleetRead, UpstreamError> {
        let commit = head.commit.as_str();
        let repo = self.repository(&self.repo);
        let snapshot = self.source.snapshot(&repo, &self.revision, commit)?;
        if let Some(keyring) = &self.keyring {
            // The annotated tag the revision names vouches for the commit first, as on the
            // agents.
            let signed = self
                .source
                .signed(&repo, &self.revision, commit, head.tag.as_ref())?;
            let signer = keyring
                .verify(&signed, "the hub's [signatures]", &keyring.key_ids())
                .map_err(|e| UpstreamError {
                    content: true,
                    ..self.error(e.to_string())
                })?;
            tracing::info!(object = %signed.object, signer = %signer.0, "fleet signature verified");
        }
        let manifests =
            crate::render::render(&snapshot.root, Path::new(&self.path)).map_err(|e| {
                UpstreamError {
                    content: true,
                    ..self.error(format!("path {}: {e}", self.path))
                }
            })?;
        let mut read = FleetRead {
            commit: commit.to_string(),
            ..FleetRead::default()
        };
        for object in &manifests.objects {
            if is_policy(object) {
                read.policies.push(Document {
                    origin: object.origin.clone(),
                    value: serde_json::Value::Object(object.value.clone()),
                });
                continue;
            }
            if object.group() == argo::GROUP && object.kind() == "ApplicationSet" {
                read.problems.push(format!(
                    "{}: ApplicationSet {}: the hub does not expand ApplicationSets (their apps differ per node); rollouts of the apps it generates are not started from Git",
                    object.origin,
                    object.name()
                ));
                continue;
            }
            match argo::parse(object) {
                Ok(Some(parsed)) => {
                    let FleetObject::Application(app) = parsed.object else {
                        continue;
                    };
                    match app.to_app_config() {
                        Ok(cfg) if cfg.chart.is_some() => read.problems.push(format!(
                            "{}: app {}: its source is a chart repository; the hub rolls out Git revisions only",
                            object.origin, cfg.name
                        )),
                        Ok(cfg) => read.apps.push(AppSource {
                            name: cfg.name,
                            repo: cfg.repo,
                            revision: cfg.revision,
                            gated: cfg.gated,
                        }),
                        Err(why) => read
                            .problems
                            .push(format!("{}: app {}: {why}", object.origin, app.name)),
                    }
                }
                // Neither Argo CD's nor a policy: the agents report those; the hub has no
                // use for them.
                Ok(None) => {}
                Err(e) => read.problems.push(e.to_string()),
            }
        }
        Ok(read)
    }

    /// Removes cached checkouts of the fleet other than `commit`'s.
    pub fn keep_only(&self, commit: &str) {
        let keep = std::iter::once(commit.to_string()).collect();
        self.source.retain(&self.repo, &keep);
    }
}
