//! The ONNX Runtime backend (agent built with the `onnxruntime` feature, as
//! the workspace build makes it) with the library from the `onnxruntime`
//! wheel: `OUTPOST_ONNXRUNTIME_LIBRARY`, or `target/ort-venv` as `.ci/run`
//! installs it. Without the library these tests say so and pass, unless
//! `OUTPOST_REQUIRE_ONNXRUNTIME=1` (CI) makes that a failure.

use super::*;
use outpost_protocol::{Backend, DeploymentEvent};
use std::path::{Path, PathBuf};

/// The library, with the test process configured to use it too (its
/// in-process `register` reads and runs models on it). `None`: skip.
fn library() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ort-venv");
    let found = std::env::var_os("OUTPOST_ONNXRUNTIME_LIBRARY")
        .map(PathBuf::from)
        .or_else(|| outpost_sim::bench::venv_onnxruntime_library(&venv));
    match found {
        Some(lib) if lib.is_file() => {
            outpost_agent::serve::backend::configure(outpost_agent::serve::backend::Runtimes {
                default: outpost_protocol::Runtime::Auto,
                onnxruntime_library: Some(lib.clone()),
            });
            Some(lib)
        }
        _ if std::env::var("OUTPOST_REQUIRE_ONNXRUNTIME").as_deref() == Ok("1") => {
            panic!(
                "OUTPOST_REQUIRE_ONNXRUNTIME=1 but no libonnxruntime: set OUTPOST_ONNXRUNTIME_LIBRARY or run .ci/run"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED: no libonnxruntime (OUTPOST_ONNXRUNTIME_LIBRARY, or .ci/run installs it in target/ort-venv)"
            );
            None
        }
    }
}

/// Registers `fixtures/onnxruntime/{stem}.onnx` as `name@version` (no labels).
fn register(reg: &Registry, stem: &str, name: &str, version: &str, runtime: Option<outpost_protocol::Runtime>) {
    outpost_sim::registry::register(&outpost_sim::registry::RegisterSpec {
        model: fixture(&format!("onnxruntime/{stem}.onnx")),
        name: name.into(),
        version: version.into(),
        registry: reg.root().to_path_buf(),
        labels: None,
        sample: None,
        shapes: vec![],
        tolerance: 1e-4,
        top_k: 3,
        scale: None,
        runtime,
    })
    .unwrap();
}

/// What onnxruntime in Python answered for the model (fixtures/make_onnxruntime_models.py).
fn reference(stem: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("onnxruntime/reference.json")).unwrap()).unwrap();
    all[stem].clone()
}

/// The reference inputs as an Open Inference Protocol request.
fn reference_request(stem: &str) -> serde_json::Value {
    let r = reference(stem);
    let inputs: Vec<serde_json::Value> = r["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
            let data = match &t["data"] {
                serde_json::Value::Array(a) => serde_json::Value::Array(a.clone()),
                _ => image_data(shape.iter().product()).into(),
            };
            serde_json::json!({"name": name, "datatype": "FP32", "shape": shape, "data": data})
        })
        .collect();
    serde_json::json!({"inputs": inputs})
}

/// The convnet's reference image: element i is (i % 97) / 97 in FP32.
fn image_data(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 97) as f32 / 97.0).collect()
}

/// Every output of `answer` equals Python's within `tolerance`.
fn assert_matches_python(stem: &str, answer: &serde_json::Value, tolerance: f64) {
    let r = reference(stem);
    for (name, want) in r["outputs"].as_object().unwrap() {
        let got = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == *name).unwrap_or_else(|| {
            panic!("{stem}: no output '{name}' in {answer}");
        });
        assert_eq!(got["shape"], want["shape"], "{stem}/{name}: {answer}");
        let (got, want) = (got["data"].as_array().unwrap(), want["data"].as_array().unwrap());
        assert_eq!(got.len(), want.len());
        let worst =
            got.iter().zip(want).map(|(g, w)| (g.as_f64().unwrap() - w.as_f64().unwrap()).abs()).fold(0.0, f64::max);
        assert!(worst <= tolerance, "{stem}/{name}: max |agent - python onnxruntime| = {worst}");
    }
}

