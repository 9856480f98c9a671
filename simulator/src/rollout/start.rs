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
    let key = p.signer.as_ref().map(|s| s.key.public());
    let mut rec = match p.action {
        Action::Start(s) => {
            let trust = key.map(|k| trust::Trust { roots: [vec![k], p.trust_keys.clone()].concat() });
            new_record(&w, &p.group, p.slot.as_deref(), &s, existing.as_ref(), trust.as_ref()).await?
        }
        Action::Resume | Action::Abort => {
            let what = if by_abort { "abort" } else { "resume" };
            let rec = existing
                .ok_or_else(|| Error::Usage(format!("no rollout is recorded on {record_topic}: nothing to {what}")))?;
            if (rec.signed || trust::is_envelope(&w.record)) && p.signer.is_none() {
                return Err(Error::Usage(format!(
                    "rollout {} signs its desired states: give --sign-key (and --certificate) again",
                    rec.id
                )));
            }
            // The record is input from the broker: with a key, only one it
            // signed is acted on; in any case its fields must hold together
            // and match the flags.
            let refused = |e: String| {
                Error::Usage(format!(
                    "{record_topic}: refused to {what} the rollout it holds: {e} (nothing was changed)"
                ))
            };
            let rec = Record::open(&w.record, key.as_ref()).map_err(refused)?;
            rec.check(&p.group, p.slot.as_deref()).map_err(refused)?;
            if !rec.signed && p.signer.is_some() {
                return Err(refused("it was started without --sign-key: resume or abort it without one".into()));
            }
            if !by_abort && rec.state == State::Running {
                recheck_candidate(&rec, p.registry_url.as_deref()).await?;
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
    // This run owns the rollout now: another run that sees the token change stops.
    rec.owner = Some(owner_token());
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

/// A token for this run: pid, clock and randomness.
fn owner_token() -> String {
    format!("{}-{}-{:x}", std::process::id(), record::now_ms(), outpost_agent::sys::jitter().to_bits())
}

/// The candidate of a rollout to resume, looked up again: the registry
/// (`--registry-url`, or the one its manifest URL names) must serve the
/// same manifest, byte for byte.
async fn recheck_candidate(rec: &Record, registry: Option<&str>) -> Result<(), Error> {
    let c = &rec.candidate;
    let suffix = format!("/{}/{}/manifest.json", c.name, c.version);
    let registry = match registry {
        Some(r) => r.trim_end_matches('/').to_string(),
        None => c.manifest_url.strip_suffix(&suffix).map(str::to_string).ok_or_else(|| {
            Error::Usage(format!(
                "rollout {}: its candidate's manifest URL {} is not a registry's {suffix}: refused",
                rec.id, c.manifest_url
            ))
        })?,
    };
    let (url, sha) = operator::lookup_manifest(&registry, &c.name, &c.version, Duration::from_secs(60))
        .await
        .map_err(|e| if e.permanent { Error::Usage(e.message) } else { Error::Unavailable(e.message) })?;
    if url != c.manifest_url || sha != c.manifest_sha256 {
        return Err(Error::Usage(format!(
            "rollout {}: its candidate {} is {} (sha256 {}) in the record, but the registry has {url} (sha256 {sha}): refused (nothing was changed)",
            rec.id,
            rec.candidate_name(),
            c.manifest_url,
            c.manifest_sha256
        )));
    }
    Ok(())
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
    if s.limits.offline_grace_s > 86_400.0 {
        return Err(Error::Usage("--offline-grace: at most a day (86400 s)".into()));
    }
    if s.soak.as_secs_f64() > record::MAX_SOAK_S {
        return Err(Error::Usage("--soak: at most 30 days".into()));
    }
    s.limits.check().map_err(Error::Usage)
}

/// The group's desired state from its topic's payload: a deployment (plain
/// or signed), or nothing (empty, or a signed undeployment). With `trust`
/// (a signing rollout), only an envelope one of its keys verifies (for
/// this group and slot) is taken: its model, serving settings and policy
/// go into what the rollout signs.
fn previous_deployment(
    payload: &[u8],
    group: &str,
    slot: Option<&str>,
    trust: Option<&trust::Trust>,
) -> Result<Option<Deployment>, String> {
    if payload.is_empty() {
        return Ok(None);
    }
    if let Some(t) = trust {
        if !trust::is_envelope(payload) {
            return Err("it is not signed, and a signing rollout copies the group's model, serving settings and policy into what it signs: sign it (deploy --sign-key), or give the key that did with --trust-key".into());
        }
        let now = std::time::SystemTime::now();
        let target = trust::Target::Group(group.into());
        let opened = t.open_in(payload, &target, slot, now).or_else(|first| {
            // A deploy key's own signature: its certificate aside, the key is one of ours.
            let mut env: trust::Envelope = serde_json::from_slice(payload).map_err(|_| first.clone())?;
            env.signatures.iter_mut().for_each(|s| s.certificate = None);
            t.open_in(&serde_json::to_vec(&env).unwrap_or_default(), &target, slot, now).map_err(|_| first)
        });
        return match opened {
            Ok((trust::Desired::Deploy(d), _)) => Ok(Some(*d)),
            Ok((trust::Desired::Undeploy { .. }, _)) => Ok(None),
            Err(r) => Err(format!(
                "its signature does not verify against --sign-key's key or a --trust-key ({}: {})",
                r.error.code, r.error.message
            )),
        };
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
    trust: Option<&trust::Trust>,
) -> Result<Record, Error> {
    let signed = trust.is_some();
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
    let previous = previous_deployment(&w.group_desired, group, slot, trust)
        .map_err(|e| Error::Usage(format!("{topics_group} holds no deployment this rollout can start from: {e}")))?;
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
    let (members, excluded) = split_members(w, all, previous.as_ref());
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
        owner: None,
    })
}

/// The members a rollout takes, and those it leaves out: a device whose
/// own desired topic holds a desired state (it outranks the group's), and
/// one that does not serve the group's current deployment (it follows
/// another desired state, e.g. a group listed before this one: moving it
/// would take it from there, and it would go back at the end).
fn split_members(w: &Watch, all: Vec<String>, previous: Option<&Deployment>) -> (Vec<String>, Vec<Excluded>) {
    let (mut members, mut excluded) = (Vec::new(), Vec::new());
    let want = previous.map(|p| p.deployment_id.as_str());
    for m in all {
        if let Some(o) = w.override_of(&m) {
            let id = operator::revision_of(o).and_then(|(_, id)| id).unwrap_or_else(|| "unreadable".into());
            excluded.push(Excluded {
                device: m,
                why: format!(
                    "its own desired topic holds {id}, which outranks the group's: left as it is (withdraw it to include the device)"
                ),
            });
            continue;
        }
        let serving = w.slot_state(&m).and_then(|(a, _)| a).map(|a| a.deployment_id.clone());
        if serving.as_deref() != want {
            excluded.push(Excluded {
                why: format!(
                    "it serves {}, not the group's {}: it follows another desired state (a group listed before this one, or it failed the group's): left as it is",
                    serving.as_deref().unwrap_or("nothing"),
                    want.unwrap_or("nothing")
                ),
                device: m,
            });
            continue;
        }
        members.push(m);
    }
    (members, excluded)
}

fn w_group_topic(w: &Watch, group: &str, slot: Option<&str>) -> String {
    w.topics().group_desired_in(group, slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{DeviceState, Topics};

    #[test]
    fn members_serving_another_desired_state_are_left_out() {
        let mut w = Watch::new(Topics::default(), "cameras", None);
        let golden: DeviceState =
            DeviceState::from_json(include_bytes!("../../../protocol/golden/state.json")).expect("golden");
        for (name, groups, active) in [
            ("cam-a", vec!["cameras"], Some("g-1")),
            ("cam-b", vec!["vip", "cameras"], Some("vip-7")),
            ("cam-c", vec!["cameras"], None),
        ] {
            let mut s = golden.clone();
            s.device = name.into();
            s.groups = groups.into_iter().map(String::from).collect();
            match active {
                Some(id) => s.active.as_mut().unwrap().deployment_id = id.into(),
                None => s.active = None,
            }
            let topic = format!("outpost/devices/{name}/state");
            w.ingest(rumqttc::Publish::new(topic, rumqttc::QoS::AtMostOnce, serde_json::to_vec(&s).unwrap()));
        }
        let mut prev = Deployment::from_json(include_bytes!("../../../protocol/golden/deployment.json")).unwrap();
        prev.deployment_id = "g-1".into();
        let (members, excluded) = split_members(&w, w.members("cameras"), Some(&prev));
        assert_eq!(members, ["cam-a"]);
        let out: Vec<&str> = excluded.iter().map(|e| e.device.as_str()).collect();
        assert_eq!(out, ["cam-b", "cam-c"]);
        assert!(excluded[0].why.starts_with("it serves vip-7, not the group's g-1"), "{:?}", excluded[0]);
    }
}
