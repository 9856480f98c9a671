//! Signed desired state: DSSE envelopes, ed25519 keys and key certificates.
//!
//! A signed desired-state payload is a DSSE envelope (secure-systems-lab/dsse,
//! v1): the signature is over `PAE(payloadType, payload)`, where
//! `PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body`
//! (lengths in ASCII decimal). Its payload is a [`Deployment`] (type
//! [`DEPLOYMENT_TYPE`]) or an [`Undeploy`] (type [`UNDEPLOY_TYPE`]); both name
//! their [`Target`], so a message signed for one device or group cannot be
//! replayed on another's topic.
//!
//! Keys are ed25519. Devices trust **root** keys; a root signs messages
//! itself, or certifies **deploy keys** with a [`KeyCertificate`] (itself a DSSE
//! envelope of type [`CERTIFICATE_TYPE`] signed by the root) that carries an
//! expiry and a scope of devices and groups. A deploy key's signature carries
//! its certificate in the signature object (`"certificate"`, an extension
//! field DSSE allows), so a device needs nothing but its roots.
//!
//! Formats: private keys PKCS#8 PEM (what `openssl genpkey -algorithm
//! ed25519` writes), public keys SPKI PEM (what `openssl pkey -pubout`
//! writes) or `ed25519:<base64 of the 32 bytes>`.

use crate::{Deployment, ErrorCode, ErrorInfo, ProtocolError, check_schema, parse_json};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

pub const DEPLOYMENT_TYPE: &str = "application/vnd.outpost.deployment+json";
pub const UNDEPLOY_TYPE: &str = "application/vnd.outpost.undeploy+json";
pub const CERTIFICATE_TYPE: &str = "application/vnd.outpost.key-certificate+json";
pub const UNDEPLOY_SCHEMA: &str = "outpost.undeploy.v1";
pub const CERTIFICATE_SCHEMA: &str = "outpost.key_certificate.v1";

/// DSSE v1's pre-authentication encoding: what is signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Who a signed message is for: `{"device": "cam-17"}` or `{"group": "cameras"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Device(String),
    Group(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device {d}"),
            Target::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 (standard alphabet; URL-safe and unpadded are accepted too).
    pub payload: String,
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// A hint only (the key's `ed25519:` form by our tools); never trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
    /// Base64 of the 64-byte ed25519 signature over the PAE.
    pub sig: String,
    /// The signing key's certificate, when it is a deploy key certified by a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Box<Envelope>>,
}

/// The signed form of an undeployment (the unsigned form is an empty payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undeploy {
    pub schema: String,
    /// Raises the topic's revision like a deployment does: an older signed
    /// deployment replayed afterwards is stale.
    pub revision: u64,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// The model slot it withdraws (absent: the default slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

/// A root's statement that a deploy key may sign for a scope until an expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyCertificate {
    pub schema: String,
    /// The certified key, `ed25519:<base64>`.
    pub key: String,
    /// A name for people and logs (e.g. `ci-2026`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// RFC 3339; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// RFC 3339; required: every certificate expires.
    pub not_after: String,
    pub scope: Scope,
}

/// Devices and groups a certified key may target: exact names, `*` for all,
/// or a prefix ending in `*` (`cam-*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Scope {
    pub fn covers(&self, target: &Target) -> bool {
        let (patterns, name) = match target {
            Target::Device(d) => (&self.devices, d),
            Target::Group(g) => (&self.groups, g),
        };
        patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "devices [{}], groups [{}]", self.devices.join(", "), self.groups.join(", "))
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

/// DER of an ed25519 SubjectPublicKeyInfo, before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// DER of an ed25519 PKCS#8 v1 private key, before the 32 seed bytes.
const PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

