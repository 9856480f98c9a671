//! `outpost-sim fleet --rollout good|broken`: once every device serves
//! version 1 from the group's desired state, version 2 is rolled out to the
//! group stage by stage with the engine of `outpost-sim rollout`
//! ([`crate::rollout::run`], the same code), while a load generator sends
//! inference requests over MQTT to every device in turn and counts how each
//! is answered: by which version, refused, or not at all.
//!
//! `good`: the digits CNN as version 2 (other model, other files: a real
//! download, load and golden sample). `broken`: the MLP again, whose golden
//! sample was altered after registration so that no device reproduces it:
//! every device that gets it refuses it (`validation_failed`) and keeps
//! serving version 1.

use crate::operator::Operator;
use crate::registry::{RegisterSpec, register};
use crate::rollout::plan::Stage;
use outpost_agent::link::BrokerUrl;
use outpost_protocol::infer::InferReply;
use outpost_protocol::{DeploymentEvent, InferRequest, Topics};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

const CNN: &[u8] = include_bytes!("../../../fixtures/digits-cnn.onnx");

/// How long the load runs before the rollout starts and after it ends.
pub const LOAD_MARGIN: Duration = Duration::from_secs(3);

/// Which version 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    Good,
    Broken,
}

impl std::str::FromStr for Candidate {
    type Err = String;
    fn from_str(s: &str) -> Result<Candidate, String> {
        match s {
            "good" => Ok(Candidate::Good),
            "broken" => Ok(Candidate::Broken),
            _ => Err(format!("'{s}': expected good or broken")),
        }
    }
}

/// The rollout a fleet runs once it has converged.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    pub candidate: Candidate,
    pub stages: Vec<Stage>,
    pub soak: Duration,
    /// Inference requests per second over the whole fleet, from the
    /// rollout's start to its end.
    pub load_rps: f64,
}

/// How the requests were answered.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Requests {
    pub sent: u64,
    /// Answered with a prediction, by the model version that made it.
    pub answered_by_version: BTreeMap<String, u64>,
    /// Answered with an error, by its code.
    pub failed_by_code: BTreeMap<String, u64>,
    /// Not answered within 15 s of the load's end.
    pub unanswered: u64,
    /// Slowest answer, in seconds.
    pub slowest_s: f64,
}

impl Requests {
    pub fn failed(&self) -> u64 {
        self.failed_by_code.values().sum::<u64>() + self.unanswered
    }
}

/// An answer, when it came (seconds since the rollout started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Previous,
    Candidate,
    Failed,
}

/// What the rollout did to the fleet.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RolloutOutcome {
    pub candidate: String,
    /// The rollout's own report (`outpost-sim rollout --json`).
    pub report: crate::rollout::Report,
    /// Devices in the first stage.
    pub first_stage: usize,
    /// Devices that heard of version 2 at all (an event for a deployment
    /// other than version 1's), and the first of them by name.
    pub touched: usize,
    pub touched_devices: Vec<String>,
    /// Devices serving version 2 when the rollout ended.
    pub serving_candidate: usize,
    /// Seconds from the load's start to the rollout's start and end (the
    /// load runs [`LOAD_MARGIN`] before and after the rollout).
    pub rollout_started_s: f64,
    pub duration_s: f64,
    pub requests: Requests,
    /// Every half second: seconds since the start, devices serving version
    /// 2, devices touched (the plot; not in the JSON).
    #[serde(skip)]
    pub timeline: Vec<(f64, usize, usize)>,
    #[serde(skip)]
    pub answers: Vec<(f64, Answer)>,
}

impl RolloutOutcome {
    /// A good version reached every device, a broken one halted in its
    /// first stage having touched no device beyond it; and no request failed.
    pub fn as_expected(&self, devices: usize) -> bool {
        use crate::rollout::record::State;
        let rollout = match self.candidate.starts_with("good") {
            true => self.report.state == State::Done && self.serving_candidate == devices,
            false => {
                self.report.state == State::Halted
                    && self.report.stages.len() == 1
                    && self.touched <= self.first_stage
                    && self.serving_candidate == 0
            }
        };
        rollout && self.requests.sent > 0 && self.requests.failed() == 0
    }

