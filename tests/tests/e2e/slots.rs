//! Model slots: several models on one device, each with its own desired
//! topic (`devices/{d}/models/{slot}/desired`, and its groups'), served at
//! `/v2/models/{slot}` and on `models/{slot}/infer`, deployed, refused,
//! swapped and restored independently of the others.

use super::*;
use outpost_protocol::{DeploymentEvent, DeviceState, Topics};

/// A deployment of `name@version` for model slot `slot` of `w`'s device (or of `group`).
async fn slot_deployment(reg: &Registry, slot: &str, name: &str, version: &str) -> outpost_protocol::Deployment {
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, name, version).await.unwrap();
    let mut d =
        outpost_sim::operator::deployment(name, version, &url, &sha, None, Some(format!("{slot}-{name}-{version}")));
    d.policy.allow_downgrade = Some(true);
    d
}

async fn deploy_slot(
    w: &mut Watcher,
    slot: &str,
    d: &outpost_protocol::Deployment,
) -> (DeploymentEvent, Vec<DeploymentEvent>) {
    let topic = Topics::default().device_model_desired(&w.device, slot);
    w.op.publish(&topic, d.to_json(), true).await.unwrap();
    w.events_until_final(&d.deployment_id).await
}

async fn infer_http(port: u16, model: &str, id: &str) -> (u16, serde_json::Value) {
    let mut req = digits_request(20);
    req["id"] = id.into();
    http("POST", format!("http://127.0.0.1:{port}/v2/models/{model}/infer"), Some(serde_json::to_vec(&req).unwrap()))
        .await
}

