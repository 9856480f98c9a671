//! `outpost-sim bench`: Outpost side by side with its floors and its peers,
//! in one run on one machine, every figure also as a ratio. Real processes:
//! Mosquitto, the `outpost` binary, Azure ML's inference server (when set up
//! with simulator/bench/setup_peer.sh), onnxruntime in Python. Writes a JSON
//! file, a Markdown report and an SVG timeline of the hot swap under load.

use crate::operator::{Operator, deployment};
use crate::registry::{RegisterSpec, register};
use outpost_agent::link::BrokerUrl;
use outpost_protocol::{DeploymentEvent, Phase, Topics};
use rumqttc::QoS;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// The agent binary (a release build: `cargo build --release`).
    pub agent: PathBuf,
    /// Fewer requests and shorter phases: a smoke run of a few seconds.
    pub quick: bool,
    /// Markdown report; the JSON and the SVG go next to it.
    pub report: PathBuf,
    /// The Python of the peer's virtualenv (simulator/bench/setup_peer.sh).
    pub peer_python: Option<PathBuf>,
    /// Where fixtures/make_large_models.py wrote the large models.
    pub large_models: PathBuf,
    /// The repository root (fixtures, scripts).
    pub root: PathBuf,
    /// An earlier build of the agent to measure side by side (section 9).
    pub baseline_agent: Option<PathBuf>,
    /// Run only these sections (see [`SECTIONS`]) and print their report
    /// instead of writing the whole one; empty: everything.
    pub only: Vec<String>,
    /// libonnxruntime.so for the agent (section 7 measures both engines);
    /// default: the one in the peer's virtualenv.
    pub onnxruntime_library: Option<PathBuf>,
}

/// The ONNX Runtime library of a virtualenv with the `onnxruntime` wheel
/// (`VENV/lib/python3.X/site-packages/onnxruntime/capi/libonnxruntime.so.VERSION`).
pub fn venv_onnxruntime_library(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib")).ok()?.flatten().find_map(|python| {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        std::fs::read_dir(capi)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so.")))
    })
}

/// The library the bench gives the agent, if any.
fn onnxruntime_library(spec: &BenchSpec) -> Option<PathBuf> {
    spec.onnxruntime_library.clone().filter(|p| p.is_file()).or_else(|| {
        let python = spec.peer_python.clone().unwrap_or_else(|| spec.root.join("simulator/bench/.venv/bin/python"));
        venv_onnxruntime_library(python.parent()?.parent()?)
    })
}

/// The sections `--only` can pick: `http` (1, with wrk), `mqtt` (2 and 2b,
/// the default and the tuned Mosquitto), `swap` (3, and its SVG),
/// `detector` (7: the convnet on both engines).
pub const SECTIONS: &[&str] = &["http", "mqtt", "swap", "detector"];

/// Latency figures of one series, in microseconds, and its throughput.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Series {
    pub n: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub per_s: f64,
    pub failed: usize,
}

fn series(mut lat: Vec<Duration>, wall: Duration, failed: usize) -> Series {
    if lat.is_empty() {
        return Series { failed, ..Default::default() };
    }
    lat.sort();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    let mean = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / lat.len() as f64 * 1e6;
    Series {
        n: lat.len(),
        p50_us: round(q(0.5)),
        p99_us: round(q(0.99)),
        mean_us: round(mean),
        per_s: round(lat.len() as f64 / wall.as_secs_f64().max(1e-9)),
        failed,
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process started in its own process group, which is killed whole on
/// drop: gunicorn's workers outlive a killed master otherwise.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    crate::broker::free_port().map_err(|e| e.to_string())
}

fn wait_port(port: u16, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nothing listens on 127.0.0.1:{port} after {within:?}"))
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// RSS of a process and all its descendants (gunicorn's master and workers), in KiB.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut total = memory_kb(pid).0;
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        total += tree_rss_kb(c);
    }
    total
}

/// The status of a GET on a new connection (None: no answer).
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(tcp).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A minimal HTTP/1.1 client: keep-alive when the server allows it,
/// reconnecting when it closes (as gunicorn's sync workers do). The same
/// client measures every server.
struct Http {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(port: u16) -> Http {
        Http { port, conn: None }
    }

    fn post(&mut self, path: &str, headers: &[(&str, String)], body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        for attempt in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                self.conn = Some(BufReader::new(s));
            }
            match self.exchange(path, headers, body) {
                Ok(r) => return Ok(r),
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => self.conn = None,
            }
        }
        Err("unreachable".into())
    }

    fn exchange(&mut self, path: &str, headers: &[(&str, String)], body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let s = conn.get_mut();
        s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).map_err(|e| e.to_string())?;
        let mut line = String::new();
        conn.read_line(&mut line).map_err(|e| e.to_string())?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
        let (mut len, mut close) = (0usize, false);
        loop {
            line.clear();
            conn.read_line(&mut line).map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut out = vec![0u8; len];
        conn.read_exact(&mut out).map_err(|e| e.to_string())?;
        if close {
            self.conn = None;
        }
        Ok((status, out))
    }
}

/// `n` requests from each of `clients` threads; latencies, wall time, failures.
fn load(port: u16, path: &str, body: &[u8], n: usize, clients: usize) -> Series {
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (path, body) = (path.to_string(), body.to_vec());
            std::thread::spawn(move || {
                let mut c = Http::new(port);
                let mut lat = Vec::with_capacity(n);
                let mut failed = 0;
                for _ in 0..n {
                    let t = Instant::now();
                    match c.post(&path, &[], &body) {
                        Ok((200, _)) => lat.push(t.elapsed()),
                        _ => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut lat, mut failed) = (Vec::new(), 0);
    for h in handles {
        if let Ok((l, f)) = h.join() {
            lat.extend(l);
            failed += f;
        }
    }
    series(lat, started.elapsed(), failed)
}

fn digits_body(rows: usize) -> (Vec<f32>, Vec<u8>) {
    let pixels: Vec<f32> = (0..rows * 64).map(|i| ((i * 7) % 17) as f32).collect();
    let body = json!({"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": pixels}]});
    (pixels, serde_json::to_vec(&body).unwrap_or_default())
}

/// The model run in-process by tract, as the floor: load, optimise, run `n` times.
fn tract_floor(model: &Path, shape: &[usize], n: usize) -> Result<(Series, Duration), String> {
    use tract_onnx::prelude::*;
    let t = Instant::now();
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| format!("{}: {e}", model.display()))?;
    let load = t.elapsed();
    let count: usize = shape.iter().product();
    let input: Tensor = tract_ndarray::Array::from_shape_vec(shape, (0..count).map(|i| (i % 17) as f32).collect())
        .map_err(|e| e.to_string())?
        .into();
    for _ in 0..n.min(20) {
        plan.run(tvec!(input.clone().into())).map_err(|e| e.to_string())?;
    }
    let started = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        plan.run(tvec!(input.clone().into())).map_err(|e| e.to_string())?;
        lat.push(t.elapsed());
    }
    Ok((series(lat, started.elapsed(), 0), load))
}

struct Lab {
    broker: BrokerUrl,
    _mosquitto: Proc,
    registry_url: String,
    registry: PathBuf,
    op: Operator,
    revision: u64,
}

impl Lab {
    /// Publishes a deployment to `device` and waits for its final event.
    async fn deploy(&mut self, device: &str, name: &str, version: &str) -> Result<(DeploymentEvent, Duration), String> {
        self.deploy_with(device, name, version, None).await
    }

    /// The same with a probation window (`Some(0)`: none).
    async fn deploy_with(
        &mut self,
        device: &str,
        name: &str,
        version: &str,
        probation_s: Option<u64>,
    ) -> Result<(DeploymentEvent, Duration), String> {
        let t = Instant::now();
        let ev = self.publish_and_wait(device, name, version, probation_s, |p| p.is_final()).await?;
        if ev.phase != Phase::Active {
            return Err(format!("{name}@{version}: {}", ev.summary()));
        }
        Ok((ev, t.elapsed()))
    }

    /// Publishes a deployment of `name@version` (registered) to `device` and
    /// waits until it reaches `phase`.
    async fn deploy_until(&mut self, device: &str, name: &str, version: &str, phase: Phase) -> Result<(), String> {
        self.publish_and_wait(device, name, version, None, |p| p == phase).await.map(|_| ())
    }

    /// Publishes a deployment (a new revision) and returns its first event
    /// whose phase satisfies `until`, within 120 s.
    async fn publish_and_wait(
        &mut self,
        device: &str,
        name: &str,
        version: &str,
        probation_s: Option<u64>,
        until: impl Fn(Phase) -> bool,
    ) -> Result<DeploymentEvent, String> {
        let (url, sha) = crate::operator::resolve_manifest(&self.registry_url, name, version).await?;
        self.revision += 1;
        let mut d = deployment(name, version, &url, &sha, None, None);
        // The bench swaps back and forth between versions on purpose.
        d.policy.allow_downgrade = Some(true);
        if let Some(seconds) = probation_s {
            d.policy.probation = Some(outpost_protocol::Probation { seconds: Some(seconds), ..Default::default() });
        }
        d.revision = self.revision;
        d.deployment_id = format!("bench-{name}-{version}-{}", self.revision);
        self.op.publish(&Topics::default().device_desired(device), d.to_json(), true).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let Some(m) = self.op.next(Duration::from_millis(100)).await else { continue };
            if let Ok(ev) = DeploymentEvent::from_json(&m.payload)
                && ev.deployment_id == d.deployment_id
                && until(ev.phase)
            {
                return Ok(ev);
            }
        }
        Err(format!("{name}@{version} on {device}: the awaited event did not come within 120 s"))
    }
}

fn start_mosquitto() -> Result<(Proc, u16), String> {
    start_mosquitto_with(true)
}

