//! The rollout's record, retained on `Topics::rollout(group, slot)`: enough
//! to resume a rollout from another process (or after this one was killed)
//! and for anyone to see where it stands. Schema `outpost.rollout.v1`.
//!
//! It is written ahead of every step that changes a device: the devices a
//! stage moves are in `moved` before their desired states are published, so
//! an `--abort` or `--resume` after a kill finds every override this rollout
//! may have left.

use super::health::{Breach, Limits};
use outpost_protocol::{Deployment, ModelRef};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.rollout.v1";

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// In progress (or its tool was killed: `--resume` or `--abort` it).
    Running,
    /// A stage breached; the devices it had moved are back on the previous version.
    Halted,
    /// Every stage passed; the group's desired state holds the candidate.
    Done,
    /// Stopped by `--abort`; the devices it had moved are back on the previous version.
    Aborted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Halted => "halted",
            State::Done => "done",
            State::Aborted => "aborted",
        }
    }
}

/// The step of the current stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Not begun: its devices are not chosen yet.
    Pending,
    /// Measuring the chosen devices' p99 on the previous version.
    Baseline,
    /// The previous version serves with the candidate in shadow on the stage's devices.
    Shadow,
    /// The stage's devices were sent the candidate; waiting for `active`.
    Activating,
    /// The stage's devices serve the candidate; watching their health.
    Soaking,
    /// Every stage passed: the group's desired state moves, overrides are cleared.
    Completing,
    /// Halting or aborting: the devices moved are being returned.
    Returning,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Pending => "pending",
            Step::Baseline => "baseline",
            Step::Shadow => "shadow",
            Step::Activating => "activating",
            Step::Soaking => "soaking",
            Step::Completing => "completing",
            Step::Returning => "returning",
        }
    }
}

/// The deployment ids of a rollout: one for the candidate on each device's
/// own topic, one for the shadow step, one for the group at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ids {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    pub group: String,
}

/// A device left out of the rollout, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub device: String,
    pub why: String,
}

/// One finished (or halted) stage, as the report shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The stage as given (`1`, `10%`).
    pub stage: String,
    /// Devices moved once it is done, in all.
    pub target: usize,
    /// The devices this stage moved.
    pub devices: Vec<String>,
    /// Devices passed over because they were offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_offline: Vec<String>,
    /// Seconds from publishing to the last device's `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_s: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
    /// The same devices' p99 on the previous version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_p99_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_p99_ratio: Option<f64>,
    /// The lowest shadow agreement among its devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared: Option<u64>,
    /// Devices whose figures were not judged, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_judged: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach: Option<Breach>,
    /// `passed`, `breached`, `empty` (no new device to move), `aborted`.
    pub verdict: String,
}

impl StageReport {
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

/// The retained record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema: String,
    /// `rollout-<milliseconds since 1970>`.
    pub id: String,
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The version rolled out.
    pub candidate: ModelRef,
    /// The group's desired state when the rollout began (what devices return
    /// to); `null` when the group had none (they return to serving nothing).
    pub previous: Option<Deployment>,
    pub ids: Ids,
    /// The stages as given.
    pub stages: Vec<String>,
    pub soak_s: f64,
    pub limits: Limits,
    /// With a shadow step: the share of requests the candidate runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_sample: Option<f64>,
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Whether its desired states are signed (`--resume`/`--abort` need the key again).
    #[serde(default)]
    pub signed: bool,
    /// The group's devices taking part, by name (the stages' order).
    pub members: Vec<String>,
    /// Devices of the group left out (their own desired state outranks the group's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
    pub state: State,
    /// Index of the current stage in `stages` (`stages.len()` once they all passed).
    pub stage: usize,
    pub step: Step,
    /// When the step began (milliseconds since 1970): a resumed soak runs what is left of it.
    pub step_since_ms: u64,
    /// The current stage so far: its devices, and its figures as they come.
    #[serde(default)]
    pub current: StageReport,
    /// Their p99 on the previous version (µs), measured before they moved.
    #[serde(default)]
    pub baseline_p99_us: std::collections::BTreeMap<String, u64>,
    /// Devices whose own desired topic holds a desired state of this rollout now.
    pub moved: Vec<String>,
    /// Stages finished so far.
    #[serde(default)]
    pub done: Vec<StageReport>,
    /// Why it halted or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach: Option<Breach>,
    /// RFC 3339.
    pub started_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl Record {
    pub fn from_json(bytes: &[u8]) -> Result<Record, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => serde_json::from_value(v).map_err(|e| e.to_string()),
            Some(other) => Err(format!("schema {other:?}, expected {SCHEMA:?}")),
            None => Err("no schema".into()),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `digits@2`.
    pub fn candidate_name(&self) -> String {
        format!("{}@{}", self.candidate.name, self.candidate.version)
    }

    /// `digits@1`, or `nothing` when the group had no desired state.
    pub fn previous_name(&self) -> String {
        match &self.previous {
            Some(p) => format!("{}@{}", p.model.name, p.model.version),
            None => "nothing".into(),
        }
    }
}

/// Now as RFC 3339 UTC (seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Now in milliseconds since 1970.
pub fn now_ms() -> u64 {
    crate::operator::clock_revision()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_other_schemas_are_refused() {
        let r = Record {
            schema: SCHEMA.into(),
            id: "rollout-1".into(),
            group: "cameras".into(),
            slot: None,
            candidate: ModelRef {
                name: "digits".into(),
                version: "2".into(),
                manifest_url: "http://r/digits/2/manifest.json".into(),
                manifest_sha256: "ab".repeat(32),
            },
            previous: None,
            ids: Ids { candidate: "c".into(), shadow: None, group: "g".into() },
            stages: vec!["1".into(), "100%".into()],
            soak_s: 60.0,
            limits: Limits::default(),
            shadow_sample: None,
            allow_downgrade: false,
            signed: false,
            members: vec!["cam-0".into()],
            excluded: vec![],
            state: State::Running,
            stage: 0,
            step: Step::Soaking,
            step_since_ms: 5,
            current: StageReport { devices: vec!["cam-0".into()], ..Default::default() },
            baseline_p99_us: Default::default(),
            moved: vec!["cam-0".into()],
            done: vec![],
            reason: None,
            breach: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
        };
        let json = r.to_json();
        assert_eq!(Record::from_json(&json).unwrap(), r);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!((v["state"].as_str(), v["step"].as_str()), (Some("running"), Some("soaking")));
        assert_eq!(r.previous_name(), "nothing");
        assert_eq!(r.candidate_name(), "digits@2");
        let other = String::from_utf8(json).unwrap().replace(SCHEMA, "outpost.rollout.v9");
        assert!(Record::from_json(other.as_bytes()).unwrap_err().contains("outpost.rollout.v9"));
    }
}
