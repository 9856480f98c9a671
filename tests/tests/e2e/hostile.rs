//! Hostile clients (issue 14): what one request must not be able to do.

use super::*;
use outpost_sim::operator::{deployment, resolve_manifest};

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

/// Deploys hostile fixture `stem` as digits-like `name@version` and waits
/// for its final event, checking meanwhile that `v1` keeps answering.
async fn deploy_hostile(
    w: &mut Watcher,
    reg: &Registry,
    agent: &Agent,
    stem: &str,
    version: &str,
) -> (outpost_protocol::DeploymentEvent, Vec<outpost_protocol::DeploymentEvent>) {
    let sha = reg.register_hostile(stem, "bomb", version);
    let url = reg.manifest_url("bomb", version);
    let d = outpost_sim::operator::deployment("bomb", version, &url, &sha, None, None);
    w.publish_desired(d.to_json()).await;
    let infer = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let health = format!("http://127.0.0.1:{}/v2/health/ready", agent.http_port);
    let serving = tokio::spawn(async move {
        let mut answered = 0;
        loop {
            let (status, body) =
                http("POST", infer.clone(), Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
            assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");
            assert_eq!(http("GET", health.clone(), None).await.0, 200);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if answered > 10_000 {
                return answered;
            }
        }
    });
    let ended = w.events_until_final(&d.deployment_id).await;
    assert!(!serving.is_finished(), "digits@1 stopped answering: {:?}", serving.await);
    serving.abort();
    ended
}

/// A model's first load and golden sample run isolated under memory and
/// time limits: a memory bomb, a 40 GB allocation that makes tract panic,
/// a bomb folded at load time, and a minute-long MatMul chain are each
/// `failed` with `resource_limit` and the evidence, while the agent keeps
/// serving digits@1 and answering health throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_models_fail_their_isolated_validation_and_the_agent_serves_on() {
    let (broker, reg, _data, mut w, agent) = Lab::device("hostile2")
        .model("digits-mlp.onnx", "digits", "1")
        .flags(&["--set", "limits.validation_memory=512MiB", "--set", "limits.validation_timeout=4"])
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);

    for (stem, version, stage, evidence) in [
        (
            "expand-bomb",
            "1",
            "running the golden sample",
            "an allocation of 6400000000 bytes was refused (limit 512 MiB",
        ),
        ("alloc-panic", "2", "running the golden sample", "an allocation of 40000000000 bytes was refused"),
        ("constant-bomb", "3", "loading the model", "was refused (limit 512 MiB"),
        (
            "slow-chain",
            "4",
            "running the golden sample",
            "took longer than the limit of 4 s (limits.validation_timeout)",
        ),
    ] {
        let (last, _) = deploy_hostile(&mut w, &reg, &agent, stem, version).await;
        assert_eq!(last.phase, Phase::Failed, "{stem}: {last:?}");
        let error = last.error.unwrap();
        eprintln!("{stem}: {}", error.message);
        assert_eq!(error.code, ErrorCode::ResourceLimit, "{stem}: {error:?}");
        assert!(error.message.contains(stage) && error.message.contains(evidence), "{stem}: {}", error.message);
        assert!(
            error.message.contains(" s") && error.message.contains("the serving model is untouched"),
            "{}",
            error.message
        );
    }
    let state = w
        .state(&broker, |s| {
            s.last_deployment.as_ref().is_some_and(|l| l.revision == 4 || l.deployment_id.contains("bomb"))
        })
        .await;
    assert_eq!(state.active.unwrap().version, "1");
}

