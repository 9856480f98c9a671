//! `DeviceState`: retained on `outpost/devices/{id}/state`, rewritten on every change.

use crate::{ErrorInfo, ProtocolError, check_schema, parse_json};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.state.v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub schema: String,
    pub device: String,
    pub agent_version: String,
    /// The groups the device takes desired states from, in precedence
    /// order (its configuration), so operator tools can find a group's devices.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Increases with every state or event the device publishes.
    pub seq: u64,
    /// RFC 3339 UTC time this state was published (retained messages carry
    /// no age of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// What serves now; `null` when nothing does.
    pub active: Option<ActiveModel>,
    /// The outcome of the most recent deployment the device worked on.
    #[serde(default)]
    pub last_deployment: Option<LastDeployment>,
    /// The model slots (`devices/{id}/models/{slot}/desired`), by slot
    /// name; the fields above are the default slot's (the `desired` topic).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub models: std::collections::BTreeMap<String, SlotState>,
}

/// What one model slot serves and how its last deployment ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    pub active: Option<ActiveModel>,
    #[serde(default)]
    pub last_deployment: Option<LastDeployment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveModel {
    pub name: String,
    pub version: String,
    pub manifest_sha256: String,
    pub deployment_id: String,
    pub revision: u64,
    /// RFC 3339 UTC time the model started serving.
    pub since: String,
    /// The inference engine serving it (`tract`, `onnxruntime`); absent
    /// from agents older than the choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Being worked on now.
    InProgress,
    Active,
    Failed,
    RolledBack,
    Superseded,
    /// The deployment was withdrawn (empty desired payload): nothing serves.
    Undeployed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastDeployment {
    pub deployment_id: String,
    pub revision: u64,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl DeviceState {
    pub fn from_json(bytes: &[u8]) -> Result<DeviceState, ProtocolError> {
        check_schema(bytes, SCHEMA)?;
        parse_json(bytes)
    }
}
