//! End to end, with real processes: a Mosquitto broker per test, the registry
//! over HTTP, and the `outpost` binary as the device.
#![allow(clippy::unwrap_used)]

use outpost_protocol::{ErrorCode, Outcome, Phase};
use outpost_tests::*;
use std::time::Duration;

mod broker;
mod cli;
mod core;
mod dashboard;
mod deploy;
mod download;
mod fleet;
mod hostile;
mod lifecycle;
mod onnxruntime;
mod packaging;
mod rabbitmq;
mod rollout;
mod serving;
mod slots;
mod status;
mod store;
mod trust;

const MLP_EXPECTED: &str = "digits-mlp-expected.json";

const CNN_EXPECTED: &str = "digits-cnn-expected.json";

/// The version the agent's state file on disk says is serving.
fn persisted_active(data_dir: &std::path::Path) -> Option<String> {
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir.join("agent.json")).ok()?).ok()?;
    record["active"]["deployment"]["model"]["version"].as_str().map(str::to_string)
}

/// Every stored version re-verifies: each file has its manifest's size and sha256.
fn assert_store_consistent(data_dir: &std::path::Path) {
    let store = outpost_agent::deploy::store::Store::open(data_dir).unwrap();
    for entry in std::fs::read_dir(data_dir.join("versions")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        store.verify_version(&name).unwrap_or_else(|e| panic!("stored version {name}: {e}"));
    }
    // A running agent may be in the middle of a write (its temp file, then a rename).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<_> = std::fs::read_dir(data_dir.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "leftovers in tmp/: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deploys digits@`version` from `reg` under manifest digest `sha`, expects
/// it to fail, and returns why.
async fn refused(w: &mut Watcher, reg: &Registry, version: &str, sha: &str) -> outpost_protocol::ErrorInfo {
    let (last, events) = w.deploy_raw("digits", version, &reg.manifest_url("digits", version), sha).await;
    assert_eq!(last.phase, Phase::Failed, "{events:?}");
    last.error.unwrap()
}

async fn resolve(version: &str, reg: &Registry) -> String {
    outpost_sim::operator::resolve_manifest(&reg.url, "digits", version).await.unwrap().1
}

/// A device mid-outage: digits@1 active, then digits@2 deployed through a
/// registry that stalls, the (persistent) broker stopped during the download;
/// returned once v2 is active on disk and its `active` event journaled.
struct Outage {
    broker: Mosquitto,
    _reg: Registry,
    _faulty: FaultyRegistry,
    _data: tempfile::TempDir,
    dir: std::path::PathBuf,
    w: Watcher,
    agent: Agent,
    d: outpost_protocol::Deployment,
    /// The events seen before the broker stopped.
    seen: Vec<outpost_protocol::DeploymentEvent>,
}

async fn deploy_through_an_outage(device: &str) -> Outage {
    let broker = Mosquitto::start_with(true);
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join(device);
    // A watcher whose session the broker keeps across its restart.
    let mut w = Watcher::connect(&broker, device, "", false).await;
    let agent =
        Agent::start_with(broker.port, device, &dir, &[], &["--stall-timeout", "1", "--download-attempts", "4"]);
    w.online().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // v2's model stalls for a while: the broker goes down during the download.
    faulty.inject("digits/2/model.onnx", &[Fault::Stall(2000, Duration::from_secs(3))]);
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let d = outpost_sim::operator::deployment("digits", "2", &url.replace(&reg.url, &faulty.url), &sha, None, None);
    w.publish_desired(d.to_json()).await;
    let seen = vec![w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Downloading).await];
    let mut broker = broker;
    broker.stop();

    // The deployment completes while the broker is away.
    let journaled = |dir: &std::path::Path| std::fs::read_to_string(dir.join("journal.jsonl")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while persisted_active(&dir).as_deref() != Some("2") || !journaled(&dir).contains(r#"\"phase\":\"active\""#) {
        assert!(std::time::Instant::now() < deadline, "the deployment did not complete offline: {}", journaled(&dir));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Outage { broker, _reg: reg, _faulty: faulty, _data: data, dir, w, agent, d, seen }
}

fn with_probation(mut d: outpost_protocol::Deployment, p: outpost_protocol::Probation) -> outpost_protocol::Deployment {
    d.policy.probation = Some(p);
    d
}
