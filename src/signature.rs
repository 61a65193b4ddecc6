//! Signature stage: a Git revision of an app whose AppProject lists `signatureKeys` must carry
//! a valid signature by one of those keys before it is rendered, let alone applied.
//!
//! The keys themselves are trusted on the node ([`Keyring`], from `[signatures]` in the
//! config), never taken from Git: the project only says which of them an app accepts, as Argo
//! CD's keyring and `signatureKeys` do. OpenPGP signatures are checked with rPGP, SSH
//! signatures (`gpg.format = ssh`, namespace `git`) with `ssh-key`. Pure: bytes in, a verdict
//! out; reading the signed objects out of Git is the source stage's job.

use std::path::{Path, PathBuf};

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::types::KeyDetails;

const PGP_BEGIN: &[u8] = b"-----BEGIN PGP SIGNATURE-----";
const SSH_BEGIN: &[u8] = b"-----BEGIN SSH SIGNATURE-----";
/// The namespace `git` signs commits and tags in (`ssh-keygen -Y sign -n git`).
const SSH_NAMESPACE: &str = "git";

/// A key file of the node's keyring that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub(crate) struct KeyError {
    pub(crate) path: PathBuf,
    /// What is wrong, or what failed.
    pub(crate) what: String,
    /// The error of the reader (file system, rPGP, ssh-key), when one said so.
    pub(crate) source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl KeyError {
    fn new(path: &Path, what: impl Into<String>) -> KeyError {
        KeyError {
            path: path.to_path_buf(),
            what: what.into(),
            source: None,
        }
    }

    /// `what` failed because of `e`.
    fn caused<E: std::error::Error + Send + Sync + 'static>(
        path: &Path,
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> KeyError {
        let mut error = KeyError::new(path, what);
        move |e| {
            error.source = Some(Box::new(e));
            error
        }
    }
}

/// Why a revision is refused. `object` names the commit or tag, as in
/// `commit 1a2b3c4d5e6f` or `tag v1.2 (3c4d5e6f7a8b)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("{object} is not signed, and {required_by} requires a signature")]
    Unsigned { object: String, required_by: String },
    #[error("{object} is signed by {key}, which is not among this node's trusted keys ([signatures] in the config)")]
    UnknownKey { object: String, key: String },
    #[error("{object} is signed by {key}, which {required_by} does not list")]
    NotAllowed {
        object: String,
        key: String,
        required_by: String,
    },
    #[error("{object}: the signature by {key} does not verify: {message}")]
    Invalid {
        object: String,
        key: String,
        message: String,
    },
    #[error("{object}: unreadable signature: {message}")]
    Malformed { object: String, message: String },
    #[error("{object} cannot be verified: {required_by} requires signed revisions, and only Git commits and tags carry signatures")]
    NotGit { object: String, required_by: String },
}

/// A Git object and what its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Signed {
    /// How messages name it: `commit <sha>` or `tag <name> (<sha>)`.
    pub(crate) object: String,
    /// The bytes the signature is over: the object without its signature.
    pub(crate) payload: Vec<u8>,
    /// The armored signature, if the object has one.
    pub(crate) signature: Option<Vec<u8>>,
}

impl Signed {
    /// Splits a raw tag object into what is signed and the signature, which is appended to
    /// the message: it starts at the last line that opens a PGP or SSH signature, as in git.
    pub(crate) fn from_tag(object: String, raw: &[u8]) -> Signed {
        let mut start = None;
        let mut offset = 0;
        for line in raw.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(PGP_BEGIN) || line.starts_with(SSH_BEGIN) {
                start = Some(offset);
            }
            offset += line.len();
        }
        match start {
            Some(at) => Signed {
                object,
                payload: raw[..at].to_vec(),
                signature: Some(raw[at..].to_vec()),
            },
            None => Signed {
                object,
                payload: raw.to_vec(),
                signature: None,
            },
        }
    }
}

/// Who signed an accepted revision, for the log: `OpenPGP key <ID>` or `SSH key SHA256:…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Signer(pub(crate) String);

