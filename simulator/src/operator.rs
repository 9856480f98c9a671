//! The operator's side of the protocol: an MQTT client that publishes desired
//! state and inference requests and follows what devices report. Used by the
//! `deploy` and `infer` commands, the demo and the end-to-end tests.

use outpost_agent::link::BrokerUrl;
use outpost_protocol::deployment::SCHEMA;
use outpost_protocol::{Deployment, DeploymentEvent, DeviceState, InferReply, ModelRef, Phase, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug)]
pub struct Operator {
    pub client: AsyncClient,
    pub topics: Topics,
    incoming: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    /// What it subscribed to: subscribed again whenever the broker comes
    /// back without the session (restarted, or without persistence).
    filters: std::sync::Arc<std::sync::Mutex<Vec<(String, QoS)>>>,
    /// QoS 1 publishes the broker has not acknowledged yet.
    unacked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The connection's task: it ends once the DISCONNECT is written.
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// Connects and returns once the broker accepted the session.
    pub async fn connect(broker: &BrokerUrl, client_id: &str, topics: Topics) -> Result<Operator, String> {
        Operator::connect_with(broker, client_id, topics, true).await
    }

    /// With `clean: false` the broker keeps the session (subscriptions and
    /// QoS 1 messages) while this client is away, also across a broker
    /// restart when the broker persists sessions.
    pub async fn connect_with(
        broker: &BrokerUrl,
        client_id: &str,
        topics: Topics,
        clean: bool,
    ) -> Result<Operator, String> {
        Operator::connect_tls(broker, client_id, topics, clean, None).await
    }

