//! The steps of a rollout over MQTT. A stage goes
//! `pending → baseline → shadow → activating → soaking`, each step written
//! to the retained record before it changes a device; a breach anywhere
//! halts and returns every device the rollout moved; after the last stage
//! the group's desired state moves and the overrides are cleared.

use super::health::{self, Breach, Traffic};
use super::plan::{self, Stage};
use super::record::{self, Excluded, Ids, Record, StageReport, State, Step};
use super::ui::Ui;
use super::watch::Watch;
use super::{Action, Error, Params, Report, Start};
use crate::operator::{self, Operator};
use crate::progress::event_line;
use crate::signing::Signer;
use outpost_protocol::telemetry::{ModelId, ShadowStats};
use outpost_protocol::trust::{self, Target};
use outpost_protocol::{Deployment, DeploymentEvent, ModelRef, Outcome, Shadow};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Why the stages stopped before the end.
enum Stop {
    Breach(Breach),
    /// Another run's `--abort` (the reason it recorded).
    Aborted(String),
    /// The broker connection failed.
    Broker(String),
}

/// What the stage's devices report on the candidate, from the moment each is active.
#[derive(Debug, Default)]
struct Collect {
    /// Active devices, with whether their next report is still to be
    /// skipped (its interval straddles the swap).
    active: BTreeMap<String, bool>,
    traffic: BTreeMap<String, Traffic>,
}

/// How the moves back (or to the group's deployment) ended.
#[derive(Debug, Default)]
struct Moves {
    confirmed: Vec<String>,
    unconfirmed: Vec<String>,
    failed: Vec<String>,
}

struct Engine {
    op: Operator,
    w: Watch,
    rec: Record,
    stages: Vec<Stage>,
    signer: Option<Signer>,
    timeout: Duration,
    ui: Ui,
    /// Each device's traffic on the previous version while not moved.
    baseline: BTreeMap<String, Traffic>,
    collect: Option<Collect>,
    /// The shadow step's latest candidate statistics, by device.
    shadow: Option<BTreeMap<String, Option<ShadowStats>>>,
    /// Stop when another run marks this rollout aborted.
    guard: bool,
}

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

fn same_model(m: &ModelId, r: &ModelRef) -> bool {
    m.name == r.name && m.version == r.version
}

/// The order of the steps of a stage (a resumed stage skips those before its own).
fn rank(s: Step) -> u8 {
    match s {
        Step::Pending => 0,
        Step::Baseline => 1,
        Step::Shadow => 2,
        Step::Activating => 3,
        Step::Soaking => 4,
        Step::Completing | Step::Returning => 5,
    }
}

impl Engine {
    /// Runs (or resumes) the rollout to its end.
    async fn go(&mut self) -> Result<Report, Error> {
        if self.rec.state != State::Running {
            // A halt or abort whose run was killed while returning devices.
            self.ui.say(&format!(
                "rollout {} is {}: returning the devices it moved",
                self.rec.id,
                self.rec.state.as_str()
            ));
            let moves = self.return_moved().await.map_err(broker_error)?;
            self.finish().await.map_err(broker_error)?;
            return Ok(self.report(moves, false));
        }
        self.say_start();
        if self.rec.step == Step::Pending && self.rec.stage == 0 && self.rec.done.is_empty() {
            self.save().await.map_err(broker_error)?;
        }
        match self.stages().await {
            Ok(()) => match self.complete().await {
                Ok(moves) => Ok(self.report(moves, false)),
                Err(e) => self.stopped(e).await,
            },
            Err(e) => self.stopped(e).await,
        }
    }

    async fn stopped(&mut self, e: Stop) -> Result<Report, Error> {
        self.ui.end();
        match e {
            Stop::Breach(b) => {
                let moves = self.halt(b).await.map_err(broker_error)?;
                Ok(self.report(moves, false))
            }
            Stop::Aborted(why) => {
                self.ui.say(&format!("stopped: another run aborted rollout {}: {why}", self.rec.id));
                self.rec.state = State::Aborted;
                self.rec.reason = Some(why);
                Ok(self.report(Moves::default(), true))
            }
            Stop::Broker(e) => Err(Error::Unavailable(format!(
                "{e}; rollout {} stays recorded as running: --resume it once the broker is back",
                self.rec.id
            ))),
        }
    }