/// The answer of `model` to the reference request of `stem` once the
/// restarted agent serves it again (30 s at most); the agent must not die.
async fn answer_after_restart(agent: &mut Agent, model: &str, stem: &str) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{}/v2/models/{model}/infer", agent.http_port);
    let body = reference_request(stem).to_string().into_bytes();
    for _ in 0..300 {
        if let Ok((200, a)) = try_http("POST", url.clone(), Some(body.clone())).await {
            return a;
        }
        assert!(agent.is_running(), "the agent died restoring {model}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{model} does not serve 30 s after the restart");
}

fn backend(ev: &DeploymentEvent) -> Backend {
    ev.backend.clone().unwrap_or_else(|| panic!("no backend in the active event: {ev:?}"))
}

/// Whether the agent process has the ONNX Runtime library mapped.
fn maps_library(agent: &Agent) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", agent.pid())).unwrap();
    maps.contains("libonnxruntime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_tract_refuses_are_served_by_onnxruntime_as_python_onnxruntime_answers() {
    let Some(lib) = library() else { return };
    let lib_flag = format!("runtime.onnxruntime_library={}", lib.display());
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("ort-1").flags(&["--set", &lib_flag]).start().await;
    let port = agent.http_port;
    let url = |name: &str| format!("http://127.0.0.1:{port}/v2/models/{name}");

    // A scikit-learn forest (TreeEnsembleRegressor): tract cannot run it.
    register(&reg, "forest-regressor", "forest", "1", None);
    let (ev, _) = w.deploy(&reg, "forest", "1").await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let b = backend(&ev);
    assert_eq!(b.runtime, "onnxruntime", "{b:?}");
    assert!(b.reason.starts_with("tract cannot serve it: model_load_failed"), "{b:?}");
    assert!(b.golden_ms.contains_key("onnxruntime"), "{b:?}");
    let (status, answer) =
        http("POST", url("forest") + "/infer", Some(reference_request("forest-regressor").to_string().into_bytes()))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert_matches_python("forest-regressor", &answer, 1e-5);
    let (_, meta) = http("GET", url("forest"), None).await;
    assert_eq!(meta["platform"], "onnxruntime_onnx", "{meta}");
    assert!(maps_library(&agent), "the agent serves on onnxruntime without the library mapped?");

    // An `If` whose branches differ in shape, swapped in over the forest; the
    // same over MQTT.
    register(&reg, "if-shapes", "gate", "1", None);
    let (ev, _) = w.deploy(&reg, "gate", "1").await;
    assert_eq!((ev.phase, backend(&ev).runtime.as_str()), (Phase::Active, "onnxruntime"), "{ev:?}");
    let answer = w.infer("gate-1", reference_request("if-shapes")).await;
    assert_matches_python("if-shapes", &answer, 1e-6);
    // A bad request is the client's error on onnxruntime too, and costs nothing.
    let (status, e) = http(
        "POST",
        url("gate") + "/infer",
        Some(br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,63],"data":[0]}]}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("expected shape [N, 64]"), "{e}");

    // After a restart the record says onnxruntime: it serves again without revalidating.
    let state = w.state(&_broker, |s| s.active.as_ref().is_some_and(|a| a.name == "gate")).await;
    assert_eq!(state.active.unwrap().runtime.as_deref(), Some("onnxruntime"));
    agent.kill_and_restart();
    w.online().await;
    let answer = answer_after_restart(&mut agent, "gate", "if-shapes").await;
    assert_matches_python("if-shapes", &answer, 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_the_faster_engine_and_says_why() {
    let Some(lib) = library() else { return };
    let lib_flag = format!("runtime.onnxruntime_library={}", lib.display());
    let (_broker, reg, _data, mut w, agent) = Lab::device("ort-2").flags(&["--set", &lib_flag]).start().await;

    // A convnet both engines run: the golden sample times them, the faster serves.
    register(&reg, "convnet", "convnet", "1", None);
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let b = backend(&ev);
    let (tract, ort) = (b.golden_ms["tract"], b.golden_ms["onnxruntime"]);
    assert!(ort * 1.2 < tract, "the fixture should favour onnxruntime: {b:?}");
    assert_eq!(b.runtime, "onnxruntime", "{b:?}");
    assert!(b.reason.starts_with("faster: "), "{b:?}");
    assert!(ev.detail.as_deref().unwrap_or("").contains("onnxruntime serves (faster"), "{ev:?}");

    // Binary tensors (the OIP extension) through onnxruntime, as Python's onnxruntime answers.
    let image: Vec<u8> = image_data(3 * 96 * 96).iter().flat_map(|x| x.to_le_bytes()).collect();
    let json = serde_json::json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 96, 96],
        "parameters": {"binary_data_size": image.len()}}]});
    let url = format!("http://127.0.0.1:{}/v2/models/convnet/infer", agent.http_port);
    let (status, header, body) = http_binary(url, json, image).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = match header {
        // Outputs came back in JSON (the request asked for no binary outputs).
        None => serde_json::from_slice(&body).unwrap(),
        Some(n) => serde_json::from_slice(&body[..n]).unwrap(),
    };
    assert_matches_python("convnet", &answer, 1e-4);

    // The same model with model.runtime = tract in its manifest: tract serves, and says why.
    register(&reg, "convnet", "convnet", "2", Some(outpost_protocol::Runtime::Tract));
    let (ev, _) = w.deploy(&reg, "convnet", "2").await;
    let b = backend(&ev);
    assert_eq!((ev.phase, b.runtime.as_str(), b.reason.as_str()), (Phase::Active, "tract", "model.runtime = tract"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_library_degrades_to_tract_with_a_clear_event() {
    let Some(lib) = library() else { return };
    let missing = lib.with_file_name("libonnxruntime.so.0.0.0-missing");
    let lib_flag = format!("runtime.onnxruntime_library={}", missing.display());
    let (_broker, reg, _data, mut w, agent) =
        Lab::device("ort-3").flags(&["--set", &lib_flag]).model("digits-mlp.onnx", "digits", "1").start().await;
    agent.wait_log("no such file; models run on tract (onnxruntime unavailable)", 1, Duration::from_secs(5));

    // model.runtime = onnxruntime, but no library: tract serves, and the event says why.
    register(&reg, "convnet", "convnet", "1", Some(outpost_protocol::Runtime::Onnxruntime));
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let b = backend(&ev);
    assert_eq!(b.runtime, "tract", "{b:?}");
    assert!(b.reason.starts_with("onnxruntime unavailable ("), "{b:?}");
    assert!(b.reason.contains("libonnxruntime.so.0.0.0-missing does not exist"), "{b:?}");
    assert!(b.reason.ends_with("): tract serves"), "{b:?}");

    // A model only onnxruntime runs: refused, naming both reasons; the convnet serves on.
    register(&reg, "forest-regressor", "forest", "1", None);
    let (ev, _) = w.deploy(&reg, "forest", "1").await;
    let e = ev.error.clone().unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!((ev.phase, e.code), (Phase::Failed, ErrorCode::ModelLoadFailed), "{ev:?}");
    assert!(e.message.contains("(onnxruntime unavailable: "), "{}", e.message);
    let answer = w.infer("still", reference_request("convnet")).await;
    assert_eq!(answer["model_name"], "convnet", "{answer}");
    assert!(!maps_library(&agent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_that_crashes_is_contained_in_the_validation_child() {
    if library().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let crash = crash_library(dir.path());
    let lib_flag = format!("runtime.onnxruntime_library={}", crash.display());
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("ort-4").flags(&["--set", &lib_flag]).start().await;

    // auto: tract passed first; onnxruntime crashed the child; tract serves.
    register(&reg, "convnet", "convnet", "1", None);
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let b = backend(&ev);
    assert_eq!(b.runtime, "tract", "{b:?}");
    assert!(
        b.reason
            .starts_with("onnxruntime failed: model_crashed (the runtime crashed while loading the model (signal 11"),
        "{b:?}"
    );

    // Only onnxruntime could run it: refused as a crash; the convnet serves on, the agent never loaded the library.
    register(&reg, "forest-regressor", "forest", "1", None);
    let (ev, _) = w.deploy(&reg, "forest", "1").await;
    let e = ev.error.clone().unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!((ev.phase, e.code), (Phase::Failed, ErrorCode::ModelCrashed), "{ev:?}");
    assert!(agent.is_running());
    assert!(!maps_library(&agent));
    let answer = w.infer("still", reference_request("convnet")).await;
    assert_eq!(answer["model_name"], "convnet", "{answer}");
}

/// The library `OUTPOST_ONNXRUNTIME_LIBRARY` names on this device (the aarch64
/// smoke runs it with the aarch64 wheel's library under qemu-user, where it
/// crashes while loading): the convnet serves either on onnxruntime or, the
/// crash contained in the validation child, on tract; both answer as Python's
/// onnxruntime does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_devices_library_serves_or_its_crash_is_contained() {
    let Some(lib) = library() else { return };
    let lib_flag = format!("runtime.onnxruntime_library={}", lib.display());
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("ort-5").flags(&["--set", &lib_flag]).start().await;
    register(&reg, "convnet", "convnet", "1", None);
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!(ev.phase, Phase::Active, "{ev:?}");
    let b = backend(&ev);
    eprintln!("convnet with {}: {} ({})", lib.display(), b.runtime, b.reason);
    match b.runtime.as_str() {
        "onnxruntime" => assert!(b.reason.starts_with("faster: "), "{b:?}"),
        _ => assert!(b.reason.starts_with("onnxruntime failed: model_crashed ("), "{b:?}"),
    }
    let answer = w.infer("convnet-1", reference_request("convnet")).await;
    assert_matches_python("convnet", &answer, 1e-4);
    assert!(agent.is_running());
}

/// A "libonnxruntime" built with `cc` in `dir` whose initialiser
/// dereferences NULL, like the aarch64 wheel's under qemu-user: it kills
/// whoever loads it.
fn crash_library(dir: &Path) -> PathBuf {
    let src = dir.join("crash.c");
    std::fs::write(&src, "__attribute__((constructor)) static void boom(void) { *(volatile int *)0 = 1; }\n").unwrap();
    let crash = dir.join("libonnxruntime.so.1.99.0");
    let cc = std::process::Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&crash).arg(&src).status().unwrap();
    assert!(cc.success());
    crash
}

/// Found by review: after a restart the agent itself opened the library the
/// record named (no child first); replaced by one that crashes, the agent
/// crash-looped and the crash-loop breaker quarantined a model tract serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_library_that_now_crashes_costs_a_child_and_tract_serves() {
    let Some(lib) = library() else { return };
    let dir = tempfile::tempdir().unwrap();
    let crash = crash_library(dir.path());
    // The configured path is a link: the device's library changes under it.
    let link = dir.path().join("libonnxruntime.so");
    std::os::unix::fs::symlink(&lib, &link).unwrap();
    let lib_flag = format!("runtime.onnxruntime_library={}", link.display());
    let (broker, reg, _data, mut w, mut agent) = Lab::device("ort-6").flags(&["--set", &lib_flag]).start().await;
    register(&reg, "convnet", "convnet", "1", None);
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!((ev.phase, backend(&ev).runtime.as_str()), (Phase::Active, "onnxruntime"), "{ev:?}");

    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&crash, &link).unwrap();
    agent.kill_and_restart();
    let answer = answer_after_restart(&mut agent, "convnet", "convnet").await;
    assert_matches_python("convnet", &answer, 1e-4);
    assert!(agent.is_running());
    assert!(!maps_library(&agent), "the agent opened the library itself");
    w.online().await;
    let state = w.state(&broker, |s| s.active.as_ref().is_some_and(|a| a.runtime.as_deref() == Some("tract"))).await;
    assert_eq!(state.active.unwrap().name, "convnet");
}

/// Found by review: a manifest that allows any batch for a model that fixes
/// it made every other batch an onnxruntime failure, counted against the
/// model (a client could roll back a deployment on probation): now the
/// model's size narrows the manifest's -1 and such requests are bad_input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_the_model_fixes_is_the_clients_to_respect_on_onnxruntime() {
    let Some(lib) = library() else { return };
    let lib_flag = format!("runtime.onnxruntime_library={}", lib.display());
    let (_broker, reg, _data, mut w, agent) = Lab::device("ort-7").flags(&["--set", &lib_flag]).start().await;
    register(&reg, "convnet", "convnet", "1", Some(outpost_protocol::Runtime::Onnxruntime));
    let manifest = reg.root().join("convnet/1/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["model"]["inputs"][0]["shape"][0] = (-1).into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    reg.rehash("convnet", "1");
    let (ev, _) = w.deploy(&reg, "convnet", "1").await;
    assert_eq!((ev.phase, backend(&ev).runtime.as_str()), (Phase::Active, "onnxruntime"), "{ev:?}");
    let two = serde_json::json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 3, 96, 96],
        "data": image_data(2 * 3 * 96 * 96)}]});
    let url = format!("http://127.0.0.1:{}/v2/models/convnet/infer", agent.http_port);
    let (status, e) = http("POST", url.clone(), Some(two.to_string().into_bytes())).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("expected shape [1, 3, 96, 96]"), "{e}");
    let (_, meta) = http("GET", url.trim_end_matches("/infer").to_string(), None).await;
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([1, 3, 96, 96]), "{meta}");
}

