#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report
//! Round trip of every message type against the golden JSON in `protocol/golden/`:
//! parse, serialize, and compare as JSON values, so a field rename or a dropped
//! field (a break of the operators' contract) fails here.

use outpost_protocol::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/golden/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn round_trip<T: Serialize + DeserializeOwned>(name: &str, parse: impl Fn(&[u8]) -> T) -> T {
    let bytes = golden(name);
    let value: T = parse(&bytes);
    let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let again = serde_json::to_value(&value).unwrap();
    assert_eq!(again, original, "{name} does not round-trip");
    value
}

#[test]
fn deployment() {
    let d = round_trip("deployment.json", |b| Deployment::from_json(b).unwrap());
    assert_eq!(d.serving.max_queue, Some(64));
}

#[test]
fn manifest() {
    let m = round_trip("manifest.json", |b| Manifest::from_json(b).unwrap());
    assert_eq!(m.files.len(), 4);
}

#[test]
fn state() {
    let s = round_trip("state.json", |b| DeviceState::from_json(b).unwrap());
    assert_eq!(s.last_deployment.unwrap().error.unwrap().code, ErrorCode::DigestMismatch);
    assert_eq!(s.models["det"].active.as_ref().unwrap().version, "8");
    assert_eq!(s.groups, ["cameras"]);
}

#[test]
fn events() {
    let e = round_trip("event.json", |b| DeploymentEvent::from_json(b).unwrap());
    assert_eq!(e.progress, Some(Progress { bytes: 1024, total: 4096 }));
    let f = round_trip("event-failed.json", |b| DeploymentEvent::from_json(b).unwrap());
    assert_eq!(f.phase, Phase::Failed);
}

#[test]
fn telemetry() {
    let t = round_trip("telemetry.json", |b| serde_json::from_slice::<Telemetry>(b).unwrap());
    assert_eq!(t.shadow.unwrap().top1_agree, 118);
    assert_eq!(t.models["det"].inference.rejected, 1);
}

#[test]
fn inference() {
    let r = round_trip("infer-request.json", |b| InferRequest::from_json(b).unwrap());
    assert_eq!(r.inputs[0].data.len(), 4);
    round_trip("infer-response.json", |b| serde_json::from_slice::<InferResponse>(b).unwrap());
    let e = round_trip("infer-error.json", |b| serde_json::from_slice::<InferError>(b).unwrap());
    assert_eq!(e.code, ErrorCode::BadInput);
}

/// A cross-implementation vector: an envelope signed with openssl alone
/// (`scripts/sign-deployment.sh`, key `signing-root.pub.pem`) verifies.
#[test]
fn signed_desired_state() {
    use outpost_protocol::trust::{Desired, PublicKey, Target, Trust, Undeploy};
    let root = PublicKey::parse(std::str::from_utf8(&golden("signing-root.pub.pem")).unwrap()).unwrap();
    let trust = Trust { roots: vec![root] };
    let cam = Target::Device("cam-17".into());
    let now = std::time::SystemTime::now();
    let (desired, _) = trust.open(&golden("deployment-signed.json"), &cam, now).unwrap();
    let Desired::Deploy(d) = desired else { panic!("{desired:?}") };
    assert_eq!((d.revision, d.target), (43, Some(cam.clone())));
    let (desired, _) = trust.open(&golden("undeploy-signed.json"), &cam, now).unwrap();
    assert_eq!(desired, Desired::Undeploy { revision: Some(44), deployment_id: None });
    let u = round_trip("undeploy.json", |b| serde_json::from_slice::<Undeploy>(b).unwrap());
    assert_eq!(u.revision, 44);
    round_trip("key-certificate.json", |b| {
        serde_json::from_slice::<outpost_protocol::trust::KeyCertificate>(b).unwrap()
    });
    // The same envelope on another device's topic is refused.
    let e = trust.open(&golden("deployment-signed.json"), &Target::Device("cam-18".into()), now).unwrap_err();
    assert_eq!(e.error.code, ErrorCode::SignatureInvalid);
}
