//! The deployer in process, with real models from `fixtures/` served from a
//! `file://` registry, and tokio's clock paused where a window is judged.

use super::*;
use crate::deploy::fetch::{FetchConfig, Fetcher};
use crate::deploy::store::Store;
use crate::link::publisher::{Inbox, outbox};
use outpost_protocol::{DeploymentEvent, DeviceState, Topics};
use std::path::{Path, PathBuf};
use std::time::Duration;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");

/// A one-file bundle of a fixture model in `registry/NAME/VERSION/`:
/// its manifest URL and sha256.
fn bundle(registry: &Path, name: &str, version: &str, fixture: &str) -> (String, String) {
    let dir = registry.join(name).join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let model = std::fs::read(Path::new(FIXTURES).join(fixture)).unwrap();
    std::fs::write(dir.join("model.onnx"), &model).unwrap();
    let sha = |b: &[u8]| {
        use sha2::Digest;
        outpost_protocol::hex(&<[u8; 32]>::from(sha2::Sha256::digest(b)))
    };
    let manifest = serde_json::json!({"schema": "outpost.manifest.v1", "name": name, "version": version,
        "files": [{"path": "model.onnx", "sha256": sha(&model), "size": model.len()}],
        "model": {"format": "onnx", "file": "model.onnx",
                  "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                  "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}});
    let bytes = serde_json::to_vec(&manifest).unwrap();
    std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
    (format!("file://{}", dir.join("manifest.json").display()), sha(&bytes))
}

fn desired(name: &str, version: &str, (url, sha): &(String, String), revision: u64) -> Deployment {
    Deployment::from_json(
        serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": format!("{name}-{version}-{revision}"),
            "revision": revision,
            "model": {"name": name, "version": version, "manifest_url": url, "manifest_sha256": sha}})
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

struct Lab {
    _dir: tempfile::TempDir,
    data: PathBuf,
    registry: PathBuf,
    deployments: Deployments,
    inbox: Inbox,
    engine: Arc<Engine>,
    task: tokio::task::JoinHandle<()>,
}

impl Lab {
    async fn start() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let (data, registry) = (dir.path().join("data"), dir.path().join("registry"));
        let store = Arc::new(Store::open(&data).unwrap());
        let (out, inbox) = outbox();
        let reporter = Arc::new(Reporter::new("lab", &[], Topics::default(), out));
        let engine = Arc::new(Engine::new(1, 8));
        let pipeline = Arc::new(Pipeline {
            store,
            fetcher: Fetcher::new(FetchConfig { file_root: Some(dir.path().to_path_buf()), ..FetchConfig::default() }),
            engine: engine.clone(),
            reporter: reporter.clone(),
            limits: arc_swap::ArcSwap::from_pointee(pipeline::Limits::new(1, 8)),
            http: Default::default(),
            isolation: crate::deploy::isolate::Isolation::InProcess,
            slot: None,
        });
        let (deployer, deployments, _) =
            Deployer::open(pipeline, reporter, super::Authority { device: "dev".into(), ..Default::default() }).await;
        let task = tokio::spawn(deployer.run());
        Lab { _dir: dir, data, registry, deployments, inbox, engine, task }
    }

    /// digits@1 (the MLP) active, then digits@2 (`fixture`) swapped in on
    /// probation for `seconds`: digits@2's deployment and its `active` event.
    async fn on_probation(&mut self, fixture: &str, seconds: u64) -> (Deployment, DeploymentEvent) {
        let v1 = bundle(&self.registry, "digits", "1", "digits-mlp.onnx");
        let v2 = bundle(&self.registry, "digits", "2", fixture);
        let d1 = desired("digits", "1", &v1, 1);
        self.publish(&d1).await;
        assert_eq!(self.until_final(&d1).await.phase, Phase::Active);
        let mut d2 = desired("digits", "2", &v2, 2);
        d2.policy.probation = Some(outpost_protocol::Probation { seconds: Some(seconds), ..Default::default() });
        self.publish(&d2).await;
        let active = self.until_final(&d2).await;
        assert_eq!(active.phase, Phase::Active, "{active:?}");
        (d2, active)
    }

    async fn publish(&self, d: &Deployment) {
        self.deployments.desired(Source::Device, &d.to_json(), 1 << 20).await;
    }

    /// The next event (other messages are skipped).
    async fn event(&mut self) -> DeploymentEvent {
        loop {
            let m = self.inbox.recv().await.expect("the deployer is running");
            if m.topic.ends_with("/events") {
                return DeploymentEvent::from_json(&m.payload).unwrap();
            }
        }
    }

    /// Events until `d` ends (active, failed, ...): the last one.
    async fn until_final(&mut self, d: &Deployment) -> DeploymentEvent {
        loop {
            let ev = self.event().await;
            if ev.deployment_id == d.deployment_id && ev.phase.is_final() {
                return ev;
            }
        }
    }
}

