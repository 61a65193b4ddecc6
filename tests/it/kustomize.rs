//! The differential conformance suite: every fixture under `tests/fixtures/kustomize/` is built
//! by `kubectl kustomize` (the reference, kustomize v5) and by `edgesync render`; the objects
//! must be equal and in the same order, and a failure on one side must be a failure on the other.
//!
//! A fixture builds its own directory unless a `targets` file lists the directories to build,
//! one per line; `DIR error: TEXT` means both must fail and edgesync's error must name TEXT.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::agent::BIN;
use crate::harness::cluster::repo_root;

struct Case {
    fixture: PathBuf,
    target: PathBuf,
    error: Option<String>,
}

fn cases() -> Vec<Case> {
    let dir = repo_root().join("tests/fixtures/kustomize");
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/kustomize")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    fixtures.sort();
    let mut cases = Vec::new();
    for fixture in fixtures {
        let targets =
            std::fs::read_to_string(fixture.join("targets")).unwrap_or_else(|_| ".\n".to_string());
        for line in targets.lines().filter(|l| !l.trim().is_empty()) {
            let (target, error) = match line.split_once(" error: ") {
                Some((t, e)) => (t, Some(e.trim().to_string())),
                None => (line.trim(), None),
            };
            cases.push(Case {
                target: fixture.join(target),
                fixture: fixture.clone(),
                error,
            });
        }
    }
    cases
}

fn documents(yaml: &str, who: &str) -> Result<Vec<Value>, String> {
    let docs = edgesync::render::parse_documents(yaml, Path::new(who))
        .map_err(|e| format!("{who} printed unparsable YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Compares one case; `Err` describes the difference.
fn check(case: &Case) -> Result<(), String> {
    let reference = Command::new("kubectl")
        .arg("kustomize")
        .arg(&case.target)
        .output()
        .map_err(|e| format!("cannot run kubectl kustomize: {e}"))?;
    let ours = Command::new(BIN)
        .arg("render")
        .arg("--root")
        .arg(&case.fixture)
        .arg(&case.target)
        .output()
        .map_err(|e| format!("cannot run edgesync render: {e}"))?;
    let our_err = String::from_utf8_lossy(&ours.stderr).to_string();
    let ref_err = String::from_utf8_lossy(&reference.stderr).to_string();
    match (reference.status.success(), ours.status.success()) {
        (true, true) => {
            if case.error.is_some() {
                return Err("both succeeded, but the fixture expects an error".into());
            }
            let want = documents(&String::from_utf8_lossy(&reference.stdout), "kubectl")?;
            let got = documents(&String::from_utf8_lossy(&ours.stdout), "edgesync")?;
            let ids = |docs: &[Value]| -> Vec<String> {
                docs.iter()
                    .map(|d| format!("{}/{}", d["kind"].as_str().unwrap_or("?"), d["metadata"]["name"].as_str().unwrap_or("?")))
                    .collect()
            };
            if ids(&want) != ids(&got) {
                return Err(format!(
                    "objects differ in identity or order\n  kubectl:  {:?}\n  edgesync: {:?}",
                    ids(&want),
                    ids(&got)
                ));
            }
            for (w, g) in want.iter().zip(&got) {
                if w != g {
                    return Err(format!(
                        "{} differs\n--- kubectl\n{}\n--- edgesync\n{}",
                        ids(std::slice::from_ref(w))[0],
                        serde_json::to_string_pretty(w).unwrap(),
                        serde_json::to_string_pretty(g).unwrap()
                    ));
                }
            }
            Ok(())
        }
        (false, false) => match &case.error {
            Some(text) if !our_err.contains(text.as_str()) => Err(format!(
                "both failed, but edgesync's error does not name {text:?}: {our_err}"
            )),
            Some(_) => Ok(()),
            None => Err(format!(
                "both failed, but the fixture expects success\n  kubectl: {ref_err}\n  edgesync: {our_err}"
            )),
        },
        (true, false) => Err(format!("only edgesync failed: {our_err}")),
        (false, true) => Err(format!("only kubectl kustomize failed: {ref_err}")),
    }
}

#[test]
fn every_fixture_builds_exactly_as_kubectl_kustomize() {
    let cases = cases();
    let fixtures: std::collections::BTreeSet<_> = cases.iter().map(|c| &c.fixture).collect();
    assert!(fixtures.len() >= 40, "only {} fixtures", fixtures.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case
            .target
            .strip_prefix(repo_root().join("tests/fixtures/kustomize"))
            .unwrap_or(&case.target)
            .display()
            .to_string();
        if let Err(why) = check(case) {
            failures.push(format!("== {name}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from kubectl kustomize:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
