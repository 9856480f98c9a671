//! `outpost-sim chaos`: a seeded soak of real agent processes against a
//! Mosquitto broker and an HTTP registry, under a random but reproducible
//! schedule of faults, with invariants checked while it runs and at the end.
//!
//! Faults (the schedule, drawn from `--seed`, is the same every run): SIGKILL
//! at random instants and right after a deployment starts (mid-install) or
//! right after the broker returns (mid-replay); broker restarts; registry
//! 503s, stalls and cut bodies; a deployment that cannot fit the store quota
//! (a full disk); hostile models among good ones; slow-loris HTTP clients
//! and oversize MQTT requests; redelivered (stale) and replayed desired
//! messages. Faults stop for the last quarter (at least 20 s): the fleet must
//! converge.
//!
//! Invariants: (1) a device's retained state names the version its HTTP
//! endpoint answers with (a mismatch may not last 5 s; none at the end);
//! (2) no answer ever comes from a hostile (refused or quarantined) model;
//! (3) no deployment is left `in_progress` once faults stop; (4) every
//! stored version re-verifies (sizes and sha256) after the run; (5) per
//! device, events arrive in `seq` order and every gap in `seq` is explained
//! by a restart, a broker outage or a counted journal drop; (6) no panic in
//! any agent's log.

use crate::operator::{Operator, deployment};
use crate::registry::{RegisterSpec, register, register_hostile, splitmix, unit};
use outpost_agent::link::BrokerUrl;
use outpost_protocol::{DeploymentEvent, DeviceState, Outcome, Topics};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `outpost-sim chaos` is asked to do.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    pub agent: PathBuf,
    pub duration: Duration,
    pub seed: u64,
    pub devices: usize,
    pub json: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
}

const GOOD: &[&str] = &["1", "2", "3"];
const HOSTILE: &[&str] = &["expand-bomb", "alloc-panic", "constant-bomb"];
/// Fits every digits version, not `big@1` (its labels file is 512 KiB).
const QUOTA: &str = "256KiB";

