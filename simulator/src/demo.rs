//! `outpost-sim demo`: the whole workflow on one machine with nothing to
//! install. Embedded broker, registry over HTTP, a real agent (the same
//! library the `outpost` binary runs), real handwritten digits.

use crate::operator::{Operator, deployment, resolve_manifest, succeeded, wait_for_outcome};
use crate::registry::{RegisterSpec, register};
use outpost_agent::deploy::fetch::FetchConfig;
use outpost_agent::link::{BrokerUrl, SessionConfig};
use outpost_protocol::infer::{InferReply, OutData};
use outpost_protocol::{ErrorCode, Phase, Topics};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const MLP: &[u8] = include_bytes!("../../fixtures/digits-mlp.onnx");
const CNN: &[u8] = include_bytes!("../../fixtures/digits-cnn.onnx");
const FRAGILE: &[u8] = include_bytes!("../../fixtures/digits-fragile.onnx");
const LABELS: &[u8] = include_bytes!("../../fixtures/labels.txt");
const HELDOUT: &str = include_str!("../../fixtures/digits-heldout.json");
const MLP_EXPECTED: &str = include_str!("../../fixtures/digits-mlp-expected.json");
const CNN_EXPECTED: &str = include_str!("../../fixtures/digits-cnn-expected.json");

const DEVICE: &str = "demo-device";

#[derive(serde::Deserialize)]
struct Heldout {
    labels: Vec<usize>,
    images: Vec<Vec<i64>>,
}

#[derive(serde::Deserialize)]
struct Expected {
    probabilities: Vec<Vec<f64>>,
}

struct Step {
    what: String,
    ok: bool,
    took: Duration,
}

/// Results of classifying the held-out set through the device.
struct Scored {
    correct: usize,
    total: usize,
    max_diff: f64,
    versions: BTreeMap<String, usize>,
    per_second: f64,
}

