//! `DeploymentEvent`: one per phase of a deployment on `outpost/devices/{id}/events`.

use crate::{ErrorInfo, ProtocolError, check_schema, parse_json};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.event.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Received,
    Downloading,
    Verifying,
    Loading,
    Validating,
    Active,
    Failed,
    RolledBack,
    Superseded,
    Unchanged,
    /// The desired state was withdrawn and the device stopped serving.
    Undeployed,
    /// A report on the candidate the active deployment scores in shadow
    /// (`shadow` holds the figures); not a step of a deployment.
    Shadow,
    /// A phase this build does not know (a newer agent's).
    #[serde(other)]
    Unknown,
}

impl Phase {
    /// The wire name (`rolled_back`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Received => "received",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Loading => "loading",
            Phase::Validating => "validating",
            Phase::Active => "active",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled_back",
            Phase::Superseded => "superseded",
            Phase::Unchanged => "unchanged",
            Phase::Undeployed => "undeployed",
            Phase::Shadow => "shadow",
            Phase::Unknown => "unknown",
        }
    }

    /// A phase after which nothing more happens for this deployment.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Active
                | Phase::Failed
                | Phase::RolledBack
                | Phase::Superseded
                | Phase::Unchanged
                | Phase::Undeployed
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub bytes: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentEvent {
    pub schema: String,
    pub device: String,
    pub deployment_id: String,
    pub revision: u64,
    pub seq: u64,
    /// RFC 3339 UTC.
    pub at: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// On `failed` (and on `rolled_back`, the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Human-readable detail (e.g. which file, which model version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// On `active`: where the deployment's time went, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings_ms: Option<Timings>,
    /// The model slot the deployment is for; absent for the default slot
    /// (the device's `desired` topic and its groups').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// On `shadow`: how the candidate scored so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::telemetry::ShadowStats>,
    /// On `active`: which inference engine serves the model and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
}

/// The inference engine a deployment settled on (`model.runtime`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    /// `tract` or `onnxruntime`.
    pub runtime: String,
    /// Threads one request runs on (1, or every core).
    pub threads: usize,
    /// Why this engine: e.g. "faster: 8.41 ms vs 106.2 ms for tract",
    /// "tract cannot load the model: ...", "onnxruntime unavailable: ...".
    pub reason: String,
    /// The golden sample's best run time on each engine that ran it, in
    /// milliseconds (`tract`, `onnxruntime`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub golden_ms: std::collections::BTreeMap<String, f64>,
}

/// Milliseconds spent in each step of a deployment (on `active`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Fetching the manifest and the missing files (sha256 and sizes checked as they stream).
    pub download: f64,
    /// Installing the version in the store, or re-verifying a version already stored.
    pub verify: f64,
    /// Loading and optimising the model (tract).
    pub load: f64,
    /// Running the golden sample (and timing the executors when `auto`).
    pub validate: f64,
    /// Swapping it in and recording the state.
    pub activate: f64,
    /// From the start of the deployment to `active`.
    pub total: f64,
}

impl DeploymentEvent {
    pub fn from_json(bytes: &[u8]) -> Result<DeploymentEvent, ProtocolError> {
        check_schema(bytes, SCHEMA)?;
        parse_json(bytes)
    }

    /// One line for a person: phase, progress, error, detail.
    pub fn summary(&self) -> String {
        let mut line = format!("{:<12}", self.phase.as_str());
        if let Some(p) = self.progress {
            line.push_str(&format!(" {}/{} bytes", p.bytes, p.total));
        }
        if let Some(e) = &self.error {
            line.push_str(&format!(" {}: {}", e.code, e.message));
        }
        if let Some(d) = &self.detail {
            line.push_str(&format!(" ({d})"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn phase_names_are_the_wire_names() {
        use super::Phase::*;
        for p in [
            Received,
            Downloading,
            Verifying,
            Loading,
            Validating,
            Active,
            Failed,
            RolledBack,
            Superseded,
            Unchanged,
            Undeployed,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }
}
