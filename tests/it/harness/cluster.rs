//! The control plane for this test run, started once by `tests/cluster/up`, and a namespace per
//! test. Set EDGESYNC_TEST_KUBECONFIG to reuse a control plane that is already running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub struct Cluster {
    pub kubeconfig: PathBuf,
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if let Some(path) = std::env::var_os("EDGESYNC_TEST_KUBECONFIG") {
            return Cluster {
                kubeconfig: PathBuf::from(path),
            };
        }
        let dir = repo_root()
            .join("target/test-cluster")
            .join(std::process::id().to_string());
        let output = Command::new(repo_root().join("tests/cluster/up"))
            .arg("--dir")
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run tests/cluster/up");
        assert!(output.status.success(), "tests/cluster/up failed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let path = stdout
            .lines()
            .find_map(|l| l.strip_prefix("export KUBECONFIG="))
            .expect("tests/cluster/up printed no KUBECONFIG");
        Cluster {
            kubeconfig: PathBuf::from(path.trim()),
        }
    })
}

impl Cluster {
    /// The API server's address, for a relay in front of it.
    pub fn api_address(&self) -> std::net::SocketAddr {
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .expect("server in the kubeconfig");
        server.trim().parse().unwrap()
    }

    /// A client bound to the calling test's runtime.
    pub async fn client(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }
}

/// A namespace of the test's own, deleted when the test ends.
pub struct TestNamespace {
    pub name: String,
    pub client: kube::Client,
}

impl TestNamespace {
    /// A unique name for the test's namespace: `label` makes it recognisable, a counter makes
    /// it unique within the run. Apps with `create_namespace` create it.
    pub async fn reserve(label: &str) -> TestNamespace {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("t{}-{n}-{label}", std::process::id() % 10000);
        name.truncate(63);
        let name = name.trim_end_matches('-').to_string();
        TestNamespace {
            name,
            client: cluster().client().await,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}
