//! The TLS client configuration both the agent and the hub use towards the MQTT broker
//! (feature `tls`): the CA file's certificates, or the system's when none is given, and a
//! client certificate when one is configured; rustls with ring. Reads the files it is given;
//! an error names the file or the step that failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what` is the file or step that failed; `source` is rustls's error.
    #[error("{what}: {source}")]
    Invalid {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn failed<E: std::error::Error + Send + Sync + 'static>(
    what: impl std::fmt::Display,
) -> impl Fn(E) -> TlsError {
    let what = what.to_string();
    move |e| TlsError::Invalid {
        what: what.clone(),
        source: Box::new(e),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A client configuration trusting `ca_file` (or the system's roots) and presenting
/// `client` (certificate and key files), if given.
pub fn client_config(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
                roots
                    .add(cert.map_err(failed(ca.display()))?)
                    .map_err(failed(ca.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(failed("protocol versions"))?
        .with_root_certificates(roots);
    match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(failed(cert.display()))?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&read(key)?).map_err(failed(key.display()))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(failed(key.display()))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("edgesync-proto-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing-ca.crt");
        let e = client_config(Some(&missing), None).unwrap_err();
        assert!(
            matches!(&e, TlsError::Read { .. }) && e.to_string().contains("missing-ca.crt"),
            "{e}"
        );
        let bad = dir.join("ca.crt");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(Some(&bad), None).unwrap_err();
        assert!(
            matches!(&e, TlsError::Invalid { .. }) && e.to_string().contains("ca.crt"),
            "{e}"
        );
        // The system's roots, no client certificate: a configuration all the same.
        client_config(None, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
