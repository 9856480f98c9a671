//! End to end, with real processes: a Mosquitto broker per test, the registry
//! over HTTP, and the `outpost` binary as the device.
#![allow(clippy::unwrap_used)]

use outpost_protocol::{ErrorCode, Outcome, Phase};
use outpost_tests::*;
use std::time::Duration;

const MLP_EXPECTED: &str = "digits-mlp-expected.json";
const CNN_EXPECTED: &str = "digits-cnn-expected.json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_message_becomes_served_predictions_and_versions_swap() {
    let (broker, reg, _data, mut w, _agent) = lab("dev1", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");

    // Before any deployment: a clear `no_model` answer with the request's id.
    let answer = w.infer("r-0", digits_request(1)).await;
    assert_eq!(answer["code"], "no_model", "{answer}");

    let (last, events) = w.deploy(&reg, "digits", "1").await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert_eq!(
        phase_names(&events),
        [Phase::Received, Phase::Downloading, Phase::Verifying, Phase::Loading, Phase::Validating, Phase::Active]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq must increase: {seqs:?}");
    let state = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.version == "1")).await;
    assert_eq!(state.last_deployment.unwrap().outcome, Outcome::Active);

    // All 450 held-out digits in one batch: tract matches onnxruntime.
    let answer = w.infer("r-1", digits_request(450)).await;
    assert_eq!((answer["model_name"].as_str(), answer["model_version"].as_str()), (Some("digits"), Some("1")));
    let (diff, accuracy) = score(&answer, &expected_probabilities(MLP_EXPECTED));
    assert!(diff < 1e-4, "max difference from onnxruntime {diff}");
    assert!(accuracy > 0.97, "accuracy {accuracy}");
    let top = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "probabilities_top_k").unwrap();
    assert_eq!(top["shape"], serde_json::json!([450, 3]));

    // A second version replaces the first.
    let (last, events) = w.deploy(&reg, "digits", "2").await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    let answer = w.infer("r-2", digits_request(450)).await;
    assert_eq!(answer["model_version"], "2");
    let (diff, accuracy) = score(&answer, &expected_probabilities(CNN_EXPECTED));
    assert!(diff < 1e-4, "max difference from onnxruntime {diff}");
    assert!(accuracy > 0.95, "accuracy {accuracy}");

    // Deploying v1 again reuses the store: no download.
    let (last, events) = w.deploy(&reg, "digits", "1").await;
    assert_eq!(last.phase, Phase::Active);
    assert!(!events.iter().any(|e| e.phase == Phase::Downloading), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_bundle_fails_precisely_and_the_serving_model_keeps_answering() {
    let (broker, reg, _data, mut w, _agent) = lab("dev2", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // Wrong manifest_sha256 in the deployment.
    let (last, _) = w.deploy_raw("digits", "1", &reg.manifest_url("digits", "1"), &"ab".repeat(32)).await;
    let e = last.error.clone().unwrap();
    assert_eq!((last.phase, e.code), (Phase::Failed, ErrorCode::DigestMismatch), "{last:?}");
    assert!(e.message.starts_with("manifest.json: expected sha256 abababababab.., got "), "{}", e.message);
    let state = w.state(&broker, |s| s.last_deployment.as_ref().is_some_and(|l| l.outcome == Outcome::Failed)).await;
    assert_eq!(state.active.unwrap().version, "1", "the failed deployment must not replace the active one");
    assert_eq!(state.last_deployment.unwrap().error.unwrap().code, ErrorCode::DigestMismatch);

    // A file tampered with after registration (a model this device has not
    // stored yet: a stored blob with the right digest is never fetched again).
    let good_sha = reg.register("digits-cnn.onnx", "digits", "3");
    let model = reg.root().join("digits/3/model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let e = refused(&mut w, &reg, "3", &good_sha).await;
    assert_eq!(e.code, ErrorCode::DigestMismatch);
    assert!(e.message.starts_with("model.onnx: expected sha256 "), "{}", e.message);

    // A file shorter than the manifest declares (cut on the server): retried
    // in case the link cut it, then `size_mismatch`.
    let good_sha = reg.register("digits-cnn.onnx", "digits", "7");
    let model = reg.root().join("digits/7/model.onnx");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let e = refused(&mut w, &reg, "7", &good_sha).await;
    assert_eq!(e.code, ErrorCode::SizeMismatch, "{}", e.message);
    assert_eq!(
        e.message,
        format!("model.onnx: expected {} bytes, got {} (gave up after 2 attempts)", bytes.len(), bytes.len() / 2)
    );

    // HTTP 404: a version that is not in the registry.
    let (last, _) = w.deploy_raw("digits", "9", &reg.manifest_url("digits", "9"), &"cd".repeat(32)).await;
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::DownloadFailed);
    assert!(e.message.contains("HTTP 404"), "{}", e.message);

    // A model tract cannot load (the bytes are not ONNX), with correct hashes.
    reg.register("digits-mlp.onnx", "digits", "4");
    std::fs::write(reg.root().join("digits/4/model.onnx"), b"this is not an onnx model").unwrap();
    let sha = reg.rehash("digits", "4");
    let e = refused(&mut w, &reg, "4", &sha).await;
    assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{}", e.message);
    assert!(e.message.starts_with("model.onnx: cannot parse ONNX"), "{}", e.message);

    // A real ONNX-ML operator tract does not implement: refused, and named.
    reg.register("digits-mlp.onnx", "digits", "6");
    std::fs::copy(fixture("unsupported-op.onnx"), reg.root().join("digits/6/model.onnx")).unwrap();
    let sha = reg.rehash("digits", "6");
    let e = refused(&mut w, &reg, "6", &sha).await;
    assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{}", e.message);
    assert!(e.message.contains("TreeEnsembleRegressor"), "{}", e.message);

    // A golden sample the model does not reproduce.
    reg.register("digits-mlp.onnx", "digits", "5");
    let expected_path = reg.root().join("digits/5/sample/expected.json");
    let mut expected: serde_json::Value = serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
    expected["outputs"][0]["data"][3] = serde_json::json!(0.5);
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    let sha = reg.rehash("digits", "5");
    let e = refused(&mut w, &reg, "5", &sha).await;
    assert_eq!(e.code, ErrorCode::ValidationFailed, "{}", e.message);
    assert!(e.message.starts_with("output 'probabilities' element 3: expected 0.5, got "), "{}", e.message);

    // Through all of it, version 1 kept serving.
    let answer = w.infer("still", digits_request(5)).await;
    assert_eq!(answer["model_version"], "1", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_precise_errors_and_the_agent_keeps_running() {
    let (_broker, reg, _data, mut w, mut agent) = lab("dev3", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // Desired state that is not JSON, has a wrong type, or a future schema.
    w.publish_desired(b"{this is not json".to_vec()).await;
    let ev = w.event(|e| e.phase == Phase::Failed).await;
    assert_eq!(ev.error.unwrap().code, ErrorCode::InvalidMessage);

    let bad = serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": "bad-1", "revision": "seven",
        "model": {"name": "digits", "version": "1", "manifest_url": reg.manifest_url("digits", "1"), "manifest_sha256": "x"}});
    w.publish_desired(serde_json::to_vec(&bad).unwrap()).await;
    let ev = w.event(|e| e.deployment_id == "bad-1").await;
    let e = ev.error.unwrap();
    assert_eq!(e.code, ErrorCode::InvalidMessage);
    assert!(e.message.starts_with("revision: expected "), "{}", e.message);

    let future = serde_json::json!({"schema": "outpost.deployment.v2", "deployment_id": "future-1", "revision": 1});
    w.publish_desired(serde_json::to_vec(&future).unwrap()).await;
    let ev = w.event(|e| e.deployment_id == "future-1").await;
    assert_eq!(ev.error.unwrap().code, ErrorCode::UnsupportedSchema);

    // Inference requests that are broken in each way a client can break them.
    let answer = w.infer_raw("garbage", b"{\"id\": \"garbage\", \"inputs\": 12}".to_vec()).await;
    assert_eq!(answer["code"], "bad_input", "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("inputs: expected"), "{answer}");

    let wrong_shape =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63]}]});
    let answer = w.infer("shape", wrong_shape).await;
    assert_eq!(answer["code"], "bad_input");
    assert_eq!(answer["error"], "input 'input': expected shape [N, 64], got [1, 63]");

    let wrong_count =
        serde_json::json!({"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
    let answer = w.infer("count", wrong_count).await;
    assert_eq!(answer["error"], "input 'input': shape [2, 64] needs 128 values, got 64");

    let wrong_name = serde_json::json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
    let answer = w.infer("name", wrong_name).await;
    assert_eq!(answer["error"], "unknown input 'pixels': the model's inputs are [\"input\"]");

    let wrong_type =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": vec![0; 64]}]});
    let answer = w.infer("type", wrong_type).await;
    assert_eq!(answer["error"], "input 'input': expected datatype FP32, got INT64");

    // Over the packet limit (the agent runs with --max-packet-size 4MiB, the
    // broker takes 16 MiB): refused with the reason, the connection stays up.
    let huge = format!("{{\"id\": \"huge\", \"pad\": \"{}\", \"inputs\": []}}", "x".repeat(5 << 20));
    let answer = w.infer_raw("huge", huge.into_bytes()).await;
    assert_eq!(answer["code"], "too_large", "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("the request is 5242"), "{answer}");
    let huge = serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": "huge-1", "revision": 99,
        "padding": "x".repeat(5 << 20)});
    w.publish_desired(serde_json::to_vec(&huge).unwrap()).await;
    let ev = w.event(|e| e.deployment_id == "huge-1").await;
    let e = ev.error.unwrap();
    assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.message);
    assert!(
        e.message.starts_with("expected a desired state of at most 4194304 bytes (--max-packet-size)"),
        "{}",
        e.message
    );

    // Still running, still serving, and every bad request counted as one.
    assert!(agent.is_running());
    let answer = w.infer("ok", digits_request(3)).await;
    assert_eq!(answer["model_version"], "1");
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{}/metrics", agent.http_port), None).await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("outpost_inference_requests_total 7\n"), "{text}");
    assert!(text.contains("outpost_inference_errors_total 6\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_power_cut_the_device_serves_from_its_store_without_the_registry() {
    let (_broker, reg, _data, mut w, mut agent) = lab("dev4", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let (last, _) = w.deploy(&reg, "digits", "1").await;
    assert_eq!(last.phase, Phase::Active);
    let deployment_id = last.deployment_id;

    // Registry gone (files removed), agent killed hard and started again.
    std::fs::remove_dir_all(reg.root().join("digits")).unwrap();
    agent.kill_and_restart();
    w.online().await;
    // The retained desired state is replayed: a no-op, not a download.
    let ev = w.event(|e| e.deployment_id == deployment_id).await;
    assert_eq!(ev.phase, Phase::Unchanged, "{ev:?}");
    let answer = w.infer("after-restart", digits_request(2)).await;
    assert_eq!(answer["model_version"], "1", "{answer}");
}

#[test]
fn register_refuses_a_model_tract_cannot_run_and_names_the_operator() {
    let reg = tempfile::tempdir().unwrap();
    let err = outpost_sim::registry::register(&outpost_sim::registry::RegisterSpec {
        model: fixture("unsupported-op.onnx"),
        name: "trees".into(),
        version: "1".into(),
        registry: reg.path().to_path_buf(),
        labels: None,
        sample: None,
        shapes: vec![],
        tolerance: 1e-4,
        top_k: 3,
        scale: None,
    })
    .unwrap_err();
    assert!(err.contains("TreeEnsembleRegressor"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_desired_state_undeploys_and_groups_apply_under_the_device_override() {
    let (broker, reg, _data, mut w, _agent) = lab("dev5", &["lab", "all"], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");

    // The group "all" deploys v1; the device override then deploys v2.
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let group = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    w.op.publish(&w.topics.group_desired("all"), group.to_json(), true).await.unwrap();
    assert_eq!(w.events_until_final(&group.deployment_id).await.0.phase, Phase::Active);
    assert_eq!(w.deploy(&reg, "digits", "2").await.0.phase, Phase::Active);
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");

    // Withdrawing the override falls back to the group's v1 (already stored).
    w.publish_desired(Vec::new()).await;
    let ev = w.event(|e| e.deployment_id == group.deployment_id && e.phase.is_final()).await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    assert_eq!(w.infer("v1", digits_request(1)).await["model_version"], "1");

    // Withdrawing the group too: nothing is desired, nothing serves.
    w.op.publish(&w.topics.group_desired("all"), Vec::new(), true).await.unwrap();
    let ev = w.event(|e| e.phase == Phase::Undeployed).await;
    assert_eq!(ev.deployment_id, group.deployment_id);
    let state = w.state(&broker, |s| s.active.is_none()).await;
    assert_eq!(state.last_deployment.unwrap().outcome, Outcome::Undeployed);
    assert_eq!(w.infer("none", digits_request(1)).await["code"], "no_model");
}

/// The operator's commands as a user runs them: register, deploy --wait, infer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_registers_deploys_and_infers() {
    let (broker, reg, data, _w, _agent) = lab("dev6", &[], &[]).await;
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
    let root = reg.root().to_str().unwrap().to_string();

    let (code, out, err) = sim(&[
        "register",
        fixture("digits-mlp.onnx").to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "1",
        "--registry",
        &root,
        "--labels",
        fixture("labels.txt").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("manifest: digits/1/manifest.json"), "{out}");
    let sha = out.lines().find_map(|l| l.strip_prefix("manifest_sha256: ")).unwrap().to_string();
    assert_eq!(sha, outpost_sim::registry::sha256(&std::fs::read(reg.root().join("digits/1/manifest.json")).unwrap()));

    let deploy = |model: &'static str| {
        let (b, u) = (broker_url.clone(), reg.url.clone());
        tokio::task::spawn_blocking(move || {
            sim(&["deploy", "--broker", &b, "--device", "dev6", "--model", model, "--registry-url", &u, "--wait"])
        })
    };
    let (code, out, err) = deploy("digits@1").await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("active"), "{out}");

    // A version that does not exist: the registry lookup fails before anything is published.
    let (code, _, err) = deploy("digits@7").await.unwrap();
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("404"), "{err}");

    let input = data.path().join("request.json");
    std::fs::write(&input, serde_json::to_vec(&digits_request(2)).unwrap()).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        sim(&["infer", "--broker", &broker_url, "--device", "dev6", "--input", input.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["model_version"], "1");
}

/// Deploys digits@`version` from `reg` under manifest digest `sha`, expects
/// it to fail, and returns why.
async fn refused(w: &mut Watcher, reg: &Registry, version: &str, sha: &str) -> outpost_protocol::ErrorInfo {
    let (last, events) = w.deploy_raw("digits", version, &reg.manifest_url("digits", version), sha).await;
    assert_eq!(last.phase, Phase::Failed, "{events:?}");
    last.error.unwrap()
}

/// The local Open Inference Protocol v2 endpoint, as a Triton/KServe client uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_http_endpoint_speaks_open_inference_protocol_v2() {
    let (_broker, reg, _data, mut w, agent) = lab("dev7", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let base = format!("http://127.0.0.1:{}", agent.http_port);

    assert_eq!(http("GET", format!("{base}/v2/health/live"), None).await.0, 200);
    assert_eq!(http("GET", format!("{base}/v2/health/ready"), None).await.0, 503, "not ready before a deployment");
    let (status, body) = http("POST", format!("{base}/v2/models/digits/infer"), Some(b"{}".to_vec())).await;
    assert_eq!(status, 404, "{body}");

    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    assert_eq!(http("GET", format!("{base}/v2/health/ready"), None).await.0, 200);
    let (status, meta) = http("GET", format!("{base}/v2/models/digits"), None).await;
    assert_eq!(status, 200);
    assert_eq!(meta["versions"], serde_json::json!(["1"]));
    assert_eq!(meta["inputs"], serde_json::json!([{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]));
    assert_eq!(meta["outputs"][0]["name"], "probabilities");

    let mut req = digits_request(450);
    req["id"] = "h-1".into();
    let (status, answer) =
        http("POST", format!("{base}/v2/models/digits/infer"), Some(serde_json::to_vec(&req).unwrap())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "h-1");
    let (diff, accuracy) = score(&answer, &expected_probabilities(MLP_EXPECTED));
    assert!(diff < 1e-4 && accuracy > 0.97, "{diff} {accuracy}");
    let (status, _) =
        http("POST", format!("{base}/v2/models/digits/versions/1/infer"), Some(serde_json::to_vec(&req).unwrap()))
            .await;
    assert_eq!(status, 200);

    // Errors: status code and a message that says what was expected.
    let (status, body) =
        http("POST", format!("{base}/v2/models/digits/versions/7/infer"), Some(serde_json::to_vec(&req).unwrap()))
            .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "version '7' of 'digits' is not served here; this device serves version '1'");
    let (status, body) = http("POST", format!("{base}/v2/models/other/infer"), Some(b"{}".to_vec())).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, "model 'other' is not served here; this device serves 'digits'")
    );
    let bad =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63]}]});
    let (status, body) =
        http("POST", format!("{base}/v2/models/digits/infer"), Some(serde_json::to_vec(&bad).unwrap())).await;
    assert_eq!((status, body["error"].as_str().unwrap()), (400, "input 'input': expected shape [N, 64], got [1, 63]"));
    let (status, body) = http("POST", format!("{base}/v2/models/digits/infer"), Some(b"{not json".to_vec())).await;
    assert_eq!(status, 400, "{body}");

    let (status, metrics) = http("GET", format!("{base}/metrics"), None).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("outpost_inference_requests_total 4"), "{text}");
    assert!(text.contains("outpost_model_info{name=\"digits\",version=\"1\",manifest_sha256=\""), "{text}");
    // Two answered requests: both in the histogram, the +Inf bucket equal to the count.
    assert!(text.contains("outpost_inference_latency_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
    assert!(text.contains("outpost_inference_latency_seconds_count 2\n"), "{text}");
    assert!(text.contains("outpost_inference_queue_depth 0\n") && text.contains("outpost_inference_in_flight 0\n"));
    assert!(text.contains("outpost_model_load_seconds "), "{text}");
}

/// Downloads over a flaky link: server errors, cut connections, stalls and a
/// file larger than declared, each with the outcome an operator needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_retry_resume_and_stop_at_the_declared_size() {
    let (broker, reg, _data, mut w, _agent) =
        lab("dev8", &[], &["--download-attempts", "4", "--stall-timeout", "1"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let faulty_url = url.replace(&reg.url, &faulty.url);

    // 500, then a connection cut after 1000 bytes, then a stall: each retried,
    // the cut and the stall resumed with Range, and the retries visible as events.
    faulty.inject("digits/1/manifest.json", &[Fault::Status(503)]);
    faulty.inject(
        "digits/1/model.onnx",
        &[Fault::Status(500), Fault::Truncate(1000), Fault::Stall(3000, Duration::from_secs(5))],
    );
    let (last, events) = w.deploy_raw("digits", "1", &faulty_url, &sha).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");
    let retries: Vec<&str> =
        events.iter().filter_map(|e| e.detail.as_deref()).filter(|d| d.contains("retrying in")).collect();
    assert_eq!(retries.len(), 4, "{retries:#?}");
    assert!(
        retries[0].starts_with("manifest.json: attempt 1 of 4 failed (download_failed: manifest.json: HTTP 503"),
        "{}",
        retries[0]
    );
    assert!(
        retries[2].starts_with("model.onnx: attempt 2 of 4 failed (download_failed: model.onnx: reading "),
        "{}",
        retries[2]
    );
    assert!(retries[3].contains("stalled"), "{}", retries[3]);
    assert_eq!(faulty.requests("digits/1/model.onnx"), [None, None, Some("1000-".into()), Some("4000-".into())]);
    assert_eq!(w.infer("after-faults", digits_request(1)).await["model_version"], "1");

    // A server that keeps failing: the deployment fails with the last cause, v1 keeps serving.
    let (url2, sha2) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let faulty_url2 = url2.replace(&reg.url, &faulty.url);
    faulty.inject("digits/2/model.onnx", &[Fault::Status(500); 4]);
    let (last, _) = w.deploy_raw("digits", "2", &faulty_url2, &sha2).await;
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::DownloadFailed);
    assert!(
        e.message.ends_with(&format!("HTTP 500 from {}/digits/2/model.onnx (gave up after 4 attempts)", faulty.url)),
        "{}",
        e.message
    );

    // A body longer than declared is stopped at the declared size, not read to the end.
    faulty.inject("digits/2/model.onnx", &[Fault::Append(10_000_000)]);
    let (last, _) = w.deploy_raw("digits", "2", &faulty_url2, &sha2).await;
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.message);
    assert!(e.message.starts_with("model.onnx: larger than the "), "{}", e.message);
    assert_eq!(w.infer("still-v1", digits_request(1)).await["model_version"], "1");

    // The operator's `deploy --wait` shows each retry and the outcome.
    faulty.inject("digits/2/model.onnx", &[Fault::Status(503)]);
    let (b, u) = (format!("mqtt://127.0.0.1:{}", broker.port), faulty.url.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        sim(&["deploy", "--broker", &b, "--device", "dev8", "--model", "digits@2", "--registry-url", &u, "--wait"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("model.onnx: attempt 1 of 4 failed (download_failed: model.onnx: HTTP 503 from"), "{out}");
    assert!(out.contains("dev8         active"), "{out}");
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");
}

/// Retention: the active version and `keep_versions` others stay; older
/// versions and the blobs only they used are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_the_active_and_the_last_versions_only() {
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    for v in ["1", "2", "3"] {
        reg.register(if v == "2" { "digits-cnn.onnx" } else { "digits-mlp.onnx" }, "digits", v);
    }
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("dev9");
    let mut w = Watcher::new(&broker, "dev9").await;
    let _agent = Agent::start(broker.port, "dev9", &dir, &[]);
    w.online().await;
    let mut shas = Vec::new();
    for v in ["1", "2", "3"] {
        let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", v).await.unwrap();
        let mut d = outpost_sim::operator::deployment("digits", v, &url, &sha, None, None);
        d.policy.keep_versions = Some(1);
        w.publish_desired(d.to_json()).await;
        assert_eq!(w.events_until_final(&d.deployment_id).await.0.phase, Phase::Active);
        shas.push(sha);
    }
    let mut versions: Vec<String> = std::fs::read_dir(dir.join("versions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    versions.sort();
    let mut expected = vec![shas[1].clone(), shas[2].clone()];
    expected.sort();
    assert_eq!(versions, expected, "v1 must be gone, v2 (previous) and v3 (active) kept");
    // v1 and v3 share model.onnx (same bytes): the blob stays because v3 uses it.
    let cnn = outpost_sim::registry::sha256(&std::fs::read(fixture("digits-cnn.onnx")).unwrap());
    let mlp = outpost_sim::registry::sha256(&std::fs::read(fixture("digits-mlp.onnx")).unwrap());
    assert!(dir.join("blobs/sha256").join(&cnn).is_file());
    assert!(dir.join("blobs/sha256").join(&mlp).is_file());
    assert_eq!(w.infer("v3", digits_request(1)).await["model_version"], "3");
}

/// A newer desired state cancels a download in progress at once, and a
/// download cut by an agent restart resumes where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_superseded_and_a_restart_resumes_it() {
    let (_broker, reg, data, mut w, mut agent) = lab("dev10", &[], &["--stall-timeout", "60"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    let resolve = |v: &'static str| {
        let (reg_url, faulty_url) = (reg.url.clone(), faulty.url.clone());
        async move {
            let (url, sha) = outpost_sim::operator::resolve_manifest(&reg_url, "digits", v).await.unwrap();
            (url.replace(&reg_url, &faulty_url), sha)
        }
    };

    // v2's model hangs after 2000 bytes; v1 is published while it hangs.
    faulty.inject("digits/2/model.onnx", &[Fault::Stall(2000, Duration::from_secs(60))]);
    let (url2, sha2) = resolve("2").await;
    let d2 = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    w.publish_desired(d2.to_json()).await;
    w.event(|e| e.deployment_id == d2.deployment_id && e.phase == Phase::Downloading).await;
    let (url1, sha1) = resolve("1").await;
    let d1 = outpost_sim::operator::deployment("digits", "1", &url1, &sha1, None, None);
    let published = std::time::Instant::now();
    w.publish_desired(d1.to_json()).await;
    let ev = w.event(|e| e.deployment_id == d2.deployment_id && e.phase.is_final()).await;
    assert_eq!(ev.phase, Phase::Superseded);
    assert!(published.elapsed() < Duration::from_secs(5), "superseding took {:?}", published.elapsed());
    let (last, events) = w.events_until_final(&d1.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");

    // v2 again, hanging after 2000 bytes; the agent is killed mid-download and
    // restarted: it asks only for the rest.
    faulty.inject("digits/2/model.onnx", &[Fault::Stall(2000, Duration::from_secs(60))]);
    let d2b = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    w.publish_desired(d2b.to_json()).await;
    w.event(|e| e.deployment_id == d2b.deployment_id && e.phase == Phase::Downloading).await;
    let partial = data
        .path()
        .join("dev10/partial")
        .join(outpost_sim::registry::sha256(&std::fs::read(fixture("digits-cnn.onnx")).unwrap()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 2000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill_and_restart();
    let (last, events) = w.events_until_final(&d2b.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    let ranges = faulty.requests("digits/2/model.onnx");
    assert_eq!(ranges.last().unwrap().as_deref(), Some("2000-"), "{ranges:?}");
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");
}

/// `file://` registries work (air-gapped devices), and a manifest with an
/// escaping path is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_urls_deploy_and_unsafe_paths_are_refused() {
    let (_broker, reg, data, mut w, _agent) = lab("dev11", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-mlp.onnx", "digits", "2");
    let root = format!("file://{}", reg.root().display());
    let (url, sha) = outpost_sim::operator::resolve_manifest(&root, "digits", "1").await.unwrap();
    assert!(url.starts_with("file:///"));
    assert_eq!(w.deploy_raw("digits", "1", &url, &sha).await.0.phase, Phase::Active);

    let manifest_path = reg.root().join("digits/2/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    m["files"][1]["path"] = "../../escape.txt".into();
    let bytes = serde_json::to_vec(&m).unwrap();
    std::fs::write(&manifest_path, &bytes).unwrap();
    let sha = outpost_sim::registry::sha256(&bytes);
    let e = refused(&mut w, &reg, "2", &sha).await;
    assert_eq!(e.code, ErrorCode::UnsafePath, "{}", e.message);
    assert!(e.message.starts_with("manifest.json: files[1].path: expected a relative path"), "{}", e.message);

    // An absolute path, the same path twice (as a case-insensitive disk sees
    // it), a path that is also a directory: each refused with its field.
    let first = m["files"][0]["path"].as_str().unwrap().to_string();
    for (path, code, starts) in [
        ("/etc/passwd".to_string(), ErrorCode::UnsafePath, "manifest.json: files[1].path: expected a relative path"),
        (
            first.to_uppercase(),
            ErrorCode::InvalidManifest,
            "manifest.json: files[1].path: expected each path listed once",
        ),
        (format!("{first}/x"), ErrorCode::InvalidManifest, "manifest.json: files: expected no path that is also a"),
    ] {
        m["files"][1]["path"] = path.clone().into();
        let bytes = serde_json::to_vec(&m).unwrap();
        std::fs::write(&manifest_path, &bytes).unwrap();
        let e = refused(&mut w, &reg, "2", &outpost_sim::registry::sha256(&bytes)).await;
        assert_eq!(e.code, code, "{path}: {}", e.message);
        assert!(e.message.starts_with(starts), "{path}: {}", e.message);
    }

    // Over the 1 MiB manifest cap: refused at the cap.
    let mut big = m.clone();
    big["padding"] = "x".repeat(1 << 20).into();
    let bytes = serde_json::to_vec(&big).unwrap();
    std::fs::write(&manifest_path, &bytes).unwrap();
    let (last, _) =
        w.deploy_raw("digits", "2", &reg.manifest_url("digits", "2"), &outpost_sim::registry::sha256(&bytes)).await;
    assert_eq!(last.error.unwrap().code, ErrorCode::TooLarge);

    // Not JSON at all, with the right digest.
    std::fs::write(&manifest_path, b"<html>oops</html>").unwrap();
    let (last, _) = w
        .deploy_raw(
            "digits",
            "2",
            &reg.manifest_url("digits", "2"),
            &outpost_sim::registry::sha256(b"<html>oops</html>"),
        )
        .await;
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::InvalidManifest, "{}", e.message);
    assert_eq!(w.infer("still", digits_request(1)).await["model_version"], "1");
    assert!(!data.path().join("escape.txt").exists() && !reg.root().join("escape.txt").exists());

    // A symlink planted where a download would accumulate: the download does
    // not write through it.
    reg.register("digits-cnn.onnx", "digits", "3");
    let victim = data.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let cnn = outpost_sim::registry::sha256(&std::fs::read(fixture("digits-cnn.onnx")).unwrap());
    std::os::unix::fs::symlink(&victim, data.path().join("dev11/partial").join(&cnn)).unwrap();
    assert_eq!(w.deploy(&reg, "digits", "3").await.0.phase, Phase::Active);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(w.infer("v3", digits_request(1)).await["model_version"], "3");
}

/// Health telemetry as an operator reads it off the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reports_traffic_latency_memory_and_store() {
    let (broker, reg, _data, mut w, _agent) = lab("dev12", &[], &["--telemetry-interval", "1"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let mut t =
        outpost_sim::operator::Operator::connect(&broker.url(), "telemetry-reader", w.topics.clone()).await.unwrap();
    t.subscribe(&w.topics.telemetry("dev12")).await.unwrap();
    for i in 0..5 {
        w.infer(&format!("t-{i}"), digits_request(10)).await;
    }
    let mut requests = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while requests < 5 && std::time::Instant::now() < deadline {
        let Some(m) = t.next(Duration::from_secs(2)).await else { continue };
        let r: outpost_protocol::Telemetry = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(r.schema, "outpost.telemetry.v1");
        assert_eq!(r.model.as_ref().map(|m| m.version.as_str()), Some("1"));
        assert!(r.process.rss_bytes > 1_000_000, "{r:?}");
        assert_eq!(r.store.versions, 1);
        assert!(r.store.bytes > 10_000);
        if r.inference.requests > 0 {
            assert!(
                r.inference.latency_us.p50 > 0 && r.inference.latency_us.p50 <= r.inference.latency_us.max,
                "{r:?}"
            );
        }
        requests += r.inference.requests;
    }
    assert_eq!(requests, 5, "every request counted once across intervals");
}

/// The deployment's `serving` bounds the worker pool: with one worker and no
/// queue, concurrent requests beyond it are refused at once with 503
/// `overloaded` instead of piling up, and the rest are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_worker_pool_answers_overloaded_at_once() {
    let (_broker, reg, _data, mut w, agent) = lab("dev13", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let mut d = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    d.serving.workers = Some(1);
    d.serving.max_queue = Some(0);
    w.publish_desired(d.to_json()).await;
    assert_eq!(w.events_until_final(&d.deployment_id).await.0.phase, Phase::Active);

    let body = serde_json::to_vec(&digits_request(450)).unwrap();
    let infer_url = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let clients: Vec<_> = (0..8).map(|_| tokio::spawn(http_burst(infer_url.clone(), body.clone(), 10))).collect();
    let (mut ok, mut overloaded) = (0, 0);
    for c in clients {
        for (status, answer) in c.await.unwrap() {
            match status {
                200 => ok += 1,
                503 => {
                    assert_eq!(answer["error"], "every worker is busy and the queue is full: retry later");
                    overloaded += 1;
                }
                other => panic!("unexpected {other}: {answer}"),
            }
        }
    }
    assert_eq!(ok + overloaded, 80);
    assert!(ok > 0 && overloaded > 0, "ok {ok}, overloaded {overloaded}");
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{}/metrics", agent.http_port), None).await;
    assert!(metrics.as_str().unwrap().contains(&format!("outpost_inference_rejected_total {overloaded}")));
}

async fn http_burst(url: String, body: Vec<u8>, n: usize) -> Vec<(u16, serde_json::Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(http("POST", url.clone(), Some(body.clone())).await);
    }
    out
}

/// The version the agent's state file on disk says is serving.
fn persisted_active(data_dir: &std::path::Path) -> Option<String> {
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir.join("agent.json")).ok()?).ok()?;
    record["active"]["deployment"]["model"]["version"].as_str().map(str::to_string)
}

/// Every stored version re-verifies: each file has its manifest's size and sha256.
fn assert_store_consistent(data_dir: &std::path::Path) {
    let store = outpost_agent::store::Store::open(data_dir).unwrap();
    for entry in std::fs::read_dir(data_dir.join("versions")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        store.verify_version(&name).unwrap_or_else(|e| panic!("stored version {name}: {e}"));
    }
    assert_eq!(std::fs::read_dir(data_dir.join("tmp")).unwrap().count(), 0, "leftovers in tmp/");
}

/// The agent dies (abort, like a power cut) at each instant between two
/// durable steps of installing a version. Restarted, it serves what its
/// state file says at once, cleans up, and finishes the deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_of_an_install_leaves_the_old_state_or_the_new_one() {
    let (_broker, reg, data, mut w, mut agent) = lab("dev13", &[], &[]).await;
    let dir = data.path().join("dev13");
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let mut serving = "1".to_string();
    for (point, version) in
        [("blob-stored", "2"), ("version-unrenamed", "3"), ("version-installed", "4"), ("state-persisted", "5")]
    {
        reg.register("digits-cnn.onnx", "digits", version);
        agent.env = vec![("OUTPOST_CRASH_AT".into(), point.into())];
        agent.kill_and_restart();
        w.online().await;
        let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", version).await.unwrap();
        let d = outpost_sim::operator::deployment("digits", version, &url, &sha, None, None);
        w.publish_desired(d.to_json()).await;
        let status = agent.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("{point}: no crash"));
        assert!(!status.success(), "{point}: {status}");

        // On disk: the old state, or (after the state was written) the new one.
        let expected = if point == "state-persisted" { version } else { serving.as_str() };
        assert_eq!(persisted_active(&dir).as_deref(), Some(expected), "{point}");
        agent.env.clear();
        agent.kill_and_restart();
        w.online().await;
        let ev = w.event(|e| e.deployment_id == d.deployment_id && e.phase.is_final()).await;
        let final_phase = if point == "state-persisted" { Phase::Unchanged } else { Phase::Active };
        assert_eq!(ev.phase, final_phase, "{point}: {ev:?}");
        assert_eq!(w.infer(point, digits_request(1)).await["model_version"], version, "{point}");
        assert_store_consistent(&dir);
        serving = version.to_string();
    }
    // Each restart served the version its state file named before any network.
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert_eq!(log.matches("serving the last active version from the store").count(), 8, "{log}");
}

/// A version that does not fit under the store quota is refused with
/// `disk_full` before a byte is fetched, after evicting what only served
/// rollback; the serving model and its files are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_quota_refuses_what_does_not_fit_and_damages_nothing() {
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    reg.register("digits-mlp.onnx", "digits", "3");
    // Room for v1's files and half of the CNN, not for v1 and v2 together.
    let bundle: u64 = std::fs::read_dir(reg.root().join("digits/1"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "manifest.json")
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let quota = (bundle + std::fs::metadata(fixture("digits-cnn.onnx")).unwrap().len() / 2).to_string();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("dev14");
    let mut w = Watcher::new(&broker, "dev14").await;
    let mut agent = Agent::start_with(broker.port, "dev14", &dir, &[], &["--store-quota", &quota]);
    w.online().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let err = refused(&mut w, &reg, "2", &resolve("2", &reg).await).await;
    assert_eq!(err.code, ErrorCode::DiskFull, "{err}");
    assert!(err.message.contains(&format!("under the store quota of {quota} bytes")), "{}", err.message);
    assert!(err.message.ends_with("nothing was downloaded and the serving model is untouched"), "{}", err.message);
    let cnn_sha = outpost_sim::registry::sha256(&std::fs::read(fixture("digits-cnn.onnx")).unwrap());
    assert!(!dir.join("partial").join(&cnn_sha).exists() && !dir.join("blobs/sha256").join(&cnn_sha).exists());
    assert_eq!(w.infer("still-v1", digits_request(1)).await["model_version"], "1");
    assert_store_consistent(&dir);

    // v3 shares every blob with v1 except its manifest: it fits.
    assert_eq!(w.deploy(&reg, "digits", "3").await.0.phase, Phase::Active);
    // And after a restart the device still serves from the intact store.
    agent.kill_and_restart();
    w.online().await;
    assert_eq!(w.infer("after-restart", digits_request(1)).await["model_version"], "3");
}

async fn resolve(version: &str, reg: &Registry) -> String {
    outpost_sim::operator::resolve_manifest(&reg.url, "digits", version).await.unwrap().1
}

/// A registry over HTTPS: trusted through `--ca-file`, a deployment works;
/// from a CA the device does not trust, it fails at once with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registries_are_verified_against_the_agents_ca_file() {
    let pki = TestPki::new();
    let ca = pki.ca.display().to_string();
    let (_broker, reg, _data, mut w, _agent) = lab("dev15", &[], &["--ca-file", &ca, "--download-attempts", "3"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let https = FaultyRegistry::start_tls(reg.root().to_path_buf(), &pki).await;
    assert!(https.url.starts_with("https://127.0.0.1:"));
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let (last, events) = w.deploy_raw("digits", "1", &url.replace(&reg.url, &https.url), &sha).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");
    assert_eq!(https.requests("digits/1/model.onnx").len(), 1);

    // The same files behind a certificate from another CA: refused, not retried.
    let stranger = FaultyRegistry::start_tls(reg.root().to_path_buf(), &TestPki::new()).await;
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let (last, events) = w.deploy_raw("digits", "2", &url.replace(&reg.url, &stranger.url), &sha).await;
    assert_eq!(last.phase, Phase::Failed, "{events:#?}");
    let err = last.error.unwrap();
    assert_eq!(err.code, ErrorCode::DownloadFailed);
    assert!(err.message.contains("invalid peer certificate: UnknownIssuer"), "{}", err.message);
    assert!(err.message.ends_with("(is the registry's CA in the agent's tls.ca_file / --ca-file?)"), "{}", err.message);
    assert!(!events.iter().any(|e| e.detail.as_deref().is_some_and(|d| d.contains("retrying"))), "{events:#?}");
    assert_eq!(w.infer("still-v1", digits_request(1)).await["model_version"], "1");
}

/// Without `tls.ca_file` the agent trusts the system's CA bundle (here the
/// file `SSL_CERT_FILE` names, as OpenSSL reads it): a registry whose CA is
/// not in it is refused, then trusted once it is; with no bundle at all an
/// https:// deployment fails at once and says why. The serving model keeps
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_file_https_registries_are_verified_against_the_systems_ca_bundle() {
    let pki = TestPki::new();
    let (_broker, reg, _data, mut w, mut agent) = lab("dev15s", &[], &["--download-attempts", "3"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    reg.register("digits-mlp.onnx", "digits", "3");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let https = FaultyRegistry::start_tls(reg.root().to_path_buf(), &pki).await;
    let (url2, sha2) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let url2 = url2.replace(&reg.url, &https.url);

    // The test CA is in no system bundle.
    let (last, events) = w.deploy_raw("digits", "2", &url2, &sha2).await;
    assert_eq!(last.phase, Phase::Failed, "{events:#?}");
    let message = last.error.unwrap().message;
    assert!(message.contains("invalid peer certificate: UnknownIssuer"), "{message}");
    assert!(
        message.ends_with("(is the registry's CA in the system's CA bundle? a private CA goes in tls.ca_file)"),
        "{message}"
    );
    assert_eq!(w.infer("still-v1", digits_request(1)).await["model_version"], "1");

    // A system bundle that holds it.
    agent.env = vec![("SSL_CERT_FILE".into(), pki.ca.display().to_string())];
    agent.kill_and_restart();
    w.online().await;
    let (last, events) = w.deploy_raw("digits", "2", &url2, &sha2).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");

    // No bundle at all: refused before connecting, not retried.
    agent.env = vec![("SSL_CERT_FILE".into(), "/nonexistent/ca-bundle.pem".into())];
    agent.kill_and_restart();
    w.online().await;
    let (url3, sha3) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "3").await.unwrap();
    let (last, events) = w.deploy_raw("digits", "3", &url3.replace(&reg.url, &https.url), &sha3).await;
    assert_eq!(last.phase, Phase::Failed, "{events:#?}");
    let err = last.error.unwrap();
    assert_eq!(err.code, ErrorCode::DownloadFailed);
    assert!(
        err.message.contains("cannot verify the server: /nonexistent/ca-bundle.pem: cannot read it")
            && err.message.ends_with("(the file SSL_CERT_FILE names)"),
        "{}",
        err.message
    );
    assert!(!events.iter().any(|e| e.detail.as_deref().is_some_and(|d| d.contains("retrying"))), "{events:#?}");
    assert_eq!(https.requests("digits/3/manifest.json").len(), 0);
    assert_eq!(w.infer("still-v2", digits_request(1)).await["model_version"], "2");
}

fn with_probation(mut d: outpost_protocol::Deployment, p: outpost_protocol::Probation) -> outpost_protocol::Deployment {
    d.policy.probation = Some(p);
    d
}

/// After a swap the new version is on probation: a request it fails is
/// answered by the version it replaced, and breaking a limit rolls back by
/// itself, with the evidence. A refused version stays refused after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_breaks_probation_is_rolled_back_without_a_failed_request() {
    use outpost_protocol::Probation;
    let (broker, reg, _data, mut w, mut agent) = lab("dev16", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-fragile.onnx", "digits", "2");
    reg.register("digits-cnn.onnx", "digits", "3");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // v2 passes its golden sample, so it goes live, on probation.
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let probation = Probation { seconds: Some(30), min_requests: Some(5), ..Default::default() };
    let d2 = with_probation(outpost_sim::operator::deployment("digits", "2", &url, &sha, None, None), probation);
    w.publish_desired(d2.to_json()).await;
    let (last, events) = w.events_until_final(&d2.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    let detail = last.detail.unwrap();
    assert!(
        detail.contains("on probation for 30 s: rolls back if more than 5.0% of at least 5 requests fail"),
        "{detail}"
    );
    assert_eq!(w.infer("fine", digits_request(3)).await["model_version"], "2");

    // An input on which v2 turns non-finite: v1 answers it, and v2 is out.
    let mut poison = digits_request(2);
    poison["inputs"][0]["data"][1][0] = 16.0.into();
    let answer = w.infer("poison", poison).await;
    assert_eq!(answer["model_version"], "1", "{answer}");
    assert!(answer["outputs"][0]["data"].as_array().unwrap().iter().all(|v| v.is_number()), "{answer}");
    let ev = w.event(|e| e.deployment_id == d2.deployment_id && e.phase == Phase::RolledBack).await;
    let err = ev.error.unwrap();
    assert_eq!(err.code, ErrorCode::ProbationFailed);
    assert_eq!(
        err.message,
        "digits@2: non-finite output: 'probabilities' holds NaN or infinity at element 10 for a finite input"
    );
    assert_eq!(ev.detail.as_deref(), Some("rolled back: digits@1 serves again"));
    assert_eq!(w.infer("after", digits_request(1)).await["model_version"], "1");
    let state =
        w.state(&broker, |s| s.last_deployment.as_ref().is_some_and(|l| l.outcome == Outcome::RolledBack)).await;
    assert_eq!(state.active.unwrap().version, "1");

    // Restarted, the device does not try the refused version again.
    agent.kill_and_restart();
    w.online().await;
    let ev = w.event(|e| e.deployment_id == d2.deployment_id).await;
    assert_eq!(ev.phase, Phase::Unchanged, "{ev:?}");
    assert_eq!(w.infer("restarted", digits_request(1)).await["model_version"], "1");

    // A latency limit no model can meet: rolled back after `min_requests`.
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "3").await.unwrap();
    let strict = Probation { seconds: Some(30), min_requests: Some(5), max_p99_ms: Some(0.001), ..Default::default() };
    let d3 = with_probation(outpost_sim::operator::deployment("digits", "3", &url, &sha, None, None), strict);
    w.publish_desired(d3.to_json()).await;
    assert_eq!(w.events_until_final(&d3.deployment_id).await.0.phase, Phase::Active);
    for i in 0..5 {
        let v = w.infer(&format!("slow-{i}"), digits_request(1)).await;
        assert!(v["model_version"] == "3" || v["model_version"] == "1", "{v}");
    }
    let ev = w.event(|e| e.deployment_id == d3.deployment_id && e.phase == Phase::RolledBack).await;
    let msg = ev.error.unwrap().message;
    assert!(
        msg.starts_with("digits@3: p99 latency ") && msg.ends_with("over the limit of 0.00 ms (5 requests)"),
        "{msg}"
    );
    assert_eq!(w.infer("v1-again", digits_request(1)).await["model_version"], "1");

    // Within its limits, a version passes when the window closes.
    let d3b = with_probation(
        outpost_sim::operator::deployment("digits", "3", &url, &sha, None, None),
        Probation { seconds: Some(1), ..Default::default() },
    );
    w.publish_desired(d3b.to_json()).await;
    assert_eq!(w.events_until_final(&d3b.deployment_id).await.0.phase, Phase::Active);
    assert_eq!(w.infer("v3", digits_request(1)).await["model_version"], "3");
    let ev = w
        .event(|e| {
            e.deployment_id == d3b.deployment_id
                && e.detail.as_deref().is_some_and(|d| d.starts_with("probation passed"))
        })
        .await;
    assert!(ev.detail.unwrap().starts_with("probation passed: 1 request(s), 0 failed"));
    assert_eq!(w.infer("v3-kept", digits_request(1)).await["model_version"], "3");
}

/// `serving.http_port` moves the local endpoint without a restart; a port
/// that cannot be bound fails the deployment and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_follows_the_deployment() {
    let (_broker, reg, _data, mut w, mut agent) = lab("dev17", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let default = format!("127.0.0.1:{}", agent.http_port);
    let port = outpost_sim::broker::free_port().unwrap();
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let mut d1 = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    d1.serving.http_port = Some(port);
    w.publish_desired(d1.to_json()).await;
    assert_eq!(w.events_until_final(&d1.deployment_id).await.0.phase, Phase::Active);
    let moved = format!("http://127.0.0.1:{port}/v2/models/digits");
    let (status, body) = http("GET", moved.clone(), None).await;
    assert_eq!((status, body["versions"][0].as_str()), (200, Some("1")), "{body}");
    assert!(std::net::TcpStream::connect(&default).is_err(), "the default port must be closed");

    // A port something else holds: refused, the endpoint stays where it is.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let (url2, sha2) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let mut d2 = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    d2.serving.http_port = Some(taken);
    w.publish_desired(d2.to_json()).await;
    let (last, _) = w.events_until_final(&d2.deployment_id).await;
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::PortUnavailable);
    assert!(
        e.message.starts_with(&format!("serving.http_port: cannot listen on 127.0.0.1:{taken}: ")),
        "{}",
        e.message
    );
    assert!(e.message.ends_with(&format!("the HTTP endpoint stays on 127.0.0.1:{port}")), "{}", e.message);
    assert_eq!(http("GET", moved.clone(), None).await.1["versions"][0], "1");

    // After a restart the endpoint comes back on the deployment's port.
    agent.kill_and_restart();
    w.online().await;
    assert_eq!(http("GET", moved, None).await.1["versions"][0], "1");

    // A deployment without a port goes back to --http-bind.
    drop(squatter);
    let d3 = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    w.publish_desired(d3.to_json()).await;
    assert_eq!(w.events_until_final(&d3.deployment_id).await.0.phase, Phase::Active);
    let (status, body) = http("GET", format!("http://127.0.0.1:{}/v2/models/digits", agent.http_port), None).await;
    assert_eq!((status, body["versions"][0].as_str()), (200, Some("2")), "{body}");
}

/// The binary tensor extension (what Triton's Python client sends by
/// default), and every kind of bad request over HTTP: a precise 4xx each,
/// and the model keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensors_over_http_and_bad_requests_get_precise_errors() {
    let (_broker, reg, _data, mut w, agent) = lab("dev18", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let url = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let (images, _) = heldout();
    let pixels: Vec<u8> = images.iter().flatten().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    let n = images.len();
    let header = serde_json::json!({"id": "bin", "inputs": [{"name": "input", "shape": [n, 64], "datatype": "FP32",
        "parameters": {"binary_data_size": pixels.len()}}], "parameters": {"binary_data_output": true}});
    let (status, json_len, body) = http_binary(url.clone(), header, pixels.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let json_len = json_len.unwrap();
    let head: serde_json::Value = serde_json::from_slice(&body[..json_len]).unwrap();
    assert_eq!((head["id"].as_str(), head["model_version"].as_str()), (Some("bin"), Some("1")));
    let probs = &head["outputs"][0];
    assert_eq!(probs["parameters"]["binary_data_size"], n * 10 * 4);
    let values: Vec<f32> =
        body[json_len..json_len + n * 40].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let expected = expected_probabilities(MLP_EXPECTED);
    let diff = values.iter().zip(expected.iter().flatten()).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-4, "max difference from onnxruntime {diff}");

    // Bad requests, each with its status and message.
    let one = |data: serde_json::Value| serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": data}]});
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            serde_json::to_vec(&one(vec![1.0; 60].into())).unwrap(),
            400,
            "input 'input': shape [1, 64] needs 64 values, got 60",
        ),
        (serde_json::to_vec(&one(vec!["a"; 64].into())).unwrap(), 400, "inputs[0].data"),
        (br#"{"inputs": []}"#.to_vec(), 400, "inputs: expected at least one input tensor"),
    ];
    for (body, status, message) in cases {
        let (s, b) = http("POST", url.clone(), Some(body)).await;
        assert_eq!(s, status, "{b}");
        assert!(b["error"].as_str().unwrap().contains(message), "{b}");
    }
    // NaN can only come in binary: the model's output turns NaN, which is the input's fault.
    let mut nan = pixels[..256].to_vec();
    nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let header = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
        "parameters": {"binary_data_size": 256}}]});
    let (status, _, body) = http_binary(url.clone(), header.clone(), nan).await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("input 'input' holds NaN or infinity at element 0, which this model cannot take"),
        "{body}"
    );
    // A binary part of the wrong size.
    let (status, _, body) = http_binary(url.clone(), header, vec![0; 255]).await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"], "inputs[0]: expected 256 bytes of binary data, found 255 bytes left in the body");
    // A body over the 64 MiB limit.
    let (status, _) = http("POST", url.clone(), Some(vec![b' '; 65 << 20])).await;
    assert_eq!(status, 413);

    assert_eq!(w.infer("still", digits_request(1)).await["model_version"], "1");
}