/// The crash-loop breaker, install side: the agent dies (`kill -9`) while it
/// loads a new version after the version's isolated validation passed (a
/// fault point holds that window open). At the restart that version is
/// quarantined (`model_crashed`, with when it started installing), the
/// previous one serves, READY and health come within 5 s, and the retained
/// desired state of the quarantined revision is not tried again; a new
/// revision is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dying_while_installing_quarantines_the_version_and_the_previous_serves() {
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("breaker1")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    // A clean restart that holds the install window open for 5 s.
    agent.signal(rustix::process::Signal::TERM);
    assert!(agent.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()));
    agent.env.push(("OUTPOST_DELAY_AT".into(), "installing:5000".into()));
    agent.kill_and_restart();
    ready(&agent).await;
    let (url, sha) = resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let d = deployment("digits", "2", &url, &sha, None, None);
    w.publish_desired(d.to_json()).await;
    let validated = w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Validating).await;
    assert!(validated.detail.unwrap_or_default().contains("isolated"), "the golden sample ran in a child");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let notify = NotifySocket::new();
    agent.env.clear();
    agent.env.push(("NOTIFY_SOCKET".into(), notify.path.display().to_string()));
    let started = std::time::Instant::now();
    agent.kill_and_restart();
    let (ready_at, status) = notify.wait_for("READY=1", Duration::from_secs(5));
    assert!(
        ready_at.duration_since(started) < Duration::from_secs(5),
        "READY after {:?}",
        ready_at.duration_since(started)
    );
    assert!(status.contains("serving digits@1"), "{status}");
    let health = format!("http://127.0.0.1:{}/v2/health/ready", agent.http_port);
    assert_eq!(http("GET", health, None).await.0, 200);

    let failed = w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Failed).await;
    let error = failed.error.unwrap();
    assert_eq!(error.code, ErrorCode::ModelCrashed, "{error:?}");
    assert!(error.message.contains("digits@2: the agent stopped uncleanly while installing it"), "{}", error.message);
    // The retained desired state replays at the reconnection: not retried.
    let unchanged = w.event(|e| e.deployment_id == d.deployment_id && e.phase == Phase::Unchanged).await;
    assert!(unchanged.detail.as_deref().unwrap_or_default().contains("quarantined"), "{unchanged:?}");
    let infer = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let (status, body) = http("POST", infer.clone(), Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");

    // A new revision of the same deployment is tried again, and serves.
    let mut d2 = d.clone();
    d2.revision += 1;
    w.publish_desired(d2.to_json()).await;
    let (last, events) = w.events_until_final(&d2.deployment_id).await;
    assert_eq!(last.phase, Phase::Active, "{events:?}");
    let (status, body) = http("POST", infer, Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("2")), "{body}");
}

/// The crash-loop breaker, serving side: three unclean exits within the
/// window while digits@2 serves quarantine it; digits@1 serves again,
/// `rolled_back` with `model_crashed` and the times as evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_crashes_while_serving_quarantine_the_version() {
    let (broker, reg, _data, mut w, mut agent) = Lab::device("breaker2")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .flags(&["--set", "limits.crash_loop_max=3", "--set", "limits.crash_loop_window=600"])
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let (v2, _) = w.deploy(&reg, "digits", "2").await;
    assert_eq!(v2.phase, Phase::Active);
    let infer = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    for crash in 1..=2 {
        agent.kill_and_restart();
        ready(&agent).await;
        let (status, body) = http("POST", infer.clone(), Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
        assert_eq!((status, body["model_version"].as_str()), (200, Some("2")), "after crash {crash}: {body}");
    }
    agent.kill_and_restart();
    let rolled = w.event(|e| e.deployment_id == v2.deployment_id && e.phase == Phase::RolledBack).await;
    ready(&agent).await;
    let (status, body) = http("POST", infer.clone(), Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "after crash 3: {body}");
    let error = rolled.error.unwrap();
    assert_eq!(error.code, ErrorCode::ModelCrashed);
    assert!(error.message.contains("3 unclean exits of the agent within 600 s while it served"), "{}", error.message);
    assert!(rolled.detail.unwrap_or_default().contains("digits@1 serves again"));
    let state = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.version == "1")).await;
    assert_eq!(state.last_deployment.unwrap().outcome, Outcome::RolledBack);
    // A clean stop and start counts nothing.
    agent.signal(rustix::process::Signal::TERM);
    assert!(agent.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()));
    agent.kill_and_restart();
    ready(&agent).await;
    let (status, body) = http("POST", infer, Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");
}