/// Found by review: after a restart the shadow candidate of the serving
/// deployment was chosen an engine again inside the agent, which opened a
/// crashing library itself: exit 139 on every start, then quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_shadow_candidate_is_settled_in_a_child_too() {
    if library().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let crash = crash_library(dir.path());
    let lib_flag = format!("runtime.onnxruntime_library={}", crash.display());
    let (_broker, reg, _data, mut w, mut agent) = Lab::device("ort-8").flags(&["--set", &lib_flag]).start().await;
    register(&reg, "convnet", "convnet", "1", None);
    register(&reg, "convnet", "convnet", "2", None);
    let resolve = |v: &'static str| outpost_sim::operator::resolve_manifest(&reg.url, "convnet", v);
    let ((url, sha), (url2, sha2)) = (resolve("1").await.unwrap(), resolve("2").await.unwrap());
    let mut d = outpost_sim::operator::deployment("convnet", "1", &url, &sha, None, Some("shadowed".into()));
    let candidate = outpost_sim::operator::deployment("convnet", "2", &url2, &sha2, None, None);
    d.shadow = Some(outpost_protocol::Shadow { model: candidate.model.clone(), sample_rate: 1.0 });
    w.publish_desired(d.to_json()).await;
    let (last, events) = w.events_until_final("shadowed").await;
    assert_eq!((last.phase, backend(&last).runtime.as_str()), (Phase::Active, "tract"), "{events:?}");

    agent.kill_and_restart();
    w.online().await;
    let answer = w.infer("after", reference_request("convnet")).await;
    assert_eq!(answer["model_version"], "1", "{answer}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.is_running(), "the agent died restoring its shadow candidate");
    assert!(!maps_library(&agent));
}