    /// `mqtts://` with this TLS configuration (CA, client certificate: a
    /// broker set up as in `packaging/mosquitto/`); `None`: the system's CAs,
    /// no client certificate.
    pub async fn connect_tls(
        broker: &BrokerUrl,
        client_id: &str,
        topics: Topics,
        clean: bool,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Operator, String> {
        let mut opts = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        if broker.tls {
            let config = match tls {
                Some(c) => c,
                None => outpost_agent::link::tls_config(None, None)?,
            };
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config)));
        }
        opts.set_keep_alive(Duration::from_secs(15));
        opts.set_clean_session(clean);
        opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        eventloop.set_network_options(outpost_agent::link::network_options());
        let (tx, incoming) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let filters: std::sync::Arc<std::sync::Mutex<Vec<(String, QoS)>>> = Default::default();
        let (again, resubscribe) = (client.clone(), filters.clone());
        let unacked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acked = unacked.clone();
        let task = tokio::spawn(async move {
            // SubAcks of resubscriptions are not the caller's.
            let mut skip = 0usize;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let wanted = resubscribe.lock().map(|f| f.clone()).unwrap_or_default();
                            for (filter, qos) in wanted {
                                if again.try_subscribe(filter, qos).is_ok() {
                                    skip += 1;
                                }
                            }
                        }
                        let _ = conn_tx.send(Ok(()));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = acked.fetch_update(
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                            |n| n.checked_sub(1),
                        );
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if skip > 0 => skip -= 1,
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = conn_tx.send(Err(e.to_string()));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, conn_rx.recv()).await {
                Ok(Some(Ok(()))) => break,
                Ok(Some(Err(e))) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to {broker}: {e}"));
                }
                Ok(Some(Err(_))) => continue,
                _ => {
                    return Err(format!("cannot connect to {broker} within 10 s"));
                }
            }
        }
        Ok(Operator { client, topics, incoming, subacks, filters, unacked, task })
    }

    /// Subscribes and waits for the broker to confirm.
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        self.subscribe_with(filter, QoS::AtLeastOnce).await
    }

    /// With QoS 0 a broker never drops messages for this subscriber because
    /// its queue of unacknowledged ones is full (Mosquitto's
    /// `max_queued_messages`, 1000 by default): for observing a large fleet.
    pub async fn subscribe_with(&mut self, filter: &str, qos: QoS) -> Result<(), String> {
        if let Ok(mut f) = self.filters.lock() {
            f.push((filter.to_string(), qos));
        }
        self.client.subscribe(filter, qos).await.map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), self.subacks.recv())
            .await
            .map_err(|_| format!("no SUBACK for {filter} within 10 s"))?
            .ok_or_else(|| "connection closed".to_string())
    }

    /// Publishes at QoS 1 (the broker's PUBACK is awaited by [`Operator::disconnect`]).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.unacked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await.map_err(|e| {
            self.unacked.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            e.to_string()
        })
    }

    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Publish> {
        tokio::time::timeout(timeout, self.incoming.recv()).await.ok().flatten()
    }

    /// Waits (up to 10 s) until the broker acknowledged every publish, then
    /// disconnects cleanly: a command that publishes and exits never loses
    /// what it published to a process exit racing the connection's task.
    pub async fn disconnect(self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.unacked.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Looks up a registered version over HTTP (or file://) and returns its
/// manifest URL and the sha256 of the manifest bytes.
pub async fn resolve_manifest(registry_url: &str, name: &str, version: &str) -> Result<(String, String), String> {
    lookup_manifest(registry_url, name, version, Duration::from_secs(30)).await.map_err(|e| e.message)
}

/// Why a manifest could not be looked up: `permanent` when asking again
/// cannot help (no such version: a 4xx; not a manifest), else the registry
/// could not be reached or did not answer within the time given.
#[derive(Debug)]
pub struct LookupError {
    pub permanent: bool,
    pub message: String,
}

/// [`resolve_manifest`], bounded by `timeout` as a whole (a registry that
/// accepts the connection and never answers does not hang the command).
pub async fn lookup_manifest(
    registry_url: &str,
    name: &str,
    version: &str,
    timeout: Duration,
) -> Result<(String, String), LookupError> {
    let url = format!("{}/{name}/{version}/manifest.json", registry_url.trim_end_matches('/'));
    let u = url.clone();
    let transient = |message: String| LookupError { permanent: false, message };
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, LookupError> {
        if let Some(path) = u.strip_prefix("file://") {
            return std::fs::read(path).map_err(|e| LookupError {
                permanent: e.kind() == std::io::ErrorKind::NotFound,
                message: format!("{u}: {e}"),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).build().into();
        let resp = agent.get(&u).call().map_err(|e| match e {
            ureq::Error::StatusCode(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
                LookupError {
                    permanent: true,
                    message: format!("{u}: HTTP {status}: no such model version in this registry?"),
                }
            }
            ureq::Error::Timeout(_) => {
                LookupError { permanent: false, message: format!("{u}: no answer within {} s", timeout.as_secs()) }
            }
            e => LookupError { permanent: false, message: format!("{u}: {e}") },
        })?;
        resp.into_body()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| LookupError { permanent: false, message: format!("{u}: {e}") })
    })
    .await
    .map_err(|e| transient(e.to_string()))??;
    outpost_protocol::Manifest::from_json(&bytes)
        .map_err(|e| LookupError { permanent: true, message: format!("{url}: not a manifest: {e}") })?;
    Ok((url, crate::registry::sha256(&bytes)))
}

/// A revision from the clock (milliseconds since 1970): successive
/// deploys and undeploys from any operator machine increase.
pub fn clock_revision() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1)
}

/// A deployment with a revision from the clock (milliseconds), so successive
/// deploys from any operator machine increase.
pub fn deployment(
    name: &str,
    version: &str,
    manifest_url: &str,
    manifest_sha256: &str,
    revision: Option<u64>,
    id: Option<String>,
) -> Deployment {
    let revision = revision.unwrap_or_else(clock_revision);
    Deployment {
        schema: SCHEMA.into(),
        deployment_id: id.unwrap_or_else(|| format!("{name}-{version}-{revision}")),
        revision,
        model: ModelRef {
            name: name.into(),
            version: version.into(),
            manifest_url: manifest_url.into(),
            manifest_sha256: manifest_sha256.into(),
        },
        serving: Default::default(),
        policy: Default::default(),
        target: None,
        slot: None,
        shadow: None,
    }
}

