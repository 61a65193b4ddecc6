//! A real PostgreSQL for tests (Debian's `postgresql` package): a cluster made with `initdb` in
//! a temporary directory, served on a free loopback port, as the `postgres` user when the tests
//! run as root (PostgreSQL refuses to run as root). Shared by the hub's tests and the agent's
//! end-to-end rollout test (`tests/it/gates.rs`, through `#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (Debian package postgresql)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql/*/bin")
}

/// Runs `program` as `postgres` when this process is root.
fn command(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Starts a server (trust authentication for user `edgesync`, fsync off).
pub fn server() -> Server {
    let bin = bindir();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _ = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(dir.path())
        .status();
    let ok = command(&bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args(["-U", "edgesync", "--auth=trust", "-E", "UTF8"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "initdb");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = command(&bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .arg("-k")
        .arg(dir.path())
        .args(["-c", "fsync=off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "postgres did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server {
        child,
        port,
        bin,
        _dir: dir,
    }
}

impl Server {
    /// Creates database `name` (with `createdb`, retried while the server starts up); its
    /// connection string, as the hub's `[store] url` takes it.
    pub fn database(&self, name: &str) -> String {
        let t0 = Instant::now();
        loop {
            let out = Command::new(self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "edgesync",
                ])
                .arg(name)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "createdb {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        format!(
            "host=127.0.0.1 port={} user=edgesync dbname={name}",
            self.port
        )
    }
}
