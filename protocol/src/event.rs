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
}

impl Phase {
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
}

impl DeploymentEvent {
    pub fn from_json(bytes: &[u8]) -> Result<DeploymentEvent, ProtocolError> {
        check_schema(bytes, SCHEMA)?;
        parse_json(bytes)
    }
}