/// Several clients (HTTP with keep-alive, and MQTT) send requests without a
/// pause while versions are swapped many times, including a version that
/// fails its golden sample and one that trips probation: no request fails or
/// goes missing, and every answer is exactly what the version it names computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_lose_nothing_and_every_answer_names_its_version() {
    use outpost_protocol::Probation;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (broker, reg, _data, mut w, agent) = lab("dev19", &[], &["--workers", "2", "--max-queue", "64"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    reg.register("digits-cnn.onnx", "digits", "3");
    reg.register("digits-mlp.onnx", "digits", "4");
    let expected_path = reg.root().join("digits/4/sample/expected.json");
    let mut expected: serde_json::Value = serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
    expected["outputs"][0]["data"][3] = serde_json::json!(0.5);
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    let bad_gate = reg.rehash("digits", "4");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    let (mlp, cnn) = (expected_probabilities(MLP_EXPECTED), expected_probabilities(CNN_EXPECTED));
    let truth = move |version: &str| match version {
        "1" => mlp.clone(),
        "2" | "3" => cnn.clone(),
        v => panic!("an answer from version {v}, which never served"),
    };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let mut clients = Vec::new();
    for c in 0..3usize {
        let (stop, url, truth) = (stop.clone(), url.clone(), truth.clone());
        clients.push(tokio::task::spawn_blocking(move || {
            let http: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let (images, _) = heldout();
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let k = i % images.len();
                let body = serde_json::json!({"id": format!("c{c}-{i}"), "inputs": [{"name": "input", "shape": [1, 64],
                    "datatype": "FP32", "data": images[k]}]});
                let resp = http.post(&url).send(serde_json::to_vec(&body).unwrap()).unwrap();
                let status = resp.status().as_u16();
                let answer: serde_json::Value =
                    serde_json::from_slice(&resp.into_body().read_to_vec().unwrap()).unwrap();
                assert_eq!(status, 200, "request c{c}-{i}: {answer}");
                assert_eq!(answer["id"], format!("c{c}-{i}"));
                let version = answer["model_version"].as_str().unwrap().to_string();
                let got: Vec<f64> =
                    answer["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let want = &truth(&version)[k];
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(diff < 1e-4, "request c{c}-{i}: version {version} differs by {diff}");
                *seen.entry(version).or_default() += 1;
                i += 3;
            }
            seen
        }));
    }
    // And one MQTT client, request after request.
    let mqtt_stop = stop.clone();
    let mut mqtt_client = Watcher::named(&broker, "dev19", "-load").await;
    let mqtt = tokio::spawn(async move {
        let mut n = 0;
        while !mqtt_stop.load(Ordering::Relaxed) {
            let answer = mqtt_client.infer(&format!("m-{n}"), digits_request(2)).await;
            assert!(answer["model_version"].is_string(), "{answer}");
            n += 1;
        }
        n
    });

    let strict = Probation { seconds: Some(30), min_requests: Some(20), max_p99_ms: Some(0.001), ..Default::default() };
    let mut outcomes = Vec::new();
    for (version, probation) in [
        ("2", None),
        ("1", None),
        ("2", None),
        ("4", None),
        ("1", None),
        ("3", Some(strict)),
        ("2", None),
        ("1", None),
        ("2", None),
        ("1", None),
    ] {
        let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", version).await.unwrap();
        let mut d = outpost_sim::operator::deployment("digits", version, &url, &sha, None, None);
        d.policy.probation = probation.clone();
        w.publish_desired(d.to_json()).await;
        let (last, events) = w.events_until_final(&d.deployment_id).await;
        if version == "4" {
            assert_eq!(sha, bad_gate);
            assert_eq!(last.error.map(|e| e.code), Some(ErrorCode::ValidationFailed), "{events:?}");
        } else {
            assert_eq!(last.phase, Phase::Active, "{events:?}");
        }
        if probation.is_some() {
            let ev = w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::RolledBack).await;
            assert_eq!(ev.error.unwrap().code, ErrorCode::ProbationFailed);
        }
        outcomes.push((version, last.phase));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = std::collections::BTreeMap::<String, usize>::new();
    for c in clients {
        for (v, n) in c.await.unwrap() {
            *total.entry(v).or_default() += n;
        }
    }
    let mqtt_answers = mqtt.await.unwrap();
    let answered: usize = total.values().sum();
    eprintln!("swaps {outcomes:?}; HTTP answers by version {total:?}; MQTT answers {mqtt_answers}");
    assert!(total.len() >= 2 && answered > 100 && mqtt_answers > 10, "{total:?}, {mqtt_answers}");
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{}/metrics", agent.http_port), None).await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("outpost_inference_errors_total 0\n"), "{text}");
    assert!(text.contains("outpost_inference_rejected_total 0\n"), "{text}");
}

/// The broker dies in the middle of a deployment. The device finishes it
/// anyway (journaling its events on disk), and when the broker is back it
/// publishes them in order: the operator sees every phase, and a true state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_during_a_broker_outage_are_journaled_and_replayed_in_order() {
    let mut broker = Mosquitto::start_with(true);
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("dev20");
    // A watcher whose session the broker keeps across its restart.
    let mut w = Watcher::connect(&broker, "dev20", "", false).await;
    let agent =
        Agent::start_with(broker.port, "dev20", &dir, &[], &["--stall-timeout", "1", "--download-attempts", "4"]);
    w.online().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // v2's model stalls for a while: the broker goes down during the download.
    faulty.inject("digits/2/model.onnx", &[Fault::Stall(2000, Duration::from_secs(3))]);
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let d = outpost_sim::operator::deployment("digits", "2", &url.replace(&reg.url, &faulty.url), &sha, None, None);
    w.publish_desired(d.to_json()).await;
    let mut seen = vec![w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Downloading).await];
    broker.stop();

    // The deployment completes while the broker is away.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while persisted_active(&dir).as_deref() != Some("2") {
        assert!(std::time::Instant::now() < deadline, "the deployment did not complete offline");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let journal = std::fs::read_to_string(dir.join("journal.jsonl")).unwrap();
    assert!(journal.lines().count() >= 4, "{journal}");
    // The local endpoint serves the new version while the broker is still away.
    let body = serde_json::to_vec(&digits_request(1)).unwrap();
    let (status, answer) =
        http("POST", format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port), Some(body)).await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("2")), "{answer}");

    broker.restart();
    let (last, rest) = w.events_until_final(&d.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{rest:?}");
    seen.extend(rest);
    // QoS 1 is at-least-once: a message in flight when the broker died may
    // come twice, with the same seq. Once repeats are dropped, the order of
    // arrival is the order of seq.
    seen.dedup_by_key(|e| e.seq);
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "out of order: {seqs:?}");
    let phases = phase_names(&seen);
    assert_eq!(&phases[phases.len() - 4..], [Phase::Verifying, Phase::Loading, Phase::Validating, Phase::Active]);
    assert!(
        seen.iter().any(|e| e.detail.as_deref().is_some_and(|x| x.contains("stalled") && x.contains("retrying"))),
        "{seen:#?}"
    );
    let state = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.version == "2")).await;
    assert_eq!(state.last_deployment.unwrap().outcome, Outcome::Active);
    // Inference over MQTT resumes (a fresh client: this one's clean session lost its subscription).
    let mut fresh = Watcher::named(&broker, "dev20", "-after").await;
    assert_eq!(fresh.infer("after-outage", digits_request(1)).await["model_version"], "2");
    assert!(std::fs::read_to_string(dir.join("journal.jsonl")).unwrap().is_empty());
}