fn versions_in_store(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("versions")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_model_slots_deploy_swap_fail_and_restore_independently() {
    let (mut broker, reg, _data, mut w, mut agent) = Lab::device("cam-1")
        .groups(&["cams"])
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits-cnn", "1")
        .model("digits-cnn.onnx", "digits-cnn", "2")
        .start()
        .await;
    let port = agent.http_port;

    // The device's own desired topic works exactly as before: its model serves under its name.
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // Two slots: a detector and a classifier (the same version as the default
    // slot's: its files are stored once).
    let det = slot_deployment(&reg, "det", "digits-cnn", "1").await;
    let (last, events) = deploy_slot(&mut w, "det", &det).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert!(events.iter().all(|e| e.slot.as_deref() == Some("det")), "every event names its slot: {events:?}");
    let cls = slot_deployment(&reg, "cls", "digits", "1").await;
    assert_eq!(deploy_slot(&mut w, "cls", &cls).await.0.phase, Phase::Active);
    assert_eq!(versions_in_store(&agent.data_dir), 2, "digits@1 is kept once for two slots");

    // Each serves under its slot's name, over HTTP and MQTT; the default under its model's name.
    for (model, expected) in [("det", CNN_EXPECTED), ("cls", MLP_EXPECTED), ("digits", MLP_EXPECTED)] {
        let (status, answer) = infer_http(port, model, &format!("h-{model}")).await;
        assert_eq!(status, 200, "{model}: {answer}");
        let (diff, accuracy) = score(&answer, &expected_probabilities(expected)[..20]);
        assert!(diff < 1e-4 && accuracy >= 0.85, "{model}: {diff} {accuracy}");
    }
    let (status, meta) = http("GET", format!("http://127.0.0.1:{port}/v2/models/det"), None).await;
    assert_eq!((status, meta["name"].as_str(), meta["versions"].clone()), (200, Some("det"), serde_json::json!(["1"])));
    let mut req = digits_request(3);
    req["id"] = "m-det".into();
    w.client
        .publish(&Topics::default().model_infer("cam-1", "det"), serde_json::to_vec(&req).unwrap(), false)
        .await
        .unwrap();
    let answer = loop {
        let m = w.client.next(Duration::from_secs(30)).await.expect("an answer from slot det");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if v["id"] == "m-det" {
            break v;
        }
    };
    assert_eq!(answer["model_name"], "digits-cnn", "{answer}");
    // A slot with nothing in it, or none at all: no_model.
    let (status, body) = infer_http(port, "nothing", "h-none").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("no_model")), "{body}");

    // The retained state shows every slot, the default one in its usual fields.
    let state = w
        .state(&broker, |s: &DeviceState| {
            s.models.get("det").and_then(|m| m.active.as_ref()).is_some()
                && s.models.get("cls").and_then(|m| m.active.as_ref()).is_some()
        })
        .await;
    assert_eq!(state.active.as_ref().unwrap().name, "digits");
    assert_eq!(state.models["det"].active.as_ref().unwrap().name, "digits-cnn");
    assert_eq!(state.groups, vec!["cams".to_string()]);

    // Independent swap: det moves to v2 while cls keeps answering.
    let det2 = slot_deployment(&reg, "det", "digits-cnn", "2").await;
    let topic = Topics::default().device_model_desired("cam-1", "det");
    w.op.publish(&topic, det2.to_json(), true).await.unwrap();
    let mut answered = 0;
    let swapped = loop {
        let (status, body) = infer_http(port, "cls", &format!("c-{answered}")).await;
        assert_eq!(status, 200, "cls during det's swap: {body}");
        assert_eq!(body["model_version"], "1");
        answered += 1;
        if let Some(m) = w.op.next(Duration::from_millis(20)).await
            && m.topic.ends_with("/events")
            && let Ok(ev) = DeploymentEvent::from_json(&m.payload)
            && ev.deployment_id == det2.deployment_id
            && ev.phase.is_final()
        {
            break ev;
        }
        assert!(answered < 20_000, "det's swap never ended");
    };
    assert_eq!(swapped.phase, Phase::Active, "{swapped:?}");
    assert_eq!(infer_http(port, "det", "d2").await.1["model_version"], "2");

    // A refused deployment in one slot leaves it, and the others, serving.
    let mut broken = slot_deployment(&reg, "cls", "digits", "1").await;
    broken.deployment_id = "cls-broken".into();
    broken.model.manifest_sha256 = "0".repeat(64);
    let (last, _) = deploy_slot(&mut w, "cls", &broken).await;
    assert_eq!((last.phase, last.slot.as_deref()), (Phase::Failed, Some("cls")), "{last:?}");
    assert_eq!(last.error.as_ref().unwrap().code, ErrorCode::DigestMismatch, "{last:?}");
    for model in ["cls", "det", "digits"] {
        assert_eq!(infer_http(port, model, "after-refusal").await.0, 200, "{model} still serves");
    }
    // A slot named like the default slot's model, with nothing deployed in it
    // (its deployment failed), does not hide that model.
    let mut homonym = slot_deployment(&reg, "digits", "digits", "1").await;
    homonym.deployment_id = "homonym".into();
    homonym.model.manifest_sha256 = "1".repeat(64);
    assert_eq!(deploy_slot(&mut w, "digits", &homonym).await.0.phase, Phase::Failed);
    let (status, answer) = infer_http(port, "digits", "homonym").await;
    assert_eq!((status, answer["model_name"].as_str()), (200, Some("digits")), "{answer}");
    // The endpoint is the device's: a slot may not move its port.
    let mut ported = slot_deployment(&reg, "cls", "digits", "1").await;
    ported.deployment_id = "cls-port".into();
    ported.serving.http_port = Some(outpost_sim::broker::free_port().unwrap());
    let (last, _) = deploy_slot(&mut w, "cls", &ported).await;
    assert_eq!(last.error.as_ref().map(|e| e.code), Some(ErrorCode::InvalidMessage), "{last:?}");
    assert!(last.error.as_ref().unwrap().message.starts_with("serving.http_port: model slot cls"), "{last:?}");

    // A group's slot topic reaches the slot too (the device's own outranks it).
    let mut grouped = slot_deployment(&reg, "ocr", "digits-cnn", "1").await;
    grouped.deployment_id = "group-ocr".into();
    w.op.publish(&Topics::default().group_model_desired("cams", "ocr"), grouped.to_json(), true).await.unwrap();
    let (last, _) = w.events_until_final("group-ocr").await;
    assert_eq!((last.phase, last.slot.as_deref()), (Phase::Active, Some("ocr")), "{last:?}");

    // A restart with the broker down: every slot serves again from the store.
    broker.stop();
    agent.kill_and_restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the endpoint did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let (a, b, c) = (
            infer_http(port, "det", "r1").await,
            infer_http(port, "cls", "r2").await,
            infer_http(port, "ocr", "r3").await,
        );
        if a.0 == 200 && b.0 == 200 && c.0 == 200 {
            assert_eq!(a.1["model_version"], "2");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slots not restored: {a:?} {b:?} {c:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.restart();
    let mut w = Watcher::new(&broker, "cam-1").await;
    w.online().await;

    // Withdrawing a slot stops it alone.
    w.op.publish(&topic, Vec::new(), true).await.unwrap();
    let ev = w.event(|e| e.phase == Phase::Undeployed).await;
    assert_eq!(ev.slot.as_deref(), Some("det"));
    let (status, body) = infer_http(port, "det", "gone").await;
    assert_eq!((status, body["code"].as_str()), (503, Some("no_model")), "{body}");
    for model in ["cls", "ocr", "digits"] {
        assert_eq!(infer_http(port, model, "still").await.0, 200, "{model} still serves");
    }
}

/// Shadow scoring: a deployment serves one version and scores a candidate
/// beside it on sampled live requests; the candidate never answers, its
/// agreement and latency reach telemetry and `shadow` events, in the
/// default slot and in a model slot alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_is_scored_on_live_requests_without_answering_them() {
    let (broker, reg, _data, mut w, agent) = Lab::device("cam-2")
        .flags(&["--telemetry-interval", "1"])
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .start()
        .await;
    let port = agent.http_port;
    let mut telemetry =
        outpost_sim::operator::Operator::connect(&broker.url(), "telemetry-cam-2", Topics::default()).await.unwrap();
    telemetry.subscribe(&Topics::default().telemetry("cam-2")).await.unwrap();

    let mut d = slot_deployment(&reg, "x", "digits", "1").await;
    d.deployment_id = "shadowed".into();
    let candidate = slot_deployment(&reg, "x", "digits", "2").await;
    d.shadow = Some(outpost_protocol::Shadow { model: candidate.model.clone(), sample_rate: 1.0 });
    w.publish_desired(d.to_json()).await;
    let (last, events) = w.events_until_final("shadowed").await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert!(last.detail.as_deref().unwrap().contains("scoring digits@2 in shadow on 100% of requests"), "{last:?}");

    // Live requests: answered by the active version only.
    for i in 0..40 {
        let (status, answer) = infer_http(port, "digits", &format!("s{i}")).await;
        assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
    }
    // Telemetry carries the candidate's figures; CNN and MLP mostly agree on digits.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stats = loop {
        assert!(std::time::Instant::now() < deadline, "no shadow figures in telemetry");
        let Some(m) = telemetry.next(Duration::from_millis(500)).await else { continue };
        let t: outpost_protocol::Telemetry = serde_json::from_slice(&m.payload).unwrap();
        if let Some(s) = t.shadow.filter(|s| s.compared + s.skipped >= 40) {
            break s;
        }
    };
    assert_eq!((stats.model.name.as_str(), stats.model.version.as_str()), ("digits", "2"));
    assert!(stats.compared >= 1 && stats.errors == 0, "{stats:?}");
    assert!(stats.agreement >= 0.8 && stats.max_abs_diff > 0.0, "{stats:?}");
    assert!(stats.latency_us.p50 > 0 && stats.active_latency_us.p50 > 0, "{stats:?}");
    let ev = w.event(|e| e.phase == Phase::Shadow).await;
    assert_eq!(ev.deployment_id, "shadowed");
    assert!(ev.shadow.as_ref().is_some_and(|s| s.compared >= 1), "{ev:?}");

    // Promotion: a deployment of the candidate ends the scoring, with a final report.
    let mut promoted = candidate.clone();
    promoted.deployment_id = "promoted".into();
    // Both came from the clock, maybe within one millisecond.
    promoted.revision = d.revision + 1;
    w.publish_desired(promoted.to_json()).await;
    let (last, events) = w.events_until_final("promoted").await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert_eq!(infer_http(port, "digits", "after").await.1["model_version"], "2");
    let state = w.state(&broker, |s: &DeviceState| s.active.as_ref().is_some_and(|a| a.version == "2")).await;
    assert!(state.models.is_empty());
}