    fn say_start(&self) {
        let r = &self.rec;
        let slot = r.slot.as_ref().map(|s| format!(" slot {s}")).unwrap_or_default();
        let resumed = if r.stage > 0 || r.step != Step::Pending { " (resumed)" } else { "" };
        self.ui.say(&format!(
            "rollout {}{resumed}: {} to group {}{slot} ({} device(s), previous {}), stages {}, soak {} s",
            r.id,
            r.candidate_name(),
            r.group,
            r.members.len(),
            r.previous_name(),
            r.stages.join(","),
            r.soak_s
        ));
        for e in &r.excluded {
            self.ui.say(&format!("  left out: {}: {}", e.device, e.why));
        }
    }

    async fn stages(&mut self) -> Result<(), Stop> {
        let targets = plan::targets(&self.stages, self.rec.members.len());
        while self.rec.stage < self.stages.len() {
            let k = self.rec.stage;
            if self.rec.step == Step::Pending {
                let moved: BTreeSet<String> = self.rec.moved.iter().cloned().collect();
                let (picked, skipped) = plan::pick(&self.rec.members, &moved, targets[k], |d| self.w.is_online(d));
                self.rec.current = StageReport {
                    stage: self.stages[k].to_string(),
                    target: targets[k],
                    devices: picked,
                    skipped_offline: skipped,
                    verdict: "running".into(),
                    ..Default::default()
                };
                let c = &self.rec.current;
                self.ui.say(&format!(
                    "stage {}/{} ({}): {} device(s): {}{}",
                    k + 1,
                    self.stages.len(),
                    c.stage,
                    c.devices.len(),
                    names(&c.devices),
                    if c.skipped_offline.is_empty() {
                        String::new()
                    } else {
                        format!("; passed over (offline): {}", names(&c.skipped_offline))
                    }
                ));
                if c.devices.is_empty() {
                    self.rec.current.verdict = "empty".into();
                    self.next_stage().await?;
                    continue;
                }
            }
            let need_baseline = self.rec.limits.max_p99_ratio.is_some() && self.rec.previous.is_some();
            if need_baseline && rank(self.rec.step) <= rank(Step::Baseline) {
                self.measure_baseline().await?;
            }
            if self.rec.shadow_sample.is_some() && rank(self.rec.step) <= rank(Step::Shadow) {
                self.shadow_step().await?;
            }
            if rank(self.rec.step) <= rank(Step::Activating) {
                self.promote().await?;
            }
            self.soak_candidate().await?;
            self.rec.current.verdict = "passed".into();
            self.ui.say(&format!("stage {}/{} passed", k + 1, self.stages.len()));
            self.next_stage().await?;
        }
        Ok(())
    }

    async fn next_stage(&mut self) -> Result<(), Stop> {
        self.rec.done.push(std::mem::take(&mut self.rec.current));
        self.rec.stage += 1;
        self.set_step(Step::Pending);
        self.save().await
    }

    fn set_step(&mut self, step: Step) {
        self.rec.step = step;
        self.rec.step_since_ms = record::now_ms();
    }

    fn stage_devices(&self) -> Vec<String> {
        self.rec.current.devices.clone()
    }

    /// Records the stage's devices as moved before anything is published to them.
    fn mark_moved(&mut self) {
        for d in self.stage_devices() {
            if !self.rec.moved.contains(&d) {
                self.rec.moved.push(d);
            }
        }
    }

