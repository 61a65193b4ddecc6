//! A real Mosquitto broker on a free loopback port, plain or with TLS and client
//! certificates (made with the openssl command line), and publishing with `mosquitto_pub`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::agent::free_port;

pub struct Broker {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    pub tls: bool,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certs(dir: &Path) {
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    for name in ["ca", "server", "client"] {
        let mut args = vec!["genpkey"];
        args.extend(ec);
        let out = format!("{name}.key");
        args.extend(["-out", &out]);
        openssl(&args, dir);
    }
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=edgesync-test-mqtt-ca",
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.crt",
        ],
        dir,
    );
    for (name, ext) in [
        ("server", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, crt, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        let subject = format!("/CN=edgesync-test-{name}");
        openssl(&["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr], dir);
        openssl(
            &["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "3650",
              "-extfile", &extfile, "-out", &crt],
            dir,
        );
    }
}

impl Broker {
    pub fn start(tls: bool) -> Broker {
        Self::start_with(tls, false)
    }

    /// A broker that keeps sessions and queued messages across a graceful restart.
    pub fn start_persistent() -> Broker {
        Self::start_with(false, true)
    }

    fn start_with(tls: bool, persistent: bool) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // Started as root, mosquitto would switch to the `mosquitto` user, which cannot read
        // keys in our private temporary directory: keep the current user.
        let user =
            String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nuser {}\nallow_anonymous true\nmax_queued_messages 100000\n",
            user.trim()
        );
        if persistent {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                dir.path().display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        if tls {
            make_certs(dir.path());
            let p = |f: &str| dir.path().join(f).display().to_string();
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                p("ca.crt"),
                p("server.crt"),
                p("server.key")
            ));
        }
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut broker = Broker {
            dir,
            child: None,
            port,
            tls,
        };
        broker.restart();
        broker
    }

    /// Stops the broker (if running) and starts it again on the same port, with no memory of
    /// sessions or subscriptions.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto (package mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: a persistent broker saves its sessions first.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts a stopped broker again on the same port.
    pub fn start_again(&mut self) {
        self.restart();
    }

    /// `mosquitto_sub -v` with a persistent session, reconnecting by itself; each line of the
    /// returned file is `topic payload`.
    pub fn subscribe(&self, client_id: &str, filter: &str) -> (Child, PathBuf) {
        let out = self.dir.path().join(format!("{client_id}.out"));
        let child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-c",
                "-i",
                client_id,
                "-v",
                "-t",
                filter,
            ])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        (child, out)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The agent's `[mqtt]` section for this broker.
    pub fn agent_section(&self) -> String {
        format!("url = \"{}\"\n{}", self.url(), self.tls_files())
    }

    /// The CA and the client certificate and key, as `[mqtt]` keys of the agent and the hub
    /// (nothing without TLS).
    pub fn tls_files(&self) -> String {
        if !self.tls {
            return String::new();
        }
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.file("ca.crt").display(),
            self.file("client.crt").display(),
            self.file("client.key").display()
        )
    }

    fn pub_command(&self, topic: &str) -> Command {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
        ]);
        if self.tls {
            cmd.arg("--cafile").arg(self.file("ca.crt"));
            cmd.arg("--cert").arg(self.file("client.crt"));
            cmd.arg("--key").arg(self.file("client.key"));
        }
        cmd
    }

    /// Publishes a retained message, as the fleet hub publishes its gates.
    pub fn publish_retained(&self, topic: &str, payload: &str) {
        succeed(self.pub_command(topic).args(["-r", "-m", payload]));
    }

    pub fn publish(&self, topic: &str, payload: &str) {
        succeed(self.pub_command(topic).args(["-m", payload]));
    }

    /// Publishes a payload of any size (from a file: arguments are limited to 128 KiB).
    pub fn publish_large(&self, topic: &str, payload: &[u8]) {
        let file = self.dir.path().join("payload.bin");
        std::fs::write(&file, payload).unwrap();
        succeed(self.pub_command(topic).arg("-f").arg(&file));
    }

    /// Publishes every line of `lines` as one message, over one connection.
    pub fn publish_lines(&self, topic: &str, lines: &str) {
        use std::io::Write;
        let mut child = self
            .pub_command(topic)
            .arg("-l")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub -l");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs a `mosquitto_pub` to its end; it must succeed.
fn succeed(command: &mut Command) {
    let out = command.output().expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