/// Mosquitto with `set_tcp_nodelay true` (tuned) or its defaults: Mosquitto
/// 2.0 delays small packets (Nagle) unless told not to.
fn start_mosquitto_with(nodelay: bool) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let conf = std::env::temp_dir().join(format!("outpost-bench-mosquitto-{port}.conf"));
    let tuning = if nodelay { "set_tcp_nodelay true\n" } else { "" };
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\n{tuning}"))
        .map_err(|e| e.to_string())?;
    let child = Command::new("mosquitto")
        .args(["-c", &conf.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mosquitto: {e} (apt-get install mosquitto)"))?;
    let p = Proc(child);
    wait_port(port, Duration::from_secs(10))?;
    Ok((p, port))
}

/// Starts `bin` as `device` and returns when its HTTP port listens (and,
/// with `notify`, systemd's notify socket is passed).
fn start_device(
    bin: &Path,
    broker: u16,
    data: &Path,
    device: &str,
    notify: Option<&Path>,
) -> Result<(Proc, u16), String> {
    let http = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--broker", &format!("mqtt://127.0.0.1:{broker}"), "--device", device])
        .args(["--data-dir", &data.display().to_string(), "--http-bind", &format!("127.0.0.1:{http}")])
        .env("OUTPOST_LOG", "warn")
        .env_remove("OUTPOST_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    let child = cmd.spawn().map_err(|e| format!("{}: {e} (cargo build --release)", bin.display()))?;
    let p = Proc(child);
    wait_port(http, Duration::from_secs(30))?;
    Ok((p, http))
}

fn start_agent(spec: &BenchSpec, broker: u16, data: &Path) -> Result<(Proc, u16), String> {
    let http = free_port()?;
    let mut cmd = Command::new(&spec.agent);
    cmd.args(["run", "--broker", &format!("mqtt://127.0.0.1:{broker}"), "--device", "bench"]).args([
        "--data-dir",
        &data.display().to_string(),
        "--http-bind",
        &format!("127.0.0.1:{http}"),
    ]);
    if let Some(lib) = onnxruntime_library(spec) {
        cmd.args(["--set", &format!("runtime.onnxruntime_library={}", lib.display())]);
    }
    let child = cmd
        .env("OUTPOST_LOG", "warn")
        .env_remove("OUTPOST_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e} (cargo build --release)", spec.agent.display()))?;
    let p = Proc(child);
    wait_port(http, Duration::from_secs(30))?;
    Ok((p, http))
}

/// What `outpost --version` says: the version and optional features
/// (`multithread`) of the binary measured.
fn agent_version(agent: &Path) -> String {
    Command::new(agent)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs every section; sections whose prerequisites are missing (the peer,
/// the large models) are reported as skipped with the command that enables them.
pub async fn run(spec: BenchSpec) -> Result<Value, String> {
    let n = if spec.quick { 200 } else { 3000 };
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut results = json!({
        "machine": machine(),
        "agent_binary": spec.agent.display().to_string(),
        "agent_version": agent_version(&spec.agent),
        "quick": spec.quick,
    });
    let mut skipped: Vec<String> = Vec::new();

    // Registry: digits v1 (MLP) and v2 (CNN), and the large models when present.
    let registry = work.path().join("registry");
    let fixtures = spec.root.join("fixtures");
    let reg = |model: PathBuf, name: &str, version: &str| RegisterSpec {
        model,
        name: name.into(),
        version: version.into(),
        registry: registry.clone(),
        labels: None,
        sample: None,
        shapes: Vec::new(),
        tolerance: 1e-3,
        top_k: 0,
        scale: None,
        runtime: None,
    };
    let mut specs = vec![
        reg(fixtures.join("digits-mlp.onnx"), "digits", "1"),
        reg(fixtures.join("digits-cnn.onnx"), "digits", "2"),
        // The same model under another version: a swap that changes nothing
        // but puts it on probation (section 3b).
        reg(fixtures.join("digits-mlp.onnx"), "digits", "3"),
    ];
    let dense = spec.large_models.join("dense-10mb.onnx");
    let detector = spec.large_models.join("detector-480x640.onnx");
    if dense.is_file() {
        specs.push(reg(dense.clone(), "dense", "1"));
    }
    let library = onnxruntime_library(&spec);
    if let Some(lib) = &library {
        outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
            default: outpost_protocol::Runtime::Auto,
            onnxruntime_library: Some(lib.clone()),
        });
    }
    if detector.is_file() {
        // 1: the agent's choice (auto); 2: tract; 3: onnxruntime (section 7).
        specs.push(reg(detector.clone(), "detector", "1"));
        specs.push(RegisterSpec {
            runtime: Some(outpost_protocol::Runtime::Tract),
            ..reg(detector.clone(), "detector", "2")
        });
        if library.is_some() {
            specs.push(RegisterSpec {
                runtime: Some(outpost_protocol::Runtime::Onnxruntime),
                ..reg(detector.clone(), "detector", "3")
            });
        }
    }
    if library.is_none() {
        skipped.push(
            "onnxruntime in the agent (section 7): run simulator/bench/setup_peer.sh, or pass --onnxruntime-library"
                .into(),
        );
    }
    if !dense.is_file() || !detector.is_file() {
        skipped.push(format!(
            "large models: run `python3 fixtures/make_large_models.py {}` (needs numpy and onnx)",
            spec.large_models.display()
        ));
    }
    tokio::task::spawn_blocking(move || specs.iter().map(register).collect::<Result<Vec<_>, _>>())
        .await
        .map_err(|e| e.to_string())??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let registry_url = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(crate::registry::serve_http(registry.clone(), listener));

    let (mosquitto, mqtt_port) = start_mosquitto()?;
    let broker = BrokerUrl { host: "127.0.0.1".into(), port: mqtt_port, tls: false };
    let mut op = Operator::connect(&broker, "bench-operator", Topics::default()).await?;
    op.subscribe("outpost/devices/bench/events").await?;
    let mut lab = Lab { broker, _mosquitto: mosquitto, registry_url, registry, op, revision: 0 };

    let data = work.path().join("agent");
    let (agent, http) = start_agent(&spec, mqtt_port, &data)?;
    let pid = agent.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kb = memory_kb(pid).0;
    if !spec.only.is_empty() {
        return only(&spec, &mut lab, http, skipped, results).await;
    }

    // 4. Deployment latency, split; the same files fetched plainly and the model loaded by tract as the baseline.
    let mut phases = crate::progress::Phases::new("bench");
    phases.start("deployment latency");
    let mut deployments = Vec::new();
    let mut cases = vec![("digits", "1", fixtures.join("digits-mlp.onnx"), vec![1usize, 64])];
    if dense.is_file() {
        cases.push(("dense", "1", dense.clone(), vec![1, 1600]));
    }
    let mut rss_serving_kb = 0;
    for (name, version, model, shape) in &cases {
        let (ev, wall) = lab.deploy("bench", name, version).await?;
        if rss_serving_kb == 0 {
            // Serving digits alone (the larger model deployed next stays loaded
            // during its replacement's probation window): after some traffic.
            let (_, body) = digits_body(1);
            let _ = load(http, "/v2/models/digits/infer", &body, 500, 1);
            rss_serving_kb = memory_kb(pid).0;
        }
        let baseline = baseline_download_and_load(&lab, name, version, model, shape).await?;
        let t = ev.timings_ms.unwrap_or_default();
        deployments.push(json!({
            "model": format!("{name}@{version}"), "fresh": true,
            "wall_ms": round(wall.as_secs_f64() * 1e3), "timings_ms": t,
            "baseline_download_ms": baseline.0, "baseline_tract_load_ms": baseline.1,
            "ratio_vs_baseline": round2((wall.as_secs_f64() * 1e3) / (baseline.0 + baseline.1)),
        }));
    }
    // Without probation: the figures below are the steady state (section 3b
    // measures serving on probation).
    let (ev, wall) = lab.deploy_with("bench", "digits", "1", Some(0)).await?;
    deployments.push(json!({
        "model": "digits@1", "fresh": false, "wall_ms": round(wall.as_secs_f64() * 1e3),
        "timings_ms": ev.timings_ms.unwrap_or_default(),
    }));
    results["deployment"] = Value::Array(deployments);

    // 1. Local HTTP scoring, against tract in-process and the peer.
    phases.start("HTTP scoring");
    let (scoring, peer_rss_kb) = http_scoring(&spec, &lab, http, n, &mut skipped).await?;
    results["http_scoring"] = scoring;
    let (_, body) = digits_body(1);

    // 3b. Serving on probation against off probation, the same model.
    phases.start("probation cost");
    results["probation"] = probation_cost(&mut lab, http, &body, n).await?;

    // 9. (here, before the fleet loads the broker) The hostile-world limits: their cost against a baseline build, and
    // the start with a hostile deployment pending.
    phases.start("limits and start-up");
    results["hardening"] = hardening(&mut lab, &spec, &fixtures, if spec.quick { 200 } else { 3000 }).await?;
    if spec.baseline_agent.is_none() {
        skipped
            .push("the limits against a baseline build: pass --baseline-agent PATH (an earlier release build)".into());
    }

    // 2. MQTT round trip through Mosquitto, against a bare echo client.
    phases.start("MQTT round trip");
    results["mqtt"] = mqtt_round_trips(&lab.broker, if spec.quick { 100 } else { 1000 }).await?;
    // 2b. The same on a Mosquitto with its defaults and on a tuned one.
    results["mqtt_brokers"] = mqtt_brokers(&lab, &spec, if spec.quick { 50 } else { 1000 }).await?;

    // 3. Hot swap under load.
    phases.start("hot swap under load");
    let (swap, timeline) = swap_under_load(&mut lab, http, if spec.quick { 4 } else { 16 }).await?;
    results["swap_under_load"] = swap;
    let (rss_now, hwm) = memory_kb(pid);

    // 5. Footprint.
    let binary = std::fs::metadata(&spec.agent).map(|m| m.len()).unwrap_or(0);
    results["footprint"] = json!({
        "binary_bytes": binary, "rss_idle_no_model_kb": rss_idle_kb, "rss_serving_digits_kb": rss_serving_kb,
        "rss_after_swaps_kb": rss_now, "rss_peak_kb": hwm, "peer_rss_kb": peer_rss_kb,
        "peer_rss_over_outpost_serving": peer_rss_kb.map(|p| round2(p as f64 / rss_serving_kb.max(1) as f64)),
    });

    // 7. A detector-sized model, end to end, against tract and onnxruntime in-process.
    if detector.is_file() {
        phases.start("detector 480x640");
        results["detector"] = detector_bench(&mut lab, http, &detector, &spec, if spec.quick { 3 } else { 30 }).await?;
    }
    drop(agent);

    // 8. A fleet on the same Mosquitto: every device converges.
    phases.start("fleet");
    let fleet = crate::fleet::run(crate::fleet::FleetSpec {
        devices: if spec.quick { 20 } else { 1000 },
        broker: Some(lab.broker.clone()),
        flaky: 0.1,
        late: 0.05,
        offline: 0.05,
        model: Some(fixtures.join("digits-mlp.onnx")),
        timeout: Duration::from_secs(120),
        work_dir: None,
        seed: 1,
        progress: false,
        ..Default::default()
    })
    .await?;
    results["fleet"] = serde_json::to_value(&fleet).unwrap_or_default();
    let fleet_svg = spec.report.with_file_name("bench-fleet-activation.svg");
    std::fs::write(&fleet_svg, fleet.activation_svg()?).map_err(|e| format!("{}: {e}", fleet_svg.display()))?;
    results["fleet"]["svg"] = json!(fleet_svg.file_name().map(|n| n.to_string_lossy().into_owned()));

    // 6. sha256: the agent's code against sha256sum.
    phases.start("sha256");
    results["sha256"] = sha256_bench(work.path(), if spec.quick { 20 } else { 200 })?;
    phases.finish();

    results["skipped"] = json!(skipped);
    let json_path = spec.report.with_extension("json");
    let svg_path = spec.report.with_file_name("bench-swap-timeline.svg");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results).unwrap_or_default() + "\n")
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    std::fs::write(&svg_path, timeline_svg(&timeline)?).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    std::fs::write(&spec.report, markdown(&results, &svg_path))
        .map_err(|e| format!("{}: {e}", spec.report.display()))?;
    Ok(results)
}