    /// The rollout as SVG: devices touched and serving version 2, and the
    /// requests answered each second by each version, or failed.
    pub fn svg(&self, devices: usize) -> Result<String, String> {
        let title = format!(
            "Rollout of a {} version 2 to {devices} devices ({} after {:.1} s), {} requests",
            if self.candidate.starts_with("good") { "good" } else { "broken" },
            self.report.state.as_str(),
            self.duration_s,
            self.requests.sent
        );
        let times = |kind: Answer| self.answers.iter().filter(|a| a.1 == kind).map(|a| a.0).collect::<Vec<f64>>();
        let (previous, candidate, failed) = (times(Answer::Previous), times(Answer::Candidate), times(Answer::Failed));
        let span = (self.rollout_started_s, self.rollout_started_s + self.duration_s);
        crate::plot::fleet_rollout(devices, &self.timeline, [&previous, &candidate, &failed], span, &title)
    }
}

impl std::fmt::Display for RolloutOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.report.to_string().trim_end())?;
        writeln!(
            f,
            "rollout of {} across the fleet, {:.1} s (inference load from {:.0} s before to {:.0} s after):",
            self.candidate,
            self.duration_s,
            self.rollout_started_s,
            LOAD_MARGIN.as_secs_f64()
        )?;
        let names = match self.touched_devices.len() < self.touched {
            true => format!("{} ...", self.touched_devices.join(", ")),
            false => self.touched_devices.join(", "),
        };
        writeln!(
            f,
            "  touched by version 2:          {} device(s) (first stage: {}){}",
            self.touched,
            self.first_stage,
            if self.touched <= 20 && self.touched > 0 { format!(": {names}") } else { String::new() }
        )?;
        writeln!(f, "  serving version 2 at the end:  {}", self.serving_candidate)?;
        let r = &self.requests;
        writeln!(
            f,
            "  requests:                      {} sent, answered {:?}, failed {:?}, {} unanswered; slowest answer {:.2} s",
            r.sent, r.answered_by_version, r.failed_by_code, r.unanswered, r.slowest_s
        )?;
        write!(f, "  failed requests:               {}", r.failed())
    }
}

