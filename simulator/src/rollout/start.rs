//! Starting a run: the checks made before anything is published, the
//! record of a new rollout, and the engine for a resume or an abort.

use super::engine::Engine;
use super::plan::Stage;
use super::record::{self, Excluded, Ids, Record, StageReport, State, Step};
use super::ui::Ui;
use super::watch::Watch;
use super::{Action, Error, Params, Report, Start};
use crate::operator::{self, Operator};
use outpost_protocol::trust;
use outpost_protocol::{Deployment, ModelRef};
use std::collections::BTreeMap;
use std::time::Duration;

pub(super) async fn run(p: Params) -> Result<Report, Error> {
    outpost_protocol::topics::validate_name("group", &p.group).map_err(|e| Error::Usage(format!("--group: {e}")))?;
    if let Some(s) = &p.slot {
        outpost_protocol::topics::validate_slot(s).map_err(|e| Error::Usage(format!("--slot: {e}")))?;
    }
    if let Action::Start(s) = &p.action {
        check_start(s)?;
    }
    let client_id = format!("outpost-sim-rollout-{}-{}", std::process::id(), record::now_ms() % 1_000_000_000);
    let mut op = Operator::connect_tls(&p.broker, &client_id, p.topics.clone(), true, p.tls.clone())
        .await
        .map_err(Error::Unavailable)?;
    let w = Watch::start(&mut op, &p.group, p.slot.as_deref()).await.map_err(Error::Unavailable)?;
    let record_topic = p.topics.rollout(&p.group, p.slot.as_deref());
    let existing = match w.record.is_empty() {
        true => None,
        false => Some(Record::from_json(&w.record).map_err(|e| {
            Error::Usage(format!(
                "{record_topic} holds something that is not a rollout record ({e}); clear it (mosquitto_pub -r -n -t {record_topic}) if nothing uses it"
            ))
        })?),
    };
    let ui = Ui::new(p.progress);
    let by_abort = matches!(p.action, Action::Abort);
    let rec = match p.action {
        Action::Start(s) => {
            new_record(&w, &p.group, p.slot.as_deref(), &s, existing.as_ref(), p.signer.is_some()).await?
        }
        Action::Resume | Action::Abort => {
            let what = if by_abort { "abort" } else { "resume" };
            let rec = existing
                .ok_or_else(|| Error::Usage(format!("no rollout is recorded on {record_topic}: nothing to {what}")))?;
            if rec.signed && p.signer.is_none() {
                return Err(Error::Usage(format!(
                    "rollout {} signs its desired states: give --sign-key (and --certificate) again",
                    rec.id
                )));
            }
            if rec.state != State::Running && rec.moved.is_empty() {
                return Err(Error::Usage(format!(
                    "rollout {} of {} to group {} is {}: nothing to {what}",
                    rec.id,
                    rec.candidate_name(),
                    rec.group,
                    rec.state.as_str()
                )));
            }
            rec
        }
    };
    let stages = rec
        .stages
        .iter()
        .map(|s| s.parse::<Stage>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Usage(format!("{record_topic}: {e}")))?;
    let mut engine = Engine {
        op,
        w,
        rec,
        stages,
        signer: p.signer,
        timeout: p.timeout,
        ui,
        baseline: BTreeMap::new(),
        collect: None,
        shadow: None,
        shadow_last: BTreeMap::new(),
        guard: true,
    };
    let report = if by_abort { engine.abort().await } else { engine.go().await };
    engine.ui.end();
    // The record's last write reaches the broker before the session ends.
    if let Err(e) = engine.w.sync(&mut engine.op).await {
        engine.op.disconnect().await;
        return Err(Error::Unavailable(format!("the rollout's record may not be up to date: {e}")));
    }
    engine.op.disconnect().await;
    report.map(|mut r| {
        r.by_abort = by_abort;
        r
    })
}

fn check_start(s: &Start) -> Result<(), Error> {
    let share = |what: &str, v: Option<f64>, low_open: bool| match v {
        Some(x) if !(x <= 1.0 && if low_open { x > 0.0 } else { x >= 0.0 }) => {
            let range = if low_open { "above 0 up to 1" } else { "from 0 to 1" };
            Err(Error::Usage(format!("{what}: expected a share {range}, found {x}")))
        }
        _ => Ok(()),
    };
    share("--max-error-rate", s.limits.max_error_rate, false)?;
    share("--min-agreement", s.limits.min_agreement, false)?;
    share("--shadow-sample", s.shadow_sample, true)?;
    if let Some(r) = s.limits.max_p99_ratio
        && !(r > 0.0 && r.is_finite())
    {
        return Err(Error::Usage(format!("--max-p99-ratio: expected a positive multiple, found {r}")));
    }
    if s.shadow_sample.is_some() != s.limits.min_agreement.is_some() {
        return Err(Error::Usage("--shadow-sample and --min-agreement go together".into()));
    }
    if s.stages.is_empty() {
        return Err(Error::Usage("--stages: expected at least one stage".into()));
    }
    Ok(())
}