/// Section 1: our client against the agent, the agent's engine in-process,
/// tract in-process, the peer; wrk against the agent and the peer.
async fn http_scoring(
    spec: &BenchSpec,
    lab: &Lab,
    http: u16,
    n: usize,
    skipped: &mut Vec<String>,
) -> Result<(Value, Option<u64>), String> {
    let fixtures = spec.root.join("fixtures");
    let (_, body) = digits_body(1);
    let path = "/v2/models/digits/infer";
    let seq = load(http, path, &body, n, 1);
    let conc = load(http, path, &body, n / 2, 2);
    let (floor, _) = tract_floor(&fixtures.join("digits-mlp.onnx"), &[1, 64], n)?;
    let engine = engine_in_process(&lab.registry, &body, n).await?;
    let mut scoring = json!({"outpost_sequential": seq, "outpost_2_clients": conc, "tract_in_process": floor,
        "outpost_engine_in_process": engine});
    scoring["http_transport_us"] = json!(round(seq.p50_us - engine.p50_us));
    scoring["json_and_engine_us"] = json!(round(engine.p50_us - floor.p50_us));
    scoring["outpost_p50_minus_floor_us"] = json!(round(seq.p50_us - floor.p50_us));
    let mut peer_rss_kb = None;
    match peer(spec, &fixtures.join("digits-mlp.onnx"), n)? {
        Some((pseq, pconc, rss, peer_wrk)) => {
            scoring["peer_p50_over_outpost"] = json!(round2(pseq.p50_us / seq.p50_us));
            scoring["outpost_throughput_over_peer"] = json!(round2(seq.per_s / pseq.per_s.max(1e-9)));
            scoring["outpost_2_clients_throughput_over_peer"] = json!(round2(conc.per_s / pconc.per_s.max(1e-9)));
            scoring["peer_sequential"] = json!(pseq);
            scoring["peer_2_clients"] = json!(pconc);
            peer_rss_kb = Some(rss);
            scoring["peer_wrk"] = peer_wrk;
        }
        None => skipped.push(
            "Azure ML inference server: run `simulator/bench/setup_peer.sh` (creates simulator/bench/.venv)".into(),
        ),
    }
    let seconds = if spec.quick { 2 } else { 10 };
    match wrk_pair(http, "/v2/models/digits/infer", &body, seconds) {
        Ok(Some(w)) => scoring["outpost_wrk"] = w,
        Ok(None) => skipped.push(WRK_MISSING.into()),
        Err(e) => skipped.push(format!("wrk against outpost: {e}")),
    }
    Ok((scoring, peer_rss_kb))
}

/// Section 7: the detector on each engine, beside the engines in-process.
fn section_detector(r: &Value) -> String {
    let Some(d) = r.get("detector") else { return String::new() };
    let (f, row) = (cell, latency_row);
    let threads = f(&d["onnxruntime_threads"]);
    let mut md = String::from(
        "## 7. A detector-sized convnet on both engines (480×640, binary tensors over HTTP)\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n",
    );
    md.push_str(&row("outpost, model.runtime = onnxruntime, over HTTP", &d["outpost_http_onnxruntime"]));
    md.push_str(&row("outpost, model.runtime = tract, over HTTP", &d["outpost_http"]));
    md.push_str(&row("tract in-process", &d["tract_in_process"]));
    let auto = &d["auto_backend"];
    md.push_str(&format!(
        "\nonnxruntime in-process (Python) p50 with the agent's {threads} thread(s) per request: {} ms; with its defaults (every core, spinning): {} ms (the first in alternating rounds of 5 requests with the agent on onnxruntime, the second after them).\n\n\
         - **outpost on onnxruntime / onnxruntime in-process: {}** (goal ≤ 1.15)\n\
         - outpost on tract / outpost on onnxruntime: {}\n\
         - outpost on tract / tract in-process: {}\n\
         - `model.runtime = auto` chose **{}**: {} (golden sample: {})\n\n{}\n\n",
        f(&d["onnxruntime_in_process_p50_ms"]),
        f(&d["onnxruntime_in_process_default_threads_p50_ms"]),
        f(&d["outpost_onnxruntime_over_onnxruntime"]),
        f(&d["tract_over_outpost_onnxruntime"]),
        f(&d["outpost_over_tract"]),
        f(&auto["runtime"]),
        f(&auto["reason"]),
        f(&auto["golden_ms"]),
        if r["agent_version"].as_str().is_some_and(|v| v.contains("multithread")) {
            "The agent is built with `multithread`: its deployment timed the golden sample on one thread and on every core and kept the faster; tract in-process runs on one thread."
        } else {
            "tract runs each request on one thread (the agent is built without `multithread`, as packaged); onnxruntime's threads per request are what the deployment measured as faster on the golden sample (one, or every core)."
        },
    ));
    md
}

const WRK_MISSING: &str =
    "wrk: not installed (`apt-get install wrk`); the HTTP figures are this benchmark's client only";

/// `--only`: digits@1 deployed, then the sections asked for; prints their
/// report (and writes the swap timeline next to the report when asked).
async fn only(
    spec: &BenchSpec,
    lab: &mut Lab,
    http: u16,
    mut skipped: Vec<String>,
    mut results: Value,
) -> Result<Value, String> {
    for s in &spec.only {
        if !SECTIONS.contains(&s.as_str()) {
            return Err(format!("--only {s}: expected one of {}", SECTIONS.join(", ")));
        }
    }
    let n = if spec.quick { 200 } else { 3000 };
    lab.deploy_with("bench", "digits", "1", Some(0)).await?;
    let want = |s: &str| spec.only.iter().any(|o| o == s);
    let mut md = String::new();
    if want("http") {
        eprintln!("[bench] HTTP scoring (with wrk)");
        results["http_scoring"] = http_scoring(spec, lab, http, n, &mut skipped).await?.0;
        md.push_str(&section_http(&results));
    }
    if want("mqtt") {
        eprintln!("[bench] MQTT round trips");
        results["mqtt"] = mqtt_round_trips(&lab.broker, if spec.quick { 100 } else { 1000 }).await?;
        results["mqtt_brokers"] = mqtt_brokers(lab, spec, if spec.quick { 50 } else { 1000 }).await?;
        md.push_str(&section_mqtt(&results));
    }
    if want("swap") {
        eprintln!("[bench] hot swap under load");
        let (swap, timeline) = swap_under_load(lab, http, if spec.quick { 4 } else { 16 }).await?;
        results["swap_under_load"] = swap;
        let svg_path = spec.report.with_file_name("bench-swap-timeline.svg");
        std::fs::write(&svg_path, timeline_svg(&timeline)?).map_err(|e| format!("{}: {e}", svg_path.display()))?;
        md.push_str(&section_swap(&results, &svg_path));
    }
    if want("detector") {
        let detector = spec.large_models.join("detector-480x640.onnx");
        if detector.is_file() {
            eprintln!("[bench] detector on both engines");
            results["detector"] = detector_bench(lab, http, &detector, spec, if spec.quick { 3 } else { 30 }).await?;
            md.push_str(&section_detector(&results));
        } else {
            skipped
                .push(format!("detector: run `python3 fixtures/make_large_models.py {}`", spec.large_models.display()));
        }
    }
    results["skipped"] = json!(skipped);
    if !skipped.is_empty() {
        md.push_str("## Skipped\n\n");
        for s in &skipped {
            md.push_str(&format!("- {s}\n"));
        }
        md.push('\n');
    }
    println!("{md}```json\n{}\n```", serde_json::to_string_pretty(&results).unwrap_or_default());
    Ok(results)
}

/// Throughput and latency of the same model (digits@1 and digits@3 are the
/// same file) while it is on probation and while it is not, alternated so
/// the machine's noise falls on both: off (digits@1, no probation), on
/// (digits@3 replacing it, 600 s window), three times each, 2 clients.
async fn probation_cost(lab: &mut Lab, http: u16, body: &[u8], n: usize) -> Result<Value, String> {
    let path = "/v2/models/digits/infer";
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        lab.deploy_with("bench", "digits", "1", Some(0)).await?;
        let _ = load(http, path, body, n / 10, 2);
        off.push(load(http, path, body, n, 2));
        let (ev, _) = lab.deploy_with("bench", "digits", "3", Some(600)).await?;
        if !ev.detail.as_deref().is_some_and(|d| d.contains("on probation")) {
            return Err(format!("digits@3 is not on probation: {}", ev.summary()));
        }
        let _ = load(http, path, body, n / 10, 2);
        on.push(load(http, path, body, n, 2));
    }
    // Back to the steady state for what follows.
    lab.deploy_with("bench", "digits", "1", Some(0)).await?;
    let median = |v: &[Series], f: fn(&Series) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let failed: usize = off.iter().chain(&on).map(|s| s.failed).sum();
    let (off_rps, on_rps) = (median(&off, |s| s.per_s), median(&on, |s| s.per_s));
    Ok(json!({
        "off_probation": off, "on_probation": on, "failed": failed,
        "off_per_s_median": round(off_rps), "on_per_s_median": round(on_rps),
        "on_over_off_throughput": round2(on_rps / off_rps.max(1e-9)),
        "on_over_off_p99": round2(median(&on, |s| s.p99_us) / median(&off, |s| s.p99_us).max(1e-9)),
    }))
}

