//! `outpost-sim fleet`: N agents in this process — the agent library itself,
//! each with its own MQTT session, device id, store directory and state —
//! against a broker (Mosquitto by URL, or the embedded one), receiving one
//! group deployment from a registry with a fault mix: flaky downloads,
//! devices that start late, devices that go offline mid-deployment.

use crate::operator::{Operator, deployment};
use crate::registry::{RegisterSpec, register, splitmix, unit};
use outpost_agent::deploy::fetch::FetchConfig;
use outpost_agent::link::{BrokerUrl, SessionConfig};
use outpost_protocol::{DeploymentEvent, Phase, Topics};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub devices: usize,
    /// A broker to use (Mosquitto in the benchmark); None: the embedded one.
    pub broker: Option<BrokerUrl>,
    /// Share of model-file downloads that fail (503 or a cut body).
    pub flaky: f64,
    /// Share of devices that start 1-8 s after the deployment is published.
    pub late: f64,
    /// Share of devices that go offline (stopped) for 3 s once they start downloading.
    pub offline: f64,
    /// The model to deploy (default: the digits MLP built into outpost-sim).
    pub model: Option<PathBuf>,
    pub timeout: Duration,
    /// Where the devices' stores go (default: a temporary directory, in /dev/shm when there is one).
    pub work_dir: Option<PathBuf>,
    pub seed: u64,
    /// Print a live progress line.
    pub progress: bool,
}

/// The outcome, as printed and as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetReport {
    pub devices: usize,
    pub broker: String,
    pub active: usize,
    pub failed: usize,
    /// Seconds from publishing the group deployment to 50 / 90 / 100 % of the devices active.
    pub t50_s: Option<f64>,
    pub t90_s: Option<f64>,
    pub t100_s: Option<f64>,
    /// Seconds for the devices started up front to connect (availability `online`).
    pub connect_s: f64,
    pub failures_by_code: BTreeMap<String, usize>,
    pub download_retries: usize,
    pub downloads_faulted: u64,
    pub late_devices: usize,
    pub offline_devices: usize,
    /// Deployments resumed after an offline period.
    pub resumed: usize,
    /// Messages the observer received from the devices (events, availability).
    pub messages_observed: u64,
    /// Devices not active at the end: id, role and the last phase seen.
    pub stragglers: Vec<String>,
    pub rss_before_mb: f64,
    pub rss_after_mb: f64,
    pub rss_per_device_kb: f64,
    pub cpu_s: f64,
    /// Seconds from publishing to each device's activation, sorted (the
    /// activation curve; not in the JSON, which stays a summary).
    #[serde(skip)]
    pub active_at_s: Vec<f64>,
    /// The same for the devices that ended failed.
    #[serde(skip)]
    pub failed_at_s: Vec<f64>,
}

