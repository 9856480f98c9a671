//! Deployments: from a desired state to a version serving, and back.
//!
//! One task, the [`Deployer`], owns the device's deployment record
//! (`agent.json`: what is active, pending, refused, kept) and is the only one
//! to write it, in the order things happen. It decides with the
//! [`reconcile::Reconciler`], runs the [`pipeline`] (download, verify, load,
//! validate) on a blocking thread it can cancel, and swaps the result in
//! itself, so a newer desired state, a probation verdict and a finished
//! deployment are handled one after the other, never at once:
//! - a deployment superseded before its swap changes nothing (not even the
//!   HTTP port: the pipeline only binds it, the swap moves it);
//! - a probation verdict names the probation it judges (its token); a stale
//!   one is reported but rewrites nothing newer;
//! - "previous" is what the engine actually serves, not what a record says.

pub(crate) mod breaker;
pub mod fetch;
pub mod isolate;
pub(crate) mod memory;
pub(crate) mod pipeline;
pub(crate) mod reconcile;
pub(crate) mod record;
pub mod store;

use crate::report::Reporter;
use crate::serve::probation::{Limits as ProbationLimits, Verdict};
use crate::serve::{Engine, ProbationEnd};
use fetch::{Cancel, FetchError};
use outpost_protocol::trust::{Desired, Target};
use outpost_protocol::{Deployment, ErrorCode, ErrorInfo, Outcome, Phase, ProtocolError};
use pipeline::{Ended, Pipeline, Prepared};
use reconcile::{Decision, Reconciler, Source};
use record::{ActiveRecord, Record};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Versions kept in the store besides the active one, unless the deployment's policy says otherwise.
pub const DEFAULT_KEEP_VERSIONS: usize = 3;

/// What the rest of the agent asks of the deployer.
#[derive(Debug)]
enum Command {
    /// A message on a desired topic; `recorded` is answered once what it
    /// asks for is on disk (the message may then be acked).
    Desired { source: Source, payload: Vec<u8>, max_bytes: usize, recorded: oneshot::Sender<()> },
    /// New limits from the configuration (SIGHUP).
    Limits(pipeline::Limits),
    /// The agent stops: interrupt the deployment in progress (it resumes
    /// at the next start). Verdicts are still recorded until `Finish`.
    Stop,
    /// The requests have drained: end once the interrupted deployment has.
    Finish,
    /// The pipeline is about to run a version's model code for the first
    /// time: recorded (the breaker blames an unclean exit on it) before
    /// `recorded` is answered (false: stopping, do not start it).
    Installing { deployment: Box<Deployment>, recorded: std::sync::mpsc::Sender<Result<(), FetchError>> },
}

/// Who may set the desired state: the topics the device listens on and the
/// keys it trusts.
#[derive(Debug, Clone, Default)]
pub struct Authority {
    pub device: String,
    /// In order of precedence (`Source::Group(i)` is `groups[i]`).
    pub groups: Vec<String>,
    pub trust: outpost_protocol::trust::Trust,
}

impl Authority {
    /// The target a message on `source`'s topic must name.
    pub(crate) fn target(&self, source: Source) -> Target {
        match source {
            Source::Device => Target::Device(self.device.clone()),
            Source::Group(i) => Target::Group(self.groups.get(i).cloned().unwrap_or_default()),
        }
    }

    /// How a source's revision is kept in the record: by topic, not by
    /// position, so reordering the groups keeps each group's revision.
    fn key(&self, source: Source) -> String {
        match self.target(source) {
            Target::Device(_) => "device".into(),
            Target::Group(g) => format!("group:{g}"),
        }
    }
}

/// The handle the main loop holds.
#[derive(Debug, Clone)]
pub(crate) struct Deployments {
    tx: mpsc::UnboundedSender<Command>,
}

impl Deployments {
    /// Hands over a desired-state message; returns once it is recorded.
    pub async fn desired(&self, source: Source, payload: &[u8], max_bytes: usize) {
        let (recorded, done) = oneshot::channel();
        let cmd = Command::Desired { source, payload: payload.to_vec(), max_bytes, recorded };
        if self.tx.send(cmd).is_ok() {
            let _ = done.await;
        }
    }

    pub fn set_limits(&self, limits: pipeline::Limits) {
        let _ = self.tx.send(Command::Limits(limits));
    }

    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }

    /// After [`Deployments::stop`], once no request can reach a version on
    /// probation any more: the deployer records the last verdicts and ends.
    pub fn finish(&self) {
        let _ = self.tx.send(Command::Finish);
    }
}

/// A deployment the pipeline is running.
struct Running {
    source: Source,
    deployment: Deployment,
    cancel: Cancel,
    job: tokio::task::JoinHandle<Result<Prepared, Ended>>,
}

/// The version on probation and what its verdict needs.
#[derive(Debug)]
struct OnProbation {
    token: u64,
    closes_at: Instant,
    record: ActiveRecord,
    /// The version it replaced, which a failed verdict restores.
    previous: ActiveRecord,
}