    /// The p99 each of the stage's devices has on the previous version,
    /// waiting up to one soak for those with too little traffic so far.
    async fn measure_baseline(&mut self) -> Result<(), Stop> {
        self.set_step(Step::Baseline);
        self.save().await?;
        let devices = self.stage_devices();
        let limits = self.rec.limits;
        let until = Instant::now() + Duration::from_secs_f64(self.rec.soak_s);
        let measured =
            |e: &Engine, d: &str| health::baseline_p99(&e.baseline.get(d).copied().unwrap_or_default(), &limits);
        self.ui.say(&format!("  measuring p99 on {} before moving them", self.rec.previous_name()));
        self.ui.begin(devices.len() as u64, "measured");
        loop {
            let done = devices.iter().filter(|d| measured(self, d).is_some()).count();
            self.ui.update(done as u64, "");
            let now = Instant::now();
            if done == devices.len() || now >= until {
                break;
            }
            self.pump(until.saturating_duration_since(now).min(Duration::from_millis(250))).await?;
        }
        self.ui.end();
        for d in &devices {
            match measured(self, d) {
                Some(p) => {
                    self.rec.baseline_p99_us.insert(d.clone(), p);
                }
                None => {
                    self.rec.baseline_p99_us.remove(d);
                }
            }
        }
        Ok(())
    }

    /// The previous version with the candidate in shadow on the stage's
    /// devices, for a soak; its agreement gates the promotion.
    async fn shadow_step(&mut self) -> Result<(), Stop> {
        let (Some(id), Some(prev), Some(rate)) =
            (self.rec.ids.shadow.clone(), self.rec.previous.clone(), self.rec.shadow_sample)
        else {
            return Ok(());
        };
        self.mark_moved();
        self.set_step(Step::Shadow);
        self.save().await?;
        let devices = self.stage_devices();
        self.shadow = Some(devices.iter().map(|d| (d.clone(), None)).collect());
        let mut d = prev.clone();
        d.deployment_id = id.clone();
        d.policy.allow_downgrade = None;
        d.shadow = Some(Shadow { model: self.rec.candidate.clone(), sample_rate: rate });
        for dev in &devices {
            if self.w.override_id(dev).as_deref() != Some(id.as_str()) {
                self.publish_override(dev, d.clone()).await?;
            }
        }
        let what = format!("{} with {} in shadow", self.rec.previous_name(), self.rec.candidate_name());
        self.ui.say(&format!("  {what} ({:.0}% of requests)", rate * 100.0));
        self.wait_active(&id, &what).await?;
        // Shadow statistics are cumulative: a resumed step soaks afresh.
        self.rec.step_since_ms = record::now_ms();
        self.save().await?;
        self.soak(&id, &what).await?;
        let stats = self.shadow.take().unwrap_or_default();
        let v = health::judge_shadow(&stats, &self.rec.limits);
        let c = &mut self.rec.current;
        c.agreement = v.agreement;
        c.compared = Some(v.compared);
        c.not_judged.extend(v.not_judged);
        if let Some(b) = v.breach {
            return Err(Stop::Breach(b));
        }
        self.ui.say(&format!(
            "  shadow agreement {} over {} compared request(s)",
            v.agreement.map(|a| format!("{:.1}%", a * 100.0)).unwrap_or_else(|| "-".into()),
            v.compared
        ));
        Ok(())
    }

    /// Sends the stage's devices the candidate and waits until each serves it.
    async fn promote(&mut self) -> Result<(), Stop> {
        self.mark_moved();
        self.set_step(Step::Activating);
        self.save().await?;
        let id = self.rec.ids.candidate.clone();
        self.collect = Some(Collect::default());
        let d = self.candidate_deployment(&id);
        for dev in self.stage_devices() {
            if self.w.override_id(&dev).as_deref() != Some(id.as_str()) {
                self.publish_override(&dev, d.clone()).await?;
            }
        }
        let what = self.rec.candidate_name();
        let took = self.wait_active(&id, &what).await?;
        self.rec.current.activation_s = Some((took * 10.0).round() / 10.0);
        self.set_step(Step::Soaking);
        self.save().await
    }