/// The group's desired state from its topic's payload: a deployment (plain
/// or signed), or nothing (empty, or a signed undeployment).
fn previous_deployment(payload: &[u8]) -> Result<Option<Deployment>, String> {
    if payload.is_empty() {
        return Ok(None);
    }
    let inner = match serde_json::from_slice::<trust::Envelope>(payload) {
        Ok(env) if env.payload_type == trust::UNDEPLOY_TYPE => return Ok(None),
        Ok(env) => trust::base64_decode(&env.payload)?,
        Err(_) => payload.to_vec(),
    };
    Deployment::from_json(&inner).map(Some).map_err(|e| e.to_string())
}

/// The record of a new rollout, after the checks that refuse one.
async fn new_record(
    w: &Watch,
    group: &str,
    slot: Option<&str>,
    s: &Start,
    existing: Option<&Record>,
    signed: bool,
) -> Result<Record, Error> {
    if let Some(r) = existing
        && (r.state == State::Running || !r.moved.is_empty())
    {
        return Err(Error::Usage(format!(
            "rollout {} of {} to group {} is {} (stage {} of {}, step {}, updated {}): --resume or --abort it first",
            r.id,
            r.candidate_name(),
            r.group,
            r.state.as_str(),
            (r.stage + 1).min(r.stages.len()),
            r.stages.len(),
            r.step.as_str(),
            r.updated_at
        )));
    }
    let (url, sha) = operator::lookup_manifest(&s.registry_url, &s.model, &s.version, Duration::from_secs(60))
        .await
        .map_err(|e| if e.permanent { Error::Usage(e.message) } else { Error::Unavailable(e.message) })?;
    let topics_group = w_group_topic(w, group, slot);
    let previous = previous_deployment(&w.group_desired)
        .map_err(|e| Error::Usage(format!("{topics_group} holds no deployment this tool can read: {e}")))?;
    if let Some(p) = &previous
        && p.model.name == s.model
        && p.model.version == s.version
    {
        return Err(Error::Usage(format!(
            "group {group} already desires {}@{} ({}): nothing to roll out",
            s.model, s.version, p.deployment_id
        )));
    }
    if s.shadow_sample.is_some() && previous.is_none() {
        return Err(Error::Usage(format!(
            "--shadow-sample: {topics_group} holds no deployment for the candidate to run beside"
        )));
    }
    let all = w.members(group);
    if all.is_empty() {
        return Err(Error::Usage(format!(
            "no device's retained state lists group {group} (its `groups`): nothing to roll out to"
        )));
    }
    let (mut members, mut excluded) = (Vec::new(), Vec::new());
    for m in all {
        match w.override_of(&m) {
            Some(o) => {
                let id = operator::revision_of(o).and_then(|(_, id)| id).unwrap_or_else(|| "unreadable".into());
                excluded.push(Excluded {
                    device: m,
                    why: format!(
                        "its own desired topic holds {id}, which outranks the group's: left as it is (withdraw it to include the device)"
                    ),
                });
            }
            None => members.push(m),
        }
    }
    if members.is_empty() {
        return Err(Error::Usage(format!(
            "every device of group {group} has its own desired state, which outranks the group's: nothing to roll out to"
        )));
    }
    let ms = record::now_ms();
    let id_or = |id: String, short: String| if id.len() <= 128 { id } else { short };
    let ids = Ids {
        candidate: id_or(format!("{}-{}-canary-{ms}", s.model, s.version), format!("rollout-{ms}-canary")),
        shadow: previous.as_ref().filter(|_| s.shadow_sample.is_some()).map(|p| {
            id_or(format!("{}-{}-shadow-{ms}", p.model.name, p.model.version), format!("rollout-{ms}-shadow"))
        }),
        group: id_or(format!("{}-{}-{ms}", s.model, s.version), format!("rollout-{ms}")),
    };
    let now = record::now_rfc3339();
    Ok(Record {
        schema: record::SCHEMA.into(),
        id: format!("rollout-{ms}"),
        group: group.into(),
        slot: slot.map(str::to_string),
        candidate: ModelRef {
            name: s.model.clone(),
            version: s.version.clone(),
            manifest_url: url,
            manifest_sha256: sha,
        },
        previous,
        ids,
        stages: s.stages.iter().map(Stage::to_string).collect(),
        soak_s: s.soak.as_secs_f64(),
        limits: s.limits,
        shadow_sample: s.shadow_sample,
        allow_downgrade: s.allow_downgrade,
        signed,
        members,
        excluded,
        state: State::Running,
        stage: 0,
        step: Step::Pending,
        step_since_ms: ms,
        current: StageReport::default(),
        baseline_p99_us: BTreeMap::new(),
        moved: Vec::new(),
        done: Vec::new(),
        reason: None,
        breach: None,
        started_at: now.clone(),
        updated_at: now,
        finished_at: None,
    })
}

fn w_group_topic(w: &Watch, group: &str, slot: Option<&str>) -> String {
    w.topics().group_desired_in(group, slot)
}