#[derive(Debug, Clone)]
struct PgpCert {
    cert: SignedPublicKey,
    /// The primary key's ID (16 upper-case hex digits), as Argo CD's `keyID`.
    id: String,
}

#[derive(Debug, Clone)]
struct SshKey {
    key: ssh_key::PublicKey,
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    fingerprint: String,
}

/// The keys this node trusts. Empty unless `[signatures]` lists key files.
#[derive(Debug, Clone, Default)]
pub(crate) struct Keyring {
    pgp: Vec<PgpCert>,
    ssh: Vec<SshKey>,
}

fn upper_hex(bytes: &[u8]) -> String {
    hex::encode_upper(bytes)
}

impl Keyring {
    /// Reads OpenPGP public keys (armored or binary, any number per file) and OpenSSH
    /// public keys (`authorized_keys` lines; blank lines and `#` comments skipped).
    pub(crate) fn load(pgp_files: &[PathBuf], ssh_files: &[PathBuf]) -> Result<Keyring, KeyError> {
        let mut keyring = Keyring::default();
        for path in pgp_files {
            keyring.pgp.extend(read_pgp(path)?);
        }
        for path in ssh_files {
            keyring.ssh.extend(read_ssh(path)?);
        }
        Ok(keyring)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.pgp.is_empty() && self.ssh.is_empty()
    }

    /// The IDs a project can list: OpenPGP primary key IDs and SSH fingerprints.
    pub(crate) fn key_ids(&self) -> Vec<String> {
        let pgp = self.pgp.iter().map(|c| c.id.clone());
        pgp.chain(self.ssh.iter().map(|k| k.fingerprint.clone()))
            .collect()
    }

    /// Accepts `signed` if it carries a valid signature by a trusted key that `allowed` (the
    /// project's `signatureKeys`) names; `required_by` names who asks (`project edge
    /// (signatureKeys)`), for messages. An OpenPGP key is named by its 16-digit key ID or its
    /// fingerprint (the primary key's, or the signing subkey's), in any case; an SSH key by
    /// its `SHA256:` fingerprint.
    pub(crate) fn verify(
        &self,
        signed: &Signed,
        required_by: &str,
        allowed: &[String],
    ) -> Result<Signer, VerifyError> {
        let object = signed.object.clone();
        let Some(signature) = &signed.signature else {
            return Err(VerifyError::Unsigned {
                object,
                required_by: required_by.to_string(),
            });
        };
        if signature.starts_with(PGP_BEGIN) {
            self.verify_pgp(signed, signature, required_by, allowed)
        } else if signature.starts_with(SSH_BEGIN) {
            self.verify_ssh(signed, signature, required_by, allowed)
        } else {
            Err(VerifyError::Malformed {
                object,
                message:
                    "neither an OpenPGP nor an SSH signature (X.509 signatures are not supported)"
                        .into(),
            })
        }
    }

