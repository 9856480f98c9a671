//! Downloads: retries, resumes, stalls, `file://` registries, HTTPS trust.

use super::*;

/// Downloads over a flaky link: server errors, cut connections, stalls and a
/// file larger than declared, each with the outcome an operator needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_retry_resume_and_stop_at_the_declared_size() {
    let (broker, reg, data, mut w, _agent) =
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

    // Cut four times: failed, and what it downloaded in part is removed.
    faulty.inject("digits/2/model.onnx", &[Fault::Truncate(1000); 4]);
    let (last, _) = w.deploy_raw("digits", "2", &faulty_url2, &sha2).await;
    assert_eq!(last.error.unwrap().code, ErrorCode::DownloadFailed);
    let partial = data.path().join("dev8").join("partial");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&partial).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "partial downloads left after a failed deployment");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    // file:// is off unless download.file_root allows a directory (the registry is under it).
    let tmp = std::env::temp_dir().canonicalize().unwrap();
    let (_broker, reg, data, mut w, _agent) =
        lab("dev11", &[], &["--set", &format!("download.file_root={}", tmp.display())]).await;
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
    reg.register("digits-cnn.onnx", "digits", "4");
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

    // A certificate directory, as OpenSSL's SSL_CERT_DIR names one (it was ignored).
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&pki.ca, certs.path().join("site-ca.pem")).unwrap();
    agent.env = vec![("SSL_CERT_DIR".into(), certs.path().display().to_string())];
    agent.kill_and_restart();
    w.online().await;
    let (url3, sha3) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "3").await.unwrap();
    let (last, events) = w.deploy_raw("digits", "3", &url3.replace(&reg.url, &https.url), &sha3).await;
    assert_eq!(last.phase, Phase::Active, "{events:#?}");

    // No bundle at all: refused before connecting, not retried.
    // (SSL_CERT_DIR emptied: a developer's shell may name the system's.)
    agent.env =
        vec![("SSL_CERT_FILE".into(), "/nonexistent/ca-bundle.pem".into()), ("SSL_CERT_DIR".into(), String::new())];
    agent.kill_and_restart();
    w.online().await;
    let (url4, sha4) = outpost_sim::operator::resolve_manifest(&reg.url, "digits", "4").await.unwrap();
    let (last, events) = w.deploy_raw("digits", "4", &url4.replace(&reg.url, &https.url), &sha4).await;
    assert_eq!(last.phase, Phase::Failed, "{events:#?}");
    let err = last.error.unwrap();
    assert_eq!(err.code, ErrorCode::DownloadFailed);
    assert!(
        err.message.contains("cannot verify the server: no CA certificate could be read from what SSL_CERT_FILE names")
            && err.message.contains("/nonexistent/ca-bundle.pem"),
        "{}",
        err.message
    );
    assert!(!events.iter().any(|e| e.detail.as_deref().is_some_and(|d| d.contains("retrying"))), "{events:#?}");
    assert_eq!(https.requests("digits/4/manifest.json").len(), 0);
    assert_eq!(w.infer("still-v3", digits_request(1)).await["model_version"], "3");
}