/// The owner of deployment state. See the module's documentation.
pub(crate) struct Deployer {
    pipeline: Arc<Pipeline>,
    reporter: Arc<Reporter>,
    engine: Arc<Engine>,
    reconciler: Reconciler,
    authority: Authority,
    record: Record,
    /// The record of the version the engine serves (None: no model).
    serving: Option<ActiveRecord>,
    probation: Option<OnProbation>,
    /// The probation a swap last ended (token, record): a failed verdict it
    /// sent before it ended still refuses its version.
    replaced: Option<(u64, ActiveRecord)>,
    running: Option<Running>,
    /// The newest desired state received while another deployment runs.
    queued: Option<(Source, Deployment, &'static str)>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Its own command channel, for the pipeline's `Installing`.
    own: mpsc::UnboundedSender<Command>,
    verdicts: mpsc::UnboundedReceiver<ProbationEnd>,
    stopping: bool,
    finishing: bool,
}

/// What the start-up restore found, for the wiring.
pub(crate) struct Restored {
    /// The HTTP port of the version that serves again.
    pub http_port: Option<u16>,
}

impl Deployer {
    /// Reads the record, serves the last active version from the store
    /// (re-verified, before and without any network), and returns the
    /// deployer with its handle. A deployment interrupted by the last stop
    /// resumes when [`Deployer::run`] starts.
    pub async fn open(
        pipeline: Arc<Pipeline>,
        reporter: Arc<Reporter>,
        authority: Authority,
    ) -> (Deployer, Deployments, Restored) {
        let engine = pipeline.engine.clone();
        let mut record = Record::read(&pipeline.store, pipeline.slot.as_deref());
        reporter.resume_seq(record.seq);
        record.remap_groups(&authority.groups);
        // What an unsigned publisher could set before keys were configured
        // (a revision up to u64::MAX, a deployment still pending) does not
        // carry into signed operation. What serves keeps serving.
        let unsigned_history = authority.trust.enforced() && !record.signed_revisions;
        let mut dropped = None;
        if unsigned_history {
            if !record.revisions.is_empty() || record.pending.is_some() {
                tracing::warn!(
                    revisions = ?record.revisions,
                    "trust keys are now configured: revisions and a pending deployment accepted without them are forgotten"
                );
            }
            record.revisions.clear();
            record.desired.clear();
            dropped = record.pending.take();
        }
        record.signed_revisions = authority.trust.enforced();
        let limits = **pipeline.limits.load();
        let boot = breaker::boot_id();
        let store = &pipeline.store;
        let blamed =
            store.exit_blame.get_or_init(|| record::blamed_for_exit(store)).iter().any(|k| k == pipeline.slot_key());
        let tripped = if blamed {
            breaker::judge(&mut record, limits.breaker, std::time::SystemTime::now(), &boot)
        } else {
            // Another slot's model takes the blame for an unclean exit.
            record.installing = None;
            None
        };
        record.boot_id = boot;
        // From now on an exit that does not go through `run`'s end is unclean.
        record.running = true;
        let (tx, commands) = mpsc::unbounded_channel();
        let (verdict_tx, verdicts) = mpsc::unbounded_channel();
        engine.on_probation_end(verdict_tx);
        let mut d = Deployer {
            pipeline,
            reporter,
            engine,
            reconciler: Reconciler::new(),
            authority,
            record,
            serving: None,
            probation: None,
            replaced: None,
            running: None,
            queued: None,
            commands,
            own: tx.clone(),
            verdicts,
            stopping: false,
            finishing: false,
        };
        let _ = d.persist().await;
        if let Some(t) = tripped {
            d.report_tripped(t);
        }
        if let Some(p) = dropped.filter(|p| p.source != Source::GONE) {
            let detail = "accepted without a signature before trust keys were configured: not resumed";
            d.set_outcome(&p.deployment, Outcome::Superseded, None);
            d.reporter.event(&p.deployment, Phase::Superseded, None, None, Some(detail.into()));
        }
        let restored = d.restore(unsigned_history).await;
        // What this slot keeps, before any slot's retention runs.
        let mut held = d.record.history.clone();
        held.extend(d.record.active.iter().chain(&d.record.pending).flat_map(|a| versions_of(&a.deployment)));
        d.pipeline.store.hold(d.pipeline.slot_key(), &held);
        (d, Deployments { tx }, restored)
    }

