//! `Telemetry`: periodic health report on `outpost/devices/{id}/telemetry`.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.telemetry.v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub schema: String,
    pub device: String,
    pub at: String,
    pub uptime_s: u64,
    /// The model serving, if any.
    pub model: Option<ModelId>,
    pub inference: InferenceStats,
    pub process: ProcessStats,
    pub store: StoreStats,
    pub mqtt: MqttStats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceStats {
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    pub latency_us: Latency,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub cpu_percent: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub bytes: u64,
    pub versions: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MqttStats {
    pub reconnects: u64,
    /// Events and answers waiting in the on-disk journal for the broker.
    #[serde(default)]
    pub journal_pending: u64,
    /// Journaled messages dropped to keep the journal's bound (telemetry
    /// first, then answers, deployment events last; oldest first), since start.
    #[serde(default)]
    pub journal_dropped: u64,
    /// Bytes the journal takes on disk (bounded by `mqtt.journal_max_bytes`).
    #[serde(default)]
    pub journal_bytes: u64,
}
