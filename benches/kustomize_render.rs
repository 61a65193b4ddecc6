//! Kustomize render speed, side by side in one run: `edgesync render` against
//! `kubectl kustomize` as whole processes, over every passing conformance fixture and over one
//! large overlay (about 2,000 objects), plus the engine's in-process time for the same builds.
//! The outputs are checked to be identical before anything is timed.
//!
//! Run with `cargo bench --bench kustomize_render` (release build). Under `cargo test` it does
//! nothing. Figures go to docs/BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
const APPS: usize = 400;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn kubectl(dir: &Path) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn edgesync(root: &Path, dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgesync"))
        .arg("render")
        .arg("--root")
        .arg(root)
        .arg(dir)
        .output()
        .expect("run edgesync");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    edgesync::render::parse_documents(yaml, Path::new("out"))
        .expect("YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// A base of `APPS` apps (Deployment, Service, ConfigMap, ServiceAccount, HPA: 5 objects
/// each) and an overlay with a namespace, prefix, labels, images, replicas, a patch on every
/// Deployment and a generator: about 2,000 objects.
fn large_overlay(root: &Path) -> PathBuf {
    let base = root.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let mut resources = String::from("resources:\n");
    for i in 0..APPS {
        let file = format!("app-{i}.yaml");
        std::fs::write(
            base.join(&file),
            format!(
                r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: app-{i}
  labels: {{app: app-{i}}}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: app-{i}}}
  template:
    metadata:
      labels: {{app: app-{i}}}
    spec:
      serviceAccountName: app-{i}
      containers:
        - name: app
          image: registry.example.com/app:1.0
          envFrom:
            - configMapRef: {{name: app-{i}}}
          ports:
            - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: app-{i}
spec:
  selector: {{app: app-{i}}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: app-{i}
data:
  INDEX: "{i}"
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: app-{i}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: app-{i}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: app-{i}}}
  minReplicas: 1
  maxReplicas: 3
"#
            ),
        )
        .unwrap();
        resources.push_str(&format!("  - {file}\n"));
    }
    std::fs::write(base.join("kustomization.yaml"), resources).unwrap();
    let overlay = root.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        r#"resources: [../base]
namespace: bench
namePrefix: edge-
commonLabels:
  site: plant-7
images:
  - name: registry.example.com/app
    newTag: "2.0"
replicas:
  - name: app-0
    count: 3
patches:
  - target: {kind: Deployment}
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {name: any}
      spec:
        template:
          spec:
            nodeSelector: {kubernetes.io/arch: arm64}
configMapGenerator:
  - name: shared
    literals: [A=1, B=2]
"#,
    )
    .unwrap();
    overlay
}

/// The conformance fixtures both sides build successfully, except those inflating charts
/// (their time is helm's, the same on both sides).
fn fixtures() -> Vec<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kustomize");
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for fixture in entries {
        if fixture.join("enable-helm").exists() {
            continue;
        }
        let targets = std::fs::read_to_string(fixture.join("targets")).unwrap_or(".".into());
        for line in targets.lines().filter(|l| !l.contains(" error: ")) {
            out.push((fixture.clone(), fixture.join(line.trim())));
        }
    }
    out
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let overlay = large_overlay(tmp.path());
    let cases = fixtures();

    // Identical output first, or the timing means nothing.
    let (ok_k, want) = kubectl(&overlay);
    let (ok_e, got) = edgesync(tmp.path(), &overlay);
    assert!(ok_k && ok_e, "the large overlay must build on both sides");
    let (want, got) = (docs(&want), docs(&got));
    assert_eq!(want.len(), got.len());
    assert!(
        want == got,
        "the large overlay differs from kubectl kustomize"
    );
    for (root, dir) in &cases {
        let (k, e) = (kubectl(dir), edgesync(root, dir));
        assert!(
            k.0 && e.0 && docs(&k.1) == docs(&e.1),
            "{} differs",
            dir.display()
        );
    }
    println!(
        "outputs identical: large overlay ({} objects), {} fixture builds",
        want.len(),
        cases.len()
    );

    let (mut k_large, mut e_large, mut k_fix, mut e_fix) = (vec![], vec![], vec![], vec![]);
    let (mut in_large, mut in_fix) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        kubectl(&overlay);
        k_large.push(t.elapsed());
        let t = Instant::now();
        edgesync(tmp.path(), &overlay);
        e_large.push(t.elapsed());

        let t = Instant::now();
        for (_, dir) in &cases {
            kubectl(dir);
        }
        k_fix.push(t.elapsed());
        let t = Instant::now();
        for (root, dir) in &cases {
            edgesync(root, dir);
        }
        e_fix.push(t.elapsed());

        let t = Instant::now();
        let m = edgesync::render::render(tmp.path(), Path::new("overlay")).unwrap();
        in_large.push(t.elapsed());
        assert_eq!(m.len(), want.len());
        let t = Instant::now();
        for (root, dir) in &cases {
            edgesync::render::render(root, dir.strip_prefix(root).unwrap()).unwrap();
        }
        in_fix.push(t.elapsed());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let row = |what: &str, k: Duration, e: Duration, i: Duration| {
        println!(
            "{what:<28} kubectl kustomize {:>8.1} ms | edgesync render {:>7.1} ms ({:>5.1}x) | in-process {:>7.2} ms ({:>6.1}x)",
            ms(k),
            ms(e),
            ms(k) / ms(e),
            ms(i),
            ms(k) / ms(i)
        );
    };
    println!("medians of {ROUNDS} rounds, whole processes unless in-process:");
    row(
        &format!("large overlay ({} objects)", want.len()),
        median(k_large),
        median(e_large),
        median(in_large),
    );
    row(
        &format!("{} fixture builds", cases.len()),
        median(k_fix),
        median(e_fix),
        median(in_fix),
    );
}