    async fn restore(&mut self, unsigned_history: bool) -> Restored {
        self.publish_view();
        let mut http_port = None;
        if let Some(active) = self.record.active.clone() {
            let p = self.pipeline.clone();
            let a = active.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                p.restore(&a).map_err(|e| match e {
                    FetchError::Failed(e) => e,
                    FetchError::Cancelled => ErrorInfo::new(ErrorCode::Internal, "restoring was cancelled"),
                })
            })
            .await
            .unwrap_or_else(|e| Err(ErrorInfo::new(ErrorCode::Internal, format!("restoring panicked: {e}"))));
            match loaded {
                Ok(settled) => {
                    // Settled again (on ONNX Runtime, by a child): what serves now.
                    let mut active = active;
                    if settled.is_some() && settled != active.settled {
                        active.settled = settled;
                        self.record.active = Some(active.clone());
                        let _ = self.persist().await;
                    }
                    http_port = active.deployment.serving.http_port;
                    if active.deployment.shadow.is_some() {
                        let (p, d) = (self.pipeline.clone(), active.deployment.clone());
                        match tokio::task::spawn_blocking(move || p.restore_shadow(&d)).await {
                            Ok(Ok(model)) => self.start_shadow(&active.deployment, Some(model)),
                            Ok(Err(e)) => {
                                tracing::warn!(error = ?e, "the shadow candidate cannot be restored: not scored")
                            }
                            Err(e) => tracing::warn!(error = %e, "restoring the shadow candidate panicked: not scored"),
                        }
                    }
                    self.serving = Some(active);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the stored active version cannot serve; waiting for a deployment");
                    // The state must not claim a model that does not serve.
                    self.set_outcome(&active.deployment, Outcome::Failed, Some(e));
                    self.record.active = None;
                    let _ = self.persist().await;
                }
            }
        }
        // What the reconciler knows per topic: what serves, a deployment
        // rolled back or quarantined before the restart (its retained desired
        // state replays as `unchanged`, not as a new attempt), the newest
        // revision of each topic last so it is the one remembered.
        let mut known: Vec<ActiveRecord> = self.serving.iter().cloned().collect();
        known.extend(self.record.rolled_back.clone());
        known.extend(self.record.quarantined.as_ref().map(|q| q.record.clone()));
        known.retain(|a| a.source != Source::GONE);
        known.sort_by_key(|a| a.deployment.revision);
        for a in known {
            self.reconciler.restore(a.source, a.deployment);
        }
        if unsigned_history {
            self.reconciler.forget_revisions();
        }
        Restored { http_port }
    }

    /// Reports what the breaker did at start-up (the events wait in the
    /// journal until the broker is reached).
    fn report_tripped(&mut self, t: breaker::Tripped) {
        let d = &t.quarantined.deployment;
        match &t.restored {
            Some(r) => {
                let detail =
                    format!("quarantined; {}@{} serves again", r.deployment.model.name, r.deployment.model.version);
                self.reporter.event(d, Phase::RolledBack, None, Some(t.error.clone()), Some(detail));
            }
            None if t.was_active => {
                let detail = "quarantined; no earlier version to serve".to_string();
                self.reporter.event(d, Phase::RolledBack, None, Some(t.error.clone()), Some(detail));
            }
            None => self.reporter.event(d, Phase::Failed, None, Some(t.error.clone()), Some("quarantined".into())),
        }
    }

    /// Runs until stopped: commands, the running deployment's end, probation
    /// verdicts and the probation window's timer, one at a time.
    pub async fn run(mut self) {
        // A deployment accepted before a restart and not finished: resume it
        // from the store and the registry, without waiting for the broker.
        if let Some(p) = self.record.pending.clone() {
            let decision = if p.source == Source::GONE {
                Decision::Nothing
            } else {
                self.reconciler.on_message(p.source, Some(p.deployment.clone()))
            };
            match decision {
                Decision::Deploy(d) => self.start(p.source, d, "resumed after a restart").await,
                // Already what serves: nothing was left to do.
                Decision::Unchanged(_) => {
                    self.record.pending = None;
                    let _ = self.persist().await;
                }
                // What the device restored outranks it now (the withdrawal
                // that made it the target is not replayed): it ends here
                // rather than staying in progress for good.
                _ => {
                    self.record.pending = None;
                    let d = p.deployment;
                    self.set_outcome(&d, Outcome::Superseded, None);
                    let _ = self.persist().await;
                    let detail = "not resumed after a restart: a desired state of higher precedence applies";
                    self.reporter.event(&d, Phase::Superseded, None, None, Some(detail.into()));
                }
            }
        }
        // The highest revision each topic reached, whatever became of it
        // (withdrawn, shadowed, failed): nothing older or equal is accepted
        // again. (After the pending deployment resumed: it holds its topic's
        // highest revision itself.)
        for source in self.sources() {
            let key = self.authority.key(source);
            if let Some(d) = self.record.desired.get(&key) {
                self.reconciler.recall(source, d.clone());
            }
            if let Some(r) = self.record.revisions.get(&key) {
                self.reconciler.remember(source, *r);
            }
        }
        loop {
            let window = self.probation.as_ref().map(|p| p.closes_at);
            tokio::select! {
                // A verdict first: it concerns what serves now.
                biased;
                Some(end) = self.verdicts.recv() => self.on_verdict(end).await,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Desired { source, payload, max_bytes, recorded }) => {
                        self.on_desired(source, &payload, max_bytes, recorded).await
                    }
                    Some(Command::Limits(l)) => self.on_limits(l),
                    Some(Command::Installing { deployment, recorded }) => self.on_installing(*deployment, recorded).await,
                    Some(Command::Stop) => self.on_stop().await,
                    Some(Command::Finish) | None => {
                        self.on_stop().await;
                        self.finishing = true;
                    }
                },
                ended = async { (&mut self.running.as_mut().expect("guarded").job).await }, if self.running.is_some() => {
                    self.on_job_ended(ended).await
                }
                _ = tokio::time::sleep_until(window.unwrap_or_else(Instant::now)), if window.is_some() => {
                    self.on_window_closed()
                }
            }
            if self.finishing && self.running.is_none() {
                while let Ok(end) = self.verdicts.try_recv() {
                    self.on_verdict(end).await;
                }
                break;
            }
        }
        self.clean_exit().await;
    }

    /// Records that this run ends cleanly (the breaker counts the others).
    pub async fn clean_exit(&mut self) {
        self.record.running = false;
        let _ = self.persist().await;
    }

    /// Records that `d`'s model code is about to run in the agent. Fails
    /// closed: a marker that could not be written runs no model code.
    async fn on_installing(&mut self, d: Deployment, recorded: std::sync::mpsc::Sender<Result<(), FetchError>>) {
        if self.stopping {
            let _ = recorded.send(Err(FetchError::Cancelled));
            return;
        }
        let source = self.running.as_ref().map_or(Source::Device, |r| r.source);
        self.record.installing = Some(ActiveRecord::new(source, d));
        let answer = match self.persist().await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.record.installing = None;
                Err(FetchError::Failed(ErrorInfo::new(
                    ErrorCode::Internal,
                    format!("cannot record that the version is installing ({e}); the serving model is untouched"),
                )))
            }
        };
        let _ = recorded.send(answer);
    }

    /// The agent stops: recorded as a clean stop at once (the drain that
    /// follows may outlast the grace period, and the breaker must not count
    /// a requested stop as a crash).
    async fn on_stop(&mut self) {
        let first = !self.stopping;
        self.stopping = true;
        self.queued = None;
        if let Some(r) = &self.running {
            r.cancel.stop();
        }
        if first {
            self.record.running = false;
            let _ = self.persist().await;
        }
    }

    fn on_limits(&mut self, limits: pipeline::Limits) {
        self.pipeline.limits.store(Arc::new(limits));
        // The pool follows the new defaults unless the deployment sets its own.
        let serving = self.serving.as_ref().map(|a| a.deployment.serving.clone()).unwrap_or_default();
        let before = self.engine.pool_sizes();
        self.engine
            .resize(serving.workers.unwrap_or(limits.workers).max(1), serving.max_queue.unwrap_or(limits.max_queue));
        if self.engine.pool_sizes() != before {
            tracing::info!(pool = ?self.engine.pool_sizes(), "worker pool resized by the configuration");
        }
    }

    fn sources(&self) -> Vec<Source> {
        std::iter::once(Source::Device).chain((0..self.authority.groups.len()).map(Source::Group)).collect()
    }

    /// A desired-state message: opened (signature and target checked when
    /// keys are configured), judged, and a deployment (or undeployment)
    /// recorded on disk before `recorded` is answered, so the message can be
    /// acked. A refused message changes nothing and is reported.
    async fn on_desired(&mut self, source: Source, payload: &[u8], max: usize, recorded: oneshot::Sender<()>) {
        if payload.len() > max {
            let e = ProtocolError {
                code: ErrorCode::TooLarge,
                path: String::new(),
                expected: format!("a desired state of at most {max} bytes (--max-packet-size)"),
                found: format!("{} bytes", payload.len()),
            };
            self.count_refused(ErrorCode::TooLarge);
            self.reporter.invalid_desired(payload, &e.info());
            return;
        }
        let arrived_on = self.authority.target(source);
        let slot = self.pipeline.slot.as_deref();
        let opened = self.authority.trust.open_in(payload, &arrived_on, slot, std::time::SystemTime::now());
        let decision = match opened {
            Err(refused) => {
                self.count_refused(refused.error.code);
                tracing::warn!(topic = %arrived_on, error = %refused.error, "desired state refused");
                self.reporter.refused_message(payload, &refused);
                return;
            }
            Ok((Desired::Deploy(d), signer)) => {
                if let Some(e) = self.downgrade(source, &d).or_else(|| self.slot_port(&d)) {
                    self.count_refused(e.code);
                    self.reporter.refused_desired(&d, &e);
                    return;
                }
                if self.authority.trust.enforced() && self.reconciler.is_new(source, &d) {
                    tracing::info!(deployment = %d.deployment_id, revision = d.revision, %signer, "signed deployment accepted");
                }
                self.reconciler.on_message(source, Some(*d))
            }
            Ok((Desired::Undeploy { revision: Some(r), .. }, _)) => self.reconciler.on_withdraw(source, r),
            Ok((Desired::Undeploy { revision: None, .. }, _)) => self.reconciler.on_message(source, None),
        };
        self.remember_revision(source);
        match decision {
            Decision::Deploy(d) => {
                crate::sys::crash_point("desired-received");
                self.record.pending = Some(ActiveRecord::new(source, d.clone()));
                let _ = self.persist().await;
                let _ = recorded.send(());
                self.start(source, d, "").await;
            }
            Decision::Undeploy => {
                self.record.pending = None;
                let _ = self.persist().await;
                let _ = recorded.send(());
                self.undeploy().await;
            }
            Decision::Unchanged(d) => {
                let in_progress = self.record.pending.as_ref().is_some_and(|p| {
                    p.deployment.deployment_id == d.deployment_id && p.deployment.revision == d.revision
                });
                let quarantined = self.record.quarantined.as_ref().filter(|q| q.record.same(&d));
                if in_progress {
                    // A redelivery or retained replay while it deploys: its own events follow.
                    tracing::debug!(deployment = %d.deployment_id, "desired state seen again while it deploys");
                } else if let Some(q) = quarantined {
                    let detail = format!("quarantined ({}); not retried until a new revision", q.error);
                    self.reporter.event(&d, Phase::Unchanged, None, None, Some(detail))
                } else {
                    self.reporter.event(&d, Phase::Unchanged, None, None, Some("already applied".into()))
                }
            }
            Decision::Stale { deployment, newest } => self.count_refused(ErrorCode::StaleRevision).reporter.event(
                &deployment,
                Phase::Failed,
                None,
                Some(ErrorInfo::new(
                    ErrorCode::StaleRevision,
                    format!(
                        "revision {} is not newer than revision {newest} already received from this topic",
                        deployment.revision
                    ),
                )),
                None,
            ),
            Decision::StaleWithdraw { revision, newest } => {
                let e = ErrorInfo::new(
                    ErrorCode::StaleRevision,
                    format!(
                        "undeploy revision {revision} is not newer than revision {newest} already received from this topic"
                    ),
                );
                self.count_refused(ErrorCode::StaleRevision).reporter.refused(None, revision, &e);
            }
            Decision::Shadowed(d) => {
                let _ = self.persist().await;
                self.reporter.event(
                    &d,
                    Phase::Unchanged,
                    None,
                    None,
                    Some("shadowed by a desired state of higher precedence (device topic or an earlier group)".into()),
                )
            }
            Decision::Nothing => {
                let _ = self.persist().await;
            }
        }
    }

    fn count_refused(&self, code: ErrorCode) -> &Self {
        self.engine.counters.tally.desired_refused(code);
        self
    }

    /// Copies the source's highest revision into the record (persisted with
    /// what the decision writes next).
    fn remember_revision(&mut self, source: Source) {
        let key = self.authority.key(source);
        if let Some(r) = self.reconciler.newest(source) {
            self.record.revisions.insert(key.clone(), r);
        }
        match self.reconciler.desired_of(source) {
            Some(d) => self.record.desired.insert(key, d.clone()),
            None => self.record.desired.remove(&key),
        };
    }

    /// `downgrade_refused` for a new desired state that would replace the
    /// serving version of the same model by an older one, unless its
    /// policy allows it.
    fn downgrade(&self, source: Source, d: &Deployment) -> Option<ErrorInfo> {
        // Judged only for what would take effect (a shadowed group
        // deployment is recorded; it is judged if it ever applies by arriving again).
        if self.reconciler.outranked(source) {
            return None;
        }
        let serving = &self.serving.as_ref()?.deployment.model;
        let older = serving.name == d.model.name
            && version_order(&d.model.version, &serving.version) == std::cmp::Ordering::Less;
        if !older || d.policy.allow_downgrade == Some(true) || !self.reconciler.is_new(source, d) {
            return None;
        }
        Some(ErrorInfo::new(
            ErrorCode::DowngradeRefused,
            format!(
                "{}@{} is older than {}@{}, which serves; to go back, publish it with \"policy\": \
                 {{\"allow_downgrade\": true}}",
                d.model.name, d.model.version, serving.name, serving.version
            ),
        ))
    }

    /// `invalid_message` for a model slot's deployment that sets
    /// `serving.http_port`: the endpoint is the device's, one port for
    /// every model (moved by the default slot's deployments only).
    fn slot_port(&self, d: &Deployment) -> Option<ErrorInfo> {
        let slot = self.pipeline.slot.as_deref()?;
        d.serving.http_port?;
        Some(ErrorInfo::new(
            ErrorCode::InvalidMessage,
            format!(
                "serving.http_port: model slot {slot} is served on the device's HTTP endpoint (/v2/models/{slot}); \
                 only a deployment on the device's own desired topic moves its port"
            ),
        ))
    }

    /// Starts deploying `d`, superseding whatever deployment is in progress:
    /// the running one is cancelled and `d` starts when it has ended.
    async fn start(&mut self, source: Source, d: Deployment, why: &'static str) {
        let what = format!("{}@{}", d.model.name, d.model.version);
        let detail = if why.is_empty() { what } else { format!("{what} ({why})") };
        self.reporter.event(&d, Phase::Received, None, None, Some(detail));
        match &self.running {
            Some(r) => {
                r.cancel.cancel();
                // Latest wins: one queued behind a running one is superseded before it starts.
                if let Some((_, old, _)) = self.queued.replace((source, d, why)) {
                    self.reporter.event(
                        &old,
                        Phase::Superseded,
                        None,
                        None,
                        Some("a newer desired state arrived before it started".into()),
                    );
                }
            }
            None => self.launch(source, d).await,
        }
    }

    async fn launch(&mut self, source: Source, d: Deployment) {
        if self.relabel(source, &d).await {
            return;
        }
        self.set_outcome(&d, Outcome::InProgress, None);
        let _ = self.persist().await;
        let cancel = Cancel::default();
        let (pipeline, c, dep) = (self.pipeline.clone(), cancel.clone(), d.clone());
        // What retention must not evict to make room: what serves and what a rollback restores.
        let protected: Vec<String> = self
            .serving
            .iter()
            .chain(self.probation.as_ref().map(|p| &p.previous))
            .flat_map(|a| versions_of(&a.deployment))
            .collect();
        // Every log line of the deployment carries its id, revision and model version.
        let span = tracing::info_span!(
            "deployment",
            id = %d.deployment_id,
            revision = d.revision,
            model = %format!("{}@{}", d.model.name, d.model.version)
        );
        let own = self.own.clone();
        // Other slots' retention waits until this deployment has ended (its swap included).
        let p = self.pipeline.clone();
        let _ = tokio::task::spawn_blocking(move || p.store.begin(p.slot_key())).await;
        let job = tokio::task::spawn_blocking(move || {
            let installing = || {
                let (recorded, done) = std::sync::mpsc::channel();
                let _ = own.send(Command::Installing { deployment: Box::new(dep.clone()), recorded });
                let answer = done.recv().unwrap_or(Err(FetchError::Cancelled));
                // Fault injection: inside the window the breaker blames on this version.
                crate::sys::delay_point_blocking("installing");
                answer
            };
            let prepared = span.in_scope(|| pipeline.prepare(&dep, &c, &protected, &installing));
            // Fault injection: the window between the last check and the swap.
            crate::sys::delay_point_blocking("before-swap");
            prepared
        });
        self.running = Some(Running { source, deployment: d, cancel, job });
    }

    /// A new deployment of the very version that serves (same manifest,
    /// same serving settings, no shadow on either side, nothing on
    /// probation): recorded as the active deployment without reloading
    /// anything (a rollout's completion hands every device the group's
    /// deployment of the version its own override already serves).
    async fn relabel(&mut self, source: Source, d: &Deployment) -> bool {
        let Some(serving) = self.serving.clone() else { return false };
        let s = &serving.deployment;
        let same = s.model == d.model && s.serving == d.serving && s.shadow.is_none() && d.shadow.is_none();
        if !same || self.probation.is_some() || self.engine.active().is_none() {
            return false;
        }
        let record =
            ActiveRecord { source, deployment: d.clone(), since: serving.since.clone(), settled: serving.settled };
        self.record.active = Some(record.clone());
        self.serving = Some(record);
        self.set_outcome(d, Outcome::Active, None);
        self.record.push_history(&d.model.manifest_sha256, d.policy.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS));
        let _ = self.persist().await;
        let detail = format!(
            "{}@{} serves already (deployment {}): recorded as this deployment, nothing reloaded",
            d.model.name, d.model.version, s.deployment_id
        );
        let backend = self.engine.active().and_then(|m| m.backend.clone());
        self.reporter.active_event(d, detail, outpost_protocol::Timings::default(), backend);
        true
    }

    async fn on_job_ended(&mut self, ended: Result<Result<Prepared, Ended>, tokio::task::JoinError>) {
        let Some(Running { source, deployment: d, cancel, .. }) = self.running.take() else { return };
        let ended = match ended {
            Ok(Ok(prepared)) if !cancel.is_cancelled() => {
                self.swap_in(source, &d, prepared).await;
                None
            }
            Ok(Ok(_)) => Some(Ended::Superseded),
            Ok(Err(e)) => Some(e),
            // A panic in the pipeline (a model that makes tract panic) fails
            // this deployment; the serving model is untouched.
            Err(e) => Some(Ended::Failed(ErrorInfo::new(
                ErrorCode::Internal,
                format!(
                    "the deployment stopped unexpectedly: {} (the serving model is untouched; `outpost check-bundle` runs the same steps on a lab device)",
                    panic_text(e)
                ),
            ))),
        };
        match ended {
            None => {}
            Some(Ended::Superseded) if cancel.is_stopping() => {
                // Still pending on disk: the next start resumes it.
                tracing::info!(deployment = %d.deployment_id, "deployment interrupted by shutdown; it resumes at start-up");
            }
            Some(Ended::Superseded) => {
                self.set_outcome(&d, Outcome::Superseded, None);
                let _ = self.persist().await;
                self.reporter.event(&d, Phase::Superseded, None, None, Some("a newer desired state arrived".into()));
            }
            Some(Ended::Failed(e)) => {
                self.set_outcome(&d, Outcome::Failed, Some(e.clone()));
                let _ = self.persist().await;
                self.reporter.event(&d, Phase::Failed, None, Some(e), None);
            }
        }
        match self.queued.take().filter(|_| !self.stopping) {
            Some((source, d, _)) => self.launch(source, d).await,
            // Nothing comes next (and the agent is not stopping, when a
            // download is kept to resume): what a deployment that ended
            // without serving downloaded in part is of no further use.
            None => {
                let (p, partials) = (self.pipeline.clone(), !self.stopping);
                let (removed, freed) = tokio::task::spawn_blocking(move || p.store.finish(p.slot_key(), partials))
                    .await
                    .unwrap_or_default();
                if removed > 0 || freed > 0 {
                    tracing::info!(removed, freed, "store cleaned after the deployment ended");
                }
            }
        }
    }

    /// Puts a prepared version in service, records it, then announces it.
    async fn swap_in(&mut self, source: Source, d: &Deployment, prepared: Prepared) {
        let Prepared { model, listener, started, mut timings, shadow } = prepared;
        let activating = std::time::Instant::now();
        if let Some(http) = self.pipeline.http.get() {
            match listener {
                Some(l) => http.take_over(l),
                // Bound already when prepared; a rollback since may have moved it.
                None => {
                    if let Err(e) = http.move_to(d.serving.http_port) {
                        tracing::error!(error = %e, "the deployment's HTTP port");
                    }
                }
            }
        }
        let limits = self.pipeline.limits.load();
        let before = self.engine.pool_sizes();
        self.engine.resize(
            d.serving.workers.unwrap_or(limits.workers).max(1),
            d.serving.max_queue.unwrap_or(limits.max_queue),
        );
        if self.engine.pool_sizes() != before {
            tracing::info!(pool = ?self.engine.pool_sizes(), "worker pool resized by the deployment");
        }
        let record = ActiveRecord { settled: Some(model.settled()), ..ActiveRecord::new(source, d.clone()) };
        // A probation in progress ends here; its verdict, if one is already
        // on its way, is recognised as stale by its token.
        let old = self.probation.take();
        let known: Vec<ActiveRecord> =
            self.serving.iter().cloned().chain(old.as_ref().map(|p| p.previous.clone())).collect();
        if let Some(old) = old {
            self.replaced = Some((old.token, old.record));
        }
        let mut described = None;
        match ProbationLimits::from_policy(d.policy.probation.as_ref()) {
            Some(limits) => {
                let (window, text) = (limits.window, limits.describe());
                // "Previous" is what the engine actually serves at the swap:
                // after a rollback whose verdict is still queued, the restored
                // version, not the one that was on probation.
                if let Some((token, previous_model)) = self.engine.swap_on_probation(model.clone(), limits) {
                    let previous = known
                        .iter()
                        .find(|a| a.deployment.model.manifest_sha256 == previous_model.manifest_sha256)
                        .cloned();
                    match previous {
                        Some(previous) => {
                            self.probation = Some(OnProbation {
                                token,
                                closes_at: Instant::now() + window,
                                record: record.clone(),
                                previous,
                            });
                            described = Some(text);
                        }
                        // The engine serves a version the record does not know
                        // (it cannot roll back to it truthfully): no probation.
                        None => {
                            tracing::error!(version = %previous_model.version, "the serving version has no record: the new one serves without probation");
                            self.engine.swap(Some(model.clone()));
                        }
                    }
                }
            }
            None => {
                self.engine.swap(Some(model.clone()));
            }
        }
        self.engine.set_capture_rate(d.serving.capture_rate.unwrap_or(0.0));
        self.start_shadow(d, shadow);
        let mut keep =
            self.record.push_history(&d.model.manifest_sha256, d.policy.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS));
        keep.extend(versions_of(d));
        // Persist before announcing: a device that said `active` comes back with it after a power cut.
        let before = self.record.active.replace(record.clone());
        if before.as_ref().is_none_or(|b| b.deployment.model.manifest_sha256 != d.model.manifest_sha256) {
            self.record.previous = before;
            self.record.crashes.clear();
        }
        self.serving = Some(record);
        self.set_outcome(d, Outcome::Active, None);
        let _ = self.persist().await;
        crate::sys::crash_point("state-persisted");
        // Retention before the event too: when `active` arrives, the store is as it stays.
        let mut protected = keep;
        protected.extend(self.probation.as_ref().map(|p| p.previous.deployment.model.manifest_sha256.clone()));
        // Fault injection: the window between a slot's swap and its retention.
        crate::sys::delay_point(&format!("retention-{}", self.pipeline.slot_key())).await;
        let pipeline = self.pipeline.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let store = &pipeline.store;
            match store.collect(pipeline.slot_key(), &protected, &[]) {
                Some((removed, freed)) => {
                    let (bytes, versions) = store.usage();
                    tracing::info!(removed, freed, store_bytes = bytes, versions, "store retention applied");
                }
                None => tracing::info!("store retention deferred: another model slot is deploying"),
            }
            // The load's temporaries and the replaced model: back to the system.
            crate::sys::alloc::release_free_memory();
        })
        .await;
        let mut detail =
            format!("{}@{} serving (deployed in {:.2}s)", model.name, model.version, started.elapsed().as_secs_f64());
        // What the golden sample showed and how requests run (one thread or every core).
        if !model.validation.is_empty() {
            detail.push_str(&format!("; {}", model.validation));
        }
        if let Some(described) = described {
            detail.push_str(&format!("; {described}"));
        }
        if let Some(s) = &d.shadow {
            let (name, version, pct) = (&s.model.name, &s.model.version, s.sample_rate * 100.0);
            detail.push_str(&format!("; scoring {name}@{version} in shadow on {pct}% of requests"));
        }
        timings.activate = pipeline::ms(activating.elapsed());
        timings.total = pipeline::ms(started.elapsed());
        self.reporter.active_event(d, detail, timings, model.backend.clone());
        tracing::info!(model = %model.name, version = %model.version, "active");
    }

    fn on_window_closed(&mut self) {
        if let Some(p) = &self.probation {
            // The engine judges and answers on the verdict channel.
            self.engine.close_probation(p.token);
            // Until the verdict arrives, no second close.
            if let Some(p) = self.probation.as_mut() {
                p.closes_at = Instant::now() + std::time::Duration::from_secs(3600);
            }
        }
    }

    /// A probation ended. The engine already put the previous version back
    /// if it failed; record and report it. A verdict on a probation that is
    /// no longer the current one (a newer version was swapped in after the
    /// engine rolled back) is reported, and refuses its version, but
    /// changes nothing else: what serves now was recorded by its own swap.
    async fn on_verdict(&mut self, end: ProbationEnd) {
        let current = self.probation.as_ref().is_some_and(|p| p.token == end.token);
        let Some(p) = (if current { self.probation.take() } else { None }) else {
            // Stale: the engine rolled back, then a newer version was swapped
            // in before this was read. The version is refused; what serves
            // now was recorded by its own swap.
            let replaced = self.replaced.take_if(|(token, _)| *token == end.token);
            if let (Verdict::Fail(evidence), Some((_, refused))) = (end.verdict, replaced) {
                let error = ErrorInfo::new(
                    ErrorCode::ProbationFailed,
                    format!("{}@{}: {evidence}", end.model.name, end.model.version),
                );
                self.record.rolled_back = Some(refused.clone());
                let _ = self.persist().await;
                let detail = format!(
                    "rolled back to {}@{}, which a newer deployment has since replaced",
                    end.previous.name, end.previous.version
                );
                self.reporter.event(&refused.deployment, Phase::RolledBack, None, Some(error), Some(detail));
            }
            return;
        };
        let d = p.record.deployment.clone();
        match end.verdict {
            Verdict::Pass(summary) => self.reporter.event(&d, Phase::Active, None, None, Some(summary)),
            Verdict::Fail(evidence) => {
                let serving = &p.previous.deployment.serving;
                let limits = self.pipeline.limits.load();
                self.engine.set_capture_rate(serving.capture_rate.unwrap_or(0.0));
                if let Some(http) = self.pipeline.http.get()
                    && let Err(e) = http.move_to(serving.http_port)
                {
                    tracing::error!(error = %e, "rollback: the previous version's HTTP port");
                }
                self.engine.resize(
                    serving.workers.unwrap_or(limits.workers).max(1),
                    serving.max_queue.unwrap_or(limits.max_queue),
                );
                let error = ErrorInfo::new(
                    ErrorCode::ProbationFailed,
                    format!("{}@{}: {evidence}", end.model.name, end.model.version),
                );
                // The candidate scored beside the refused version is not the restored one's.
                self.start_shadow(&p.previous.deployment, None);
                let restored = ActiveRecord { since: crate::sys::now_rfc3339(), ..p.previous.clone() };
                self.record.rolled_back = Some(p.record.clone());
                self.record.active = Some(restored.clone());
                self.record.previous = None;
                self.record.crashes.clear();
                self.serving = Some(restored);
                let keep = p.previous.deployment.policy.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS);
                self.record.push_history(&p.previous.deployment.model.manifest_sha256, keep);
                self.set_outcome(&d, Outcome::RolledBack, Some(error.clone()));
                let _ = self.persist().await;
                let detail = format!("rolled back: {}@{} serves again", end.previous.name, end.previous.version);
                self.reporter.event(&d, Phase::RolledBack, None, Some(error), Some(detail));
            }
            Verdict::Watching => {}
        }
    }

    async fn undeploy(&mut self) {
        if let Some((_, queued, _)) = self.queued.take() {
            let detail = "the desired state was withdrawn before it started".to_string();
            self.reporter.event(&queued, Phase::Superseded, None, None, Some(detail));
        }
        if let Some(r) = &self.running {
            r.cancel.cancel();
        }
        self.probation = None;
        self.set_shadow(None);
        let old = self.engine.swap(None);
        self.engine.set_capture_rate(0.0);
        self.serving = None;
        match self.record.active.take() {
            Some(active) => {
                let d = active.deployment;
                self.set_outcome(&d, Outcome::Undeployed, None);
                let _ = self.persist().await;
                let detail = "desired state withdrawn: no model serves".to_string();
                self.reporter.event(&d, Phase::Undeployed, None, None, Some(detail));
            }
            None => {
                let _ = self.persist().await;
            }
        }
        // The model is freed off the reactor (tract's plans can be large).
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    }

    /// Scores `model` (the shadow candidate of `d`) beside the active
    /// model from now on, or none; the candidate it replaces reports its
    /// final figures.
    fn start_shadow(&self, d: &Deployment, model: Option<Arc<crate::serve::model::Model>>) {
        let next = model.zip(d.shadow.as_ref()).map(|(m, s)| {
            Arc::new(crate::serve::shadow::Shadow::new(m, s.sample_rate, d.deployment_id.clone(), d.revision))
        });
        self.set_shadow(next);
    }

    fn set_shadow(&self, next: Option<Arc<crate::serve::shadow::Shadow>>) {
        let started = next.as_ref().map(|s| (format!("{}@{}", s.model.name, s.model.version), s.rate));
        if let Some(old) = self.engine.set_shadow(next) {
            self.reporter.shadow_event(&old, "shadow scoring ended");
        }
        if let Some((candidate, rate)) = started {
            tracing::info!(%candidate, rate, "shadow scoring started");
        }
    }

    /// Records the outcome of `d` (in memory: [`Deployer::persist`] writes).
    fn set_outcome(&mut self, d: &Deployment, outcome: Outcome, error: Option<ErrorInfo>) {
        self.record.set_outcome(d, outcome, error);
    }

    /// Writes the record (an fsync: off the reactor, awaited, so writes land
    /// in the order they were made) and republishes the retained state.
    async fn persist(&mut self) -> Result<(), String> {
        self.record.seq = self.reporter.seq();
        let (store, record) = (self.pipeline.store.clone(), self.record.clone());
        let slot = self.pipeline.slot.clone();
        let written = tokio::task::spawn_blocking(move || record.write(&store, slot.as_deref()))
            .await
            .unwrap_or_else(|e| Err(format!("the write panicked: {e}")));
        self.publish_view();
        written
    }

    fn publish_view(&self) {
        self.reporter.set_view(self.record.view());
        self.reporter.publish_state();
    }
}

/// The versions a deployment needs in the store: its model's and its shadow candidate's.
fn versions_of(d: &Deployment) -> Vec<String> {
    std::iter::once(d.model.manifest_sha256.clone())
        .chain(d.shadow.as_ref().map(|s| s.model.manifest_sha256.clone()))
        .collect()
}

/// Orders model versions as people number them: runs of digits compare as
/// numbers (`1.10` > `1.9`, `v10` > `v2`), everything else byte by byte.
pub(crate) fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(cb.iter()) {
        let o = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    // One is the other plus more: a `-` or `~` suffix is a pre-release
    // (1.0-rc1 < 1.0), anything else is later (1.0.1 > 1.0).
    let pre = |rest: &(bool, &str)| rest.1.starts_with(['-', '~']);
    match ca.len().cmp(&cb.len()) {
        std::cmp::Ordering::Greater if pre(&ca[cb.len()]) => std::cmp::Ordering::Less,
        std::cmp::Ordering::Less if pre(&cb[ca.len()]) => std::cmp::Ordering::Greater,
        o => o,
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests;