/// Section 9. HTTP scoring of this agent and of a baseline build (one
/// from before the limits), each serving digits, alternated three times
/// so the machine's noise falls on both; then, for each binary, the time
/// from start to READY (systemd's notify socket) and to `/v2/health/ready`
/// with a hostile deployment pending: a minute-long MatMul chain
/// (`fixtures/hostile/slow-chain.onnx`) interrupted by a clean stop while
/// it validates, so the start resumes it.
async fn hardening(lab: &mut Lab, spec: &BenchSpec, fixtures: &Path, n: usize) -> Result<Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let broker = lab.broker.port;
    let path = "/v2/models/digits/infer";
    let (_, body) = digits_body(1);
    let mut out = json!({});
    let agents: Vec<(&str, PathBuf)> = std::iter::once(("this agent", spec.agent.clone()))
        .chain(spec.baseline_agent.clone().map(|b| ("baseline", b)))
        .collect();
    if agents.len() == 2 {
        let mut serving = Vec::new();
        for (i, (_, bin)) in agents.iter().enumerate() {
            let device = format!("limits-{i}");
            lab.op.subscribe(&format!("outpost/devices/{device}/events")).await?;
            let (p, port) = start_device(bin, broker, &work.path().join(&device), &device, None)?;
            lab.deploy_with(&device, "digits", "1", Some(0)).await?;
            serving.push((p, port));
        }
        let mut rounds: Vec<Vec<(Series, Series)>> = vec![Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (i, (_, port)) in serving.iter().enumerate() {
                let _ = load(*port, path, &body, n / 10, 1);
                rounds[i].push((load(*port, path, &body, n, 1), load(*port, path, &body, n / 2, 2)));
            }
        }
        let median = |v: &[(Series, Series)], f: &dyn Fn(&(Series, Series)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let p50 = |i: usize| median(&rounds[i], &|r| r.0.p50_us);
        let seq = |i: usize| median(&rounds[i], &|r| r.0.per_s);
        let two = |i: usize| median(&rounds[i], &|r| r.1.per_s);
        out["http"] = json!({
            "this_agent": rounds[0].iter().map(|r| json!({"sequential": r.0, "2_clients": r.1})).collect::<Vec<_>>(),
            "baseline": rounds[1].iter().map(|r| json!({"sequential": r.0, "2_clients": r.1})).collect::<Vec<_>>(),
            "p50_this_over_baseline": round2(p50(0) / p50(1).max(1e-9)),
            "throughput_this_over_baseline": round2(seq(0) / seq(1).max(1e-9)),
            "throughput_2_clients_this_over_baseline": round2(two(0) / two(1).max(1e-9)),
            "baseline_agent": spec.baseline_agent.as_ref().map(|b| b.display().to_string()),
        });
        drop(serving);
    }
    crate::registry::register_hostile(fixtures, "slow-chain", &lab.registry, "slow-chain", "1")?;
    let mut starts = Vec::new();
    for (i, (who, bin)) in agents.iter().enumerate() {
        let device = format!("ready-{i}");
        lab.op.subscribe(&format!("outpost/devices/{device}/events")).await?;
        let data = work.path().join(&device);
        let (p, _) = start_device(bin, broker, &data, &device, None)?;
        lab.deploy_with(&device, "digits", "1", Some(0)).await?;
        // Loading: the model's code starts (in a child for this agent, in
        // process for older builds); a second later the golden sample runs.
        lab.deploy_until(&device, "slow-chain", "1", Phase::Loading).await?;
        std::thread::sleep(Duration::from_secs(1));
        // A clean stop: the deployment stays pending and the start resumes it.
        let _ = Command::new("kill").args(["-TERM", &p.0.id().to_string()]).status();
        let mut p = p;
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let socket_path = work.path().join(format!("notify-{i}"));
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let (_p2, port) = start_device(bin, broker, &data, &device, Some(&socket_path))?;
        let listening = started.elapsed();
        let mut ready = None;
        let mut buf = [0u8; 4096];
        while ready.is_none() && started.elapsed() < Duration::from_secs(60) {
            if let Ok(n) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1")
            {
                ready = Some(started.elapsed());
            }
        }
        let mut health = None;
        while health.is_none() && started.elapsed() < Duration::from_secs(60) {
            let status = get_status(port, "/v2/health/ready");
            if status == Some(200) {
                health = Some(started.elapsed());
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let ms = |d: Option<Duration>| d.map(|d| round(d.as_secs_f64() * 1e3));
        starts.push(json!({"agent": who, "http_listening_ms": ms(Some(listening)), "ready_ms": ms(ready),
            "health_ready_ms": ms(health)}));
    }
    out["start_with_pending_hostile_deployment"] = json!(starts);
    Ok(out)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

/// The agent's own engine in this process, JSON request in and answer out,
/// no HTTP: splits the HTTP figure into transport and JSON + engine.
async fn engine_in_process(registry: &Path, body: &[u8], n: usize) -> Result<Series, String> {
    let dir = registry.join("digits").join("1");
    let bytes = std::fs::read(dir.join("manifest.json")).map_err(|e| e.to_string())?;
    let manifest = outpost_protocol::Manifest::from_json(&bytes).map_err(|e| e.to_string())?;
    let sha = crate::registry::sha256(&bytes);
    let mut model = outpost_agent::serve::model::Model::load(&dir, &manifest, &sha).map_err(|e| e.to_string())?;
    model.validate(&dir, &manifest).map_err(|e| e.to_string())?;
    let engine = outpost_agent::serve::Engine::new(2, 64);
    engine.swap(Some(std::sync::Arc::new(model)));
    for _ in 0..n.min(100) {
        let _ = engine.infer_body(body, None, outpost_agent::serve::Transport::Http).await;
    }
    let started = Instant::now();
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        let t = Instant::now();
        let answer = engine.infer_body(body, None, outpost_agent::serve::Transport::Http).await;
        match answer.result.map(|r| serde_json::to_vec(&r)) {
            Ok(Ok(_)) => lat.push(t.elapsed()),
            _ => failed += 1,
        }
    }
    Ok(series(lat, started.elapsed(), failed))
}

/// The bundle's files fetched with a plain HTTP client, and the model loaded by tract: (ms, ms).
async fn baseline_download_and_load(
    lab: &Lab,
    name: &str,
    version: &str,
    model: &Path,
    shape: &[usize],
) -> Result<(f64, f64), String> {
    let manifest: outpost_protocol::Manifest = serde_json::from_slice(
        &std::fs::read(lab.registry.join(name).join(version).join("manifest.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let base = format!("{}/{name}/{version}", lab.registry_url);
    let files: Vec<String> =
        std::iter::once("manifest.json".to_string()).chain(manifest.files.iter().map(|f| f.path.clone())).collect();
    let (model, shape) = (model.to_path_buf(), shape.to_vec());
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::new_with_defaults();
        let t = Instant::now();
        for f in &files {
            let mut body = agent.get(&format!("{base}/{f}")).call().map_err(|e| e.to_string())?.into_body();
            std::io::copy(&mut body.as_reader(), &mut std::io::sink()).map_err(|e| e.to_string())?;
        }
        let download = t.elapsed().as_secs_f64() * 1e3;
        let (_, load) = tract_floor(&model, &shape, 1)?;
        Ok((round(download), round(load.as_secs_f64() * 1e3)))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Azure ML's inference server on the same model: (sequential, 2 clients,
/// RSS KiB, wrk's figures or null).
fn peer(spec: &BenchSpec, model: &Path, n: usize) -> Result<Option<(Series, Series, u64, Value)>, String> {
    let python = match &spec.peer_python {
        Some(p) => p.clone(),
        None => spec.root.join("simulator/bench/.venv/bin/python"),
    };
    if !python.is_file() {
        return Ok(None);
    }
    let port = free_port()?;
    let dir = spec.root.join("simulator/bench/peer");
    let child = Command::new(&python)
        .arg(dir.join("run_peer.py"))
        .args(["--entry_script", &dir.join("score.py").display().to_string(), "--port", &port.to_string()])
        .env("OUTPOST_BENCH_MODEL", model)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let p = Group(child);
    wait_port(port, Duration::from_secs(60))?;
    let pixels: Vec<f32> = (0..64).map(|i| ((i * 7) % 17) as f32).collect();
    let body = serde_json::to_vec(&json!({"data": [pixels]})).unwrap_or_default();
    // Warm-up (the first request loads the session in the worker).
    let _ = load(port, "/score", &body, 20, 1);
    let seq = load(port, "/score", &body, n / 3, 1);
    let conc = load(port, "/score", &body, n / 6, 2);
    let rss = tree_rss_kb(p.0.id());
    let wrk = match wrk_pair(port, "/score", &body, if spec.quick { 2 } else { 10 }) {
        Ok(w) => w.unwrap_or(Value::Null),
        Err(e) => json!({"error": e}),
    };
    Ok(Some((seq, conc, rss, wrk)))
}

/// What wrk reports of one run (`--latency`).
#[derive(Debug, Clone, PartialEq)]
struct WrkOut {
    requests: u64,
    seconds: f64,
    per_s: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    /// Answers that were not 2xx or 3xx.
    non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    socket_errors: u64,
}

impl WrkOut {
    /// In the shape of this benchmark's own series (the same table rows).
    fn series(&self) -> Series {
        Series {
            n: self.requests as usize,
            p50_us: round(self.p50_us),
            p99_us: round(self.p99_us),
            mean_us: round(self.mean_us),
            per_s: round(self.per_s),
            failed: (self.non_2xx + self.socket_errors) as usize,
        }
    }
}

/// A wrk duration (`68.23us`, `1.23ms`, `1.02s`, `2.00m`, `1.00h`) in microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(num.parse::<f64>().ok()? * scale)
}

/// Parses the text wrk prints with `--latency`.
fn parse_wrk(out: &str) -> Result<WrkOut, String> {
    let mut w = WrkOut {
        requests: 0,
        seconds: 0.0,
        per_s: f64::NAN,
        mean_us: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        non_2xx: 0,
        socket_errors: 0,
    };
    let mut found_requests = false;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "Latency 3.72ms 2.50ms 9.19ms 54.10%" (not "Latency Distribution")
            ["Latency", avg, ..] if wrk_duration_us(avg).is_some() => {
                w.mean_us = wrk_duration_us(avg).unwrap_or(f64::NAN)
            }
            ["50%", v] => w.p50_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            ["99%", v] => w.p99_us = wrk_duration_us(v).unwrap_or(f64::NAN),
            ["Requests/sec:", v] => w.per_s = v.parse().unwrap_or(f64::NAN),
            [n, "requests", "in", t, ..] => {
                w.requests = n.parse().map_err(|_| format!("wrk: cannot read '{line}'"))?;
                w.seconds = wrk_duration_us(t.trim_end_matches(',')).unwrap_or(0.0) / 1e6;
                found_requests = true;
            }
            // "Non-2xx or 3xx responses: 593"
            ["Non-2xx", .., n] => w.non_2xx = n.parse().map_err(|_| format!("wrk: cannot read '{line}'"))?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                w.socket_errors = rest.iter().filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    if !found_requests || w.per_s.is_nan() || w.p50_us.is_nan() || w.p99_us.is_nan() {
        return Err(format!("wrk: unexpected output (was --latency given?):\n{out}"));
    }
    Ok(w)
}

/// wrk with one connection (sequential) and with two (one thread each),
/// `seconds` each, POSTing `body` as JSON to `path`. `None`: wrk is not installed.
fn wrk_pair(port: u16, path: &str, body: &[u8], seconds: u64) -> Result<Option<Value>, String> {
    if Command::new("wrk").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Ok(None);
    }
    let script =
        tempfile::Builder::new().prefix("outpost-bench-wrk").suffix(".lua").tempfile().map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(body);
    if body.contains("]==]") {
        return Err("the request body cannot be quoted for Lua".into());
    }
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut out = json!({});
    for (key, connections) in [("1_connection", 1), ("2_connections", 2)] {
        let c = connections.to_string();
        let run = Command::new("wrk")
            .args(["-t", &c, "-c", &c, "-d", &format!("{seconds}s"), "--latency", "-s"])
            .arg(script.path())
            .arg(&url)
            .output()
            .map_err(|e| format!("wrk: {e}"))?;
        let text = String::from_utf8_lossy(&run.stdout);
        if !run.status.success() {
            return Err(format!("wrk exited with {}: {}{text}", run.status, String::from_utf8_lossy(&run.stderr)));
        }
        out[key] = json!(parse_wrk(&text)?.series());
    }
    Ok(Some(out))
}

/// Request → prediction through Mosquitto vs a bare echo client on the same broker.
async fn mqtt_round_trips(broker: &BrokerUrl, n: usize) -> Result<Value, String> {
    let topics = Topics::default();
    let mut client = Operator::connect(broker, "bench-mqtt-client", topics.clone()).await?;
    client.subscribe(&topics.predictions("bench")).await?;
    client.subscribe("bench/echo/resp").await?;
    // The echo peer: a bare client answering on the same broker.
    let mut echo = Operator::connect(broker, "bench-echo", topics.clone()).await?;
    echo.subscribe("bench/echo/req").await?;
    let echo_task = tokio::spawn(async move {
        while let Some(m) = echo.next(Duration::from_secs(30)).await {
            if echo.publish("bench/echo/resp", m.payload.to_vec(), false).await.is_err() {
                break;
            }
        }
    });
    let (_, body) = digits_body(1);
    let q1 = QoS::AtLeastOnce;
    let agent = round_trips(&mut client, &topics.infer("bench"), "/predictions", &body, n, q1).await?;
    let echo_rtt = round_trips(&mut client, "bench/echo/req", "/resp", &body, n, q1).await?;
    echo_task.abort();
    Ok(json!({
        "agent": agent, "echo": echo_rtt,
        "agent_p50_over_echo": round2(agent.p50_us / echo_rtt.p50_us.max(1e-9)),
    }))
}

/// Section 2b: the inference round trip through a Mosquitto with its
/// defaults (no `set_tcp_nodelay`) and through a tuned one, requests at
/// QoS 0 and at QoS 1 (the client subscribes at the same QoS), beside a
/// bare echo client on the same broker answering at the request's QoS.
/// Also which QoS the agent answers a QoS 0 request with (seen by a client
/// subscribed at QoS 1).
async fn mqtt_brokers(lab: &Lab, spec: &BenchSpec, n: usize) -> Result<Value, String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let topics = Topics::default();
    let (_, body) = digits_body(1);
    let mut out = json!({"requests_per_series": n});
    for (name, nodelay) in [("default", false), ("tuned", true)] {
        let (mosquitto, port) = start_mosquitto_with(nodelay)?;
        let broker = BrokerUrl { host: "127.0.0.1".into(), port, tls: false };
        let device = format!("rtt-{name}");
        let mut op = Operator::connect(&broker, &format!("bench-rtt-operator-{name}"), topics.clone()).await?;
        op.subscribe(&format!("outpost/devices/{device}/events")).await?;
        let (agent, _) = start_device(&spec.agent, port, &work.path().join(&device), &device, None)?;
        let mut lab = Lab {
            broker: broker.clone(),
            _mosquitto: mosquitto,
            registry_url: lab.registry_url.clone(),
            registry: lab.registry.clone(),
            op,
            revision: 0,
        };
        lab.deploy_with(&device, "digits", "1", Some(0)).await?;
        // The echo peer answers at the QoS each request came with.
        let mut echo = Operator::connect(&broker, &format!("bench-rtt-echo-{name}"), topics.clone()).await?;
        echo.subscribe("bench/echo/req").await?;
        let echo_task = tokio::spawn(async move {
            while let Some(m) = echo.next(Duration::from_secs(60)).await {
                if echo.client.publish("bench/echo/resp", m.qos, false, m.payload.to_vec()).await.is_err() {
                    break;
                }
            }
        });
        let mut by_qos = json!({});
        for (key, qos) in [("qos0", QoS::AtMostOnce), ("qos1", QoS::AtLeastOnce)] {
            let mut client = Operator::connect(&broker, &format!("bench-rtt-{name}-{key}"), topics.clone()).await?;
            client.subscribe_with(&topics.predictions(&device), qos).await?;
            client.subscribe_with("bench/echo/resp", qos).await?;
            let infer = topics.infer(&device);
            let _ = round_trips(&mut client, &infer, "/predictions", &body, n.min(20), qos).await?;
            let agent_rtt = round_trips(&mut client, &infer, "/predictions", &body, n, qos).await?;
            let _ = round_trips(&mut client, "bench/echo/req", "/resp", &body, n.min(20), qos).await?;
            let echo_rtt = round_trips(&mut client, "bench/echo/req", "/resp", &body, n, qos).await?;
            by_qos[key] = json!({
                "agent": agent_rtt, "echo": echo_rtt,
                "agent_p50_over_echo": round2(agent_rtt.p50_us / echo_rtt.p50_us.max(1e-9)),
            });
            client.disconnect().await;
        }
        if nodelay {
            out["answer_qos_to_a_qos0_request"] = json!(answer_qos(&broker, &topics, &device, &body).await?);
        }
        echo_task.abort();
        out[name] = by_qos;
        drop(agent);
    }
    out["agent_default_over_tuned_qos0_p50"] = json!(round2(
        num(&out["default"]["qos0"]["agent"]["p50_us"]) / num(&out["tuned"]["qos0"]["agent"]["p50_us"]).max(1e-9)
    ));
    Ok(out)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The QoS of the agent's answer to a QoS 0 request, as a client subscribed
/// at QoS 1 receives it (the broker delivers at the lower of the two).
async fn answer_qos(broker: &BrokerUrl, topics: &Topics, device: &str, body: &[u8]) -> Result<u8, String> {
    let mut client = Operator::connect(broker, "bench-rtt-answer-qos", topics.clone()).await?;
    client.subscribe_with(&topics.predictions(device), QoS::AtLeastOnce).await?;
    let mut req: Value = serde_json::from_slice(body).unwrap_or_default();
    req["id"] = json!("qos-probe");
    let payload = serde_json::to_vec(&req).unwrap_or_default();
    client.client.publish(topics.infer(device), QoS::AtMostOnce, false, payload).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(m) = client.next(Duration::from_millis(200)).await
            && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["id"] == json!("qos-probe"))
        {
            client.disconnect().await;
            return Ok(m.qos as u8);
        }
    }
    Err("no answer to the QoS 0 probe within 10 s".into())
}

/// `n` sequential requests on `topic` published at `qos`, each waiting for
/// its answer on a topic ending with `want`.
async fn round_trips(
    client: &mut Operator,
    topic: &str,
    want: &str,
    body: &[u8],
    n: usize,
    qos: QoS,
) -> Result<Series, String> {
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let mut req: Value = serde_json::from_slice(body).unwrap_or_default();
        let id = format!("rtt-{i}");
        req["id"] = json!(id);
        let payload = serde_json::to_vec(&req).unwrap_or_default();
        let t = Instant::now();
        client.client.publish(topic, qos, false, payload).await.map_err(|e| e.to_string())?;
        loop {
            let m = client.next(Duration::from_secs(10)).await.ok_or("no answer within 10 s")?;
            if m.topic.ends_with(want)
                && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["id"] == json!(id))
            {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    Ok(series(lat, started.elapsed(), 0))
}

/// One request's record during the swap run: (seconds since start, latency, ok, version).
type Sample = (f64, Duration, bool, String);

/// HTTP load from two clients while the version is swapped every few seconds.
async fn swap_under_load(lab: &mut Lab, http: u16, seconds: u64) -> Result<(Value, Timeline), String> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let (_, body) = digits_body(1);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, body) = (stop.clone(), body.clone());
            std::thread::spawn(move || {
                let mut c = Http::new(http);
                let mut out: Vec<Sample> = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = c.post("/v2/models/digits/infer", &[], &body);
                    let version = match &r {
                        Ok((200, b)) => serde_json::from_slice::<Value>(b)
                            .ok()
                            .and_then(|v| v["model_version"].as_str().map(str::to_string))
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    out.push((t.duration_since(t0).as_secs_f64(), t.elapsed(), matches!(r, Ok((200, _))), version));
                }
                out
            })
        })
        .collect();
    let period = Duration::from_millis(if seconds <= 4 { 1000 } else { 3000 });
    let mut windows: Vec<(f64, f64)> = Vec::new();
    let mut next = "2";
    tokio::time::sleep(period).await;
    while t0.elapsed() + period < Duration::from_secs(seconds) {
        let start = t0.elapsed().as_secs_f64();
        lab.deploy("bench", "digits", next).await?;
        windows.push((start, t0.elapsed().as_secs_f64() + 0.2));
        next = if next == "2" { "1" } else { "2" };
        tokio::time::sleep(period).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut samples: Vec<Sample> = Vec::new();
    for c in clients {
        samples.extend(c.join().unwrap_or_default());
    }
    let in_window = |t: f64| windows.iter().any(|(a, b)| t >= *a && t <= *b);
    let (inside, outside): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| in_window(s.0));
    let failed = samples.iter().filter(|s| !s.2).count();
    let wall = Duration::from_secs_f64(t0.elapsed().as_secs_f64());
    let lat = |v: &[&Sample]| v.iter().filter(|s| s.2).map(|s| s.1).collect::<Vec<_>>();
    let in_windows: f64 = windows.iter().map(|(a, b)| b - a).sum();
    let steady = series(lat(&outside), Duration::from_secs_f64((wall.as_secs_f64() - in_windows).max(1e-3)), 0);
    let swapping = series(lat(&inside), Duration::from_secs_f64(in_windows.max(1e-3)), 0);
    let value = json!({
        "seconds": round(wall.as_secs_f64()), "swaps": windows.len(), "requests": samples.len(), "failed": failed,
        "steady": steady, "in_swap_windows": swapping,
        "p99_swap_over_steady": round2(swapping.p99_us / steady.p99_us.max(1e-9)),
        "answers_by_version": samples.iter().fold(serde_json::Map::new(), |mut m, s| {
            let e = m.entry(if s.3.is_empty() { "error".to_string() } else { s.3.clone() }).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + 1);
            m
        }),
    });
    Ok((value, Timeline { samples, windows, seconds: wall.as_secs_f64() }))
}

