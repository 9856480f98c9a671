//! `outpost-sim rollout` over real agent processes: four devices of a group
//! serving digits@1 from the group's desired state; a broken bundle halts
//! at the first stage with one device touched, a good one reaches the whole
//! group, a rollout whose tool was killed mid-soak resumes, and one aborts;
//! a stage promotes a candidate only when it agrees in shadow.

use super::*;
use outpost_protocol::{Deployment, DeviceState, Topics};
use outpost_sim::operator::Operator;
use outpost_sim::rollout::record::{Record, State, Step};

const GROUP: &str = "fleet";

/// `n` agents of [`GROUP`] reporting telemetry every second, serving
/// digits@1 from the group's desired state.
struct Fleet {
    broker: Mosquitto,
    reg: Registry,
    _data: tempfile::TempDir,
    agents: Vec<Agent>,
    names: Vec<String>,
    watchers: Vec<Watcher>,
    v1: Deployment,
}

async fn fleet_on_v1(prefix: &str, n: usize) -> Fleet {
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let data = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let (mut agents, mut watchers) = (Vec::new(), Vec::new());
    for n in &names {
        watchers.push(Watcher::new(&broker, n).await);
        agents.push(Agent::start_with(broker.port, n, &data.path().join(n), &[GROUP], &["--telemetry-interval", "1"]));
    }
    for w in &mut watchers {
        w.online().await;
    }
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let v1 = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    let topic = Topics::default().group_desired(GROUP);
    watchers[0].op.publish(&topic, v1.to_json(), true).await.unwrap();
    for w in &mut watchers {
        let (last, events) = w.events_until_final(&v1.deployment_id).await;
        assert_eq!(last.phase, Phase::Active, "{events:?}");
    }
    Fleet { broker, reg, _data: data, agents, names, watchers, v1 }
}