/// A group deployment reaches five devices; one has its own device-level
/// deployment, which wins. A device that was off while the group's desired
/// state changed converges when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_five_converges_with_an_override_and_a_latecomer() {
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let data = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("cam-{i}")).collect();
    let mut watchers = Vec::new();
    let mut agents = Vec::new();
    for n in &names {
        watchers.push(Watcher::new(&broker, n).await);
        agents.push(Agent::start(broker.port, n, &data.path().join(n), &["site-a", "cameras"]));
    }
    for w in &mut watchers {
        w.online().await;
    }
    let op = &mut watchers[0].op;
    let topics = outpost_protocol::Topics::default();
    // cam-4 has its own deployment (v1); the group gets v2.
    let (url1, sha1) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let own = outpost_sim::operator::deployment("digits", "1", &url1, &sha1, None, None);
    op.publish(&topics.device_desired("cam-4"), own.to_json(), true).await.unwrap();
    let (url2, sha2) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let group = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    op.publish(&topics.group_desired("cameras"), group.to_json(), true).await.unwrap();
    for (i, w) in watchers.iter_mut().enumerate() {
        let want = if i == 4 { "1" } else { "2" };
        let s = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.version == want)).await;
        assert_eq!(s.device, names[i]);
    }

    // cam-2 is off while the group moves back to v1; it converges on return.
    agents[2].kill();
    let back = outpost_sim::operator::deployment("digits", "1", &url1, &sha1, None, None);
    watchers[0].op.publish(&topics.group_desired("cameras"), back.to_json(), true).await.unwrap();
    for i in [0, 1, 3] {
        watchers[i].state(&broker, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == back.deployment_id)).await;
    }
    agents[2].kill_and_restart();
    let s =
        watchers[2].state(&broker, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == back.deployment_id)).await;
    assert_eq!(s.active.unwrap().version, "1");
    // The override still wins on cam-4 (its own deployment, untouched by the group).
    let s = watchers[4].state(&broker, |s| s.active.is_some()).await;
    assert_eq!(s.active.unwrap().deployment_id, own.deployment_id);
    for (i, w) in watchers.iter_mut().enumerate() {
        let answer = w.infer(&format!("r{i}"), digits_request(1)).await;
        assert_eq!(answer["model_version"], "1", "{}: {answer}", names[i]);
    }
}