    fn verify_pgp(
        &self,
        signed: &Signed,
        armored: &[u8],
        required_by: &str,
        allowed: &[String],
    ) -> Result<Signer, VerifyError> {
        let object = || signed.object.clone();
        let malformed = |message: String| VerifyError::Malformed {
            object: object(),
            message,
        };
        let text = std::str::from_utf8(armored).map_err(|e| malformed(e.to_string()))?;
        let (signature, _) =
            DetachedSignature::from_string(text).map_err(|e| malformed(e.to_string()))?;
        let sig = &signature.signature;
        // The issuer, by fingerprint (newer signers) or key ID; either may name a subkey.
        let fingerprints: Vec<String> = sig
            .issuer_fingerprint()
            .iter()
            .map(|f| upper_hex(f.as_bytes()))
            .collect();
        let ids: Vec<String> = sig
            .issuer_key_id()
            .iter()
            .map(|id| upper_hex(id.as_ref()))
            .collect();
        let issuer = fingerprints
            .first()
            .or(ids.first())
            .map(|id| format!("OpenPGP key {id}"))
            .unwrap_or_else(|| "an OpenPGP key that is not named in the signature".into());
        let names = |fp: &[u8], id: &[u8]| {
            fingerprints.contains(&upper_hex(fp)) || ids.contains(&upper_hex(id))
        };
        for cert in &self.pgp {
            let primary = &cert.cert.primary_key;
            let signing =
                if names(
                    primary.fingerprint().as_bytes(),
                    primary.legacy_key_id().as_ref(),
                ) {
                    SigningKey::Primary(primary)
                } else {
                    let subkey =
                        cert.cert.public_subkeys.iter().map(|s| &s.key).find(|k| {
                            names(k.fingerprint().as_bytes(), k.legacy_key_id().as_ref())
                        });
                    match subkey {
                        Some(k) => SigningKey::Subkey(k),
                        None => continue,
                    }
                };
            let signing_fp = upper_hex(signing.fingerprint().as_bytes());
            let primary_fp = upper_hex(primary.fingerprint().as_bytes());
            let listed = allowed.iter().any(|a| {
                let a = a.trim().to_ascii_uppercase();
                let a = a.trim_start_matches("0X");
                a.len() >= 16 && (primary_fp.ends_with(a) || signing_fp.ends_with(a))
            });
            let name = format!("OpenPGP key {}", cert.id);
            if !listed {
                return Err(VerifyError::NotAllowed {
                    object: object(),
                    key: name,
                    required_by: required_by.to_string(),
                });
            }
            let payload = signed.payload.as_slice();
            let result = match signing {
                SigningKey::Primary(k) => sig.verify(k, payload),
                SigningKey::Subkey(k) => sig.verify(k, payload),
            };
            return match result {
                Ok(()) => Ok(Signer(name)),
                Err(e) => Err(VerifyError::Invalid {
                    object: object(),
                    key: name,
                    message: e.to_string(),
                }),
            };
        }
        Err(VerifyError::UnknownKey {
            object: object(),
            key: issuer,
        })
    }

    fn verify_ssh(
        &self,
        signed: &Signed,
        armored: &[u8],
        required_by: &str,
        allowed: &[String],
    ) -> Result<Signer, VerifyError> {
        let object = || signed.object.clone();
        let sig = ssh_key::SshSig::from_pem(armored).map_err(|e| VerifyError::Malformed {
            object: object(),
            message: e.to_string(),
        })?;
        let fingerprint = sig
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string();
        let name = format!("SSH key {fingerprint}");
        let Some(trusted) = self
            .ssh
            .iter()
            .find(|k| k.key.key_data() == sig.public_key())
        else {
            return Err(VerifyError::UnknownKey {
                object: object(),
                key: name,
            });
        };
        if !allowed.iter().any(|a| a.trim() == trusted.fingerprint) {
            return Err(VerifyError::NotAllowed {
                object: object(),
                key: name,
                required_by: required_by.to_string(),
            });
        }
        trusted
            .key
            .verify(SSH_NAMESPACE, &signed.payload, &sig)
            .map(|()| Signer(name.clone()))
            .map_err(|e| VerifyError::Invalid {
                object: object(),
                key: name,
                message: e.to_string(),
            })
    }
}

/// The key of a trusted certificate that made a signature.
enum SigningKey<'a> {
    Primary(&'a pgp::packet::PublicKey),
    Subkey(&'a pgp::packet::PublicSubkey),
}

impl SigningKey<'_> {
    fn fingerprint(&self) -> pgp::types::Fingerprint {
        match self {
            SigningKey::Primary(k) => k.fingerprint(),
            SigningKey::Subkey(k) => k.fingerprint(),
        }
    }
}

fn read_pgp(path: &Path) -> Result<Vec<PgpCert>, KeyError> {
    let unreadable = "not an OpenPGP public key";
    let bytes = std::fs::read(path).map_err(KeyError::caused(path, "cannot read"))?;
    let certs: Vec<SignedPublicKey> = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(&bytes).map_err(KeyError::caused(path, unreadable))?;
        SignedPublicKey::from_string_many(text)
            .map_err(KeyError::caused(path, unreadable))?
            .0
            .collect::<Result<_, _>>()
            .map_err(KeyError::caused(path, unreadable))?
    } else {
        SignedPublicKey::from_bytes_many(bytes.as_slice())
            .map_err(KeyError::caused(path, unreadable))?
            .collect::<Result<_, _>>()
            .map_err(KeyError::caused(path, unreadable))?
    };
    if certs.is_empty() {
        return Err(KeyError::new(path, "no OpenPGP public key in the file"));
    }
    certs
        .into_iter()
        .map(|cert| {
            let id = upper_hex(cert.legacy_key_id().as_ref());
            // Self-signatures and subkey bindings must hold, so a subkey cannot be grafted
            // onto a trusted primary key.
            cert.verify_bindings()
                .map_err(KeyError::caused(path, format!("key {id}")))?;
            Ok(PgpCert { cert, id })
        })
        .collect()
}

