//! What the device tells the operator: `DeploymentEvent`s, the retained
//! `DeviceState`, availability. One [`Reporter`] numbers everything with a
//! per-device `seq` and hands messages to the MQTT task; it also persists the
//! state, so after a restart the device resumes serving and numbering where
//! it left off.

use crate::reconcile::Source;
use crate::store::Store;
use outpost_protocol::{
    ActiveModel, Deployment, DeploymentEvent, DeviceState, ErrorInfo, LastDeployment, Outcome, Phase, Progress, Topics,
};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A message for the MQTT task to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// QoS 1 when true (events, state, answers), else 0 (telemetry).
    pub reliable: bool,
    /// MQTT 5 correlation data echoed from a request (ignored over 3.1.1).
    pub correlation: Option<Vec<u8>>,
}

/// What survives a restart (`DATA/agent.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub active: Option<ActiveRecord>,
    pub last_deployment: Option<LastDeployment>,
    /// Manifest digests of the versions that served, most recent first: what
    /// retention keeps (the active one and `keep_versions` before it).
    #[serde(default)]
    pub history: Vec<String>,
    /// The deployment the agent rolled back from, so that replaying its
    /// retained desired state after a restart does not deploy it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<ActiveRecord>,
    /// A desired state accepted (and acked to the broker) whose deployment
    /// has not ended: resumed after a restart, broker or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<ActiveRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveRecord {
    pub source: Source,
    pub deployment: Deployment,
    pub since: String,
}

/// Events published after the last persisted state may reuse seq numbers
/// after a crash; starting this far ahead keeps `seq` increasing.
const SEQ_RESTART_GAP: u64 = 10_000;

