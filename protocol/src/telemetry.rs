//! `Telemetry`: periodic health report on `outpost/devices/{id}/telemetry`.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.telemetry.v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub schema: String,
    pub device: String,
    pub at: String,
    pub uptime_s: u64,
    /// Seconds between two reports (`--telemetry-interval`): the figures
    /// below cover one such interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    /// The model serving, if any.
    pub model: Option<ModelId>,
    pub inference: InferenceStats,
    pub process: ProcessStats,
    pub store: StoreStats,
    pub mqtt: MqttStats,
    /// The candidate the default slot's deployment scores in shadow, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
    /// Each model slot's model and statistics, by slot name (the fields
    /// above are the default slot's).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub models: std::collections::BTreeMap<String, SlotTelemetry>,
}

/// One model slot's share of a telemetry report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotTelemetry {
    pub model: Option<ModelId>,
    pub inference: InferenceStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
}

/// How a candidate scored in shadow beside the active model, over the
/// requests sampled since it started (cumulative: a rollout compares
/// successive reports).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowStats {
    pub model: ModelId,
    /// Requests the candidate ran on (its answers are never returned).
    pub compared: u64,
    /// Rows (samples of a batch) of those requests whose outputs were compared.
    #[serde(default)]
    pub rows: u64,
    /// Of those rows, how many had the same top-1 class as the active
    /// model's (arg max of the row in the first numeric output).
    pub top1_agree: u64,
    /// `top1_agree / rows` (0.0 while no row was compared).
    pub agreement: f64,
    /// Largest absolute difference seen between the two models' outputs.
    pub max_abs_diff: f64,
    /// Runs of the candidate that failed (or whose outputs differed in shape).
    pub errors: u64,
    /// Sampled requests skipped because the candidate was still busy.
    pub skipped: u64,
    /// The candidate's latency and the active model's on the same requests.
    pub latency_us: Latency,
    pub active_latency_us: Latency,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceStats {
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    /// Of `errors`, the requests the model itself failed (`inference_failed`:
    /// a run error, a non-finite output), not a client's mistakes
    /// (`bad_input`, `no_model`, `too_large`): what a rollout judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_errors: Option<u64>,
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
