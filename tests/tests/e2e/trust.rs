//! Only the operator decides what runs: signed deployments (openssl-only and
//! with the operator CLI), certified deploy keys, rollback and freeze
//! protection, downgrades, no confused deputy, no `file://` probing, secrets
//! kept out of events and `check-config`.

use super::*;
use outpost_protocol::DeploymentEvent;
use outpost_protocol::trust::Target;
use outpost_sim::operator::{Operator, deployment, resolve_manifest};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An ed25519 key pair made by openssl: (private PEM, public PEM).
fn openssl_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (private, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub.pem")));
    let ok = Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&private).status();
    assert!(ok.is_ok_and(|s| s.success()), "openssl genpkey failed (install openssl)");
    let ok = Command::new("openssl").args(["pkey", "-pubout", "-in"]).arg(&private).arg("-out").arg(&public).status();
    assert!(ok.is_ok_and(|s| s.success()));
    (private, public)
}

/// Signs `payload` with openssl alone, exactly as the README shows
/// (`scripts/sign-deployment.sh`): the envelope to publish.
fn openssl_sign(key: &Path, payload: &[u8], payload_type: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(&file, payload).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/sign-deployment.sh");
    let out = Command::new("sh").arg(script).arg(key).arg(&file).args(payload_type).output().unwrap();
    assert!(out.status.success(), "sign-deployment.sh: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

async fn signed_deployment(
    reg: &Registry,
    key: &Path,
    target: Target,
    version: &str,
    revision: u64,
    allow_downgrade: bool,
) -> (String, Vec<u8>) {
    let (url, sha) = resolve_manifest(&reg.url, "digits", version).await.unwrap();
    let mut d = deployment("digits", version, &url, &sha, Some(revision), None);
    d.target = Some(target);
    if allow_downgrade {
        d.policy.allow_downgrade = Some(true);
    }
    (d.deployment_id.clone(), openssl_sign(key, &d.to_json(), None))
}

fn failed_with(ev: &DeploymentEvent, code: ErrorCode) -> String {
    assert_eq!(ev.phase, Phase::Failed, "{ev:?}");
    let e = ev.error.clone().unwrap();
    assert_eq!(e.code, code, "{e:?}");
    e.message
}

/// A counter of the agent's `/metrics`.
fn metric(agent: &Agent, name: &str) -> u64 {
    let url = format!("http://127.0.0.1:{}/metrics", agent.http_port);
    let text = ureq::get(&url).call().unwrap().into_body().read_to_string().unwrap();
    assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing: {text}");
    outpost_tests::metric_total(&text, name)
}

/// The next refusal of an unverified desired state: reported under no
/// deployment id (an unsigned copy of a real deployment must not make it
/// look failed); its message.
async fn refusal(w: &mut Watcher, code: ErrorCode) -> String {
    let ev = w.event(|e| e.deployment_id.is_empty() && e.phase == Phase::Failed).await;
    assert_eq!(ev.revision, 0, "{ev:?}");
    failed_with(&ev, code)
}

async fn serves(w: &mut Watcher, version: &str) {
    let answer = w.infer(&format!("check-{version}-{}", outpost_agent::sys::jitter()), digits_request(1)).await;
    assert_eq!(answer["model_version"], version, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trust_keys_only_deployments_the_operator_signed_for_this_device_apply() {
    let keys = tempfile::tempdir().unwrap();
    let (root, root_pub) = openssl_key(keys.path(), "root");
    let (stranger, _) = openssl_key(keys.path(), "stranger");
    let trust = root_pub.display().to_string();
    let (broker, reg, data, mut w, mut agent) = Lab::device("cam-1")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .flags(&["--trust-key", &trust])
        .start()
        .await;
    let me = Target::Device("cam-1".into());

    // Signed with openssl alone: applies.
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "1", 10, false).await;
    w.publish_desired(env).await;
    assert_eq!(w.events_until_final(&id).await.0.phase, Phase::Active);
    serves(&mut w, "1").await;

    // The lock-out of the issue: an anonymous publisher's unsigned revision
    // u64::MAX is refused, and does not raise the device's revision.
    let (url, sha) = resolve_manifest(&reg.url, "digits", "2").await.unwrap();
    let evil = deployment("digits", "2", &url, &sha, Some(u64::MAX), Some("evil".into()));
    w.publish_desired(evil.to_json()).await;
    let m = refusal(&mut w, ErrorCode::SignatureRequired).await;
    assert!(m.starts_with("an unsigned deployment (it claims deployment_id \"evil\", revision 18446744073709551615): this device only accepts deployments signed"), "{m}");
    serves(&mut w, "1").await;

    // Signed by a key the device does not trust.
    let (_, env) = signed_deployment(&reg, &stranger, me.clone(), "2", 11, false).await;
    w.publish_desired(env).await;
    let m = refusal(&mut w, ErrorCode::SignatureInvalid).await;
    assert!(m.contains("not made by any of the 1 trusted key(s)"), "{m}");

    // Signed by the root, but for another device: replayed here, refused.
    let (id, env) = signed_deployment(&reg, &root, Target::Device("cam-2".into()), "2", 12, false).await;
    w.publish_desired(env).await;
    let m = failed_with(&w.events_until_final(&id).await.0, ErrorCode::SignatureInvalid);
    assert_eq!(m, "the message is for device cam-2 but arrived on the topic of device cam-1");

    // A signed envelope whose payload was changed after signing.
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "2", 13, false).await;
    let mut v: serde_json::Value = serde_json::from_slice(&env).unwrap();
    let mut d = deployment("digits", "2", &url, &sha, Some(14), Some(id.clone()));
    d.target = Some(me.clone());
    v["payload"] = outpost_protocol::trust::base64_encode(&d.to_json()).into();
    w.publish_desired(serde_json::to_vec(&v).unwrap()).await;
    refusal(&mut w, ErrorCode::SignatureInvalid).await;

    // An unsigned empty payload does not undeploy.
    w.publish_desired(Vec::new()).await;
    let m = refusal(&mut w, ErrorCode::SignatureRequired).await;
    assert!(m.starts_with("an empty (undeploy) payload is unsigned"), "{m}");
    serves(&mut w, "1").await;

    // The operator is not locked out: the next signed revision applies.
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "2", 20, false).await;
    w.publish_desired(env).await;
    assert_eq!(w.events_until_final(&id).await.0.phase, Phase::Active);
    serves(&mut w, "2").await;

    // Going back to an older version needs the signed policy's consent.
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "1", 21, false).await;
    w.publish_desired(env).await;
    let m = failed_with(&w.events_until_final(&id).await.0, ErrorCode::DowngradeRefused);
    assert!(m.starts_with("digits@1 is older than digits@2, which serves"), "{m}");
    serves(&mut w, "2").await;
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "1", 22, true).await;
    w.publish_desired(env.clone()).await;
    assert_eq!(w.events_until_final(&id).await.0.phase, Phase::Active);
    serves(&mut w, "1").await;

    // The highest revision survives a power cut: an older signed deployment
    // (a replay of one the device saw, or not) is stale after the restart.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("cam-1/agent.json")).unwrap()).unwrap();
    assert_eq!(record["revisions"]["device"], 22, "{record}");
    agent.kill_and_restart();
    w.online().await;
    let (id, env) = signed_deployment(&reg, &root, me.clone(), "2", 15, false).await;
    w.publish_desired(env.clone()).await;
    let m = failed_with(&w.events_until_final(&id).await.0, ErrorCode::StaleRevision);
    assert!(m.contains("not newer than revision 22"), "{m}");
    serves(&mut w, "1").await;

    // A signed undeploy withdraws; replaying the deployment before it is stale.
    let undeploy = serde_json::json!({"schema": "outpost.undeploy.v1", "revision": 23, "target": {"device": "cam-1"}});
    let env_u =
        openssl_sign(&root, &serde_json::to_vec(&undeploy).unwrap(), Some("application/vnd.outpost.undeploy+json"));
    w.publish_desired(env_u).await;
    w.state(&broker, |s| s.active.is_none()).await;
    w.publish_desired(env).await;
    let ev = w.event(|e| e.deployment_id == id && e.phase.is_final()).await;
    failed_with(&ev, ErrorCode::StaleRevision);

    // Counted since the restart: the two stale ones.
    assert_eq!(metric(&agent, "outpost_desired_refused_total"), 2);
}

