//! Deploying: a desired state becomes served predictions; bad bundles, bad
//! messages and unsupported models are refused precisely; groups, undeploy,
//! the operator CLI and `check-bundle`.

use super::*;

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
    // broker takes 16 MiB): refused from its header, unread. MQTT 3.1.1
    // cannot tell the broker the limit, so the agent switches to MQTT 5,
    // which does: the broker then drops what is over it, and a retained
    // oversize desired state cannot break every connection.
    let huge = format!("{{\"id\": \"huge\", \"pad\": \"{}\", \"inputs\": []}}", "x".repeat(5 << 20));
    w.client.publish(&w.topics.infer(&w.device), huge.into_bytes(), false).await.unwrap();
    let huge = serde_json::json!({"schema": "outpost.deployment.v1", "deployment_id": "huge-1", "revision": 99,
        "padding": "x".repeat(5 << 20)});
    w.publish_desired(serde_json::to_vec(&huge).unwrap()).await;
    agent.wait_log("trying MQTT 5", 1, Duration::from_secs(10));
    w.online().await;
    let seen = tokio::time::timeout(Duration::from_secs(2), w.event(|e| e.deployment_id == "huge-1")).await;
    assert!(seen.is_err(), "the oversize desired state was read: {seen:?}");

    // Still running, still serving, and every bad request counted as one.
    assert!(agent.is_running());
    let answer = w.infer("ok", digits_request(3)).await;
    assert_eq!(answer["model_version"], "1");
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{}/metrics", agent.http_port), None).await;
    let text = metrics.as_str().unwrap();
    assert_eq!(outpost_tests::metric_total(text, "outpost_inference_requests_total"), 6, "{text}");
    assert_eq!(outpost_tests::metric_total(text, "outpost_inference_errors_total"), 5, "{text}");
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
        runtime: None,
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

/// A device of group `all`: the group deploys digits@1, then the device's own
/// desired state deploys digits@2 over it. Returns the lab and the group's deployment.
async fn group_then_override(
    device: &str,
) -> (Mosquitto, Registry, tempfile::TempDir, Watcher, Agent, outpost_protocol::Deployment) {
    let (broker, reg, data, mut w, agent) = lab(device, &["all"], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits", "2");
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let group = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, None);
    w.op.publish(&w.topics.group_desired("all"), group.to_json(), true).await.unwrap();
    assert_eq!(w.events_until_final(&group.deployment_id).await.0.phase, Phase::Active);
    assert_eq!(w.deploy(&reg, "digits", "2").await.0.phase, Phase::Active);
    (broker, reg, data, w, agent, group)
}

/// A restart between a device override and its withdrawal: the group's
/// retained deployment replays with the revision the device already holds,
/// which must be recognised as the group's desired state (not refused as
/// stale and forgotten), so withdrawing the override still falls back to it.
/// (Found with RabbitMQ; the same on Mosquitto: the device served nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_withdrawing_the_device_override_still_falls_back_to_the_group() {
    let (broker, _reg, _data, mut w, mut agent, group) = group_then_override("dev5r").await;

    agent.kill_and_restart();
    w.online().await;
    // The group's retained deployment replays: not a stale refusal.
    let ev = w.event(|e| e.deployment_id == group.deployment_id).await;
    assert_eq!(ev.phase, Phase::Unchanged, "{ev:?}");
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");

    w.publish_desired(Vec::new()).await;
    let ev = w.event(|e| e.deployment_id == group.deployment_id && e.phase.is_final()).await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let state = w.state(&broker, |s| s.active.is_some()).await;
    assert_eq!(state.active.unwrap().version, "1");
    assert_eq!(w.infer("v1", digits_request(1)).await["model_version"], "1");
}

/// The other side of the restart: a group withdrawn while the device was
/// down (its retained state cleared, so nothing replays) stays withdrawn:
/// withdrawing the device's override afterwards undeploys, it does not
/// bring back the group's old deployment from the device's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_withdrawn_while_the_device_was_down_is_not_brought_back() {
    let (broker, _reg, _data, mut w, mut agent, _group) = group_then_override("dev5w").await;

    agent.kill();
    w.op.publish(&w.topics.group_desired("all"), Vec::new(), true).await.unwrap();
    agent.spawn();
    w.online().await;
    assert_eq!(w.infer("v2", digits_request(1)).await["model_version"], "2");
    w.publish_desired(Vec::new()).await;
    let ev = w.event(|e| e.phase.is_final() && e.phase != Phase::Unchanged).await;
    assert_eq!(ev.phase, Phase::Undeployed, "{ev:?}");
    let state = w.state(&broker, |s| s.active.is_none()).await;
    assert!(state.active.is_none());
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

    // A version that does not exist: the registry lookup fails before
    // anything is published, as a usage error (a retry cannot help).
    let (code, _, err) = deploy("digits@7").await.unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("HTTP 404: no such model version"), "{err}");

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
    let executor = if outpost_agent::serve::model::MULTITHREAD {
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
    let mut back = outpost_sim::operator::deployment("digits", "1", &url1, &sha1, None, None);
    back.policy.allow_downgrade = Some(true);
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

/// A new deployment of the very version that serves, with the same serving
/// settings (a rollout's completion: the group's deployment replaces each
/// device's own override of the same version): recorded as active without
/// reloading the model, so answers do not stall while every device loads
/// what it already serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deployment_of_the_serving_version_is_recorded_without_a_reload() {
    let (broker, reg, _data, mut w, agent) =
        Lab::device("dev-relabel").groups(&["lobby"]).model("digits-mlp.onnx", "digits", "1").start().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    // The group's deployment of the same version, then the device's own withdrawn.
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let mut group = outpost_sim::operator::deployment("digits", "1", &url, &sha, None, Some("group-1".into()));
    group.policy.allow_downgrade = Some(true);
    w.op.publish(&w.topics.group_desired("lobby"), group.to_json(), true).await.unwrap();
    // Shadowed by the device's own desired state until that is withdrawn.
    assert_eq!(w.events_until_final("group-1").await.0.phase, Phase::Unchanged);
    w.publish_desired(Vec::new()).await;
    let (last, events) = w.events_until_final("group-1").await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    assert!(last.detail.as_deref().unwrap().contains("nothing reloaded"), "{last:?}");
    assert_eq!(phase_names(&events), vec![Phase::Received, Phase::Active], "no download, load or validation");
    let state = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.deployment_id == "group-1")).await;
    assert_eq!(state.active.unwrap().version, "1");
    let (status, answer) = http(
        "POST",
        format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port),
        Some(serde_json::to_vec(&digits_request(2)).unwrap()),
    )
    .await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
}
