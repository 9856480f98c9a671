//! `outpost-sim fleet`: N agents in this process — the agent library itself,
//! each with its own MQTT session, device id, store directory and state —
//! against a broker (Mosquitto by URL, or the embedded one), receiving one
//! group deployment from a registry with a fault mix: flaky downloads,
//! devices that start late, devices that go offline mid-deployment.

use crate::operator::{Operator, deployment};
use crate::registry::{RegisterSpec, register, splitmix, unit};
use outpost_agent::link::BrokerUrl;
use outpost_protocol::{DeploymentEvent, Phase, Topics};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod hosts;
mod rollout;
pub use hosts::{DEVICES_PER_PROCESS, worker};
pub use rollout::{Candidate, Requests, RolloutOutcome, RolloutSpec};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub devices: usize,
    /// A broker to use (Mosquitto in the benchmark); None: the embedded one,
    /// or a Mosquitto of its own with `mosquitto`.
    pub broker: Option<BrokerUrl>,
    /// Without `broker`: start a Mosquitto for the run (its open-file limit
    /// raised with this process's, no connection limit) and report its memory and CPU.
    pub mosquitto: bool,
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
    /// Processes the agents run in: 1, this one; more, worker processes of
    /// `outpost-sim` (this executable) that the fleet drives; 0: one per
    /// [`DEVICES_PER_PROCESS`] devices.
    pub processes: usize,
    /// Once every device is active: roll version 2 out to the group under load.
    pub rollout: Option<RolloutSpec>,
}

impl Default for FleetSpec {
    fn default() -> FleetSpec {
        FleetSpec {
            devices: 100,
            broker: None,
            mosquitto: false,
            flaky: 0.1,
            late: 0.05,
            offline: 0.05,
            model: None,
            timeout: Duration::from_secs(120),
            work_dir: None,
            seed: 1,
            progress: false,
            processes: 1,
            rollout: None,
        }
    }
}

/// The outcome, as printed and as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetReport {
    pub devices: usize,
    /// Processes the agents ran in (1: the fleet's own).
    pub processes: usize,
    pub broker: String,
    pub active: usize,
    pub failed: usize,
    /// Seconds from publishing the group deployment to the first device
    /// active, and to 50 / 90 / 99 / 100 % of the devices active.
    pub t_first_s: Option<f64>,
    pub t50_s: Option<f64>,
    pub t90_s: Option<f64>,
    pub t99_s: Option<f64>,
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
    /// This process's RSS once the last device is active (or at the timeout).
    pub rss_after_mb: f64,
    pub rss_per_device_kb: f64,
    /// Its peak RSS (VmHWM) and the most threads it ran at once.
    pub peak_rss_mb: f64,
    pub peak_threads: u64,
    /// CPU seconds of this process (every simulated device, the registry and the observer).
    pub cpu_s: f64,
    /// The open-file limit the run had (raised to fit the devices).
    pub open_files_limit: u64,
    /// The Mosquitto this run started (`mosquitto`): its memory and CPU.
    pub mosquitto: Option<BrokerFigures>,
    /// The rollout of version 2 ([`FleetSpec::rollout`]), or why it could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_error: Option<String>,
    /// Seconds from publishing to each device's activation, sorted (the
    /// activation curve; not in the JSON, which stays a summary).
    #[serde(skip)]
    pub active_at_s: Vec<f64>,
    /// The same for the devices that ended failed.
    #[serde(skip)]
    pub failed_at_s: Vec<f64>,
}

/// What the broker process cost, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BrokerFigures {
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
    pub cpu_s: f64,
}

impl FleetReport {
    /// Every device active, and the rollout (if one was asked for) ended as
    /// its candidate should with no failed request.
    pub fn succeeded(&self) -> bool {
        self.active == self.devices
            && self.rollout_error.is_none()
            && self.rollout.as_ref().is_none_or(|r| r.as_expected(self.devices))
    }

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
    went_offline: bool,
}

/// A field of /proc/PID/status (`VmHWM`, `Threads`): its number (kB for sizes).
fn proc_status(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.split_whitespace().next()?.parse().ok()
}

/// utime + stime of a process, in seconds (Linux counts ticks of 1/100 s).
fn proc_cpu_s(pid: &str) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    });
    ticks.map_or(0.0, |t| t as f64 / 100.0)
}

/// Memory and CPU of another process (the broker).
fn broker_figures(pid: u32) -> BrokerFigures {
    let pid = pid.to_string();
    BrokerFigures {
        rss_mb: proc_status(&pid, "VmRSS").map_or(0.0, |kb| kb as f64 / 1000.0),
        peak_rss_mb: proc_status(&pid, "VmHWM").map_or(0.0, |kb| kb as f64 / 1000.0),
        cpu_s: proc_cpu_s(&pid),
    }
}

/// What the fleet's processes (this one and its workers) hold together.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_mb: f64,
    peak_rss_mb: f64,
    threads: u64,
    cpu_s: f64,
}

