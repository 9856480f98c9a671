//! The steps of a rollout over MQTT. A stage goes
//! `pending → baseline → shadow → activating → soaking`, each step written
//! to the retained record before it changes a device; a breach anywhere
//! halts and returns every device the rollout moved; after the last stage
//! the group's desired state moves and the overrides are cleared.

use super::health::{self, Breach, Traffic};
use super::moves::Moves;
use super::plan::{self, Stage};
use super::record::{self, Record, StageReport, State, Step};
use super::ui::Ui;
use super::watch::Watch;
use super::{Error, Report};
use crate::operator::{self, Operator};
use crate::progress::event_line;
use crate::signing::Signer;
use outpost_protocol::telemetry::{ModelId, ShadowStats};
use outpost_protocol::trust::Target;
use outpost_protocol::{Deployment, DeploymentEvent, ModelRef, Outcome, Shadow};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Why the stages stopped before the end.
pub(super) enum Stop {
    Breach(Breach),
    /// Another run's `--abort` (the reason it recorded).
    Aborted(String),
    /// The broker connection failed.
    Broker(String),
    /// Another run took the rollout over (its record names another owner).
    TakenOver(String),
}

/// What the stage's devices report on the candidate, from the moment each is active.
#[derive(Debug, Default)]
pub(super) struct Collect {
    /// Active devices, with whether their next report is still to be
    /// skipped (its interval straddles the swap).
    active: BTreeMap<String, bool>,
    traffic: BTreeMap<String, Traffic>,
}

