//! Health stage: how healthy an applied object is, by the rules Argo CD uses per kind, and
//! kstatus conventions (`Ready`, `Stalled`, `observedGeneration`) for everything else. Pure:
//! it reads objects as JSON and returns values. An app's health is the worst of its objects'.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Ordered from best to worst, as Argo CD orders them for the worst-of rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) enum HealthStatus {
    Healthy,
    Suspended,
    Progressing,
    Missing,
    Degraded,
    Unknown,
}

impl HealthStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "Healthy",
            HealthStatus::Suspended => "Suspended",
            HealthStatus::Progressing => "Progressing",
            HealthStatus::Missing => "Missing",
            HealthStatus::Degraded => "Degraded",
            HealthStatus::Unknown => "Unknown",
        }
    }
}

/// One object's health and, when not healthy, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) status: HealthStatus,
    pub(crate) message: String,
}

fn health(status: HealthStatus, message: impl Into<String>) -> Health {
    Health {
        status,
        message: message.into(),
    }
}

fn int(v: &Value, pointer: &str) -> Option<i64> {
    v.pointer(pointer).and_then(Value::as_i64)
}

fn string<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn condition<'a>(v: &'a Value, kind: &str) -> Option<&'a Value> {
    v.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn condition_is(v: &Value, kind: &str, status: &str) -> bool {
    condition(v, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some(status)
}

fn condition_message(v: &Value, kind: &str) -> String {
    condition(v, kind)
        .and_then(|c| c.get("message").or_else(|| c.get("reason")))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The controller has not seen the latest spec yet.
fn generation_pending(v: &Value) -> bool {
    match (
        int(v, "/metadata/generation"),
        int(v, "/status/observedGeneration"),
    ) {
        (Some(generation), Some(observed)) => observed < generation,
        (Some(_), None) => v.get("status").is_none_or(Value::is_null),
        _ => false,
    }
}

/// The health of one live object.
pub(crate) fn assess(object: &Value) -> Health {
    let group = string(object, "/apiVersion")
        .and_then(|a| a.rsplit_once('/').map(|(g, _)| g))
        .unwrap_or("");
    match (group, string(object, "/kind").unwrap_or("")) {
        ("apps", "Deployment") => deployment(object),
        ("apps", "StatefulSet") => stateful_set(object),
        ("apps", "DaemonSet") => daemon_set(object),
        ("apps", "ReplicaSet") => replica_set(object),
        ("", "Pod") => pod(object),
        ("batch", "Job") => job(object),
        ("", "PersistentVolumeClaim") => pvc(object),
        ("", "Service") => service(object),
        ("networking.k8s.io", "Ingress") => load_balanced(object, "ingress"),
        ("autoscaling", "HorizontalPodAutoscaler") => hpa(object),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => crd(object),
        ("apiregistration.k8s.io", "APIService") => api_service(object),
        _ => kstatus(object),
    }
}

fn deployment(d: &Value) -> Health {
    if d.pointer("/spec/paused").and_then(Value::as_bool) == Some(true) {
        return health(HealthStatus::Suspended, "deployment is paused");
    }
    if generation_pending(d) {
        return health(
            HealthStatus::Progressing,
            "waiting for the rollout to start",
        );
    }
    if condition(d, "Progressing")
        .and_then(|c| c.get("reason"))
        .and_then(Value::as_str)
        == Some("ProgressDeadlineExceeded")
    {
        return health(HealthStatus::Degraded, condition_message(d, "Progressing"));
    }
    let wanted = int(d, "/spec/replicas").unwrap_or(1);
    let updated = int(d, "/status/updatedReplicas").unwrap_or(0);
    let total = int(d, "/status/replicas").unwrap_or(0);
    let available = int(d, "/status/availableReplicas").unwrap_or(0);
    if updated < wanted {
        return health(
            HealthStatus::Progressing,
            format!("{updated} of {wanted} new replicas updated"),
        );
    }
    if total > updated {
        return health(
            HealthStatus::Progressing,
            format!("{} old replicas are pending termination", total - updated),
        );
    }
    if available < updated {
        return health(
            HealthStatus::Progressing,
            format!("{available} of {updated} updated replicas available"),
        );
    }
    health(HealthStatus::Healthy, "")
}

fn stateful_set(s: &Value) -> Health {
    if generation_pending(s) {
        return health(
            HealthStatus::Progressing,
            "waiting for the rollout to start",
        );
    }
    let wanted = int(s, "/spec/replicas").unwrap_or(1);
    let ready = int(s, "/status/readyReplicas").unwrap_or(0);
    let updated = int(s, "/status/updatedReplicas").unwrap_or(0);
    if ready < wanted || updated < wanted {
        return health(
            HealthStatus::Progressing,
            format!("{ready} of {wanted} replicas ready, {updated} updated"),
        );
    }
    health(HealthStatus::Healthy, "")
}

fn daemon_set(d: &Value) -> Health {
    if generation_pending(d) {
        return health(
            HealthStatus::Progressing,
            "waiting for the rollout to start",
        );
    }
    let desired = int(d, "/status/desiredNumberScheduled").unwrap_or(0);
    let updated = int(d, "/status/updatedNumberScheduled").unwrap_or(0);
    let available = int(d, "/status/numberAvailable").unwrap_or(0);
    if updated < desired || available < desired {
        return health(
            HealthStatus::Progressing,
            format!("{available} of {desired} pods available, {updated} updated"),
        );
    }
    health(HealthStatus::Healthy, "")
}

fn replica_set(r: &Value) -> Health {
    if generation_pending(r) {
        return health(HealthStatus::Progressing, "waiting for the controller");
    }
    if condition_is(r, "ReplicaFailure", "True") {
        return health(
            HealthStatus::Degraded,
            condition_message(r, "ReplicaFailure"),
        );
    }
    let wanted = int(r, "/spec/replicas").unwrap_or(1);
    let available = int(r, "/status/availableReplicas").unwrap_or(0);
    if available < wanted {
        return health(
            HealthStatus::Progressing,
            format!("{available} of {wanted} replicas available"),
        );
    }
    health(HealthStatus::Healthy, "")
}

/// Container states that will not fix themselves.
const STUCK: [&str; 5] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
];

fn pod(p: &Value) -> Health {
    match string(p, "/status/phase").unwrap_or("Pending") {
        "Succeeded" => return health(HealthStatus::Healthy, "completed"),
        "Failed" => {
            return health(
                HealthStatus::Degraded,
                string(p, "/status/message").unwrap_or("pod failed"),
            )
        }
        _ => {}
    }
    let statuses = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &statuses {
        if let Some(reason) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            if STUCK.contains(&reason) {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("container");
                return health(HealthStatus::Degraded, format!("{name}: {reason}"));
            }
        }
    }
    if condition_is(p, "Ready", "True") {
        return health(HealthStatus::Healthy, "");
    }
    health(HealthStatus::Progressing, "pod is not ready")
}