/// With trust keys, `outpost-sim deploy --slot` signs a deployment bound to
/// its slot: replayed into another slot (or onto the default topic) it is
/// refused and what serves there keeps serving; `undeploy --slot` withdraws
/// that slot alone; `deploy --shadow` asks for shadow scoring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_slot_deployments_stay_in_their_slot() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("root").display().to_string();
    let (code, out, err) = sim(&["keygen", &key]);
    assert_eq!(code, 0, "{out}{err}");
    let (broker, reg, _data, mut w, agent) = Lab::device("cam-3")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .flags(&["--trust-key", &format!("{key}.pub.pem")])
        .start()
        .await;
    let port = agent.http_port;
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let sign = format!("{key}.pem");
    let deploy = |model: &str, id: &str, slot: Option<&str>, extra: &[&str]| {
        let mut args = vec!["deploy", "--broker", &url, "--device", "cam-3", "--model", model];
        args.extend(["--registry-url", &reg.url, "--sign-key", &sign, "--deployment-id", id]);
        if let Some(s) = slot {
            args.extend(["--slot", s]);
        }
        args.extend(extra);
        let (code, out, err) = sim(&args);
        assert_eq!(code, 0, "{out}{err}");
    };
    deploy("digits@1", "default-1", None, &[]);
    assert_eq!(w.events_until_final("default-1").await.0.phase, Phase::Active);
    deploy("digits@2", "det-2", Some("det"), &["--shadow", "digits@1", "--shadow-sample", "0.5"]);
    let (last, _) = w.events_until_final("det-2").await;
    assert_eq!((last.phase, last.slot.as_deref()), (Phase::Active, Some("det")), "{last:?}");
    assert!(last.detail.as_deref().unwrap().contains("scoring digits@1 in shadow on 50% of requests"), "{last:?}");

    // The signed message, copied from det's retained topic to cls's and to the default topic.
    let mut spy = outpost_sim::operator::Operator::connect(&broker.url(), "spy", Topics::default()).await.unwrap();
    spy.subscribe(&Topics::default().device_model_desired("cam-3", "det")).await.unwrap();
    let signed = spy.next(Duration::from_secs(10)).await.expect("the retained signed deployment").payload;
    for topic in [Topics::default().device_model_desired("cam-3", "cls"), Topics::default().device_desired("cam-3")] {
        spy.publish(&topic, signed.to_vec(), false).await.unwrap();
        let ev = w.event(|e| e.phase == Phase::Failed).await;
        let e = ev.error.as_ref().unwrap();
        assert_eq!(e.code, ErrorCode::SignatureInvalid, "{ev:?}");
        assert!(e.message.contains("arrived on the desired topic of"), "{ev:?}");
    }
    assert_eq!(infer_http(port, "digits", "still-1").await.1["model_version"], "1");
    assert_eq!(infer_http(port, "det", "still-2").await.1["model_version"], "2");
    // Refused, the replay left no slot behind.
    assert_eq!(infer_http(port, "cls", "none").await.0, 404);
    assert!(!agent.data_dir.join("slots/cls.json").exists());

    // A signed undeploy of the slot withdraws it alone.
    let (code, out, err) =
        sim(&["undeploy", "--broker", &url, "--device", "cam-3", "--slot", "det", "--sign-key", &sign]);
    assert_eq!(code, 0, "{out}{err}");
    let ev = w.event(|e| e.phase == Phase::Undeployed).await;
    assert_eq!(ev.slot.as_deref(), Some("det"));
    assert_eq!(infer_http(port, "det", "gone").await.0, 503);
    assert_eq!(infer_http(port, "digits", "kept").await.0, 200);
    // A bad slot name is the operator's mistake (64), caught before publishing.
    let (code, _, err) = sim(&[
        "deploy",
        "--broker",
        &url,
        "--device",
        "cam-3",
        "--model",
        "digits@1",
        "--registry-url",
        &reg.url,
        "--slot",
        "a.b",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--slot"), "{err}");
}

/// Each slot has its own worker pool: a slow model flooded past its queue
/// refuses its own overflow (`overloaded`) while the model in another slot
/// answers every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_slot_does_not_queue_another_slots_requests() {
    let (_broker, reg, _data, mut w, agent) =
        Lab::device("cam-4").model("slow.onnx", "slow", "1").model("digits-mlp.onnx", "digits", "1").start().await;
    let port = agent.http_port;
    let mut slow = slot_deployment(&reg, "heavy", "slow", "1").await;
    slow.serving.workers = Some(1);
    slow.serving.max_queue = Some(1);
    assert_eq!(deploy_slot(&mut w, "heavy", &slow).await.0.phase, Phase::Active);
    let fast = slot_deployment(&reg, "light", "digits", "1").await;
    assert_eq!(deploy_slot(&mut w, "light", &fast).await.0.phase, Phase::Active);

    let mut req = digits_request(256);
    req["id"] = "flood".into();
    let body = serde_json::to_vec(&req).unwrap();
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (format!("http://127.0.0.1:{port}/v2/models/heavy/infer"), body.clone());
            tokio::spawn(async move { http("POST", url, Some(body)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..20 {
        let (status, answer) = infer_http(port, "light", &format!("l{i}")).await;
        assert_eq!(status, 200, "the light slot while the heavy one is flooded: {answer}");
    }
    let mut statuses = Vec::new();
    for f in flood {
        let (status, body) = f.await.unwrap();
        if status != 200 {
            assert_eq!(body["code"], "overloaded", "{body}");
        }
        statuses.push(status);
    }
    assert!(statuses.contains(&503), "the heavy slot's own queue overflowed: {statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}

/// Regression (review of the slots): slot b swapped a new version in and,
/// before its retention pass recorded what it keeps, slot a's retention
/// removed b's new version from the store; b then had nothing to serve
/// after a restart. Retention now waits until no other slot is between
/// the start of a deployment and the end of its swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slots_retention_never_removes_the_version_another_slot_just_swapped_in() {
    let (mut broker, reg, _data, mut w, mut agent) = Lab::device("cam-5")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits-cnn", "1")
        .env("OUTPOST_DELAY_AT", "retention-b:4000")
        .start()
        .await;
    let port = agent.http_port;
    let b = slot_deployment(&reg, "b", "digits-cnn", "1").await;
    let topic_b = Topics::default().device_model_desired("cam-5", "b");
    w.op.publish(&topic_b, b.to_json(), true).await.unwrap();
    // b is swapped in (its `active` event waits for its retention): now a deploys and retains.
    agent.wait_log("OUTPOST_DELAY_AT=retention-b", 1, Duration::from_secs(30));
    let a = slot_deployment(&reg, "a", "digits", "1").await;
    assert_eq!(deploy_slot(&mut w, "a", &a).await.0.phase, Phase::Active);
    assert_eq!(w.events_until_final(&b.deployment_id).await.0.phase, Phase::Active);
    assert_eq!(versions_in_store(&agent.data_dir), 2, "b's version is still in the store");
    assert_store_consistent(&agent.data_dir);

    // And it serves again after a restart, with no broker or registry to fetch it from.
    broker.stop();
    drop(reg);
    agent.kill_and_restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the endpoint did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(infer_http(port, "b", "after-restart").await.0, 200);
    assert_eq!(infer_http(port, "a", "after-restart").await.0, 200);
}

async fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the endpoint did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Regression (review of the slots): an agent that cannot bind its HTTP
/// port exits cleanly for the default slot only; each slot's record kept
/// saying "running", so three such starts quarantined the slot's model as
/// a crash loop. And one unclean exit counted against every slot's model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_and_crashes_are_not_blamed_on_every_slot() {
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("cam-6")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits-cnn", "1")
        .start()
        .await;
    let port = agent.http_port;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let det = slot_deployment(&reg, "det", "digits-cnn", "1").await;
    assert_eq!(deploy_slot(&mut w, "det", &det).await.0.phase, Phase::Active);

    // Three starts that fail to bind the port (held by someone else): each exits 1.
    agent.signal(rustix::process::Signal::TERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    for _ in 0..3 {
        agent.spawn();
        let status = agent.wait_exit(Duration::from_secs(30)).expect("exits: the port is taken");
        assert_eq!(status.code(), Some(1));
    }
    drop(squatter);
    agent.spawn();
    wait_for_port(port).await;
    assert_eq!(infer_http(port, "det", "after-failed-starts").await.0, 200, "det is not quarantined");
    assert_eq!(infer_http(port, "digits", "after-failed-starts").await.0, 200);

    // Three hard kills: blamed on the slot whose version went live last (det), not on every model.
    for _ in 0..3 {
        agent.kill_and_restart();
        wait_for_port(port).await;
    }
    assert_eq!(infer_http(port, "digits", "after-crashes").await.0, 200, "the default slot's model keeps serving");
    let ev = w.event(|e| e.error.as_ref().is_some_and(|e| e.code == ErrorCode::ModelCrashed)).await;
    assert_eq!(ev.slot.as_deref(), Some("det"), "{ev:?}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("agent.json")).unwrap()).unwrap();
    assert!(record["quarantined"].is_null(), "the default slot was blamed: {record}");
}

/// A 17th model slot is refused `slot_limit` under the deployment's own id;
/// the slots the device has keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seventeenth_slot_is_refused_and_the_others_keep_serving() {
    let (_broker, reg, _data, mut w, agent) =
        Lab::device("cam-7").model("digits-mlp.onnx", "digits", "1").start().await;
    for i in 0..16 {
        let d = slot_deployment(&reg, &format!("s{i}"), "digits", "1").await;
        assert_eq!(deploy_slot(&mut w, &format!("s{i}"), &d).await.0.phase, Phase::Active, "slot s{i}");
    }
    let d = slot_deployment(&reg, "s16", "digits", "1").await;
    let (last, _) = deploy_slot(&mut w, "s16", &d).await;
    assert_eq!((last.phase, last.slot.as_deref()), (Phase::Failed, Some("s16")), "{last:?}");
    assert_eq!(last.error.as_ref().map(|e| e.code), Some(ErrorCode::SlotLimit), "{last:?}");
    assert!(last.error.as_ref().unwrap().message.contains("at most 16"), "{last:?}");
    assert_eq!(infer_http(agent.http_port, "s15", "still").await.0, 200);
    assert_eq!(infer_http(agent.http_port, "s16", "none").await.0, 404);
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{}/metrics", agent.http_port), None).await;
    assert!(metrics.as_str().unwrap().contains("outpost_desired_refused_total{code=\"slot_limit\"} 1"), "{metrics}");
}
