//! TLS trust, in one place: the system's CA bundle, PEM certificates and
//! keys, and the client configuration of `mqtts://` (`https://` downloads
//! use the same roots).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS client configuration for `mqtts://`: the CAs trusted for the
/// broker's certificate (`--ca-file`, else the system's:
/// [`system_roots`]) and an optional client certificate.
pub fn tls_config(
    roots: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    client: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(certs) => {
            for c in certs {
                store.add(c.clone()).map_err(|e| format!("--ca-file: a certificate rustls cannot use: {e}"))?;
            }
        }
        None => {
            let (added, _unusable) = store.add_parsable_certificates(system_roots()?.iter().cloned());
            if added == 0 {
                return Err("the system's CA bundle holds no certificate rustls can use: set tls.ca_file".into());
            }
        }
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(store);
    let config = match client {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("--client-cert/--client-key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(std::sync::Arc::new(config))
}

/// Where Linux distributions keep the bundle of CAs the system trusts
/// (Debian, Ubuntu, Alpine, Arch; Fedora, RHEL; openSUSE; others), after
/// `SSL_CERT_FILE`, the variable OpenSSL reads too.
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The CAs the system trusts, used for `https://` and `mqtts://` when
/// `tls.ca_file` is not set: read once, on first use, from the file named by
/// `SSL_CERT_FILE` or else the first of [`SYSTEM_CA_BUNDLES`] that exists.
/// The device's bundle is what its package manager keeps current (and where
/// `update-ca-certificates` puts a site's own CA).
pub fn system_roots() -> Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>, String> {
    type Roots = Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>, String>;
    static ROOTS: std::sync::OnceLock<Roots> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let named = from_env.is_some();
            let path = system_bundle(from_env, SYSTEM_CA_BUNDLES)?;
            load_certs(&path)
                .map(Arc::new)
                .map_err(|e| if named { format!("{e} (the file SSL_CERT_FILE names)") } else { e })
        })
        .clone()
}

/// `from_env` if set, else the first of `candidates` that exists.
fn system_bundle(from_env: Option<PathBuf>, candidates: &[&str]) -> Result<PathBuf, String> {
    from_env.or_else(|| candidates.iter().map(PathBuf::from).find(|p| p.exists())).ok_or_else(|| {
        format!(
            "no system CA bundle ({} not found; SSL_CERT_FILE not set): install the ca-certificates package or \
             set tls.ca_file",
            candidates.join(", ")
        )
    })
}

/// Reads every certificate of a PEM file (`--ca-file`, `--client-cert`).
pub fn load_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: expected PEM certificates (-----BEGIN CERTIFICATE-----), found none", path.display()));
    }
    Ok(certs)
}

/// Reads a PEM private key (`--client-key`).
pub fn load_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: expected a PEM private key: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_bundle_is_ssl_cert_file_else_the_first_that_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&b, "").unwrap();
        let names = [a.to_str().unwrap(), b.to_str().unwrap()];
        assert_eq!(system_bundle(None, &names).unwrap(), b);
        assert_eq!(system_bundle(Some(a.clone()), &names).unwrap(), a);
        let none = system_bundle(None, &names[..1]).unwrap_err();
        assert!(none.starts_with(&format!("no system CA bundle ({} not found;", a.display())), "{none}");
        assert!(none.ends_with("install the ca-certificates package or set tls.ca_file"), "{none}");
        // An empty bundle is refused by name, not trusted as "nothing".
        assert!(load_certs(&b).unwrap_err().contains("found none"));
    }
}