/// Waits until the agent's HTTP endpoint answers (after a restart).
async fn ready(agent: &Agent) {
    let health = format!("http://127.0.0.1:{}/v2/health/live", agent.http_port);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while try_http("GET", health.clone(), None).await.map(|r| r.0) != Ok(200) {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("the agent did not come back:\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device under `MemoryMax=512M`, reproduced with a memory cgroup.
/// `None` (the test then says SKIPPED) where this machine allows none.
async fn in_a_512m_cgroup(
    device: &str,
    flags: &[&str],
) -> Option<(MemoryCgroup, Mosquitto, Registry, tempfile::TempDir, Watcher, Agent)> {
    let Some(cgroup) = MemoryCgroup::new(&format!("outpost-{device}"), 512 << 20) else {
        eprintln!(
            "SKIPPED: this machine does not allow a memory cgroup (needs a writable cgroup v1 memory controller)"
        );
        return None;
    };
    let (broker, reg, data, mut w, mut agent) =
        Lab::device(device).model("digits-mlp.onnx", "digits", "1").flags(flags).start().await;
    agent.cgroup = Some(cgroup.dir.clone());
    agent.kill_and_restart();
    ready(&agent).await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    Some((cgroup, broker, reg, data, w, agent))
}

/// The OOM crash loop and request OOM, with the default limits, in
/// a 512 MiB cgroup: the memory bomb is `failed/resource_limit` (its
/// allocation refused under the limit the agent derives from the cgroup),
/// the agent serves on; a model whose allocation comes from a request value
/// passes its golden sample, then three requests OOM-kill the agent and the
/// breaker quarantines it: digits@1 serves again. (Against the agent from
/// before issue 14 this fails: the bomb OOM-killed the agent itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_memory_cgroup_with_the_default_limits_no_model_takes_the_device_down() {
    let Some((_cgroup, _broker, reg, _data, mut w, mut agent)) = in_a_512m_cgroup("oom2", &[]).await else { return };
    let (last, _) = deploy_hostile(&mut w, &reg, &agent, "expand-bomb", "1").await;
    let error = last.error.unwrap();
    assert_eq!(error.code, ErrorCode::ResourceLimit, "{error:?}");
    assert!(error.message.contains("an allocation of 6400000000 bytes was refused"), "{}", error.message);
    assert!(agent.is_running());

    let (last, _) = deploy_hostile(&mut w, &reg, &agent, "value-bomb", "2").await;
    assert_eq!(last.phase, Phase::Active, "{last:?}");
    let bomb_url = format!("http://127.0.0.1:{}/v2/models/bomb/infer", agent.http_port);
    let request =
        serde_json::json!({"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [300_000_000]}]});
    for death in 1..=3 {
        let _ = try_http("POST", bomb_url.clone(), Some(serde_json::to_vec(&request).unwrap())).await;
        assert!(
            agent.wait_exit(Duration::from_secs(20)).is_some(),
            "death {death}: the request did not kill the agent"
        );
        agent.kill_and_restart();
        ready(&agent).await;
    }
    let rolled = w.event(|e| e.phase == Phase::RolledBack).await;
    assert_eq!(rolled.error.unwrap().code, ErrorCode::ModelCrashed);
    let infer = format!("http://127.0.0.1:{}/v2/models/digits/infer", agent.http_port);
    let (status, body) = http("POST", infer, Some(serde_json::to_vec(&digits_request(1)).unwrap())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");
    agent.kill();
}

/// The OOM killer for real: a validation allowed more memory than the
/// 512 MiB cgroup holds is killed by the kernel, which takes the child (first
/// in line), not the agent: `resource_limit`, "out of memory".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_memory_cgroup_the_oom_killer_takes_the_validation_not_the_agent() {
    let Some((cgroup, _broker, reg, _data, mut w, mut agent)) =
        in_a_512m_cgroup("oom1", &["--set", "limits.validation_memory=8GiB"]).await
    else {
        return;
    };
    let (last, _) = deploy_hostile(&mut w, &reg, &agent, "expand-bomb", "1").await;
    let error = last.error.unwrap();
    assert_eq!(error.code, ErrorCode::ResourceLimit, "{error:?}");
    assert!(error.message.contains("by the system, out of memory"), "{}", error.message);
    assert!(agent.is_running(), "the OOM killer took the agent");
    assert!(cgroup.oom_kills() >= 1);
    agent.kill();
}

/// The connection cap with the default limits (256): half-open requests
/// past it cannot pin the endpoint; the next connection is told 503 at once.
/// (Against the agent from before issue 14 this fails: it held every one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_past_the_default_cap_are_turned_away() {
    use tokio::io::AsyncWriteExt;
    let (_broker, _reg, _data, _w, agent) = Lab::device("http2").start().await;
    let mut held = Vec::new();
    for _ in 0..260 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", agent.http_port)).await.unwrap();
        tcp.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, text) = raw_http(agent.http_port, health, b"", Duration::from_secs(2)).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("256 connections (http.max_connections)"), "{text}");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while raw_http(agent.http_port, health, b"", Duration::from_secs(1)).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the endpoint did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bounded HTTP: half-open requests (slow-loris) are closed after the
/// header timeout and cannot hold more than the connection cap (the next
/// connection is told 503 at once); a body over the cap is refused 413
/// before it is read; a body that stops arriving gets 408; a request that
/// would take the bytes in flight over the bound is `overloaded` before its
/// body is read. digits@1 answers once the attack stops, and meanwhile the
/// MQTT side serves as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_and_oversize_bodies_are_bounded_and_the_model_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let (_broker, reg, _data, mut w, agent) = Lab::device("http1")
        .model("digits-mlp.onnx", "digits", "1")
        .flags(&[
            "--set",
            "http.header_timeout=2",
            "--set",
            "http.body_timeout=2",
            "--set",
            "http.max_connections=40",
            "--set",
            "http.max_body=2MiB",
            "--set",
            "http.max_inflight_bytes=24MiB",
        ])
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let port = agent.http_port;
    let infer = format!("http://127.0.0.1:{port}/v2/models/digits/infer");
    let good = serde_json::to_vec(&digits_request(1)).unwrap();

    // 60 half-open requests: 40 are held (and closed after 2 s), 20 turned away at once.
    let mut loris = Vec::new();
    for _ in 0..60 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        loris.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, text) =
        raw_http(port, "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", b"", Duration::from_secs(1)).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("http.max_connections"), "{text}");
    assert_eq!(w.infer("during-loris", digits_request(1)).await["model_version"], "1");
    let started = std::time::Instant::now();
    let mut closed = 0;
    for mut tcp in loris {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        // Closed by the server (EOF or an error), within the timeout and a margin.
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 60, "every half-open connection is closed");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    let (status, body) = http("POST", infer.clone(), Some(good.clone())).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");

    // A declared body over the cap: 413 before a byte of it is sent.
    let (status, text) =
        raw_infer(port, "Content-Type: application/json\r\nContent-Length: 61000000\r\n", b"", Duration::from_secs(2))
            .await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("the body is 61000000 bytes, over the limit of 2097152 bytes (http.max_body)"), "{text}");
    // Chunked, no length: cut at the cap.
    let chunk = vec![b' '; 1 << 20];
    let mut chunked = Vec::new();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_infer(port, "Transfer-Encoding: chunked\r\n", &chunked, Duration::from_secs(5)).await;
    assert_eq!(status, 413, "{text}");
    // A body that stops arriving: 408 after the body timeout.
    let (status, text) = raw_infer(port, "Content-Length: 1000\r\n", b"{\"inputs\"", Duration::from_secs(5)).await;
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("http.body_timeout"), "{text}");

    // Bytes in flight: one request holding 2 MB (its body trickling in) leaves
    // no room for a second one of 2 MB, refused before its body is read.
    let mut holder = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    holder
        .write_all(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = raw_infer(port, "Content-Length: 2000000\r\n", b"", Duration::from_secs(2)).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("http.max_inflight_bytes"), "{text}");
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = http("POST", infer, Some(good)).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");
    // Every refusal counted: 20 connections turned away, one request over the bound.
    let (_, metrics) = http("GET", format!("http://127.0.0.1:{port}/metrics"), None).await;
    let metrics = metrics.as_str().unwrap_or_default();
    let rejected = outpost_tests::metric_total(metrics, "outpost_inference_rejected_total");
    assert!(rejected >= 21, "{metrics}");
}

