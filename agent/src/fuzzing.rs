//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz): one function per
//! input an outsider can reach, each running the agent's own code on
//! arbitrary bytes. The same functions replay the committed corpora in a
//! plain test (`agent/tests/fuzz_corpora.rs`), so CI catches a regression
//! without a nightly toolchain. A finding is a panic, an abort, a hang or
//! memory out of bounds; an `Err` is the expected answer to bad input.

use crate::deploy::fetch::file_url;
use outpost_protocol::trust::{PublicKey, Target, Trust};
use outpost_protocol::{Deployment, InferRequest, Manifest};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The root of `protocol/golden/deployment-signed.json`, so the seed
/// corpus holds envelopes that verify and the mutations explore past the
/// signature check as well as into it.
const GOLDEN_ROOT: &str = include_str!("../../protocol/golden/signing-root.pub.pem");

/// A desired-state payload, as it arrives on a device or a group topic: with
/// trust keys (signature, certificate, target checks) and without.
pub fn desired(data: &[u8]) {
    static TRUST: OnceLock<Trust> = OnceLock::new();
    let enforced = TRUST.get_or_init(|| Trust { roots: PublicKey::parse(GOLDEN_ROOT).into_iter().collect() });
    let now = std::time::SystemTime::now();
    for target in [Target::Device("cam-17".into()), Target::Group("cameras".into())] {
        let _ = enforced.open(data, &target, now);
        let _ = Trust::default().open(data, &target, now);
    }
    let _ = Deployment::from_json(data);
}

/// A manifest: parse, validate (paths, digests, URLs) and the URL of each file.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::from_json(data) {
        for f in &m.files {
            let _ = file_url("https://registry.example/m/1/manifest.json", &f.path, f.url.as_deref());
        }
        let _ = m.total_size();
    }
}

/// An Open Inference Protocol JSON request body, run through a served model
/// (the digits MLP with pre- and post-processing): names, types, shapes,
/// values, the run and the answer.
pub fn infer_json(data: &[u8]) {
    let Some(model) = digits() else { return };
    if let Ok(req) = InferRequest::from_json(data) {
        let _ = model.infer(&req);
    }
}

/// The binary tensor extension: the first 4 bytes (little endian, modulo
/// the length) give `Inference-Header-Content-Length`, the rest is the body.
pub fn binary(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (head, body) = data.split_at(4);
    let json_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize % (body.len() + 1);
    if let Ok(req) = outpost_protocol::binary::decode_request(body, json_len)
        && let Some(model) = digits()
    {
        let _ = model.infer(&req);
    }
}

/// An MQTT request on `infer`: the id and `reply_to` salvaged, the request
/// parsed, the reply topic judged against the reply namespace.
pub fn mqtt_request(data: &[u8]) {
    let (_, reply_to) = InferRequest::salvage(data);
    let _ = InferRequest::from_json(data);
    let prefixes = ["outpost/replies/".to_string()];
    let _ = crate::serve::mqtt::reply_topic(reply_to.as_deref(), "outpost/devices/cam-17/predictions", &prefixes);
}

/// The configuration: a main file and a drop-in (split at the first 0xFF
/// byte), each parsed, then resolved to settings and warnings.
pub fn config(data: &[u8]) {
    let (main, dropin) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut layers = crate::config::Layers::default();
    for (name, part) in [("agent.toml", main), ("agent.d/10-site.toml", dropin)] {
        let Ok(text) = std::str::from_utf8(part) else { return };
        if layers.add_file(std::path::Path::new(name), text).is_err() {
            return;
        }
    }
    if let Ok(s) = layers.resolve() {
        let _ = s.warnings();
    }
    let _ = layers.render();
}

/// The outage journal as found at start-up (a power cut may have cut a
/// line): opened, read back, appended to, trimmed.
pub fn journal(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("journal.jsonl"), data).is_err() {
        return;
    }
    let mut j = crate::link::journal::Journal::open(dir.path(), 1 << 20);
    let pending = j.pending();
    j.push(crate::link::publisher::Outgoing {
        topic: "outpost/devices/cam-17/events".into(),
        payload: b"{}".to_vec(),
        retain: false,
        reliable: true,
        correlation: None,
    });
    j.forget_first(pending.len());
    let _ = j.pending();
}

/// A model file, loaded the way a new version is (tract: parse, type,
/// optimise, plan). A panic is caught here as the isolated validation
/// catches it in its child (`model_load_failed`); what libFuzzer reports
/// is what no isolation would contain in-process: an abort, a hang, memory
/// beyond its limit.
pub fn model(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else { return };
    let manifest = bundle(dir.path(), data);
    let Ok(manifest) = manifest else { return };
    // libFuzzer's panic hook would abort on a panic even though it is
    // caught: the agent contains these (the child exits, the deployment
    // fails `model_load_failed` with the message), so they are not findings.
    // (The first one found, a tract parse panic, is an e2e test:
    // `hostile::a_model_that_makes_tract_panic_while_parsing_is_refused...`.)
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = std::panic::catch_unwind(|| crate::serve::model::Model::load(dir.path(), &manifest, &"0".repeat(64)));
    std::panic::set_hook(hook);
}

/// Writes `model` as `model.onnx` with the digits manifest (10 labels, no
/// golden sample needed to load) into `dir`.
fn bundle(dir: &std::path::Path, model: &[u8]) -> Result<Manifest, String> {
    use sha2::Digest;
    let labels: String = (0..10).map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.join("model.onnx"), model).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("labels.txt"), &labels).map_err(|e| e.to_string())?;
    let sha = |b: &[u8]| outpost_protocol::hex(&sha2::Sha256::digest(b));
    let json = serde_json::json!({
        "schema": "outpost.manifest.v1", "name": "digits", "version": "1",
        "files": [{"path": "model.onnx", "sha256": sha(model), "size": model.len()},
                  {"path": "labels.txt", "sha256": sha(labels.as_bytes()), "size": labels.len()},
                  {"path": "sample/input.json", "sha256": "0".repeat(64), "size": 1},
                  {"path": "sample/expected.json", "sha256": "0".repeat(64), "size": 1}],
        "model": {"format": "onnx", "file": "model.onnx",
                  "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64], "preprocess": {"scale": 0.0625}}],
                  "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10],
                               "postprocess": {"top_k": 3, "labels": "labels.txt"}}]},
        "validation": {"input": "sample/input.json", "expected": "sample/expected.json", "tolerance": 0.0001}
    });
    Manifest::from_json(json.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// The digits MLP of `fixtures/`, loaded once.
fn digits() -> Option<&'static crate::serve::model::Model> {
    served().as_ref().ok()
}

fn served() -> &'static Result<crate::serve::model::Model, String> {
    static MODEL: OnceLock<Result<crate::serve::model::Model, String>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/digits-mlp.onnx");
        let bytes = std::fs::read(&fixture).map_err(|e| format!("{}: {e}", fixture.display()))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?.keep();
        let manifest = bundle(&dir, &bytes)?;
        crate::serve::model::Model::load(&dir, &manifest, &"0".repeat(64)).map_err(|e| e.to_string())
    })
}

/// The model the inference targets run requests through loads (else they
/// would test nothing past parsing).
pub fn ready() -> Result<(), String> {
    served().as_ref().map(|_| ()).map_err(Clone::clone)
}
