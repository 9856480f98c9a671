//! The operator CLI as a script runs it: `outpost-sim deploy --wait` exits
//! with the code README.md ("Exit codes") and `deploy --help` document.

use super::*;

/// `outpost-sim deploy ARGS --wait` against `broker` and `reg`, off the async runtime.
async fn deploy_wait(broker: &Mosquitto, reg: &Registry, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> =
        ["deploy", "--broker", &format!("mqtt://127.0.0.1:{}", broker.port)].iter().map(|s| s.to_string()).collect();
    all.extend(["--registry-url".to_string(), reg.url.clone(), "--wait".to_string()]);
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || sim(&all.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_exits_0_only_when_the_device_serves_the_deployment() {
    let (broker, reg, _data, mut w, _agent) = Lab::device("cli1")
        .groups(&["lobby"])
        .model("digits-mlp.onnx", "digits", "1")
        .model("digits-cnn.onnx", "digits", "2")
        .start()
        .await;

    // Active: 0. Not a terminal, so plain lines: the download's end with its
    // percent, each phase, and no carriage return.
    let first = ["--device", "cli1", "--model", "digits@1", "--revision", "10", "--deployment-id", "cli-1"];
    let (code, out, err) = deploy_wait(&broker, &reg, &first).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  cli1         downloading  100% of "), "{out}");
    assert!(out.contains("  cli1         active"), "{out}");
    assert!(!out.contains('\r') && !err.contains('\r'), "{out:?}{err:?}");

    // The same deployment again: `unchanged`, and the device serves exactly it: 0.
    let (code, out, err) = deploy_wait(&broker, &reg, &first).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  cli1         unchanged    (already applied)"), "{out}");

    // An explicit revision below the one the topic holds: refused before
    // publishing (64), so the retained desired state stays what it was (it
    // was replaced by one every device refuses as stale_revision).
    let stale = ["--device", "cli1", "--model", "digits@2", "--revision", "9"];
    let (code, out, err) = deploy_wait(&broker, &reg, &stale).await;
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("--revision 9 is not above revision 10, which outpost/devices/cli1/desired holds"), "{err}");
    let (code, out, err) = deploy_wait(&broker, &reg, &first).await;
    assert_eq!(code, 0, "the retained state is still cli-1: {out}{err}");

    // To its group: shadowed by the device's own desired state, so `unchanged`
    // without being applied: 3, saying why and what serves.
    let (code, out, err) = deploy_wait(&broker, &reg, &["--group", "lobby", "--model", "digits@2"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("cli1 did not apply deployment digits-2-"), "{err}");
    assert!(err.contains("unchanged (shadowed by a desired state of higher precedence"), "{err}");
    assert!(err.contains("it serves digits@1 (cli-1)"), "{err}");
    assert_eq!(w.infer("still-1", digits_request(1)).await["model_version"], "1");

    // A bundle the device cannot load: `failed`, 1, with the error code.
    reg.register("digits-mlp.onnx", "digits", "3");
    std::fs::write(reg.root().join("digits/3/model.onnx"), b"this is not an onnx model").unwrap();
    reg.rehash("digits", "3");
    let (code, out, err) = deploy_wait(&broker, &reg, &["--device", "cli1", "--model", "digits@3"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("cli1 failed deployment digits-3-"), "{err}");
    assert!(err.contains("failed model_load_failed: model.onnx: cannot parse ONNX"), "{err}");
    assert_eq!(w.infer("still-1-again", digits_request(1)).await["model_version"], "1");

    // No device answers within --timeout: 69.
    let (code, out, err) =
        deploy_wait(&broker, &reg, &["--device", "cli-nobody", "--model", "digits@1", "--timeout", "2"]).await;
    assert_eq!(code, 69, "{out}{err}");
    assert!(err.contains("0 of 1 device(s) finished deployment digits-1-"), "{err}");
    // Leave no retained desired state for a device that does not exist.
    w.op.publish(&w.topics.device_desired("cli-nobody"), Vec::new(), true).await.unwrap();
}

/// Every flag of both binaries has help, and `deploy --help` documents the codes above.
#[test]
fn help_documents_the_flags_and_the_exit_codes() {
    let (code, out, err) = sim(&["deploy", "--help"]);
    assert_eq!(code, 0, "{err}");
    for line in
        ["  0   published", "  1   a device failed", "  3   a device did not apply", "  64  usage", "  69  unavailable"]
    {
        assert!(out.contains(line), "deploy --help lacks {line:?}:\n{out}");
    }
    let (code, out, _) = sim(&["infer", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("File holding the request body"), "{out}");
    let (code, out, _) = outpost(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("tcp:// is the same"), "{out}");
    // A usage error is 64, not clap's usual 2.
    let (code, _, err) = sim(&["deploy", "--broker", "mqtt://127.0.0.1:1", "--model", "digits"]);
    assert_eq!(code, 64, "{err}");
    // Waiting for no device is one too (it exited 0 at once).
    let args = ["deploy", "--broker", "mqtt://127.0.0.1:1", "--group", "g", "--model", "digits@1"];
    let (code, _, err) =
        sim(&[&args[..], &["--registry-url", "http://127.0.0.1:1", "--wait", "--expect", "0"]].concat());
    assert_eq!((code, err.trim()), (64, "outpost-sim: --expect 0: expected at least one device to wait for"));
}

/// `deploy --wait` ends as soon as the answer is known and never hangs: an
/// unsigned deployment to a device that requires signatures is refused at
/// once (1, with the refusal; it waited out --timeout and said 69 "is the
/// device online?"), and a registry that accepts connections but never
/// answers is given up on within --timeout (69; it hung for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_ends_on_a_refusal_and_never_hangs_on_a_silent_registry() {
    let keys = tempfile::tempdir().unwrap();
    let root = keys.path().join("root");
    let (code, _, err) = sim(&["keygen", root.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let root_pub = format!("{}.pub.pem", root.display());
    let (broker, reg, _data, _w, _agent) =
        Lab::device("cli2").model("digits-mlp.onnx", "digits", "1").flags(&["--trust-key", &root_pub]).start().await;

    let started = std::time::Instant::now();
    let (code, out, err) =
        deploy_wait(&broker, &reg, &["--device", "cli2", "--model", "digits@1", "--timeout", "60"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("cli2 failed deployment digits-1-"), "{err}");
    assert!(err.contains("signature_required"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "it waited for the timeout: {:?}", started.elapsed());

    // A registry that takes the connection and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let b = format!("mqtt://127.0.0.1:{}", broker.port);
    let args = ["deploy", "--broker", &b, "--device", "cli2", "--model", "digits@1", "--registry-url", &url];
    let args: Vec<String> =
        args.iter().map(|s| s.to_string()).chain(["--wait", "--timeout", "3"].map(String::from)).collect();
    let started = std::time::Instant::now();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || sim(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    assert_eq!(code, 69, "{out}{err}");
    assert!(err.contains("no answer within 3 s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    drop(silent);
}