impl PublicKey {
    /// `ed25519:<base64 of 32 bytes>` or an SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let text = text.trim();
        if let Some(b) = text.strip_prefix("ed25519:") {
            let raw = base64_decode(b).map_err(|e| format!("ed25519:<base64>: {e}"))?;
            return <[u8; 32]>::try_from(raw.as_slice())
                .map(PublicKey)
                .map_err(|_| format!("ed25519:<base64>: expected 32 bytes, found {}", raw.len()));
        }
        if text.contains("-----BEGIN") {
            let der = pem_decode(text, "PUBLIC KEY")?;
            return der
                .strip_prefix(&SPKI_PREFIX[..])
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(PublicKey)
                .ok_or_else(|| {
                    "a PUBLIC KEY that is not an ed25519 key (openssl pkey -pubout of an ed25519 key)".into()
                });
        }
        Err("an ed25519 public key: a PEM file (-----BEGIN PUBLIC KEY-----) or ed25519:<base64 of 32 bytes>".into())
    }

    /// Every key of a text: one `ed25519:<base64>`, or each PEM block of a
    /// file (a bundle of several public keys).
    pub fn parse_all(text: &str) -> Result<Vec<PublicKey>, String> {
        let blocks: Vec<&str> = text.split("-----BEGIN").skip(1).collect();
        if blocks.len() <= 1 {
            return PublicKey::parse(text).map(|k| vec![k]);
        }
        blocks.iter().map(|b| PublicKey::parse(&format!("-----BEGIN{b}"))).collect()
    }

    /// `ed25519:<base64>`: how keys are named in certificates, logs and `keyid`.
    pub fn to_text(&self) -> String {
        format!("ed25519:{}", base64_encode(&self.0))
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem_encode("PUBLIC KEY", &der)
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0).verify(message, signature).is_ok()
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// An ed25519 private key (operator side: `outpost-sim keygen`, `deploy --sign-key`).
pub struct SigningKey {
    seed: [u8; 32],
    pair: ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().to_text())
    }
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, String> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| "the system has no random source".to_string())?;
        SigningKey::from_seed(seed)
    }

    fn from_seed(seed: [u8; 32]) -> Result<SigningKey, String> {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| "not a valid ed25519 private key".to_string())?;
        Ok(SigningKey { seed, pair })
    }

    /// A PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), v1 or v2.
    pub fn from_pem(text: &str) -> Result<SigningKey, String> {
        let der = pem_decode(text, "PRIVATE KEY")?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|_| {
            "a PRIVATE KEY that is not an ed25519 PKCS#8 key (openssl genpkey -algorithm ed25519 writes one)"
                .to_string()
        })?;
        // v1 and v2 differ in the outer length and the version; the seed is
        // the OCTET STRING after the algorithm identifier in both.
        let seed = der
            .get(PKCS8_PREFIX.len()..PKCS8_PREFIX.len() + 32)
            .filter(|_| der[5..PKCS8_PREFIX.len()] == PKCS8_PREFIX[5..])
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
            .ok_or_else(|| "an ed25519 PKCS#8 key of an unexpected layout".to_string())?;
        Ok(SigningKey { seed, pair })
    }

    /// PKCS#8 v1 PEM, as openssl writes it.
    pub fn to_pem(&self) -> String {
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&self.seed);
        pem_encode("PRIVATE KEY", &der)
    }

    pub fn public(&self) -> PublicKey {
        use ring::signature::KeyPair;
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Wraps `payload` in an envelope signed by this key; `certificate` is
    /// this key's certificate when it is a deploy key.
    pub fn seal(&self, payload_type: &str, payload: &[u8], certificate: Option<Envelope>) -> Envelope {
        let sig = self.sign(&pae(payload_type, payload));
        Envelope {
            payload_type: payload_type.to_string(),
            payload: base64_encode(payload),
            signatures: vec![Signature {
                keyid: Some(self.public().to_text()),
                sig: base64_encode(&sig),
                certificate: certificate.map(Box::new),
            }],
        }
    }

    /// Certifies `key` for `scope` until `not_after` (RFC 3339).
    pub fn certify(&self, key: &PublicKey, name: Option<&str>, not_after: &str, scope: Scope) -> Envelope {
        let cert = KeyCertificate {
            schema: CERTIFICATE_SCHEMA.into(),
            key: key.to_text(),
            name: name.map(str::to_string),
            not_before: None,
            not_after: not_after.to_string(),
            scope,
        };
        self.seal(CERTIFICATE_TYPE, &serde_json::to_vec(&cert).unwrap_or_default(), None)
    }
}