#[derive(Debug)]
pub struct Reporter {
    device: String,
    topics: Topics,
    tx: mpsc::UnboundedSender<Outgoing>,
    store: Arc<Store>,
    inner: Mutex<Record>,
    /// Messages handed to the publisher, and how many it has dealt with
    /// (sent or journaled): the difference is what a shutdown waits for.
    queued: std::sync::atomic::AtomicU64,
    pub delivered: Arc<std::sync::atomic::AtomicU64>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Reporter {
    pub fn new(device: &str, topics: Topics, tx: mpsc::UnboundedSender<Outgoing>, store: Arc<Store>) -> Reporter {
        let mut record: Record =
            store.read("agent.json").and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        if record.seq > 0 {
            record.seq += SEQ_RESTART_GAP;
        }
        Reporter {
            device: device.to_string(),
            topics,
            tx,
            store,
            inner: Mutex::new(record),
            queued: Default::default(),
            delivered: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        // A panic while holding the lock leaves a consistent Record (plain data); keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn record(&self) -> Record {
        self.lock().clone()
    }

    pub fn send(&self, msg: Outgoing) {
        // The receiver lives as long as the agent; a send error means shutdown.
        if self.tx.send(msg).is_ok() {
            self.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Messages handed over and not yet sent or journaled.
    pub fn unsent(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        self.queued.load(SeqCst).saturating_sub(self.delivered.load(SeqCst))
    }

    /// Publishes one event of a deployment.
    pub fn event(
        &self,
        d: &Deployment,
        phase: Phase,
        progress: Option<Progress>,
        error: Option<ErrorInfo>,
        detail: Option<String>,
    ) {
        self.event_for(&d.deployment_id, d.revision, phase, progress, error, detail);
    }

    pub fn event_for(
        &self,
        deployment_id: &str,
        revision: u64,
        phase: Phase,
        progress: Option<Progress>,
        error: Option<ErrorInfo>,
        detail: Option<String>,
    ) {
        self.emit(deployment_id, revision, phase, progress, error, detail, None);
    }

    /// The `active` event, with where the deployment's time went.
    pub fn active_event(&self, d: &Deployment, detail: String, timings: outpost_protocol::Timings) {
        self.emit(&d.deployment_id, d.revision, Phase::Active, None, None, Some(detail), Some(timings));
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        deployment_id: &str,
        revision: u64,
        phase: Phase,
        progress: Option<Progress>,
        error: Option<ErrorInfo>,
        detail: Option<String>,
        timings_ms: Option<outpost_protocol::Timings>,
    ) {
        let seq = {
            let mut r = self.lock();
            r.seq += 1;
            r.seq
        };
        let ev = DeploymentEvent {
            schema: outpost_protocol::event::SCHEMA.into(),
            device: self.device.clone(),
            deployment_id: deployment_id.to_string(),
            revision,
            seq,
            at: now_rfc3339(),
            phase,
            progress,
            error,
            detail,
            timings_ms,
        };
        match (&ev.error, phase) {
            (Some(e), _) => {
                tracing::warn!(deployment = deployment_id, revision, ?phase, code = %e.code, "{}", e.message)
            }
            (None, Phase::Downloading) => {
                tracing::debug!(deployment = deployment_id, ?progress, "downloading")
            }
            _ => tracing::info!(
                deployment = deployment_id,
                revision,
                ?phase,
                detail = ev.detail.as_deref().unwrap_or(""),
                "deployment event"
            ),
        }
        self.send(Outgoing {
            topic: self.topics.events(&self.device),
            payload: serde_json::to_vec(&ev).unwrap_or_default(),
            retain: false,
            reliable: true,
            correlation: None,
        });
    }

    /// Records the outcome of a deployment (and what is active), persists it
    /// (an fsync: call from a blocking thread) and republishes the retained state.
    pub fn set_outcome(
        &self,
        d: &Deployment,
        outcome: Outcome,
        error: Option<ErrorInfo>,
        active: Option<Option<ActiveRecord>>,
    ) {
        {
            let mut r = self.lock();
            r.last_deployment =
                Some(LastDeployment { deployment_id: d.deployment_id.clone(), revision: d.revision, outcome, error });
            if let Some(a) = active {
                r.active = a;
            }
            if outcome == Outcome::Active {
                r.rolled_back = None;
            }
            if outcome != Outcome::InProgress
                && r.pending.as_ref().is_some_and(|p| {
                    p.deployment.deployment_id == d.deployment_id && p.deployment.revision == d.revision
                })
            {
                r.pending = None;
            }
        }
        self.persist();
        self.publish_state();
    }

    /// Records the desired state now being deployed (None: nothing is), so
    /// a restart resumes it. Persists (an fsync: call from a blocking thread).
    pub fn set_pending(&self, pending: Option<ActiveRecord>) {
        self.lock().pending = pending;
        self.persist();
    }

    fn persist(&self) {
        let record = self.record();
        if let Err(e) = self.store.write_atomic("agent.json", &serde_json::to_vec_pretty(&record).unwrap_or_default()) {
            tracing::error!(error = %e, "cannot persist agent state; it will be lost at restart");
        }
    }

    /// Records a rollback: `previous` serves again, `from` (its source and
    /// deployment) is remembered as refused. Persists like `set_outcome`.
    pub fn set_rolled_back(&self, from: ActiveRecord, previous: ActiveRecord, error: ErrorInfo) {
        self.lock().rolled_back = Some(from.clone());
        self.set_outcome(&from.deployment, Outcome::RolledBack, Some(error), Some(Some(previous)));
    }

    /// Records `sha` as the version serving now and returns the versions to
    /// keep: it and at most `keep_previous` before it.
    pub fn push_history(&self, sha: &str, keep_previous: usize) -> Vec<String> {
        let mut r = self.lock();
        r.history.retain(|h| h != sha);
        r.history.insert(0, sha.to_string());
        r.history.truncate(keep_previous + 1);
        r.history.clone()
    }

    /// The current `DeviceState`, with a fresh seq.
    pub fn state(&self) -> DeviceState {
        let mut r = self.lock();
        r.seq += 1;
        DeviceState {
            schema: outpost_protocol::state::SCHEMA.into(),
            device: self.device.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            seq: r.seq,
            active: r.active.as_ref().map(|a| ActiveModel {
                name: a.deployment.model.name.clone(),
                version: a.deployment.model.version.clone(),
                manifest_sha256: a.deployment.model.manifest_sha256.clone(),
                deployment_id: a.deployment.deployment_id.clone(),
                revision: a.deployment.revision,
                since: a.since.clone(),
            }),
            last_deployment: r.last_deployment.clone(),
        }
    }

    /// Publishes the retained state (no disk write: `set_outcome` persists what changes).
    pub fn publish_state(&self) {
        let state = self.state();
        self.send(Outgoing {
            topic: self.topics.state(&self.device),
            payload: serde_json::to_vec(&state).unwrap_or_default(),
            retain: true,
            reliable: true,
            correlation: None,
        });
    }
}