pub(super) struct Engine {
    pub(super) op: Operator,
    pub(super) w: Watch,
    pub(super) rec: Record,
    pub(super) stages: Vec<Stage>,
    pub(super) signer: Option<Signer>,
    pub(super) timeout: Duration,
    pub(super) ui: Ui,
    /// Each device's traffic on the previous version while not moved.
    pub(super) baseline: BTreeMap<String, Traffic>,
    pub(super) collect: Option<Collect>,
    /// The shadow step's latest candidate statistics, by device.
    pub(super) shadow: Option<BTreeMap<String, Option<ShadowStats>>>,
    /// Each device's last cumulative shadow report of the candidate.
    pub(super) shadow_last: BTreeMap<String, ShadowStats>,
    /// Stop when another run marks this rollout aborted.
    pub(super) guard: bool,
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
    pub(super) async fn go(&mut self) -> Result<Report, Error> {
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
        // A new rollout's record, or a resumed one's new owner, before anything else.
        self.save().await.map_err(broker_error)?;
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
            Stop::TakenOver(why) => {
                self.ui.say(&format!("stopped: {why}"));
                self.rec.reason = Some(why);
                Ok(self.report(Moves::default(), true))
            }
        }
    }

    pub(super) fn say_start(&self) {
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

    pub(super) fn set_step(&mut self, step: Step) {
        self.rec.step = step;
        self.rec.step_since_ms = record::now_ms();
    }

    pub(super) fn stage_devices(&self) -> Vec<String> {
        self.rec.current.devices.clone()
    }

    /// Records the stage's devices as moved before anything is published to them.
    fn mark_moved(&mut self) {
        let moved: std::collections::HashSet<String> = self.rec.moved.iter().cloned().collect();
        let new: Vec<String> = self.stage_devices().into_iter().filter(|d| !moved.contains(d)).collect();
        self.rec.moved.extend(new);
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
        self.shadow_last.clear();
        let mut d = prev.clone();
        d.deployment_id = id.clone();
        d.policy.allow_downgrade = None;
        d.shadow = Some(Shadow { model: self.rec.candidate.clone(), sample_rate: rate });
        for dev in &devices {
            if self.w.override_id(dev).as_deref() != Some(id.as_str()) {
                self.refresh().await?;
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
                self.refresh().await?;
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
        if self.collect.is_none() {
            // Resumed mid-soak: the figures collected so far died with the
            // run that collected them; judging what is left of the soak on
            // a few seconds would pass a stage on no evidence.
            self.ui.say("  resumed mid-soak: the soak starts again in full (the figures so far were not kept)");
            self.rec.step_since_ms = record::now_ms();
            self.save().await?;
        }
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
    /// failure, a refusal or the timeout is a failure of the device (within
    /// `--max-failed`, it is returned and the stage goes on; past it, a
    /// breach). Seconds it took.
    async fn wait_active(&mut self, id: &str, what: &str) -> Result<f64, Stop> {
        let devices: BTreeSet<String> = self.stage_devices().into_iter().collect();
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pending = devices.clone();
        // A line per device for small stages; a count for large ones.
        let verbose = devices.len() <= 20;
        self.ui.begin(devices.len() as u64, &format!("active on {what}"));
        loop {
            // The retained state: verdicts reached before this run (a
            // resume), or whose event was lost.
            let mut serving = Vec::new();
            let mut failed = Vec::new();
            for d in &pending {
                match self.w.slot_state(d) {
                    Some((Some(a), _)) if a.deployment_id == id => serving.push(d.clone()),
                    Some((_, Some(l)))
                        if l.deployment_id == id && matches!(l.outcome, Outcome::Failed | Outcome::RolledBack) =>
                    {
                        failed.push(state_breach(d, id, l));
                    }
                    _ => {}
                }
            }
            for b in failed {
                pending.remove(&b.device);
                self.fail_device(b).await?;
            }
            for d in serving {
                pending.remove(&d);
                if verbose {
                    self.ui.say(&format!("  {d:<12} {:<12} (its retained state)", "active"));
                }
                self.activated(&d);
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
                for d in std::mem::take(&mut pending) {
                    let state = if self.w.is_online(&d) { "online, no verdict yet" } else { "offline" };
                    self.fail_device(Breach::new(
                        &d,
                        "timeout",
                        format!(
                            "{d} did not go active on {what} ({id}) within {} s ({state}); {done} of {} device(s) did",
                            self.timeout.as_secs(),
                            devices.len()
                        ),
                    ))
                    .await?;
                }
                return Ok(started.elapsed().as_secs_f64());
            }
            for ev in self.pump(deadline.saturating_duration_since(now).min(Duration::from_millis(250))).await? {
                if !pending.contains(&ev.device) {
                    continue;
                }
                if let Some(b) = health::judge_event(&ev, id) {
                    self.ui.say(&event_line(&ev, None));
                    pending.remove(&ev.device);
                    self.fail_device(b).await?;
                    continue;
                }
                if ev.deployment_id == id && ev.phase == outpost_protocol::Phase::Active && pending.remove(&ev.device) {
                    if verbose {
                        self.ui.say(&event_line(&ev, None));
                    }
                    self.activated(&ev.device);
                }
            }
        }
    }

    /// A device of the stage failed: within `--max-failed` (and while
    /// others remain), it goes back to the previous version and the stage
    /// goes on without it; otherwise the stage breaches.
    async fn fail_device(&mut self, b: Breach) -> Result<(), Stop> {
        let c = &self.rec.current;
        let others = c.devices.iter().any(|d| *d != b.device);
        if c.failed.len() >= self.rec.limits.max_failed || !others {
            return Err(Stop::Breach(b));
        }
        self.ui.say(&format!(
            "  {} (failure {} of --max-failed {}): it goes back to {}, the stage goes on",
            b.message,
            c.failed.len() + 1,
            self.rec.limits.max_failed,
            self.rec.previous_name()
        ));
        let d = b.device.clone();
        self.rec.current.failed.push(b.message);
        self.rec.current.devices.retain(|x| *x != d);
        self.save().await?;
        self.clear_override(&d).await?;
        self.rec.moved.retain(|x| *x != d);
        if let Some(c) = &mut self.collect {
            c.active.remove(&d);
            c.traffic.remove(&d);
        }
        if let Some(s) = &mut self.shadow {
            s.remove(&d);
        }
        self.save().await
    }

    fn activated(&mut self, device: &str) {
        if let Some(c) = &mut self.collect {
            c.active.entry(device.to_string()).or_insert(true);
        }
    }

    /// Watches the stage's devices on deployment `id` for the rest of the
    /// soak (the record says when it began): a failure, a rollback or a
    /// device offline past `--offline-grace` (or back on another
    /// deployment) is a failure of the device.
    async fn soak(&mut self, id: &str, what: &str) -> Result<(), Stop> {
        let total_ms = (self.rec.soak_s * 1000.0) as u64;
        let end_ms = self.rec.step_since_ms + total_ms;
        let until = Instant::now() + Duration::from_millis(end_ms.saturating_sub(record::now_ms()).min(total_ms));
        let started = until.checked_sub(Duration::from_millis(total_ms)).unwrap_or_else(Instant::now);
        let grace = Duration::from_secs_f64(self.rec.limits.offline_grace_s);
        let mut offline: BTreeMap<String, Instant> = BTreeMap::new();
        self.ui.begin(self.rec.soak_s.ceil() as u64, &format!("s soaked on {what}"));
        loop {
            let devices: BTreeSet<String> = self.stage_devices().into_iter().collect();
            if std::mem::take(&mut self.w.overrides_changed) {
                // Someone else's desired state on a stage device's own topic: not ours to judge or undo.
                for d in &devices {
                    if let Some(Err(other)) = self.topic_holds(d) {
                        return Err(Stop::Breach(Breach::new(
                            d,
                            "changed",
                            format!(
                                "{d}'s own desired topic now holds {other}, which someone else published during the soak on {what}: the rollout halts (and leaves it as it is)"
                            ),
                        )));
                    }
                }
            }
            let now = Instant::now();
            let mut failed = Vec::new();
            for d in &devices {
                let serving = self.w.slot_state(d).map(|(a, l)| (a.map(|a| a.deployment_id.clone()), l.cloned()));
                if let Some((_, Some(l))) = &serving
                    && l.deployment_id == id
                    && matches!(l.outcome, Outcome::Failed | Outcome::RolledBack)
                {
                    failed.push(state_breach(d, id, l));
                    continue;
                }
                if !self.w.is_online(d) {
                    let since = *offline.entry(d.clone()).or_insert(now);
                    if now.saturating_duration_since(since) >= grace || now >= until {
                        failed.push(Breach::new(
                            d,
                            "offline",
                            format!(
                                "{d} went offline during the soak on {what} and was not back within --offline-grace {} s",
                                grace.as_secs()
                            ),
                        ));
                    }
                } else if offline.remove(d).is_some() {
                    let back_on = serving.and_then(|(a, _)| a);
                    if back_on.as_deref() != Some(id) {
                        failed.push(Breach::new(
                            d,
                            "offline",
                            format!(
                                "{d} went offline during the soak on {what} and came back on {} instead",
                                back_on.unwrap_or_else(|| "nothing".into())
                            ),
                        ));
                    } else {
                        self.ui.say(&format!("  {d} is back on {what} within --offline-grace"));
                    }
                }
            }
            for b in failed {
                offline.remove(&b.device);
                self.fail_device(b).await?;
            }
            if now >= until {
                break;
            }
            let text = self.soak_text();
            self.ui.update(now.saturating_duration_since(started).as_secs(), &text);
            for ev in self.pump(until.saturating_duration_since(now).min(Duration::from_millis(250))).await? {
                if devices.contains(&ev.device)
                    && self.rec.current.devices.contains(&ev.device)
                    && let Some(b) = health::judge_event(&ev, id)
                {
                    self.ui.say(&event_line(&ev, None));
                    offline.remove(&b.device);
                    self.fail_device(b).await?;
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

    /// The candidate as a desired state: the group's serving settings and
    /// policy carry over from the previous deployment.
    pub(super) fn candidate_deployment(&self, id: &str) -> Deployment {
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

    pub(super) fn sign(&self, d: &Deployment) -> Vec<u8> {
        match &self.signer {
            Some(s) => s.deployment(d),
            None => d.to_json(),
        }
    }

    /// What `device`'s own desired topic holds: nothing (None), one of this
    /// rollout's desired states (`Ok`), or someone else's (`Err` with its id).
    pub(super) fn topic_holds(&self, device: &str) -> Option<Result<(), String>> {
        let p = self.w.override_of(device)?;
        let id = operator::revision_of(p).and_then(|(_, id)| id);
        let ours =
            id.as_deref().is_some_and(|i| i == self.rec.ids.candidate || Some(i) == self.rec.ids.shadow.as_deref());
        Some(if ours { Ok(()) } else { Err(id.unwrap_or_else(|| "something unreadable".into())) })
    }

    /// Publishes `d` on `device`'s own desired topic, retained, above the
    /// revision it holds; a desired state someone else put there during
    /// the rollout is never overwritten: the stage breaches instead.
    pub(super) async fn publish_override(&mut self, device: &str, mut d: Deployment) -> Result<(), Stop> {
        if let Some(Err(id)) = self.topic_holds(device) {
            return Err(Stop::Breach(Breach::new(
                device,
                "changed",
                format!(
                    "{device}'s own desired topic now holds {id}, which someone else published during the rollout: not overwritten, the rollout halts"
                ),
            )));
        }
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
    /// or a signed undeployment when signing. A desired state someone else
    /// put there is left as it is (false).
    pub(super) async fn clear_override(&mut self, device: &str) -> Result<bool, Stop> {
        if let Some(Err(id)) = self.topic_holds(device) {
            self.ui.say(&format!(
                "  {device}'s own desired topic holds {id}, published by someone else during the rollout: left as it is"
            ));
            return Ok(false);
        }
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
        Ok(true)
    }

    /// Writes the record (signed when signing), unless another run took the rollout over.
    pub(super) async fn save(&mut self) -> Result<(), Stop> {
        self.refresh().await?;
        self.rec.updated_at = record::now_rfc3339();
        let topic = self.op.topics.rollout(&self.rec.group, self.rec.slot.as_deref());
        let payload = match &self.signer {
            Some(s) => self.rec.sealed(&s.key),
            None => self.rec.to_json(),
        };
        self.op.publish(&topic, payload, true).await.map_err(Stop::Broker)
    }

    /// Takes in what already arrived (events stay for the next
    /// [`pump`](Engine::pump)) and stops when the record changed hands.
    pub(super) async fn refresh(&mut self) -> Result<(), Stop> {
        for _ in 0..10_000 {
            let Some(m) = self.op.next(Duration::ZERO).await else { break };
            self.w.ingest(m);
        }
        self.check_record()
    }

    /// Another run's record on the topic: `--abort` (state aborted), or a
    /// run that took the rollout over (another id or owner). Our own
    /// writes come back unchanged. With a key, records it did not sign are
    /// ignored.
    fn check_record(&mut self) -> Result<(), Stop> {
        if !self.guard || !std::mem::take(&mut self.w.record_changed) {
            return Ok(());
        }
        let key = self.signer.as_ref().map(|s| s.key.public());
        let Ok(r) = Record::open(&self.w.record, key.as_ref()) else { return Ok(()) };
        if r.id == self.rec.id && r.state == State::Aborted {
            return Err(Stop::Aborted(r.reason.unwrap_or_else(|| "aborted".into())));
        }
        if r.id != self.rec.id || r.owner != self.rec.owner {
            return Err(Stop::TakenOver(format!(
                "another run took rollout {} over (the record on the broker is rollout {}, {}, owner {}): this one stops without changing anything more",
                self.rec.id,
                r.id,
                r.state.as_str(),
                r.owner.as_deref().unwrap_or("none")
            )));
        }
        if r.state != State::Running && self.rec.state == State::Running {
            return Err(Stop::TakenOver(format!(
                "rollout {} is recorded as {} by another run: this one stops",
                self.rec.id,
                r.state.as_str()
            )));
        }
        Ok(())
    }

    /// Takes in what arrived within `wait` (and whatever else is already
    /// there); returns the events. Stops when another run aborted this rollout.
    pub(super) async fn pump(&mut self, wait: Duration) -> Result<Vec<DeploymentEvent>, Stop> {
        let mut wait = wait;
        for _ in 0..10_000 {
            let Some(m) = self.op.next(wait).await else { break };
            self.w.ingest(m);
            wait = Duration::ZERO;
        }
        self.route_samples();
        self.check_record()?;
        Ok(self.w.take_events())
    }

    /// Telemetry to where it counts: the previous version's figures of the
    /// devices not moved (baselines), the candidate's of the stage's active
    /// devices (the soak), and shadow statistics of the candidate.
    fn route_samples(&mut self) {
        let cand = self.rec.candidate.clone();
        for s in self.w.take_samples() {
            // Shadow statistics are cumulative: the step sums what each
            // report of the device's own topic adds to its previous one.
            if let (Some(sh), Some(map)) = (&s.shadow, &mut self.shadow)
                && same_model(&sh.model, &cand)
                && let Some(slot) = map.get_mut(&s.device)
                && let Some(d) = health::shadow_delta(self.shadow_last.get(&s.device), sh)
            {
                health::add_shadow(slot.get_or_insert_with(ShadowStats::default), &d);
                self.shadow_last.insert(s.device.clone(), sh.clone());
            }
            let (Some(model), Some(inf)) = (&s.model, &s.inference) else { continue };
            // A device's baseline is taken before it moves, once: what it
            // reports on the previous version afterwards (in shadow) is not used.
            if let Some(p) = &self.rec.previous
                && same_model(model, &p.model)
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

    pub(super) fn report(&self, moves: Moves, interrupted: bool) -> Report {
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

pub(super) fn broker_error(e: Stop) -> Error {
    match e {
        Stop::Broker(e) => Error::Unavailable(e),
        Stop::Breach(b) => Error::Unavailable(b.message),
        Stop::Aborted(why) | Stop::TakenOver(why) => Error::Unavailable(why),
    }
}

/// A failure the retained state shows for deployment `id`.
pub(super) fn state_breach(d: &str, id: &str, l: &outpost_protocol::LastDeployment) -> Breach {
    let (check, verb) = match l.outcome {
        Outcome::RolledBack => ("rolled_back", "rolled back"),
        _ => ("failed", "failed"),
    };
    let why = l.error.as_ref().map(|e| format!(": {}: {}", e.code, e.message)).unwrap_or_default();
    if l.error.as_ref().is_some_and(|e| e.code == outpost_protocol::ErrorCode::StaleRevision) {
        return health::stale_revision(d, id, &format!("its retained state{why}"));
    }
    Breach::new(d, check, format!("{d} {verb} {id} (its retained state){why}"))
}

/// A list of device names, shortened past eight.
pub(super) fn names(devices: &[String]) -> String {
    if devices.len() <= 8 {
        devices.join(", ")
    } else {
        format!("{}, ... {} ({} in all)", devices[..4].join(", "), devices[devices.len() - 1], devices.len())
    }
}
