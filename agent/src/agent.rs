//! The agent's main loop. [`run`] wires the parts together, then
//! [`Agent::serve`] loops over its arms (each calls one method), then
//! [`Agent::drain`] stops it: no new work, the work in flight finishes
//! within `shutdown_grace`, what it said is published, `offline`, goodbye.

use crate::deploy::fetch::{FetchConfig, Fetcher};
use crate::deploy::pipeline::{Limits, Pipeline};
use crate::deploy::reconcile::Source;
use crate::deploy::store::Store;
use crate::deploy::{Deployer, Deployments};
use crate::link::connection::{Action, Connection, Event};
use crate::link::journal::Journal;
use crate::link::publisher::{Outbox, Outgoing};
use crate::link::session::{Link, Message, Net, Session};
use crate::link::{Protocol, SessionConfig};
use crate::report::Reporter;
use crate::serve::Engine;
use crate::serve::http::Endpoint;
use crate::serve::models::Models;
use outpost_protocol::Topics;
use outpost_protocol::topics::{TopicKind, same_name};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval};
use tokio_util::task::TaskTracker;

/// Everything `outpost run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: String,
    pub groups: Vec<String>,
    pub data_dir: PathBuf,
    pub topics: Topics,
    pub session: SessionConfig,
    pub fetch: FetchConfig,
    /// The keys deployments must be signed with (none: any publisher deploys).
    pub trust: outpost_protocol::trust::Trust,
    /// Topic prefixes a request's `reply_to` may name.
    pub reply_prefixes: Vec<String>,
    /// Where the local Open Inference Protocol endpoint listens (None: off).
    pub http_bind: Option<std::net::SocketAddr>,
    /// Where `/metrics` is served alone (`metrics.bind`), if anywhere.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// What clients of that endpoint may hold.
    pub http_limits: crate::serve::http::Limits,
    /// Bytes MQTT requests in flight may hold together.
    pub mqtt_max_inflight_bytes: usize,
    /// Bytes the outage journal may take on disk.
    pub journal_max_bytes: u64,
    /// What SIGHUP may change: telemetry interval, shutdown grace, limits.
    pub live: crate::config::Live,
    /// Where new versions are first loaded and validated (the `outpost`
    /// binary: a child process of itself).
    pub isolation: crate::deploy::isolate::Isolation,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data dir {dir}: {source} (--data-dir must be a directory the agent can create and write)")]
    DataDir { dir: PathBuf, source: std::io::Error },
    #[error("HTTP endpoint {addr}: {source} (choose another address with --http-bind IP:PORT, or --http-bind off)")]
    HttpBind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("metrics endpoint {addr}: {source} (choose another metrics.bind address, or leave it unset)")]
    MetricsBind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("MQTT over TLS: {0}")]
    Tls(String),
}

impl AgentError {
    /// An error no restart can fix: the configuration names an address this
    /// host does not have or a port the agent may not bind (systemd's
    /// `RestartPreventExitStatus=64` then stops the unit). An address in
    /// use is not: the previous instance may still be letting it go.
    pub fn is_configuration(&self) -> bool {
        match self {
            AgentError::HttpBind { source, .. } | AgentError::MetricsBind { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::PermissionDenied)
            }
            _ => false,
        }
    }
}

/// Runs the agent until `shutdown` completes; `reload` delivers new live
/// settings (SIGHUP).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    reload: mpsc::UnboundedReceiver<crate::config::Live>,
) -> Result<(), AgentError> {
    let mut agent = Agent::wire(config, reload).await?;
    agent.serve(shutdown).await;
    agent.drain().await;
    Ok(())
}

/// Model slots a device takes at most (`devices/{d}/models/{slot}/desired`,
/// `groups/{g}/models/{slot}/desired`): a desired state for one more is
/// refused `slot_limit`. Bounds the engines, records and worker pools a
/// publisher can make the agent create.
pub const MAX_SLOTS: usize = 16;

/// A model slot's deployer.
struct Slot {
    deployments: Deployments,
    deployer: tokio::task::JoinHandle<()>,
}