/// The issue's lock-out, before keys: an anonymous revision u64::MAX went
/// active and was persisted. Once the operator configures keys, what was
/// accepted unsigned no longer counts: signed deployments apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_taken_without_keys_do_not_lock_out_signed_operation() {
    let keys = tempfile::tempdir().unwrap();
    let (root, root_pub) = openssl_key(keys.path(), "root");
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("cam-9")
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .start()
        .await;
    let (url, sha) = resolve_manifest(&reg.url, "digits", "1").await.unwrap();
    let evil = deployment("digits", "1", &url, &sha, Some(u64::MAX), Some("evil".into()));
    w.publish_desired(evil.to_json()).await;
    assert_eq!(w.events_until_final("evil").await.0.phase, Phase::Active);
    agent.kill();
    let trust = root_pub.display().to_string();
    let http = format!("127.0.0.1:{}", agent.http_port);
    let _agent = Agent::start_with(
        _broker.port,
        "cam-9",
        &agent.data_dir.clone(),
        &[],
        &["--trust-key", &trust, "--http-bind", &http],
    );
    w.online().await;
    serves(&mut w, "1").await;
    let (id, env) = signed_deployment(&reg, &root, Target::Device("cam-9".into()), "2", 5, false).await;
    w.publish_desired(env).await;
    assert_eq!(w.events_until_final(&id).await.0.phase, Phase::Active);
    serves(&mut w, "2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_keys_certified_by_a_root_sign_within_their_scope_until_they_expire() {
    let keys = tempfile::tempdir().unwrap();
    let k = |n: &str| keys.path().join(n).display().to_string();
    for name in ["root", "ci", "new-root"] {
        let (code, out, err) = sim(&["keygen", &k(name)]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let certify = |out: &str, expires: &str, scope: &[&str]| {
        let (root, key) = (k("root.pem"), k("ci.pub.pem"));
        let mut args = vec!["certify", "--root-key", &root, "--key", &key, "--name", "ci-2026"];
        args.extend(["--expires", expires, "--out", out]);
        args.extend(scope);
        let (code, o, e) = sim(&args);
        assert_eq!(code, 0, "{o}{e}");
    };
    let (cam_cert, group_cert, old_cert) = (k("cam.cert.json"), k("group.cert.json"), k("old.cert.json"));
    certify(&cam_cert, "30d", &["--devices", "cam-*"]);
    certify(&group_cert, "30d", &["--groups", "lobby"]);
    certify(&old_cert, "2020-01-01T00:00:00Z", &["--devices", "*"]);

    let root_pub = k("root.pub.pem");
    let (broker, reg, _data, mut w, mut agent) = Lab::device("cam-7")
        .groups(&["lobby"])
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .flags(&["--trust-key", &root_pub])
        .start()
        .await;
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
    let deploy = |version: &str, revision: &str, target: &[&str], cert: &str| {
        let mut args = vec!["deploy", "--broker", &broker_url, "--model"];
        let model = format!("digits@{version}");
        let key = k("ci.pem");
        args.extend([model.as_str(), "--registry-url", &reg.url, "--revision", revision, "--sign-key", &key]);
        args.extend(["--certificate", cert, "--deployment-id"]);
        let id = format!("d-{revision}");
        args.push(&id);
        args.extend(target);
        let (code, out, err) = sim(&args);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.starts_with("published signed"), "{out}");
        id
    };

    // In scope (cam-*), not expired: applies.
    let id = deploy("1", "1", &["--device", "cam-7"], &cam_cert);
    assert_eq!(w.events_until_final(&id).await.0.phase, Phase::Active);
    // A certificate for the group, used on the device topic: out of scope.
    deploy("2", "2", &["--device", "cam-7"], &group_cert);
    let m = refusal(&mut w, ErrorCode::SignatureInvalid).await;
    assert!(m.contains("does not cover device cam-7 (its scope: devices [], groups [lobby])"), "{m}");
    // Expired.
    deploy("2", "3", &["--device", "cam-7"], &old_cert);
    let m = refusal(&mut w, ErrorCode::SignatureInvalid).await;
    assert!(m.contains("expired at 2020-01-01T00:00:00Z"), "{m}");
    // The group certificate on the group topic: in scope. (The device topic
    // outranks the group, so it is recorded as shadowed, not refused.)
    let id = deploy("2", "4", &["--group", "lobby"], &group_cert);
    let ev = w.events_until_final(&id).await.0;
    assert_eq!(ev.phase, Phase::Unchanged, "{ev:?}");
    serves(&mut w, "1").await;

    // Rotating the root: the device trusts the new root only (a config
    // change and a restart); the old root's deploy key no longer signs.
    let new_root = k("new-root.pub.pem");
    let (code, out, err) =
        outpost(&["check-config", "--broker", &broker_url, "--device", "cam-7", "--trust-key", &new_root]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("trust.keys = ["), "{out}");
    assert!(!out.contains("WARNING: trust.keys is empty"), "{out}");
    agent.kill();
    let mut agent = Agent::start_with(
        broker.port,
        "cam-7",
        &agent.data_dir.clone(),
        &["lobby"],
        &["--trust-key", &new_root, "--http-bind", &format!("127.0.0.1:{}", agent.http_port)],
    );
    w.online().await;
    deploy("2", "5", &["--device", "cam-7"], &cam_cert);
    let m = refusal(&mut w, ErrorCode::SignatureInvalid).await;
    assert!(m.contains("certificate: not signed by a trusted root key"), "{m}");
    serves(&mut w, "1").await;
    agent.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_go_only_to_the_reply_namespace_and_the_agent_speaks_for_no_one_else() {
    let (broker, reg, _data, mut w, agent) = lab("dev-r", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let topics = outpost_protocol::Topics::default();
    let mut victim = Operator::connect(&broker.url(), "victim-watch", topics.clone()).await.unwrap();
    victim.subscribe("outpost/devices/victim/#").await.unwrap();
    let mut client = Operator::connect(&broker.url(), "client", topics.clone()).await.unwrap();
    client.subscribe("outpost/replies/client/#").await.unwrap();
    client.subscribe(&topics.predictions("dev-r")).await.unwrap();

    for (i, reply_to) in
        ["outpost/devices/victim/desired", "outpost/devices/victim/state", "elsewhere/x", "outpost/repliesX/y"]
            .iter()
            .enumerate()
    {
        let mut req = digits_request(1);
        req["id"] = format!("bad-{i}").into();
        req["reply_to"] = (*reply_to).into();
        client.publish(&topics.infer("dev-r"), serde_json::to_vec(&req).unwrap(), false).await.unwrap();
        let answer = loop {
            let m = client.next(Duration::from_secs(10)).await.expect("an answer on predictions");
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["id"] == format!("bad-{i}") {
                assert_eq!(m.topic, topics.predictions("dev-r"));
                break v;
            }
        };
        assert_eq!(answer["code"], "reply_refused", "{answer}");
        let e = answer["error"].as_str().unwrap();
        assert!(e.contains("answers go only to topics under outpost/replies/"), "{e}");
    }
    // Inside the namespace: answered there.
    let mut req = digits_request(1);
    req["id"] = "good".into();
    req["reply_to"] = "outpost/replies/client/7".into();
    client.publish(&topics.infer("dev-r"), serde_json::to_vec(&req).unwrap(), false).await.unwrap();
    let m = client.next(Duration::from_secs(10)).await.expect("the answer");
    assert_eq!(m.topic, "outpost/replies/client/7");
    // Nothing was published on the victim's topics.
    assert!(victim.next(Duration::from_millis(500)).await.is_none());
    assert_eq!(metric(&agent, "outpost_reply_refused_total"), 4);
    agent.wait_log("a request's reply topic is outside the reply prefixes", 4, Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_client_id_is_not_taken_over_by_an_impostor_using_the_default_one() {
    let (broker, reg, _data, mut w, _agent) = lab("dev-c", &[], &["--client-id", "dev-c-3f9a"]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    let mut watch = Operator::connect(&broker.url(), "avail-watch", Default::default()).await.unwrap();
    watch.subscribe("outpost/devices/dev-c/availability").await.unwrap();
    let _ = watch.next(Duration::from_secs(2)).await; // the retained `online`
    for _ in 0..5 {
        let impostor = Operator::connect(&broker.url(), "outpost-dev-c", Default::default()).await.unwrap();
        impostor.disconnect().await;
        serves(&mut w, "1").await;
    }
    // Never offline.
    while let Some(m) = watch.next(Duration::from_millis(500)).await {
        assert_ne!(&m.payload[..], b"offline", "the device went offline");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_urls_are_refused_by_default_and_reveal_nothing_about_the_device() {
    let (_broker, reg, data, mut w, _agent) = lab("dev-f", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    assert_eq!(w.deploy(&reg, "digits", "1").await.0.phase, Phase::Active);
    for (n, path) in ["/etc/hostname", "/etc/passwd", "/proc/self/environ", "/nonexistent"].iter().enumerate() {
        let rev = outpost_sim::operator::clock_revision() + 1 + n as u64;
        let d = deployment("probe", "1", &format!("file://{path}"), &"0".repeat(64), Some(rev), None);
        w.publish_desired(d.to_json()).await;
        let m = failed_with(&w.events_until_final(&d.deployment_id).await.0, ErrorCode::UrlRefused);
        assert!(m.starts_with("manifest.json: file:// URLs are off on this device"), "{m}");
    }
    let partial = std::fs::read_dir(data.path().join("dev-f/partial")).map_or(0, |d| d.flatten().count());
    assert_eq!(partial, 0, "partial downloads left");
    serves(&mut w, "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_may_allow_one_directory_for_file_urls() {
    let reg_dir = tempfile::tempdir().unwrap();
    let root = reg_dir.path().display().to_string();
    let (_broker, reg, _data, mut w, _agent) =
        lab("dev-l", &[], &["--set", &format!("download.file_root={root}")]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    // The registry's files, copied under the allowed directory.
    let src = reg.root().join("digits/1");
    let dst = reg_dir.path().join("digits/1");
    std::fs::create_dir_all(dst.join("sample")).unwrap();
    for f in ["manifest.json", "model.onnx", "labels.txt", "sample/input.json", "sample/expected.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f)).unwrap();
        }
    }
    let sha = outpost_sim::registry::sha256(&std::fs::read(dst.join("manifest.json")).unwrap());
    let url = format!("file://{}/manifest.json", dst.display());
    assert_eq!(w.deploy_raw("digits", "1", &url, &sha).await.0.phase, Phase::Active);
    // Outside it (here through `..`): refused like any other path.
    let d = deployment("x", "1", &format!("file://{root}/../../etc/passwd"), &"0".repeat(64), None, None);
    w.publish_desired(d.to_json()).await;
    let m = failed_with(&w.events_until_final(&d.deployment_id).await.0, ErrorCode::UrlRefused);
    assert!(m.contains("is not inside download.file_root"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_check_config_events_and_logs() {
    let (code, out, err) =
        outpost(&["check-config", "--broker", "mqtt://admin:hunter2@127.0.0.1:1883", "--device", "d"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("mqtt.broker = \"mqtt://admin:***@127.0.0.1:1883\""), "{out}");
    assert!(out.contains("# WARNING: a broker login over plain mqtt://"), "{out}");
    assert!(
        out.contains("# WARNING: trust.keys is empty: any client that can publish on the broker can deploy"),
        "{out}"
    );
    // A bad broker URL is shown masked in the error too.
    let (_, out, err) = outpost(&["check-config", "--broker", "bogus://admin:hunter2@h", "--device", "d"]);
    assert!(!format!("{out}{err}").contains("hunter2"), "{out}{err}");

    // A presigned URL's token never reaches events or the log.
    let (_broker, reg, _data, mut w, agent) = lab("dev-s", &[], &[]).await;
    reg.register("digits-mlp.onnx", "digits", "1");
    let url = format!("{}?X-Amz-Signature=TOPSECRET", reg.manifest_url("digits", "404"));
    let (ev, events) = w.deploy_raw("digits", "404", &url, &"0".repeat(64)).await;
    assert_eq!(ev.phase, Phase::Failed);
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains("TOPSECRET"), "{all}");
    assert!(all.contains("manifest.json?***"), "{all}");
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(!log.contains("TOPSECRET"), "{log}");
    // Started without trust keys: it says so.
    assert!(log.contains("trust.keys is empty: any client that can publish on the broker can deploy"), "{log}");
}
