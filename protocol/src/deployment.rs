//! `Deployment`: the desired state an operator publishes, retained, on
//! `outpost/devices/{id}/desired` or `outpost/groups/{group}/desired`.

use crate::{ErrorCode, ProtocolError, check_schema, is_sha256_hex, parse_json};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.deployment.v1";

/// The desired state of a device: which model version it should serve and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub schema: String,
    /// Operator-chosen id, echoed in every event of this deployment.
    pub deployment_id: String,
    /// Monotonic per target: an older or equal revision never replaces a newer one.
    pub revision: u64,
    pub model: ModelRef,
    #[serde(default)]
    pub serving: Serving,
    #[serde(default)]
    pub policy: Policy,
    /// Who the deployment is for: `{"device": "cam-17"}` or `{"group":
    /// "cameras"}`. Required in a signed deployment (see [`crate::trust`]);
    /// when present, it must be the topic the message arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::trust::Target>,
    /// The model slot the deployment is for (`.../models/{slot}/desired`);
    /// absent for the default slot. When present it must be the slot of the
    /// topic the message arrived on; a signed deployment for a slot must
    /// name it (so it cannot be replayed into another slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// A candidate version to score in shadow beside `model`: it runs on a
    /// sampled share of live requests, its answers are compared and never
    /// returned. `model` answers every request as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

/// The candidate of a shadow deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub model: ModelRef,
    /// Share of requests the candidate also runs on, above 0.0 up to 1.0.
    pub sample_rate: f64,
}

/// Where the model version's manifest is, and its digest (the root of trust:
/// every file is then checked against the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    /// `http://`, `https://` or `file://` URL of `manifest.json`.
    pub manifest_url: String,
    /// sha256 of the manifest bytes, 64 lowercase hex.
    pub manifest_sha256: String,
}

/// How the device serves the model. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Serving {
    /// Local Open Inference Protocol v2 HTTP port (bound on 127.0.0.1 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// Inference worker threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Requests waiting for a worker before new ones are refused as `overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    /// Share of requests whose input and prediction are published on `capture`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_rate: Option<f64>,
}

/// Deployment policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Versions kept in the store besides the active one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_downgrade: Option<bool>,
    /// How a new version is watched after it takes traffic, and when the
    /// agent rolls back to the version it replaced by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<Probation>,
}

/// The probation window after a swap. Every field is optional; the defaults
/// are [`Probation::DEFAULT_SECONDS`] s, [`Probation::DEFAULT_MIN_REQUESTS`]
/// requests and an error rate of [`Probation::DEFAULT_MAX_ERROR_RATE`], no
/// latency limit. `seconds: 0` turns probation off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    /// Length of the window after the swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Requests the new version must have answered before its error rate and
    /// latency are judged (non-finite outputs are judged at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Highest share of requests that may fail inside the model (a run error
    /// or a non-finite output on a finite input), 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Highest p99 latency, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<f64>,
    /// Highest p99 latency as a multiple of the replaced version's p99 just before the swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    /// Non-finite outputs (NaN or infinity for a finite input) that roll the
    /// version back at once, without waiting for `min_requests`: more than
    /// one by default, so one request cannot veto a rollout; they count as
    /// failures in the error rate too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_non_finite: Option<u64>,
}

impl Probation {
    pub const DEFAULT_SECONDS: u64 = 60;
    pub const DEFAULT_MIN_REQUESTS: u64 = 20;
    pub const DEFAULT_MAX_ERROR_RATE: f64 = 0.05;
    pub const DEFAULT_MAX_NON_FINITE: u64 = 3;
}

