//! What the device tells the operator: `DeploymentEvent`s, the retained
//! `DeviceState`, telemetry and captures. The [`Reporter`] numbers every
//! event and state with a per-device `seq` and hands them to the publisher;
//! what the state shows comes from the deployer, which owns the record
//! (and persists `seq` with it, so numbering resumes after a restart).

pub mod telemetry;

use crate::link::publisher::{Outbox, Outgoing};
use outpost_protocol::{
    ActiveModel, Deployment, DeploymentEvent, DeviceState, ErrorInfo, LastDeployment, Phase, Progress, Topics,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the retained state shows of the record.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub active: Option<ActiveModel>,
    pub last_deployment: Option<LastDeployment>,
}

/// Events published after the last persisted state may reuse seq numbers
/// after a crash; starting this far ahead keeps `seq` increasing.
const SEQ_RESTART_GAP: u64 = 10_000;

/// One reporter per model slot, all numbering from one `seq` and sharing
/// one retained state: a slot's events name it, and the state shows every
/// slot (the default slot's in the top-level fields).
#[derive(Debug)]
pub(crate) struct Reporter {
    /// None: the default slot (the device's `desired` topic and its groups').
    slot: Option<String>,
    core: Arc<Core>,
}

#[derive(Debug)]
pub(crate) struct Core {
    device: String,
    groups: Vec<String>,
    topics: Topics,
    out: Outbox,
    seq: AtomicU64,
    /// Held from numbering a message to handing it over, so messages reach
    /// the publisher (and the broker) in `seq` order.
    order: Mutex<()>,
    /// What the state shows of each slot's record.
    views: Mutex<std::collections::BTreeMap<Option<String>, View>>,
    tally: std::sync::OnceLock<Arc<crate::serve::metrics::Tally>>,
}

impl std::ops::Deref for Reporter {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Reporter {
    pub fn new(device: &str, groups: &[String], topics: Topics, out: Outbox) -> Reporter {
        let core = Core {
            device: device.to_string(),
            groups: groups.to_vec(),
            topics,
            out,
            seq: AtomicU64::new(0),
            order: Mutex::new(()),
            views: Default::default(),
            tally: Default::default(),
        };
        Reporter { slot: None, core: Arc::new(core) }
    }

    /// The reporter of model slot `slot` (same numbering, same state).
    pub fn for_slot(&self, slot: &str) -> Reporter {
        Reporter { slot: Some(slot.to_string()), core: self.core.clone() }
    }

    /// The slot this reporter speaks for (None: the default slot).
    pub fn slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    /// Where deployment outcomes are counted for `/metrics`.
    pub fn count_outcomes_in(&self, tally: Arc<crate::serve::metrics::Tally>) {
        let _ = self.tally.set(tally);
    }

    /// Continues the numbering of an earlier run (`seq` as last persisted).
    pub fn resume_seq(&self, persisted: u64) {
        if persisted > 0 {
            self.seq.fetch_max(persisted + SEQ_RESTART_GAP, Ordering::SeqCst);
        }
    }

    /// The last number given out.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Hands a message to the publisher.
    pub fn send(&self, msg: Outgoing) {
        self.out.send(msg);
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
        // A stale message is a refused desired state, not a deployment's end.
        let stale = error.as_ref().is_some_and(|e| e.code == outpost_protocol::ErrorCode::StaleRevision);
        if phase.is_final() && !stale {
            self.count_outcome(phase);
        }
        self.emit(&d.deployment_id, d.revision, phase, progress, error, detail, None, None, None);
    }

    /// A `shadow` event: how the candidate scored so far.
    pub fn shadow_event(&self, s: &crate::serve::shadow::Shadow, detail: &str) {
        let stats = s.stats();
        let detail = format!(
            "{detail}: {}@{} agreed on the top-1 class of {} of {} rows in {} sampled requests, max abs diff {}",
            stats.model.name, stats.model.version, stats.top1_agree, stats.rows, stats.compared, stats.max_abs_diff
        );
        self.emit(&s.deployment_id, s.revision, Phase::Shadow, None, None, Some(detail), None, Some(stats), None);
    }

    fn count_outcome(&self, phase: Phase) {
        if let Some(t) = self.tally.get() {
            t.outcome(phase);
        }
    }

    /// The `active` event, with where the deployment's time went.
    pub fn active_event(
        &self,
        d: &Deployment,
        detail: String,
        timings: outpost_protocol::Timings,
        backend: Option<outpost_protocol::Backend>,
    ) {
        self.count_outcome(Phase::Active);
        self.emit(&d.deployment_id, d.revision, Phase::Active, None, None, Some(detail), Some(timings), None, backend);
    }

    /// A desired message that is not a valid deployment: reported under the
    /// id it claims (if any); nothing changes.
    pub fn invalid_desired(&self, payload: &[u8], e: &ErrorInfo) {
        #[derive(serde::Deserialize)]
        struct Claimed {
            deployment_id: Option<serde_json::Value>,
            revision: Option<serde_json::Value>,
        }
        let claimed: Option<Claimed> = serde_json::from_slice(payload).ok();
        let id = claimed.as_ref().and_then(|c| c.deployment_id.as_ref()).and_then(|v| v.as_str());
        let rev = claimed.as_ref().and_then(|c| c.revision.as_ref()).and_then(|v| v.as_u64()).unwrap_or(0);
        self.refused(id, rev, e);
    }