struct Timeline {
    samples: Vec<Sample>,
    windows: Vec<(f64, f64)>,
    seconds: f64,
}

/// Latency (p50, p99) and throughput per 250 ms on their own axes, the
/// swap windows shaded, failures marked (crate::plot).
fn timeline_svg(t: &Timeline) -> Result<String, String> {
    let requests: Vec<crate::plot::Request> = t
        .samples
        .iter()
        .map(|s| crate::plot::Request { at_s: s.0, latency_ms: s.1.as_secs_f64() * 1e3, ok: s.2 })
        .collect();
    let title = format!(
        "Hot swap under load: digits@1 ⇄ digits@2, {} swaps in {:.0} s, 2 keep-alive HTTP clients",
        t.windows.len(),
        t.seconds
    );
    crate::plot::swap_timeline(&requests, &t.windows, t.seconds, &title)
}

/// The detector end to end (binary tensors over HTTP) on each engine of
/// the agent, against tract and onnxruntime in-process with the same
/// threads per request. The agent on onnxruntime and onnxruntime in Python
/// are measured in alternating rounds of 5 requests (this machine is
/// shared: noise falls on both alike).
async fn detector_bench(lab: &mut Lab, http: u16, model: &Path, spec: &BenchSpec, n: usize) -> Result<Value, String> {
    // The agent's own choice first (auto: both engines timed on the golden sample).
    let (auto, _) = lab.deploy("bench", "detector", "1").await?;
    lab.deploy("bench", "detector", "2").await?;
    let tract_http = tokio::task::spawn_blocking(move || {
        let mut c = Http::new(http);
        let _ = detector_requests(&mut c, 1);
        let started = Instant::now();
        let (lat, failed) = detector_requests(&mut c, n);
        series(lat, started.elapsed(), failed)
    })
    .await
    .map_err(|e| e.to_string())?;
    let (m, nn) = (model.to_path_buf(), n);
    let (floor, _) = tokio::task::spawn_blocking(move || tract_floor(&m, &[1, 3, 480, 640], nn))
        .await
        .map_err(|e| e.to_string())??;
    let mut out = json!({
        "outpost_http": tract_http, "tract_in_process": floor, "auto_backend": auto.backend,
        "outpost_over_tract": round2(tract_http.p50_us / floor.p50_us.max(1e-9)),
    });
    let onnxruntime = match lab.deploy("bench", "detector", "3").await {
        Ok((ev, _)) => ev.backend.filter(|b| b.runtime == "onnxruntime"),
        Err(_) => None,
    };
    let Some(backend) = onnxruntime else { return Ok(out) };
    let threads = backend.threads;
    let (python, model) = (peer_python(spec), model.to_path_buf());
    let rounds = (n * 3 / 5).max(1);
    let measured = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let mut same = PythonOnnxruntime::start(&python, &model, Some(threads))?;
        let mut c = Http::new(http);
        let _ = detector_requests(&mut c, 3);
        let (mut agent, mut failed, mut py) = (Vec::new(), 0, Vec::new());
        let started = Instant::now();
        for _ in 0..rounds {
            let (lat, f) = detector_requests(&mut c, 5);
            agent.extend(lat);
            failed += f;
            py.extend(same.run(5)?);
        }
        let wall = started.elapsed();
        drop(same);
        // Its defaults spin idle threads after each run: measured apart, so
        // they take no core from the rounds above.
        let mut default = PythonOnnxruntime::start(&python, &model, None)?;
        let py_default = default.run(rounds * 5)?;
        Ok((series(agent, wall, failed), series(py, wall, 0), series(py_default, wall, 0)))
    })
    .await
    .map_err(|e| e.to_string())?;
    match measured {
        Ok((agent, py, py_default)) => {
            out["outpost_http_onnxruntime"] = json!(agent);
            out["onnxruntime_in_process"] = json!(py);
            out["onnxruntime_in_process_default_threads"] = json!(py_default);
            out["onnxruntime_in_process_p50_ms"] = json!(round2(py.p50_us / 1e3));
            out["onnxruntime_in_process_default_threads_p50_ms"] = json!(round2(py_default.p50_us / 1e3));
            out["outpost_onnxruntime_over_onnxruntime"] = json!(round2(agent.p50_us / py.p50_us.max(1e-9)));
            out["outpost_over_onnxruntime"] = json!(round2(tract_http.p50_us / py.p50_us.max(1e-9)));
            out["tract_over_outpost_onnxruntime"] = json!(round2(tract_http.p50_us / agent.p50_us.max(1e-9)));
        }
        Err(e) => out["onnxruntime_in_process_error"] = json!(e),
    }
    out["onnxruntime_threads"] = json!(threads);
    Ok(out)
}

