//! Semantic checks of a well-formed config file: each problem names its key and line, and
//! all problems are reported at once.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::load::RawConfig;
use super::{AppConfig, MqttConfig, Problem, RepositoryConfig, WebhookConfig};

pub(super) fn validate(raw: &RawConfig, text: &str, base: &Path) -> Vec<Problem> {
    let mut c = Checker {
        text,
        base,
        problems: Vec::new(),
    };
    if let Some(n) = &raw.max_concurrent_syncs {
        if *n.get_ref() == 0 {
            c.push(&n.span(), "max_concurrent_syncs", "must be at least 1");
        }
    }
    // The node name becomes part of MQTT topics and object names: topic syntax (`+`, `#`,
    // `/`) would let it subscribe to, or publish on, other nodes' topics.
    let node = &raw.node.name;
    let bad = node
        .chars()
        .find(|c| matches!(c, '+' | '#' | '/') || c.is_control() || c.is_whitespace());
    if bad.is_some() || node.len() > 253 {
        let at = text.find("[node]").unwrap_or(0);
        c.push(
            &(at..at),
            "node.name",
            match bad {
                Some(c) => format!(
                    "must not contain {c:?}: the node name is part of MQTT topics and object names"
                ),
                None => "is longer than 253 characters".to_string(),
            },
        );
    }
    if let Some(k) = &raw.kubernetes {
        c.file(
            &k.span(),
            "kubernetes.kubeconfig".into(),
            &k.get_ref().kubeconfig,
        );
    }
    if let Some(mqtt) = &raw.mqtt {
        c.mqtt(mqtt);
    }
    if let Some(webhook) = &raw.webhook {
        c.webhook(webhook);
    }
    if let Some(fleet) = &raw.fleet {
        c.fleet(fleet);
    }
    if let Some(signatures) = &raw.signatures {
        c.signatures(signatures, raw.fleet.is_some());
    }
    let mut urls = HashSet::new();
    for (i, repo) in raw.repositories.iter().enumerate() {
        c.repository(i, repo, &mut urls);
    }
    for (name, span) in raw
        .variables
        .iter()
        .flat_map(|v| v.get_ref().keys().map(move |k| (k, v.span())))
    {
        if !super::options::valid_name(name) {
            c.push(
                &span,
                "variables",
                format!("{name:?} is not a variable name (letters, digits and _)"),
            );
        }
    }
    if let Some(gates) = &raw.gates {
        c.gates(gates, raw.mqtt.is_some());
    }
    let mut names = HashSet::new();
    for (i, app) in raw.apps.iter().enumerate() {
        c.app(i, app, &mut names);
        let a = app.get_ref();
        if a.gated && raw.gates.is_none() {
            c.push(
                &app.span(),
                format!("apps[{i}].gated"),
                "needs a [gates] table: the hub's keys",
            );
        }
        if a.gated && a.chart.is_some() {
            c.push(
                &app.span(),
                format!("apps[{i}].gated"),
                "gates hold Git revisions; a chart app cannot be gated",
            );
        }
    }
    let mut plugins = HashSet::new();
    for (i, plugin) in raw.plugins.iter().enumerate() {
        let (span, p) = (plugin.span(), plugin.get_ref());
        let key = |field: &str| format!("plugins[{i}].{field}");
        if let Err(e) = check_dns_name(&p.name) {
            c.push(&span, key("name"), e);
        }
        if !plugins.insert(p.name.clone()) {
            c.push(
                &span,
                key("name"),
                format!("duplicate plugin name {:?}", p.name),
            );
        }
        if p.generate.first().is_none_or(|c| c.trim().is_empty()) {
            c.push(&span, key("generate"), "must name a command");
        }
        if p.timeout.is_zero() {
            c.push(&span, key("timeout"), "must be greater than zero");
        }
    }
    for (i, app) in raw.apps.iter().enumerate() {
        if let Some(name) = &app.get_ref().plugin {
            if !plugins.contains(name) {
                c.push(
                    &app.span(),
                    format!("apps[{i}].plugin"),
                    format!("no [[plugins]] entry is named {name:?}"),
                );
            }
        }
    }
    c.problems.sort_by_key(|p| p.line);
    c.problems
}

