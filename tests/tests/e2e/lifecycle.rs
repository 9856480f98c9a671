//! The process under systemd: telemetry, SIGTERM, the watchdog, SIGHUP.

use super::*;

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
    // Two client mistakes: errors, not the model's.
    for i in 0..2 {
        w.infer_raw(&format!("bad-{i}"), format!(r#"{{"id": "bad-{i}", "inputs": []}}"#).into_bytes()).await;
    }
    let (mut requests, mut errors, mut model_errors) = (0, 0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while requests < 7 && std::time::Instant::now() < deadline {
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
        errors += r.inference.errors;
        model_errors += r.inference.model_errors.expect("model_errors is reported");
        assert_eq!(r.interval_s, Some(1));
    }
    assert_eq!((requests, errors, model_errors), (7, 2, 0), "every request counted once across intervals");
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
    assert!(log.contains("60-bad.toml:2: limits.workers = 0: expected 1 to 256"), "{log}");
    assert!(agent.is_running());
    let (status, _) = http("GET", format!("http://127.0.0.1:{}/v2/health/live", agent.http_port), None).await;
    assert_eq!(status, 200);
}