/// MQTT over TLS with a login: the device trusts the broker through
/// `--ca-file` and logs in; a wrong CA or a wrong password keeps it out,
/// and its log says which setting to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_login_and_clear_errors_when_either_is_wrong() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(&pki, "cam-21", "s3cret");
    let tls_url = format!("mqtts://localhost:{}", broker.tls_port.unwrap());
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("password"), "s3cret\n").unwrap();
    let (ca, pw) = (pki.ca.display().to_string(), data.path().join("password").display().to_string());
    let tls_flags = |ca: &str, pw: &str| -> Vec<String> {
        ["--broker", &tls_url, "--ca-file", ca, "--username", "cam-21", "--password-file", pw]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let mut w = Watcher::new(&broker, "cam-21").await;
    let flags = tls_flags(&ca, &pw);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start_with(broker.port, "cam-21", &data.path().join("cam-21"), &[], &flags);
    w.online().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    assert_eq!(w.infer("over-tls", digits_request(1)).await["model_version"], "1");
    drop(agent);

    // A CA that did not sign the broker's certificate, then a wrong password.
    let stranger = TestPki::new();
    std::fs::write(data.path().join("wrong"), "guess\n").unwrap();
    let wrong_pw = data.path().join("wrong").display().to_string();
    for (flags, hint) in [
        (
            tls_flags(&stranger.ca.display().to_string(), &pw),
            "the broker's TLS certificate is not trusted: give its CA with --ca-file",
        ),
        (tls_flags(&ca, &wrong_pw), "the broker refused the login: check --username and the password"),
    ] {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut a = Agent::start_with(broker.port, "cam-21", &data.path().join("cam-21"), &[], &flags);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&a.log).unwrap_or_default();
            if log.contains(hint) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no '{hint}' in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(a.is_running(), "a bad setting must not stop the agent: it keeps serving and retrying");
        a.kill();
        std::fs::remove_file(&a.log).unwrap();
    }
}

