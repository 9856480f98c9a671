//! The operator's keys: `keygen`, `certify`, and signing what `deploy` and
//! `undeploy` publish (DSSE envelopes, see `outpost_protocol::trust`).

use outpost_protocol::Deployment;
use outpost_protocol::trust::{
    self, DEPLOYMENT_TYPE, Envelope, PublicKey, Scope, SigningKey, Target, UNDEPLOY_SCHEMA, UNDEPLOY_TYPE, Undeploy,
};
use std::path::{Path, PathBuf};

/// A key that signs, with its certificate when it is a deploy key.
#[derive(Debug)]
pub struct Signer {
    pub key: SigningKey,
    pub certificate: Option<Envelope>,
}

impl Signer {
    /// `--sign-key KEY.pem [--certificate CERT.json]`.
    pub fn load(key: &Path, certificate: Option<&Path>) -> Result<Signer, String> {
        let text = std::fs::read_to_string(key).map_err(|e| format!("{}: cannot read it: {e}", key.display()))?;
        let key_ = SigningKey::from_pem(&text).map_err(|e| format!("{}: {e}", key.display()))?;
        let certificate = match certificate {
            None => None,
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|e| format!("{}: cannot read it: {e}", p.display()))?;
                let env: Envelope = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: not a certificate envelope: {e}", p.display()))?;
                let cert: trust::KeyCertificate = serde_json::from_slice(
                    &trust::base64_decode(&env.payload).map_err(|e| format!("{}: {e}", p.display()))?,
                )
                .map_err(|e| format!("{}: not a key certificate: {e}", p.display()))?;
                if cert.key != key_.public().to_text() {
                    return Err(format!(
                        "{} certifies {}, not the key of {} ({})",
                        p.display(),
                        cert.key,
                        key.display(),
                        key_.public().to_text()
                    ));
                }
                Some(env)
            }
        };
        Ok(Signer { key: key_, certificate })
    }

    /// The envelope of a deployment (its `target` must be set).
    pub fn deployment(&self, d: &Deployment) -> Vec<u8> {
        let env = self.key.seal(DEPLOYMENT_TYPE, &d.to_json(), self.certificate.clone());
        serde_json::to_vec(&env).unwrap_or_default()
    }

    /// The signed form of an undeployment of `slot` (None: the default slot).
    pub fn undeploy(&self, target: Target, slot: Option<&str>, revision: u64) -> Vec<u8> {
        let slot = slot.map(str::to_string);
        let u = Undeploy { schema: UNDEPLOY_SCHEMA.into(), revision, target, deployment_id: None, slot };
        let env = self.key.seal(UNDEPLOY_TYPE, &serde_json::to_vec(&u).unwrap_or_default(), self.certificate.clone());
        serde_json::to_vec(&env).unwrap_or_default()
    }
}

/// Writes `OUT.pem` (private, PKCS#8, mode 0600) and `OUT.pub.pem` (SPKI);
/// returns the public key.
pub fn keygen(out: &Path) -> Result<(PathBuf, PathBuf, PublicKey), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = SigningKey::generate()?;
    let private = out.with_extension("pem");
    let public = out.with_extension("pub.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(|e| format!("{}: {e} (an existing key is never overwritten)", private.display()))?;
    f.write_all(key.to_pem().as_bytes()).map_err(|e| format!("{}: {e}", private.display()))?;
    std::fs::write(&public, key.public().to_pem()).map_err(|e| format!("{}: {e}", public.display()))?;
    Ok((private, public, key.public()))
}

/// A root's certificate for a deploy key: `not_after` is RFC 3339 or a
/// duration from now (`90d`).
pub fn certify(root: &Path, key: &str, name: Option<&str>, not_after: &str, scope: Scope) -> Result<Vec<u8>, String> {
    let root_text = std::fs::read_to_string(root).map_err(|e| format!("{}: cannot read it: {e}", root.display()))?;
    let root_key = SigningKey::from_pem(&root_text).map_err(|e| format!("{}: {e}", root.display()))?;
    let key = if key.starts_with("ed25519:") {
        PublicKey::parse(key)?
    } else {
        let text = std::fs::read_to_string(key).map_err(|e| format!("{key}: cannot read it: {e}"))?;
        PublicKey::parse(&text).map_err(|e| format!("{key}: {e}"))?
    };
    let until = match humantime::parse_rfc3339_weak(not_after) {
        Ok(t) => t,
        Err(_) => {
            let d = humantime::parse_duration(not_after)
                .map_err(|_| format!("--expires {not_after:?}: expected an RFC 3339 time or a duration like 90d"))?;
            std::time::SystemTime::now() + d
        }
    };
    if scope.devices.is_empty() && scope.groups.is_empty() {
        return Err("give the certificate a scope: --devices and/or --groups (names, prefix*, or *)".into());
    }
    let until = humantime::format_rfc3339_seconds(until).to_string();
    serde_json::to_vec_pretty(&root_key.certify(&key, name, &until, scope)).map_err(|e| e.to_string())
}
