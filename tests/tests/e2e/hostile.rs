//! Hostile clients (issue 14): what one request must not be able to do.

use super::*;

/// A value that is finite in JSON but not in the model's datatype (1e300 as
/// FP32) is the client's error (`bad_input`, 400) before the model sees it:
/// it cannot turn a version on probation non-finite and veto the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_fit_the_datatype_is_bad_input_and_vetoes_nothing() {
    let (_broker, reg, _data, mut w, agent) = Lab::device("hostile1")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let (url, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let probation = outpost_protocol::Probation { seconds: Some(60), min_requests: Some(5), ..Default::default() };
    let d2 = with_probation(outpost_sim::operator::deployment("digits", "2", &url, &sha, None, None), probation);
    w.publish_desired(d2.to_json()).await;
    assert_eq!(w.events_until_final(&d2.deployment_id).await.0.phase, Phase::Active);

    let infer = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let mut veto = digits_request(1);
    veto["inputs"][0]["data"][0][3] = serde_json::json!(1e300);
    let (status, body) = http("POST", infer.clone(), Some(serde_json::to_vec(&veto).unwrap())).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("input 'input'") && error.contains("1e300") && error.contains("FP32"), "{body}");
    // Over MQTT the same, with the code.
    let answer = w.infer("veto", veto).await;
    assert_eq!(answer["code"], "bad_input", "{answer}");

    // v2 is still on probation and serving: no rollback.
    for i in 0..5 {
        let (status, body) = http("POST", infer.clone(), Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
        assert_eq!((status, body["model_version"].as_str()), (200, Some("2")), "request {i}: {body}");
    }
    let rolled_back = tokio::time::timeout(
        Duration::from_secs(2),
        w.event(|e| e.deployment_id == d2.deployment_id && e.phase == Phase::RolledBack),
    )
    .await;
    assert!(rolled_back.is_err(), "one client vetoed the rollout: {rolled_back:?}");
}
