//! Serving: the Open Inference Protocol endpoint, binary tensors, the worker
//! pool, the HTTP port, hot swaps under load, capture, probation.

use super::*;

/// The local Open Inference Protocol v2 endpoint, as a Triton/KServe client uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_http_endpoint_speaks_open_inference_protocol_v2() {
    let (_broker, reg, _data, mut w, agent) = lab("dev7", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let base = format!("http://127.0.0.1:{}", agent.http_port);

    assert_eq!(http("GET", format!("{base}/v2/health/live"), None).await.0, 200);
    // Not ready is a 4xx, as the OIP v2 health API says (and Triton answers 400).
    assert_eq!(http("GET", format!("{base}/v2/health/ready"), None).await.0, 400, "not ready before a deployment");
    assert_eq!(http("GET", format!("{base}/v2/models/digits/ready"), None).await.0, 400, "model not ready");
    // Nothing deployed yet: 503 no_model (retry later), as the protocol reference says.
    let (status, body) = http("POST", format!("{base}/v2/models/digits/infer"), Some(b"{}".to_vec())).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("no_model")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("no model is deployed"), "{body}");
    // A wrong method is a 405 that says so in the OIP error body.
    let (status, body) = http("GET", format!("{base}/v2/models/digits/infer"), None).await;
    assert_eq!(status, 405, "{body}");
    assert!(body["error"].as_str().unwrap().contains("GET"), "{body}");

    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    assert_eq!(http("GET", format!("{base}/v2/health/ready"), None).await.0, 200);
    let (status, meta) = http("GET", format!("{base}/v2/models/digits"), None).await;
    assert_eq!(status, 200);
    assert_eq!(meta["versions"], serde_json::json!(["1"]));
    assert_eq!(meta["inputs"], serde_json::json!([{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]));
    // Every output infer answers, the top-k postprocess's too.
    assert_eq!(
        meta["outputs"],
        serde_json::json!([
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities_top_k", "datatype": "BYTES", "shape": [-1, 3]},
        ])
    );

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
    // Every request counted, those naming a model not served here too
    // (no_model: the one before the deployment, version 7, "other").
    assert!(text.contains("outpost_inference_requests_total{transport=\"http\",model=\"digits\"} 6\n"), "{text}");
    assert!(text.contains("outpost_inference_requests_total{transport=\"http\",model=\"\"} 1\n"), "{text}");
    assert!(text.contains("outpost_inference_errors_total{transport=\"http\",code=\"no_model\"} 3\n"), "{text}");
    assert!(text.contains("outpost_inference_errors_total{transport=\"http\",code=\"bad_input\"} 2\n"), "{text}");
    assert!(text.contains("outpost_model_info{name=\"digits\",version=\"1\",manifest_sha256=\""), "{text}");
    // Two answered requests: both in the histogram, the +Inf bucket equal to the count.
    assert!(text.contains("outpost_inference_latency_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
    assert!(text.contains("outpost_inference_latency_seconds_count 2\n"), "{text}");
    assert!(text.contains("outpost_inference_queue_depth 0\n") && text.contains("outpost_inference_in_flight 0\n"));
    assert!(text.contains("outpost_model_load_seconds "), "{text}");
    // A log file gets no terminal colour codes (span fields included).
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("deployment{") && !log.contains('\u{1b}'), "{log}");
}

/// `/metrics` as Prometheus users expect it: labelled counters, the
/// `process_*` and build families, the link, journal, store, deployments by
/// outcome, latency buckets from 10 µs; and served alone on `metrics.bind`,
/// so a central Prometheus can scrape it without reaching inference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_labelled_and_can_be_served_on_their_own_address() {
    let metrics_port = outpost_sim::broker::free_port().unwrap();
    let bind = format!("metrics.bind=127.0.0.1:{metrics_port}");
    let (_broker, reg, _data, mut w, agent) = lab("dev-metrics", &[], &["--set", &bind]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let base = format!("http://127.0.0.1:{}", agent.http_port);
    let req = serde_json::to_vec(&digits_request(1)).unwrap();
    assert_eq!(http("POST", format!("{base}/v2/models/digits/infer"), Some(req)).await.0, 200);
    assert_eq!(w.infer("m-1", digits_request(1)).await["model_version"], "1");
    w.infer_raw("m-2", b"{\"id\": \"m-2\", \"inputs\": 7}".to_vec()).await;

    let only = format!("http://127.0.0.1:{metrics_port}");
    let (status, metrics) = http("GET", format!("{only}/metrics"), None).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap().to_string();
    for sample in [
        "outpost_inference_requests_total{transport=\"http\",model=\"digits\"} 1\n",
        "outpost_inference_requests_total{transport=\"mqtt\",model=\"digits\"} 2\n",
        "outpost_inference_errors_total{transport=\"mqtt\",code=\"bad_input\"} 1\n",
        "outpost_inference_rejected_total{transport=\"http\"} 0\n",
        "outpost_inference_latency_seconds_bucket{le=\"0.00001\"} ",
        "outpost_deployments_total{outcome=\"active\"} 1\n",
        "outpost_mqtt_connected 1\n",
        "outpost_mqtt_reconnects_total 0\n",
        "outpost_journal_events 0\n",
        "outpost_journal_dropped_total 0\n",
        "outpost_store_versions 1\n",
        "outpost_build_info{version=\"",
        "outpost_model_info{name=\"digits\",version=\"1\",",
        "# TYPE outpost_probation gauge\n",
        "# TYPE process_resident_memory_bytes gauge\n",
        "# TYPE process_cpu_seconds_total counter\n",
        "# TYPE process_open_fds gauge\n",
        "# TYPE process_max_fds gauge\n",
        "# TYPE process_start_time_seconds gauge\n",
    ] {
        assert!(text.contains(sample), "{sample:?} missing:\n{text}");
    }
    let store_bytes: u64 =
        text.lines().find_map(|l| l.strip_prefix("outpost_store_bytes ")).and_then(|v| v.parse().ok()).unwrap();
    assert!(store_bytes > 10_000, "the digits model is in the store: {store_bytes}");
    // Only /metrics there: inference is not reachable on the metrics address.
    let (status, body) = http("POST", format!("{only}/v2/models/digits/infer"), Some(b"{}".to_vec())).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("only /metrics"), "{body}");
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
    let text = metrics.as_str().unwrap();
    assert_eq!(outpost_tests::metric_total(text, "outpost_inference_rejected_total"), overloaded as u64, "{text}");
    assert!(text.contains(&format!("outpost_inference_rejected_total{{transport=\"http\"}} {overloaded}\n")), "{text}");
}

