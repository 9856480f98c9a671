//! The moves that end a rollout: every device it moved back to the
//! previous version (a halt, `--abort`, a halt whose run was killed), or the
//! group's desired state forward to the candidate, with the overrides
//! cleared (success). Each waits for the online devices to confirm.

use super::engine::{Engine, Stop, broker_error, names};
use super::health::{self, Breach};
use super::record::{self, State, Step};
use super::watch::Watch;
use super::{Error, Report};
use crate::operator;
use crate::progress::event_line;
use outpost_protocol::Outcome;
use outpost_protocol::trust::Target;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How the moves back (or to the group's deployment) ended.
#[derive(Debug, Default)]
pub(super) struct Moves {
    pub(super) confirmed: Vec<String>,
    pub(super) unconfirmed: Vec<String>,
    pub(super) failed: Vec<String>,
}

impl Engine {
    /// Every stage passed: the group's desired state takes the candidate,
    /// the overrides go, and every online member is waited for.
    pub(super) async fn complete(&mut self) -> Result<Moves, Stop> {
        self.set_step(Step::Completing);
        self.save().await?;
        let id = self.rec.ids.group.clone();
        let slot = self.rec.slot.clone();
        let topic = self.op.topics.group_desired_in(&self.rec.group, slot.as_deref());
        let held = operator::revision_of(&self.w.group_desired);
        let held_id = held.as_ref().and_then(|(_, i)| i.clone());
        let started_from = self.rec.previous.as_ref().map(|p| p.deployment_id.clone());
        if held_id.as_deref() != Some(id.as_str()) && held_id != started_from {
            // Someone moved the group meanwhile (an emergency rollback?): not overwritten.
            return Err(Stop::Breach(Breach::new(
                "",
                "changed",
                format!(
                    "{topic} now holds {}, not {} the rollout started from: someone changed the group during the rollout, and it is not overwritten",
                    held_id.unwrap_or_else(|| "nothing".into()),
                    started_from.unwrap_or_else(|| "the nothing".into())
                ),
            )));
        }
        if held_id.as_deref() != Some(id.as_str()) {
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
    pub(super) async fn wait_on(
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
            let decided: Vec<(String, bool)> =
                pending.iter().filter_map(|d| judge(&self.w, d).map(|ok| (d.clone(), ok))).collect();
            for (d, ok) in decided {
                match ok {
                    true => moves.confirmed.push(d.clone()),
                    false => moves.failed.push(format!("{d}: {} of {what}", self.last_outcome(&d))),
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

    pub(super) fn last_outcome(&self, d: &str) -> String {
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
    pub(super) async fn halt(&mut self, b: Breach) -> Result<Moves, Stop> {
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
    pub(super) async fn abort(&mut self) -> Result<Report, Error> {
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
    pub(super) async fn return_moved(&mut self) -> Result<Moves, Stop> {
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
        let mut left = Vec::new();
        for d in &devices {
            if !self.clear_override(d).await? {
                left.push(d.clone());
            }
        }
        let devices: Vec<String> = devices.into_iter().filter(|d| !left.contains(d)).collect();
        let prev = self.rec.previous.as_ref().map(|p| p.deployment_id.clone());
        let group_now = operator::revision_of(&self.w.group_desired).and_then(|(_, id)| id);
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
                        // The group's desired state changed meanwhile: back on the group is back.
                        (_, Some(a)) if group_now.as_deref() == Some(a.deployment_id.as_str()) => Some(true),
                        (None, None) => Some(true),
                        _ => None,
                    }
                },
                None,
            )
            .await?;
        let mut moves = moves;
        for d in left {
            moves
                .unconfirmed
                .push(format!("{d}: its own desired topic holds someone else's desired state: left as it is"));
        }
        self.rec.moved.clear();
        self.save().await?;
        Ok(moves)
    }

    pub(super) async fn finish(&mut self) -> Result<(), Stop> {
        self.rec.finished_at = Some(record::now_rfc3339());
        self.save().await
    }
}
