//! Keys that sign Git commits and tags the way developers do: GnuPG keys in a keyring of
//! their own (used by git through a `gpg.program` wrapper) and SSH keys (`gpg.format = ssh`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run signing tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory of keys; its GnuPG agent is stopped when it is dropped.
pub struct Keys {
    dir: tempfile::TempDir,
}

/// A key git can sign with: the `-c` options that select it.
pub struct SigningKey {
    /// What a project's `signatureKeys` names it by: the OpenPGP primary key ID, or the SSH
    /// key's `SHA256:` fingerprint.
    pub id: String,
    /// The public key file for the node's `[signatures]`.
    pub public: PathBuf,
    git_config: Vec<String>,
}

impl SigningKey {
    pub fn git_config(&self) -> Vec<&str> {
        self.git_config.iter().map(String::as_str).collect()
    }
}

impl Keys {
    pub fn new() -> Keys {
        // Short: gpg-agent's socket path must fit in a sockaddr_un.
        let dir = tempfile::Builder::new()
            .prefix("k")
            .tempdir_in("/tmp")
            .unwrap();
        let home = dir.path().join("gnupg");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        let wrapper = dir.path().join("gpg");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec gpg --homedir '{}' --batch --pinentry-mode loopback --passphrase '' \"$@\"\n",
                home.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        Keys { dir }
    }

    fn gpg(&self) -> Command {
        Command::new(self.dir.path().join("gpg"))
    }

    /// A new OpenPGP key for `name`: an RSA primary key with, if `subkey`, an Ed25519 signing
    /// subkey that then makes the signatures (as on a smartcard setup).
    pub fn gpg_key(&self, name: &str, subkey: bool) -> SigningKey {
        let email = format!("{name}@edgesync.invalid");
        run(self.gpg().args([
            "--quick-gen-key",
            &format!("{name} <{email}>"),
            if subkey { "rsa2048" } else { "ed25519" },
            "sign",
            "never",
        ]));
        let listing = run(self.gpg().args(["--with-colons", "--list-keys", &email]));
        let field = |prefix: &str, n: usize| {
            listing
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.split(':').nth(n))
                .unwrap()
                .to_string()
        };
        let (id, fingerprint) = (field("pub:", 4), field("fpr:", 9));
        if subkey {
            run(self
                .gpg()
                .args(["--quick-add-key", &fingerprint, "ed25519", "sign", "never"]));
        }
        let public = self.dir.path().join(format!("{name}.asc"));
        let armored = run(self.gpg().args(["--armor", "--export", &email]));
        std::fs::write(&public, armored).unwrap();
        let program = self.dir.path().join("gpg");
        SigningKey {
            id,
            public,
            git_config: vec![
                "-c".into(),
                "gpg.format=openpgp".into(),
                "-c".into(),
                format!("gpg.program={}", program.display()),
                "-c".into(),
                format!("user.signingkey={email}"),
            ],
        }
    }

    /// A new Ed25519 SSH key for `name`.
    pub fn ssh_key(&self, name: &str) -> SigningKey {
        let private = self.dir.path().join(name);
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private));
        let public = private.with_extension("pub");
        let listing = run(Command::new("ssh-keygen").arg("-lf").arg(&public));
        let id = listing.split_whitespace().nth(1).unwrap().to_string();
        SigningKey {
            id,
            public,
            git_config: vec![
                "-c".into(),
                "gpg.format=ssh".into(),
                "-c".into(),
                format!("user.signingkey={}", private.display()),
            ],
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.dir.path().join("gnupg"))
            .args(["--kill", "gpg-agent"])
            .output();
    }
}