fn usage(workers: &[u32]) -> Usage {
    let mut u = Usage::default();
    for pid in std::iter::once("self".to_string()).chain(workers.iter().map(u32::to_string)) {
        u.rss_mb += proc_status(&pid, "VmRSS").map_or(0.0, |kb| kb as f64 / 1000.0);
        u.peak_rss_mb += proc_status(&pid, "VmHWM").map_or(0.0, |kb| kb as f64 / 1000.0);
        u.threads += proc_status(&pid, "Threads").unwrap_or(0);
        u.cpu_s += proc_cpu_s(&pid);
    }
    u
}

/// Raises the open-file limit to `want` if it is lower: each device holds
/// an MQTT connection and, while it downloads, an HTTP connection whose
/// both ends are in this process (the registry runs here too). The hard
/// limit is raised too where the process may (root); otherwise the soft
/// limit goes up to the hard one. Returns the limit in force.
fn raise_open_files(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= want {
        return current;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let raised = Rlimit { current: Some(want), maximum: Some(hard.max(want)) };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(hard.min(want)), maximum: now.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A Mosquitto started for the run, stopped when dropped.
struct Mosquitto {
    child: std::process::Child,
    url: BrokerUrl,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Mosquitto on a free port of 127.0.0.1 with no connection limit;
/// it inherits this process's open-file limit.
fn start_mosquitto(dir: &std::path::Path) -> Result<Mosquitto, String> {
    let port = crate::broker::free_port().map_err(|e| format!("no free port: {e}"))?;
    let conf = dir.join("mosquitto.conf");
    let text = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nset_tcp_nodelay true\nlog_dest none\n"
    );
    std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
    // Debian installs it in /usr/sbin, which a user's PATH may not hold.
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("mosquitto");
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?;
    let mosquitto = Mosquitto { child, url: BrokerUrl { host: "127.0.0.1".into(), port, tls: false } };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("mosquitto did not listen on port {port} within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(mosquitto)
}

/// Runs the simulation; Err only when it cannot be set up (or a worker
/// process cannot be driven).
///
/// Every simulated agent holds a blocking thread while it deploys (its
/// pipeline waits for its deployer, which persists on another blocking
/// thread): the runtime must allow more blocking threads than devices
/// (`outpost-sim`'s allows 8192; tokio's default of 512 deadlocks a fleet
/// of more than about 500 devices).
pub async fn run(spec: FleetSpec) -> Result<FleetReport, String> {
    let open_files_limit = raise_open_files(spec.devices as u64 * 4 + 1024);
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
        runtime: None,
    };
    let registered = tokio::task::spawn_blocking(move || register(&spec_reg)).await.map_err(|e| e.to_string())??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("registry: {e}"))?;
    let registry_url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    let faulted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(crate::registry::serve_http_flaky(registry.clone(), listener, spec.flaky, spec.seed, faulted.clone()));

    let mosquitto = match (&spec.broker, spec.mosquitto) {
        (None, true) => Some(start_mosquitto(scratch.path())?),
        _ => None,
    };
    let broker = match (&spec.broker, &mosquitto) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => m.url.clone(),
        (None, None) => {
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
                went_offline: false,
            }
        })
        .collect();
    let index: BTreeMap<String, usize> = devices.iter().enumerate().map(|(i, d)| (d.id.clone(), i)).collect();
    let processes = match spec.processes {
        0 => spec.devices.div_ceil(DEVICES_PER_PROCESS).max(1),
        n => n,
    };
    let exe = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    let mut hosts = hosts::Hosts::new(processes, &exe, &group, &broker, &stores)?;
    let workers = hosts.pids();
    let before = usage(&workers);

    // Start everyone but the late ones, and wait until they are online.
    let started = Instant::now();
    let upfront = devices.iter().filter(|d| !matches!(d.role, Role::Late(_))).count();
    for (i, d) in devices.iter().enumerate().filter(|(_, d)| !matches!(d.role, Role::Late(_))) {
        hosts.start(i, &d.id)?;
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
    // Devices that ended (active or failed), kept as a count: counting them
    // at every message costs O(devices) each, which a 10,000-device fleet's
    // ~200,000 messages cannot afford.
    let mut ended = 0usize;
    let mut peak_threads = 0u64;
    while ended < spec.devices && t0.elapsed() < spec.timeout {
        while late.first().is_some_and(|(after, _)| t0.elapsed() >= *after) {
            let (_, i) = late.remove(0);
            hosts.start(i, &devices[i].id)?;
        }
        let mut postponed = Vec::new();
        while restarts.first().is_some_and(|(at, _)| Instant::now() >= *at) {
            let (_, i) = restarts.remove(0);
            // A device comes back once its previous run has ended, as a real
            // one does: two runs on one store would race on its record (the
            // old run's install marker read by the new one as a crash).
            if hosts.running(&devices[i].id) {
                postponed.push((Instant::now() + Duration::from_millis(200), i));
                continue;
            }
            hosts.start(i, &devices[i].id)?;
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
                ended += usize::from(devices[i].seen < Seen::Active);
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
                    ended += usize::from(dev.seen < Seen::Active && now >= Seen::Active);
                    dev.seen = now;
                }
                // An offline device drops off the network as soon as it starts downloading.
                if dev.role == Role::Offline && now == Seen::Downloading && !dev.went_offline {
                    dev.went_offline = true;
                    hosts.stop(i, &dev.id)?;
                    restarts.push((Instant::now() + Duration::from_secs(3), i));
                    restarts.sort();
                }
            }
        }
        if last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            peak_threads = peak_threads.max(usage(&workers).threads);
            if let Some(p) = progress.as_mut() {
                let (active, text) = progress_counts(&devices);
                p.update(active, &text);
            }
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
    let after = usage(&workers);
    let mosquitto_figures = mosquitto.as_ref().map(|m| broker_figures(m.child.id()));
    let mut report = FleetReport {
        devices: spec.devices,
        processes,
        broker: broker.to_string(),
        active: times.len(),
        failed: devices.iter().filter(|d| d.seen == Seen::Failed).count(),
        t_first_s: times.first().copied(),
        t50_s: at(0.5),
        t90_s: at(0.9),
        t99_s: at(0.99),
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
        rss_before_mb: before.rss_mb,
        rss_after_mb: after.rss_mb,
        rss_per_device_kb: (after.rss_mb - before.rss_mb).max(0.0) * 1000.0 / spec.devices.max(1) as f64,
        peak_rss_mb: after.peak_rss_mb,
        peak_threads: peak_threads.max(after.threads),
        cpu_s: after.cpu_s - before.cpu_s,
        open_files_limit,
        mosquitto: mosquitto_figures,
        rollout: None,
        rollout_error: None,
        active_at_s: times.clone(),
        failed_at_s: {
            let failed = devices.iter().filter(|d| d.seen == Seen::Failed).filter_map(|d| d.failed_at);
            let mut t: Vec<f64> = failed.map(|t| t.as_secs_f64()).collect();
            t.sort_by(f64::total_cmp);
            t
        },
    };
    if let Some(r) = &spec.rollout {
        if report.active < spec.devices {
            report.rollout_error = Some(format!("not run: {} of {} devices active", report.active, spec.devices));
        } else {
            let converged = rollout::Converged {
                observer: &mut observer,
                broker: &broker,
                registry: &registry,
                registry_url: &registry_url,
                scratch: scratch.path(),
                group: &group,
                model: "fleet-model",
                v1: &d.deployment_id,
                devices: devices.iter().map(|d| d.id.clone()).collect(),
                run_id,
                timeout: spec.timeout,
                progress: spec.progress,
            };
            match rollout::run(converged, r).await {
                Ok(outcome) => report.rollout = Some(outcome),
                Err(e) => report.rollout_error = Some(e),
            }
        }
    }
    // Stop the agents (each says `offline` and records its clean stop),
    // wait for them, then drop the scratch directory. (10,000 agents
    // stopping at once take a while on two cores.)
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(30) + Duration::from_millis(10) * spec.devices as u32;
    hosts.finish(deadline).await;
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
        let hosts = match self.processes {
            1 => "one process".to_string(),
            n => format!("{n} worker processes"),
        };
        writeln!(f, "fleet of {} devices ({hosts}) against {}", self.devices, self.broker)?;
        writeln!(f, "  connected (up-front devices):  {:.2} s", self.connect_s)?;
        writeln!(f, "  active:                        {} of {} ({} failed)", self.active, self.devices, self.failed)?;
        writeln!(
            f,
            "  time to first / 50% / 90% / 99% / 100%: {} / {} / {} / {} / {}",
            t(self.t_first_s),
            t(self.t50_s),
            t(self.t90_s),
            t(self.t99_s),
            t(self.t100_s)
        )?;
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
            "  memory (the fleet's processes): {:.0} MB -> {:.0} MB RSS ({:.0} KB per device; peak {:.0} MB, {} threads at most)",
            self.rss_before_mb, self.rss_after_mb, self.rss_per_device_kb, self.peak_rss_mb, self.peak_threads
        )?;
        if let Some(m) = &self.mosquitto {
            writeln!(
                f,
                "  Mosquitto:                     {:.0} MB RSS (peak {:.0} MB, {:.0} KB per device), {:.1} s CPU",
                m.rss_mb,
                m.peak_rss_mb,
                m.peak_rss_mb * 1000.0 / self.devices.max(1) as f64,
                m.cpu_s
            )?;
        }
        write!(f, "  CPU:                           {:.1} s (open-file limit {})", self.cpu_s, self.open_files_limit)?;
        if let Some(r) = &self.rollout {
            write!(f, "\n{r}")?;
        }
        if let Some(e) = &self.rollout_error {
            write!(f, "\nrollout: {e}")?;
        }
        Ok(())
    }
}