/// Follows `events` until `expect` devices reached a final phase for
/// `deployment_id`. Prints each event when `verbose`. Returns the final events.
pub async fn wait_for_outcome(
    op: &mut Operator,
    deployment_id: &str,
    expect: usize,
    timeout: Duration,
    verbose: bool,
) -> Result<Vec<DeploymentEvent>, String> {
    wait_for_outcome_with(op, deployment_id, expect, timeout, false, |ev| {
        if verbose {
            print_event(ev)
        }
    })
    .await
    .map_err(|(_, e)| e)
}

/// [`wait_for_outcome`], handing every event of the deployment (and every
/// refusal that names no deployment) to `on_event` as it comes. With
/// `unsigned_refusals_final` (an unsigned deployment to one device), that
/// device refusing an unverified desired state (`signature_required` or
/// `signature_invalid`, under no deployment id) ends the wait as its
/// verdict. On a timeout, the error comes with the verdicts that did arrive.
pub async fn wait_for_outcome_with(
    op: &mut Operator,
    deployment_id: &str,
    expect: usize,
    timeout: Duration,
    unsigned_refusals_final: bool,
    mut on_event: impl FnMut(&DeploymentEvent),
) -> Result<Vec<DeploymentEvent>, (Vec<DeploymentEvent>, String)> {
    let deadline = Instant::now() + timeout;
    let mut finals: Vec<DeploymentEvent> = Vec::new();
    while finals.len() < expect {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(msg) = op.next(left).await else {
            let done = finals.len();
            return Err((
                finals,
                format!(
                    "{} of {expect} device(s) finished deployment {deployment_id} within {} s: is the device online (its availability topic) and subscribed to this desired topic? The retained desired state stays, so it applies when the device returns",
                    done,
                    timeout.as_secs()
                ),
            ));
        };
        let Ok(ev) = DeploymentEvent::from_json(&msg.payload) else {
            continue;
        };
        if ev.deployment_id != deployment_id {
            // A device refusing an unverified desired state names no
            // deployment (anyone could claim this one's id): shown, not
            // counted, so an unsigned deploy to a signing device says why.
            if ev.deployment_id.is_empty() && ev.phase == Phase::Failed {
                on_event(&ev);
                let unverified = ev.error.as_ref().is_some_and(|e| {
                    matches!(
                        e.code,
                        outpost_protocol::ErrorCode::SignatureRequired | outpost_protocol::ErrorCode::SignatureInvalid
                    )
                });
                if unsigned_refusals_final && unverified && !finals.iter().any(|f| f.device == ev.device) {
                    finals.push(DeploymentEvent { deployment_id: deployment_id.to_string(), ..ev });
                }
            }
            continue;
        }
        on_event(&ev);
        if ev.phase.is_final() && !finals.iter().any(|f| f.device == ev.device) {
            finals.push(ev);
        }
    }
    Ok(finals)
}

pub fn print_event(ev: &DeploymentEvent) {
    println!("{}", crate::progress::event_line(ev, None));
}

/// True when a final event means success.
pub fn succeeded(ev: &DeploymentEvent) -> bool {
    matches!(ev.phase, Phase::Active | Phase::Unchanged)
}

/// What a device's final event for deployment `d` means to the operator who published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The device serves `d`.
    Serving,
    /// The device tried `d` and it did not work (`failed`, `rolled_back`).
    Failed,
    /// The device did not apply `d`: shadowed by a desired state of higher
    /// precedence, its version quarantined, superseded, withdrawn.
    NotApplied,
}