/// What a new model slot is made of.
struct SlotParts {
    store: Arc<Store>,
    reporter: Arc<Reporter>,
    counters: Arc<crate::serve::Counters>,
    /// What answers a request for a slot the device does not have (one
    /// empty engine, not one per request).
    no_slot: Arc<Engine>,
    /// The default slot's: one HTTP client (root store, connection pool) for every slot.
    fetcher: Fetcher,
    isolation: crate::deploy::isolate::Isolation,
    authority: crate::deploy::Authority,
    max_packet_size: usize,
}

impl SlotParts {
    /// Opens model slot `name`: its engine, and its deployer, which serves
    /// the slot's last active version from the store (its record,
    /// `slots/NAME.json`) before returning. The deployer is not running yet.
    async fn open(&self, name: &str, live: &crate::config::Live) -> (Arc<Engine>, Deployer, Deployments) {
        let engine = Arc::new(Engine::sharing(live.workers, live.max_queue, self.counters.clone()));
        let reporter = Arc::new(self.reporter.for_slot(name));
        let pipeline = Arc::new(Pipeline {
            store: self.store.clone(),
            fetcher: self.fetcher.clone(),
            engine: engine.clone(),
            reporter: reporter.clone(),
            limits: arc_swap::ArcSwap::from_pointee(limits(live)),
            // The device's endpoint moves with the default slot only.
            http: Default::default(),
            isolation: self.isolation.clone(),
            slot: Some(name.to_string()),
        });
        let (deployer, deployments, _) = Deployer::open(pipeline, reporter.clone(), self.authority.clone()).await;
        crate::report::publish_captures(&engine, reporter, self.max_packet_size);
        (engine, deployer, deployments)
    }
}

/// The parts of a running agent and the state of its main loop.
struct Agent {
    config: Config,
    live: crate::config::Live,
    reload: mpsc::UnboundedReceiver<crate::config::Live>,
    store: Arc<Store>,
    engine: Arc<Engine>,
    reporter: Arc<Reporter>,
    outbox: Outbox,
    deployments: Deployments,
    deployer: tokio::task::JoinHandle<()>,
    /// What serves: the default slot's engine and each model slot's.
    models: Arc<Models>,
    /// The model slots' deployers, by slot name.
    slots: std::collections::BTreeMap<String, Slot>,
    slot_parts: SlotParts,
    http: Option<Arc<Endpoint>>,
    connection: Connection,
    session: Session,
    link: Link,
    acks: Option<mpsc::UnboundedSender<Message>>,
    online: watch::Sender<bool>,
    journal: Arc<Mutex<Journal>>,
    publisher: tokio::task::JoinHandle<()>,
    /// Tasks answering MQTT requests: the drain waits for them.
    requests: TaskTracker,
    /// KiB of MQTT request payloads in flight (`mqtt.max_inflight_bytes`).
    mqtt_inflight_kib: Arc<tokio::sync::Semaphore>,
    subscriptions: Vec<String>,
    started: std::time::Instant,
    telemetry: crate::report::telemetry::Reporter,
    telemetry_tick: Interval,
    watchdog: Option<Interval>,
    pings: u64,
    /// Reconnections so far, for `/metrics`.
    reconnects: Arc<std::sync::atomic::AtomicU64>,
    /// Sampled requests each shadow candidate had compared at its last event.
    shadows_reported: std::collections::HashMap<(String, usize), u64>,
    /// Topics already warned about by [`Agent::unplaced`].
    unplaced: std::collections::HashSet<String>,
}

fn interval(every: Duration, first_after: Duration) -> Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + first_after, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