/// One planned fault or operator action.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL, restarted after `down`.
    Kill { device: usize, down: Duration },
    /// Deploy a good version, then SIGKILL the device `after` it (mid-install).
    KillDuringInstall { device: usize, version: &'static str, after: Duration },
    /// Stop the broker for `down`; then SIGKILL a device `kill_after` the
    /// broker is back (mid-replay of its journal).
    BrokerRestart { down: Duration, kill: usize, kill_after: Duration },
    /// The registry answers model files with 503 / stalls / cuts for `lasting`.
    Registry { mode: RegistryMode, lasting: Duration },
    /// A good version to the group or to one device.
    Deploy { device: Option<usize>, version: &'static str },
    /// A hostile model to one device.
    Hostile { device: usize, stem: &'static str },
    /// `big@1` (over the store quota) to device 0.
    DiskFull,
    /// Half-open HTTP connections and an oversize MQTT request to a device.
    Clients { device: usize },
    /// The device's previous desired message again (a stale redelivery).
    Replay { device: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RegistryMode {
    Normal = 0,
    Errors = 1,
    Stall = 2,
    Cut = 3,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "sigkill",
            Fault::KillDuringInstall { .. } => "sigkill mid-install",
            Fault::BrokerRestart { .. } => "broker restart (+ sigkill mid-replay)",
            Fault::Registry { mode: RegistryMode::Errors, .. } => "registry 503",
            Fault::Registry { mode: RegistryMode::Stall, .. } => "registry stall",
            Fault::Registry { .. } => "registry cut body",
            Fault::Deploy { .. } => "good deployment",
            Fault::Hostile { .. } => "hostile model",
            Fault::DiskFull => "full disk (quota)",
            Fault::Clients { .. } => "slow + oversize clients",
            Fault::Replay { .. } => "stale redelivery",
        }
    }
}

/// The schedule for `seed`: faults in the first part of the run, then quiet.
pub fn schedule(seed: u64, duration: Duration, devices: usize) -> Vec<(Duration, Fault)> {
    let active = duration.saturating_sub(quiet(duration));
    let mut rng = seed ^ 0x6f75_7470_6f73_7421;
    let mut draw = || {
        rng = splitmix(rng);
        unit(rng)
    };
    let ms = |x: f64, lo: u64, hi: u64| Duration::from_millis(lo + (x * (hi - lo) as f64) as u64);
    let mut out = Vec::new();
    let mut t = Duration::from_millis(1500);
    // One of each kind first (so even a short run exercises all), then a mix.
    let mut n = 0usize;
    while t < active {
        let pick = if n < 9 { n } else { (draw() * 9.0) as usize };
        let device = ((draw() * devices as f64) as usize).min(devices - 1);
        let version = GOOD[((draw() * GOOD.len() as f64) as usize).min(GOOD.len() - 1)];
        let f = match pick {
            0 => Fault::Deploy { device: None, version },
            1 => Fault::KillDuringInstall { device, version, after: ms(draw(), 50, 1500) },
            2 => Fault::Hostile { device, stem: HOSTILE[((draw() * 3.0) as usize).min(2)] },
            3 => Fault::BrokerRestart { down: ms(draw(), 500, 3000), kill: device, kill_after: ms(draw(), 0, 400) },
            4 => {
                let mode =
                    [RegistryMode::Errors, RegistryMode::Stall, RegistryMode::Cut][((draw() * 3.0) as usize).min(2)];
                Fault::Registry { mode, lasting: ms(draw(), 2000, 8000) }
            }
            5 => Fault::Kill { device, down: ms(draw(), 200, 2000) },
            6 => Fault::DiskFull,
            7 => Fault::Clients { device },
            _ => {
                if draw() < 0.5 {
                    Fault::Replay { device }
                } else {
                    Fault::Deploy { device: Some(device), version }
                }
            }
        };
        out.push((t, f));
        n += 1;
        t += ms(draw(), 1500, 4000);
    }
    out
}

fn quiet(duration: Duration) -> Duration {
    (duration / 4).max(Duration::from_secs(20)).min(duration)
}

/// A fault as it happened, for the report and the timeline.
#[derive(Debug, Clone)]
struct Happened {
    at: Duration,
    kind: &'static str,
    what: String,
}

/// What was seen of one device.
#[derive(Debug, Default)]
struct Seen {
    /// (arrival, seq, what) of every event and state message.
    seqs: Vec<(Duration, u64, &'static str)>,
    /// (arrival, "name@version" or "none") from the retained state.
    versions: Vec<(Duration, String)>,
    state: Option<DeviceState>,
    /// Final events by phase and error code (`failed/disk_full`, `active`...).
    outcomes: BTreeMap<String, usize>,
    journal_dropped: u64,
    /// Restarts of this device (kill or restart), by time.
    restarts: Vec<Duration>,
}

#[derive(Debug, Default)]
struct Violations(Vec<(String, String)>);

impl Violations {
    fn add(&mut self, invariant: &str, what: String) {
        if self.0.iter().filter(|(i, _)| i == invariant).count() < 20 {
            self.0.push((invariant.to_string(), what));
        }
    }
}

struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    data: PathBuf,
    http: u16,
}

impl Agent {
    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(&self.args)
            .env("OUTPOST_LOG", "info")
            .env_remove("OUTPOST_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e} (cargo build --release -p outpost-agent)", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Broker {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
}

impl Broker {
    fn start(dir: &Path) -> Result<Broker, String> {
        let port = crate::broker::free_port().map_err(|e| e.to_string())?;
        let conf = dir.join("mosquitto.conf");
        // Persistence: the operator's session (and what it missed) survives a restart.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\nlog_dest none\n",
                dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut b = Broker { child: None, conf, port };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{bin}: {e} (apt-get install mosquitto)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err("mosquitto did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The registry over HTTP, with a fault mode for model files.
async fn serve_registry(root: PathBuf, listener: tokio::net::TcpListener, mode: Arc<AtomicU8>) {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    type Ctx = (PathBuf, Arc<AtomicU8>);
    async fn file(State((root, mode)): State<Ctx>, UrlPath(path): UrlPath<String>) -> axum::response::Response {
        if outpost_protocol::manifest::check_relative_path("path", &path).is_err() {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        }
        let Ok(bytes) = std::fs::read(root.join(&path)) else {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        };
        let m = mode.load(Ordering::Relaxed);
        if !path.ends_with("manifest.json") && m != RegistryMode::Normal as u8 {
            if m == RegistryMode::Errors as u8 {
                return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "busy\n").into_response();
            }
            let len = bytes.len();
            let half = bytes[..len / 2].to_vec();
            let stall = m == RegistryMode::Stall as u8;
            // Half the announced bytes, then nothing more (a stall) or a reset (a cut).
            let body = futures_util::stream::unfold(0u8, move |step| {
                let half = half.clone();
                async move {
                    match step {
                        0 => Some((Ok::<_, std::io::Error>(half), 1)),
                        1 if stall => {
                            std::future::pending::<()>().await;
                            None
                        }
                        1 => Some((Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut")), 2)),
                        _ => None,
                    }
                }
            });
            let body = axum::body::Body::from_stream(body);
            return ([(header::CONTENT_LENGTH, len.to_string())], body).into_response();
        }
        bytes.into_response()
    }
    let app = axum::Router::new().route("/{*path}", axum::routing::get(file)).with_state((root, mode));
    let _ = axum::serve(listener, app).await;
}

/// Runs the soak; returns the JSON report (with `ok`).
pub async fn run(spec: ChaosSpec) -> Result<Value, String> {
    let started_wall = Instant::now();
    let work_holder;
    let work = match &spec.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            d.clone()
        }
        None => {
            work_holder = tempfile::tempdir().map_err(|e| e.to_string())?;
            work_holder.path().to_path_buf()
        }
    };
    let plan = schedule(spec.seed, spec.duration, spec.devices);
    println!(
        "chaos: seed {}, {} s, {} devices, {} planned faults (schedule fingerprint {:016x})",
        spec.seed,
        spec.duration.as_secs(),
        spec.devices,
        plan.len(),
        fingerprint(&plan)
    );

    // The registry: three good digits versions, a big one, hostile models.
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let root = work.join("registry");
    for (model, version) in [("digits-mlp.onnx", "1"), ("digits-cnn.onnx", "2"), ("digits-mlp.onnx", "3")] {
        register(&reg_spec(&fixtures, model, "digits", version, &root, None))?;
    }
    let big_labels = work.join("big-labels.txt");
    let line = "x".repeat(52_000);
    std::fs::write(&big_labels, (0..10).map(|i| format!("{i}{line}\n")).collect::<String>())
        .map_err(|e| e.to_string())?;
    register(&reg_spec(&fixtures, "digits-mlp.onnx", "big", "1", &root, Some(big_labels)))?;
    for stem in HOSTILE {
        register_hostile(&fixtures, stem, &root, stem, "1")?;
    }
    let mode = Arc::new(AtomicU8::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let registry_url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(serve_registry(root.clone(), listener, mode.clone()));

    let broker_dir = work.join("broker");
    std::fs::create_dir_all(&broker_dir).map_err(|e| e.to_string())?;
    let mut broker = Broker::start(&broker_dir)?;
    let url = BrokerUrl { host: "127.0.0.1".into(), port: broker.port, tls: false };
    let topics = Topics::default();
    let mut op = Operator::connect_with(&url, "chaos-operator", topics.clone(), false).await?;
    // (The operator subscribes again by itself when a restarted broker lost its session.)
    for f in ["outpost/devices/+/events", "outpost/devices/+/state", "outpost/devices/+/telemetry"] {
        op.subscribe(f).await?;
    }

    let names: Vec<String> = (0..spec.devices).map(|i| format!("chaos-{i}")).collect();
    let mut agents = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let data = work.join(name);
        let http = crate::broker::free_port().map_err(|e| e.to_string())?;
        let mut args: Vec<String> = [
            "run",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", broker.port),
            "--device",
            name,
            "--group",
            "chaos",
            "--data-dir",
            &data.display().to_string(),
            "--http-bind",
            &format!("127.0.0.1:{http}"),
            "--stall-timeout",
            "3",
            "--download-attempts",
            "3",
            "--telemetry-interval",
            "2",
            "--keep-alive",
            "5",
            "--set",
            "limits.validation_timeout=20",
            "--set",
            "limits.validation_memory=512MiB",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if i == 0 {
            args.extend(["--store-quota".to_string(), QUOTA.to_string()]);
        }
        let mut a = Agent { child: None, args, log: work.join(format!("{name}.log")), data, http };
        a.spawn(&spec.agent)?;
        agents.push(a);
    }

    let t0 = Instant::now();
    let seen: Arc<Mutex<BTreeMap<String, Seen>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let mut violations = Violations::default();
    let mut happened: Vec<Happened> = Vec::new();
    let mut revision = crate::operator::clock_revision();
    let mut last_desired: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    let mut mismatch_since: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut probes = 0u64;
    let mut next = 0usize;
    let end = spec.duration;
    let mut restarts_due: Vec<(Duration, usize)> = Vec::new();
    let mut broker_back_at: Option<(Duration, usize, Duration)> = None;
    let mut registry_normal_at: Option<Duration> = None;
    let mut kill_after_deploy: Vec<(Duration, usize)> = Vec::new();
    let http_client: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut last_probe = Duration::ZERO;

    // The first good version everywhere, so there is something to keep serving.
    revision += 1;
    let first = good(&registry_url, "1", revision, "chaos-start").await?;
    op.publish(&topics.group_desired("chaos"), first.to_json(), true).await?;

    while t0.elapsed() < end {
        let now = t0.elapsed();
        // Drain what devices said.
        while let Some(m) = op.next(Duration::ZERO).await {
            record(&seen, now, &m.topic, &m.payload);
        }
        // Faults due.
        while next < plan.len() && plan[next].0 <= now {
            let (_, f) = plan[next].clone();
            next += 1;
            let what = format!("{f:?}");
            happened.push(Happened { at: now, kind: f.kind(), what });
            match f {
                Fault::Kill { device, down } => {
                    agents[device].kill();
                    note_restart(&seen, &names[device], now);
                    restarts_due.push((now + down, device));
                }
                Fault::KillDuringInstall { device, version, after } => {
                    revision += 1;
                    let d = good(&registry_url, version, revision, &format!("chaos-{revision}")).await?;
                    let d = d.to_json();
                    op.publish(&topics.device_desired(&names[device]), d.clone(), true).await?;
                    last_desired.insert(device, d);
                    kill_after_deploy.push((now + after, device));
                }
                Fault::BrokerRestart { down, kill, kill_after } => {
                    broker.stop();
                    broker_back_at = Some((now + down, kill, kill_after));
                }
                Fault::Registry { mode: m, lasting } => {
                    mode.store(m as u8, Ordering::Relaxed);
                    registry_normal_at = Some(now + lasting);
                }
                Fault::Deploy { device, version } => {
                    revision += 1;
                    let d = good(&registry_url, version, revision, &format!("chaos-{revision}")).await?.to_json();
                    match device {
                        Some(i) => {
                            op.publish(&topics.device_desired(&names[i]), d.clone(), true).await?;
                            last_desired.insert(i, d);
                        }
                        None => op.publish(&topics.group_desired("chaos"), d, true).await?,
                    }
                }
                Fault::Hostile { device, stem } => {
                    revision += 1;
                    let url = format!("{registry_url}/{stem}/1/manifest.json");
                    let sha = crate::registry::sha256(
                        &std::fs::read(root.join(stem).join("1/manifest.json")).map_err(|e| e.to_string())?,
                    );
                    let d =
                        deployment(stem, "1", &url, &sha, Some(revision), Some(format!("chaos-hostile-{revision}")));
                    op.publish(&topics.device_desired(&names[device]), d.to_json(), true).await?;
                    last_desired.insert(device, d.to_json());
                }
                Fault::DiskFull => {
                    revision += 1;
                    let (url, sha) = crate::operator::resolve_manifest(&registry_url, "big", "1").await?;
                    let d = deployment("big", "1", &url, &sha, Some(revision), Some(format!("chaos-big-{revision}")));
                    op.publish(&topics.device_desired(&names[0]), d.to_json(), true).await?;
                    last_desired.insert(0, d.to_json());
                }
                Fault::Clients { device } => {
                    hostile_clients(agents[device].http, &op, &topics.infer(&names[device])).await;
                }
                Fault::Replay { device } => {
                    if let Some(d) = last_desired.get(&device) {
                        // The same message again (redelivery), then an older revision.
                        op.publish(&topics.device_desired(&names[device]), d.clone(), true).await?;
                        let mut old = good(&registry_url, "1", 1, "chaos-stale").await?;
                        old.revision = 1;
                        op.publish(&topics.device_desired(&names[device]), old.to_json(), false).await?;
                    }
                }
            }
        }
        // Timed follow-ups.
        for (at, device) in std::mem::take(&mut kill_after_deploy) {
            if at <= now {
                agents[device].kill();
                note_restart(&seen, &names[device], now);
                restarts_due.push((now + Duration::from_millis(300), device));
            } else {
                kill_after_deploy.push((at, device));
            }
        }
        if let Some((at, kill, kill_after)) = broker_back_at
            && at <= now
        {
            broker.spawn()?;
            note_broker(&seen, now);
            broker_back_at = None;
            kill_after_deploy.push((now + kill_after, kill));
        }
        if registry_normal_at.is_some_and(|at| at <= now) {
            mode.store(0, Ordering::Relaxed);
            registry_normal_at = None;
        }
        for (at, device) in std::mem::take(&mut restarts_due) {
            if at <= now {
                agents[device].spawn(&spec.agent)?;
                note_restart(&seen, &names[device], now);
            } else {
                restarts_due.push((at, device));
            }
        }
        // Probes: every 500 ms, each running device's answer vs its retained state.
        if now >= last_probe + Duration::from_millis(500) {
            last_probe = now;
            for (i, a) in agents.iter_mut().enumerate() {
                if a.child.is_none() {
                    mismatch_since.remove(&i);
                    continue;
                }
                let state = seen.lock().map(|s| s.get(&names[i]).and_then(|x| x.state.clone())).unwrap_or(None);
                let Some(active) = state.as_ref().and_then(|s| s.active.clone()) else { continue };
                let answered = probe(&http_client, a.http, &active.name);
                probes += 1;
                if let Some((name, version)) = &answered {
                    if HOSTILE.contains(&name.as_str()) {
                        violations.add(
                            "2 no answer from a hostile version",
                            format!("{} answered with {name}@{version}", names[i]),
                        );
                    }
                    if *name == active.name && *version == active.version {
                        mismatch_since.remove(&i);
                    } else {
                        let since = *mismatch_since.entry(i).or_insert(now);
                        if now - since > Duration::from_secs(5) {
                            violations.add(
                                "1 retained state = version answering",
                                format!(
                                    "{} at {:.1} s: state says {}@{}, HTTP answers {name}@{version} for {:.1} s",
                                    names[i],
                                    now.as_secs_f64(),
                                    active.name,
                                    active.version,
                                    (now - since).as_secs_f64()
                                ),
                            );
                            mismatch_since.insert(i, now);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything is back: the registry normal, the broker up, every agent running.
    mode.store(0, Ordering::Relaxed);
    if broker.child.is_none() {
        broker.spawn()?;
    }
    for a in agents.iter_mut().filter(|a| a.child.is_none()) {
        a.spawn(&spec.agent)?;
    }
    // Settle: until every device's retained state is final and matches its answer (at most 60 s).
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let mut settled = false;
    while Instant::now() < settle_deadline {
        while let Some(m) = op.next(Duration::from_millis(50)).await {
            record(&seen, t0.elapsed(), &m.topic, &m.payload);
        }
        let all = names.iter().enumerate().all(|(i, n)| {
            let state = seen.lock().ok().and_then(|s| s.get(n).and_then(|x| x.state.clone()));
            let Some(state) = state else { return false };
            let final_ = state.last_deployment.as_ref().is_none_or(|l| l.outcome != Outcome::InProgress);
            let matches = match &state.active {
                Some(a) => probe(&http_client, agents[i].http, &a.name) == Some((a.name.clone(), a.version.clone())),
                None => true,
            };
            final_ && matches
        });
        if all {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let finished_at = t0.elapsed();
    // Invariant 3 and the final form of 1.
    for (i, n) in names.iter().enumerate() {
        let state = seen.lock().ok().and_then(|s| s.get(n).and_then(|x| x.state.clone()));
        match state {
            None => violations.add("3 nothing stuck in_progress", format!("{n}: no state seen")),
            Some(s) => {
                if let Some(l) = s.last_deployment.as_ref().filter(|l| l.outcome == Outcome::InProgress) {
                    violations.add(
                        "3 nothing stuck in_progress",
                        format!("{n}: {} still in_progress 60 s after the faults stopped", l.deployment_id),
                    );
                }
                if let Some(a) = &s.active {
                    let answered = probe(&http_client, agents[i].http, &a.name);
                    if answered != Some((a.name.clone(), a.version.clone())) {
                        violations.add(
                            "1 retained state = version answering",
                            format!("{n} at the end: state says {}@{}, HTTP answers {answered:?}", a.name, a.version),
                        );
                    }
                }
            }
        }
    }
    // Invariant 4: stores re-verify, after a clean stop.
    let mut verified = 0usize;
    for (a, n) in agents.iter_mut().zip(&names) {
        a.stop();
        match verify_store(&a.data) {
            Ok(k) => verified += k,
            Err(e) => violations.add("4 every store re-verifies", format!("{n}: {e}")),
        }
    }
    op.disconnect().await;
    broker.stop();
    // Invariant 5: seq order and gaps.
    let (gaps_explained, dups) = check_seqs(&seen, &mut violations);
    // Invariant 6: no panic in any log.
    for (a, n) in agents.iter().zip(&names) {
        let log = std::fs::read_to_string(&a.log).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("panicked at") && l.contains("thread '")) {
            violations.add("6 no panic in any log", format!("{n}: {}", outpost_protocol::error::excerpt(l, 200)));
        }
    }

    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &happened {
        *by_kind.entry(h.kind).or_default() += 1;
    }
    let invariants = [
        "1 retained state = version answering",
        "2 no answer from a hostile version",
        "3 nothing stuck in_progress",
        "4 every store re-verifies",
        "5 events in seq order, gaps explained",
        "6 no panic in any log",
    ];
    let ok = violations.0.is_empty() && settled;
    let seen_final = seen.lock().map_err(|_| "poisoned")?;
    let report = json!({
        "ok": ok,
        "seed": spec.seed,
        "duration_s": spec.duration.as_secs(),
        "devices": spec.devices,
        "schedule_fingerprint": format!("{:016x}", fingerprint(&plan)),
        "faults": by_kind,
        "faults_total": happened.len(),
        "outcomes": seen_final.values().fold(BTreeMap::<String, usize>::new(), |mut m, s| {
            for (k, v) in &s.outcomes {
                *m.entry(k.clone()).or_default() += v;
            }
            m
        }),
        "settled": settled,
        "settled_after_s": (finished_at.saturating_sub(end)).as_secs_f64(),
        "probes": probes,
        "versions_verified": verified,
        "seq": {"gaps_explained": gaps_explained, "duplicates": dups},
        "invariants": invariants.iter().map(|i| json!({
            "invariant": i,
            "held": !violations.0.iter().any(|(v, _)| v == i),
            "violations": violations.0.iter().filter(|(v, _)| v == i).map(|(_, w)| w.clone()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "happened": happened.iter().map(|h| json!({"at_s": h.at.as_secs_f64(), "kind": h.kind, "what": h.what})).collect::<Vec<_>>(),
        "timeline": names.iter().map(|n| {
            let s = seen_final.get(n);
            json!({"device": n,
                   "versions": s.map(|s| s.versions.iter().map(|(t, v)| json!([t.as_secs_f64(), v])).collect::<Vec<_>>()),
                   "states": s.map(|s| s.seqs.iter().filter(|x| x.2 == "state").map(|(t, q, _)| json!([t.as_secs_f64(), q])).collect::<Vec<_>>()),
                   "restarts": s.map(|s| s.restarts.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>())})
        }).collect::<Vec<_>>(),
        "final": names.iter().map(|n| {
            let s = seen_final.get(n).and_then(|x| x.state.as_ref());
            json!({"device": n,
                   "active": s.and_then(|s| s.active.as_ref()).map(|a| format!("{}@{}", a.name, a.version)),
                   "last": s.and_then(|s| s.last_deployment.as_ref()).map(|l| format!("{} {:?}", l.deployment_id, l.outcome))})
        }).collect::<Vec<_>>(),
        "wall_s": started_wall.elapsed().as_secs_f64(),
    });
    print_report(&report);
    if let Some(p) = &spec.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &spec.svg {
        std::fs::write(p, timeline_svg(&report)?).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(report)
}

/// The timeline of a run (faults, the version each device served, restarts,
/// the invariants) drawn from its report, as written by `--json`.
pub fn timeline_svg(report: &Value) -> Result<String, String> {
    let duration = Duration::from_secs(report["duration_s"].as_u64().unwrap_or(0));
    crate::plot::chaos_timeline(report, duration.saturating_sub(quiet(duration)).as_secs_f64())
}

/// Draws the timeline of an earlier run from its JSON report into `svg`.
pub fn replay_svg(json: &Path, svg: &Path) -> Result<(), String> {
    let text = std::fs::read(json).map_err(|e| format!("{}: {e}", json.display()))?;
    let report: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    std::fs::write(svg, timeline_svg(&report)?).map_err(|e| format!("{}: {e}", svg.display()))
}

fn reg_spec(
    fixtures: &Path,
    model: &str,
    name: &str,
    version: &str,
    root: &Path,
    labels: Option<PathBuf>,
) -> RegisterSpec {
    RegisterSpec {
        model: fixtures.join(model),
        name: name.into(),
        version: version.into(),
        registry: root.to_path_buf(),
        labels: Some(labels.unwrap_or_else(|| fixtures.join("labels.txt"))),
        sample: None,
        shapes: Vec::new(),
        tolerance: 1e-4,
        top_k: 3,
        scale: None,
        runtime: None,
    }
}

async fn good(registry: &str, version: &str, revision: u64, id: &str) -> Result<outpost_protocol::Deployment, String> {
    let (url, sha) = crate::operator::resolve_manifest(registry, "digits", version).await?;
    let mut d = deployment("digits", version, &url, &sha, Some(revision), Some(id.to_string()));
    // The soak moves between versions in both directions on purpose.
    d.policy.allow_downgrade = Some(true);
    Ok(d)
}

fn fingerprint(plan: &[(Duration, Fault)]) -> u64 {
    plan.iter()
        .fold(0u64, |h, (t, f)| format!("{}{f:?}", t.as_millis()).bytes().fold(h, |h, b| splitmix(h ^ u64::from(b))))
}

/// What the device answers a one-digit request to `name` with: (model, version).
fn probe(client: &ureq::Agent, port: u16, name: &str) -> Option<(String, String)> {
    let body = json!({"id": "probe", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![1.0; 64]}]});
    let mut resp = client
        .post(&format!("http://127.0.0.1:{port}/v2/models/{name}/infer"))
        .send(serde_json::to_vec(&body).ok()?.as_slice())
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
    Some((v["model_name"].as_str()?.to_string(), v["model_version"].as_str()?.to_string()))
}

/// Slow-loris HTTP connections (headers never finished) and one MQTT
/// request over the agent's packet limit.
async fn hostile_clients(http: u16, op: &Operator, infer: &str) {
    let mut held = Vec::new();
    for _ in 0..20 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) {
            let _ = s.write_all(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n");
            held.push(s);
        }
    }
    // Held open without finishing the headers: the agent's header timeout reaps them.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(15)).await;
        drop(held);
    });
    let big = vec![b' '; 5 << 20];
    let _ = op.publish(infer, big, false).await;
}

fn record(seen: &Arc<Mutex<BTreeMap<String, Seen>>>, now: Duration, topic: &str, payload: &[u8]) {
    let Ok(mut seen) = seen.lock() else { return };
    let device = topic.split('/').nth(2).unwrap_or_default().to_string();
    let s = seen.entry(device).or_default();
    if topic.ends_with("/events") {
        if let Ok(e) = DeploymentEvent::from_json(payload) {
            s.seqs.push((now, e.seq, "event"));
            if e.phase.is_final() {
                let phase = serde_json::to_value(e.phase).ok().and_then(|v| v.as_str().map(str::to_string));
                let key = match (&phase, &e.error) {
                    (Some(p), Some(err)) => format!("{p}/{}", err.code),
                    (Some(p), None) => p.clone(),
                    _ => "?".into(),
                };
                *s.outcomes.entry(key).or_default() += 1;
            }
        }
    } else if topic.ends_with("/state") {
        if let Ok(st) = DeviceState::from_json(payload) {
            s.seqs.push((now, st.seq, "state"));
            let v = st.active.as_ref().map_or("none".to_string(), |a| format!("{}@{}", a.name, a.version));
            if s.versions.last().is_none_or(|(_, last)| *last != v) {
                s.versions.push((now, v));
            }
            if s.state.as_ref().is_none_or(|old| old.seq <= st.seq) {
                s.state = Some(st);
            }
        }
    } else if topic.ends_with("/telemetry")
        && let Ok(t) = serde_json::from_slice::<Value>(payload)
    {
        s.journal_dropped = s.journal_dropped.max(t["mqtt"]["journal_dropped"].as_u64().unwrap_or(0));
    }
}

fn note_restart(seen: &Arc<Mutex<BTreeMap<String, Seen>>>, device: &str, now: Duration) {
    if let Ok(mut s) = seen.lock() {
        s.entry(device.to_string()).or_default().restarts.push(now);
    }
}

fn note_broker(seen: &Arc<Mutex<BTreeMap<String, Seen>>>, now: Duration) {
    if let Ok(mut s) = seen.lock() {
        for x in s.values_mut() {
            x.restarts.push(now);
        }
    }
}

/// Invariant 5. Events must arrive in increasing `seq` (a repeat of a seq
/// already seen is an at-least-once duplicate); a gap between two messages
/// (events and states share the counter) needs a restart or broker outage
/// near it (states are not journaled while offline, and a crash skips
/// ahead), or counted journal drops.
fn check_seqs(seen: &Arc<Mutex<BTreeMap<String, Seen>>>, violations: &mut Violations) -> (usize, usize) {
    let Ok(seen) = seen.lock() else { return (0, 0) };
    let (mut explained, mut dups) = (0, 0);
    for (device, s) in seen.iter() {
        let mut seen_seqs = std::collections::HashSet::new();
        let mut last_event = 0u64;
        let mut last: Option<(Duration, u64)> = None;
        for (at, seq, what) in &s.seqs {
            if !seen_seqs.insert(*seq) {
                dups += 1;
                continue;
            }
            if *what == "event" {
                if *seq < last_event {
                    violations.add(
                        "5 events in seq order, gaps explained",
                        format!("{device}: event seq {seq} after {last_event} at {:.1} s", at.as_secs_f64()),
                    );
                }
                last_event = last_event.max(*seq);
            }
            if let Some((t_prev, prev)) = last
                && *seq > prev + 1
            {
                let near = |r: &Duration| *r + Duration::from_secs(2) >= t_prev && *r <= *at + Duration::from_secs(1);
                if s.restarts.iter().any(near) || s.journal_dropped > 0 {
                    explained += 1;
                } else {
                    violations.add(
                        "5 events in seq order, gaps explained",
                        format!(
                            "{device}: seq {prev} then {seq} ({:.1} s to {:.1} s) with no restart, outage or drop",
                            t_prev.as_secs_f64(),
                            at.as_secs_f64()
                        ),
                    );
                }
            }
            if last.is_none_or(|(_, p)| *seq > p) {
                last = Some((*at, *seq));
            }
        }
    }
    (explained, dups)
}

fn verify_store(data: &Path) -> Result<usize, String> {
    let store = outpost_agent::deploy::store::Store::open(data).map_err(|e| e.to_string())?;
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(data.join("versions")) else { return Ok(0) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        store.verify_version(&name).map_err(|err| format!("stored version {name}: {err}"))?;
        n += 1;
    }
    Ok(n)
}

fn print_report(r: &Value) {
    println!("\nfaults injected ({}):", r["faults_total"]);
    if let Some(m) = r["faults"].as_object() {
        for (k, v) in m {
            println!("  {v:>4}  {k}");
        }
    }
    println!("deployment outcomes (final events, all devices):");
    if let Some(m) = r["outcomes"].as_object() {
        for (k, v) in m {
            println!("  {v:>4}  {k}");
        }
    }
    println!("invariants:");
    for i in r["invariants"].as_array().into_iter().flatten() {
        let held = i["held"].as_bool().unwrap_or(false);
        println!("  {}  {}", if held { "held  " } else { "BROKEN" }, i["invariant"].as_str().unwrap_or_default());
        for v in i["violations"].as_array().into_iter().flatten() {
            println!("          {}", v.as_str().unwrap_or_default());
        }
    }
    for d in r["final"].as_array().into_iter().flatten() {
        println!("  {}: serving {}, last {}", d["device"].as_str().unwrap_or_default(), d["active"], d["last"]);
    }
    println!(
        "settled: {} ({:.1} s after the end), {} probes, {} stored versions re-verified, seq gaps explained {}, duplicates {}",
        r["settled"],
        r["settled_after_s"].as_f64().unwrap_or(0.0),
        r["probes"],
        r["versions_verified"],
        r["seq"]["gaps_explained"],
        r["seq"]["duplicates"]
    );
    println!("{}", if r["ok"].as_bool().unwrap_or(false) { "chaos: every invariant held" } else { "chaos: FAILED" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_every_kind_appears() {
        let d = Duration::from_secs(60);
        let a = schedule(7, d, 3);
        assert_eq!(a, schedule(7, d, 3));
        assert_ne!(fingerprint(&a), fingerprint(&schedule(8, d, 3)));
        let kinds: std::collections::BTreeSet<&str> = a.iter().map(|(_, f)| f.kind()).collect();
        assert!(kinds.len() >= 8, "{kinds:?}");
        assert!(a.iter().all(|(t, _)| *t < d - quiet(d)));
    }
}
