//! The Outpost wire protocol: what devices and operators say to each other.
//!
//! Map of the crate:
//! - [`topics`]: MQTT topic names under a configurable prefix, and the rules for
//!   device and group names.
//! - [`deployment`]: the desired state an operator publishes ([`Deployment`]).
//! - [`manifest`]: a registered model version and its files ([`Manifest`]).
//! - [`state`], [`event`], [`telemetry`]: what a device reports back.
//! - [`infer`]: KServe Open Inference Protocol v2 request / response bodies.
//! - [`binary`]: its binary tensor data extension (raw tensor bytes after the JSON).
//! - [`trust`]: signed desired state (DSSE envelopes, ed25519 keys, key certificates).
//! - [`error`]: stable error codes and the precise validation error every parser returns.
//!
//! Every message is JSON and carries a `schema`; unknown fields are ignored and an
//! unknown `schema` is refused, so the protocol can grow without breaking old agents.
//! This crate does no I/O: both sides parse and validate with the same code.

pub mod binary;
pub mod deployment;
pub mod error;
pub mod event;
pub mod infer;
pub mod manifest;
pub mod state;
pub mod telemetry;
pub mod topics;
pub mod trust;

pub use deployment::{Deployment, ModelRef, Policy, Probation, Serving, Shadow};
pub use error::{ErrorCode, ErrorInfo, ProtocolError};
pub use event::{Backend, DeploymentEvent, Phase, Progress, Timings};
pub use infer::{
    Datatype, InferError, InferReply, InferRequest, InferResponse, OutData, TensorData, TensorIn, TensorOut,
};
pub use manifest::{
    Executor, FileEntry, Manifest, ModelSpec, Postprocess, Preprocess, Runtime, TensorSpec, Validation,
};
pub use state::{ActiveModel, DeviceState, LastDeployment, Outcome, SlotState};
pub use telemetry::Telemetry;
pub use topics::Topics;

use serde::de::DeserializeOwned;

/// Parses JSON into `T`, reporting the field path of the first error
/// (`model.manifest_sha256: invalid type: integer `5`, expected a string`).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let path = if path == "." { String::new() } else { path };
        // serde's message quotes the offending value: shortened, since it may
        // be megabytes an attacker chose.
        let text = inner.to_string();
        let text = if text.chars().count() > 200 {
            format!("{}...", text.chars().take(200).collect::<String>())
        } else {
            text
        };
        ProtocolError::invalid(path, "valid JSON of this message type", text)
    })
}

/// Checks the `schema` field before anything else, so a message from a newer
/// protocol is refused as `unsupported_schema`, not as a confusing field error.
pub(crate) fn check_schema(bytes: &[u8], expected: &str) -> Result<(), ProtocolError> {
    #[derive(serde::Deserialize)]
    struct Head {
        schema: Option<serde_json::Value>,
    }
    let head: Head = parse_json(bytes)?;
    match head.schema {
        None => Err(ProtocolError::invalid("schema", format!("\"{expected}\""), "nothing (field missing)")),
        Some(serde_json::Value::String(s)) if s == expected => Ok(()),
        Some(serde_json::Value::String(s)) => Err(ProtocolError {
            code: ErrorCode::UnsupportedSchema,
            path: "schema".into(),
            expected: format!("\"{expected}\""),
            found: crate::error::excerpt(&s, 80),
        }),
        Some(other) => Err(ProtocolError::invalid(
            "schema",
            format!("\"{expected}\""),
            crate::error::excerpt(&other.to_string(), 80),
        )),
    }
}

/// Lowercase hex of a byte string (sha256 digests on the wire are 64 lowercase hex).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// True for a sha256 digest as the protocol writes it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Shortens a digest for messages: `ab12cd34..`.
pub fn short_digest(s: &str) -> String {
    if s.len() > 12 { format!("{}..", &s[..12]) } else { s.to_string() }
}
