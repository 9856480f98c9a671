//! The broker: outages and the journal, TLS and logins, MQTT 5, requests
//! queued while the device is down.

use super::*;

/// The broker dies in the middle of a deployment. The device finishes it
/// anyway (journaling its events on disk), and when the broker is back it
/// publishes them in order: the operator sees every phase, and a true state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_during_a_broker_outage_are_journaled_and_replayed_in_order() {
    let Outage { mut broker, dir, mut w, agent, d, mut seen, _reg, _faulty, _data } =
        deploy_through_an_outage("dev20").await;
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

/// Over MQTT 5 every answer carries properties (content type, payload
/// format, echoed correlation data): an answer sized to the packet limit
/// without them must not pass the agent's checks and then be refused by the
/// client library, which drops the whole session. Requests whose answers
/// land within those bytes of the limit, from a plain 3.1.1 client: the
/// agent stays connected and keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_near_the_packet_limit_never_cost_the_mqtt5_session() {
    // The broker's limit is what the client library enforces (CONNACK).
    let (_broker, reg, _data, mut w, agent) = Lab::device("dev25")
        .flags(&["--mqtt-version", "5", "--max-packet-size", "65536"])
        .broker_conf("max_packet_size 65536\n")
        .start()
        .await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    for n in (65_536 - 420..65_536 - 60).step_by(6) {
        let body = format!("{{\"id\":\"{}\",\"inputs\":[]}}", "a".repeat(n));
        w.client.publish(&w.topics.infer("dev25"), body.into_bytes(), false).await.unwrap();
    }
    // Answered (or refused too_large) one by one; then a normal request.
    assert_eq!(w.infer("after", digits_request(1)).await["model_version"], "1");
    let url = format!("http://127.0.0.1:{}/metrics", agent.http_port);
    let text = ureq::get(&url).call().unwrap().into_body().read_to_string().unwrap();
    assert!(text.contains("outpost_mqtt_reconnects_total 0\n"), "the session was dropped:\n{text}");
    assert!(text.contains("outpost_mqtt_connected 1\n"), "{text}");
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
    client.subscribe("outpost/replies/mqtt5-client/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expected = expected_probabilities(MLP_EXPECTED);
    for (i, topic) in ["outpost/replies/mqtt5-client/a", "outpost/replies/mqtt5-client/b"].into_iter().enumerate() {
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
        // The answer says what it is (MQTT 5 content type) and comes at the
        // request's QoS (the subscription allows QoS 1).
        let pr = p.properties.as_ref().expect("properties");
        assert_eq!(pr.content_type.as_deref(), Some("application/json"));
        assert_eq!(pr.payload_format_indicator, Some(1));
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let answer: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(answer["model_version"], "1", "{answer}");
        let (max_diff, _) = score(&answer, &expected[..3]);
        assert!(max_diff < 1e-4, "max diff {max_diff}");
    }
    // A request at QoS 0 is answered at QoS 0: the client asked for no
    // acknowledgements and is not made to wait on them.
    let props = PublishProperties {
        response_topic: Some("outpost/replies/mqtt5-client/q0".into()),
        correlation_data: Some(b"corr-q0".to_vec().into()),
        ..Default::default()
    };
    let body = serde_json::to_vec(&digits_request(1)).unwrap();
    client.publish_with_properties(w.topics.infer("dev24"), QoS::AtMostOnce, false, body, props).await.unwrap();
    let p = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an answer").unwrap();
    assert_eq!(std::str::from_utf8(&p.topic).unwrap(), "outpost/replies/mqtt5-client/q0");
    assert_eq!(p.qos, QoS::AtMostOnce, "a QoS 0 request is answered at QoS 0");
    // A bad request is answered the same way, with the error.
    let props = PublishProperties {
        response_topic: Some("outpost/replies/mqtt5-client/bad".into()),
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

    // A response topic outside the reply namespace (here another device's
    // desired state): nothing is published there; the refusal goes to
    // predictions, with the correlation data.
    client.subscribe(w.topics.predictions("dev24"), QoS::AtLeastOnce).await.unwrap();
    client.subscribe("outpost/devices/dev99/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let props = PublishProperties {
        response_topic: Some("outpost/devices/dev99/desired".into()),
        correlation_data: Some(b"corr-deputy".to_vec().into()),
        ..Default::default()
    };
    let body = serde_json::to_vec(&digits_request(1)).unwrap();
    client.publish_with_properties(w.topics.infer("dev24"), QoS::AtLeastOnce, false, body, props).await.unwrap();
    let p = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an answer").unwrap();
    assert_eq!(std::str::from_utf8(&p.topic).unwrap(), w.topics.predictions("dev24"));
    assert_eq!(&p.properties.unwrap().correlation_data.unwrap()[..], b"corr-deputy");
    let answer: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(answer["code"], "reply_refused", "{answer}");
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv()).await.is_err(), "published elsewhere");
}