impl Deployment {
    /// Parses and validates a desired-state payload. Errors are
    /// `invalid_message` or `unsupported_schema` with the field path.
    pub fn from_json(bytes: &[u8]) -> Result<Deployment, ProtocolError> {
        check_schema(bytes, SCHEMA)?;
        let d: Deployment = parse_json(bytes)?;
        d.validate()?;
        Ok(d)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.schema != SCHEMA {
            return Err(ProtocolError {
                code: ErrorCode::UnsupportedSchema,
                path: "schema".into(),
                expected: format!("\"{SCHEMA}\""),
                found: format!("\"{}\"", self.schema),
            });
        }
        non_empty("deployment_id", &self.deployment_id, 128)?;
        non_empty("model.name", &self.model.name, 128)?;
        non_empty("model.version", &self.model.version, 128)?;
        for (path, v) in [("model.name", &self.model.name), ("model.version", &self.model.version)] {
            if v.contains('/') || v == "." || v == ".." {
                return Err(ProtocolError::invalid(
                    path,
                    "a name without '/' that is not '.' or '..'",
                    crate::error::excerpt(v, 80),
                ));
            }
        }
        check_url("model.manifest_url", &self.model.manifest_url)?;
        if !is_sha256_hex(&self.model.manifest_sha256) {
            return Err(ProtocolError::invalid(
                "model.manifest_sha256",
                "64 lowercase hex digits (sha256 of manifest.json)",
                crate::error::excerpt(&self.model.manifest_sha256, 80),
            ));
        }
        if let Some(w) = self.serving.workers
            && !(1..=256).contains(&w)
        {
            return Err(ProtocolError::invalid("serving.workers", "1 to 256", w.to_string()));
        }
        if let Some(q) = self.serving.max_queue
            && q > 1_000_000
        {
            return Err(ProtocolError::invalid("serving.max_queue", "0 to 1000000", q.to_string()));
        }
        if let Some(r) = self.serving.capture_rate
            && !(0.0..=1.0).contains(&r)
        {
            return Err(ProtocolError::invalid("serving.capture_rate", "a number from 0.0 to 1.0", r.to_string()));
        }
        if let Some(p) = &self.policy.probation {
            if let Some(s) = p.seconds
                && s > 86_400
            {
                return Err(ProtocolError::invalid("policy.probation.seconds", "0 to 86400", s.to_string()));
            }
            if let Some(r) = p.max_error_rate
                && !(0.0..=1.0).contains(&r)
            {
                return Err(ProtocolError::invalid(
                    "policy.probation.max_error_rate",
                    "a number from 0.0 to 1.0",
                    r.to_string(),
                ));
            }
            if let Some(ms) = p.max_p99_ms
                && !(ms > 0.0 && ms.is_finite())
            {
                return Err(ProtocolError::invalid("policy.probation.max_p99_ms", "a positive number", ms.to_string()));
            }
            if let Some(r) = p.max_p99_ratio
                && !(r >= 1.0 && r.is_finite())
            {
                return Err(ProtocolError::invalid("policy.probation.max_p99_ratio", "a number >= 1.0", r.to_string()));
            }
            if p.max_non_finite == Some(0) {
                return Err(ProtocolError::invalid("policy.probation.max_non_finite", "a count >= 1", "0"));
            }
        }
        if let Some(t) = &self.target {
            let (path, name) = match t {
                crate::trust::Target::Device(d) => ("target.device", d),
                crate::trust::Target::Group(g) => ("target.group", g),
            };
            crate::topics::validate_name(path, name)?;
        }
        if let Some(slot) = &self.slot {
            crate::topics::validate_slot(slot)?;
        }
        if let Some(sh) = &self.shadow {
            if !(sh.sample_rate > 0.0 && sh.sample_rate <= 1.0) {
                return Err(ProtocolError::invalid(
                    "shadow.sample_rate",
                    "a number above 0.0, at most 1.0",
                    sh.sample_rate.to_string(),
                ));
            }
            non_empty("shadow.model.name", &sh.model.name, 128)?;
            non_empty("shadow.model.version", &sh.model.version, 128)?;
            check_url("shadow.model.manifest_url", &sh.model.manifest_url)?;
            if !is_sha256_hex(&sh.model.manifest_sha256) {
                return Err(ProtocolError::invalid(
                    "shadow.model.manifest_sha256",
                    "64 lowercase hex digits (sha256 of manifest.json)",
                    crate::error::excerpt(&sh.model.manifest_sha256, 80),
                ));
            }
        }
        if self.serving.http_port == Some(0) {
            return Err(ProtocolError::invalid("serving.http_port", "a port from 1 to 65535", "0"));
        }
        Ok(())
    }
}

fn non_empty(path: &str, v: &str, max: usize) -> Result<(), ProtocolError> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(ProtocolError::invalid(
            path,
            format!("a non-empty string of at most {max} bytes without control characters"),
            crate::error::excerpt(v, 80),
        ));
    }
    Ok(())
}

/// Accepts `http://host...`, `https://host...` and `file:///abs/path`.
pub fn check_url(path: &str, url: &str) -> Result<(), ProtocolError> {
    let expected = "an http://, https:// or file:// URL";
    let ok = if let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && !host.contains(char::is_whitespace)
    } else if let Some(rest) = url.strip_prefix("file://") {
        rest.starts_with('/')
    } else {
        false
    };
    if ok && !url.contains(char::is_whitespace) {
        Ok(())
    } else {
        Err(ProtocolError::invalid(path, expected, crate::error::excerpt(url, 120)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> serde_json::Value {
        serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": "d-42", "revision": 42,
            "model": {"name": "digits", "version": "2",
                      "manifest_url": "http://registry.example:8000/digits/2/manifest.json",
                      "manifest_sha256": "a".repeat(64)}})
    }

    fn parse(v: serde_json::Value) -> Result<Deployment, ProtocolError> {
        Deployment::from_json(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn minimal_deployment_parses_with_defaults() {
        let d = parse(good()).unwrap();
        assert_eq!(d.revision, 42);
        assert_eq!(d.serving, Serving::default());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = good();
        v["future_field"] = serde_json::json!({"x": 1});
        v["model"]["signature"] = serde_json::json!("...");
        assert!(parse(v).is_ok());
    }

    #[test]
    fn errors_name_the_field_and_what_was_expected() {
        let mut v = good();
        v["model"]["manifest_sha256"] = serde_json::json!("ABC");
        let e = parse(v).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidMessage);
        assert_eq!(e.path, "model.manifest_sha256");
        assert_eq!(
            e.to_string(),
            "model.manifest_sha256: expected 64 lowercase hex digits (sha256 of manifest.json), found \"ABC\""
        );

        let mut v = good();
        v["revision"] = serde_json::json!("42");
        let e = parse(v).unwrap_err();
        assert_eq!(e.path, "revision");
        assert!(e.found.contains("invalid type: string \"42\""), "{e}");

        let mut v = good();
        v["model"].as_object_mut().unwrap().remove("manifest_url");
        let e = parse(v).unwrap_err();
        assert_eq!(e.path, "model");
        assert!(e.found.contains("missing field `manifest_url`"), "{e}");

        let mut v = good();
        v["model"]["manifest_url"] = serde_json::json!("ftp://x/y");
        assert_eq!(parse(v).unwrap_err().path, "model.manifest_url");

        let e = Deployment::from_json(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidMessage);
    }

    #[test]
    fn unknown_schema_is_refused_as_unsupported() {
        let mut v = good();
        v["schema"] = serde_json::json!("outpost.deployment.v9");
        let e = parse(v).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedSchema);
        assert_eq!(e.found, "\"outpost.deployment.v9\"");
        let mut v = good();
        v.as_object_mut().unwrap().remove("schema");
        assert_eq!(parse(v).unwrap_err().path, "schema");
    }
}
