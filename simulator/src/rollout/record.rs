//! The rollout's record, retained on `Topics::rollout(group, slot)`: enough
//! to resume a rollout from another process (or after this one was killed)
//! and for anyone to see where it stands. Schema `outpost.rollout.v1`.
//!
//! It is written ahead of every step that changes a device: the devices a
//! stage moves are in `moved` before their desired states are published, so
//! an `--abort` or `--resume` after a kill finds every override this rollout
//! may have left.

use super::health::{Breach, Limits};
use outpost_protocol::topics::validate_name;
use outpost_protocol::trust::{self, Envelope, PublicKey, SigningKey};
use outpost_protocol::{Deployment, ModelRef};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "outpost.rollout.v1";
/// The DSSE payload type of a signed record (`--sign-key`).
pub const ROLLOUT_TYPE: &str = "application/vnd.outpost.rollout+json";
/// The longest soak a record may ask for (30 days).
pub const MAX_SOAK_S: f64 = 30.0 * 86_400.0;

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
    /// Devices that failed within `--max-failed` (returned to the previous version), and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
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
    /// When the step began (milliseconds since 1970); a resumed soak starts again.
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
    /// The run driving it now (a token each run draws): a run that sees
    /// another owner, or a state other than running, stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Record {
    /// A record, plain or in a signed envelope, WITHOUT checking any
    /// signature: for display, never for acting on it (see [`Record::open`]).
    pub fn from_json(bytes: &[u8]) -> Result<Record, String> {
        if trust::is_envelope(bytes) {
            let env: Envelope = serde_json::from_slice(bytes).map_err(|e| format!("not an envelope: {e}"))?;
            if env.payload_type != ROLLOUT_TYPE {
                return Err(format!("an envelope of type {:?}, expected {ROLLOUT_TYPE:?}", env.payload_type));
            }
            return Record::plain(&trust::base64_decode(&env.payload)?);
        }
        Record::plain(bytes)
    }

    /// A record to act on. With `key` (the public half of `--sign-key`)
    /// it must be an envelope of [`ROLLOUT_TYPE`] one of whose signatures
    /// that key made; without, the record as it is (unsigned rollouts
    /// trust whoever can write the record's topic: the broker's ACL must
    /// keep others out).
    pub fn open(bytes: &[u8], key: Option<&PublicKey>) -> Result<Record, String> {
        let Some(key) = key else { return Record::from_json(bytes) };
        if !trust::is_envelope(bytes) {
            return Err(format!(
                "the record is not signed (expected a {ROLLOUT_TYPE} envelope signed by {})",
                key.to_text()
            ));
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| format!("not an envelope: {e}"))?;
        if env.payload_type != ROLLOUT_TYPE {
            return Err(format!("an envelope of type {:?}, expected {ROLLOUT_TYPE:?}", env.payload_type));
        }
        let body = trust::base64_decode(&env.payload)?;
        let message = trust::pae(&env.payload_type, &body);
        let signed = env
            .signatures
            .iter()
            .take(8)
            .filter_map(|s| trust::base64_decode(&s.sig).ok())
            .any(|sig| key.verify(&message, &sig));
        if !signed {
            return Err(format!("the record is not signed by {} (the key of --sign-key)", key.to_text()));
        }
        Record::plain(&body)
    }

    /// The record in a DSSE envelope signed by `key`.
    pub fn sealed(&self, key: &SigningKey) -> Vec<u8> {
        serde_json::to_vec(&key.seal(ROLLOUT_TYPE, &self.to_json(), None)).unwrap_or_default()
    }

    /// Refuses a record that is not for `group` and `slot`, or whose
    /// fields do not hold together: names that are not device names,
    /// moved or current devices that are not members, numbers out of range.
    pub fn check(&self, group: &str, slot: Option<&str>) -> Result<(), String> {
        if self.group != group {
            return Err(format!("it is for group {:?}, not --group {group}", self.group));
        }
        if self.slot.as_deref() != slot {
            return Err(format!(
                "it is for slot {}, not {}",
                self.slot.as_deref().unwrap_or("(default)"),
                slot.map(|s| format!("--slot {s}")).unwrap_or_else(|| "the default slot".into())
            ));
        }
        let id_ok = |what: &str, id: &str| match !id.is_empty() && id.len() <= 128 && !id.chars().any(char::is_control)
        {
            true => Ok(()),
            false => Err(format!("{what}: {id:?} is not a deployment id")),
        };
        validate_name("candidate.name", &self.candidate.name).map_err(|e| e.to_string())?;
        validate_name("candidate.version", &self.candidate.version).map_err(|e| e.to_string())?;
        id_ok("id", &self.id)?;
        id_ok("ids.candidate", &self.ids.candidate)?;
        id_ok("ids.group", &self.ids.group)?;
        if let Some(s) = &self.ids.shadow {
            id_ok("ids.shadow", s)?;
        }
        let mut members = std::collections::HashSet::new();
        for m in &self.members {
            validate_name("device", m).map_err(|e| format!("members: {e}"))?;
            if !members.insert(m.as_str()) {
                return Err(format!("members: {m} is listed twice"));
            }
        }
        for e in &self.excluded {
            validate_name("device", &e.device).map_err(|e| format!("excluded: {e}"))?;
        }
        let member = |what: &str, list: &[String]| {
            list.iter().try_for_each(|d| match members.contains(d.as_str()) {
                true => Ok(()),
                false => Err(format!("{what}: {} is not one of its members", super::ui::escape(d, false))),
            })
        };
        member("moved", &self.moved)?;
        member("current.devices", &self.current.devices)?;
        let keys: Vec<String> = self.baseline_p99_us.keys().cloned().collect();
        member("baseline_p99_us", &keys)?;
        if !(self.soak_s.is_finite() && (0.0..=MAX_SOAK_S).contains(&self.soak_s)) {
            return Err(format!("soak_s {} is not a number of seconds from 0 to {MAX_SOAK_S}", self.soak_s));
        }
        if self.stages.is_empty() || self.stages.len() > 100 {
            return Err(format!("stages: expected 1 to 100 stages, found {}", self.stages.len()));
        }
        super::plan::parse_stages(&self.stages.join(",")).map_err(|e| format!("stages: {e}"))?;
        if self.stage > self.stages.len() {
            return Err(format!("stage {} is past its {} stages", self.stage, self.stages.len()));
        }
        self.limits.check().map_err(|e| format!("limits: {e}"))?;
        if let Some(x) = self.shadow_sample
            && !(x > 0.0 && x <= 1.0)
        {
            return Err(format!("shadow_sample {x} is not a share above 0 up to 1"));
        }
        if self.shadow_sample.is_some() != (self.ids.shadow.is_some() && self.previous.is_some()) {
            return Err("shadow_sample, ids.shadow and previous do not go together".into());
        }
        Ok(())
    }

    fn plain(bytes: &[u8]) -> Result<Record, String> {
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
    use outpost_protocol::trust::SigningKey;

    #[test]
    fn a_record_round_trips_and_other_schemas_are_refused() {
        let r = sample();
        let json = r.to_json();
        assert_eq!(Record::from_json(&json).unwrap(), r);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!((v["state"].as_str(), v["step"].as_str()), (Some("running"), Some("soaking")));
        assert_eq!(r.previous_name(), "nothing");
        assert_eq!(r.candidate_name(), "digits@2");
        let other = String::from_utf8(json).unwrap().replace(SCHEMA, "outpost.rollout.v9");
        assert!(Record::from_json(other.as_bytes()).unwrap_err().contains("outpost.rollout.v9"));
    }

    #[test]
    fn a_record_is_checked_against_the_flags_before_it_is_acted_on() {
        let ok = sample();
        assert_eq!(ok.check("cameras", None), Ok(()));
        let refused = |r: Record, group: &str, slot: Option<&str>, words: &str| {
            let e = r.check(group, slot).expect_err(words);
            assert!(e.contains(words), "{e:?} lacks {words:?}");
        };
        refused(ok.clone(), "victims", None, "group");
        refused(Record { group: "victims".into(), ..ok.clone() }, "cameras", None, "group");
        refused(ok.clone(), "cameras", Some("det"), "slot");
        refused(Record { moved: vec!["cam-0".into(), "other-dev".into()], ..ok.clone() }, "cameras", None, "other-dev");
        let mut current = ok.clone();
        current.current.devices.push("pinned-1".into());
        refused(current, "cameras", None, "pinned-1");
        refused(Record { members: vec!["cam-0".into(), "../x".into()], ..ok.clone() }, "cameras", None, "../x");
        refused(Record { members: vec!["cam-0".into(), "cam-0".into()], ..ok.clone() }, "cameras", None, "twice");
        for soak in [-1.0, f64::NAN, f64::INFINITY, 1e12] {
            refused(Record { soak_s: soak, ..ok.clone() }, "cameras", None, "soak_s");
        }
        refused(Record { stages: vec![], ..ok.clone() }, "cameras", None, "stages");
        refused(Record { stages: vec!["50%".into(), "10%".into()], ..ok.clone() }, "cameras", None, "stages");
        refused(Record { stage: 3, ..ok.clone() }, "cameras", None, "stage");
        let bad_limits = Limits { max_error_rate: Some(2.0), ..Limits::default() };
        refused(Record { limits: bad_limits, ..ok.clone() }, "cameras", None, "max_error_rate");
        refused(Record { shadow_sample: Some(0.5), ..ok.clone() }, "cameras", None, "shadow");
    }

    #[test]
    fn a_signed_record_opens_only_with_its_key() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let r = sample();
        let sealed = r.sealed(&key);
        assert_eq!(Record::open(&sealed, Some(&key.public())).unwrap(), r);
        assert!(Record::open(&sealed, Some(&other.public())).unwrap_err().contains("not signed by"));
        assert!(Record::open(&r.to_json(), Some(&key.public())).unwrap_err().contains("not signed"));
        // Anyone may read one (the tests, --abort's refusal without a key).
        assert_eq!(Record::from_json(&sealed).unwrap(), r);
        assert_eq!(Record::open(&r.to_json(), None).unwrap(), r);
    }

    fn sample() -> Record {
        Record {
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
            members: vec!["cam-0".into(), "cam-1".into()],
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
            owner: None,
        }
    }
}
