//! Taking over objects another tool applied client-side (Argo CD's controller, `kubectl
//! apply`): their managers' field sets become edgesync's server-side apply field set, as
//! `kubectl apply --server-side` migrates client-side-applied objects. Without it, a field such
//! a tool set and Git later drops would stay forever, owned by a manager that no longer runs.

use serde_json::{Map, Value};

/// Managers whose applies edgesync takes over: Argo CD's controller (both names it has used;
/// its client-side `Update`s and, with `ServerSideApply=true`, its `Apply`s) and `kubectl apply`.
const CLIENT_SIDE_MANAGERS: [&str; 3] = [
    "argocd-controller",
    "argocd-application-controller",
    "kubectl-client-side-apply",
];

/// `managedFields` with the entries of [`CLIENT_SIDE_MANAGERS`] merged
/// into `manager`'s `Apply` entry of the same apiVersion; `None` when there is none to take over.
pub(crate) fn migrate_managed_fields(fields: &[Value], manager: &str) -> Option<Vec<Value>> {
    let is_ours = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
    };
    let ours = fields.iter().find(|e| is_ours(e))?;
    let api_version = ours.get("apiVersion").and_then(Value::as_str)?;
    let taken = |e: &Value| {
        let operation = e.get("operation").and_then(Value::as_str);
        let by = e.get("manager").and_then(Value::as_str).unwrap_or_default();
        e.get("apiVersion").and_then(Value::as_str) == Some(api_version)
            && CLIENT_SIDE_MANAGERS.contains(&by)
            && (operation == Some("Update")
                || (operation == Some("Apply") && by.starts_with("argocd")))
    };
    if !fields.iter().any(taken) {
        return None;
    }
    let mut merged = ours
        .get("fieldsV1")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    for entry in fields.iter().filter(|e| taken(e)) {
        if let Some(theirs) = entry.get("fieldsV1") {
            merge(&mut merged, theirs);
        }
    }
    let mut ours = ours.clone();
    ours["fieldsV1"] = merged;
    Some(
        fields
            .iter()
            .filter(|e| !taken(e) && !is_ours(e))
            .cloned()
            .chain(std::iter::once(ours))
            .collect(),
    )
}

/// The union of two field sets (`fieldsV1` tries: maps of `f:`/`k:`/`v:` keys and `.`).
fn merge(into: &mut Value, from: &Value) {
    let (Value::Object(into), Value::Object(from)) = (into, from) else {
        return;
    };
    for (key, value) in from {
        match into.get_mut(key) {
            Some(existing) => merge(existing, value),
            None => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn argo_cds_fields_become_ours_and_others_stay() {
        let fields = vec![
            json!({"manager": "argocd-controller", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}, "f:b": {}},
                "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}}}}),
            json!({"manager": "edgesync", "operation": "Apply", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}}}}),
            json!({"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}),
        ];
        let migrated = migrate_managed_fields(&fields, "edgesync").unwrap();
        assert_eq!(migrated.len(), 2);
        assert_eq!(migrated[0]["manager"], "kube-controller-manager");
        let ours = &migrated[1];
        assert_eq!(ours["manager"], "edgesync");
        assert_eq!(ours["operation"], "Apply");
        assert!(ours["fieldsV1"]["f:data"]["f:b"].is_object());
        assert!(ours["fieldsV1"]["f:metadata"]["f:annotations"]
            ["f:kubectl.kubernetes.io/last-applied-configuration"]
            .is_object());
        // Nothing to take over: nothing changes.
        assert!(migrate_managed_fields(&migrated, "edgesync").is_none());
    }
}