pub async fn run() -> Result<(), String> {
    let t0 = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let registry = work.path().join("registry");
    let heldout: Heldout = serde_json::from_str(HELDOUT).map_err(|e| e.to_string())?;

    println!("Outpost demo: deploy a digit classifier to an edge device over MQTT, then swap it live.\n");
    // 1. broker and registry
    let t = Instant::now();
    let broker_addr = crate::broker::start([127, 0, 0, 1].into(), 0)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let http = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(crate::registry::serve_http(registry.clone(), listener));
    let registry_url = format!("http://{http}");
    println!("[1] embedded MQTT broker on mqtt://{broker_addr}, model registry on {registry_url}");
    steps.push(Step { what: "start broker and registry".into(), ok: true, took: t.elapsed() });

    // 2. register two versions
    let t = Instant::now();
    std::fs::create_dir_all(work.path().join("in")).map_err(|e| e.to_string())?;
    let mut registered = Vec::new();
    for (version, bytes, what) in [
        ("1", MLP, "MLP (MatMul/Relu/Softmax)"),
        ("2", CNN, "CNN (Conv/MaxPool/Gemm)"),
        ("3", FRAGILE, "MLP that turns non-finite on some inputs in service"),
    ] {
        let model = work.path().join(format!("in/digits-{version}.onnx"));
        let labels = work.path().join("in/labels.txt");
        std::fs::write(&model, bytes).map_err(|e| e.to_string())?;
        std::fs::write(&labels, LABELS).map_err(|e| e.to_string())?;
        let r = register(&RegisterSpec {
            model,
            name: "digits".into(),
            version: version.into(),
            registry: registry.clone(),
            labels: Some(labels),
            sample: None,
            shapes: vec![],
            tolerance: 1e-4,
            top_k: 3,
            scale: None,
            runtime: None,
        })?;
        println!(
            "[2] registered digits@{version}, a {what}: {} (sha256 {}..)",
            r.manifest_path,
            &r.manifest_sha256[..12]
        );
        registered.push(r);
    }
    steps.push(Step { what: "register digits@1, @2 and @3".into(), ok: true, took: t.elapsed() });

    // 3. start the agent
    let t = Instant::now();
    let broker = BrokerUrl { host: "127.0.0.1".into(), port: broker_addr.port(), tls: false };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_port = crate::broker::free_port().map_err(|e| e.to_string())?;
    let config = outpost_agent::Config {
        device: DEVICE.into(),
        groups: vec!["demo".into()],
        data_dir: work.path().join("device"),
        topics: Topics::default(),
        session: SessionConfig {
            broker: broker.clone(),
            client_id: format!("outpost-{DEVICE}"),
            keep_alive: Duration::from_secs(15),
            max_packet_size: 4 << 20,
            tls: None,
            credentials: None,
            persistent_session: false,
            protocol: Default::default(),
            read_oversize: false,
        },
        fetch: FetchConfig::default(),
        http_bind: Some(std::net::SocketAddr::from(([127, 0, 0, 1], http_port))),
        metrics_bind: None,
        isolation: outpost_agent::deploy::isolate::Isolation::InProcess,
        http_limits: Default::default(),
        trust: Default::default(),
        reply_prefixes: vec!["outpost/replies/".into()],
        mqtt_max_inflight_bytes: 64 << 20,
        journal_max_bytes: 16 << 20,
        live: outpost_agent::config::Live { max_queue: 512, ..Default::default() },
    };
    let (_reload, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = tokio::spawn(outpost_agent::run(
        config,
        async {
            let _ = stop_rx.await;
        },
        reload_rx,
    ));
    let mut op = Operator::connect(&broker, "outpost-sim-demo", Topics::default()).await?;
    op.subscribe(&op.topics.events(DEVICE)).await?;
    let mut client = Operator::connect(&broker, "outpost-sim-demo-client", Topics::default()).await?;
    client.subscribe("outpost/replies/outpost-sim-demo").await?;
    wait_availability(&mut op).await?;
    println!("[3] agent '{DEVICE}' is online (data dir {})", work.path().join("device").display());
    steps.push(Step { what: "start the agent".into(), ok: true, took: t.elapsed() });

    // 4. deploy v1
    let t = Instant::now();
    let ok = deploy(&mut op, &registry_url, "1").await?;
    steps.push(Step { what: "deploy digits@1".into(), ok, took: t.elapsed() });

    // 5. classify held-out digits with v1
    let t = Instant::now();
    println!("\n[5] classifying {} held-out handwritten digits over MQTT, one request each:", heldout.labels.len());
    let expected_v1: Expected = serde_json::from_str(MLP_EXPECTED).map_err(|e| e.to_string())?;
    let s1 = classify(&mut client, &heldout, Some(&expected_v1), 0).await?;
    report("digits@1", &s1);
    let ok1 = s1.total == heldout.labels.len() && s1.correct as f64 >= 0.9 * s1.total as f64 && s1.max_diff < 1e-4;
    steps.push(Step { what: format!("classify {} held-out digits with v1", s1.total), ok: ok1, took: t.elapsed() });

    // 5b. the same model over the local Open Inference Protocol endpoint
    let t = Instant::now();
    let url = format!("http://127.0.0.1:{http_port}/v2/models/digits/infer");
    let body = serde_json::json!({"id": "http-1", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": heldout.images[0]}]});
    let answer = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        let resp = ureq::post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("{url}: {e}"))?;
        let bytes = resp.into_body().read_to_vec().map_err(|e| format!("{url}: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{url}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())??;
    let top = answer["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|t| t["name"] == "probabilities_top_k"))
        .map(|t| t["data"][0].clone());
    println!(
        "    the same over HTTP: POST http://127.0.0.1:{http_port}/v2/models/digits/infer -> version {}, predicted {}",
        answer["model_version"],
        top.clone().unwrap_or_default()
    );
    let ok_http =
        answer["model_version"] == "1" && top.is_some_and(|t| t == serde_json::json!(heldout.labels[0].to_string()));
    steps.push(Step { what: "the same over HTTP (Open Inference Protocol v2)".into(), ok: ok_http, took: t.elapsed() });

    // 6. hot swap to v2 under load
    let t = Instant::now();
    println!("\n[6] deploying digits@2 while requests keep flowing:");
    let (url, sha) = resolve_manifest(&registry_url, "digits", "2").await?;
    let d = deployment("digits", "2", &url, &sha, None, None);
    op.publish(&op.topics.device_desired(DEVICE), d.to_json(), true).await?;
    let mut during = Scored { correct: 0, total: 0, max_diff: 0.0, versions: BTreeMap::new(), per_second: 0.0 };
    let mut swapped = false;
    let mut round = 1;
    while !swapped && t.elapsed() < Duration::from_secs(60) {
        let s = classify(&mut client, &heldout_slice(&heldout, 50), None, round).await?;
        round += 1;
        during.total += s.total;
        during.correct += s.correct;
        for (v, n) in s.versions {
            *during.versions.entry(v).or_default() += n;
        }
        swapped = during.versions.contains_key("2");
    }
    let finals = wait_for_outcome(&mut op, &d.deployment_id, 1, Duration::from_secs(60), false).await?;
    let swap_ok = finals.first().is_some_and(succeeded) && during.total > 0;
    println!(
        "    {} requests answered during the swap: 0 failed, 0 lost; answered by version: {:?}",
        during.total, during.versions
    );
    let expected_v2: Expected = serde_json::from_str(CNN_EXPECTED).map_err(|e| e.to_string())?;
    println!("    classifying the held-out digits again:");
    let s2 = classify(&mut client, &heldout, Some(&expected_v2), 1000).await?;
    report("digits@2", &s2);
    let ok2 =
        swap_ok && s2.total == heldout.labels.len() && s2.correct as f64 >= 0.9 * s2.total as f64 && s2.max_diff < 1e-4;
    steps.push(Step { what: "hot swap to digits@2 under load".into(), ok: ok2, took: t.elapsed() });

    // 7. a tampered deployment is refused and v2 keeps serving
    let t = Instant::now();
    let mut bad = deployment("digits", "1", &registered[0].manifest_path, &"0".repeat(64), None, None);
    bad.model.manifest_url = format!("{registry_url}/digits/1/manifest.json");
    // Going back to 1 is allowed here: the point is the digest.
    bad.policy.allow_downgrade = Some(true);
    println!("\n[7] deploying digits@1 with a wrong manifest_sha256 (a tampered or mistyped bundle):");
    op.publish(&op.topics.device_desired(DEVICE), bad.to_json(), true).await?;
    let finals = wait_for_outcome(&mut op, &bad.deployment_id, 1, Duration::from_secs(30), true).await?;
    let refused = finals.first().is_some_and(|e| {
        e.phase == Phase::Failed && e.error.as_ref().is_some_and(|e| e.code == ErrorCode::DigestMismatch)
    });
    let still = classify(&mut client, &heldout_slice(&heldout, 20), None, 2000).await?;
    println!("    still serving: {:?} answered {} of 20 requests", still.versions, still.total);
    steps.push(Step {
        what: "refuse a tampered deployment, keep serving".into(),
        ok: refused && still.versions.contains_key("2") && still.total == 20,
        took: t.elapsed(),
    });

    // 8. a version that misbehaves in service is rolled back by itself
    let t = Instant::now();
    println!("\n[8] deploying digits@3, which passes its golden sample but turns non-finite on some inputs:");
    let (url, sha) = resolve_manifest(&registry_url, "digits", "3").await?;
    let d = deployment("digits", "3", &url, &sha, None, None);
    op.publish(&op.topics.device_desired(DEVICE), d.to_json(), true).await?;
    let finals = wait_for_outcome(&mut op, &d.deployment_id, 1, Duration::from_secs(30), true).await?;
    let live = finals.first().is_some_and(succeeded);
    let before = classify(&mut client, &heldout_slice(&heldout, 20), None, 3000).await?;
    // Three bad inputs: one alone (one client) cannot roll a version back
    // (policy.probation.max_non_finite, 3 by default).
    let mut poisoned = heldout_slice(&heldout, 20);
    for i in [5, 7, 9] {
        poisoned.images[i][0] = 16;
    }
    let during = classify(&mut client, &poisoned, None, 3001).await?;
    let rolled = wait_for_phase(&mut op, &d.deployment_id, Phase::RolledBack, Duration::from_secs(10)).await;
    if let Some(ev) = &rolled {
        crate::operator::print_event(ev);
    }
    let after = classify(&mut client, &heldout_slice(&heldout, 20), None, 3002).await?;
    println!(
        "    answers before {:?}, with three bad inputs among them {:?}, after {:?}: 0 failed requests",
        before.versions, during.versions, after.versions
    );
    steps.push(Step {
        what: "roll back a version that misbehaves in service".into(),
        ok: live
            && rolled.is_some()
            && before.versions.contains_key("3")
            && during.total == 20
            && after.versions.keys().eq(["2"].iter()),
        took: t.elapsed(),
    });

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    op.disconnect().await;
    client.disconnect().await;

    println!("\nSummary");
    for s in &steps {
        println!("  {} {:<48} {:>8.2} s", if s.ok { "ok  " } else { "FAIL" }, s.what, s.took.as_secs_f64());
    }
    println!("  total {:.1} s", t0.elapsed().as_secs_f64());
    if steps.iter().all(|s| s.ok) { Ok(()) } else { Err("some demo steps failed (see above)".into()) }
}

/// Waits for an event of `deployment_id` in `phase`.
async fn wait_for_phase(
    op: &mut Operator,
    deployment_id: &str,
    phase: Phase,
    timeout: Duration,
) -> Option<outpost_protocol::DeploymentEvent> {
    let deadline = Instant::now() + timeout;
    while let Some(m) = op.next(deadline.saturating_duration_since(Instant::now())).await {
        if let Ok(ev) = outpost_protocol::DeploymentEvent::from_json(&m.payload)
            && ev.deployment_id == deployment_id
            && ev.phase == phase
        {
            return Some(ev);
        }
    }
    None
}

fn heldout_slice(h: &Heldout, n: usize) -> Heldout {
    Heldout { labels: h.labels.iter().take(n).copied().collect(), images: h.images.iter().take(n).cloned().collect() }
}

async fn wait_availability(op: &mut Operator) -> Result<(), String> {
    op.subscribe(&op.topics.availability(DEVICE)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(m) = op.next(Duration::from_millis(500)).await
            && m.topic.ends_with("/availability")
            && &m.payload[..] == b"online"
        {
            return Ok(());
        }
    }
    Err("the agent did not come online within 20 s".into())
}

async fn deploy(op: &mut Operator, registry_url: &str, version: &str) -> Result<bool, String> {
    let (url, sha) = resolve_manifest(registry_url, "digits", version).await?;
    let d = deployment("digits", version, &url, &sha, None, None);
    println!("\n[4] deploying digits@{version} (publishing the retained desired state):");
    op.publish(&op.topics.device_desired(DEVICE), d.to_json(), true).await?;
    let finals = wait_for_outcome(op, &d.deployment_id, 1, Duration::from_secs(60), true).await?;
    Ok(finals.first().is_some_and(succeeded))
}

/// Sends every image as its own request (pipelined) and scores the answers.
async fn classify(op: &mut Operator, h: &Heldout, expected: Option<&Expected>, round: usize) -> Result<Scored, String> {
    let t = Instant::now();
    let topic = op.topics.infer(DEVICE);
    for (i, img) in h.images.iter().enumerate() {
        let req = serde_json::json!({"id": format!("{round}-{i}"), "reply_to": "outpost/replies/outpost-sim-demo",
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": img}]});
        op.publish(&topic, serde_json::to_vec(&req).map_err(|e| e.to_string())?, false).await?;
    }
    let mut s = Scored { correct: 0, total: 0, max_diff: 0.0, versions: BTreeMap::new(), per_second: 0.0 };
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.total < h.images.len() && Instant::now() < deadline {
        let Some(m) = op.next(Duration::from_secs(5)).await else {
            continue;
        };
        if m.topic != "outpost/replies/outpost-sim-demo" {
            continue;
        }
        let reply: InferReply = serde_json::from_slice(&m.payload).map_err(|e| format!("unreadable answer: {e}"))?;
        let InferReply::Ok(resp) = reply else {
            return Err(format!("the device answered an error: {}", String::from_utf8_lossy(&m.payload)));
        };
        let Some(i) = resp
            .id
            .as_deref()
            .and_then(|id| id.strip_prefix(&format!("{round}-")))
            .and_then(|x| x.parse::<usize>().ok())
        else {
            continue;
        };
        s.total += 1;
        *s.versions.entry(resp.model_version.clone()).or_default() += 1;
        let probs = resp.outputs.iter().find(|o| o.name == "probabilities");
        if let Some(OutData::Numbers(data)) = probs.map(|o| &o.data) {
            let p = data.to_f64_vec();
            let best = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0);
            if best == Some(h.labels[i]) {
                s.correct += 1;
            }
            if let Some(e) = expected.and_then(|e| e.probabilities.get(i)) {
                for (a, b) in p.iter().zip(e) {
                    s.max_diff = s.max_diff.max((a - b).abs());
                }
            }
        }
        if i < 8 && expected.is_some() {
            let top = resp.outputs.iter().find(|o| o.name == "probabilities_top_k");
            if let Some(OutData::Strings(labels)) = top.map(|o| &o.data) {
                println!(
                    "    digit #{i:<3} true label {}  predicted {}  (top 3: {})",
                    h.labels[i],
                    labels[0],
                    labels.join(", ")
                );
            }
        }
    }
    s.per_second = s.total as f64 / t.elapsed().as_secs_f64();
    Ok(s)
}

fn report(what: &str, s: &Scored) {
    println!(
        "    {what}: {}/{} correct = accuracy {:.4}; max |tract - onnxruntime| = {:.2e}; {:.0} requests/s over MQTT",
        s.correct,
        s.total,
        s.correct as f64 / s.total.max(1) as f64,
        s.max_diff,
        s.per_second
    );
}