/// With `--persistent-session` the broker keeps the device's session while it
/// is down: inference requests sent meanwhile are answered when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_while_the_device_is_down_are_answered_when_it_returns() {
    let (_broker, reg, _data, mut w, mut agent) = lab("dev22", &[], &["--persistent-session"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    assert_eq!(w.infer("before", digits_request(1)).await["model_version"], "1");
    agent.kill();
    let topic = w.topics.infer("dev22");
    for i in 0..3 {
        let mut req = digits_request(1);
        req["id"] = format!("queued-{i}").into();
        w.client.publish(&topic, serde_json::to_vec(&req).unwrap(), false).await.unwrap();
    }
    agent.kill_and_restart();
    let mut answered = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answered.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "answered only {answered:?}");
        let Some(m) = w.client.next(Duration::from_millis(200)).await else { continue };
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if let Some(id) = v["id"].as_str().filter(|id| id.starts_with("queued-")) {
            assert_eq!(v["model_version"], "1", "{v}");
            answered.insert(id.to_string());
        }
    }
}

/// With `serving.capture_rate`, sampled inputs with their predictions and
/// the version that made them go to `capture` (the feedback loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_publishes_sampled_inputs_with_their_predictions() {
    let (_broker, reg, _data, mut w, agent) = lab("dev23", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let topics = outpost_protocol::Topics::default();
    w.op.subscribe(&topics.capture("dev23")).await.unwrap();
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let mut d = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    d.serving.capture_rate = Some(1.0);
    w.publish_desired(d.to_json()).await;
    assert_eq!(w.events_until_final(&d.deployment_id).await.0.phase, Phase::Active);
    for i in 0..3 {
        w.infer(&format!("cap-{i}"), digits_request(1)).await;
    }
    let body = serde_json::to_vec(&digits_request(2)).unwrap();
    let (status, _) =
        http("POST", format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port), Some(body)).await;
    assert_eq!(status, 200);
    let mut captured = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while captured.len() < 4 && std::time::Instant::now() < deadline {
        let Some(m) = w.op.next(Duration::from_millis(200)).await else { continue };
        if m.topic.ends_with("/capture") {
            captured.push(serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap());
        }
    }
    assert_eq!(captured.len(), 4, "{captured:#?}");
    let c = &captured[0];
    assert_eq!((c["schema"].as_str(), c["device"].as_str()), (Some("outpost.capture.v1"), Some("dev23")));
    assert_eq!((c["model_name"].as_str(), c["model_version"].as_str()), (Some("digits"), Some("1")));
    assert_eq!(c["request"]["id"], "cap-0");
    assert_eq!(c["request"]["inputs"][0]["data"].as_array().unwrap().len(), 64);
    assert_eq!(c["response"]["outputs"][0]["name"], "probabilities");
    assert_eq!(captured[3]["request"]["inputs"][0]["shape"], serde_json::json!([2, 64]));

    // A deployment without capture stops it.
    let d2 = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    w.publish_desired(d2.to_json()).await;
    assert_eq!(w.events_until_final(&d2.deployment_id).await.0.phase, Phase::Active);
    w.infer("not-captured", digits_request(1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        if let Some(m) = w.op.next(Duration::from_millis(100)).await {
            assert!(!m.topic.ends_with("/capture"), "captured after capture was turned off");
        }
    }
}