/// The 1-based line of byte `offset` in `text`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

struct Checker<'a> {
    text: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn push(&mut self, span: &Range<usize>, key: impl Into<String>, message: impl fmt::Display) {
        let line = line_at(self.text, span.start);
        self.problems.push(Problem {
            line,
            key: key.into(),
            message: message.to_string(),
        });
    }

    /// Files named in the config must exist when it is loaded.
    fn file(&mut self, span: &Range<usize>, key: String, file: &Option<PathBuf>) {
        if let Some(file) = file {
            match super::resolve_file(self.base, file) {
                Ok(full) if full.is_file() => {}
                Ok(full) => self.push(span, key, format!("file {} does not exist", full.display())),
                Err(message) => self.push(span, key, message),
            }
        }
    }

    fn mqtt(&mut self, mqtt: &Spanned<MqttConfig>) {
        let (span, m) = (mqtt.span(), mqtt.get_ref());
        if let Err(msg) = crate::model::url::parse_broker_url(&m.url) {
            self.push(&span, "mqtt.url", msg.to_string());
        }
        for (field, file) in [
            ("password_file", &m.password_file),
            ("ca_file", &m.ca_file),
            ("cert_file", &m.cert_file),
            ("key_file", &m.key_file),
        ] {
            self.file(&span, format!("mqtt.{field}"), file);
        }
        if m.cert_file.is_some() != m.key_file.is_some() {
            self.push(
                &span,
                "mqtt.cert_file",
                "cert_file and key_file go together",
            );
        }
        if m.password_file.is_some() && m.username.is_none() {
            self.push(&span, "mqtt.username", "password_file needs a username");
        }
        if m.password_file.is_some()
            && !m.url.to_ascii_lowercase().starts_with("mqtts://")
            && !m.insecure_password
        {
            self.push(
                &span,
                "mqtt.password_file",
                "the password would cross the network unencrypted over mqtt://; use mqtts://, \
                 or set insecure_password = true to send it anyway",
            );
        }
        if m.topics.is_empty() || m.topics.iter().any(|t| t.is_empty()) {
            self.push(&span, "mqtt.topics", "needs at least one non-empty topic");
        }
    }

    fn webhook(&mut self, webhook: &Spanned<WebhookConfig>) {
        let (span, w) = (webhook.span(), webhook.get_ref());
        let secrets = [
            ("github_secret_file", &w.github_secret_file),
            ("gitlab_token_file", &w.gitlab_token_file),
            ("gitea_secret_file", &w.gitea_secret_file),
            ("bitbucket_secret_file", &w.bitbucket_secret_file),
            ("generic_secret_file", &w.generic_secret_file),
        ];
        for (field, file) in secrets {
            self.file(&span, format!("webhook.{field}"), file);
        }
        if !w.insecure_no_secret && secrets.iter().all(|(_, f)| f.is_none()) {
            self.push(
                &span,
                "webhook",
                "a webhook listener needs at least one *_secret_file (or *_token_file); set insecure_no_secret = true to accept unsigned requests",
            );
        }
        if w.max_body_bytes == 0
            || !w.rate_limit.is_finite()
            || w.rate_limit <= 0.0
            || w.rate_burst == 0
            || w.max_connections == 0
            || w.max_connections_per_client == 0
        {
            self.push(
                &span,
                "webhook",
                "max_body_bytes, rate_limit, rate_burst, max_connections and \
                 max_connections_per_client must be greater than zero",
            );
        }
    }

    fn repository(
        &mut self,
        i: usize,
        repo: &Spanned<RepositoryConfig>,
        urls: &mut HashSet<String>,
    ) {
        let (span, r) = (repo.span(), repo.get_ref());
        let key = |field: &str| format!("repositories[{i}].{field}");
        if let Err(msg) = check_repo_url(&r.url).or_else(|msg| {
            if crate::model::url::is_oci(&r.url) {
                Ok(())
            } else {
                Err(msg)
            }
        }) {
            self.push(&span, key("url"), msg);
        }
        if !urls.insert(r.url.clone()) {
            self.push(
                &span,
                key("url"),
                format!("duplicate repository {:?}", r.url),
            );
        }
        for (field, file) in [
            ("token_file", &r.token_file),
            ("password_file", &r.password_file),
            ("ssh_key_file", &r.ssh_key_file),
            ("known_hosts_file", &r.known_hosts_file),
        ] {
            self.file(&span, key(field), file);
        }
        if r.token_file.is_some() && (r.password_file.is_some() || r.ssh_key_file.is_some()) {
            self.push(
                &span,
                key("token_file"),
                "use one of token_file, username + password_file, or ssh_key_file",
            );
        }
        if r.password_file.is_some() && r.username.is_none() {
            self.push(&span, key("username"), "password_file needs a username");
        }
        if r.ssh_key_file.is_some() && r.known_hosts_file.is_none() {
            self.push(
                &span,
                key("known_hosts_file"),
                "ssh_key_file needs known_hosts_file: host keys are always verified",
            );
        }
    }

    fn signatures(&mut self, signatures: &Spanned<super::SignaturesConfig>, has_fleet: bool) {
        let (span, s) = (signatures.span(), signatures.get_ref());
        for (field, files) in [("gpg_keys", &s.gpg_keys), ("ssh_keys", &s.ssh_keys)] {
            for (i, file) in files.iter().enumerate() {
                self.file(
                    &span,
                    format!("signatures.{field}[{i}]"),
                    &Some(file.clone()),
                );
            }
        }
        if s.fleet && s.gpg_keys.is_empty() && s.ssh_keys.is_empty() {
            self.push(
                &span,
                "signatures.fleet",
                "needs at least one key in gpg_keys or ssh_keys",
            );
        }
        if s.fleet && !has_fleet {
            self.push(&span, "signatures.fleet", "there is no [fleet] to verify");
        }
    }

    fn gates(&mut self, gates: &Spanned<super::GatesConfig>, has_mqtt: bool) {
        let (span, g) = (gates.span(), gates.get_ref());
        if g.public_keys.is_empty() {
            self.push(
                &span,
                "gates.public_keys",
                "needs at least one key of the hub",
            );
        }
        for (i, key) in g.public_keys.iter().enumerate() {
            if let Err(e) = super::gate_key(key) {
                self.push(&span, format!("gates.public_keys[{i}]"), e);
            }
        }
        let topic = g.topic.trim_end_matches('/');
        if topic.is_empty() || topic.contains(['+', '#']) {
            self.push(
                &span,
                "gates.topic",
                "must be a topic without wildcards (the app's name is appended)",
            );
        }
        if !has_mqtt {
            self.push(
                &span,
                "gates",
                "gates come over MQTT: needs an [mqtt] table",
            );
        }
    }

    fn fleet(&mut self, fleet: &Spanned<super::FleetConfig>) {
        let (span, f) = (fleet.span(), fleet.get_ref());
        if let Err(msg) = check_repo_url(&f.repo) {
            self.push(&span, "fleet.repo", msg);
        }
        if let Err(msg) = check_relative_path(&f.path) {
            self.push(&span, "fleet.path", msg);
        }
        if f.kustomize_fallback
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            self.push(&span, "fleet.kustomize_fallback", "must name a command");
        }
    }

    fn app(&mut self, i: usize, app: &Spanned<AppConfig>, names: &mut HashSet<String>) {
        let (span, a) = (app.span(), app.get_ref());
        let key = |field: &str| format!("apps[{i}].{field}");
        if let Err(msg) = check_dns_name(&a.name) {
            self.push(&span, key("name"), msg);
        }
        if !names.insert(a.name.clone()) {
            self.push(
                &span,
                key("name"),
                format!("duplicate app name {:?}", a.name),
            );
        }
        if let Err((field, msg)) = check_source(a) {
            self.push(&span, key(field), msg);
        }
        if a.revision.trim().is_empty() {
            self.push(&span, key("revision"), "must not be empty");
        }
        if let Err(msg) = check_relative_path(&a.path) {
            self.push(&span, key("path"), msg);
        }
        if let Some(ns) = &a.namespace {
            if let Err(msg) = check_dns_label(ns) {
                self.push(&span, key("namespace"), msg);
            }
        }
        if let Some(selector) = &a.node_selector {
            if let Err(e) = crate::model::selector::Selector::parse(selector) {
                self.push(&span, key("node_selector"), e.reason);
            }
        }
        for name in a.variables.keys() {
            if !super::options::valid_name(name) {
                self.push(
                    &span,
                    key("variables"),
                    format!("{name:?} is not a variable name (letters, digits and _)"),
                );
            }
        }
        if a.creates_namespace() && a.namespace.is_none() {
            self.push(
                &span,
                key("create_namespace"),
                "needs a namespace to create",
            );
        }
        if let Err((field, msg)) = check_sync_policy(a) {
            self.push(&span, key(field), msg);
        }
        if let Err((field, msg)) = check_sources(a) {
            self.push(&span, key(&field), msg);
        }
    }
}