/// What a desired-state payload says, once opened.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    Deploy(Box<Deployment>),
    /// `revision`: None for the unsigned (empty payload) form.
    Undeploy {
        revision: Option<u64>,
        deployment_id: Option<String>,
    },
}

/// How a desired state was accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Signer {
    /// No keys are configured: whoever can publish decides.
    Unchecked,
    /// Signed by a trusted root.
    Root(PublicKey),
    /// Signed by a deploy key a root certified.
    Certified { key: PublicKey, name: Option<String>, root: PublicKey },
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Unchecked => f.write_str("unchecked (no trust keys configured)"),
            Signer::Root(k) => write!(f, "root {k:?}"),
            Signer::Certified { key, name, root } => {
                write!(
                    f,
                    "deploy key {}{key:?} certified by root {root:?}",
                    name.as_deref().map(|n| format!("{n} ")).unwrap_or_default()
                )
            }
        }
    }
}

/// A refused message: `signature_required`, `signature_invalid`, or a
/// protocol error of the payload; `claimed` is what the (unverified) payload
/// says it is, for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub error: ErrorInfo,
    pub claimed: Option<Box<Deployment>>,
}

impl Refused {
    fn new(code: ErrorCode, message: impl Into<String>, claimed: Option<Deployment>) -> Refused {
        Refused { error: ErrorInfo::new(code, message), claimed: claimed.map(Box::new) }
    }
}

/// The keys a device trusts. Empty: every publisher is trusted (a warning
/// at start says so).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trust {
    pub roots: Vec<PublicKey>,
}

/// True when a payload is a DSSE envelope rather than a plain message.
pub fn is_envelope(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "payloadType")]
        payload_type: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(payload).is_ok_and(|p| p.payload_type.is_some())
}

impl Trust {
    pub fn enforced(&self) -> bool {
        !self.roots.is_empty()
    }

    /// Opens a desired-state payload that arrived on `arrived_on`'s topic:
    /// checks its signature (when keys are configured), its target, and
    /// parses what it says.
    pub fn open(&self, payload: &[u8], arrived_on: &Target, now: SystemTime) -> Result<(Desired, Signer), Refused> {
        self.open_in(payload, arrived_on, None, now)
    }