/// Registers version 2 of `name` in `registry` (the fleet's version 1 is `version 1`).
fn register_candidate(candidate: Candidate, name: &str, registry: &Path, scratch: &Path) -> Result<(), String> {
    let (bytes, file) = match candidate {
        Candidate::Good => (CNN, "digits-cnn.onnx"),
        Candidate::Broken => (crate::demo::MLP, "digits-mlp-2.onnx"),
    };
    let model = scratch.join(file);
    std::fs::write(&model, bytes).map_err(|e| format!("{}: {e}", model.display()))?;
    register(&RegisterSpec {
        model,
        name: name.into(),
        version: "2".into(),
        registry: registry.into(),
        labels: None,
        sample: None,
        shapes: Vec::new(),
        tolerance: 1e-4,
        top_k: 3,
        scale: None,
        runtime: None,
    })?;
    if candidate == Candidate::Broken {
        // One expected probability changed, the manifest's sha256 and size
        // of the file updated: a bundle that verifies and loads, whose
        // golden sample no device reproduces.
        let dir = registry.join(name).join("2");
        let expected_path = dir.join("sample/expected.json");
        let mut expected: serde_json::Value = read_json(&expected_path)?;
        expected["outputs"][0]["data"][3] = serde_json::json!(0.5);
        let bytes = serde_json::to_vec(&expected).map_err(|e| e.to_string())?;
        std::fs::write(&expected_path, &bytes).map_err(|e| format!("{}: {e}", expected_path.display()))?;
        let manifest_path = dir.join("manifest.json");
        let mut manifest: serde_json::Value = read_json(&manifest_path)?;
        let files = manifest["files"].as_array_mut().ok_or("manifest.json: no files")?;
        let entry = files.iter_mut().find(|f| f["path"] == "sample/expected.json").ok_or("no sample/expected.json")?;
        entry["sha256"] = crate::registry::sha256(&bytes).into();
        entry["size"] = bytes.len().into();
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
        std::fs::write(&manifest_path, text).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the fleet hands over once it has converged on version 1.
pub(super) struct Converged<'a> {
    pub observer: &'a mut Operator,
    pub broker: &'a BrokerUrl,
    pub registry: &'a Path,
    pub registry_url: &'a str,
    pub scratch: &'a Path,
    pub group: &'a str,
    pub model: &'a str,
    /// Version 1's deployment id (the group's desired state).
    pub v1: &'a str,
    pub devices: Vec<String>,
    pub run_id: u128,
    pub timeout: Duration,
    pub progress: bool,
}

/// Rolls version 2 out to the converged fleet under load.
pub(super) async fn run(c: Converged<'_>, spec: &RolloutSpec) -> Result<RolloutOutcome, String> {
    let (registry, scratch) = (c.registry.to_path_buf(), c.scratch.to_path_buf());
    let (candidate, model) = (spec.candidate, c.model.to_string());
    tokio::task::spawn_blocking(move || register_candidate(candidate, &model, &registry, &scratch))
        .await
        .map_err(|e| e.to_string())??;
    let sample = std::fs::read(c.registry.join(c.model).join("1/sample/input.json")).map_err(|e| e.to_string())?;
    let template = InferRequest::from_json(&sample).map_err(|e| format!("the golden sample: {e}"))?;

    // The load: every device in turn, from now to the rollout's end.
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(load(
        c.broker.clone(),
        format!("fleet-load-{}", c.run_id),
        c.devices.clone(),
        template,
        spec.load_rps,
        started,
        stop_rx,
    ));

    let limits = crate::rollout::health::Limits::default();
    let mut params = crate::rollout::Params::new(
        c.broker.clone(),
        c.group,
        crate::rollout::Action::Start(crate::rollout::Start {
            model: c.model.into(),
            version: "2".into(),
            registry_url: c.registry_url.into(),
            stages: spec.stages.clone(),
            soak: spec.soak,
            limits,
            shadow_sample: None,
            allow_downgrade: false,
        }),
    );
    (params.timeout, params.progress) = (c.timeout, c.progress);
    // The load first alone: answers by version 1 on every device.
    let mut timeline = Vec::new();
    let mut serving: HashSet<String> = HashSet::new();
    let (mut touched, mut touched_set) = (Vec::new(), HashSet::new());
    while started.elapsed() < LOAD_MARGIN {
        if let Some(m) = c.observer.next(Duration::from_millis(100)).await {
            observe(&m, c.v1, &mut touched, &mut touched_set, &mut serving);
        }
        if timeline.last().is_none_or(|t: &(f64, usize, usize)| started.elapsed().as_secs_f64() - t.0 >= 0.5) {
            timeline.push((started.elapsed().as_secs_f64(), serving.len(), touched_set.len()));
        }
    }
    let rollout_started_s = started.elapsed().as_secs_f64();
    let rollout = tokio::spawn(crate::rollout::run(params));

    // Who hears of version 2 and who serves it, as the rollout goes.
    let mut sampled = Instant::now() - Duration::from_secs(1);
    while !rollout.is_finished() {
        if let Some(m) = c.observer.next(Duration::from_millis(100)).await {
            observe(&m, c.v1, &mut touched, &mut touched_set, &mut serving);
        }
        if sampled.elapsed() >= Duration::from_millis(500) {
            sampled = Instant::now();
            timeline.push((started.elapsed().as_secs_f64(), serving.len(), touched_set.len()));
        }
    }
    let report = match rollout.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("the rollout could not run: {e}")),
        Err(e) => return Err(format!("the rollout stopped: {e}")),
    };
    // What the devices say after (the rollout waited for their
    // confirmations), the load still running.
    let duration_s = started.elapsed().as_secs_f64() - rollout_started_s;
    let until = Instant::now() + LOAD_MARGIN;
    while Instant::now() < until {
        if let Some(m) = c.observer.next(Duration::from_millis(100)).await {
            observe(&m, c.v1, &mut touched, &mut touched_set, &mut serving);
        }
        if sampled.elapsed() >= Duration::from_millis(500) {
            sampled = Instant::now();
            timeline.push((started.elapsed().as_secs_f64(), serving.len(), touched_set.len()));
        }
    }
    let _ = stop_tx.send(true);
    let (requests, answers) = load.await.map_err(|e| e.to_string())??;
    let candidate = match spec.candidate {
        Candidate::Good => "good version 2 (the digits CNN)",
        Candidate::Broken => "broken version 2 (golden sample not reproduced)",
    };
    Ok(RolloutOutcome {
        candidate: candidate.into(),
        first_stage: report.stages.first().map_or(0, |s| s.devices.len()),
        touched: touched_set.len(),
        touched_devices: touched.iter().take(20).cloned().collect(),
        serving_candidate: serving.len(),
        report,
        rollout_started_s,
        duration_s,
        requests,
        timeline,
        answers,
    })
}

