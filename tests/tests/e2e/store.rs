//! The store: power cuts, crashes between durable steps, retention, quotas,
//! and desired states acked only once recorded.

use super::*;

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

    // A free-space reserve no filesystem has: nothing is downloaded into it.
    agent.kill();
    let _agent = Agent::start_with(broker.port, "dev14", &dir, &[], &["--set", "limits.disk_reserve=1000TiB"]);
    w.online().await;
    let err = refused(&mut w, &reg, "2", &resolve("2", &reg).await).await;
    assert_eq!(err.code, ErrorCode::DiskFull, "{err}");
    assert!(err.message.contains("kept in reserve: limits.disk_reserve"), "{}", err.message);
    assert_eq!(w.infer("reserve", digits_request(1)).await["model_version"], "3");
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