    /// Soaks the stage on the candidate and judges its figures.
    async fn soak_candidate(&mut self) -> Result<(), Stop> {
        let devices = self.stage_devices();
        let collect = self.collect.get_or_insert_with(Collect::default);
        // Resumed mid-soak: they were active before this run began.
        for d in &devices {
            collect.active.entry(d.clone()).or_insert(false);
        }
        let id = self.rec.ids.candidate.clone();
        let what = self.rec.candidate_name();
        self.soak(&id, &what).await?;
        let collect = self.collect.take().unwrap_or_default();
        let traffic: BTreeMap<String, Traffic> =
            devices.iter().map(|d| (d.clone(), collect.traffic.get(d).copied().unwrap_or_default())).collect();
        let v = health::judge_soak(&traffic, &self.rec.baseline_p99_us, &self.rec.limits);
        let c = &mut self.rec.current;
        c.requests = v.requests;
        c.errors = v.errors;
        c.p99_us = v.p99_us;
        c.baseline_p99_us = v.baseline_p99_us;
        c.worst_p99_ratio = v.worst_p99_ratio.map(|r| (r * 100.0).round() / 100.0);
        c.not_judged.extend(v.not_judged.iter().cloned());
        for n in &v.not_judged {
            self.ui.say(&format!("  not judged: {n}"));
        }
        match v.breach {
            Some(b) => Err(Stop::Breach(b)),
            None => Ok(()),
        }
    }

    /// Waits until every device of the stage serves deployment `id`; a
    /// failure, a refusal or the timeout is a breach. Seconds it took.
    async fn wait_active(&mut self, id: &str, what: &str) -> Result<f64, Stop> {
        let devices: BTreeSet<String> = self.stage_devices().into_iter().collect();
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pending = devices.clone();
        self.ui.begin(devices.len() as u64, &format!("active on {what}"));
        loop {
            // The retained state: verdicts reached before this run (a
            // resume), or whose event was lost.
            for d in pending.clone() {
                match self.w.slot_state(&d) {
                    Some((Some(a), _)) if a.deployment_id == id => {
                        pending.remove(&d);
                        self.ui.say(&format!("  {d:<12} {:<12} (its retained state)", "active"));
                        self.activated(&d);
                    }
                    Some((_, Some(l)))
                        if l.deployment_id == id && matches!(l.outcome, Outcome::Failed | Outcome::RolledBack) =>
                    {
                        return Err(Stop::Breach(state_breach(&d, id, l)));
                    }
                    _ => {}
                }
            }
            let done = (devices.len() - pending.len()) as u64;
            self.ui.update(done, "");
            let now = Instant::now();
            if pending.is_empty() {
                self.ui.end();
                return Ok(started.elapsed().as_secs_f64());
            }
            if now >= deadline {
                self.ui.end();
                let d = pending.first().cloned().unwrap_or_default();
                let state = if self.w.is_online(&d) { "online, no verdict yet" } else { "offline" };
                return Err(Stop::Breach(Breach::new(
                    &d,
                    "timeout",
                    format!(
                        "{d} did not go active on {what} ({id}) within {} s ({state}); {done} of {} device(s) did",
                        self.timeout.as_secs(),
                        devices.len()
                    ),
                )));
            }
            for ev in self.pump(deadline.saturating_duration_since(now).min(Duration::from_millis(250))).await? {
                if !devices.contains(&ev.device) {
                    continue;
                }
                if let Some(b) = health::judge_event(&ev, id) {
                    self.ui.say(&event_line(&ev, None));
                    return Err(Stop::Breach(b));
                }
                if ev.deployment_id == id && ev.phase == outpost_protocol::Phase::Active && pending.remove(&ev.device) {
                    self.ui.say(&event_line(&ev, None));
                    self.activated(&ev.device);
                }
            }
        }
    }

    fn activated(&mut self, device: &str) {
        if let Some(c) = &mut self.collect {
            c.active.entry(device.to_string()).or_insert(true);
        }
    }