/// The MQTT requests in flight are bounded in bytes: with room for about
/// two 400 KB requests, a burst of ten that each take a second (a fault
/// point delays them) gets the others answered `overloaded`, unread, naming
/// the bound; all ten are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_requests_in_flight_are_bounded_in_bytes() {
    let (_broker, reg, _data, mut w, _agent) = Lab::device("mqtt1")
        .model("slow.onnx", "slow", "1")
        .flags(&["--set", "mqtt.max_inflight_bytes=1MiB", "--workers", "1"])
        .env("OUTPOST_DELAY_AT", "mqtt-request:1000")
        .start()
        .await;
    assert_eq!(w.deploy(&reg, "slow", "1").await.0.phase, Phase::Active);
    let mut request = digits_request(64);
    request["pad"] = "x".repeat(400_000).into();
    for i in 0..10 {
        request["id"] = format!("burst-{i}").into();
        w.client.publish(&w.topics.infer(&w.device), serde_json::to_vec(&request).unwrap(), false).await.unwrap();
    }
    let (mut answered, mut overloaded) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answered + overloaded < 10 && std::time::Instant::now() < deadline {
        let Some(m) = w.client.next(Duration::from_millis(200)).await else { continue };
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if !v["id"].as_str().unwrap_or_default().starts_with("burst-") {
            continue;
        }
        if v["model_version"] == "1" {
            answered += 1;
        } else {
            assert_eq!(v["code"], "overloaded", "{v}");
            assert!(v["error"].as_str().unwrap().contains("mqtt.max_inflight_bytes"), "{v}");
            overloaded += 1;
        }
    }
    assert_eq!(answered + overloaded, 10, "every request is answered");
    assert!(answered >= 1 && overloaded >= 1, "answered {answered}, overloaded {overloaded}");
}