    /// A valid deployment the device refuses (unsigned, badly signed, for
    /// another target, a downgrade): the active model keeps serving.
    pub fn refused_desired(&self, d: &Deployment, e: &ErrorInfo) {
        self.refused(Some(&d.deployment_id), d.revision, e);
    }

    /// A desired-state message the trust check refused.
    pub fn refused_message(&self, payload: &[u8], refused: &outpost_protocol::trust::Refused) {
        use outpost_protocol::ErrorCode;
        match &refused.claimed {
            // Verified (a wrong target): its own id.
            Some(d) => self.refused_desired(d, &refused.error),
            // Not verified: under no id, so an unsigned copy of a real
            // deployment cannot make it look failed.
            None if matches!(refused.error.code, ErrorCode::SignatureRequired | ErrorCode::SignatureInvalid) => {
                self.refused(None, 0, &refused.error)
            }
            None => self.invalid_desired(payload, &refused.error),
        }
    }

    /// A refused desired state, as far as it can be named.
    pub fn refused(&self, deployment_id: Option<&str>, revision: u64, e: &ErrorInfo) {
        let detail = Some("desired state refused; the active model keeps serving".into());
        self.emit(
            deployment_id.unwrap_or(""),
            revision,
            Phase::Failed,
            None,
            Some(e.clone()),
            detail,
            None,
            None,
            None,
        );
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
        shadow: Option<outpost_protocol::telemetry::ShadowStats>,
        backend: Option<outpost_protocol::Backend>,
    ) {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let ev = DeploymentEvent {
            schema: outpost_protocol::event::SCHEMA.into(),
            device: self.device.clone(),
            deployment_id: deployment_id.to_string(),
            revision,
            seq: self.next_seq(),
            at: crate::sys::now_rfc3339(),
            phase,
            progress,
            error,
            detail,
            timings_ms,
            slot: self.slot.clone(),
            shadow,
            backend,
        };
        let slot = self.slot.as_deref().unwrap_or("");
        match (&ev.error, phase) {
            (Some(e), _) => {
                tracing::warn!(deployment = deployment_id, revision, slot, ?phase, code = %e.code, "{}", e.message)
            }
            (None, Phase::Downloading) => {
                tracing::debug!(deployment = deployment_id, ?progress, "downloading")
            }
            _ => tracing::info!(
                deployment = deployment_id,
                revision,
                slot,
                ?phase,
                detail = ev.detail.as_deref().unwrap_or(""),
                "deployment event"
            ),
        }
        // A shadow report is a figure like telemetry: QoS 0, never journaled,
        // so it cannot crowd deployment events out of the outage journal.
        let reliable = phase != Phase::Shadow;
        self.send_json(self.topics.events(&self.device), &ev, false, reliable);
    }

    /// A message of JSON, QoS 1 when `reliable` (while `order` is held: it carries a seq).
    fn send_json(&self, topic: String, body: &impl serde::Serialize, retain: bool, reliable: bool) {
        let payload = serde_json::to_vec(body).unwrap_or_default();
        self.send(Outgoing { topic, payload, retain, reliable, correlation: None });
    }

    /// What the retained state shows of this slot from now on (its deployer's record).
    pub fn set_view(&self, view: View) {
        self.views.lock().unwrap_or_else(|p| p.into_inner()).insert(self.slot.clone(), view);
    }

    /// The current `DeviceState`, with a fresh seq.
    fn state(&self) -> DeviceState {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let view = views.get(&None).cloned().unwrap_or_default();
        let models = views
            .into_iter()
            .filter_map(|(slot, v)| {
                Some((slot?, outpost_protocol::SlotState { active: v.active, last_deployment: v.last_deployment }))
            })
            .collect();
        DeviceState {
            schema: outpost_protocol::state::SCHEMA.into(),
            device: self.device.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            groups: self.groups.clone(),
            seq: self.next_seq(),
            at: Some(crate::sys::now_rfc3339()),
            active: view.active,
            last_deployment: view.last_deployment,
            models,
        }
    }

    /// Publishes the retained state.
    pub fn publish_state(&self) {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.send_json(self.topics.state(&self.device), &self.state(), true, true);
    }
}

/// Publishes the requests and answers the engine samples (`capture`, QoS 0,
/// never journaled; one over the packet limit is skipped).
pub(crate) fn publish_captures(
    engine: &crate::serve::Engine,
    reporter: std::sync::Arc<Reporter>,
    max_packet_size: usize,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::serve::Capture>();
    engine.on_capture(tx);
    let topic = reporter.topics.capture(&reporter.device);
    tokio::spawn(async move {
        while let Some(capture) = rx.recv().await {
            #[derive(serde::Serialize)]
            struct Published<'a> {
                device: &'a str,
                #[serde(skip_serializing_if = "Option::is_none")]
                slot: Option<&'a str>,
                #[serde(flatten)]
                capture: crate::serve::Capture,
            }
            let payload = serde_json::to_vec(&Published { device: reporter.device(), slot: reporter.slot(), capture })
                .unwrap_or_default();
            if payload.len() + crate::link::packet_overhead(&topic, None) > max_packet_size {
                tracing::debug!(bytes = payload.len(), "capture over the packet limit: skipped");
                continue;
            }
            reporter.send(Outgoing {
                topic: topic.clone(),
                payload,
                retain: false,
                reliable: false,
                correlation: None,
            });
        }
    });
}