    /// Watches the stage's devices on deployment `id` for the rest of the
    /// soak (the record says when it began): a failure, a rollback or a
    /// device going offline ends it at once.
    async fn soak(&mut self, id: &str, what: &str) -> Result<(), Stop> {
        let devices: BTreeSet<String> = self.stage_devices().into_iter().collect();
        let total_ms = (self.rec.soak_s * 1000.0) as u64;
        let end_ms = self.rec.step_since_ms + total_ms;
        let until = Instant::now() + Duration::from_millis(end_ms.saturating_sub(record::now_ms()).min(total_ms));
        let started = until.checked_sub(Duration::from_millis(total_ms)).unwrap_or_else(Instant::now);
        self.ui.begin(self.rec.soak_s.ceil() as u64, &format!("s soaked on {what}"));
        loop {
            for d in &devices {
                if let Some((_, Some(l))) = self.w.slot_state(d)
                    && l.deployment_id == id
                    && matches!(l.outcome, Outcome::Failed | Outcome::RolledBack)
                {
                    return Err(Stop::Breach(state_breach(d, id, l)));
                }
                if !self.w.is_online(d) {
                    return Err(Stop::Breach(Breach::new(
                        d,
                        "offline",
                        format!("{d} went offline during the soak on {what}"),
                    )));
                }
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            let text = self.soak_text();
            self.ui.update(now.saturating_duration_since(started).as_secs(), &text);
            for ev in self.pump(until.saturating_duration_since(now).min(Duration::from_millis(250))).await? {
                if devices.contains(&ev.device)
                    && let Some(b) = health::judge_event(&ev, id)
                {
                    self.ui.say(&event_line(&ev, None));
                    return Err(Stop::Breach(b));
                }
            }
        }
        self.ui.end();
        Ok(())
    }

    fn soak_text(&self) -> String {
        if let Some(c) = &self.collect {
            let (mut t, mut w) = (Traffic::default(), 0u128);
            for x in c.traffic.values() {
                t.requests += x.requests;
                t.errors += x.errors;
                w += x.p99_weight;
            }
            t.p99_weight = w;
            let p99 = t.p99_us().map(health::latency).unwrap_or_else(|| "-".into());
            return format!("{} requests, {} errors, p99 {p99}", t.requests, t.errors);
        }
        if let Some(s) = &self.shadow {
            let compared: u64 = s.values().flatten().map(|x| x.compared).sum();
            return format!("{compared} compared in shadow");
        }
        String::new()
    }

    /// Every stage passed: the group's desired state takes the candidate,
    /// the overrides go, and every online member is waited for.
    async fn complete(&mut self) -> Result<Moves, Stop> {
        self.set_step(Step::Completing);
        self.save().await?;
        let id = self.rec.ids.group.clone();
        let slot = self.rec.slot.clone();
        let topic = self.op.topics.group_desired_in(&self.rec.group, slot.as_deref());
        let held = operator::revision_of(&self.w.group_desired);
        if held.as_ref().and_then(|(_, i)| i.as_deref()) != Some(id.as_str()) {
            let mut d = self.candidate_deployment(&id);
            d.revision = record::now_ms().max(held.map_or(0, |(r, _)| r + 1));
            d.target = Some(Target::Group(self.rec.group.clone()));
            d.slot = slot;
            let payload = self.sign(&d);
            self.op.publish(&topic, payload.clone(), true).await.map_err(Stop::Broker)?;
            self.w.group_desired = payload;
            self.ui.say(&format!(
                "group {} now desires {} ({id}, revision {})",
                self.rec.group,
                self.rec.candidate_name(),
                d.revision
            ));
        }
        // The group's deployment has gone out: too late for anyone's abort.
        self.guard = false;
        for d in self.rec.moved.clone() {
            self.clear_override(&d).await?;
        }
        let members: Vec<String> = self.rec.members.iter().filter(|d| self.w.is_online(d)).cloned().collect();
        let moves = self
            .wait_on(
                &members,
                &format!("the group's {id}"),
                |w, d| match w.slot_state(d) {
                    Some((Some(a), _)) if a.deployment_id == id => Some(true),
                    Some((_, Some(l)))
                        if l.deployment_id == id && matches!(l.outcome, Outcome::Failed | Outcome::RolledBack) =>
                    {
                        Some(false)
                    }
                    _ => None,
                },
                Some(&id),
            )
            .await?;
        self.rec.moved.clear();
        self.rec.state = State::Done;
        if !moves.failed.is_empty() {
            self.rec.reason = Some(format!(
                "{} device(s) failed the group's deployment: {}",
                moves.failed.len(),
                moves.failed.join("; ")
            ));
        }
        self.finish().await?;
        Ok(moves)
    }

    /// Waits until `judge` says each of `devices` is where it should be
    /// (Some(true)) or failed (Some(false)), up to the timeout; `id`'s
    /// failure events count as failures too.
    async fn wait_on(
        &mut self,
        devices: &[String],
        what: &str,
        judge: impl Fn(&Watch, &str) -> Option<bool>,
        id: Option<&str>,
    ) -> Result<Moves, Stop> {
        let mut moves = Moves::default();
        let mut pending: BTreeSet<String> = devices.iter().cloned().collect();
        let deadline = Instant::now() + self.timeout;
        self.ui.begin(devices.len() as u64, &format!("on {what}"));
        loop {
            for d in pending.clone() {
                match judge(&self.w, &d) {
                    Some(true) => moves.confirmed.push(d.clone()),
                    Some(false) => moves.failed.push(format!("{d}: {} of {what}", self.last_outcome(&d))),
                    None => continue,
                }
                pending.remove(&d);
            }
            self.ui.update((devices.len() - pending.len()) as u64, "");
            let now = Instant::now();
            // Offline devices get their desired state when they reconnect: not waited for.
            if pending.iter().all(|d| !self.w.is_online(d)) || now >= deadline {
                break;
            }
            for ev in self.pump(deadline.saturating_duration_since(now).min(Duration::from_millis(250))).await? {
                if let Some(id) = id
                    && pending.contains(&ev.device)
                    && let Some(b) = health::judge_event(&ev, id)
                {
                    self.ui.say(&event_line(&ev, None));
                    pending.remove(&ev.device);
                    moves.failed.push(b.message);
                }
            }
        }
        self.ui.end();
        for d in pending {
            let why = if self.w.is_online(&d) {
                format!("not on {what} within {} s", self.timeout.as_secs())
            } else {
                "offline: its desired state applies when it reconnects".into()
            };
            moves.unconfirmed.push(format!("{d}: {why}"));
        }
        moves.confirmed.sort();
        moves.failed.sort();
        Ok(moves)
    }

    fn last_outcome(&self, d: &str) -> String {
        match self.w.slot_state(d) {
            Some((_, Some(l))) => {
                let mut s = format!("{:?}", l.outcome).to_lowercase();
                if let Some(e) = &l.error {
                    s.push_str(&format!(" ({}: {})", e.code, e.message));
                }
                s
            }
            _ => "no outcome".into(),
        }
    }

    /// A breach: the stage ends, the devices moved go back.
    async fn halt(&mut self, b: Breach) -> Result<Moves, Stop> {
        let k = self.rec.stage + 1;
        self.ui.say(&format!("stage {k}/{} breached: {b}", self.stages.len()));
        self.rec.current.breach = Some(b.clone());
        self.rec.current.verdict = "breached".into();
        self.rec.done.push(std::mem::take(&mut self.rec.current));
        self.rec.state = State::Halted;
        self.rec.reason = Some(b.message.clone());
        self.rec.breach = Some(b);
        self.set_step(Step::Returning);
        self.save().await?;
        let moves = self.return_moved().await?;
        self.finish().await?;
        Ok(moves)
    }

    /// `--abort`: the devices moved go back, the record says aborted.
    async fn abort(&mut self) -> Result<Report, Error> {
        self.guard = false;
        if self.rec.step == Step::Completing
            && operator::revision_of(&self.w.group_desired).and_then(|(_, id)| id).as_deref()
                == Some(self.rec.ids.group.as_str())
        {
            return Err(Error::Usage(format!(
                "rollout {} already moved the group's desired state to {}: too late to abort; --resume finishes it, then roll back with a new rollout",
                self.rec.id,
                self.rec.candidate_name()
            )));
        }
        if self.rec.state == State::Running {
            let (k, n) = ((self.rec.stage + 1).min(self.stages.len()), self.stages.len());
            self.rec.state = State::Aborted;
            self.rec.reason = Some(format!("aborted (--abort) at stage {k}/{n}, step {}", self.rec.step.as_str()));
            if !self.rec.current.devices.is_empty() {
                self.rec.current.verdict = "aborted".into();
                self.rec.done.push(std::mem::take(&mut self.rec.current));
            }
            self.set_step(Step::Returning);
        }
        self.ui.say(&format!(
            "aborting rollout {} of {} to group {}: {} device(s) to return to {}",
            self.rec.id,
            self.rec.candidate_name(),
            self.rec.group,
            self.rec.moved.len(),
            self.rec.previous_name()
        ));
        self.save().await.map_err(broker_error)?;
        let moves = self.return_moved().await.map_err(broker_error)?;
        self.finish().await.map_err(broker_error)?;
        Ok(self.report(moves, false))
    }

    /// Clears the overrides of every device the rollout moved, and waits
    /// for each online one to serve the previous version again.
    async fn return_moved(&mut self) -> Result<Moves, Stop> {
        let devices = self.rec.moved.clone();
        if devices.is_empty() {
            return Ok(Moves::default());
        }
        self.guard = false;
        self.ui.say(&format!(
            "returning {} device(s) to {}: {}",
            devices.len(),
            self.rec.previous_name(),
            names(&devices)
        ));
        for d in &devices {
            self.clear_override(d).await?;
        }
        let prev = self.rec.previous.as_ref().map(|p| p.deployment_id.clone());
        let ours: Vec<String> =
            [Some(self.rec.ids.candidate.clone()), self.rec.ids.shadow.clone()].into_iter().flatten().collect();
        let what = self.rec.previous_name();
        let moves = self
            .wait_on(
                &devices,
                &what,
                |w, d| {
                    let (active, last) = w.slot_state(d)?;
                    // Still working on one of ours: not back yet.
                    if last.is_some_and(|l| l.outcome == Outcome::InProgress && ours.contains(&l.deployment_id)) {
                        return None;
                    }
                    match (&prev, active) {
                        (Some(p), Some(a)) if &a.deployment_id == p => Some(true),
                        (None, None) => Some(true),
                        _ => None,
                    }
                },
                None,
            )
            .await?;
        self.rec.moved.clear();
        self.save().await?;
        Ok(moves)
    }

    async fn finish(&mut self) -> Result<(), Stop> {
        self.rec.finished_at = Some(record::now_rfc3339());
        self.save().await
    }

    /// The candidate as a desired state: the group's serving settings and
    /// policy carry over from the previous deployment.
    fn candidate_deployment(&self, id: &str) -> Deployment {
        let c = &self.rec.candidate;
        let mut d =
            operator::deployment(&c.name, &c.version, &c.manifest_url, &c.manifest_sha256, Some(0), Some(id.into()));
        if let Some(p) = &self.rec.previous {
            d.serving = p.serving.clone();
            d.policy = p.policy.clone();
        }
        d.policy.allow_downgrade = self.rec.allow_downgrade.then_some(true);
        d
    }

    fn sign(&self, d: &Deployment) -> Vec<u8> {
        match &self.signer {
            Some(s) => s.deployment(d),
            None => d.to_json(),
        }
    }

    /// Publishes `d` on `device`'s own desired topic, retained, above the revision it holds.
    async fn publish_override(&mut self, device: &str, mut d: Deployment) -> Result<(), Stop> {
        let held = self.w.raw_override(device).and_then(operator::revision_of).map(|(r, _)| r);
        d.revision = record::now_ms().max(held.map_or(0, |r| r + 1));
        d.target = Some(Target::Device(device.into()));
        d.slot = self.rec.slot.clone();
        let payload = self.sign(&d);
        let topic = self.op.topics.device_desired_in(device, self.rec.slot.as_deref());
        self.op.publish(&topic, payload.clone(), true).await.map_err(Stop::Broker)?;
        self.w.overrides.insert(device.into(), payload);
        Ok(())
    }

    /// Withdraws `device`'s own desired state: an empty retained payload,
    /// or a signed undeployment when signing.
    async fn clear_override(&mut self, device: &str) -> Result<(), Stop> {
        let payload = match &self.signer {
            Some(s) => {
                let held = self.w.raw_override(device).and_then(operator::revision_of).map(|(r, _)| r);
                let revision = record::now_ms().max(held.map_or(0, |r| r + 1));
                s.undeploy(Target::Device(device.into()), self.rec.slot.as_deref(), revision)
            }
            None => Vec::new(),
        };
        let topic = self.op.topics.device_desired_in(device, self.rec.slot.as_deref());
        self.op.publish(&topic, payload.clone(), true).await.map_err(Stop::Broker)?;
        self.w.overrides.insert(device.into(), payload);
        Ok(())
    }

    async fn save(&mut self) -> Result<(), Stop> {
        self.rec.updated_at = record::now_rfc3339();
        let topic = self.op.topics.rollout(&self.rec.group, self.rec.slot.as_deref());
        self.op.publish(&topic, self.rec.to_json(), true).await.map_err(Stop::Broker)
    }

    /// Takes in what arrived within `wait` (and whatever else is already
    /// there); returns the events. Stops when another run aborted this rollout.
    async fn pump(&mut self, wait: Duration) -> Result<Vec<DeploymentEvent>, Stop> {
        let mut wait = wait;
        for _ in 0..10_000 {
            let Some(m) = self.op.next(wait).await else { break };
            self.w.ingest(m);
            wait = Duration::ZERO;
        }
        self.route_samples();
        if self.guard
            && std::mem::take(&mut self.w.record_changed)
            && let Ok(r) = Record::from_json(&self.w.record)
            && r.id == self.rec.id
            && r.state == State::Aborted
        {
            return Err(Stop::Aborted(r.reason.unwrap_or_else(|| "aborted".into())));
        }
        Ok(self.w.take_events())
    }

    /// Telemetry to where it counts: the previous version's figures of the
    /// devices not moved (baselines), the candidate's of the stage's active
    /// devices (the soak), and shadow statistics of the candidate.
    fn route_samples(&mut self) {
        let cand = self.rec.candidate.clone();
        for s in self.w.take_samples() {
            if let (Some(sh), Some(map)) = (&s.shadow, &mut self.shadow)
                && same_model(&sh.model, &cand)
                && let Some(slot) = map.get_mut(&s.device)
                && slot.as_ref().is_none_or(|old| sh.compared >= old.compared)
            {
                *slot = Some(sh.clone());
            }
            let (Some(model), Some(inf)) = (&s.model, &s.inference) else { continue };
            if let Some(p) = &self.rec.previous
                && same_model(model, &p.model)
                && !self.rec.moved.contains(&s.device)
            {
                self.baseline.entry(s.device.clone()).or_default().add(inf);
            }
            if same_model(model, &cand)
                && let Some(c) = &mut self.collect
                && let Some(skip) = c.active.get_mut(&s.device)
            {
                if *skip {
                    *skip = false;
                } else {
                    c.traffic.entry(s.device.clone()).or_default().add(inf);
                }
            }
        }
    }

    fn report(&self, moves: Moves, interrupted: bool) -> Report {
        let r = &self.rec;
        let (returned, failed) = match r.state {
            State::Done => (Vec::new(), moves.failed),
            _ => (moves.confirmed, moves.failed),
        };
        Report {
            id: r.id.clone(),
            group: r.group.clone(),
            slot: r.slot.clone(),
            candidate: r.candidate_name(),
            previous: r.previous_name(),
            state: r.state,
            reason: r.reason.clone(),
            breach: r.breach.clone(),
            members: r.members.len(),
            stages: r.done.clone(),
            excluded: r.excluded.clone(),
            returned,
            unconfirmed: moves.unconfirmed,
            failed,
            interrupted,
            by_abort: false,
        }
    }
}

fn broker_error(e: Stop) -> Error {
    match e {
        Stop::Broker(e) => Error::Unavailable(e),
        Stop::Breach(b) => Error::Unavailable(b.message),
        Stop::Aborted(why) => Error::Unavailable(why),
    }
}

/// A failure the retained state shows for deployment `id`.
fn state_breach(d: &str, id: &str, l: &outpost_protocol::LastDeployment) -> Breach {
    let (check, verb) = match l.outcome {
        Outcome::RolledBack => ("rolled_back", "rolled back"),
        _ => ("failed", "failed"),
    };
    let why = l.error.as_ref().map(|e| format!(": {}: {}", e.code, e.message)).unwrap_or_default();
    Breach::new(d, check, format!("{d} {verb} {id} (its retained state){why}"))
}

/// A list of device names, shortened past eight.
fn names(devices: &[String]) -> String {
    if devices.len() <= 8 {
        devices.join(", ")
    } else {
        format!("{}, ... {} ({} in all)", devices[..4].join(", "), devices[devices.len() - 1], devices.len())
    }
}