/// `n` detector requests over HTTP with binary tensors, one at a time:
/// their latencies and how many failed.
fn detector_requests(c: &mut Http, n: usize) -> (Vec<Duration>, usize) {
    let count = 3 * 480 * 640;
    let raw: Vec<u8> = (0..count).flat_map(|i| ((i % 17) as f32 / 17.0).to_le_bytes()).collect();
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "image", "shape": [1, 3, 480, 640], "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "boxes", "parameters": {"binary_data": true}}]
    }))
    .unwrap_or_default();
    let mut body = header.clone();
    body.extend_from_slice(&raw);
    let h = [("Inference-Header-Content-Length", header.len().to_string())];
    let (mut lat, mut failed) = (Vec::new(), 0);
    for _ in 0..n {
        let t = Instant::now();
        match c.post("/v2/models/detector/infer", &h, &body) {
            Ok((200, _)) => lat.push(t.elapsed()),
            _ => failed += 1,
        }
    }
    (lat, failed)
}

/// The peer virtualenv's Python (it has onnxruntime), else `python3`.
fn peer_python(spec: &BenchSpec) -> PathBuf {
    spec.peer_python
        .clone()
        .filter(|p| p.is_file())
        .or_else(|| Some(spec.root.join("simulator/bench/.venv/bin/python")).filter(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// onnxruntime in a Python process, on the detector's input: runs it on
/// demand and reports each run's time. `threads`: intra-op threads (idle
/// ones sleeping, as the agent sets them); `None`: its defaults (every
/// core, spinning).
struct PythonOnnxruntime {
    _child: Proc,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl PythonOnnxruntime {
    const SCRIPT: &str = "import sys, time, numpy as np, onnxruntime as ort\n\
        o = ort.SessionOptions()\n\
        t = int(sys.argv[2])\n\
        if t > 0:\n    o.intra_op_num_threads = t; o.inter_op_num_threads = 1; o.add_session_config_entry('session.intra_op.allow_spinning', '0')\n\
        s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n\
        x = (np.arange(3*480*640) % 17 / 17.0).astype(np.float32).reshape(1, 3, 480, 640)\n\
        name = s.get_inputs()[0].name\n\
        [s.run(None, {name: x}) for _ in range(3)]\n\
        print('ready', flush=True)\n\
        for line in sys.stdin:\n    out = []\n    for _ in range(int(line)):\n        a = time.perf_counter(); s.run(None, {name: x}); out.append(time.perf_counter() - a)\n    print(' '.join(map(str, out)), flush=True)\n";

    fn start(python: &Path, model: &Path, threads: Option<usize>) -> Result<PythonOnnxruntime, String> {
        let mut child = Command::new(python)
            .args(["-c", Self::SCRIPT, &model.display().to_string(), &threads.unwrap_or(0).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, std::io::BufReader::new(o)),
            _ => return Err("python: no pipes".into()),
        };
        let mut p = PythonOnnxruntime { _child: Proc(child), stdin, stdout };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut p.stdout, &mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!(
                "onnxruntime in {}: did not start (numpy and onnxruntime installed?)",
                python.display()
            ));
        }
        Ok(p)
    }

    fn run(&mut self, n: usize) -> Result<Vec<Duration>, String> {
        writeln!(self.stdin, "{n}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line).map_err(|e| e.to_string())?;
        line.split_whitespace()
            .map(|s| s.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string()))
            .collect()
    }
}

/// sha256 of a file: the agent's code (as used on downloads) vs `sha256sum`.
fn sha256_bench(dir: &Path, mb: usize) -> Result<Value, String> {
    let path = dir.join("sha256-bench.bin");
    {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..mb {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&block).map_err(|e| e.to_string())?;
        }
    }
    // Warm the page cache for both.
    let _ = outpost_agent::deploy::store::sha256_file(&path);
    let t = Instant::now();
    let (ours, _) = outpost_agent::deploy::store::sha256_file(&path).map_err(|e| e.to_string())?;
    let agent = t.elapsed();
    let t = Instant::now();
    let out = Command::new("sha256sum").arg(&path).output().map_err(|e| format!("sha256sum: {e}"))?;
    let tool = t.elapsed();
    let theirs = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string();
    let _ = std::fs::remove_file(&path);
    let mbs = |d: Duration| round(mb as f64 / d.as_secs_f64());
    Ok(json!({
        "megabytes": mb, "agent_mb_s": mbs(agent), "sha256sum_mb_s": mbs(tool),
        "agent_over_sha256sum": round2(tool.as_secs_f64() / agent.as_secs_f64()),
        "digests_agree": ours == theirs,
    }))
}

/// The goals of issue 7 (and the footprint targets of issue 6), each met or
/// missed by how much, from this run's figures.
fn goals(r: &Value) -> String {
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    let num = |v: &Value| v.as_f64();
    let mut check = |goal: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool, show: &dyn Fn(f64) -> String| {
        rows.push((goal.to_string(), value.map(show).unwrap_or_else(|| "not measured".into()), value.map(ok)));
    };
    let s = &r["http_scoring"];
    check("HTTP p50 ≤ 1/10 of the peer's", num(&s["peer_p50_over_outpost"]), &|x| x >= 10.0, &|x| {
        format!("peer p50 is {x}x outpost's")
    });
    check(
        "HTTP p50 within 100 µs of tract in-process",
        num(&s["outpost_p50_minus_floor_us"]),
        &|x| x <= 100.0,
        &|x| format!("{x} µs above the floor"),
    );
    check("HTTP throughput ≥ 10x the peer's", num(&s["outpost_throughput_over_peer"]), &|x| x >= 10.0, &|x| {
        format!("{x}x sequential")
    });
    check("MQTT p50 ≤ 1.5x the echo client's", num(&r["mqtt"]["agent_p50_over_echo"]), &|x| x <= 1.5, &|x| {
        format!("{x}x")
    });
    let w = &r["swap_under_load"];
    check("no failed request through the swaps", num(&w["failed"]), &|x| x == 0.0, &|x| format!("{x} failed"));
    check("p99 in swap windows ≤ 2x steady", num(&w["p99_swap_over_steady"]), &|x| x <= 2.0, &|x| format!("{x}x"));
    check(
        "throughput on probation ≥ 0.9x off probation",
        num(&r["probation"]["on_over_off_throughput"]),
        &|x| x >= 0.9,
        &|x| format!("{x}x"),
    );
    for d in r["deployment"].as_array().cloned().unwrap_or_default() {
        if d["fresh"] == json!(true) {
            let goal = format!("{}: deployment ≤ 1.2x (download + tract load)", d["model"].as_str().unwrap_or(""));
            check(&goal, num(&d["ratio_vs_baseline"]), &|x| x <= 1.2, &|x| format!("{x}x"));
        }
    }
    check("sha256 ≥ 0.9x sha256sum", num(&r["sha256"]["agent_over_sha256sum"]), &|x| x >= 0.9, &|x| format!("{x}x"));
    let fp = &r["footprint"];
    check("stripped binary ≤ 15 MB", num(&fp["binary_bytes"]), &|x| x <= 15e6, &|x| format!("{:.1} MB", x / 1e6));
    check("RSS serving digits ≤ 20 MB", num(&fp["rss_serving_digits_kb"]), &|x| x * 1024.0 <= 20e6, &|x| {
        format!("{:.1} MB", x * 1024.0 / 1e6)
    });
    let mut md = String::from("## Goals\n\n| goal | this run | met |\n|---|---|---|\n");
    for (goal, value, ok) in rows {
        let met = match ok {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        md.push_str(&format!("| {goal} | {value} | {met} |\n"));
    }
    md.push('\n');
    md
}

/// What bounds the figures that miss their goals, from this run's splits.
fn bounds(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().map(|x| format!("{x}")).unwrap_or_else(|| "-".into());
    let s = &r["http_scoring"];
    let mut md = String::from("## What bounds the misses\n\n");
    md.push_str(&format!(
        "- **HTTP scoring**: of outpost's {} µs p50, {} µs is HTTP itself (hyper's server and this benchmark's client over loopback, on the same 2 cores), {} µs is decoding the JSON request, admission, encoding the JSON answer (the agent's engine called in-process with the same body), and {} µs is the model. The peer pays Flask, gunicorn (a new connection per request) and Python's JSON on top of the same model.\n",
        f(&s["outpost_sequential"]["p50_us"]),
        f(&s["http_transport_us"]),
        f(&s["json_and_engine_us"]),
        f(&s["tract_in_process"]["p50_us"])
    ));
    md.push_str("- **MQTT round trip**: the echo client only forwards bytes; the agent decodes the request, runs the model and encodes the answer (the JSON + engine cost above) and hands the answer to its publisher task, which also keeps the outage journal.\n");
    md.push_str("- **Deployment latency**: the baseline only reads the bytes and loads the model once. The agent writes every file to disk while hashing it, fsyncs it and the version directory, records its state (fsync) before announcing `active`, loads the model twice when the batch is dynamic (the symbolic plan and a batch-1 plan for one-sample requests), and runs the golden sample: see the columns of section 4. The fsyncs are the price of surviving a power cut at any instant.\n");
    md.push_str("- **Binary size** (not measured by this run: from a release build with symbols, `cargo build --profile size-probe -p outpost-agent` then `nm --size-sort`): tract-core is about 3 MB of code, rustfft (a hard dependency of tract-core, with its AVX and SSE variants on x86_64) 1.4 MB, and the unwinding tables 2.2 MB (`size -A`: `.eh_frame`, its header, `.gcc_except_table`), kept on purpose: a model that makes tract panic is refused, it does not take the agent down. The optional multi-thread executor (`--features multithread`, rayon) adds about 3.2 MB.\n\n");
    md
}

const COMMANDS: &str = "## Reproduce\n\n```sh\napt-get install -y mosquitto wrk        # the broker; wrk, the load generator beside our client (section 1)\ncargo build --release                    # the agent measured\nsimulator/bench/setup_peer.sh            # Azure ML's inference server + onnxruntime in simulator/bench/.venv\npython3 fixtures/make_large_models.py    # detector-sized and 10 MB models (numpy, onnx)\ncargo run --release -p outpost-sim -- bench --baseline-agent target/outpost-baseline   # an earlier release build, for section 9\ncargo run --release -p outpost-sim -- fleet --devices 1000 --broker mqtt://127.0.0.1:1883 --svg fleet-activation.svg\ncargo run --release -p outpost-sim -- bench --only http,mqtt,swap   # those sections alone, printed\n```\n\n";

/// A figure of the JSON report as a table cell (`-` when missing).
fn cell(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// A table row of latency figures: p50, p99, requests/s, failed.
fn latency_row(name: &str, s: &Value) -> String {
    format!(
        "| {name} | {} | {} | {} | {} |\n",
        cell(&s["p50_us"]),
        cell(&s["p99_us"]),
        cell(&s["per_s"]),
        cell(&s["failed"])
    )
}

/// Section 1 of the report.
fn section_http(r: &Value) -> String {
    let (f, row) = (cell, latency_row);
    let mut md = String::new();
    let s = &r["http_scoring"];
    md.push_str("## 1. Local HTTP scoring (digits, Open Inference Protocol v2, keep-alive)\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n");
    md.push_str(&row("outpost, sequential (this benchmark's client)", &s["outpost_sequential"]));
    if let Some(w) = s.get("outpost_wrk") {
        md.push_str(&row("outpost, wrk, 1 connection", &w["1_connection"]));
    }
    md.push_str(&row("outpost, 2 clients (this benchmark's client)", &s["outpost_2_clients"]));
    if let Some(w) = s.get("outpost_wrk") {
        md.push_str(&row("outpost, wrk, 2 connections", &w["2_connections"]));
    }
    md.push_str(&row("outpost engine in-process, JSON in and out (no HTTP)", &s["outpost_engine_in_process"]));
    md.push_str(&row("tract in-process (floor)", &s["tract_in_process"]));
    if s.get("peer_sequential").is_some() {
        md.push_str(&row("Azure ML inference server, sequential", &s["peer_sequential"]));
        if let Some(w) = s.get("peer_wrk").filter(|w| w.is_object()) {
            md.push_str(&row("Azure ML inference server, wrk, 1 connection", &w["1_connection"]));
        }
        md.push_str(&row("Azure ML inference server, 2 clients", &s["peer_2_clients"]));
        if let Some(w) = s.get("peer_wrk").filter(|w| w.is_object()) {
            md.push_str(&row("Azure ML inference server, wrk, 2 connections", &w["2_connections"]));
        }
    }
    md.push_str(&format!(
        "\nWhere outpost's p50 goes: HTTP transport (client and server) {} µs, JSON decoding and encoding + engine {} µs, the model {} µs.\n",
        f(&s["http_transport_us"]),
        f(&s["json_and_engine_us"]),
        f(&s["tract_in_process"]["p50_us"])
    ));
    md.push_str(&format!(
        "\noutpost p50 − floor p50: {} µs; peer p50 / outpost p50: {}; outpost throughput / peer: {} sequential, {} with 2 clients.\n\n",
        f(&s["outpost_p50_minus_floor_us"]),
        f(&s["peer_p50_over_outpost"]),
        f(&s["outpost_throughput_over_peer"]),
        f(&s["outpost_2_clients_throughput_over_peer"])
    ));
    if let Some(w) = s.get("outpost_wrk") {
        md.push_str(&format!(
            "wrk (`wrk -t N -c N -d T --latency`, a Lua script POSTing the same JSON body) is the load generator users run; its figures sit beside this benchmark's client for the same target (its failed column: answers other than 2xx/3xx and socket errors). wrk req/s / our client's req/s: outpost {} with 1 connection, {} with 2{}.\n\n",
            ratio(&w["1_connection"]["per_s"], &s["outpost_sequential"]["per_s"]),
            ratio(&w["2_connections"]["per_s"], &s["outpost_2_clients"]["per_s"]),
            match s.get("peer_wrk").filter(|w| w.is_object()) {
                Some(p) => format!(
                    "; the peer {} and {}; outpost / peer under wrk: {} and {}",
                    ratio(&p["1_connection"]["per_s"], &s["peer_sequential"]["per_s"]),
                    ratio(&p["2_connections"]["per_s"], &s["peer_2_clients"]["per_s"]),
                    ratio(&w["1_connection"]["per_s"], &p["1_connection"]["per_s"]),
                    ratio(&w["2_connections"]["per_s"], &p["2_connections"]["per_s"])
                ),
                None => String::new(),
            }
        ));
    }
    md
}

/// Sections 2 and 2b of the report.
fn section_mqtt(r: &Value) -> String {
    let (f, row) = (cell, latency_row);
    let mut md = String::new();
    let m = &r["mqtt"];
    md.push_str("## 2. MQTT request → prediction through Mosquitto\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n");
    md.push_str(&row("outpost", &m["agent"]));
    md.push_str(&row("bare echo client (transport floor)", &m["echo"]));
    md.push_str(&format!("\noutpost p50 / echo p50: {}.\n\n", f(&m["agent_p50_over_echo"])));
    if let Some(b) = r.get("mqtt_brokers") {
        md.push_str(&format!(
            "## 2b. MQTT round trip on a default and on a tuned Mosquitto\n\nThe same request → prediction through a Mosquitto with its defaults and through one with `set_tcp_nodelay true` (Mosquitto 2.0 leaves Nagle's algorithm on otherwise), {} sequential requests per row, with this benchmark's client (rumqttc, TCP_NODELAY on its side) publishing at the QoS shown and subscribed at the same QoS; the echo client answers at the request's QoS.\n\n| broker | request QoS | outpost p50 µs | outpost p99 µs | echo p50 µs | echo p99 µs | outpost / echo p50 |\n|---|---|---|---|---|---|---|\n",
            f(&b["requests_per_series"])
        ));
        for (broker, label) in [("default", "defaults"), ("tuned", "`set_tcp_nodelay true`")] {
            for (key, q) in [("qos0", "0"), ("qos1", "1")] {
                let x = &b[broker][key];
                md.push_str(&format!(
                    "| {label} | {q} | {} | {} | {} | {} | {} |\n",
                    f(&x["agent"]["p50_us"]),
                    f(&x["agent"]["p99_us"]),
                    f(&x["echo"]["p50_us"]),
                    f(&x["echo"]["p99_us"]),
                    f(&x["agent_p50_over_echo"])
                ));
            }
        }
        md.push_str(&format!(
            "\nThe agent answered a QoS 0 request at QoS {} (a client subscribed at QoS 1 received it so). Default / tuned broker, outpost p50 at QoS 0: {}.\n\n",
            f(&b["answer_qos_to_a_qos0_request"]),
            f(&b["agent_default_over_tuned_qos0_p50"])
        ));
    }
    md
}

/// Section 3 of the report, its timeline at `svg`.
fn section_swap(r: &Value, svg: &Path) -> String {
    let (f, row) = (cell, latency_row);
    let mut md = String::new();
    let w = &r["swap_under_load"];
    md.push_str(&format!(
        "## 3. Hot swap under load\n\n{} swaps in {} s under 2 keep-alive clients: {} requests, {} failed, answers by version {}.\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n",
        f(&w["swaps"]),
        f(&w["seconds"]),
        f(&w["requests"]),
        f(&w["failed"]),
        w["answers_by_version"]
    ));
    md.push_str(&row("steady state", &w["steady"]));
    md.push_str(&row("inside swap windows", &w["in_swap_windows"]));
    md.push_str(&format!(
        "\np99 in swap windows / steady p99: {}.\n\n![timeline]({})\n\n",
        f(&w["p99_swap_over_steady"]),
        svg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    md
}

/// `a / b` to two decimals, "-" when either is missing.
fn ratio(a: &Value, b: &Value) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{}", round2(a / b)),
        _ => "-".into(),
    }
}

fn markdown(r: &Value, svg: &Path) -> String {
    let (f, row) = (cell, latency_row);
    let mut md = String::from("# Outpost benchmarks\n\n");
    md.push_str(&format!(
        "Generated by `outpost-sim bench` on {} ({} cores, {}), agent `{}` (`{}`){}.\n\n",
        f(&r["machine"]["date"]),
        f(&r["machine"]["cores"]),
        r["machine"]["cpu"].as_str().unwrap_or(""),
        r["agent_binary"].as_str().unwrap_or(""),
        r["agent_version"].as_str().unwrap_or(""),
        if r["quick"] == json!(true) { " — QUICK run (smoke, not figures)" } else { "" }
    ));
    md.push_str("Every figure comes from the same run on the same machine; ratios compare figures of that run.\n\n");
    md.push_str(&section_http(r));
    md.push_str(&section_mqtt(r));
    md.push_str(&section_swap(r, svg));
    let p = &r["probation"];
    md.push_str(&format!(
        "## 3b. Serving on probation\n\nThe same model (digits@1 and digits@3 are the same file) served off probation and on probation (digits@3 replacing digits@1 with a 600 s window), alternated three times, 2 keep-alive clients, {} failed requests. The HTTP scoring of section 1 runs off probation.\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n",
        f(&p["failed"])
    ));
    for (i, (off, on)) in p["off_probation"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .zip(p["on_probation"].as_array().cloned().unwrap_or_default().iter())
        .enumerate()
    {
        md.push_str(&row(&format!("off probation, round {}", i + 1), off));
        md.push_str(&row(&format!("on probation, round {}", i + 1), on));
    }
    md.push_str(&format!(
        "\nthroughput on / off probation (medians): {}; p99 on / off: {}.\n\n",
        f(&p["on_over_off_throughput"]),
        f(&p["on_over_off_p99"])
    ));
    md.push_str("## 4. Deployment latency (desired → active)\n\n| model | store | wall ms | download | verify | load | validate | activate | baseline download + tract load ms | ratio |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for d in r["deployment"].as_array().cloned().unwrap_or_default() {
        let t = &d["timings_ms"];
        let baseline = match (d["baseline_download_ms"].as_f64(), d["baseline_tract_load_ms"].as_f64()) {
            (Some(a), Some(b)) => format!("{a} + {b}"),
            _ => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            d["model"].as_str().unwrap_or(""),
            if d["fresh"] == json!(true) { "fresh" } else { "already stored" },
            f(&d["wall_ms"]),
            f(&t["download"]),
            f(&t["verify"]),
            f(&t["load"]),
            f(&t["validate"]),
            f(&t["activate"]),
            baseline,
            f(&d["ratio_vs_baseline"])
        ));
    }
    let fp = &r["footprint"];
    md.push_str(&format!(
        "\n## 5. Footprint\n\n| | outpost | peer |\n|---|---|---|\n| binary (stripped) | {} bytes | - |\n| RSS idle, no model | {} KiB | - |\n| RSS serving digits | {} KiB | {} KiB |\n| RSS peak (VmHWM, through the swaps) | {} KiB | - |\n\npeer RSS / outpost RSS serving: {}.\n\n",
        f(&fp["binary_bytes"]),
        f(&fp["rss_idle_no_model_kb"]),
        f(&fp["rss_serving_digits_kb"]),
        f(&fp["peer_rss_kb"]),
        f(&fp["rss_peak_kb"]),
        f(&fp["peer_rss_over_outpost_serving"])
    ));
    let h = &r["sha256"];
    md.push_str(&format!(
        "## 6. Verification throughput\n\nsha256 of {} MB: agent {} MB/s, `sha256sum` {} MB/s; agent / sha256sum = {} (digests agree: {}).\n\n",
        f(&h["megabytes"]),
        f(&h["agent_mb_s"]),
        f(&h["sha256sum_mb_s"]),
        f(&h["agent_over_sha256sum"]),
        f(&h["digests_agree"])
    ));
    md.push_str(&section_detector(r));
    if let Some(fl) = r.get("fleet") {
        md.push_str(&format!(
            "## 8. A fleet of {} devices on the same Mosquitto (`outpost-sim fleet`)\n\nOne group deployment with {} late starters, {} devices going offline mid-download and a tenth of the downloads cut or refused: {} of {} active, {} failed; 50 % / 90 % / 100 % active after {} / {} / {} s; {} download retries; {} deployments resumed after an offline period; {:.0} KB of memory per simulated device.\n\n",
            f(&fl["devices"]),
            f(&fl["late_devices"]),
            f(&fl["offline_devices"]),
            f(&fl["active"]),
            f(&fl["devices"]),
            f(&fl["failed"]),
            f(&fl["t50_s"]),
            f(&fl["t90_s"]),
            f(&fl["t100_s"]),
            f(&fl["download_retries"]),
            f(&fl["resumed"]),
            fl["rss_per_device_kb"].as_f64().unwrap_or(0.0)
        ));
        if let Some(svg) = fl["svg"].as_str() {
            md.push_str(&format!("![fleet activation]({svg})\n\n"));
        }
    }
    if let Some(h) = r.get("hardening") {
        md.push_str(
            "## 9. The hostile-world limits

",
        );
        if let Some(http) = h.get("http") {
            md.push_str(&format!(
                "HTTP scoring (digits, keep-alive) of this agent, with its header timeout, connection cap, body cap, admission and bound on bytes in flight, against a baseline build from before them (`{}`), each serving digits, alternated three times in one run.\n\n| | p50 µs | p99 µs | req/s | failed |\n|---|---|---|---|---|\n",
                http["baseline_agent"].as_str().unwrap_or("")
            ));
            for (who, key) in [("this agent", "this_agent"), ("baseline", "baseline")] {
                for (i, round) in http[key].as_array().into_iter().flatten().enumerate() {
                    md.push_str(&row(&format!("{who}, sequential, round {}", i + 1), &round["sequential"]));
                    md.push_str(&row(&format!("{who}, 2 clients, round {}", i + 1), &round["2_clients"]));
                }
            }
            md.push_str(&format!(
                "\nthis agent / baseline (medians): p50 {}, throughput {} sequential, {} with 2 clients.\n\n",
                f(&http["p50_this_over_baseline"]),
                f(&http["throughput_this_over_baseline"]),
                f(&http["throughput_2_clients_this_over_baseline"])
            ));
        }
        md.push_str("Start with a hostile deployment pending (digits active; a minute-long MatMul chain, `fixtures/hostile/slow-chain.onnx`, stopped cleanly while it validated, so the start resumes it): from spawning the agent to its HTTP port listening, to `READY=1` on systemd's notify socket, and to `/v2/health/ready` answering 200.\n\n| agent | HTTP listening ms | READY ms | health ready ms |\n|---|---|---|---|\n");
        for s in h["start_with_pending_hostile_deployment"].as_array().into_iter().flatten() {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                s["agent"].as_str().unwrap_or(""),
                f(&s["http_listening_ms"]),
                f(&s["ready_ms"]),
                f(&s["health_ready_ms"])
            ));
        }
        md.push('\n');
    }
    md.push_str(&goals(r));
    md.push_str(&bounds(r));
    md.push_str(COMMANDS);
    if let Some(skipped) = r["skipped"].as_array().filter(|s| !s.is_empty()) {
        md.push_str("## Skipped\n\n");
        for s in skipped {
            md.push_str(&format!("- {}\n", s.as_str().unwrap_or("")));
        }
    }
    // Robustness figures come from other runs (fuzzing, the chaos soak):
    // kept in their own file and carried into every report.
    let robustness = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/RESULTS.md");
    if let Ok(text) = std::fs::read_to_string(robustness) {
        md.push('\n');
        md.push_str(&text);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1.0 (Debian) against a server answering every POST with 501.
    const WRK_NON_2XX: &str = r#"Running 1s test @ http://127.0.0.1:18931/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.72ms    2.50ms   9.19ms   54.10%
    Req/Sec   541.45    135.37   797.00     81.82%
  Latency Distribution
     50%    3.92ms
     75%    4.89ms
     90%    7.90ms
     99%    8.16ms
  593 requests in 1.10s, 321.40KB read
  Non-2xx or 3xx responses: 593
Requests/sec:    538.75
Transfer/sec:    292.00KB
"#;

    /// The same wrk against a server that closes every connection after at most one answer.
    const WRK_SOCKET_ERRORS: &str = r#"Running 1s test @ http://127.0.0.1:18932/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    53.98us  232.28us   3.90ms   97.51%
    Req/Sec     8.53k     2.85k   11.79k    70.00%
  Latency Distribution
     50%   16.00us
     75%   23.00us
     90%   44.00us
     99%    1.26ms
  8472 requests in 1.00s, 330.94KB read
  Socket errors: connect 0, read 16944, write 0, timeout 0
Requests/sec:   8465.54
Transfer/sec:    330.69KB
"#;

    #[test]
    fn wrk_output_is_read_with_its_units_and_errors() {
        let w = parse_wrk(WRK_NON_2XX).expect("parses");
        assert_eq!(w.requests, 593);
        assert!((w.seconds - 1.1).abs() < 1e-9, "{w:?}");
        assert_eq!(w.per_s, 538.75);
        assert_eq!((w.mean_us, w.p50_us, w.p99_us), (3720.0, 3920.0, 8160.0));
        assert_eq!((w.non_2xx, w.socket_errors), (593, 0));
        let s = w.series();
        assert_eq!((s.n, s.failed, s.p99_us), (593, 593, 8160.0));

        let w = parse_wrk(WRK_SOCKET_ERRORS).expect("parses");
        assert_eq!((w.requests, w.non_2xx, w.socket_errors), (8472, 0, 16944));
        assert_eq!((w.mean_us, w.p50_us, w.p99_us), (53.98, 16.0, 1260.0));
        assert_eq!(w.per_s, 8465.54);

        assert_eq!(wrk_duration_us("2.00m"), Some(120e6));
        assert_eq!(wrk_duration_us("1.5s"), Some(1.5e6));
        assert_eq!(wrk_duration_us("12"), None);
        assert_eq!(wrk_duration_us("3.1xs"), None);
    }

    #[test]
    fn wrk_output_without_latency_figures_is_an_error() {
        // wrk run without --latency: no distribution to read p50 and p99 from.
        let no_latency: String = WRK_NON_2XX
            .lines()
            .filter(|l| !l.trim_start().contains('%') || l.contains("Req/Sec"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_wrk(&no_latency).is_err(), "{no_latency}");
        assert!(parse_wrk("unable to connect to 127.0.0.1:9 Connection refused").is_err());
    }
}
