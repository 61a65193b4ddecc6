//! The tests' real broker and helpers.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::{AsyncClient, MqttOptions};

pub mod postgres;

pub struct Broker {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn broker() -> Broker {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        // Mosquitto queues 1,000 messages per client by default and drops what comes beyond:
        // a burst from thousands of nodes would lose messages for the hub.
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n"
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (Debian package mosquitto)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "mosquitto did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker {
        child,
        port,
        _dir: dir,
    }
}

pub async fn agent(port: u16, name: &str) -> AsyncClient {
    let options = MqttOptions::new(name, "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(options, 64);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
}

pub async fn until(what: &str, check: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