/// The `active` event says what the golden sample showed and how requests
/// run: a manifest asking for `multi_thread` gets every core from an agent
/// built with the `multithread` feature, and any other agent (the packaged
/// build) says it serves on one thread, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_event_says_how_the_model_was_checked_and_how_requests_run() {
    let (_broker, reg, _data, mut w, _agent) = lab("dev24e", &[], &[]).await;
    reg.register("digits-cnn.onnx", "digits", "1");
    let path = reg.root().join("digits/1/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["model"]["executor"] = serde_json::json!("multi_thread");
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let sha = reg.rehash("digits", "1");
    let (last, events) = w.deploy_raw("digits", "1", &reg.manifest_url("digits", "1"), &sha).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");
    let detail = last.detail.unwrap();
    assert!(detail.contains("; golden sample reproduced: 2 output(s), largest difference "), "{detail}");
    let executor = if outpost_agent::engine::MULTITHREAD {
        "; multi-threaded on "
    } else {
        "; single-threaded: the manifest asks for multi_thread but this agent was built without the `multithread` feature"
    };
    assert!(detail.contains(executor), "{detail}");
    assert_eq!(w.infer("served", digits_request(3)).await["outputs"][0]["shape"], serde_json::json!([3, 10]));
}

/// Pre-processing from the manifest casts and reshapes: clients send 8x8
/// UINT8 images, the model takes [N, 64] FP32, and the answers are the
/// model's own (onnxruntime's) for those digits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_casts_and_reshapes_inputs_for_the_model() {
    let (_broker, reg, _data, mut w, _agent) = lab("dev24", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let dir = reg.root().join("digits/1");
    let (images, _) = heldout();
    let expected = expected_probabilities(MLP_EXPECTED);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    m["model"]["inputs"][0] = serde_json::json!({"name": "input", "datatype": "UINT8", "shape": [-1, 8, 8],
        "preprocess": {"datatype": "FP32", "shape": [-1, 64]}});
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let image =
        |k: usize| -> Vec<Vec<u8>> { images[k].chunks(8).map(|r| r.iter().map(|v| *v as u8).collect()).collect() };
    let sample = serde_json::json!({"id": "golden", "inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "UINT8", "data": [image(0)]}]});
    std::fs::write(dir.join("sample/input.json"), serde_json::to_vec(&sample).unwrap()).unwrap();
    let golden = serde_json::json!({"outputs": [{"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": expected[0]}]});
    std::fs::write(dir.join("sample/expected.json"), serde_json::to_vec(&golden).unwrap()).unwrap();
    let sha = reg.rehash("digits", "1");
    let (last, events) = w.deploy_raw("digits", "1", &reg.manifest_url("digits", "1"), &sha).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");

    let req = serde_json::json!({"inputs": [{"name": "input", "shape": [2, 8, 8], "datatype": "UINT8", "data": [image(1), image(2)]}]});
    let answer = w.infer("u8", req).await;
    let got: Vec<f64> = answer["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let want: Vec<f64> = expected[1].iter().chain(&expected[2]).copied().collect();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-4, "{answer}");
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([2, 10]));

    // What clients must send is what the manifest says, checked before the cast.
    let mut big = image(1);
    big[0][0] = 0;
    let mut bad =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "UINT8", "data": [big]}]});
    bad["inputs"][0]["data"][0][0][3] = 300.into();
    assert_eq!(
        w.infer("range", bad).await["error"],
        "input 'input' element 3: 300 is out of range for UINT8 (0..=255)"
    );
    let as_float =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": images[0]}]});
    assert_eq!(w.infer("fp32", as_float).await["error"], "input 'input': expected datatype UINT8, got FP32");
}

