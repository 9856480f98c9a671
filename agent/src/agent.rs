//! The agent's main loop: wires the store, engine, reporter and MQTT session
//! together and routes what arrives.

use crate::deploy::{Deployer, Ended};
use crate::engine::InferFailure;
use crate::fetch::{Cancel, FetchConfig, Fetcher};
use crate::mqtt::{Backoff, Link, Message, Net, Protocol, Session, SessionConfig, publisher};
use crate::reconcile::{Decision, Reconciler, Source};
use crate::serve::Engine;
use crate::status::{ActiveRecord, Outgoing, Reporter};
use crate::store::Store;
use outpost_protocol::topics::TopicKind;
use outpost_protocol::{Deployment, ErrorCode, ErrorInfo, InferError, Outcome, Phase, ProtocolError, Topics};
use rumqttc::QoS;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything `outpost run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: String,
    pub groups: Vec<String>,
    pub data_dir: PathBuf,
    pub topics: Topics,
    pub session: SessionConfig,
    pub fetch: FetchConfig,
    /// Where the local Open Inference Protocol endpoint listens (None: off).
    pub http_bind: Option<std::net::SocketAddr>,
    /// What SIGHUP may change: telemetry interval, shutdown grace, limits.
    pub live: crate::config::Live,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data dir {dir}: {source} (--data-dir must be a directory the agent can create and write)")]
    DataDir { dir: PathBuf, source: std::io::Error },
    #[error("HTTP endpoint {addr}: {source} (choose another address with --http-bind IP:PORT, or --http-bind off)")]
    HttpBind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("MQTT over TLS: {0}")]
    Tls(String),
}

enum Job {
    Deploy(Source, Box<Deployment>, Cancel),
    Undeploy,
}

/// Runs the agent until `shutdown` completes; `reload` delivers new live
/// settings (SIGHUP).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<crate::config::Live>,
) -> Result<(), AgentError> {
    let mut live = config.live.clone();
    let store = Arc::new(
        Store::open(&config.data_dir).map_err(|source| AgentError::DataDir { dir: config.data_dir.clone(), source })?,
    );
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let reporter = Arc::new(Reporter::new(&config.device, config.topics.clone(), out_tx, store.clone()));
    let engine = Arc::new(Engine::new(live.workers, live.max_queue));
    let deployer = Arc::new(Deployer {
        store: store.clone(),
        fetcher: Fetcher::new(config.fetch.clone()),
        engine: engine.clone(),
        reporter: reporter.clone(),
        limits: arc_swap::ArcSwap::from_pointee(limits(&live)),
        http: Default::default(),
        serial: Default::default(),
    });

    // Serve what was active before the restart, before touching the network.
    let mut reconciler = Reconciler::new();
    let restored = {
        let d = deployer.clone();
        tokio::task::spawn_blocking(move || d.restore()).await.ok().flatten()
    };
    let restored_port = restored.as_ref().and_then(|(_, d)| d.serving.http_port);
    if let Some((source, d)) = restored {
        reconciler.restore(source, d);
    }
    // A deployment rolled back before the restart stays refused: its
    // retained desired state replays as `unchanged`, not as a new attempt.
    if let Some(refused) = reporter.record().rolled_back {
        reconciler.restore(refused.source, refused.deployment);
    }
    let interrupted = reporter.record().pending;
    // Captured requests and answers go out on `capture`, QoS 0, never journaled.
    let (capture_tx, mut capture_rx) = mpsc::unbounded_channel::<crate::serve::Capture>();
    engine.on_capture(capture_tx);
    {
        let (reporter, topic) = (reporter.clone(), config.topics.capture(&config.device));
        let limit = config.session.max_packet_size;
        tokio::spawn(async move {
            while let Some(c) = capture_rx.recv().await {
                #[derive(serde::Serialize)]
                struct Published<'a> {
                    device: &'a str,
                    #[serde(flatten)]
                    capture: crate::serve::Capture,
                }
                let payload =
                    serde_json::to_vec(&Published { device: reporter.device(), capture: c }).unwrap_or_default();
                if payload.len() + topic.len() + 16 > limit {
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
    let (verdict_tx, mut verdict_rx) = mpsc::unbounded_channel();
    engine.on_probation_end(verdict_tx);
    {
        let deployer = deployer.clone();
        tokio::spawn(async move {
            while let Some(end) = verdict_rx.recv().await {
                // Persisting a rollback is an fsync: off the reactor.
                let d = deployer.clone();
                let _ = tokio::task::spawn_blocking(move || d.probation_ended(end)).await;
            }
        });
    }

    // The local endpoint serves from the store even while the broker is unreachable.
    let http = match config.http_bind {
        Some(addr) => {
            let ep =
                crate::http::Endpoint::start(addr, restored_port, engine.clone(), tokio::runtime::Handle::current())
                    .map_err(|source| AgentError::HttpBind { addr, source })?;
            let ep = Arc::new(ep);
            let _ = deployer.http.set(ep.clone());
            Some(ep)
        }
        None => None,
    };

    let mut protocol = config.session.protocol;
    let (client, mut session) =
        Session::new(&config.session, &config.topics, &config.device, 1024).map_err(AgentError::Tls)?;
    let link = Link::new(client);
    let acks = crate::mqtt::acker(link.clone(), config.session.persistent_session);
    let journal =
        Arc::new(Mutex::new(crate::journal::Journal::open(&config.data_dir, crate::journal::DEFAULT_MAX_ENTRIES)));
    let (online_tx, online_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(publisher(
        link.clone(),
        out_rx,
        config.session.max_packet_size,
        journal.clone(),
        online_rx,
        reporter.delivered.clone(),
    ));
    // MQTT requests being answered (their answers not yet handed to the publisher).
    let mqtt_requests = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let current_cancel: Arc<Mutex<Option<Cancel>>> = Arc::new(Mutex::new(None));
    let (job_tx, job_rx) = mpsc::unbounded_channel::<Job>();
    // Set while the deploy worker runs a job: a shutdown waits for it (within
    // the grace period) so the job's last event is published, not lost.
    let deploying = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(deploy_worker(job_rx, deployer.clone(), reporter.clone(), engine.clone(), deploying.clone()));

    // A deployment accepted before a restart and not finished: resume it
    // from the store and the registry, without waiting for the broker.
    if let Some(p) = interrupted
        && let Decision::Deploy(d) = reconciler.on_message(p.source, Some(Ok(p.deployment)))
    {
        start(p.source, d, "resumed after a restart", &reporter, &job_tx, &current_cancel);
    }

    let mut subscriptions = vec![config.topics.device_desired(&config.device), config.topics.infer(&config.device)];
    subscriptions.extend(config.groups.iter().map(|g| config.topics.group_desired(g)));

    let started = std::time::Instant::now();
    let mut telemetry = crate::telemetry::Reporter::default();
    let telemetry_tick = |every: Duration| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    };
    let mut tick = telemetry_tick(live.telemetry_interval);
    // systemd: the watchdog is pinged from this loop, so a stuck loop stops the pings.
    let watchdog_every = crate::systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut pings = 0u64;
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let serving = engine.active().map(|m| format!("serving {}@{}", m.name, m.version));
    crate::systemd::ready(&format!(
        "{}; connecting to {}",
        serving.as_deref().unwrap_or("no model yet"),
        config.session.broker
    ));

    let mut backoff = Backoff::new();
    let mut reconnects: u64 = 0;
    let mut connected_once = false;
    let mut closed_before_connack = 0u32;
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                pings += 1;
                if pings > 5 {
                    crate::fault_point("stall-main-loop");
                }
                crate::systemd::watchdog();
                continue;
            }
            Some(new) = reload.recv() => {
                if new.telemetry_interval != live.telemetry_interval {
                    tick = telemetry_tick(new.telemetry_interval);
                }
                deployer.limits.store(Arc::new(limits(&new)));
                // The pool follows the new defaults unless the deployment sets its own.
                let serving = reporter.record().active.map(|a| a.deployment.serving);
                let (workers, queue) = engine.pool_sizes();
                engine.resize(
                    serving.as_ref().and_then(|s| s.workers).unwrap_or(new.workers).max(1),
                    serving.as_ref().and_then(|s| s.max_queue).unwrap_or(new.max_queue),
                );
                if engine.pool_sizes() != (workers, queue) {
                    tracing::info!(pool = ?engine.pool_sizes(), "worker pool resized by the configuration");
                }
                live = new;
                continue;
            }
            _ = tick.tick() => {
                let pending = {
                    let j = journal.lock().unwrap_or_else(|p| p.into_inner());
                    (j.len() as u64, j.dropped)
                };
                let t = telemetry.report(&config.device, started, &engine, &store, reconnects, pending);
                reporter.send(Outgoing {
                    topic: config.topics.telemetry(&config.device),
                    payload: serde_json::to_vec(&t).unwrap_or_default(),
                    retain: false,
                    reliable: false,
                    correlation: None,
                });
                continue;
            }
            e = session.poll() => e,
        };
        match event {
            Net::Connected { session_present } => {
                backoff.reset();
                let _ = online_tx.send(true);
                if connected_once {
                    reconnects += 1;
                }
                connected_once = true;
                tracing::info!(broker = %config.session.broker, reconnects, "connected");
                // A clean session has no subscriptions: subscribe on every ConnAck.
                // From another task: awaiting a full request channel here would stall the event loop.
                if !session_present {
                    let (client, topics) = (link.clone(), subscriptions.clone());
                    tokio::spawn(async move {
                        for t in topics {
                            if let Err(e) = client.subscribe(t.clone(), QoS::AtLeastOnce).await {
                                tracing::error!(topic = %t, error = %e, "subscribe failed");
                            }
                        }
                    });
                }
                reporter.send(Outgoing {
                    topic: config.topics.availability(&config.device),
                    payload: b"online".to_vec(),
                    retain: true,
                    reliable: true,
                    correlation: None,
                });
                reporter.publish_state();
            }
            Net::Message(m) => {
                let source = match config.topics.classify(m.topic()) {
                    Some(TopicKind::DeviceDesired(d)) if d == config.device => Some(Source::Device),
                    Some(TopicKind::GroupDesired(g)) => config.groups.iter().position(|x| x == g).map(Source::Group),
                    Some(TopicKind::Infer(d)) if d == config.device => {
                        let (engine, reporter, topics, device) =
                            (engine.clone(), reporter.clone(), config.topics.clone(), config.device.clone());
                        let limit = config.session.max_packet_size;
                        let request = m.clone();
                        tokio::spawn(
                            async move { on_infer(&engine, &reporter, &topics, &device, &request, limit).await },
                        );
                        None
                    }
                    _ => {
                        tracing::debug!(topic = %m.topic(), "ignored message");
                        None
                    }
                };
                if let Some(source) = source {
                    let max = config.session.max_packet_size;
                    on_desired(&mut reconciler, source, m.payload(), max, &reporter, &job_tx, &current_cancel).await;
                }
                // Acked once handled: a desired state only after it is recorded on disk.
                if let Some(acks) = &acks {
                    let _ = acks.send(m);
                }
            }
            Net::Disconnected | Net::Other => {}
            Net::Error { text, refused_protocol } => {
                let _ = online_tx.send(false);
                // A broker without MQTT 5 refuses it, or (rumqttd, older
                // brokers) closes the connection before any ConnAck.
                if protocol == Protocol::V5 && !connected_once && text.contains("closed by peer") {
                    closed_before_connack += 1;
                }
                if protocol == Protocol::V5 && (refused_protocol || closed_before_connack >= 2) {
                    tracing::warn!(error = %text, "the broker does not speak MQTT 5: falling back to MQTT 3.1.1");
                    protocol = Protocol::V311;
                    let cfg = SessionConfig { protocol, ..config.session.clone() };
                    let (client, s) =
                        Session::new(&cfg, &config.topics, &config.device, 1024).map_err(AgentError::Tls)?;
                    link.replace(client);
                    session = s;
                    continue;
                }
                let delay = backoff.next_delay();
                match crate::mqtt::diagnose(&text) {
                    Some(hint) => {
                        tracing::error!(error = %text, retry_in_ms = delay.as_millis() as u64, "cannot connect to the broker: {hint}")
                    }
                    None => {
                        tracing::warn!(error = %text, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost")
                    }
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    // Shutting down: no new requests (MQTT is no longer read, the HTTP
    // listener closes), those in flight finish within the grace period and
    // their answers are published; then retained `offline` and a clean
    // disconnect (which suppresses the Last Will), bounded so a dead broker
    // cannot hold us.
    crate::systemd::stopping();
    tracing::info!(grace_s = live.shutdown_grace.as_secs_f64(), "shutting down: finishing requests in flight");
    if let Some(c) = current_cancel.lock().unwrap_or_else(|p| p.into_inner()).take() {
        c.stop();
    }
    let deadline = tokio::time::Instant::now() + live.shutdown_grace;
    let http_stopped = {
        let http = http.clone();
        tokio::spawn(async move {
            if let Some(ep) = http {
                ep.stop().await;
            }
        })
    };
    let drained = async {
        loop {
            let in_flight = engine.in_flight() + mqtt_requests.load(std::sync::atomic::Ordering::SeqCst);
            let deploying = deploying.load(std::sync::atomic::Ordering::SeqCst);
            if in_flight == 0 && !deploying && reporter.unsent() == 0 {
                break;
            }
            // Keep the session moving so answers and acks go out meanwhile.
            tokio::select! {
                _ = session.poll() => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        tracing::warn!(in_flight = engine.in_flight(), "grace period over: requests still in flight are dropped");
    }
    let _ = tokio::time::timeout_at(deadline + Duration::from_millis(100), http_stopped).await;
    link.try_publish(config.topics.availability(&config.device), QoS::AtLeastOnce, true, "offline");
    link.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match session.poll().await {
                Net::Disconnected | Net::Error { .. } => break,
                _ => {}
            }
        }
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Handles a desired-state message. A deployment (or undeployment) is
/// recorded on disk before this returns, so the message can be acked.
async fn on_desired(
    reconciler: &mut Reconciler,
    source: Source,
    payload: &[u8],
    max: usize,
    reporter: &Arc<Reporter>,
    jobs: &mpsc::UnboundedSender<Job>,
    current: &Mutex<Option<Cancel>>,
) {
    let parsed = if payload.is_empty() {
        None
    } else if payload.len() > max {
        Some(Err(ProtocolError {
            code: ErrorCode::TooLarge,
            path: String::new(),
            expected: format!("a desired state of at most {max} bytes (--max-packet-size)"),
            found: format!("{} bytes", payload.len()),
        }))
    } else {
        Some(Deployment::from_json(payload))
    };
    match reconciler.on_message(source, parsed) {
        Decision::Deploy(d) => {
            crate::crash_point("desired-received");
            let pending = ActiveRecord { source, deployment: d.clone(), since: crate::status::now_rfc3339() };
            record_pending(reporter, Some(pending)).await;
            start(source, d, "", reporter, jobs, current);
        }
        Decision::Undeploy => {
            record_pending(reporter, None).await;
            if let Some(old) = current.lock().unwrap_or_else(|p| p.into_inner()).take() {
                old.cancel();
            }
            let _ = jobs.send(Job::Undeploy);
        }
        Decision::Unchanged(d) => {
            let in_progress = reporter
                .record()
                .pending
                .is_some_and(|p| p.deployment.deployment_id == d.deployment_id && p.deployment.revision == d.revision);
            if in_progress {
                // A redelivery or retained replay while it deploys: its own events follow.
                tracing::debug!(deployment = %d.deployment_id, "desired state seen again while it deploys");
            } else {
                reporter.event(&d, Phase::Unchanged, None, None, Some("already applied".into()))
            }
        }
        Decision::Stale { deployment, newest } => reporter.event(
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
        Decision::Shadowed(d) => reporter.event(
            &d,
            Phase::Unchanged,
            None,
            None,
            Some("shadowed by a desired state of higher precedence (device topic or an earlier group)".into()),
        ),
        Decision::Invalid(e) => invalid_desired(reporter, payload, &e),
        Decision::Nothing => {}
    }
}

fn limits(live: &crate::config::Live) -> crate::deploy::Limits {
    crate::deploy::Limits {
        workers: live.workers,
        max_queue: live.max_queue,
        store_quota: live.store_quota,
        max_model_size: live.max_model_size,
    }
}

/// Clears a busy flag when the job that set it ends, however it ends.
struct IdleOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for IdleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Persists what is being deployed (an fsync: off the reactor).
async fn record_pending(reporter: &Arc<Reporter>, pending: Option<ActiveRecord>) {
    let r = reporter.clone();
    let _ = tokio::task::spawn_blocking(move || r.set_pending(pending)).await;
}

/// Starts deploying `d`, superseding whatever deployment is in progress.
fn start(
    source: Source,
    d: Deployment,
    why: &str,
    reporter: &Reporter,
    jobs: &mpsc::UnboundedSender<Job>,
    current: &Mutex<Option<Cancel>>,
) {
    let cancel = Cancel::default();
    if let Some(old) = current.lock().unwrap_or_else(|p| p.into_inner()).replace(cancel.clone()) {
        old.cancel();
    }
    let what = format!("{}@{}", d.model.name, d.model.version);
    let detail = if why.is_empty() { what } else { format!("{what} ({why})") };
    reporter.event(&d, Phase::Received, None, None, Some(detail));
    let _ = jobs.send(Job::Deploy(source, Box::new(d), cancel));
}

/// A desired message that is not a valid deployment: report it under the id
/// it claims (if any), change nothing.
fn invalid_desired(reporter: &Reporter, payload: &[u8], e: &ProtocolError) {
    #[derive(serde::Deserialize)]
    struct Claimed {
        deployment_id: Option<serde_json::Value>,
        revision: Option<serde_json::Value>,
    }
    let claimed: Option<Claimed> = serde_json::from_slice(payload).ok();
    let id = claimed.as_ref().and_then(|c| c.deployment_id.as_ref()).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let rev = claimed.as_ref().and_then(|c| c.revision.as_ref()).and_then(|v| v.as_u64()).unwrap_or(0);
    reporter.event_for(
        &id,
        rev,
        Phase::Failed,
        None,
        Some(e.info()),
        Some("desired state refused; the active model keeps serving".into()),
    );
}

async fn deploy_worker(
    mut rx: mpsc::UnboundedReceiver<Job>,
    deployer: Arc<Deployer>,
    reporter: Arc<Reporter>,
    engine: Arc<Engine>,
    busy: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Some(mut job) = rx.recv().await {
        busy.store(true, std::sync::atomic::Ordering::SeqCst);
        let _idle = IdleOnDrop(&busy);
        // Latest wins: jobs queued behind this one supersede it before it starts.
        while let Ok(newer) = rx.try_recv() {
            if let Job::Deploy(_, d, _) = &job {
                reporter.event(
                    d,
                    Phase::Superseded,
                    None,
                    None,
                    Some("a newer desired state arrived before it started".into()),
                );
            }
            job = newer;
        }
        match job {
            Job::Deploy(source, d, cancel) => {
                let dep = deployer.clone();
                // Every log line of the deployment carries its id, revision and model version.
                let span = tracing::info_span!(
                    "deployment",
                    id = %d.deployment_id,
                    revision = d.revision,
                    model = %format!("{}@{}", d.model.name, d.model.version)
                );
                let result = tokio::task::spawn_blocking(move || span.in_scope(|| dep.run(source, &d, &cancel))).await;
                match result {
                    Ok(Ended::Active(m, probation)) => {
                        tracing::info!(model = %m.name, version = %m.version, "active");
                        if let Some((token, window)) = probation {
                            let engine = engine.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(window).await;
                                engine.close_probation(token);
                            });
                        }
                    }
                    Ok(Ended::Failed(_)) | Ok(Ended::Superseded) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "deployment task panicked; the active model keeps serving")
                    }
                }
            }
            Job::Undeploy => {
                // Persisting is an fsync: off the reactor.
                let (engine, reporter) = (engine.clone(), reporter.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    let old = engine.swap(None);
                    engine.set_capture_rate(0.0);
                    match reporter.record().active {
                        Some(active) => {
                            let d = active.deployment;
                            reporter.set_outcome(&d, Outcome::Undeployed, None, Some(None));
                            let detail = "desired state withdrawn: no model serves".to_string();
                            reporter.event(&d, Phase::Undeployed, None, None, Some(detail));
                        }
                        None => reporter.publish_state(),
                    }
                    drop(old);
                })
                .await;
            }
        }
    }
}

async fn on_infer(
    engine: &Engine,
    reporter: &Reporter,
    topics: &Topics,
    device: &str,
    request: &Message,
    max_packet: usize,
) {
    let payload = request.payload();
    let answer = if payload.len() > max_packet {
        // Refused unread (the limit protects memory); the id is still salvaged for the answer.
        let message = format!(
            "the request is {} bytes, over the MQTT packet limit of {max_packet} (--max-packet-size): send a smaller batch, or use the HTTP endpoint",
            payload.len()
        );
        engine.refuse(payload, InferFailure { code: ErrorCode::TooLarge, message })
    } else {
        engine.infer_body(payload, None).await
    };
    // MQTT 5's response topic first, then `reply_to` in the request, then `predictions`.
    let topic = request
        .response_topic()
        .map(str::to_string)
        .filter(|t| valid_reply_topic(t))
        .or(answer.reply_to.filter(|t| valid_reply_topic(t)))
        .unwrap_or_else(|| topics.predictions(device));
    let mut body = match answer.result {
        Ok(resp) => serde_json::to_vec(&resp),
        Err(f) => serde_json::to_vec(&InferError { id: answer.id.clone(), error: f.message, code: f.code }),
    }
    .unwrap_or_default();
    // An answer over the packet limit would be dropped (or break the
    // connection): answer why instead.
    if body.len() + topic.len() + 16 > max_packet {
        let error = format!(
            "the answer is {} bytes, over the MQTT packet limit of {max_packet}: send a smaller batch, or use the HTTP endpoint",
            body.len()
        );
        body = serde_json::to_vec(&InferError { id: answer.id, error, code: ErrorCode::TooLarge }).unwrap_or_default();
    }
    let correlation = request.correlation().map(<[u8]>::to_vec);
    reporter.send(Outgoing { topic, payload: body, retain: false, reliable: true, correlation });
}

/// A reply topic must be publishable: no wildcards, not empty.
fn valid_reply_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 1024 && !t.contains(['+', '#', '\0'])
}