impl FleetReport {
    /// The activation curve as SVG: devices active over time after the group deployment.
    pub fn activation_svg(&self) -> Result<String, String> {
        let title = format!(
            "One group deployment to {} devices: {} started late, {} went offline mid-download, {} downloads faulted",
            self.devices, self.late_devices, self.offline_devices, self.downloads_faulted
        );
        crate::plot::fleet_activation(self.devices, &self.active_at_s, &self.failed_at_s, &title)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Normal,
    Late(Duration),
    Offline,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    #[default]
    Nothing,
    Received,
    Downloading,
    Active,
    Failed,
}

struct Device {
    id: String,
    role: Role,
    seen: Seen,
    active_at: Option<Duration>,
    failed_at: Option<Duration>,
    stop: Option<oneshot::Sender<()>>,
    /// The agent's task, awaited at the end so its store outlives it.
    task: Option<tokio::task::JoinHandle<()>>,
    went_offline: bool,
}

fn agent_config(id: &str, group: &str, broker: &BrokerUrl, data: &std::path::Path) -> outpost_agent::Config {
    outpost_agent::Config {
        device: id.to_string(),
        groups: vec![group.to_string()],
        data_dir: data.join(id),
        topics: Topics::default(),
        session: SessionConfig {
            broker: broker.clone(),
            client_id: format!("outpost-{id}"),
            keep_alive: Duration::from_secs(30),
            max_packet_size: 1 << 20,
            tls: None,
            credentials: None,
            persistent_session: false,
            protocol: Default::default(),
            read_oversize: false,
        },
        fetch: FetchConfig {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
            attempts: 8,
            ..FetchConfig::default()
        },
        http_bind: None,
        metrics_bind: None,
        isolation: outpost_agent::deploy::isolate::Isolation::InProcess,
        http_limits: Default::default(),
        trust: Default::default(),
        reply_prefixes: vec!["outpost/replies/".into()],
        mqtt_max_inflight_bytes: 64 << 20,
        journal_max_bytes: 16 << 20,
        live: outpost_agent::config::Live {
            workers: 1,
            max_queue: 4,
            telemetry_interval: Duration::from_secs(3600),
            shutdown_grace: Duration::from_millis(200),
            ..Default::default()
        },
    }
}

/// Starts one agent; dropping or firing the sender stops it.
fn start_agent(
    id: &str,
    group: &str,
    broker: &BrokerUrl,
    data: &std::path::Path,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let config = agent_config(id, group, broker, data);
    let id = id.to_string();
    let task = tokio::spawn(async move {
        let (_reload, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Err(e) = outpost_agent::run(
            config,
            async {
                let _ = rx.await;
            },
            reload_rx,
        )
        .await
        {
            eprintln!("outpost-sim fleet: {id}: {e}");
        }
    });
    (tx, task)
}

fn rss_mb() -> f64 {
    outpost_agent::report::telemetry::rss_bytes().map_or(0.0, |b| b as f64 / 1e6)
}

fn cpu_s() -> f64 {
    // Linux reports CPU time in ticks of 1/100 s.
    outpost_agent::report::telemetry::cpu_ticks().map_or(0.0, |t| t as f64 / 100.0)
}

/// Runs the simulation; Err only when it cannot be set up.
///
/// Every simulated agent holds a blocking thread while it deploys (its
/// pipeline waits for its deployer, which persists on another blocking
/// thread): the runtime must allow more blocking threads than devices
/// (`outpost-sim`'s allows 8192; tokio's default of 512 deadlocks a fleet
/// of more than about 500 devices).
pub async fn run(spec: FleetSpec) -> Result<FleetReport, String> {
    let scratch = match &spec.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            tempfile::tempdir_in(d)
        }
        None if std::path::Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm"),
        None => tempfile::tempdir(),
    }
    .map_err(|e| format!("work directory: {e}"))?;
    let registry = scratch.path().join("registry");
    let stores = scratch.path().join("devices");