impl Agent {
    /// Opens the store, serves what was active before the restart (before
    /// touching the network), starts the HTTP endpoint, the deployer and the
    /// publisher, and opens the MQTT session (connected by the first poll).
    async fn wire(config: Config, reload: mpsc::UnboundedReceiver<crate::config::Live>) -> Result<Agent, AgentError> {
        let live = config.live.clone();
        let store = Arc::new(
            Store::open(&config.data_dir)
                .map_err(|source| AgentError::DataDir { dir: config.data_dir.clone(), source })?,
        );
        let (outbox, inbox) = crate::link::publisher::outbox();
        let reporter = Arc::new(Reporter::new(&config.device, &config.groups, config.topics.clone(), outbox.clone()));
        let engine = Arc::new(Engine::new(live.workers, live.max_queue));
        let pipeline = Arc::new(Pipeline {
            store: store.clone(),
            fetcher: Fetcher::new(config.fetch.clone()),
            engine: engine.clone(),
            reporter: reporter.clone(),
            limits: arc_swap::ArcSwap::from_pointee(limits(&live)),
            http: Default::default(),
            isolation: config.isolation.clone(),
            slot: None,
        });
        // The MQTT session's settings fail before the record is touched.
        let (client, session) =
            Session::new(&config.session, &config.topics, &config.device, 1024).map_err(AgentError::Tls)?;
        let authority = crate::deploy::Authority {
            device: config.device.clone(),
            groups: config.groups.clone(),
            trust: config.trust.clone(),
        };
        let (mut deployer, deployments, restored) =
            Deployer::open(pipeline.clone(), reporter.clone(), authority.clone()).await;
        crate::report::publish_captures(&engine, reporter.clone(), config.session.max_packet_size);
        let slot_parts = SlotParts {
            store: store.clone(),
            reporter: reporter.clone(),
            counters: engine.counters.clone(),
            no_slot: Arc::new(Engine::sharing(1, 1, engine.counters.clone())),
            fetcher: pipeline.fetcher.clone(),
            isolation: config.isolation.clone(),
            authority,
            max_packet_size: config.session.max_packet_size,
        };
        let models = Arc::new(Models::new(engine.clone()));

        // The local endpoint serves from the store even while the broker is unreachable.
        let http = match config.http_bind {
            Some(addr) => {
                let started = Endpoint::start(
                    addr,
                    restored.http_port,
                    models.clone(),
                    config.http_limits,
                    tokio::runtime::Handle::current(),
                );
                let ep = match started {
                    Ok(ep) => ep,
                    Err(source) => {
                        // A setting, not a model: the breaker must not count this exit.
                        deployer.clean_exit().await;
                        return Err(AgentError::HttpBind { addr, source });
                    }
                };
                let ep = Arc::new(ep);
                let _ = pipeline.http.set(ep.clone());
                Some(ep)
            }
            None => None,
        };

        if let Some(addr) = config.metrics_bind {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "serving /metrics");
                    tokio::spawn(crate::serve::http::serve_metrics(listener, engine.clone()));
                }
                Err(source) => {
                    deployer.clean_exit().await;
                    return Err(AgentError::MetricsBind { addr, source });
                }
            }
        }

        // The model slots serve their last active versions too, before any
        // network (opened once the endpoints are bound: a bind error exits
        // before any slot's record says it runs).
        let mut opened = Vec::new();
        for name in crate::deploy::record::slots_on_disk(&store).into_iter().take(MAX_SLOTS) {
            let (slot_engine, slot_deployer, slot_deployments) = slot_parts.open(&name, &live).await;
            models.add(&name, slot_engine);
            opened.push((name, slot_deployer, slot_deployments));
        }
        let link = Link::new(client);
        let acks = crate::link::session::acker(link.clone(), config.session.persistent_session);
        let journal = Arc::new(Mutex::new(Journal::open(&config.data_dir, config.journal_max_bytes)));
        let (online, online_rx) = watch::channel(false);
        reporter.count_outcomes_in(engine.counters.tally.clone());
        let reconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _ = engine.metrics_source.set(Box::new(LinkMetrics {
            online: online_rx.clone(),
            reconnects: reconnects.clone(),
            journal: journal.clone(),
            store: store.clone(),
            last_journal: Default::default(),
        }));
        let publisher = tokio::spawn(crate::link::publisher::publish(
            link.clone(),
            inbox,
            config.session.max_packet_size,
            journal.clone(),
            online_rx,
        ));
        let (topics, device) = (&config.topics, &config.device);
        let mut subscriptions = vec![
            topics.device_desired(device),
            topics.infer(device),
            topics.device_model_desired(device, "+"),
            topics.model_infer(device, "+"),
        ];
        for g in &config.groups {
            subscriptions.extend([topics.group_desired(g), topics.group_model_desired(g, "+")]);
        }
        let every = live.telemetry_interval.max(Duration::from_secs(1));
        // systemd: the watchdog is pinged from the main loop, so a stuck loop stops the pings.
        let watchdog = crate::sys::systemd::watchdog_interval().map(|every| interval(every, Duration::ZERO));
        let serving = engine.active().map(|m| format!("serving {}@{}", m.name, m.version));
        crate::sys::systemd::ready(&format!(
            "{}; connecting to {}",
            serving.as_deref().unwrap_or("no model yet"),
            config.session.broker
        ));
        // Pending work resumes once the device is READY: a new version's
        // model code runs isolated, but the control plane comes first.
        let deployer = tokio::spawn(deployer.run());
        let slots = opened
            .into_iter()
            .map(|(name, d, deployments)| (name, Slot { deployments, deployer: tokio::spawn(d.run()) }))
            .collect();
        let mqtt_inflight_kib = Arc::new(tokio::sync::Semaphore::new((config.mqtt_max_inflight_bytes / 1024).max(1)));
        Ok(Agent {
            connection: Connection::new(config.session.protocol),
            config,
            live,
            reload,
            store,
            engine,
            reporter,
            outbox,
            deployments,
            deployer,
            models,
            slots,
            slot_parts,
            http,
            session,
            link,
            acks,
            online,
            journal,
            publisher,
            requests: TaskTracker::new(),
            mqtt_inflight_kib,
            subscriptions,
            started: std::time::Instant::now(),
            telemetry: crate::report::telemetry::Reporter::every(every),
            telemetry_tick: interval(every, every),
            watchdog,
            pings: 0,
            unplaced: Default::default(),
            shadows_reported: Default::default(),
            reconnects,
        })
    }

    /// The main loop: each arm calls one method. Waiting to reconnect is the
    /// timer arm (the session is not polled meanwhile), never a sleep, so the
    /// watchdog, reload and telemetry arms keep running during an outage.
    async fn serve(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let retry_at = self.connection.retry_at();
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick(&mut self.watchdog), if self.watchdog.is_some() => self.on_watchdog(),
                Some(new) = self.reload.recv() => self.on_reload(new),
                _ = self.telemetry_tick.tick() => self.on_telemetry(),
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.connection.on_retry_timer()
                }
                net = self.session.poll(), if retry_at.is_none() => self.on_net(net).await,
            }
        }
    }

    fn on_watchdog(&mut self) {
        self.pings += 1;
        if self.pings > 5 {
            crate::sys::fault_point("stall-main-loop");
        }
        crate::sys::systemd::watchdog();
    }

    fn on_reload(&mut self, new: crate::config::Live) {
        if new.telemetry_interval != self.live.telemetry_interval {
            let every = new.telemetry_interval.max(Duration::from_secs(1));
            self.telemetry_tick = interval(every, every);
            self.telemetry.interval_s = Some(every.as_secs());
        }
        self.deployments.set_limits(limits(&new));
        for slot in self.slots.values() {
            slot.deployments.set_limits(limits(&new));
        }
        self.live = new;
    }

    fn on_telemetry(&mut self) {
        let pending = {
            let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            (j.len() as u64, j.dropped, j.bytes())
        };
        let t = self.telemetry.report(
            &self.config.device,
            self.started,
            &self.models,
            {
                let (bytes, versions) = self.store.usage();
                outpost_protocol::telemetry::StoreStats { bytes, versions }
            },
            self.connection.reconnects,
            pending,
        );
        // How each shadow candidate is doing, as an event too (when it changed).
        if self.shadows_reported.len() > 64 {
            self.shadows_reported.clear();
        }
        let engines = std::iter::once((None, self.models.default.clone()))
            .chain(self.models.slots().into_iter().map(|(slot, e)| (Some(slot), e)));
        for (slot, engine) in engines {
            let Some(shadow) = engine.shadow() else { continue };
            let key = (slot.clone().unwrap_or_default(), Arc::as_ptr(&shadow) as usize);
            let compared = shadow.stats().compared;
            if compared > 0 && self.shadows_reported.insert(key, compared) != Some(compared) {
                match &slot {
                    Some(s) => self.reporter.for_slot(s).shadow_event(&shadow, "shadow scoring"),
                    None => self.reporter.shadow_event(&shadow, "shadow scoring"),
                }
            }
        }
        self.reporter.send(Outgoing {
            topic: self.config.topics.telemetry(&self.config.device),
            payload: serde_json::to_vec(&t).unwrap_or_default(),
            retain: false,
            reliable: false,
            correlation: None,
        });
    }

    async fn on_net(&mut self, net: Net) {
        match net {
            Net::Event(event) => {
                let failure = match &event {
                    Event::Failed(kind) => Some(*kind),
                    Event::ConnAck { .. } => None,
                };
                for action in self.connection.on_event(event, Instant::now()) {
                    self.act(action, failure);
                }
            }
            Net::Message(m) => self.on_message(m).await,
            Net::Disconnected | Net::Other => {}
        }
    }

    /// Carries out what the connection's state machine decided.
    fn act(&mut self, action: Action, failure: Option<crate::link::connection::FailureKind>) {
        match action {
            Action::Subscribe => {
                // From a task: the loop must keep polling the session that
                // drains the request channel these wait on.
                let (link, topics) = (self.link.clone(), self.subscriptions.clone());
                tokio::spawn(async move {
                    for t in topics {
                        if let Err(e) = link.subscribe(t.clone()).await {
                            tracing::error!(topic = %t, error = %e, "subscribe failed");
                        }
                    }
                });
            }
            Action::Online { reconnects } => {
                self.reconnects.store(reconnects, std::sync::atomic::Ordering::Relaxed);
                let _ = self.online.send(true);
                tracing::info!(broker = %self.config.session.broker, reconnects, "connected");
                self.reporter.send(Outgoing {
                    topic: self.config.topics.availability(&self.config.device),
                    payload: b"online".to_vec(),
                    retain: true,
                    reliable: true,
                    correlation: None,
                });
                self.reporter.publish_state();
            }
            Action::Offline => {
                let _ = self.online.send(false);
            }
            Action::FallBackToV311 => {
                tracing::warn!(error = %self.session.last_error(), "the broker does not speak MQTT 5: falling back to MQTT 3.1.1");
                if self.connection.oversize_seen() {
                    tracing::warn!(
                        "this broker speaks only MQTT 3.1.1 and sent a packet over mqtt.max_packet_size: packets up to 256 MiB are read so that one cannot break every connection; payloads over the limit are refused"
                    );
                }
                self.switch_protocol(Protocol::V311);
            }
            Action::UpgradeToV5 => {
                tracing::warn!(
                    error = %self.session.last_error(),
                    "the broker sent a packet over mqtt.max_packet_size, which MQTT 3.1.1 cannot tell it: trying MQTT 5, which does (the broker then drops what is over the limit)"
                );
                self.switch_protocol(Protocol::V5);
            }
            Action::RetryAt(_, delay) => {
                let error = self.session.last_error();
                let retry_in_ms = delay.as_millis() as u64;
                match failure.and_then(|f| f.hint()) {
                    Some(hint) => tracing::error!(%error, retry_in_ms, "cannot connect to the broker: {hint}"),
                    None => tracing::warn!(%error, retry_in_ms, "MQTT connection lost"),
                }
            }
        }
    }

    /// A message on one of the agent's subscriptions.
    async fn on_message(&mut self, m: Message) {
        let (topics, device) = (&self.config.topics, &self.config.device);
        match topics.classify(m.topic()) {
            Some(TopicKind::DeviceDesired(d)) if same_name(d, device) => self.on_desired(Source::Device, &m).await,
            Some(TopicKind::GroupDesired(g)) => match self.config.groups.iter().position(|x| same_name(g, x)) {
                Some(i) => self.on_desired(Source::Group(i), &m).await,
                None => self.unplaced(m.topic()),
            },
            Some(TopicKind::Infer(d)) if same_name(d, device) => self.on_infer(m.clone(), None),
            Some(TopicKind::DeviceModelDesired(d, slot)) if same_name(d, device) => {
                let slot = slot.to_string();
                self.on_slot_desired(Source::Device, &slot, &m).await
            }
            Some(TopicKind::GroupModelDesired(g, slot)) => {
                match self.config.groups.iter().position(|x| same_name(g, x)) {
                    Some(i) => {
                        let slot = slot.to_string();
                        self.on_slot_desired(Source::Group(i), &slot, &m).await
                    }
                    None => self.unplaced(m.topic()),
                }
            }
            Some(TopicKind::ModelInfer(d, slot)) if same_name(d, device) => {
                let slot = slot.to_string();
                self.on_infer(m.clone(), Some(&slot))
            }
            _ => self.unplaced(m.topic()),
        }
        // Acked once handled: a desired state only after it is recorded on disk.
        if let Some(acks) = &self.acks {
            let _ = acks.send(m);
        }
    }

    /// A message on a topic the agent cannot place (a broker that rewrites
    /// topics, a misconfigured prefix): warned once per topic, so the
    /// operator sees why a deployment never arrives, and a flood of
    /// distinct topics cannot fill the log or memory.
    fn unplaced(&mut self, topic: &str) {
        if self.unplaced.len() < 64 && self.unplaced.insert(topic.to_string()) {
            tracing::warn!(
                topic = %outpost_protocol::error::excerpt(topic, 200),
                "ignored a message on a topic this agent cannot place (warned once per topic): \
                 expected {p}/devices/{d}/desired|infer, {p}/devices/{d}/models/SLOT/desired|infer \
                 or {p}/groups/GROUP[/models/SLOT]/desired",
                p = self.config.topics.prefix(),
                d = self.config.device
            );
        } else {
            tracing::debug!(topic = %outpost_protocol::error::excerpt(topic, 200), "ignored message");
        }
    }

    async fn on_desired(&mut self, source: Source, m: &Message) {
        self.deployments.desired(source, m.payload(), self.config.session.max_packet_size).await;
    }

    /// A desired state for model slot `slot`: handed to its deployer, which
    /// is opened on the slot's first deployment (at most [`MAX_SLOTS`]).
    async fn on_slot_desired(&mut self, source: Source, slot: &str, m: &Message) {
        if !self.slots.contains_key(slot) {
            // A slot is opened (and kept on disk) only for a deployment the
            // device accepts: a refused message, or the withdrawal of a slot
            // the device never had, leaves no slot behind.
            let target = self.slot_parts.authority.target(source);
            let now = std::time::SystemTime::now();
            let claimed = match self.config.trust.open_in(m.payload(), &target, Some(slot), now) {
                Ok((outpost_protocol::trust::Desired::Deploy(d), _)) => d,
                Ok((outpost_protocol::trust::Desired::Undeploy { .. }, _)) => {
                    tracing::debug!(slot, "undeploy of a model slot that does not exist");
                    return;
                }
                Err(refused) => {
                    self.engine.counters.tally.desired_refused(refused.error.code);
                    tracing::warn!(topic = %target, slot, error = %refused.error, "desired state refused");
                    self.reporter.for_slot(slot).refused_message(m.payload(), &refused);
                    return;
                }
            };
            if self.slots.len() >= MAX_SLOTS {
                let e = outpost_protocol::ErrorInfo::new(
                    outpost_protocol::ErrorCode::SlotLimit,
                    format!(
                        "model slot {slot} would be this device's {}th; it takes at most {MAX_SLOTS} \
                         (a slot keeps its place once opened, undeployed or not: reuse a slot name)",
                        MAX_SLOTS + 1
                    ),
                );
                self.engine.counters.tally.desired_refused(e.code);
                self.reporter.for_slot(slot).refused_desired(&claimed, &e);
                return;
            }
            let (engine, deployer, deployments) = self.slot_parts.open(slot, &self.live).await;
            self.models.add(slot, engine);
            tracing::info!(slot, "model slot opened");
            self.slots.insert(slot.to_string(), Slot { deployments, deployer: tokio::spawn(deployer.run()) });
        }
        if let Some(s) = self.slots.get(slot) {
            s.deployments.desired(source, m.payload(), self.config.session.max_packet_size).await;
        }
    }

    /// Answers a request from its own task, tracked: the drain waits for it.
    /// The bytes of requests in flight are bounded (`mqtt.max_inflight_bytes`):
    /// past it a request is answered `overloaded` at once, unread.
    fn on_infer(&mut self, request: Message, slot: Option<&str>) {
        let engine = match slot {
            None => self.engine.clone(),
            // No such slot: answered `no_model` by the engine with nothing in it.
            Some(s) => self.models.slot(s).unwrap_or_else(|| self.slot_parts.no_slot.clone()),
        };
        let out = self.outbox.clone();
        let predictions = self.config.topics.predictions(&self.config.device);
        let prefixes = self.config.reply_prefixes.clone();
        let limit = self.config.session.max_packet_size;
        let kib = request.payload().len().div_ceil(1024).max(1).min(u32::MAX as usize) as u32;
        let held = self.mqtt_inflight_kib.clone().try_acquire_many_owned(kib).ok();
        let overloaded = held.is_none().then(|| {
            format!(
                "the requests in flight already hold close to {} bytes (mqtt.max_inflight_bytes): retry later",
                self.config.mqtt_max_inflight_bytes
            )
        });
        self.requests.spawn(async move {
            crate::serve::mqtt::answer(&engine, &out, &predictions, &prefixes, &request, limit, overloaded).await;
            drop(held);
        });
    }

    /// Opens a new session speaking `protocol` (connected by the next poll).
    /// On MQTT 3.1.1 after the broker sent an oversize packet (it cannot be
    /// told the limit and would send it at every connection), packets are
    /// read whole and refused by the agent.
    fn switch_protocol(&mut self, protocol: Protocol) {
        let read_oversize = protocol == Protocol::V311 && self.connection.oversize_seen();
        let cfg = SessionConfig { protocol, read_oversize, ..self.config.session.clone() };
        match Session::new(&cfg, &self.config.topics, &self.config.device, 1024) {
            Ok((client, session)) => {
                self.link.replace(client);
                self.session = session;
            }
            Err(e) => tracing::error!(error = %e, %protocol, "cannot open an MQTT session"),
        }
    }

    /// Shutting down: no new requests (MQTT is no longer read, the HTTP
    /// listener closes), the deployment in progress is interrupted (it
    /// resumes at the next start), the requests in flight finish within the
    /// grace period and everything said is published; then retained
    /// `offline` and a clean disconnect (which suppresses the Last Will),
    /// bounded so a dead broker cannot hold us.
    async fn drain(mut self) {
        crate::sys::systemd::stopping();
        let grace = self.live.shutdown_grace;
        tracing::info!(grace_s = grace.as_secs_f64(), "shutting down: finishing requests in flight");
        let deadline = Instant::now() + grace;
        self.deployments.stop();
        for slot in self.slots.values() {
            slot.deployments.stop();
        }
        self.requests.close();
        let http = self.http.clone();
        let (requests, outbox, deployments) = (self.requests.clone(), self.outbox.clone(), self.deployments.clone());
        let deployer = self.deployer;
        let slots: Vec<Slot> = std::mem::take(&mut self.slots).into_values().collect();
        let work = async move {
            // HTTP requests finish inside the endpoint's stop; MQTT ones are tracked.
            let http_stopped = async {
                if let Some(ep) = http {
                    ep.stop().await;
                }
            };
            tokio::join!(http_stopped, requests.wait());
            // No request can reach a version on probation any more: the
            // deployer records the last verdicts and ends.
            deployments.finish();
            for slot in &slots {
                slot.deployments.finish();
            }
            let _ = deployer.await;
            for slot in slots {
                let _ = slot.deployer.await;
            }
            // Everything they said, handed to the publisher before this, goes out.
            outbox.flush().await;
        };
        tokio::pin!(work);
        let drained = tokio::time::timeout_at(deadline, async {
            loop {
                // Keep the session moving so answers and acks go out meanwhile,
                // and follow the connection (offline: the publisher journals).
                let retry_at = self.connection.retry_at();
                tokio::select! {
                    biased;
                    _ = &mut work => break,
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                        self.connection.on_retry_timer()
                    }
                    net = self.session.poll(), if retry_at.is_none() => {
                        if let Net::Event(event) = net {
                            for action in self.connection.on_event(event, Instant::now()) {
                                match action {
                                    Action::Online { .. } => drop(self.online.send(true)),
                                    Action::Offline => drop(self.online.send(false)),
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight = self.engine.in_flight() + self.requests.len() as u64,
                "grace period over: requests still in flight are dropped"
            );
        }
        self.link.try_publish(self.config.topics.availability(&self.config.device), true, "offline");
        self.link.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.session.poll().await {
                    Net::Event(Event::Failed(_)) | Net::Disconnected => break,
                    _ => {}
                }
            }
        })
        .await;
        self.publisher.abort();
        tracing::info!("stopped");
    }
}

async fn tick(i: &mut Option<Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn limits(live: &crate::config::Live) -> Limits {
    Limits {
        workers: live.workers,
        max_queue: live.max_queue,
        store_quota: live.store_quota,
        max_model_size: live.max_model_size,
        validation_memory: live.validation_memory,
        validation_timeout: live.validation_timeout,
        disk_reserve: live.disk_reserve,
        revalidate_at_start: live.revalidate_at_start,
        breaker: live.breaker,
    }
}

/// The agent loop's part of `/metrics`: the MQTT link, the outage journal
/// and the model store.
#[derive(Debug)]
struct LinkMetrics {
    online: watch::Receiver<bool>,
    reconnects: Arc<std::sync::atomic::AtomicU64>,
    journal: Arc<Mutex<Journal>>,
    store: Arc<Store>,
    /// The journal's figures at the last scrape that found it free: a
    /// scrape never waits on a journal rewrite (it runs on a runtime worker).
    last_journal: Mutex<(usize, u64, u64)>,
}

impl crate::serve::metrics::Source for LinkMetrics {
    fn render(&self, out: &mut crate::serve::metrics::Exposition) {
        let connected = u8::from(*self.online.borrow());
        out.single("outpost_mqtt_connected", "gauge", "1 while the MQTT session is up.", connected);
        let reconnects = self.reconnects.load(std::sync::atomic::Ordering::Relaxed);
        out.single("outpost_mqtt_reconnects_total", "counter", "MQTT reconnections since start.", reconnects);
        let mut last = self.last_journal.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(j) = self.journal.try_lock() {
            *last = (j.len(), j.bytes(), j.dropped);
        }
        let (events, bytes, dropped) = *last;
        drop(last);
        out.single(
            "outpost_journal_events",
            "gauge",
            "Messages kept in the outage journal until the broker takes them.",
            events,
        );
        out.single("outpost_journal_bytes", "gauge", "Bytes of the outage journal on disk.", bytes);
        out.single(
            "outpost_journal_dropped_total",
            "counter",
            "Messages the full journal dropped (least important first).",
            dropped,
        );
        let (bytes, versions) = self.store.usage();
        out.single(
            "outpost_store_bytes",
            "gauge",
            "Bytes of model files in the store (partial downloads included).",
            bytes,
        );
        out.single("outpost_store_versions", "gauge", "Model versions kept in the store.", versions);
    }
}