    /// [`Trust::open`] for a message that arrived on the desired topic of
    /// model slot `slot` (None: the default slot). The message's `slot`
    /// must be that slot (absent for the default one).
    pub fn open_in(
        &self,
        payload: &[u8],
        arrived_on: &Target,
        slot: Option<&str>,
        now: SystemTime,
    ) -> Result<(Desired, Signer), Refused> {
        let place = Place { target: arrived_on, slot };
        if payload.is_empty() {
            if self.enforced() {
                let msg = "an empty (undeploy) payload is unsigned: this device only accepts a signed undeploy \
                           (DSSE envelope of type application/vnd.outpost.undeploy+json)";
                return Err(Refused::new(ErrorCode::SignatureRequired, msg, None));
            }
            return Ok((Desired::Undeploy { revision: None, deployment_id: None }, Signer::Unchecked));
        }
        if !is_envelope(payload) {
            if self.enforced() {
                // Not parsed further, and reported under no deployment id:
                // an unsigned copy of a real deployment must not make it
                // look failed to whoever follows its events.
                let msg = format!(
                    "an unsigned deployment{}: this device only accepts deployments signed by a trusted key \
                     (a DSSE envelope of type {DEPLOYMENT_TYPE})",
                    claims(payload)
                );
                return Err(Refused::new(ErrorCode::SignatureRequired, msg, None));
            }
            let d = Deployment::from_json(payload).map_err(|e| Refused { error: e.info(), claimed: None })?;
            check_target(&d.target, d.slot.as_deref(), place, false, Some(&d))?;
            return Ok((Desired::Deploy(Box::new(d)), Signer::Unchecked));
        }
        let env: Envelope = parse_json(payload).map_err(|e| Refused { error: e.info(), claimed: None })?;
        let body = base64_decode(&env.payload).map_err(|e| Refused {
            error: ProtocolError::invalid("payload", "base64 of the signed message", e).info(),
            claimed: None,
        })?;
        // With keys, the signature is checked before the payload is parsed
        // (what an attacker wrote is never interpreted, nor echoed back).
        let signer = if self.enforced() {
            self.verify(&env, &body, arrived_on, now).map_err(|m| Refused {
                error: ErrorInfo::new(
                    if env.signatures.is_empty() { ErrorCode::SignatureRequired } else { ErrorCode::SignatureInvalid },
                    m,
                ),
                claimed: None,
            })?
        } else {
            Signer::Unchecked
        };
        let desired = match env.payload_type.as_str() {
            DEPLOYMENT_TYPE => {
                let d = Deployment::from_json(&body).map_err(|e| Refused { error: e.info(), claimed: None })?;
                check_target(&d.target, d.slot.as_deref(), place, self.enforced(), Some(&d))?;
                Desired::Deploy(Box::new(d))
            }
            UNDEPLOY_TYPE => {
                check_schema(&body, UNDEPLOY_SCHEMA).map_err(|e| Refused { error: e.info(), claimed: None })?;
                let u: Undeploy = parse_json(&body).map_err(|e| Refused { error: e.info(), claimed: None })?;
                check_target(&Some(u.target.clone()), u.slot.as_deref(), place, self.enforced(), None)?;
                Desired::Undeploy { revision: Some(u.revision), deployment_id: u.deployment_id }
            }
            other => {
                let e = ProtocolError {
                    code: ErrorCode::UnsupportedSchema,
                    path: "payloadType".into(),
                    expected: format!("\"{DEPLOYMENT_TYPE}\" or \"{UNDEPLOY_TYPE}\""),
                    found: crate::error::excerpt(other, 80),
                };
                return Err(Refused { error: e.info(), claimed: None });
            }
        };
        Ok((desired, signer))
    }

    /// The first signature that verifies, or why none did.
    fn verify(&self, env: &Envelope, body: &[u8], target: &Target, now: SystemTime) -> Result<Signer, String> {
        if env.signatures.is_empty() {
            return Err("the envelope has no signature; this device only accepts signed desired states".into());
        }
        let message = pae(&env.payload_type, body);
        let mut why = Vec::new();
        for (i, s) in env.signatures.iter().enumerate().take(8) {
            let hint =
                s.keyid.as_deref().map(|k| format!(" (keyid {})", crate::error::excerpt(k, 60))).unwrap_or_default();
            match self.check_signature(s, &message, target, now) {
                Ok(signer) => return Ok(signer),
                Err(e) => why.push(format!("signature {}{hint}: {e}", i + 1)),
            }
        }
        Err(why.join("; "))
    }