/// The first finding of fuzzing (`fuzz/regressions/model/`): a mutated
/// digits model on which tract's ONNX parser panics ("no entry found for
/// key"). The panic happens in the isolated validation's child: the
/// deployment fails `model_load_failed` with the panic's message, the agent
/// never goes down and the version serving keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_makes_tract_panic_while_parsing_is_refused_and_the_agent_serves_on() {
    let (_broker, reg, _data, mut w, mut agent) =
        Lab::device("hostile-fz").model("digits-mlp.onnx", "digits", "1").start().await;
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let model = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/model/tract-parse-panic-no-entry-for-key.onnx"),
    )
    .unwrap();
    // A bundle around it: the digits manifest, labels and a golden sample.
    let dir = reg.root().join("fuzzed/1");
    std::fs::create_dir_all(dir.join("sample")).unwrap();
    let golden = reg.root().join("digits/1");
    let mut files = Vec::new();
    for (path, bytes) in [
        ("model.onnx", model),
        ("labels.txt", std::fs::read(golden.join("labels.txt")).unwrap()),
        ("sample/input.json", std::fs::read(golden.join("sample/input.json")).unwrap()),
        ("sample/expected.json", std::fs::read(golden.join("sample/expected.json")).unwrap()),
    ] {
        std::fs::write(dir.join(path), &bytes).unwrap();
        files.push(
            serde_json::json!({"path": path, "sha256": outpost_sim::registry::sha256(&bytes), "size": bytes.len()}),
        );
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden.join("manifest.json")).unwrap()).unwrap();
    manifest["name"] = "fuzzed".into();
    manifest["files"] = files.into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
    let url = reg.manifest_url("fuzzed", "1");
    let (last, events) = w.deploy_raw("fuzzed", "1", &url, &outpost_sim::registry::sha256(&bytes)).await;
    assert_eq!(last.phase, Phase::Failed, "{events:?}");
    let e = last.error.unwrap();
    assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{e:?}");
    assert!(e.message.contains("no entry found for key"), "{e:?}");
    assert!(agent.is_running());
    let answer = w.infer("after-fuzzed", digits_request(1)).await;
    assert_eq!((answer["model_name"].as_str(), answer["model_version"].as_str()), (Some("digits"), Some("1")));
}
