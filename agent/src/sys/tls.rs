//! TLS trust, in one place: the system's CA bundle, PEM certificates and
//! keys, and the client configuration of `mqtts://` (`https://` downloads
//! use the same roots).

use std::path::Path;
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

/// The CAs the system trusts, used for `https://` and `mqtts://` when
/// `tls.ca_file` is not set: read once, on first use, by
/// `rustls-native-certs` as OpenSSL finds them: the file `SSL_CERT_FILE`
/// names and the hashed directories of `SSL_CERT_DIR` when set, else the
/// distribution's bundle and certificate directory (Debian, Fedora,
/// openSUSE, Alpine, ...). The device's bundle is what its package manager
/// keeps current (and where `update-ca-certificates` puts a site's own CA).
pub fn system_roots() -> Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>, String> {
    type Roots = Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>, String>;
    static ROOTS: std::sync::OnceLock<Roots> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let named: Vec<&str> = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
                .into_iter()
                .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
                .collect();
            if !loaded.certs.is_empty() {
                for e in &loaded.errors {
                    tracing::warn!(error = %e, "a system CA certificate source was skipped");
                }
                return Ok(Arc::new(loaded.certs));
            }
            let why = loaded.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
            Err(match named.is_empty() {
                true => format!(
                    "no system CA certificates found{}: install the ca-certificates package or set tls.ca_file",
                    if why.is_empty() { String::new() } else { format!(" ({why})") }
                ),
                false => format!(
                    "no CA certificate could be read from what {} names{}",
                    named.join(" and "),
                    if why.is_empty() { String::new() } else { format!(": {why}") }
                ),
            })
        })
        .clone()
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
    fn an_empty_pem_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.pem");
        std::fs::write(&b, "").unwrap();
        // An empty bundle is refused by name, not trusted as "nothing".
        assert!(load_certs(&b).unwrap_err().contains("found none"));
    }
}