    fn check_signature(
        &self,
        s: &Signature,
        message: &[u8],
        target: &Target,
        now: SystemTime,
    ) -> Result<Signer, String> {
        let sig = base64_decode(&s.sig).map_err(|e| format!("sig is not base64: {e}"))?;
        if sig.len() != 64 {
            return Err(format!("sig is {} bytes, an ed25519 signature is 64", sig.len()));
        }
        match &s.certificate {
            None => self
                .roots
                .iter()
                .find(|k| k.verify(message, &sig))
                .map(|k| Signer::Root(*k))
                .ok_or_else(|| format!("not made by any of the {} trusted key(s)", self.roots.len())),
            Some(cert) => {
                let (c, root) = self.open_certificate(cert, now)?;
                let key = PublicKey::parse(&c.key).map_err(|e| format!("certificate key: {e}"))?;
                if !c.scope.covers(target) {
                    return Err(format!(
                        "the certificate of deploy key {} does not cover {target} (its scope: {})",
                        c.name.as_deref().unwrap_or(&c.key),
                        c.scope
                    ));
                }
                if !key.verify(message, &sig) {
                    return Err(format!("bad signature: not made by the certified key {}", key.to_text()));
                }
                Ok(Signer::Certified { key, name: c.name, root })
            }
        }
    }

    /// A deploy key's certificate: signed by a root, in its validity period.
    fn open_certificate(&self, cert: &Envelope, now: SystemTime) -> Result<(KeyCertificate, PublicKey), String> {
        if cert.payload_type != CERTIFICATE_TYPE {
            return Err(format!("certificate: payloadType is not {CERTIFICATE_TYPE}"));
        }
        let body = base64_decode(&cert.payload).map_err(|e| format!("certificate payload: {e}"))?;
        let message = pae(CERTIFICATE_TYPE, &body);
        let root = cert
            .signatures
            .iter()
            .take(8)
            .filter(|s| s.certificate.is_none())
            .filter_map(|s| base64_decode(&s.sig).ok())
            .find_map(|sig| self.roots.iter().find(|k| k.verify(&message, &sig)).copied())
            .ok_or_else(|| "certificate: not signed by a trusted root key".to_string())?;
        check_schema(&body, CERTIFICATE_SCHEMA).map_err(|e| format!("certificate: {e}"))?;
        let c: KeyCertificate = parse_json(&body).map_err(|e| format!("certificate: {e}"))?;
        let at = |what: &str, v: &str| {
            humantime::parse_rfc3339_weak(v)
                .map_err(|e| format!("certificate {what}: expected an RFC 3339 time, found {v:?} ({e})"))
        };
        let name = c.name.as_deref().unwrap_or(&c.key);
        let not_after = at("not_after", &c.not_after)?;
        if now > not_after {
            return Err(format!(
                "the certificate of deploy key {name} expired at {} (device time {})",
                c.not_after,
                fmt_time(now)
            ));
        }
        if let Some(nb) = &c.not_before
            && now < at("not_before", nb)?
        {
            return Err(format!(
                "the certificate of deploy key {name} is not valid before {nb} (device time {})",
                fmt_time(now)
            ));
        }
        Ok((c, root))
    }
}

/// What an unsigned deployment says it is, shortened: for the refusal's message.
fn claims(payload: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Claimed {
        deployment_id: Option<serde_json::Value>,
        revision: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Claimed>(payload) {
        Ok(Claimed { deployment_id: Some(serde_json::Value::String(id)), revision }) => format!(
            " (it claims deployment_id {}, revision {})",
            crate::error::excerpt(&id, 64),
            revision.and_then(|r| r.as_u64()).map_or("?".to_string(), |r| r.to_string())
        ),
        _ => String::new(),
    }
}

fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The target a message names must be the topic it came on; with keys
/// configured it must name one (else a message signed for one device could
/// be replayed on another's topic).
/// The topic a desired message arrived on: whose, and which model slot.
#[derive(Clone, Copy)]
struct Place<'a> {
    target: &'a Target,
    slot: Option<&'a str>,
}

