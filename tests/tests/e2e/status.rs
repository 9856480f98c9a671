//! `outpost-sim status`, the fleet view, over real agent processes: a group's
//! devices with their models (a model slot too), outcomes and health, one of
//! them killed.

use super::*;
use outpost_protocol::Topics;
use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `outpost-sim ARGS` off the test's runtime (the load keeps going meanwhile).
async fn sim_off(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || sim(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

/// `status --json`'s rows by device and slot (`-`: the default slot).
fn rows(out: &str) -> std::collections::BTreeMap<(String, String), serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let key = |r: &serde_json::Value| (r["device"].as_str().unwrap().into(), r["slot"].as_str().unwrap_or("-").into());
    v["rows"].as_array().unwrap().iter().map(|r| (key(r), r.clone())).collect()
}

fn key(device: &str, slot: &str) -> (String, String) {
    (device.into(), slot.into())
}

/// The words of the table line of `device`'s `slot` (`-`: the default slot).
fn line<'a>(out: &'a str, device: &str, slot: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() > 2 && w[0] == device && w[2] == slot)
        .unwrap_or_else(|| panic!("no {device} {slot} in\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_group_s_devices_models_outcomes_health_and_who_went_offline() {
    let broker = Mosquitto::start();
    let reg = Registry::start().await;
    reg.register("digits-mlp.onnx", "digits", "1");
    reg.register("digits-cnn.onnx", "digits-cnn", "1");
    // A candidate scored in shadow beside it.
    reg.register("digits-mlp.onnx", "digits-cnn", "2");
    let data = tempfile::tempdir().unwrap();
    let fast = ["--telemetry-interval", "1"];
    let a = Agent::start_with(broker.port, "st-a", &data.path().join("st-a"), &["cams"], &fast);
    let mut b = Agent::start_with(broker.port, "st-b", &data.path().join("st-b"), &["cams"], &fast);
    let _c = Agent::start_with(broker.port, "st-c", &data.path().join("st-c"), &["other"], &fast);
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let deploy = ["deploy", "--broker", &url, "--group", "cams", "--model", "digits@1", "--registry-url", &reg.url];
    let (code, out, err) = sim_off(&[&deploy[..], &["--wait", "--expect", "2", "--timeout", "120"]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    // st-a has a second model, in slot det, with a candidate in shadow.
    let mut op = outpost_sim::operator::Operator::connect(&broker.url(), "st-op", Topics::default()).await.unwrap();
    op.subscribe(&Topics::default().events("st-a")).await.unwrap();
    let (manifest, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits-cnn", "1").await.unwrap();
    let mut det = outpost_sim::operator::deployment("digits-cnn", "1", &manifest, &sha, None, None);
    let (manifest, sha) = outpost_sim::operator::resolve_manifest(&reg.url, "digits-cnn", "2").await.unwrap();
    let candidate = outpost_sim::operator::deployment("digits-cnn", "2", &manifest, &sha, None, None).model;
    det.shadow = Some(outpost_protocol::Shadow { model: candidate, sample_rate: 1.0 });
    op.publish(&Topics::default().device_model_desired("st-a", "det"), det.to_json(), true).await.unwrap();
    let finals =
        outpost_sim::operator::wait_for_outcome(&mut op, &det.deployment_id, 1, Duration::from_secs(120), false).await;
    assert_eq!(finals.unwrap()[0].phase, Phase::Active);

    // Requests on st-a, half of those for digits malformed (bad_input),
    // all of those for det well-formed, until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, port) = (stop.clone(), a.http_port);
        async move {
            let url = format!("http://127.0.0.1:{port}/v2/models/digits/infer");
            let good = serde_json::to_vec(&digits_request(1)).unwrap();
            let bad = serde_json::to_vec(&serde_json::json!({"inputs": [
                {"name": "input", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63]}]}))
            .unwrap();
            let det = format!("http://127.0.0.1:{port}/v2/models/det/infer");
            let mut answers = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                answers.0 += (http("POST", url.clone(), Some(good.clone())).await.0 == 200) as u32;
                answers.1 += (http("POST", url.clone(), Some(bad.clone())).await.0 == 400) as u32;
                answers.0 += (http("POST", det.clone(), Some(good.clone())).await.0 == 200) as u32;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        }
    });
    // A whole telemetry interval under load before anyone looks.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The group's view: st-a and st-b, not st-c; every online device sent
    // telemetry, so it ends well before --wait.
    let (code, out, err) = sim_off(&["status", "--broker", &url, "--group", "cams", "--wait", "60s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..6], ["DEVICE", "ONLINE", "SLOT", "MODEL", "OUTCOME", "P99"], "{out}");
    for device in ["st-a", "st-b"] {
        assert_eq!(line(&out, device, "-")[..5], [device, "online", "-", "digits@1", "active"], "{out}");
    }
    let det = line(&out, "st-a", "det");
    assert_eq!(det[..5], ["st-a", "online", "det", "digits-cnn@1", "active"], "{out}");
    assert_eq!(det[6], "0.0%", "det's requests are all well-formed: {out}");
    assert_eq!(det[8], "digits-cnn@2", "the shadow candidate: {out}");
    let errors = line(&out, "st-a", "-")[6];
    assert!(errors.ends_with('%') && errors != "0.0%", "st-a's error rate: {out}");
    assert!(!out.contains("st-c"), "st-c is not in the group: {out}");
    assert!(out.contains("\n2 devices: 2 online; digits-cnn@1 1, digits@1 2; 0 failed or rolled back\n"), "{out}");
    assert!(!out.contains("no telemetry"), "{out}");

    // The same as JSON, with the figures.
    let (code, out, err) = sim_off(&["status", "--broker", &url, "--group", "cams", "--json", "--wait", "60s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let view = rows(&out);
    assert_eq!(view.keys().cloned().collect::<Vec<_>>(), [key("st-a", "-"), key("st-a", "det"), key("st-b", "-")]);
    let st_a = &view[&key("st-a", "-")];
    for (field, want) in [("online", "online"), ("model", "digits@1"), ("outcome", "active")] {
        assert_eq!(st_a[field], want, "{st_a}");
    }
    assert!(st_a["slot"].is_null() && st_a["telemetry"] == true, "{st_a}");
    assert!(st_a["requests"].as_u64().unwrap() > 0, "{st_a}");
    assert!(st_a["p99_ms"].as_f64().unwrap() > 0.0, "{st_a}");
    let rate = st_a["error_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 1.0, "half the requests are malformed: {st_a}");
    assert!(st_a["last_seen_s"].as_f64().is_some(), "{st_a}");
    let det = &view[&key("st-a", "det")];
    assert_eq!((det["model"].as_str(), det["outcome"].as_str()), (Some("digits-cnn@1"), Some("active")), "{det}");
    assert!(det["requests"].as_u64().unwrap() > 0 && det["p99_ms"].as_f64().unwrap() > 0.0, "{det}");
    assert_eq!(det["error_rate"].as_f64(), Some(0.0), "{det}");
    let shadow = &det["shadow"];
    assert_eq!(shadow["model"], "digits-cnn@2", "{det}");
    let agreement = shadow["agreement"].as_f64().unwrap();
    assert!(shadow["compared"].as_u64().unwrap() > 0 && (0.0..=1.0).contains(&agreement), "{det}");
    let st_b = &view[&key("st-b", "-")];
    assert!(st_b["p99_ms"].is_null(), "no requests on st-b: {st_b}");

    // --watch, not on a terminal, with named devices (their exact topics):
    // snapshots as JSON lines; the requests per second show once two reports
    // of st-a gave its interval; Ctrl-C ends it with 0.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("outpost-sim");
    let mut child = std::process::Command::new(bin)
        .args(["status", "--broker", &url, "--device", "st-a,st-c", "--watch", "--json"])
        .env("OUTPOST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut snapshots = 0;
        for l in std::io::BufReader::new(stdout).lines() {
            let l = l.unwrap();
            snapshots += 1;
            let view = rows(&l);
            let keys = [key("st-a", "-"), key("st-a", "det"), key("st-c", "-")];
            assert_eq!(view.keys().cloned().collect::<Vec<_>>(), keys, "{l}");
            if view[&keys[1]]["requests_per_s"].as_f64().is_some_and(|r| r > 0.0) {
                let st_c = &view[&keys[2]];
                assert!(st_c["model"].is_null() && st_c["online"] == "online", "{l}");
                return snapshots;
            }
            assert!(std::time::Instant::now() < deadline, "no requests/s for st-a within 60 s: {l}");
        }
        panic!("status --watch ended by itself");
    })
    .await
    .unwrap();
    assert!(seen >= 1);
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "Ctrl-C ends --watch with 0: {status:?}");

    stop.store(true, Ordering::Relaxed);
    let (good, bad) = load.await.unwrap();
    assert!(good > 0 && bad > 0, "{good} answered, {bad} refused");

    // st-b killed: its Last Will says offline; its retained state still
    // says what it served.
    b.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = sim_off(&["status", "--broker", &url, "--group", "cams", "--json", "--wait", "0"]).await;
        assert_eq!(code, 0, "{out}{err}");
        if rows(&out)[&key("st-b", "-")]["online"] == "offline" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "st-b not offline within 60 s: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, out, err) = sim_off(&["status", "--broker", &url, "--group", "cams", "--wait", "60s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(line(&out, "st-b", "-")[..5], ["st-b", "offline", "-", "digits@1", "active"], "{out}");
    assert_eq!(line(&out, "st-a", "-")[1], "online", "{out}");
    assert!(
        out.contains("\n2 devices: 1 online, 1 offline; digits-cnn@1 1, digits@1 2; 0 failed or rolled back\n"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_failed_deployment_and_refuses_bad_names() {
    let (broker, reg, _data, _w, _agent) = lab("st-f", &["cams"], &["--telemetry-interval", "1"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    // A version the device cannot load: the bytes are not ONNX.
    reg.register("digits-mlp.onnx", "digits", "2");
    std::fs::write(reg.root().join("digits/2/model.onnx"), b"not onnx").unwrap();
    reg.rehash("digits", "2");
    let (code, out, err) = sim_off(&[
        "deploy",
        "--broker",
        &url,
        "--device",
        "st-f",
        "--model",
        "digits@2",
        "--registry-url",
        &reg.url,
        "--wait",
    ])
    .await;
    assert_eq!(code, 1, "{out}{err}");

    let (code, out, err) = sim_off(&["status", "--broker", &url, "--device", "st-f", "--wait", "60s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let l = line(&out, "st-f", "-");
    assert_eq!(l[..6], ["st-f", "online", "-", "-", "failed", "(model_load_failed)"], "{out}");
    assert!(out.contains("; nothing serving 1; 1 failed or rolled back\n"), "{out}");

    for bad in [["--device", "a/+"], ["--group", "#"]] {
        let (code, _, err) = sim_off(&[&["status", "--broker", &url][..], &bad[..]].concat()).await;
        assert_eq!(code, 64, "{bad:?}: {err}");
    }
    let (code, _, err) = sim_off(&["status", "--broker", "mqtt://127.0.0.1:1", "--wait", "1"]).await;
    assert_eq!(code, 69, "{err}");
}