/// `active` is serving; `unchanged` is serving only when the device's
/// `state` says `d` itself serves (a replay of what it already applied),
/// not when `d` is shadowed or quarantined, whatever the detail says.
pub fn verdict(ev: &DeploymentEvent, d: &Deployment, state: Option<&DeviceState>) -> Verdict {
    match ev.phase {
        Phase::Active => Verdict::Serving,
        Phase::Failed | Phase::RolledBack => Verdict::Failed,
        Phase::Unchanged
            if state.and_then(|s| s.active.as_ref()).is_some_and(|a| {
                a.deployment_id == d.deployment_id
                    && a.revision == d.revision
                    && a.name == d.model.name
                    && a.version == d.model.version
            }) =>
        {
            Verdict::Serving
        }
        _ => Verdict::NotApplied,
    }
}

/// The device's retained state (`{prefix}/devices/{device}/state`), or
/// `None` when none came within `timeout`. Subscribes to that exact topic
/// (brokers such as RabbitMQ hand retained messages to exact subscribers
/// only); other messages meanwhile are dropped.
pub async fn device_state(op: &mut Operator, device: &str, timeout: Duration) -> Option<DeviceState> {
    let topic = op.topics.state(device);
    op.subscribe(&topic).await.ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        let msg = op.next(deadline.saturating_duration_since(Instant::now())).await?;
        if delivered_as(&msg.topic, &topic)
            && let Ok(state) = DeviceState::from_json(&msg.payload)
        {
            return Some(state);
        }
    }
}

/// True when a message received on `wire` was published on `topic`: RabbitMQ's
/// MQTT plugin delivers every `.` of a topic as `/` (`outpost/devices/cam.18/state`
/// arrives as `outpost/devices/cam/18/state`).
/// The revision and deployment id of the desired state retained on `topic`
/// (a deployment, a signed deployment or a signed undeployment; not
/// verified: only to warn before publishing one the device would refuse as
/// stale). None when the topic holds nothing within `wait`.
pub async fn retained_revision(
    op: &mut Operator,
    topic: &str,
    wait: Duration,
) -> Result<Option<(u64, Option<String>)>, String> {
    op.subscribe(topic).await?;
    let deadline = Instant::now() + wait;
    while let Some(m) = op.next(deadline.saturating_duration_since(Instant::now())).await {
        if !delivered_as(&m.topic, topic) {
            continue;
        }
        return Ok(revision_of(&m.payload));
    }
    Ok(None)
}

/// The `revision` and `deployment_id` a desired-state payload claims
/// (inside a DSSE envelope too).
pub fn revision_of(payload: &[u8]) -> Option<(u64, Option<String>)> {
    #[derive(serde::Deserialize)]
    struct Claimed {
        revision: Option<u64>,
        deployment_id: Option<String>,
    }
    let inner = match serde_json::from_slice::<outpost_protocol::trust::Envelope>(payload) {
        Ok(env) => outpost_protocol::trust::base64_decode(&env.payload).ok()?,
        Err(_) => payload.to_vec(),
    };
    let c = serde_json::from_slice::<Claimed>(&inner).ok()?;
    Some((c.revision?, c.deployment_id))
}

fn delivered_as(wire: &str, topic: &str) -> bool {
    wire == topic || (topic.contains('.') && wire == topic.replace('.', "/"))
}

/// Sends one request to a device and waits for its answer on a private reply topic.
pub async fn infer_once(
    op: &mut Operator,
    device: &str,
    mut request: serde_json::Value,
    timeout: Duration,
) -> Result<InferReply, String> {
    let reply_to = format!("{}{}-{}", op.topics.replies(), std::process::id(), outpost_agent::sys::jitter().to_bits());
    op.subscribe(&reply_to).await?;
    request["reply_to"] = serde_json::Value::String(reply_to.clone());
    op.publish(&op.topics.infer(device), serde_json::to_vec(&request).map_err(|e| e.to_string())?, false).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg =
            op.next(left).await.ok_or_else(|| format!("no answer from {device} within {} s", timeout.as_secs()))?;
        if delivered_as(&msg.topic, &reply_to) {
            return serde_json::from_slice(&msg.payload).map_err(|e| format!("unreadable answer: {e}"));
        }
    }
}