fn check_target(
    target: &Option<Target>,
    slot: Option<&str>,
    place: Place,
    required: bool,
    claimed: Option<&Deployment>,
) -> Result<(), Refused> {
    let arrived_on = place.target;
    // Unsigned, a deployment without `slot` is for the slot it arrives in.
    let unnamed_ok = slot.is_none() && !required;
    if slot != place.slot && !unnamed_ok {
        let name = |s: Option<&str>| s.map_or("the default slot".to_string(), |s| format!("model slot {s}"));
        return Err(Refused::new(
            if required { ErrorCode::SignatureInvalid } else { ErrorCode::InvalidMessage },
            format!(
                "the message is for {} (\"slot\") but arrived on the desired topic of {}",
                crate::error::excerpt(&name(slot), 80),
                name(place.slot)
            ),
            claimed.cloned(),
        ));
    }
    match target {
        Some(t) if t == arrived_on => Ok(()),
        Some(t) => Err(Refused::new(
            ErrorCode::SignatureInvalid,
            format!("the message is for {t} but arrived on the topic of {arrived_on}"),
            claimed.cloned(),
        )),
        None if required => Err(Refused::new(
            ErrorCode::SignatureInvalid,
            format!(
                "a signed message must name its target (\"target\": {{\"device\": ...}} or {{\"group\": ...}}); it arrived on the topic of {arrived_on}"
            ),
            claimed.cloned(),
        )),
        None => Ok(()),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Base64, standard or URL-safe alphabet, padded or not (DSSE asks
/// verifiers to accept both); whitespace is skipped (PEM).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits, mut padding) = (0u32, 0u32, 0usize);
    for (i, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                padding += 1;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(format!("character {:?} at {i} is not base64", c as char)),
        };
        if padding > 0 {
            return Err(format!("data after '=' padding at {i}"));
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 || padding > 2 {
        return Err("truncated base64".into());
    }
    Ok(out)
}

fn pem_decode(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| {
        let found = text.lines().find(|l| l.starts_with("-----BEGIN")).unwrap_or("no PEM block");
        format!("expected a PEM {begin} block, found {found}")
    })? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| format!("PEM: {end} missing"))? + start;
    base64_decode(&text[start..stop]).map_err(|e| format!("PEM {label}: {e}"))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deployment(target: Option<Target>, rev: u64) -> Vec<u8> {
        let mut v = serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": "d1", "revision": rev,
            "model": {"name": "m", "version": "1", "manifest_url": "http://r/m/1/manifest.json",
                      "manifest_sha256": "c".repeat(64)}});
        if let Some(t) = target {
            v["target"] = serde_json::to_value(t).unwrap();
        }
        v.to_string().into_bytes()
    }

    fn cam() -> Target {
        Target::Device("cam-17".into())
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-12-01T00:00:00Z").unwrap()
    }

    #[test]
    fn base64_round_trips_and_accepts_both_alphabets() {
        for n in 0..40 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 250) as u8).collect();
            let s = base64_encode(&bytes);
            assert_eq!(base64_decode(&s).unwrap(), bytes);
            assert_eq!(base64_decode(s.trim_end_matches('=')).unwrap(), bytes);
            assert_eq!(base64_decode(&s.replace('+', "-").replace('/', "_")).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert!(base64_decode("aGVsbG8=x").is_err());
        assert!(base64_decode("a").is_err());
        assert!(base64_decode("a*b").unwrap_err().contains("'*'"));
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn keys_round_trip_through_pem_and_text() {
        let k = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&k.to_pem()).unwrap();
        assert_eq!(again.public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_pem()).unwrap(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_text()).unwrap(), k.public());
        assert!(PublicKey::parse("ed25519:AAAA").unwrap_err().contains("expected 32 bytes, found 3"));
        assert!(PublicKey::parse("hello").unwrap_err().starts_with("an ed25519 public key"));
        assert!(SigningKey::from_pem(&k.public().to_pem()).unwrap_err().contains("PRIVATE KEY"));
        let other = SigningKey::generate().unwrap();
        let bundle = format!("{}{}", k.public().to_pem(), other.public().to_pem());
        assert_eq!(PublicKey::parse_all(&bundle).unwrap(), vec![k.public(), other.public()]);
        let sig = k.sign(b"x");
        assert!(k.public().verify(b"x", &sig));
        assert!(!k.public().verify(b"y", &sig));
    }

    #[test]
    fn with_keys_only_a_signed_message_for_this_topic_opens() {
        let root = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let trust = Trust { roots: vec![root.public()] };
        let open = |bytes: &[u8]| trust.open(bytes, &cam(), now());

        let signed = root.seal(DEPLOYMENT_TYPE, &deployment(Some(cam()), 3), None);
        let (desired, signer) = open(&serde_json::to_vec(&signed).unwrap()).unwrap();
        assert!(matches!(desired, Desired::Deploy(d) if d.revision == 3));
        assert_eq!(signer, Signer::Root(root.public()));

        let e = open(&deployment(Some(cam()), u64::MAX)).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureRequired);
        assert!(
            e.error.message.contains("(it claims deployment_id \"d1\", revision 18446744073709551615)"),
            "{}",
            e.error.message
        );
        assert!(e.claimed.is_none(), "an unverified message is reported under no deployment id");
        assert_eq!(open(b"").unwrap_err().error.code, ErrorCode::SignatureRequired);

        let forged = other.seal(DEPLOYMENT_TYPE, &deployment(Some(cam()), 4), None);
        let e = open(&serde_json::to_vec(&forged).unwrap()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
        assert!(e.error.message.contains("not made by any of the 1 trusted key(s)"), "{}", e.error.message);

        // The signed bytes changed after signing.
        let mut tampered = signed.clone();
        tampered.payload = base64_encode(&deployment(Some(cam()), 9));
        let e = open(&serde_json::to_vec(&tampered).unwrap()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);

        // The type is signed too: a deployment's signature does not make an undeploy.
        let mut retyped = signed.clone();
        retyped.payload_type = UNDEPLOY_TYPE.into();
        assert!(open(&serde_json::to_vec(&retyped).unwrap()).is_err());

        let elsewhere = root.seal(DEPLOYMENT_TYPE, &deployment(Some(Target::Device("cam-18".into())), 5), None);
        let e = open(&serde_json::to_vec(&elsewhere).unwrap()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
        assert_eq!(e.error.message, "the message is for device cam-18 but arrived on the topic of device cam-17");

        let untargeted = root.seal(DEPLOYMENT_TYPE, &deployment(None, 5), None);
        let e = open(&serde_json::to_vec(&untargeted).unwrap()).unwrap_err();
        assert!(e.error.message.starts_with("a signed message must name its target"), "{}", e.error.message);

        let no_sigs = Envelope { signatures: vec![], ..signed.clone() };
        assert_eq!(open(&serde_json::to_vec(&no_sigs).unwrap()).unwrap_err().error.code, ErrorCode::SignatureRequired);
    }

    #[test]
    fn a_message_for_one_model_slot_is_refused_in_another() {
        let root = SigningKey::generate().unwrap();
        let trust = Trust { roots: vec![root.public()] };
        let with_slot = |slot: Option<&str>| {
            let mut v: serde_json::Value = serde_json::from_slice(&deployment(Some(cam()), 5)).unwrap();
            if let Some(s) = slot {
                v["slot"] = s.into();
            }
            serde_json::to_vec(&root.seal(DEPLOYMENT_TYPE, &serde_json::to_vec(&v).unwrap(), None)).unwrap()
        };
        // Signed for the slot it arrives in: accepted.
        let (d, _) = trust.open_in(&with_slot(Some("det")), &cam(), Some("det"), now()).unwrap();
        assert!(matches!(d, Desired::Deploy(d) if d.slot.as_deref() == Some("det")));
        trust.open_in(&with_slot(None), &cam(), None, now()).unwrap();
        // Replayed into another slot, or between a slot and the default topic.
        for (signed_for, arrived) in [(Some("det"), Some("cls")), (None, Some("det")), (Some("det"), None)] {
            let e = trust.open_in(&with_slot(signed_for), &cam(), arrived, now()).unwrap_err();
            assert_eq!(e.error.code, ErrorCode::SignatureInvalid, "{signed_for:?} on {arrived:?}");
            assert!(e.error.message.contains("arrived on the desired topic of"), "{}", e.error.message);
        }
        // Without keys a message naming another slot is still refused; one
        // naming none is for the slot it arrives in.
        let open = Trust::default();
        let mut v: serde_json::Value = serde_json::from_slice(&deployment(None, 5)).unwrap();
        v["slot"] = "det".into();
        let e = open.open_in(&serde_json::to_vec(&v).unwrap(), &cam(), Some("cls"), now()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidMessage);
        open.open_in(&serde_json::to_vec(&v).unwrap(), &cam(), Some("det"), now()).unwrap();
        open.open_in(&deployment(None, 5), &cam(), Some("cls"), now()).unwrap();
    }

    #[test]
    fn a_signed_undeploy_carries_its_revision() {
        let root = SigningKey::generate().unwrap();
        let trust = Trust { roots: vec![root.public()] };
        let u =
            Undeploy { schema: UNDEPLOY_SCHEMA.into(), revision: 7, target: cam(), deployment_id: None, slot: None };
        let env = root.seal(UNDEPLOY_TYPE, &serde_json::to_vec(&u).unwrap(), None);
        let (desired, _) = trust.open(&serde_json::to_vec(&env).unwrap(), &cam(), now()).unwrap();
        assert_eq!(desired, Desired::Undeploy { revision: Some(7), deployment_id: None });
        let e = trust.open(&serde_json::to_vec(&env).unwrap(), &Target::Group("cam-17".into()), now()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
    }

    #[test]
    fn certified_deploy_keys_are_held_to_their_expiry_and_scope() {
        let root = SigningKey::generate().unwrap();
        let deploy = SigningKey::generate().unwrap();
        let trust = Trust { roots: vec![root.public()] };
        let scope = Scope { devices: vec!["cam-*".into()], groups: vec!["cameras".into()] };
        let cert = root.certify(&deploy.public(), Some("ci"), "2027-01-01T00:00:00Z", scope);
        let seal = |t: Target, cert: &Envelope| {
            serde_json::to_vec(&deploy.seal(DEPLOYMENT_TYPE, &deployment(Some(t), 1), Some(cert.clone()))).unwrap()
        };
        let (_, signer) = trust.open(&seal(cam(), &cert), &cam(), now()).unwrap();
        assert!(matches!(signer, Signer::Certified { name: Some(n), .. } if n == "ci"));
        let g = Target::Group("cameras".into());
        assert!(trust.open(&seal(g.clone(), &cert), &g, now()).is_ok());

        let door = Target::Device("door-1".into());
        let e = trust.open(&seal(door.clone(), &cert), &door, now()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
        assert!(e.error.message.contains("does not cover device door-1"), "{}", e.error.message);

        let later = now() + Duration::from_secs(86_400 * 60);
        let e = trust.open(&seal(cam(), &cert), &cam(), later).unwrap_err();
        assert!(e.error.message.contains("expired at 2027-01-01T00:00:00Z"), "{}", e.error.message);

        // A certificate the deploy key wrote for itself is not a root's.
        let selfmade = deploy.certify(
            &deploy.public(),
            None,
            "2030-01-01T00:00:00Z",
            Scope { devices: vec!["*".into()], groups: vec![] },
        );
        let e = trust.open(&seal(cam(), &selfmade), &cam(), now()).unwrap_err();
        assert!(e.error.message.contains("not signed by a trusted root key"), "{}", e.error.message);
    }

    #[test]
    fn without_keys_anything_valid_opens_but_the_target_still_counts() {
        let trust = Trust::default();
        assert!(trust.open(&deployment(None, 1), &cam(), now()).is_ok());
        let e = trust.open(&deployment(Some(Target::Group("x".into())), 1), &cam(), now()).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
        assert_eq!(
            trust.open(b"", &cam(), now()).unwrap().0,
            Desired::Undeploy { revision: None, deployment_id: None }
        );
    }
}