/// `outpost check-bundle` runs a bundle through the agent's own gate and
/// says whether the agent would serve it, and if not, why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_bundle_reports_what_the_agent_would_do() {
    let reg = Registry::start().await;
    let sha = reg.register("digits-cnn.onnx", "digits", "1");
    let manifest = reg.root().join("digits/1/manifest.json").display().to_string();
    let url = reg.manifest_url("digits", "1");
    for (args, shown) in [
        (vec!["check-bundle", manifest.as_str()], "file://"),
        (vec!["check-bundle", url.as_str(), "--sha256", sha.as_str()], "http://"),
    ] {
        let (code, out, err) = tokio::task::block_in_place(|| outpost(&args));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.starts_with(&format!("checking {shown}")), "{out}");
        assert!(out.contains("  verifying    (4 file(s)"), "{out}");
        assert!(
            out.contains(
                "ok: the agent would serve digits@1: inputs input FP32 [-1, 64]; outputs probabilities FP32 [-1, 10]"
            ),
            "{out}"
        );
        assert!(out.contains("golden sample reproduced"), "{out}");
    }

    // A wrong digest, a tampered file, an operator tract cannot run.
    let (code, out, _) = tokio::task::block_in_place(|| outpost(&["check-bundle", &url, "--sha256", &"ab".repeat(32)]));
    assert_eq!(code, 1);
    assert!(out.contains("refused: digest_mismatch: manifest.json: expected sha256 abababababab"), "{out}");
    reg.register("digits-mlp.onnx", "digits", "2");
    let model = reg.root().join("digits/2/model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let dir2 = reg.root().join("digits/2").display().to_string();
    let (code, out, _) = tokio::task::block_in_place(|| outpost(&["check-bundle", &dir2]));
    assert_eq!(code, 1);
    assert!(out.contains("refused: digest_mismatch: model.onnx: expected sha256 "), "{out}");
    reg.register("digits-mlp.onnx", "digits", "3");
    std::fs::copy(fixture("unsupported-op.onnx"), reg.root().join("digits/3/model.onnx")).unwrap();
    reg.rehash("digits", "3");
    let dir3 = reg.root().join("digits/3").display().to_string();
    let (code, out, _) = tokio::task::block_in_place(|| outpost(&["check-bundle", &dir3]));
    assert_eq!(code, 1);
    assert!(out.contains("refused: model_load_failed: ") && out.contains("TreeEnsembleRegressor"), "{out}");
    let (code, _, err) = tokio::task::block_in_place(|| outpost(&["check-bundle", "/nonexistent/bundle"]));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("/nonexistent/bundle: No such file or directory"), "{err}");
}