impl Fleet {
    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.broker.port)
    }

    /// `outpost-sim rollout --broker .. --group fleet ARGS` (and the registry
    /// for a new rollout), off the test's runtime.
    async fn rollout(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<String> = ["rollout", "--broker", &self.url(), "--group", GROUP, "--timeout", "120"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        if args.contains(&"--model") {
            all.extend(["--registry-url".to_string(), self.reg.url.clone()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        tokio::task::spawn_blocking(move || sim(&all.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
    }

    /// The same, as a process the test kills.
    fn spawn_rollout(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(sim_binary())
            .args(["rollout", "--broker", &self.url(), "--group", GROUP, "--registry-url", &self.reg.url])
            .args(args)
            .env("OUTPOST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// What `topic` retains (None: nothing).
    async fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        let id = format!("retained-{}", outpost_agent::sys::jitter().to_bits());
        let mut op = Operator::connect(&self.broker.url(), &id, Topics::default()).await.unwrap();
        op.subscribe(topic).await.unwrap();
        let got = op.next(Duration::from_secs(2)).await.map(|m| m.payload.to_vec());
        op.disconnect().await;
        got.filter(|p| !p.is_empty())
    }

    async fn record(&self) -> Record {
        let bytes = self.retained(&Topics::default().rollout(GROUP, None)).await.expect("a rollout record");
        Record::from_json(&bytes).unwrap()
    }

    /// Waits until the retained record satisfies `pred`.
    async fn record_until(&self, pred: impl Fn(&Record) -> bool) -> Record {
        let mut op = Operator::connect(&self.broker.url(), "record-watch", Topics::default()).await.unwrap();
        op.subscribe(&Topics::default().rollout(GROUP, None)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut last = None;
        while std::time::Instant::now() < deadline {
            let Some(m) = op.next(Duration::from_millis(200)).await else { continue };
            if let Ok(r) = Record::from_json(&m.payload) {
                if pred(&r) {
                    op.disconnect().await;
                    return r;
                }
                last = Some(r);
            }
        }
        panic!("the record never matched; last {last:?}");
    }

    /// No device keeps an override of its own.
    async fn assert_no_overrides(&self) {
        for n in &self.names {
            let held = self.retained(&Topics::default().device_desired(n)).await;
            assert_eq!(held.map(|p| String::from_utf8_lossy(&p).into_owned()), None, "{n} keeps an override");
        }
    }

    /// What the group's desired topic holds, signed (the envelope's payload, not verified).
    async fn group_desired_signed(&self) -> Deployment {
        let raw = self.retained(&Topics::default().group_desired(GROUP)).await.unwrap();
        let env: outpost_protocol::trust::Envelope = serde_json::from_slice(&raw).unwrap();
        Deployment::from_json(&outpost_protocol::trust::base64_decode(&env.payload).unwrap()).unwrap()
    }

    /// What the group's desired topic holds.
    async fn group_desired(&self) -> Deployment {
        Deployment::from_json(&self.retained(&Topics::default().group_desired(GROUP)).await.unwrap()).unwrap()
    }

    async fn state(&mut self, i: usize, pred: impl Fn(&DeviceState) -> bool) -> DeviceState {
        let broker = &self.broker;
        self.watchers[i].state(broker, pred).await
    }
}

/// digits@`version` whose golden sample the model does not reproduce: every device refuses it.
fn register_broken(reg: &Registry, version: &str) {
    reg.register("digits-mlp.onnx", "digits", version);
    let path = reg.root().join(format!("digits/{version}/sample/expected.json"));
    let mut expected: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    expected["outputs"][0]["data"][3] = serde_json::json!(0.5);
    std::fs::write(&path, serde_json::to_vec(&expected).unwrap()).unwrap();
    reg.rehash("digits", version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_bundle_halts_at_the_first_stage_with_one_device_touched() {
    let mut f = fleet_on_v1("ra", 4).await;
    register_broken(&f.reg, "2");

    let (code, out, err) = f.rollout(&["--model", "digits@2", "--stages", "1,50%,100%", "--soak", "3s"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("): halted"), "{out}");
    assert!(out.contains("why: ra-0 failed digits-2-canary-") && out.contains("validation_failed"), "{out}");
    assert!(out.contains("returned to digits@1: ra-0"), "{out}");

    // The record says halted, why, and that one device moved and came back.
    let rec = f.record().await;
    assert_eq!((rec.state, rec.step), (State::Halted, Step::Returning), "{rec:?}");
    let breach = rec.breach.clone().unwrap();
    assert_eq!((breach.device.as_str(), breach.check.as_str()), ("ra-0", "failed"), "{breach:?}");
    assert!(rec.reason.as_deref().unwrap().contains("validation_failed"), "{rec:?}");
    assert_eq!(rec.done.len(), 1, "{rec:?}");
    assert_eq!(rec.done[0].devices, ["ra-0"]);
    assert_eq!(rec.done[0].verdict, "breached");
    assert!(rec.moved.is_empty(), "{rec:?}");
    assert!(rec.finished_at.is_some());

    // The other three never heard of the candidate; the group still desires v1.
    for i in 1..4 {
        let s = f.state(i, |s| s.active.is_some()).await;
        let last = s.last_deployment.unwrap();
        assert_eq!(last.deployment_id, f.v1.deployment_id, "{} was touched", f.names[i]);
    }
    assert_eq!(f.group_desired().await.deployment_id, f.v1.deployment_id);
    f.assert_no_overrides().await;

    // ra-0 is back on the group's v1 and serving it.
    let v1 = f.v1.deployment_id.clone();
    let s = f.state(0, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == v1)).await;
    assert_eq!(s.active.unwrap().version, "1");
    assert_eq!(f.watchers[0].infer("after", digits_request(1)).await["model_version"], "1");

    // A halted rollout does not block the next one: this one is refused for its own reason.
    let (code, _, err) = f.rollout(&["--model", "digits@1", "--stages", "1", "--soak", "1s"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("group fleet already desires digits@1"), "{err}");

    // --max-failed 1: the first of a stage's two devices to fail goes back
    // and the stage goes on; the second is past the budget and halts it.
    let (code, out, err) =
        f.rollout(&["--model", "digits@2", "--stages", "2,100%", "--soak", "3s", "--max-failed", "1"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("failed (returned, within --max-failed)"), "{out}");
    let rec = f.record().await;
    assert_eq!(rec.state, State::Halted, "{rec:?}");
    let stage = &rec.done[0];
    assert_eq!(stage.failed.len(), 1, "{rec:?}");
    let breach = rec.breach.clone().unwrap();
    assert_eq!(breach.check, "failed", "{breach:?}");
    let first =
        ["ra-0", "ra-1"].into_iter().find(|d| stage.failed[0].starts_with(d)).expect("ra-0 or ra-1 failed first");
    assert_ne!(breach.device, first, "{rec:?}");
    for i in 0..4 {
        let s = f.state(i, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == v1)).await;
        assert_eq!(s.active.unwrap().version, "1");
    }
    f.assert_no_overrides().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_reaches_the_group_and_a_killed_rollout_resumes_or_aborts() {
    let mut f = fleet_on_v1("rb", 4).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");

    // (b) A good version, stage by stage, to the whole group.
    let (code, out, err) =
        f.rollout(&["--model", "digits@2", "--stages", "1,50%,100%", "--soak", "2s", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["state"], "done", "{report:#}");
    let stages = report["stages"].as_array().unwrap();
    let moved: Vec<serde_json::Value> = stages.iter().map(|s| s["devices"].clone()).collect();
    assert_eq!(moved, [serde_json::json!(["rb-0"]), serde_json::json!(["rb-1"]), serde_json::json!(["rb-2", "rb-3"])]);
    assert!(stages.iter().all(|s| s["verdict"] == "passed" && s["activation_s"].is_number()), "{report:#}");
    let rec = f.record().await;
    assert_eq!((rec.state, rec.step), (State::Done, Step::Completing), "{rec:?}");
    let group = f.group_desired().await;
    assert_eq!((group.model.version.as_str(), group.deployment_id.as_str()), ("2", rec.ids.group.as_str()));
    for i in 0..4 {
        let s = f.state(i, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == group.deployment_id)).await;
        assert_eq!(s.active.unwrap().version, "2");
    }
    f.assert_no_overrides().await;

    // (c) A rollout whose tool is killed mid-soak is still running...
    f.reg.register("digits-mlp.onnx", "digits", "3");
    let mut tool = f.spawn_rollout(&["--model", "digits@3", "--stages", "1,100%", "--soak", "8s"]);
    let rec = f.record_until(|r| r.ids.candidate.starts_with("digits-3-") && r.step == Step::Soaking).await;
    tool.kill().unwrap();
    tool.wait().unwrap();
    assert_eq!((rec.state, rec.stage, rec.moved.clone()), (State::Running, 0, vec!["rb-0".to_string()]));
    // ... so a new one is refused until it is resumed or aborted,
    let (code, _, err) = f.rollout(&["--model", "digits@2", "--stages", "1", "--soak", "1s"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is running") && err.contains("--resume or --abort"), "{err}");
    // and --resume takes it to the end with its recorded options, soaking
    // the stage again in full (the killed run's figures died with it).
    let (code, out, err) = f.rollout(&["--resume"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": done"), "{out}");
    assert!(err.contains("the soak starts again in full"), "{err}");
    let group = f.group_desired().await;
    assert_eq!(group.model.version, "3");
    for i in 0..4 {
        f.state(i, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == group.deployment_id)).await;
    }
    f.assert_no_overrides().await;

    // --abort returns the device a killed rollout had moved.
    f.reg.register("digits-cnn.onnx", "digits", "4");
    let mut tool = f.spawn_rollout(&["--model", "digits@4", "--stages", "1,100%", "--soak", "60s"]);
    f.record_until(|r| r.ids.candidate.starts_with("digits-4-") && r.step == Step::Soaking).await;
    tool.kill().unwrap();
    tool.wait().unwrap();
    f.state(0, |s| s.active.as_ref().is_some_and(|a| a.version == "4")).await;
    let (code, out, err) = f.rollout(&["--abort"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("returned to digits@3: rb-0"), "{out}");
    let rec = f.record().await;
    assert_eq!(rec.state, State::Aborted, "{rec:?}");
    assert!(rec.moved.is_empty() && rec.reason.as_deref().unwrap().starts_with("aborted (--abort) at stage 1/2"));
    let s = f.state(0, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == group.deployment_id)).await;
    assert_eq!(s.active.unwrap().version, "3");
    assert_eq!(f.watchers[0].infer("after-abort", digits_request(1)).await["model_version"], "3");
    assert_eq!(f.group_desired().await.deployment_id, group.deployment_id);
    f.assert_no_overrides().await;
    // Nothing left to abort.
    let (code, _, err) = f.rollout(&["--abort"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is aborted: nothing to abort"), "{err}");
}

/// Requests of eight held-out digits to every agent over HTTP, until `stop`.
fn load(f: &Fleet, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<()> {
    let urls: Vec<String> =
        f.agents.iter().map(|a| format!("http://127.0.0.1:{}/v2/models/digits/infer", a.http_port)).collect();
    let body = serde_json::to_vec(&digits_request(8)).unwrap();
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for url in &urls {
                let _ = try_http("POST", url.clone(), Some(body.clone())).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_promotes_only_a_candidate_that_agrees_in_shadow() {
    let mut f = fleet_on_v1("rs", 2).await;
    // digits@2 sees every input scaled to 0: one class whatever the digit.
    outpost_sim::registry::register(&outpost_sim::registry::RegisterSpec {
        model: fixture("digits-mlp.onnx"),
        name: "digits".into(),
        version: "2".into(),
        registry: f.reg.root().to_path_buf(),
        labels: Some(fixture("labels.txt")),
        sample: None,
        shapes: vec![],
        tolerance: 1e-4,
        top_k: 3,
        scale: Some(0.0),
        runtime: None,
    })
    .unwrap();
    // digits@3 is the same MLP as digits@1.
    f.reg.register("digits-mlp.onnx", "digits", "3");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = load(&f, stop.clone());
    let gate =
        ["--stages", "1,100%", "--soak", "3s", "--shadow-sample", "1", "--min-agreement", "0.9", "--min-requests", "5"];

    let (code, out, err) = f.rollout(&[&["--model", "digits@2", "--json"][..], &gate].concat()).await;
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((report["state"].as_str(), report["breach"]["check"].as_str()), (Some("halted"), Some("agreement")));
    assert_eq!(report["breach"]["device"], "rs-0", "{report:#}");
    let stage = &report["stages"][0];
    assert!(stage["agreement"].as_f64().unwrap() < 0.9 && stage["compared"].as_u64().unwrap() >= 5, "{report:#}");
    assert_eq!(report["returned"], serde_json::json!(["rs-0"]));
    // The candidate never served: rs-0 went from v1 (with v2 in shadow) back to the group's v1.
    let v1 = f.v1.deployment_id.clone();
    let s = f.state(0, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == v1)).await;
    assert_eq!(s.active.unwrap().version, "1");
    let s = f.state(1, |s| s.active.is_some()).await;
    assert_eq!(s.last_deployment.unwrap().deployment_id, v1, "rs-1 was touched");
    f.assert_no_overrides().await;

    // A candidate that agrees passes the gate at every stage and completes.
    let (code, out, err) = f.rollout(&[&["--model", "digits@3", "--json"][..], &gate].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    for stage in report["stages"].as_array().unwrap() {
        assert_eq!(stage["agreement"].as_f64(), Some(1.0), "{report:#}");
        assert!(stage["compared"].as_u64().unwrap() >= 5, "{report:#}");
    }
    let group = f.group_desired().await;
    assert_eq!(group.model.version, "3");
    for i in 0..2 {
        f.state(i, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == group.deployment_id)).await;
    }
    f.assert_no_overrides().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
}

/// `outpost-sim keygen DIR/NAME`: the private key's path, and the public key's.
fn keygen(dir: &std::path::Path, name: &str) -> (String, String) {
    let base = dir.join(name).display().to_string();
    let (code, out, err) = sim(&["keygen", &base]);
    assert_eq!(code, 0, "{out}{err}");
    (format!("{base}.pem"), format!("{base}.pub.pem"))
}

/// The group's v1, signed by `key` (PEM path), published on the group's topic.
async fn sign_group_v1(f: &mut Fleet, key: &str) {
    let signer = outpost_sim::signing::Signer::load(std::path::Path::new(key), None).unwrap();
    let mut d = f.v1.clone();
    d.revision += 1;
    d.target = Some(outpost_protocol::trust::Target::Group(GROUP.into()));
    let topic = Topics::default().group_desired(GROUP);
    f.watchers[0].op.publish(&topic, signer.deployment(&d), true).await.unwrap();
}

/// The record is input from the broker: a forged one is refused before
/// anything is published (another group, devices that are not members, a
/// negative soak), and with --sign-key only a record that key signed is
/// resumed. A signing rollout starts only from a group deployment signed by
/// its key or a --trust-key, and signs its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_and_unverified_group_deployments_are_refused() {
    let mut f = fleet_on_v1("rf", 2).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");
    let record_topic = Topics::default().rollout(GROUP, None);
    let (url, sha) = outpost_sim::operator::resolve_manifest(&f.reg.url, "digits", "2").await.unwrap();
    let forged = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::json!({
            "schema": "outpost.rollout.v1", "id": "rollout-1", "group": GROUP,
            "candidate": {"name": "digits", "version": "2", "manifest_url": url, "manifest_sha256": sha},
            "previous": f.v1, "ids": {"candidate": "evil-canary", "group": "evil"},
            "stages": ["1", "100%"], "soak_s": 1.0,
            "limits": {"max_error_rate": null, "max_p99_ratio": null, "min_requests": 20, "min_agreement": null},
            "members": ["rf-0", "rf-1"], "state": "running", "stage": 1, "step": "completing",
            "step_since_ms": 1, "moved": ["rf-0"], "started_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z"
        });
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let victims = Topics::default().group_desired("victims");
    for (what, edit) in [
        (
            "group",
            Box::new(|v: &mut serde_json::Value| v["group"] = "victims".into()) as Box<dyn Fn(&mut serde_json::Value)>,
        ),
        ("other-dev", Box::new(|v: &mut serde_json::Value| v["moved"] = serde_json::json!(["rf-0", "other-dev"]))),
        ("soak_s", Box::new(|v: &mut serde_json::Value| v["soak_s"] = (-1.0).into())),
        ("sha256", Box::new(|v: &mut serde_json::Value| v["candidate"]["manifest_sha256"] = "ab".repeat(32).into())),
    ] {
        f.watchers[0].op.publish(&record_topic, forged(&*edit), true).await.unwrap();
        let (code, out, err) = f.rollout(&["--resume"]).await;
        assert_eq!(code, 64, "{what}: {out}{err}");
        assert!(err.contains("refused") && err.contains(what), "{what}: {err}");
        assert_eq!(f.retained(&victims).await, None, "{what}");
        assert_eq!(f.group_desired().await.deployment_id, f.v1.deployment_id, "{what}");
        f.assert_no_overrides().await;
    }
    f.watchers[0].op.publish(&record_topic, Vec::new(), true).await.unwrap();

    // Signing: the group's unsigned v1 is not carried into signed deployments.
    let keys = tempfile::tempdir().unwrap();
    let (k1, _) = keygen(keys.path(), "op");
    let (k2, k2_pub) = keygen(keys.path(), "other");
    let start = ["--model", "digits@2", "--stages", "1,100%", "--soak", "2s", "--sign-key", &k1];
    let (code, out, err) = f.rollout(&start).await;
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("is not signed"), "{err}");
    // Signed by another key: refused, unless that key is trusted.
    sign_group_v1(&mut f, &k2).await;
    let (code, out, err) = f.rollout(&start).await;
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("does not verify"), "{err}");
    let (code, out, err) = f.rollout(&[&start[..], &["--trust-key", &k2_pub]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": done"), "{out}");
    // The record is signed by the rollout's key.
    let raw = f.retained(&record_topic).await.unwrap();
    let pubkey = outpost_sim::signing::Signer::load(std::path::Path::new(&k1), None).unwrap().key.public();
    let rec = Record::open(&raw, Some(&pubkey)).unwrap();
    assert_eq!(rec.state, State::Done);
    let group = f.group_desired_signed().await;
    assert_eq!(group.model.version, "2");
    // A forged copy (unsigned, running again) is not resumed with the key.
    let mut again = rec.clone();
    (again.state, again.moved) = (State::Running, vec!["rf-1".into()]);
    f.watchers[0].op.publish(&record_topic, again.to_json(), true).await.unwrap();
    let (code, out, err) = f.rollout(&["--resume", "--sign-key", &k1]).await;
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("not signed"), "{err}");
    // Limits cannot be changed on a resume.
    let (code, _, err) = f.rollout(&["--resume", "--sign-key", &k1, "--max-error-rate", "0.5"]).await;
    assert_eq!(code, 64, "{err}");
}

/// Two runs never drive one rollout: a `--resume` while the first run is
/// still soaking takes it over, and the first stops without changing
/// anything more (exit 1, saying why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_takes_a_rollout_over_and_the_first_stops() {
    let f = fleet_on_v1("ro", 2).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");
    let run = |args: &[&str]| {
        std::process::Command::new(sim_binary())
            .args(["rollout", "--broker", &f.url(), "--group", GROUP])
            .args(args)
            .env("OUTPOST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = run(&["--registry-url", &f.reg.url, "--model", "digits@2", "--stages", "1,100%", "--soak", "60s"]);
    let rec = f.record_until(|r| r.step == Step::Soaking).await;
    let mut second = run(&["--resume"]);
    let out = tokio::task::spawn_blocking(move || first.wait_with_output().unwrap()).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("another run took rollout {} over", rec.id)), "{err}");
    // The second owns it (its token is on the record); it is stopped in turn and the rollout aborted.
    let taken = f.record_until(|r| r.owner.is_some() && r.owner != rec.owner).await;
    assert_eq!(taken.state, State::Running);
    second.kill().unwrap();
    second.wait().unwrap();
    let (code, out, err) = f.rollout(&["--abort"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let rec = f.record().await;
    assert_eq!(rec.state, State::Aborted);
    assert!(rec.moved.is_empty());
    f.assert_no_overrides().await;
}

/// A soaking device that drops off the broker and comes back on the
/// candidate within --offline-grace is not a breach (a link blip); the
/// rollout completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_within_the_offline_grace_does_not_halt_the_stage() {
    let mut f = fleet_on_v1("rg", 2).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");
    let tool =
        f.spawn_rollout(&["--model", "digits@2", "--stages", "1,100%", "--soak", "20s", "--offline-grace", "120s"]);
    let rec = f.record_until(|r| r.step == Step::Soaking && r.stage == 0).await;
    assert_eq!(rec.current.devices, ["rg-0"]);
    // A power cut: the broker says offline (its will), the rollout sees it for a while, then it is back.
    f.agents[0].kill();
    let availability = Topics::default().availability("rg-0");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while f.retained(&availability).await.as_deref() != Some(&b"offline"[..]) {
        assert!(std::time::Instant::now() < deadline, "rg-0 never showed offline");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.agents[0].kill_and_restart();
    let mut tool = tool;
    let status = tokio::task::spawn_blocking(move || tool.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0), "the rollout halted on a device back within the grace");
    let rec = f.record().await;
    assert_eq!(rec.state, State::Done, "{rec:?}");
    let group = f.group_desired().await;
    for i in 0..2 {
        f.state(i, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == group.deployment_id)).await;
    }
}

/// What someone else publishes during a rollout is never overwritten: a
/// device pinned mid-rollout keeps its pin when the rollout halts, and a
/// group moved mid-rollout (an emergency rollback) halts it before
/// completion instead of being replaced by the candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_or_a_group_change_made_during_the_rollout_is_left_alone() {
    let mut f = fleet_on_v1("rc", 2).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");
    let mut other = f.v1.clone();

    // (a) rc-0 pinned by hand while it soaks the candidate.
    let (url, reg) = (f.url(), f.reg.url.clone());
    let run = |args: &[&str]| {
        std::process::Command::new(sim_binary())
            .args(["rollout", "--broker", &url, "--group", GROUP, "--registry-url", &reg])
            .args(args)
            .env("OUTPOST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let tool = run(&["--model", "digits@2", "--stages", "1,100%", "--soak", "30s"]);
    f.record_until(|r| r.step == Step::Soaking && r.stage == 0).await;
    other.deployment_id = "pinned-by-hand".into();
    other.revision = outpost_sim::operator::clock_revision() + 1000;
    let pin = Topics::default().device_desired("rc-0");
    f.watchers[0].op.publish(&pin, other.to_json(), true).await.unwrap();
    let out = tokio::task::spawn_blocking(move || tool.wait_with_output().unwrap()).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let rec = f.record().await;
    assert_eq!(rec.state, State::Halted, "{rec:?}");
    let held = Deployment::from_json(&f.retained(&pin).await.expect("the pin is kept")).unwrap();
    assert_eq!(held.deployment_id, "pinned-by-hand");
    f.watchers[0].op.publish(&pin, Vec::new(), true).await.unwrap();
    let v1 = f.v1.deployment_id.clone();
    f.state(0, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == v1)).await;

    // (b) The group moved during the last stage's soak: the rollout halts rather than replace it.
    let tool = run(&["--model", "digits@2", "--stages", "1", "--soak", "10s"]);
    f.record_until(|r| r.step == Step::Soaking && r.ids.candidate != rec.ids.candidate).await;
    other.deployment_id = "emergency".into();
    other.revision = outpost_sim::operator::clock_revision() + 1000;
    f.watchers[0].op.publish(&Topics::default().group_desired(GROUP), other.to_json(), true).await.unwrap();
    let out = tokio::task::spawn_blocking(move || tool.wait_with_output().unwrap()).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let rec = f.record().await;
    assert_eq!((rec.state, rec.breach.as_ref().map(|b| b.check.as_str())), (State::Halted, Some("changed")), "{rec:?}");
    assert_eq!(f.group_desired().await.deployment_id, "emergency");
    f.assert_no_overrides().await;
}

/// A rollout in a model slot moves that slot only: the group's `det` slot
/// goes from digits@1 to digits@2 stage by stage while the default slot
/// keeps serving the group's digits@1; the record sits on the slot's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_in_a_slot_moves_that_slot_only() {
    let mut f = fleet_on_v1("rz", 2).await;
    f.reg.register("digits-cnn.onnx", "digits", "2");
    let mut det = f.v1.clone();
    det.deployment_id = "det-v1".into();
    det.slot = Some("det".into());
    let topic = Topics::default().group_model_desired(GROUP, "det");
    f.watchers[0].op.publish(&topic, det.to_json(), true).await.unwrap();
    for i in 0..2 {
        f.state(i, |s| {
            s.models.get("det").and_then(|m| m.active.as_ref()).is_some_and(|a| a.deployment_id == "det-v1")
        })
        .await;
    }
    let (code, out, err) =
        f.rollout(&["--slot", "det", "--model", "digits@2", "--stages", "1,100%", "--soak", "2s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("slot det") && out.contains(": done"), "{out}");
    let rec = Record::from_json(&f.retained(&Topics::default().rollout(GROUP, Some("det"))).await.unwrap()).unwrap();
    assert_eq!((rec.state, rec.slot.as_deref()), (State::Done, Some("det")));
    let group = Deployment::from_json(&f.retained(&topic).await.unwrap()).unwrap();
    assert_eq!((group.model.version.as_str(), group.deployment_id.as_str()), ("2", rec.ids.group.as_str()));
    let v1 = f.v1.deployment_id.clone();
    for i in 0..2 {
        let id = group.deployment_id.clone();
        let s = f
            .state(i, |s| s.models.get("det").and_then(|m| m.active.as_ref()).is_some_and(|a| a.deployment_id == id))
            .await;
        assert_eq!(s.active.as_ref().map(|a| a.deployment_id.as_str()), Some(v1.as_str()), "the default slot moved");
        let pin = f.retained(&Topics::default().device_model_desired(&f.names[i], "det")).await;
        assert_eq!(pin, None, "{} keeps a det override", f.names[i]);
    }
    // Nothing was recorded on the default slot's rollout topic.
    assert_eq!(f.retained(&Topics::default().rollout(GROUP, None)).await, None);
}
