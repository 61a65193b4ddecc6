//! The store's conformance on a real PostgreSQL (Debian's `postgresql` package): a cluster made
//! with `initdb` in a temporary directory, served on a free loopback port, as the `postgres`
//! user when the tests run as root (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgesync_hub::store::{conformance, Postgres, Store};

struct Server {
    child: Child,
    port: u16,
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

fn server() -> Server {
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
        _dir: dir,
    }
}

fn store(server: &Server, db: &str) -> Store {
    let admin = format!(
        "host=127.0.0.1 port={} user=edgesync dbname=postgres",
        server.port
    );
    let t0 = Instant::now();
    let mut client = loop {
        match postgres::Client::connect(&admin, postgres::NoTls) {
            Ok(c) => break c,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(30), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=edgesync dbname={db}",
        server.port
    );
    Store::new(Box::new(Postgres::connect(&url).unwrap())).unwrap()
}

#[test]
fn the_store_does_on_postgresql_what_it_does_on_sqlite() {
    let server = server();
    conformance::events_are_kept_once_and_gaps_found_and_filled(&mut store(&server, "a"));
    conformance::an_older_document_never_replaces_a_newer_one(&mut store(&server, "b"));
    conformance::the_overview_puts_failing_and_silent_nodes_first(&mut store(&server, "c"));
    conformance::app_views_carry_the_nodes_labels(&mut store(&server, "d"));
    conformance::apps_are_known_from_the_node_document_until_their_own_arrives(&mut store(
        &server, "e",
    ));
}