async fn http_burst(url: String, body: Vec<u8>, n: usize) -> Vec<(u16, serde_json::Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(http("POST", url.clone(), Some(body.clone())).await);
    }
    out
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
    // A body over the 64 MiB limit: refused from its Content-Length, before it is sent.
    let port = agent.http_port;
    let (status, text) = raw_infer(port, "Content-Length: 68157440\r\n", b"", Duration::from_secs(2)).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("over the limit of 67108864 bytes (http.max_body)"), "{text}");

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
        d.policy.allow_downgrade = Some(true);
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
    assert_eq!(outpost_tests::metric_total(text, "outpost_inference_errors_total"), 0, "{text}");
    assert_eq!(outpost_tests::metric_total(text, "outpost_inference_rejected_total"), 0, "{text}");
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

    // An input on which v2 turns non-finite: v1 answers it. One such
    // request (one client) does not roll v2 back; the third does.
    let mut poison = digits_request(2);
    poison["inputs"][0]["data"][1][0] = 16.0.into();
    for i in 0..3 {
        let answer = w.infer(&format!("poison-{i}"), poison.clone()).await;
        assert_eq!(answer["model_version"], "1", "{answer}");
        assert!(answer["outputs"][0]["data"].as_array().unwrap().iter().all(|v| v.is_number()), "{answer}");
        if i == 0 {
            assert_eq!(w.infer("still-v2", digits_request(1)).await["model_version"], "2");
        }
    }
    let ev = w.event(|e| e.deployment_id == d2.deployment_id && e.phase == Phase::RolledBack).await;
    let err = ev.error.unwrap();
    assert_eq!(err.code, ErrorCode::ProbationFailed);
    assert_eq!(
        err.message,
        "digits@2: 3 non-finite outputs (policy.probation.max_non_finite = 3); the last: non-finite output: 'probabilities' holds NaN or infinity at element 10 for a finite input"
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