/// A device heard of version 2 when it reports on a deployment other than
/// version 1's; it serves it while its retained state says so.
fn observe(
    m: &rumqttc::Publish,
    v1: &str,
    touched: &mut Vec<String>,
    touched_set: &mut HashSet<String>,
    serving: &mut HashSet<String>,
) {
    if m.topic.ends_with("/events")
        && let Ok(ev) = DeploymentEvent::from_json(&m.payload)
        && ev.deployment_id != v1
        && touched_set.insert(ev.device.clone())
    {
        touched.push(ev.device);
    } else if m.topic.ends_with("/state")
        && let Ok(state) = outpost_protocol::DeviceState::from_json(&m.payload)
    {
        match state.active {
            Some(a) if a.version == "2" => serving.insert(state.device),
            _ => serving.remove(&state.device),
        };
    }
}

/// Sends `rps` requests a second over MQTT (QoS 1), to every device in turn,
/// until `stop`; then waits up to 15 s for the answers still due.
async fn load(
    broker: BrokerUrl,
    client: String,
    devices: Vec<String>,
    template: InferRequest,
    rps: f64,
    started: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Requests, Vec<(f64, Answer)>), String> {
    let topics = Topics::default();
    let mut op = Operator::connect(&broker, &client, topics.clone()).await?;
    let replies = format!("outpost/replies/{client}");
    op.subscribe_with(&format!("{replies}/#"), rumqttc::QoS::AtLeastOnce).await?;
    let mut stats = Requests::default();
    let mut answers = Vec::new();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut next_device = 0usize;
    let stride = [7919, 7907, 7901].into_iter().find(|p| !devices.len().is_multiple_of(*p)).unwrap_or(1);
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && *stop.borrow() {
            drain_until = Some(Instant::now() + Duration::from_secs(15));
        }
        match drain_until {
            Some(until) if pending.is_empty() || Instant::now() > until => break,
            Some(_) => {}
            None => {
                credit += rps * last.elapsed().as_secs_f64();
                last = Instant::now();
                while credit >= 1.0 && !devices.is_empty() {
                    credit -= 1.0;
                    let id = stats.sent.to_string();
                    let mut request = template.clone();
                    (request.id, request.reply_to) = (Some(id.clone()), Some(format!("{replies}/{id}")));
                    let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
                    // A stride coprime to the fleet's size visits every
                    // device once per round, in an order that mixes the
                    // stages' devices (which are taken in name order).
                    let device = &devices[(next_device * stride) % devices.len()];
                    op.publish(&topics.infer(device), body, false).await?;
                    pending.insert(id, Instant::now());
                    (stats.sent, next_device) = (stats.sent + 1, next_device + 1);
                }
            }
        }
        let Some(m) = op.next(Duration::from_millis(20)).await else { continue };
        let Some(id) = m.topic.strip_prefix(&format!("{replies}/")) else { continue };
        let Some(sent) = pending.remove(id) else { continue };
        stats.slowest_s = stats.slowest_s.max(sent.elapsed().as_secs_f64());
        let at = started.elapsed().as_secs_f64();
        match serde_json::from_slice::<InferReply>(&m.payload) {
            Ok(InferReply::Ok(r)) => {
                *stats.answered_by_version.entry(r.model_version.clone()).or_default() += 1;
                answers.push((at, if r.model_version == "2" { Answer::Candidate } else { Answer::Previous }));
            }
            Ok(InferReply::Error(e)) => {
                *stats.failed_by_code.entry(e.code.to_string()).or_default() += 1;
                answers.push((at, Answer::Failed));
            }
            Err(_) => {
                *stats.failed_by_code.entry("unreadable".into()).or_default() += 1;
                answers.push((at, Answer::Failed));
            }
        }
    }
    stats.unanswered = pending.len() as u64;
    op.disconnect().await;
    Ok((stats, answers))
}
