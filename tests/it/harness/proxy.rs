//! A TCP relay in front of the real API server, so one test can take "the API server" away
//! from one agent without stopping the control plane every other test shares. While cut, the
//! port refuses connections and every open connection is dropped, which is what an agent sees
//! when the API server process stops.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct ApiProxy {
    pub port: u16,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ApiProxy {
    pub async fn start(target: SocketAddr) -> ApiProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = ApiProxy {
            port: listener.local_addr().unwrap().port(),
            target,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(relay);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Refuses new connections and drops the open ones.
    pub fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener =
            super::eventually("the proxy port to be free again", super::WAIT, || async {
                TcpListener::bind(("127.0.0.1", self.port)).await.ok()
            })
            .await;
        self.serve(listener);
    }

    /// A copy of the kubeconfig at `path` that talks to the API server through this proxy.
    pub fn kubeconfig(&self, path: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
        let text = std::fs::read_to_string(path).unwrap();
        let server = format!("https://{}", self.target);
        assert!(text.contains(&server), "{server} not in {}", path.display());
        let out = dir.join("proxied.kubeconfig");
        std::fs::write(
            &out,
            text.replace(&server, &format!("https://127.0.0.1:{}", self.port)),
        )
        .unwrap();
        out
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