fn read_ssh(path: &Path) -> Result<Vec<SshKey>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(KeyError::caused(path, "cannot read"))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = ssh_key::PublicKey::from_openssh(line).map_err(KeyError::caused(
            path,
            format!("line {}: not an OpenSSH public key", i + 1),
        ))?;
        let fingerprint = key.fingerprint(ssh_key::HashAlg::Sha256).to_string();
        keys.push(SshKey { key, fingerprint });
    }
    if keys.is_empty() {
        return Err(KeyError::new(path, "no SSH public key in the file"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    //! Fixtures in `tests/fixtures/signatures/` were made with GnuPG 2.2 and OpenSSH 9.2 (see
    //! the README there): Alice's RSA key signs with an Ed25519 subkey, as with a smartcard.
    use super::*;

    const ALICE_ID: &str = "F77FA6F07FE5DDCA";
    const ALICE_FPR: &str = "1E470C881063125EE2EABA92F77FA6F07FE5DDCA";
    const ALICE_SUBKEY_FPR: &str = "4208899349E75CE1899F271CADF01C398BD810E3";
    const MALLORY_FPR: &str = "312E80DCB3643C8B5C6F2E0C99FCEDDCAAA264C7";
    const DEPLOY: &str = "SHA256:rJiOm4+Jw+C/N4TNPNmquLAXp2bX0XZX6s0f/5Nv4f0";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/signatures")
            .join(name)
    }

    fn keyring() -> Keyring {
        Keyring::load(&[fixture("alice.asc")], &[fixture("deploy.pub")]).unwrap()
    }

    fn commit(signature: Option<&str>) -> Signed {
        Signed {
            object: "commit 1a2b3c4d5e6f".into(),
            payload: std::fs::read(fixture("commit.payload")).unwrap(),
            signature: signature.map(|s| std::fs::read(fixture(s)).unwrap()),
        }
    }

    fn verify(signed: &Signed, allowed: &[&str]) -> Result<Signer, VerifyError> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        keyring().verify(signed, "project edge (signatureKeys)", &allowed)
    }

    #[test]
    fn the_keyring_names_its_keys_as_projects_list_them() {
        assert_eq!(keyring().key_ids(), [ALICE_ID, DEPLOY]);
        assert!(Keyring::default().is_empty());
    }

    #[test]
    fn an_openpgp_subkey_signature_is_accepted_under_any_name_of_its_key() {
        let signed = commit(Some("commit.alice.sig"));
        for name in [
            ALICE_ID,
            &ALICE_ID.to_lowercase(),
            &format!("0x{ALICE_ID}"),
            ALICE_FPR,
            ALICE_SUBKEY_FPR,
        ] {
            let signer = verify(&signed, &[name]).unwrap();
            assert_eq!(signer.0, format!("OpenPGP key {ALICE_ID}"), "{name}");
        }
        // A short ID is too easily forged to count.
        assert!(matches!(
            verify(&signed, &[&ALICE_ID[8..]]),
            Err(VerifyError::NotAllowed { .. })
        ));
    }

    #[test]
    fn refusals_name_the_object_and_the_key() {
        let err = verify(&commit(Some("commit.alice.sig")), &[DEPLOY]).unwrap_err();
        assert!(matches!(err, VerifyError::NotAllowed { .. }));
        assert_eq!(
            err.to_string(),
            format!("commit 1a2b3c4d5e6f is signed by OpenPGP key {ALICE_ID}, which project edge (signatureKeys) does not list")
        );
        let err = verify(&commit(Some("commit.mallory.sig")), &[ALICE_ID]).unwrap_err();
        assert!(matches!(err, VerifyError::UnknownKey { .. }));
        assert!(err.to_string().contains(MALLORY_FPR), "{err}");
        let err = verify(&commit(None), &[ALICE_ID]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "commit 1a2b3c4d5e6f is not signed, and project edge (signatureKeys) requires a signature"
        );
    }

    #[test]
    fn a_changed_payload_does_not_verify() {
        for sig in ["commit.alice.sig", "commit.deploy.sig"] {
            let mut signed = commit(Some(sig));
            signed.payload.extend_from_slice(b"one more line\n");
            let err = verify(&signed, &[ALICE_ID, DEPLOY]).unwrap_err();
            assert!(matches!(err, VerifyError::Invalid { .. }), "{sig}: {err}");
        }
    }

    #[test]
    fn ssh_signatures_verify_in_gits_namespace_only() {
        let signer = verify(&commit(Some("commit.deploy.sig")), &[DEPLOY]).unwrap();
        assert_eq!(signer.0, format!("SSH key {DEPLOY}"));
        assert!(matches!(
            verify(&commit(Some("commit.deploy.sig")), &[ALICE_ID]),
            Err(VerifyError::NotAllowed { .. })
        ));
        assert!(matches!(
            verify(&commit(Some("commit.deploy-file-namespace.sig")), &[DEPLOY]),
            Err(VerifyError::Invalid { .. })
        ));
        let pgp_only = Keyring::load(&[fixture("alice.asc")], &[]).unwrap();
        let err = pgp_only
            .verify(&commit(Some("commit.deploy.sig")), "p", &[DEPLOY.into()])
            .unwrap_err();
        assert!(matches!(err, VerifyError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains(DEPLOY), "{err}");
    }

    #[test]
    fn unreadable_signatures_are_malformed() {
        let mut signed = commit(None);
        for junk in [
            &b"-----BEGIN PGP SIGNATURE-----\n\nnot base64\n-----END PGP SIGNATURE-----\n"[..],
            b"-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n",
            b"-----BEGIN SIGNED MESSAGE-----\n",
        ] {
            signed.signature = Some(junk.to_vec());
            assert!(
                matches!(
                    verify(&signed, &[ALICE_ID, DEPLOY]),
                    Err(VerifyError::Malformed { .. })
                ),
                "{}",
                String::from_utf8_lossy(junk)
            );
        }
    }

    #[test]
    fn a_tag_is_split_at_its_last_signature_line() {
        let sig = "-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n";
        let head = "object 1a2b\ntype commit\ntag v1\ntagger A <a@b> 1 +0000\n\nquoting:\n-----BEGIN SSH SIGNATURE----- is how it starts\n";
        let tag = Signed::from_tag("tag v1".into(), format!("{head}{sig}").as_bytes());
        assert_eq!(tag.payload, head.as_bytes());
        assert_eq!(tag.signature.as_deref(), Some(sig.as_bytes()));
        let unsigned = Signed::from_tag("tag v2".into(), b"object 1a2b\ntag v2\n\nplain\n");
        assert_eq!(unsigned.signature, None);
    }

    #[test]
    fn key_files_that_hold_no_key_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "ssh-ed25519 not-base64 x\n").unwrap();
        let err = Keyring::load(&[], std::slice::from_ref(&junk)).unwrap_err();
        assert_eq!(err.path, junk);
        assert_eq!(err.what, "line 1: not an OpenSSH public key");
        // The parser's own words are kept as the cause, and shown.
        assert!(err.source.is_some(), "{err:?}");
        assert!(
            err.to_string().len() > err.what.len() + junk.display().to_string().len() + 2,
            "{err}"
        );
        let err = Keyring::load(&[fixture("deploy.pub")], &[]).unwrap_err();
        assert_eq!(err.path, fixture("deploy.pub"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "# no keys yet\n").unwrap();
        assert!(Keyring::load(&[], &[empty])
            .unwrap_err()
            .what
            .contains("no SSH public key"));
    }
}