/// The probation window is a timer of the deployer: the version passes
/// when its window closes, not a moment before (tokio's clock is paused and
/// moved by hand).
#[tokio::test(start_paused = true)]
async fn a_probation_window_closes_on_its_timer() {
    let mut lab = Lab::start().await;
    let (d2, active) = lab.on_probation("digits-cnn.onnx", 60).await;
    assert!(active.detail.unwrap().contains("on probation for 60 s"));

    tokio::time::advance(Duration::from_secs(59)).await;
    let early = tokio::time::timeout(Duration::from_millis(10), lab.event()).await;
    assert!(early.is_err(), "judged before the window closed: {early:?}");
    tokio::time::advance(Duration::from_secs(2)).await;
    let passed = lab.event().await;
    assert_eq!((passed.deployment_id.as_str(), passed.phase), (d2.deployment_id.as_str(), Phase::Active));
    assert!(passed.detail.unwrap().starts_with("probation passed: 0 request(s)"));
    assert_eq!(lab.engine.active().unwrap().version, "2");
}

/// Regression (issue 13, defect 4), in the deployer's shape: the record is
/// written by one owner, each write awaited, so after any burst of desired
/// states the file holds what the last retained state published (the old
/// reporter cloned under its lock and wrote outside it: the file could end
/// with an older record than the one published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_desired_states_the_file_is_the_last_published_state() {
    let mut lab = Lab::start().await;
    let v1 = bundle(&lab.registry, "digits", "1", "digits-mlp.onnx");
    let senders: Vec<_> = (0..4u64)
        .map(|t| {
            let (deployments, v1) = (lab.deployments.clone(), v1.clone());
            tokio::spawn(async move {
                for i in 0..15u64 {
                    let revision = 1 + t * 100 + i;
                    let payload = match i % 3 {
                        0 => desired("digits", "1", &v1, revision).to_json(),
                        1 => Vec::new(),
                        _ => {
                            let bad = ("file:///nonexistent/manifest.json".to_string(), v1.1.clone());
                            desired("digits", "1", &bad, revision).to_json()
                        }
                    };
                    deployments.desired(Source::Group(t as usize), &payload, 1 << 20).await;
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    lab.deployments.stop();
    lab.deployments.finish();
    lab.task.await.unwrap();
    let mut last_state = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), lab.inbox.recv()).await {
        if m.topic.ends_with("/state") {
            last_state = Some(DeviceState::from_json(&m.payload).unwrap());
        }
    }
    let last_state = last_state.expect("a state was published");
    let on_disk: record::Record = serde_json::from_slice(&std::fs::read(lab.data.join(record::FILE)).unwrap()).unwrap();
    assert_eq!(
        serde_json::to_value(&on_disk.last_deployment).unwrap(),
        serde_json::to_value(&last_state.last_deployment).unwrap()
    );
    assert_eq!(
        on_disk.active.map(|a| a.deployment.deployment_id),
        last_state.active.map(|a| a.deployment_id),
        "the file and the retained state disagree on what is active"
    );
    assert!(on_disk.seq <= last_state.seq);
}

/// A version on probation that fails a request while the agent drains (the
/// deployment is stopped, requests still finish): the rollback is recorded
/// before the deployer ends, so the restarted agent serves the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_the_drain_is_recorded() {
    let mut lab = Lab::start().await;
    let (d2, _) = lab.on_probation("digits-fragile.onnx", 600).await;

    lab.deployments.stop();
    // The first pixel at 16 turns the fragile model non-finite: v1 answers.
    let mut pixels = vec![0.0f64; 64];
    pixels[0] = 16.0;
    let req = outpost_protocol::InferRequest::from_json(
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    // The third non-finite output rolls back (policy.probation.max_non_finite).
    for _ in 0..3 {
        assert_eq!(lab.engine.infer(req.clone(), crate::serve::Transport::Http).await.unwrap().model_version, "1");
    }
    lab.deployments.finish();
    (&mut lab.task).await.unwrap();
    let on_disk: record::Record = serde_json::from_slice(&std::fs::read(lab.data.join(record::FILE)).unwrap()).unwrap();
    assert_eq!(on_disk.active.unwrap().deployment.model.version, "1");
    assert_eq!(on_disk.rolled_back.unwrap().deployment.deployment_id, d2.deployment_id);
    let rolled_back = loop {
        let ev = lab.event().await;
        if ev.phase == Phase::RolledBack {
            break ev;
        }
    };
    assert_eq!(rolled_back.deployment_id, d2.deployment_id);
}

#[test]
fn versions_order_as_people_number_them() {
    use super::version_order;
    use std::cmp::Ordering::*;
    for (a, b, o) in [
        ("1", "2", Less),
        ("2", "10", Less),
        ("1.9", "1.10", Less),
        ("v2", "v10", Less),
        ("1.0", "1.0.1", Less),
        ("2", "2", Equal),
        ("007", "7", Equal),
        ("2024-01-02", "2024-01-10", Less),
        ("b", "a", Greater),
        ("1.0-rc1", "1.0", Less),
        ("1.0", "1.0-rc2", Greater),
        ("1.0-rc1", "1.0-rc2", Less),
    ] {
        assert_eq!(version_order(a, b), o, "{a} vs {b}");
    }
}