/// The app's other sources (`sources`): `(field, problem)` for the first problem.
fn check_sources(a: &AppConfig) -> Result<(), (String, Invalid)> {
    let mut refs = HashSet::new();
    for (i, s) in a.sources.iter().enumerate() {
        let field = |name: &str| format!("sources[{i}].{name}");
        let chart_repo = ["https://", "http://", "oci://"]
            .iter()
            .any(|p| s.repo.starts_with(p));
        match &s.chart {
            Some(chart) if !is_chart_name(chart) => {
                return Err((field("chart"), Invalid::ChartName(chart.clone())));
            }
            Some(_) if !chart_repo => {
                return Err((field("repo"), Invalid::ChartRepository(s.repo.clone())));
            }
            Some(_) => {}
            None => check_repo_url(&s.repo).map_err(|e| (field("repo"), e))?,
        }
        if let Some(path) = &s.path {
            check_relative_path(path).map_err(|e| (field("path"), e))?;
        }
        if let Some(name) = &s.ref_name {
            check_dns_label(name).map_err(|e| (field("ref"), e))?;
            if !refs.insert(name) {
                return Err((field("ref"), Invalid::DuplicateRef(name.clone())));
            }
        }
    }
    Ok(())
}

fn is_chart_name(chart: &str) -> bool {
    !(chart.is_empty() || chart.contains(['/', '\\', ' ', ':', '@']) || chart.starts_with('.'))
}