    // The registry, with the fault mix on its downloads.
    let model = match &spec.model {
        Some(m) => m.clone(),
        None => {
            let p = scratch.path().join("digits-mlp.onnx");
            std::fs::write(&p, crate::demo::MLP).map_err(|e| format!("{}: {e}", p.display()))?;
            p
        }
    };
    let spec_reg = RegisterSpec {
        model,
        name: "fleet-model".into(),
        version: "1".into(),
        registry: registry.clone(),
        labels: None,
        sample: None,
        shapes: Vec::new(),
        tolerance: 1e-4,
        top_k: 3,
        scale: None,
    };
    let registered = tokio::task::spawn_blocking(move || register(&spec_reg)).await.map_err(|e| e.to_string())??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("registry: {e}"))?;
    let registry_url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    let faulted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(crate::registry::serve_http_flaky(registry.clone(), listener, spec.flaky, spec.seed, faulted.clone()));

    let broker = match &spec.broker {
        Some(b) => b.clone(),
        None => {
            let addr = crate::broker::start([127, 0, 0, 1].into(), 0)?;
            BrokerUrl { host: addr.ip().to_string(), port: addr.port(), tls: false }
        }
    };
    // A group of this run only: retained state of earlier runs on the same broker cannot interfere.
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let group = format!("fleet-{run_id}");
    let mut observer = Operator::connect(&broker, &format!("outpost-sim-fleet-{run_id}"), Topics::default()).await?;
    observer.subscribe_with("outpost/devices/+/events", rumqttc::QoS::AtMostOnce).await?;
    observer.subscribe_with("outpost/devices/+/availability", rumqttc::QoS::AtMostOnce).await?;
    // The retained state is the truth about what a device serves (an event
    // can be lost when a device stops right after activating).
    observer.subscribe_with("outpost/devices/+/state", rumqttc::QoS::AtMostOnce).await?;

    // Roles, deterministic for a seed.
    let mut devices: Vec<Device> = (0..spec.devices)
        .map(|i| {
            let r = unit(splitmix(spec.seed.wrapping_add(i as u64)));
            let role = if r < spec.late {
                Role::Late(Duration::from_millis(1000 + (unit(splitmix(r.to_bits())) * 7000.0) as u64))
            } else if r < spec.late + spec.offline {
                Role::Offline
            } else {
                Role::Normal
            };
            Device {
                id: format!("sim-{i:04}"),
                role,
                seen: Seen::Nothing,
                active_at: None,
                failed_at: None,
                stop: None,
                task: None,
                went_offline: false,
            }
        })
        .collect();
    let index: BTreeMap<String, usize> = devices.iter().enumerate().map(|(i, d)| (d.id.clone(), i)).collect();
    let rss_before = rss_mb();
    let cpu_before = cpu_s();

    // Start everyone but the late ones, and wait until they are online.
    let started = Instant::now();
    let upfront = devices.iter().filter(|d| !matches!(d.role, Role::Late(_))).count();
    for d in devices.iter_mut().filter(|d| !matches!(d.role, Role::Late(_))) {
        let (stop, task) = start_agent(&d.id, &group, &broker, &stores);
        (d.stop, d.task) = (Some(stop), Some(task));
    }
    let mut observed: u64 = 0;
    let mut online = std::collections::HashSet::new();
    let online_deadline = Instant::now() + spec.timeout / 2;
    while online.len() < upfront {
        if Instant::now() > online_deadline {
            eprintln!(
                "outpost-sim fleet: {} of {upfront} devices seen online within {:?}; deploying anyway",
                online.len(),
                spec.timeout / 2
            );
            break;
        }
        if let Some(m) = observer.next(Duration::from_millis(200)).await {
            observed += 1;
            if m.topic.ends_with("/availability") && &m.payload[..] == b"online" {
                online.insert(m.topic.clone());
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if spec.progress {
        eprintln!("{upfront} devices online in {connect_s:.1} s; deploying to group '{group}'");
    }

    // The group deployment.
    let url = format!("{registry_url}/{}", registered.manifest_path);
    let d = deployment("fleet-model", "1", &url, &registered.manifest_sha256, None, None);
    observer.publish(&Topics::default().group_desired(&group), d.to_json(), true).await?;
    let t0 = Instant::now();
    let mut late: Vec<(Duration, usize)> = devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match d.role {
            Role::Late(after) => Some((after, i)),
            _ => None,
        })
        .collect();
    late.sort();
    let mut restarts: Vec<(Instant, usize)> = Vec::new();
    let (mut retries, mut resumed) = (0usize, 0usize);
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_print = Instant::now();
    let mut progress = spec.progress.then(|| crate::progress::Counts::new(spec.devices as u64, "active"));
    let done = |devices: &[Device]| devices.iter().filter(|d| d.seen >= Seen::Active).count();
    while done(&devices) < spec.devices && t0.elapsed() < spec.timeout {
        while late.first().is_some_and(|(after, _)| t0.elapsed() >= *after) {
            let (_, i) = late.remove(0);
            let (stop, task) = start_agent(&devices[i].id, &group, &broker, &stores);
            (devices[i].stop, devices[i].task) = (Some(stop), Some(task));
        }
        let mut postponed = Vec::new();
        while restarts.first().is_some_and(|(at, _)| Instant::now() >= *at) {
            let (_, i) = restarts.remove(0);
            // A device comes back once its previous run has ended, as a real
            // one does: two runs on one store would race on its record (the
            // old run's install marker read by the new one as a crash).
            if devices[i].task.as_ref().is_some_and(|t| !t.is_finished()) {
                postponed.push((Instant::now() + Duration::from_millis(200), i));
                continue;
            }
            let (stop, task) = start_agent(&devices[i].id, &group, &broker, &stores);
            (devices[i].stop, devices[i].task) = (Some(stop), Some(task));
        }
        if !postponed.is_empty() {
            restarts.extend(postponed);
            restarts.sort();
        }
        if let Some(m) = observer.next(Duration::from_millis(50)).await {
            observed += 1;
            if m.topic.ends_with("/state")
                && let Ok(state) = outpost_protocol::DeviceState::from_json(&m.payload)
                && state.active.as_ref().is_some_and(|a| a.deployment_id == d.deployment_id)
                && let Some(&i) = index.get(&state.device)
                && devices[i].active_at.is_none()
            {
                devices[i].active_at = Some(t0.elapsed());
                devices[i].seen = Seen::Active;
            }
            if m.topic.ends_with("/events")
                && let Ok(ev) = DeploymentEvent::from_json(&m.payload)
                && ev.deployment_id == d.deployment_id
                && let Some(&i) = index.get(&ev.device)
            {
                let dev = &mut devices[i];
                let now = match ev.phase {
                    Phase::Received => Seen::Received,
                    Phase::Downloading => Seen::Downloading,
                    Phase::Active => Seen::Active,
                    Phase::Failed => Seen::Failed,
                    _ => dev.seen,
                };
                if ev.detail.as_deref().is_some_and(|t| t.contains("retrying")) {
                    retries += 1;
                }
                if ev.detail.as_deref().is_some_and(|t| t.contains("resumed after a restart")) {
                    resumed += 1;
                }
                if now == Seen::Failed
                    && let Some(e) = &ev.error
                {
                    *failures.entry(e.code.to_string()).or_default() += 1;
                }
                if now == Seen::Active && dev.active_at.is_none() {
                    dev.active_at = Some(t0.elapsed());
                }
                if now == Seen::Failed && dev.failed_at.is_none() {
                    dev.failed_at = Some(t0.elapsed());
                }
                if now > dev.seen || now == Seen::Active {
                    dev.seen = now;
                }
                // An offline device drops off the network as soon as it starts downloading.
                if dev.role == Role::Offline && now == Seen::Downloading && !dev.went_offline {
                    dev.went_offline = true;
                    if let Some(stop) = dev.stop.take() {
                        let _ = stop.send(());
                    }
                    restarts.push((Instant::now() + Duration::from_secs(3), i));
                    restarts.sort();
                }
            }
        }
        if let Some(p) = progress.as_mut()
            && last_print.elapsed() >= Duration::from_millis(500)
        {
            last_print = Instant::now();
            let (active, text) = progress_counts(&devices);
            p.update(active, &text);
        }
    }
    if let Some(mut p) = progress {
        let (active, text) = progress_counts(&devices);
        p.finish(active, &text);
    }

    let mut times: Vec<f64> = devices.iter().filter_map(|d| d.active_at).map(|t| t.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    let at = |share: f64| -> Option<f64> {
        let need = ((spec.devices as f64) * share).ceil() as usize;
        times.get(need.max(1) - 1).copied()
    };
    let rss_after = rss_mb();
    let report = FleetReport {
        devices: spec.devices,
        broker: broker.to_string(),
        active: times.len(),
        failed: devices.iter().filter(|d| d.seen == Seen::Failed).count(),
        t50_s: at(0.5),
        t90_s: at(0.9),
        t100_s: at(1.0),
        connect_s,
        failures_by_code: failures,
        download_retries: retries,
        downloads_faulted: faulted.load(std::sync::atomic::Ordering::Relaxed),
        late_devices: devices.iter().filter(|d| matches!(d.role, Role::Late(_))).count(),
        offline_devices: devices.iter().filter(|d| d.role == Role::Offline).count(),
        resumed,
        messages_observed: observed,
        stragglers: devices
            .iter()
            .filter(|d| d.seen != Seen::Active)
            .take(20)
            .map(|d| format!("{} ({:?}, last seen {:?})", d.id, d.role, d.seen))
            .collect(),
        rss_before_mb: rss_before,
        rss_after_mb: rss_after,
        rss_per_device_kb: (rss_after - rss_before).max(0.0) * 1000.0 / spec.devices.max(1) as f64,
        cpu_s: cpu_s() - cpu_before,
        active_at_s: times.clone(),
        failed_at_s: {
            let failed = devices.iter().filter(|d| d.seen == Seen::Failed).filter_map(|d| d.failed_at);
            let mut t: Vec<f64> = failed.map(|t| t.as_secs_f64()).collect();
            t.sort_by(f64::total_cmp);
            t
        },
    };
    // Stop the agents (each says `offline` and records its clean stop),
    // wait for them, then drop the scratch directory.
    for d in devices.iter_mut() {
        if let Some(stop) = d.stop.take() {
            let _ = stop.send(());
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for d in devices.iter_mut() {
        if let Some(task) = d.task.take() {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
    // Leave no retained desired state behind on the broker.
    let _ = observer.publish(&Topics::default().group_desired(&group), Vec::new(), true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(report)
}

/// Devices active, and the rest of the picture in words (crate::progress draws it).
fn progress_counts(devices: &[Device]) -> (u64, String) {
    let count = |s: Seen| devices.iter().filter(|d| d.seen == s).count();
    let received = devices.iter().filter(|d| d.seen >= Seen::Received).count();
    let text = format!(
        "received {received}/{}  downloading {}  failed {}",
        devices.len(),
        count(Seen::Downloading),
        count(Seen::Failed)
    );
    (count(Seen::Active) as u64, text)
}

impl std::fmt::Display for FleetReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |v: Option<f64>| v.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "never".into());
        writeln!(f, "fleet of {} devices against {}", self.devices, self.broker)?;
        writeln!(f, "  connected (up-front devices):  {:.2} s", self.connect_s)?;
        writeln!(f, "  active:                        {} of {} ({} failed)", self.active, self.devices, self.failed)?;
        writeln!(f, "  time to 50% / 90% / 100%:      {} / {} / {}", t(self.t50_s), t(self.t90_s), t(self.t100_s))?;
        writeln!(
            f,
            "  fault mix:                     {} late starters, {} offline mid-deployment ({} resumed), {} downloads faulted, {} retries",
            self.late_devices, self.offline_devices, self.resumed, self.downloads_faulted, self.download_retries
        )?;
        if !self.failures_by_code.is_empty() {
            writeln!(f, "  failures by code:              {:?}", self.failures_by_code)?;
        }
        writeln!(f, "  messages observed:             {}", self.messages_observed)?;
        if !self.stragglers.is_empty() {
            writeln!(f, "  not active:                    {}", self.stragglers.join(", "))?;
        }
        writeln!(
            f,
            "  memory:                        {:.0} MB -> {:.0} MB RSS ({:.0} KB per device)",
            self.rss_before_mb, self.rss_after_mb, self.rss_per_device_kb
        )?;
        write!(f, "  CPU:                           {:.1} s", self.cpu_s)
    }
}
