//! Prometheus metrics (prometheus-client), served on the HTTP listener at `/metrics`.
//! Every failure kind is counted through an error's `metric_label()`; triggers count what
//! they heard and what became of it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    /// `mqtt`, `github`, `gitlab`, `gitea`, `bitbucket`, `generic`, `watch` or `webhook`.
    source: String,
    /// `accepted`, or why not: `malformed`, `bad_signature`, `replay`, `unknown_repository`, ...
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    app: String,
    /// `applied`, `unchanged`, `failed` or `waiting` (syncs); `healed` or `failed` (self-heal).
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: String,
    /// The HTTP status code, or `error` when no response came back.
    code: String,
}

/// One app as `edgesync_app_info` shows it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AppInfo {
    pub(crate) app: String,
    pub(crate) repo: String,
    pub(crate) revision: String,
    pub(crate) sync: String,
    pub(crate) health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    target: String,
}

macro_rules! error_kinds {
    ($($variant:ident = $label:literal: $meaning:literal,)*) => {
        /// The fixed set of `kind`s of `edgesync_errors_total`. Every error type's
        /// `metric_label()` returns one; docs/METRICS.md lists them all (a test holds it to that).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum ErrorKind {
            $(#[doc = $meaning] $variant,)*
        }

        impl ErrorKind {
            pub(crate) const ALL: &'static [ErrorKind] = &[$(ErrorKind::$variant,)*];

            /// The `kind` label.
            pub(crate) fn label(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $label,)*
                }
            }

            /// What an error of this kind means, as docs/METRICS.md says.
            #[cfg(test)]
            pub(crate) fn meaning(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $meaning,)*
                }
            }
        }
    };
}

