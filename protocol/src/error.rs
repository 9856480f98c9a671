//! Error codes (a stable contract operators script against) and validation errors.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable snake_case error codes carried in events, state and inference errors.
/// New codes may be added; existing ones are never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidMessage,
    UnsupportedSchema,
    StaleRevision,
    DownloadFailed,
    DigestMismatch,
    SizeMismatch,
    TooLarge,
    InvalidManifest,
    UnsafePath,
    ModelLoadFailed,
    ValidationFailed,
    DiskFull,
    SignatureInvalid,
    /// Trust keys are configured and the desired state is not signed.
    SignatureRequired,
    DowngradeRefused,
    Overloaded,
    BadInput,
    NoModel,
    /// The model failed on a valid request: its run failed, or it returned a
    /// non-finite output for a finite input.
    InferenceFailed,
    /// A new version broke its probation limits; the agent rolled back.
    ProbationFailed,
    /// The deployment's `serving.http_port` cannot be listened on (in use, or not allowed).
    PortUnavailable,
    /// The model would not fit in memory beside the serving one.
    InsufficientMemory,
    /// An unexpected failure inside the agent (I/O error on its own data dir, a bug).
    Internal,
    /// The model's first load or golden sample broke a limit of the isolated
    /// validation (memory or time); the message gives the evidence.
    ResourceLimit,
    /// The agent died while installing this version, or repeatedly while
    /// serving it (the crash-loop breaker): quarantined until a new revision.
    ModelCrashed,
    /// An MQTT request's `reply_to` (or MQTT 5 response topic) is outside the
    /// reply prefixes the device answers on; the answer went to `predictions`.
    ReplyRefused,
    /// A URL scheme or location the device is configured not to fetch from
    /// (`file://` unless `download.file_root` allows it).
    UrlRefused,
    /// A desired state for a new model slot while the device already has
    /// as many slots as it allows (16).
    SlotLimit,
    /// A code this build does not know (a newer agent's): read as a
    /// failure, so one new code never makes a whole message unreadable.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnsupportedSchema => "unsupported_schema",
            ErrorCode::StaleRevision => "stale_revision",
            ErrorCode::DownloadFailed => "download_failed",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::SizeMismatch => "size_mismatch",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidManifest => "invalid_manifest",
            ErrorCode::UnsafePath => "unsafe_path",
            ErrorCode::ModelLoadFailed => "model_load_failed",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::SignatureInvalid => "signature_invalid",
            ErrorCode::SignatureRequired => "signature_required",
            ErrorCode::DowngradeRefused => "downgrade_refused",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::BadInput => "bad_input",
            ErrorCode::NoModel => "no_model",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::ProbationFailed => "probation_failed",
            ErrorCode::PortUnavailable => "port_unavailable",
            ErrorCode::InsufficientMemory => "insufficient_memory",
            ErrorCode::Internal => "internal",
            ErrorCode::ResourceLimit => "resource_limit",
            ErrorCode::ModelCrashed => "model_crashed",
            ErrorCode::ReplyRefused => "reply_refused",
            ErrorCode::UrlRefused => "url_refused",
            ErrorCode::SlotLimit => "slot_limit",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code": "...", "message": "..."}` as carried in events and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorInfo { code, message: message.into() }
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A message or manifest that does not follow the protocol: where, what was
/// expected, what was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}expected {expected}, found {found}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ProtocolError {
    /// `invalid_message`, `unsupported_schema`, `invalid_manifest` or `unsafe_path`.
    pub code: ErrorCode,
    /// Field path, e.g. `model.manifest_sha256` or `files[2].path`; empty for the whole message.
    pub path: String,
    pub expected: String,
    pub found: String,
}

impl ProtocolError {
    pub fn invalid(path: impl Into<String>, expected: impl Into<String>, found: impl Into<String>) -> Self {
        ProtocolError {
            code: ErrorCode::InvalidMessage,
            path: path.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// The same error under another code (a manifest's errors are `invalid_manifest`).
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        if self.code == ErrorCode::InvalidMessage {
            self.code = code;
        }
        self
    }

    pub fn info(&self) -> ErrorInfo {
        ErrorInfo::new(self.code, self.to_string())
    }
}

/// Shows at most `max` characters of an offending value in an error message.
pub fn excerpt(s: &str, max: usize) -> String {
    // Control characters escaped: a quoted value cannot start a new log
    // line (journald reads a `<N>` priority at the start of each) or move
    // a terminal's cursor.
    let shown = |c: char| if c.is_control() { c.escape_default().to_string() } else { c.to_string() };
    if s.chars().count() <= max {
        format!("\"{}\"", s.chars().map(shown).collect::<String>())
    } else {
        let cut: String = s.chars().take(max).map(shown).collect();
        format!("\"{cut}...\" ({} bytes)", s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newer agent's code or phase does not make a whole message unreadable.
    #[test]
    fn unknown_codes_and_phases_read_as_unknown() {
        let e: ErrorInfo = serde_json::from_str(r#"{"code": "gpu_on_fire", "message": "m"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown);
        let s = crate::DeviceState::from_json(
            br#"{"schema": "outpost.state.v1", "device": "d", "agent_version": "9", "seq": 1, "active": null,
                 "last_deployment": {"deployment_id": "x", "revision": 1, "outcome": "failed",
                                     "error": {"code": "gpu_on_fire", "message": "m"}}}"#,
        )
        .unwrap();
        assert_eq!(s.last_deployment.unwrap().error.unwrap().code, ErrorCode::Unknown);
        let p: crate::Phase = serde_json::from_str(r#""teleporting""#).unwrap();
        assert_eq!(p, crate::Phase::Unknown);
        assert!(!p.is_final());
    }
}