fn job(j: &Value) -> Health {
    if j.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
        return health(HealthStatus::Suspended, "job is suspended");
    }
    if condition_is(j, "Failed", "True") {
        return health(HealthStatus::Degraded, condition_message(j, "Failed"));
    }
    if condition_is(j, "Complete", "True") {
        return health(HealthStatus::Healthy, "");
    }
    health(HealthStatus::Progressing, "job is running")
}

fn pvc(p: &Value) -> Health {
    match string(p, "/status/phase") {
        Some("Bound") => health(HealthStatus::Healthy, ""),
        Some("Lost") => health(HealthStatus::Degraded, "claim lost its volume"),
        _ => health(HealthStatus::Progressing, "waiting for a volume"),
    }
}

fn service(s: &Value) -> Health {
    if string(s, "/spec/type") == Some("LoadBalancer") {
        return load_balanced(s, "load balancer");
    }
    health(HealthStatus::Healthy, "")
}

fn load_balanced(o: &Value, what: &str) -> Health {
    let has_ingress = o
        .pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if has_ingress {
        health(HealthStatus::Healthy, "")
    } else {
        health(
            HealthStatus::Progressing,
            format!("waiting for a {what} address"),
        )
    }
}

fn hpa(h: &Value) -> Health {
    for kind in ["AbleToScale", "ScalingActive"] {
        if condition_is(h, kind, "False") {
            let reason = condition(h, kind)
                .and_then(|c| c.get("reason"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            // An HPA whose target is scaled to zero on purpose is not broken.
            if reason != "ScalingDisabled" {
                return health(HealthStatus::Degraded, condition_message(h, kind));
            }
        }
    }
    health(HealthStatus::Healthy, "")
}

fn crd(c: &Value) -> Health {
    if condition_is(c, "NamesAccepted", "False") {
        return health(
            HealthStatus::Degraded,
            condition_message(c, "NamesAccepted"),
        );
    }
    if condition_is(c, "Established", "True") {
        return health(HealthStatus::Healthy, "");
    }
    health(HealthStatus::Progressing, "waiting to be established")
}

fn api_service(a: &Value) -> Health {
    if condition_is(a, "Available", "True") {
        health(HealthStatus::Healthy, "")
    } else {
        health(HealthStatus::Progressing, condition_message(a, "Available"))
    }
}

/// kstatus conventions for kinds without a rule of their own.
fn kstatus(o: &Value) -> Health {
    if generation_pending(o) && o.pointer("/status/observedGeneration").is_some() {
        return health(
            HealthStatus::Progressing,
            "the controller has not seen the latest spec",
        );
    }
    if condition_is(o, "Stalled", "True") {
        return health(HealthStatus::Degraded, condition_message(o, "Stalled"));
    }
    if condition_is(o, "Reconciling", "True") {
        return health(
            HealthStatus::Progressing,
            condition_message(o, "Reconciling"),
        );
    }
    if condition_is(o, "Ready", "False") {
        return health(HealthStatus::Progressing, condition_message(o, "Ready"));
    }
    health(HealthStatus::Healthy, "")
}

/// The worst of several healths, keeping the message of the worst one.
pub(crate) fn worst(healths: impl IntoIterator<Item = Health>) -> Health {
    healths
        .into_iter()
        .max_by_key(|h| h.status)
        .unwrap_or_else(|| health(HealthStatus::Healthy, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status_of(v: Value) -> HealthStatus {
        assess(&v).status
    }

    #[test]
    fn deployment_rollout() {
        let base = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"generation": 2}, "spec": {"replicas": 2}});
        let mut d = base.clone();
        d["status"] = json!({"observedGeneration": 1});
        assert_eq!(status_of(d), HealthStatus::Progressing);
        let mut d = base.clone();
        d["status"] = json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2});
        assert_eq!(
            status_of(d),
            HealthStatus::Progressing,
            "old replica still terminating"
        );
        let mut d = base.clone();
        d["status"] = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2});
        assert_eq!(status_of(d), HealthStatus::Healthy);
        let mut d = base.clone();
        d["status"] = json!({"observedGeneration": 2, "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": "ReplicaSet \"web-1\" has timed out progressing."}]});
        let h = assess(&d);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert!(h.message.contains("timed out"));
        let mut d = base;
        d["spec"]["paused"] = json!(true);
        assert_eq!(status_of(d), HealthStatus::Suspended);
    }

    #[test]
    fn pods_that_cannot_start_are_degraded() {
        let p = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running",
            "containerStatuses": [{"name": "app", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        assert_eq!(assess(&p).message, "app: CrashLoopBackOff");
        assert_eq!(assess(&p).status, HealthStatus::Degraded);
        let ready = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(status_of(ready), HealthStatus::Healthy);
        let done = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Succeeded"}});
        assert_eq!(status_of(done), HealthStatus::Healthy);
    }

    #[test]
    fn jobs_claims_services_and_crds() {
        let job = |c: &str| {
            json!({"apiVersion": "batch/v1", "kind": "Job",
            "status": {"conditions": [{"type": c, "status": "True"}]}})
        };
        assert_eq!(status_of(job("Complete")), HealthStatus::Healthy);
        assert_eq!(status_of(job("Failed")), HealthStatus::Degraded);
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "status": {"phase": "Pending"}});
        assert_eq!(status_of(pvc), HealthStatus::Progressing);
        let lb = json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "LoadBalancer"}, "status": {}});
        assert_eq!(status_of(lb), HealthStatus::Progressing);
        let cip = json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "ClusterIP"}});
        assert_eq!(status_of(cip), HealthStatus::Healthy);
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "status": {"conditions": [{"type": "Established", "status": "True"}]}});
        assert_eq!(status_of(crd), HealthStatus::Healthy);
    }

    #[test]
    fn other_kinds_follow_kstatus() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(status_of(cm), HealthStatus::Healthy);
        let stalled = json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "status": {"conditions": [{"type": "Stalled", "status": "True", "message": "quota"}]}});
        assert_eq!(status_of(stalled), HealthStatus::Degraded);
        let not_ready = json!({"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"generation": 1}, "status": {"observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(status_of(not_ready), HealthStatus::Progressing);
    }

    #[test]
    fn app_health_is_the_worst() {
        let h = |s| Health {
            status: s,
            message: format!("{s:?}"),
        };
        let w = worst([
            h(HealthStatus::Healthy),
            h(HealthStatus::Degraded),
            h(HealthStatus::Progressing),
        ]);
        assert_eq!(w.status, HealthStatus::Degraded);
        assert_eq!(worst([]).status, HealthStatus::Healthy);
        assert!(HealthStatus::Missing > HealthStatus::Progressing);
    }
}