error_kinds! {
    ConfigRead = "config_read": "the config file cannot be read",
    ConfigParse = "config_parse": "the config file is not valid TOML of the schema (unknown key, wrong type)",
    ConfigInvalid = "config_invalid": "the config file parses but a value is wrong (names the key and line), including a `[signatures]` key file without a usable key",
    ConfigUnsettled = "config_unsettled": "a reloaded config that removes apps changed again while it was read; the reload waits",
    ConfigStart = "config_start": "the agent could not start with a new config (a port in use, no API server); the running config stays",
    UnknownRepository = "unknown_repository": "a trigger named a repository no app of this node uses",
    UnknownApp = "unknown_app": "a trigger named an app this node does not run",
    UntrackedBranch = "untracked_branch": "a push to a branch no app of the repository tracks",
    MqttConfig = "mqtt_config": "the `[mqtt]` URL cannot be used",
    MqttCredentials = "mqtt_credentials": "an MQTT password, certificate or key file cannot be read",
    MqttTls = "mqtt_tls": "the MQTT TLS settings cannot be used (bad CA, certificate or key)",
    MqttConnection = "mqtt_connection": "the MQTT connection failed or dropped (it is retried)",
    Git = "git": "fetching from a Git server failed (network, server error); retried without counting",
    GitRefused = "git_refused": "a Git server refused the credentials, its certificate or its host key; not transient",
    GitRevisionNotFound = "git_revision_not_found": "the revision an app names is not in its repository",
    GitCredentials = "git_credentials": "a repository's token, password or SSH key file cannot be read",
    GitCache = "git_cache": "the local Git cache or a checkout cannot be written or read",
    Chart = "chart": "a Helm chart repository or OCI registry failed: index, version constraint, download, digest or archive",
    Signature = "signature": "a revision that must be signed is unsigned, signed by an untrusted or unlisted key, or does not verify",
    RenderPathNotFound = "render_path_not_found": "an app's path is not in its checkout",
    RenderOutsideCheckout = "render_outside_checkout": "a path (symlink, `../`, kustomization resource) leads outside the checkout",
    RenderIo = "render_io": "a file of the checkout cannot be read",
    RenderTooLarge = "render_too_large": "a file or a render is over the size limits",
    RenderParse = "render_parse": "a manifest is not valid YAML or JSON",
    RenderInvalidObject = "render_invalid_object": "a manifest is not a Kubernetes object (no apiVersion, kind or name)",
    RenderKustomize = "render_kustomize": "a kustomization cannot be built (natively, or by the configured fallback)",
    RenderUnsupported = "render_unsupported": "a source edgesync cannot render: a kustomization feature it does not build (and no fallback is configured), Jsonnet, or a config management plugin",
    RenderHelm = "render_helm": "`helm template` failed",
    RenderPlugin = "render_plugin": "a config management plugin failed, timed out, or could not be kept off the network",
    RenderSubstitution = "render_substitution": "`${VAR}` substitution failed (an unset variable with `substitute = \"strict\"`)",
    Policy = "policy": "the AppProject refuses the app's source, destination or an object's kind, or the project is not defined",
    SyncWindow = "sync_window": "a sync window cannot be read; the app is held until it is fixed",
    Conflict = "conflict": "an object of the render is managed by another app of this node",
    Hook = "hook": "a resource hook (PreSync, Sync, PostSync, SyncFail, PostDelete) failed or did not finish in time",
    KubeConfig = "kube_config": "no usable kubeconfig or in-cluster credentials",
    KubeClient = "kube_client": "the Kubernetes client cannot be built or reach the API server",
    ApplyDuplicate = "apply_duplicate": "a render holds the same object twice",
    ApplyFailed = "apply_failed": "the API server refused objects of the render, or a wave did not become Healthy",
    ApplyEmptyRender = "apply_empty_render": "a render yields no objects and the app does not set allow_empty; nothing is applied or pruned",
    PruneFailed = "prune_failed": "an object that left the render could not be deleted; the revision is not recorded",
    BadAnnotation = "bad_annotation": "an Argo CD annotation of an object (sync wave, options, hook) cannot be read",
    Inventory = "inventory": "the inventory ConfigMap cannot be read or written",
    StateLocked = "state_locked": "another edgesync process holds the state directory",
    StateIo = "state_io": "a state file cannot be written or read",
    StateCorrupt = "state_corrupt": "a state file is damaged; it is set aside and the app starts from the inventory",
    HealthRead = "health_read": "an app's objects cannot be read back to rate their health",
    Removal = "removal": "the objects of an app that left the node could not be removed",
    Fleet = "fleet": "a problem with the fleet repository: an Application that cannot be read or run, an unreachable repository",
    ControlSocket = "control_socket": "the control socket (`edgesync sync` asking the running agent) failed",
    Gate = "gate": "a rollout gate from the hub is malformed, unsigned, signed by a key not in `[gates] public_keys`, for another app, older than the gate held, or allows a revision off the tracked branch; the app keeps what it runs",
    OutboxCorrupt = "outbox_corrupt": "a damaged record in the MQTT outbox was dropped; the rest of the queue is kept",
    StatusSequence = "status_sequence": "the status sequence number cannot be saved",
    StatusOutbox = "status_outbox": "a status message cannot be queued in the outbox",
    Internal = "internal": "a bug: a task panicked or an invariant broke",
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

fn duration_histogram() -> Histogram {
    // 5 ms to about 5 minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

pub(crate) struct Metrics {
    registry: Registry,
    triggers: Family<TriggerLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    syncs: Family<SyncLabels, Counter>,
    self_heals: Family<SyncLabels, Counter>,
    sync_duration: Family<AppLabels, Histogram>,
    apply_requests: Family<RequestLabels, Counter>,
    git_fetch_duration: Histogram,
    app_info: Family<AppInfo, Gauge>,
    app_info_current: Mutex<HashMap<String, AppInfo>>,
    rounds: Counter,
    mqtt_connected: Gauge,
    status_queue_depth: Gauge,
    status_dropped: Counter,
    drift_watches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgesync");
        let triggers = Family::<TriggerLabels, Counter>::default();
        let errors = Family::<KindLabels, Counter>::default();
        // Every kind at zero from the start, so `rate()` and alerts see it before it first
        // happens.
        for kind in ErrorKind::ALL {
            let _ = errors.get_or_create(&KindLabels {
                kind: kind.label().to_string(),
            });
        }
        let syncs = Family::<SyncLabels, Counter>::default();
        let self_heals = Family::<SyncLabels, Counter>::default();
        let sync_duration = Family::<AppLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let apply_requests = Family::<RequestLabels, Counter>::default();
        let git_fetch_duration = duration_histogram();
        let app_info = Family::<AppInfo, Gauge>::default();
        let rounds = Counter::default();
        let mqtt_connected = Gauge::default();
        let status_queue_depth = Gauge::default();
        let status_dropped = Counter::default();
        let drift_watches = Gauge::default();
        registry.register(
            "drift_watches",
            "Drift watches listed and running (one per kind and namespace, or per kind cluster-wide)",
            drift_watches.clone(),
        );
        registry.register(
            "status_dropped",
            "Status events dropped because the store-and-forward queue was full",
            status_dropped.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            })
            .set(1);
        registry.register("build_info", "Version and target of this build", build_info);
        registry.register(
            "app_info",
            "One series per app with its current revision, sync state and health",
            app_info.clone(),
        );
        registry.register("sync", "App syncs by result", syncs.clone());
        registry.register(
            "self_heal",
            "Re-applies of drifted or deleted objects, by app and result",
            self_heals.clone(),
        );
        registry.register_with_unit(
            "sync_duration",
            "Duration of app syncs that reached the API server",
            prometheus_client::registry::Unit::Seconds,
            sync_duration.clone(),
        );
        registry.register(
            "apply_requests",
            "Requests to the Kubernetes API by verb and status code",
            apply_requests.clone(),
        );
        registry.register_with_unit(
            "git_fetch_duration",
            "Duration of Git network operations (ref listing and fetches)",
            prometheus_client::registry::Unit::Seconds,
            git_fetch_duration.clone(),
        );
        registry.register(
            "trigger_events",
            "Events heard by triggers, by source and result",
            triggers.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        registry.register(
            "rounds",
            "Sync rounds run (one ref listing of a repository each)",
            rounds.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected and subscribed to the MQTT broker",
            mqtt_connected.clone(),
        );
        registry.register(
            "status_queue_depth",
            "Status messages waiting to be sent upstream",
            status_queue_depth.clone(),
        );
        Metrics {
            registry,
            triggers,
            errors,
            syncs,
            self_heals,
            sync_duration,
            apply_requests,
            git_fetch_duration,
            app_info,
            app_info_current: Mutex::new(HashMap::new()),
            rounds,
            mqtt_connected,
            status_queue_depth,
            status_dropped,
            drift_watches,
        }
    }
}

impl Metrics {
    pub(crate) fn trigger(&self, source: &str, result: &str) {
        self.triggers
            .get_or_create(&TriggerLabels {
                source: source.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&KindLabels {
                kind: kind.label().to_string(),
            })
            .inc();
    }

    pub(crate) fn self_heal(&self, app: &str, ok: bool) {
        self.self_heals
            .get_or_create(&SyncLabels {
                app: app.to_string(),
                result: if ok { "healed" } else { "failed" }.to_string(),
            })
            .inc();
    }

    pub(crate) fn sync(&self, app: &str, result: &str) {
        self.syncs
            .get_or_create(&SyncLabels {
                app: app.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub(crate) fn sync_duration(&self, app: &str, took: Duration) {
        self.sync_duration
            .get_or_create(&AppLabels {
                app: app.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn apply_request(&self, verb: &str, code: Option<u16>) {
        self.apply_requests
            .get_or_create(&RequestLabels {
                verb: verb.to_string(),
                code: code.map_or_else(|| "error".to_string(), |c| c.to_string()),
            })
            .inc();
    }

    pub(crate) fn git_fetch(&self, took: Duration) {
        self.git_fetch_duration.observe(took.as_secs_f64());
    }

    /// Replaces the app's `edgesync_app_info` series.
    pub(crate) fn app_info(&self, info: AppInfo) {
        let mut current = self
            .app_info_current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.insert(info.app.clone(), info.clone()) {
            self.app_info.remove(&old);
        }
        self.app_info.get_or_create(&info).set(1);
    }

    pub(crate) fn round(&self) {
        self.rounds.inc();
    }

    pub(crate) fn set_mqtt_connected(&self, connected: bool) {
        self.mqtt_connected.set(i64::from(connected));
    }

    pub(crate) fn set_status_queue_depth(&self, depth: usize) {
        self.status_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_drift_watches(&self, n: usize) {
        self.drift_watches.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn status_dropped(&self, n: usize) {
        self.status_dropped.inc_by(n as u64);
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        let m = Metrics::default();
        m.trigger("mqtt", "malformed");
        m.trigger("mqtt", "malformed");
        m.error(ErrorKind::Git);
        m.apply_request("patch", Some(200));
        let text = m.encode();
        assert!(
            text.contains(r#"edgesync_trigger_events_total{source="mqtt",result="malformed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"edgesync_errors_total{kind="git"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"edgesync_apply_requests_total{verb="patch",code="200"} 1"#));
        assert!(text.contains("edgesync_build_info{version="), "{text}");
    }

    /// docs/METRICS.md lists exactly the kinds there are, each with its meaning, and every
    /// kind is exported before it first happens.
    #[test]
    fn error_kinds_are_the_documented_set() {
        let doc = include_str!("../docs/METRICS.md");
        let documented: Vec<(&str, &str)> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split_once("` | "))
            .filter(|(kind, _)| !kind.starts_with("edgesync_"))
            .map(|(kind, meaning)| (kind, meaning.trim_end_matches(" |")))
            .collect();
        let code: Vec<(&str, &str)> = ErrorKind::ALL
            .iter()
            .map(|k| (k.label(), k.meaning()))
            .collect();
        assert_eq!(documented, code);
        // A kind the other documents name is one there is.
        for doc in [
            include_str!("../docs/CONFIG.md"),
            include_str!("../docs/RELIABILITY.md"),
            include_str!("../docs/STATUS.md"),
            include_str!("../docs/ARCHITECTURE.md"),
        ] {
            for named in doc.split("kind=\"").skip(1) {
                let kind = named.split('"').next().unwrap_or_default();
                assert!(
                    ErrorKind::ALL.iter().any(|k| k.label() == kind),
                    "the docs name an error kind {kind:?} that does not exist"
                );
            }
        }
        let text = Metrics::default().encode();
        for kind in ErrorKind::ALL {
            let series = format!("edgesync_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} missing");
        }
    }

    #[test]
    fn app_info_keeps_one_series_per_app() {
        let m = Metrics::default();
        let info = |revision: &str| AppInfo {
            app: "web".into(),
            repo: "r".into(),
            revision: revision.into(),
            sync: "Synced".into(),
            health: "Unknown".into(),
        };
        m.app_info(info("a"));
        m.app_info(info("b"));
        let text = m.encode();
        assert_eq!(text.matches("edgesync_app_info{").count(), 1, "{text}");
        assert!(text.contains(r#"revision="b""#));
    }

    /// The shipped Grafana dashboard and alert rules only use series that exist.
    #[test]
    fn packaging_queries_name_real_series() {
        let m = Metrics::default();
        m.trigger("mqtt", "accepted");
        m.error(ErrorKind::Git);
        m.sync("web", "applied");
        m.sync_duration("web", Duration::from_millis(5));
        m.apply_request("patch", Some(200));
        m.git_fetch(Duration::from_millis(5));
        m.status_dropped(1);
        m.app_info(AppInfo {
            app: "web".into(),
            repo: "r".into(),
            revision: "x".into(),
            sync: "Synced".into(),
            health: "Healthy".into(),
        });
        let exposition = m.encode();
        let exported: std::collections::HashSet<&str> = exposition
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let root = env!("CARGO_MANIFEST_DIR");
        for file in [
            "packaging/grafana/edgesync-dashboard.json",
            "packaging/prometheus/edgesync-alerts.yaml",
        ] {
            let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
            let mut rest = text.as_str();
            let mut used = 0;
            while let Some(i) = rest.find("edgesync_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                used += 1;
                assert!(
                    exported.contains(name.as_str()),
                    "{file} uses {name}, not exported"
                );
            }
            assert!(used > 3, "{file} uses no edgesync series");
        }
        let rules: serde_json::Value = serde_saphyr::from_str(
            &std::fs::read_to_string(format!("{root}/packaging/prometheus/edgesync-alerts.yaml"))
                .unwrap(),
        )
        .unwrap();
        let alerts: Vec<&str> = rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["alert"].as_str())
            .collect();
        for wanted in [
            "EdgesyncAppDegraded",
            "EdgesyncSyncFailing",
            "EdgesyncNodeOffline",
        ] {
            assert!(alerts.contains(&wanted), "{alerts:?}");
        }
    }
}
