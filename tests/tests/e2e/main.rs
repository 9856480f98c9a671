//! End to end, with real processes: a Mosquitto broker per test, the registry
//! over HTTP, and the `outpost` binary as the device.
#![allow(clippy::unwrap_used)]

use outpost_protocol::{ErrorCode, Outcome, Phase};
use outpost_tests::*;
use std::time::Duration;

mod broker;
mod core;
mod deploy;
mod download;
mod lifecycle;
mod serving;
mod store;

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
    assert_eq!(std::fs::read_dir(data_dir.join("tmp")).unwrap().count(), 0, "leftovers in tmp/");
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