/// A deployment message is acked only once it is recorded on disk: a crash
/// between its arrival and the record loses nothing (the broker delivers it
/// again to the persistent session), and a deployment recorded before a
/// power cut is resumed at start-up even when the broker is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_message_is_acked_only_once_recorded_and_survives_crashes() {
    let (mut broker, reg, _data, mut w, mut agent) = lab("dev23", &[], &["--persistent-session"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    reg.register("digits-mlp.onnx", "digits", "3");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    // v2, not retained: the agent dies the instant it has read it.
    agent.kill();
    agent.env.push(("OUTPOST_CRASH_AT".into(), "desired-received".into()));
    agent.kill_and_restart();
    w.online().await;
    let (url2, sha2) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let d2 = outpost_sim::operator::deployment("digits", "2", &url2, &sha2, None, None);
    w.op.publish(&w.topics.device_desired("dev23"), d2.to_json(), false).await.unwrap();
    let status = agent.wait_exit(Duration::from_secs(20)).expect("the agent aborts at the crash point");
    assert!(!status.success());
    // Unacked, so the broker delivers it again to the returning session.
    agent.env.clear();
    agent.kill_and_restart();
    let (last, events) = w.events_until_final(&d2.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    let base = format!("http://127.0.0.1:{}", agent.http_port);
    let body = serde_json::to_vec(&digits_request(1)).unwrap();
    let (_, answer) = http("POST", format!("{base}/v2/models/digits/infer"), Some(body.clone())).await;
    assert_eq!(answer["model_version"], "2", "{answer}");

    // v3, not retained, from a registry that hangs: recorded, then a power
    // cut mid-download, and the broker is gone when the device comes back.
    let faulty = FaultyRegistry::start(reg.root().to_path_buf()).await;
    faulty.inject("digits/3/manifest.json", &[Fault::Stall(0, Duration::from_secs(60))]);
    let (url3, sha3) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "3").await.unwrap();
    let d3 = outpost_sim::operator::deployment("digits", "3", &url3.replace(&reg.url, &faulty.url), &sha3, None, None);
    w.op.publish(&w.topics.device_desired("dev23"), d3.to_json(), false).await.unwrap();
    w.event(|e| e.deployment_id == d3.deployment_id && e.phase == Phase::Received).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while faulty.requests("digits/3/manifest.json").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.stop();
    agent.kill_and_restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = try_http("POST", format!("{base}/v2/models/digits/infer"), Some(body.clone())).await;
        if answer.as_ref().is_ok_and(|(status, a)| *status == 200 && a["model_version"] == "3") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "v3 not serving without the broker: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("digits@3 (resumed after a restart)"), "{log}");
}

/// Over MQTT 5, a request's response topic and correlation data are honoured:
/// the answer goes where the client asked, carrying its correlation data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_requests_are_answered_on_their_response_topic_with_their_correlation_data() {
    use rumqttc::v5::mqttbytes::{QoS, v5::Packet, v5::PublishProperties};
    let (broker, reg, _data, mut w, _agent) = lab("dev24", &[], &["--mqtt-version", "5"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    // An MQTT 3.1.1 client on the same broker still gets its answers.
    assert_eq!(w.infer("v3-client", digits_request(1)).await["model_version"], "1");

    let mut opts = rumqttc::v5::MqttOptions::new("mqtt5-client", "127.0.0.1", broker.port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let rumqttc::v5::Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send(p);
            }
        }
    });
    client.subscribe("replies/mqtt5-client/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expected = expected_probabilities(MLP_EXPECTED);
    for (i, topic) in ["replies/mqtt5-client/a", "replies/mqtt5-client/b"].into_iter().enumerate() {
        let props = PublishProperties {
            response_topic: Some(topic.into()),
            correlation_data: Some(format!("corr-{i}").into_bytes().into()),
            ..Default::default()
        };
        let body = serde_json::to_vec(&digits_request(3)).unwrap();
        client.publish_with_properties(w.topics.infer("dev24"), QoS::AtLeastOnce, false, body, props).await.unwrap();
        let p = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an answer").unwrap();
        assert_eq!(std::str::from_utf8(&p.topic).unwrap(), topic);
        let corr = p.properties.as_ref().and_then(|pr| pr.correlation_data.clone()).expect("correlation data");
        assert_eq!(&corr[..], format!("corr-{i}").as_bytes());
        let answer: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(answer["model_version"], "1", "{answer}");
        let (max_diff, _) = score(&answer, &expected[..3]);
        assert!(max_diff < 1e-4, "max diff {max_diff}");
    }
    // A bad request is answered the same way, with the error.
    let props = PublishProperties {
        response_topic: Some("replies/mqtt5-client/bad".into()),
        correlation_data: Some(b"corr-bad".to_vec().into()),
        ..Default::default()
    };
    client
        .publish_with_properties(w.topics.infer("dev24"), QoS::AtLeastOnce, false, b"{".to_vec(), props)
        .await
        .unwrap();
    let p = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an answer").unwrap();
    assert_eq!(&p.properties.unwrap().correlation_data.unwrap()[..], b"corr-bad");
    let answer: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(answer["code"], "bad_input", "{answer}");
}

/// Under systemd (`Type=notify`): READY once serving, watchdog pings from
/// the main loop; on SIGTERM the requests in flight (HTTP and MQTT) are all
/// answered, `offline` is published and the agent exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_and_systemd_hears_each_step() {
    let notify = NotifySocket::new();
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    reg.register("slow.onnx", "slow", "1");
    let data = tempfile::tempdir().unwrap();
    let mut w = Watcher::new(&broker, "dev25").await;
    let mut agent = {
        let mut a = Agent::start_with(broker.port, "dev25", &data.path().join("dev25"), &[], &[]);
        a.kill();
        a.env.push(("NOTIFY_SOCKET".into(), notify.path.display().to_string()));
        a.env.push(("WATCHDOG_USEC".into(), "400000".into()));
        a.kill_and_restart();
        a
    };
    let (_, ready) = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=no model yet; connecting to mqtt://127.0.0.1:"), "{ready}");
    let pings = notify.collect(Duration::from_secs(1)).iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert!((3..=8).contains(&pings), "{pings} watchdog pings in 1 s at WATCHDOG_USEC=400000");
    w.online().await;
    assert_eq!(w.deploy(&reg, "slow", "1").await.0.phase, Phase::Active);

    // Four HTTP requests and one MQTT request of 256 rows each, then SIGTERM while they run.
    let base = format!("http://127.0.0.1:{}", agent.http_port);
    let mut req = digits_request(256);
    req["id"] = "in-flight".into();
    let body = serde_json::to_vec(&req).unwrap();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (format!("{base}/v2/models/slow/infer"), body.clone());
            tokio::spawn(async move {
                let r = http("POST", url, Some(body)).await;
                (r, std::time::Instant::now())
            })
        })
        .collect();
    w.client.publish(&w.topics.infer("dev25"), body.clone(), false).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http("GET", format!("{base}/metrics"), None).await;
        let text = metrics.as_str().unwrap_or_default().to_string();
        let gauge = |name: &str| -> f64 {
            text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
        };
        if gauge("outpost_inference_in_flight ") + gauge("outpost_inference_queue_depth ") >= 3.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "requests never in flight: {text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let term = std::time::Instant::now();
    agent.signal(rustix::process::Signal::TERM);
    let mut answered_after_term = 0;
    for c in clients {
        let ((status, answer), at) = c.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([256, 10]), "{answer}");
        answered_after_term += usize::from(at > term);
    }
    assert!(answered_after_term > 0, "no request was still in flight at SIGTERM");
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    let status = agent.wait_exit(Duration::from_secs(15)).expect("the agent exits within its grace period");
    assert!(status.success(), "{status:?}");
    // The MQTT request was answered before the goodbye, and the goodbye is `offline`.
    let (mut answered, mut offline) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(answered && offline) && std::time::Instant::now() < deadline {
        if let Some(m) = w.client.next(Duration::from_millis(100)).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            answered |= v["id"] == "in-flight" && v["outputs"][0]["shape"] == serde_json::json!([256, 10]);
        }
        if let Some(m) = w.op.next(Duration::from_millis(100)).await {
            offline |= m.topic.ends_with("/availability") && &m.payload[..] == b"offline";
        }
    }
    assert!(answered, "the MQTT request in flight at SIGTERM was not answered");
    assert!(offline, "no `offline` after SIGTERM");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("shutting down: finishing requests in flight"), "{log}");
}

/// The watchdog is pinged from the main loop: when that loop hangs, the
/// pings stop (and systemd would restart the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_stops_when_the_main_loop_hangs() {
    let notify = NotifySocket::new();
    let broker = Mosquitto::start();
    let data = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(broker.port, "dev26", &data.path().join("dev26"), &[], &[]);
    agent.kill();
    agent.env.push(("NOTIFY_SOCKET".into(), notify.path.display().to_string()));
    agent.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    agent.env.push(("OUTPOST_CRASH_AT".into(), "stall-main-loop".into()));
    agent.kill_and_restart();
    notify.wait_for("READY=1", Duration::from_secs(20));
    let first = notify.collect(Duration::from_secs(2));
    let pings = first.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert_eq!(pings, 5, "pings before the loop hangs: {first:?}");
    let later = notify.collect(Duration::from_secs(1));
    assert!(later.is_empty(), "pinged while hung: {later:?}");
    assert!(agent.is_running(), "hung, not dead: systemd's watchdog is what ends it");
}

/// SIGHUP reloads the configuration: live keys apply at once, the others
/// are named as needing a restart, and a bad file is refused whole while
/// the agent keeps running as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_what_can_change_and_refuses_a_bad_configuration() {
    let notify = NotifySocket::new();
    let broker = Mosquitto::start();
    let conf = tempfile::tempdir().unwrap();
    let main = conf.path().join("agent.toml");
    std::fs::write(&main, "telemetry_interval = 60\n[limits]\nworkers = 1\n").unwrap();
    std::fs::create_dir(conf.path().join("agent.d")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut w = Watcher::new(&broker, "dev27").await;
    w.op.subscribe(&w.topics.telemetry("dev27")).await.unwrap();
    let main_arg = main.display().to_string();
    let mut agent =
        Agent::start_with(broker.port, "dev27", &data.path().join("dev27"), &[], &["--config", main_arg.as_str()]);
    agent.kill();
    agent.env.push(("NOTIFY_SOCKET".into(), notify.path.display().to_string()));
    agent.kill_and_restart();
    notify.wait_for("READY=1", Duration::from_secs(20));
    w.online().await;

    std::fs::write(conf.path().join("agent.d/50-live.toml"), "telemetry_interval = 1\nmqtt.keep_alive = 30\n").unwrap();
    agent.signal(rustix::process::Signal::HUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(5));
    notify.wait_for("READY=1", Duration::from_secs(5));
    let mut reports = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        if let Some(m) = w.op.next(Duration::from_millis(100)).await
            && m.topic.ends_with("/telemetry")
        {
            reports += 1;
        }
    }
    assert!(reports >= 2, "{reports} telemetry reports in 4 s after telemetry_interval = 1");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("applies after a restart") && log.contains("mqtt.keep_alive"), "{log}");

    std::fs::write(conf.path().join("agent.d/60-bad.toml"), "[limits]\nworkers = 0\n").unwrap();
    agent.signal(rustix::process::Signal::HUP);
    notify.wait_for("configuration reload refused", Duration::from_secs(5));
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("configuration not reloaded, the running one stays"), "{log}");
    assert!(log.contains("60-bad.toml: limits.workers = 0: expected 1 to 256"), "{log}");
    assert!(agent.is_running());
    let (status, _) = http("GET", format!("http://127.0.0.1:{}/v2/health/live", agent.http_port), None).await;
    assert_eq!(status, 200);
}