/// The checks of an `[[apps]]` entry, for apps that come from elsewhere (the fleet repo):
/// the first problem found.
pub(super) fn check_app(a: &AppConfig) -> Result<(), Invalid> {
    check_dns_name(&a.name)?;
    check_source(a).map_err(|(field, message)| Invalid::Field { field, message })?;
    check_relative_path(&a.path)?;
    if let Some(ns) = &a.namespace {
        check_dns_label(ns)?;
    }
    if let Some(selector) = &a.node_selector {
        crate::model::selector::Selector::parse(selector)?;
    }
    if a.creates_namespace() && a.namespace.is_none() {
        return Err(Invalid::NamespaceToCreate);
    }
    check_sync_policy(a).map_err(|(field, message)| Invalid::Field { field, message })?;
    check_sources(a).map_err(|(field, source)| Invalid::Source {
        field,
        source: Box::new(source),
    })?;
    Ok(())
}

/// What is wrong with one value: of the config file, or of an app from the fleet repository.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    #[error(
        "{0:?} must be lowercase letters, digits, '-' or '.', start and end alphanumeric, at most 253 characters"
    )]
    DnsName(String),
    #[error("{0:?} must be a DNS label: lowercase letters, digits and '-', at most 63 characters")]
    DnsLabel(String),
    #[error(
        "{0:?} is not a Git URL (https://, http://, ssh://, git://, file:// or user@host:path)"
    )]
    GitUrl(String),
    #[error("{0:?} must be relative to the repository root")]
    AbsolutePath(String),
    #[error("{0:?} must not contain '..'")]
    ParentDir(String),
    #[error("{0:?} is not Name=value")]
    SyncOptionSyntax(String),
    #[error("unknown sync option {name:?} (known: {})", super::sync_policy::KNOWN_SYNC_OPTIONS.join(", "))]
    UnknownSyncOption { name: String },
    #[error("{option:?}: unsupported value {value:?}")]
    SyncOptionValue { option: String, value: String },
    #[error(
        "{0} names a systemd credential, but $CREDENTIALS_DIRECTORY is not set (systemd sets it for a unit with LoadCredential=)"
    )]
    NoCredentialsDirectory(String),
    #[error(transparent)]
    Selector(#[from] crate::model::selector::SelectorError),
    #[error("{0:?} is not a chart name")]
    ChartName(String),
    #[error("{0:?} is not a chart repository (https:// or http:// with an index.yaml, or oci://)")]
    ChartRepository(String),
    #[error("another source already has ref {0:?}")]
    DuplicateRef(String),
    #[error("{field}: {source}")]
    Source { field: String, source: Box<Invalid> },
    #[error("the name {0:?} is already used by another app")]
    NameTaken(String),
    #[error("CreateNamespace=true needs a destination namespace")]
    NamespaceToCreate,
    #[error("{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

/// Sync options, retry, windows and timeouts: `(field, problem)` for the first problem.
fn check_sync_policy(a: &AppConfig) -> Result<(), (&'static str, String)> {
    for option in &a.sync_options {
        super::sync_policy::check_sync_option(option)
            .map_err(|e| ("sync_options", e.to_string()))?;
    }
    if a.retry.backoff.factor == 0 {
        return Err(("retry", "backoff.factor must be at least 1".into()));
    }
    if a.retry.limit < -1 {
        return Err(("retry", "limit must be -1 (unlimited) or more".into()));
    }
    if a.health_timeout.is_some_and(|t| t.is_zero()) {
        return Err(("health_timeout", "must be greater than zero".into()));
    }
    for w in &a.sync_windows {
        crate::model::window::Window::new(w).map_err(|e| ("sync_windows", e.to_string()))?;
    }
    for i in &a.ignore_differences {
        for pointer in &i.json_pointers {
            if !pointer.starts_with('/') {
                return Err((
                    "ignore_differences",
                    format!("{pointer:?} is not a JSON pointer (it starts with /)"),
                ));
            }
        }
    }
    Ok(())
}

/// An app's source: a Git URL, or a chart in a Helm repository or OCI registry.
fn check_source(a: &AppConfig) -> Result<(), (&'static str, String)> {
    let Some(chart) = &a.chart else {
        return check_repo_url(&a.repo).map_err(|e| ("repo", e.to_string()));
    };
    if !is_chart_name(chart) {
        return Err(("chart", Invalid::ChartName(chart.clone()).to_string()));
    }
    if !["https://", "http://", "oci://"]
        .iter()
        .any(|p| a.repo.starts_with(p))
    {
        return Err(("repo", Invalid::ChartRepository(a.repo.clone()).to_string()));
    }
    Ok(())
}

pub(super) fn check_repo_url(url: &str) -> Result<(), Invalid> {
    let ok = ["https://", "http://", "ssh://", "file://", "git://"]
        .iter()
        .any(|p| url.starts_with(p))
        || is_scp_like(url);
    if ok {
        Ok(())
    } else {
        Err(Invalid::GitUrl(url.to_string()))
    }
}

/// `git@host:org/repo.git`, the scp-like form users copy from Git hosting pages.
pub(crate) fn is_scp_like(url: &str) -> bool {
    match (url.find('@'), url.find(':')) {
        (Some(at), Some(colon)) => at < colon && !url[..colon].contains('/'),
        _ => false,
    }
}

/// App names become file names and Kubernetes annotation values, so they follow the
/// DNS subdomain rules Kubernetes uses for object names.
pub(crate) fn check_dns_name(name: &str) -> Result<(), Invalid> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(Invalid::DnsName(name.to_string()))
    }
}

pub(crate) fn check_dns_label(name: &str) -> Result<(), Invalid> {
    if name.len() <= 63 && !name.contains('.') && check_dns_name(name).is_ok() {
        Ok(())
    } else {
        Err(Invalid::DnsLabel(name.to_string()))
    }
}

fn check_relative_path(path: &str) -> Result<(), Invalid> {
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(Invalid::AbsolutePath(path.to_string()));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Invalid::ParentDir(path.to_string()));
    }
    Ok(())
}
