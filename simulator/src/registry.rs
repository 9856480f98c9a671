//! The model registry: `register` writes a version as static files, and a
//! small HTTP server serves them (any static HTTP server works as well).
//!
//! ```text
//! REGISTRY/{name}/{version}/manifest.json
//! REGISTRY/{name}/{version}/model.onnx, labels.txt, sample/input.json, sample/expected.json
//! ```

use outpost_agent::serve::model::{ExpectedOutputs, Model};
use outpost_protocol::infer::TensorData;
use outpost_protocol::manifest::{ModelSpec, Postprocess, TensorSpec, Validation};
use outpost_protocol::{Datatype, FileEntry, InferRequest, Manifest, TensorIn, hex};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What `register` is asked to do.
#[derive(Debug, Clone)]
pub struct RegisterSpec {
    pub model: PathBuf,
    pub name: String,
    pub version: String,
    pub registry: PathBuf,
    pub labels: Option<PathBuf>,
    pub sample: Option<PathBuf>,
    /// Concrete shapes for inputs with dynamic dimensions.
    pub shapes: Vec<(String, Vec<i64>)>,
    pub tolerance: f64,
    /// Top-k classes answered with the labels (when labels are given).
    pub top_k: usize,
    /// Pre-processing to apply to the (first) input on the device.
    pub scale: Option<f64>,
    /// `model.runtime` of the manifest (absent: the device's default). With
    /// `onnxruntime`, or when tract cannot read the model, ONNX Runtime
    /// (the library `backend::configure` names) reads the signature and
    /// computes the golden sample's expected outputs.
    pub runtime: Option<outpost_protocol::Runtime>,
}

#[derive(Debug, Clone)]
pub struct Registered {
    /// `{name}/{version}/manifest.json`, relative to the registry root.
    pub manifest_path: String,
    pub manifest_sha256: String,
    pub manifest: Manifest,
}

pub fn sha256(bytes: &[u8]) -> String {
    let d: [u8; 32] = Sha256::digest(bytes).into();
    hex(&d)
}

fn entry(dir: &Path, path: &str) -> Result<FileEntry, String> {
    let bytes = std::fs::read(dir.join(path)).map_err(|e| format!("{path}: {e}"))?;
    Ok(FileEntry { path: path.into(), sha256: sha256(&bytes), size: bytes.len() as u64, url: None })
}

fn write(dir: &Path, path: &str, bytes: &[u8]) -> Result<(), String> {
    let p = dir.join(path);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))
}

/// A deterministic input that fits the model (dynamic dimensions taken as 1):
/// floats in [0, 1), integers in 0..10, alternating booleans.
pub fn synthetic_request(inputs: &[(String, Datatype, Vec<i64>)]) -> InferRequest {
    let mut state: u32 = 0x9E37_79B9;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let tensors = inputs
        .iter()
        .map(|(name, dt, shape)| {
            let shape: Vec<i64> = shape.iter().map(|d| if *d < 0 { 1 } else { *d }).collect();
            let n: i64 = shape.iter().product();
            let data = match dt {
                Datatype::Bool => TensorData::Bool((0..n).map(|i| i % 2 == 0).collect()),
                d if d.is_float() => TensorData::F64((0..n).map(|_| f64::from(next() % 10_000) / 10_000.0).collect()),
                _ => TensorData::I64((0..n).map(|_| i64::from(next() % 10)).collect()),
            };
            TensorIn { name: name.clone(), shape, datatype: *dt, data, parameters: None }
        })
        .collect();
    InferRequest { id: Some("golden".into()), inputs: tensors, outputs: None, parameters: None, reply_to: None }
}

/// Registers a model version: copies the files, derives the signature from the
/// model, computes the golden sample's expected output by running it exactly
/// as the device will, and writes the manifest last.
pub fn register(spec: &RegisterSpec) -> Result<Registered, String> {
    for (what, v) in [("--name", &spec.name), ("--version", &spec.version)] {
        outpost_protocol::topics::validate_name(what, v).map_err(|e| e.to_string())?;
    }
    let asked = spec.runtime.unwrap_or_default();
    let read = outpost_agent::serve::backend::read_signature(&spec.model, &spec.shapes, asked);
    let (sig, reader) = read.map_err(|e| {
        // Named once: most of these errors already start with the file.
        let (file, e) = (spec.model.display().to_string(), e.to_string());
        if e.starts_with(&file) { e } else { format!("{file}: {e}") }
    })?;
    let dir = spec.registry.join(&spec.name).join(&spec.version);
    if dir.join("manifest.json").exists() {
        return Err(format!(
            "{}@{} is already registered in {}: versions are immutable, register a new version",
            spec.name,
            spec.version,
            spec.registry.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let model_bytes = std::fs::read(&spec.model).map_err(|e| format!("{}: {e}", spec.model.display()))?;
    write(&dir, "model.onnx", &model_bytes)?;
    let mut files = vec![entry(&dir, "model.onnx")?];
    if let Some(l) = &spec.labels {
        let bytes = std::fs::read(l).map_err(|e| format!("{}: {e}", l.display()))?;
        write(&dir, "labels.txt", &bytes)?;
        files.push(entry(&dir, "labels.txt")?);
    }
    let request = match &spec.sample {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            InferRequest::from_json(&bytes).map_err(|e| format!("{}: not an inference request: {e}", p.display()))?
        }
        None => synthetic_request(&sig.inputs),
    };
    let mut sample = serde_json::to_vec_pretty(&request).map_err(|e| e.to_string())?;
    sample.push(b'\n');
    write(&dir, "sample/input.json", &sample)?;
    files.push(entry(&dir, "sample/input.json")?);

    let inputs: Vec<TensorSpec> = sig
        .inputs
        .iter()
        .enumerate()
        .map(|(i, (name, dt, shape))| TensorSpec {
            name: name.clone(),
            datatype: *dt,
            shape: shape.clone(),
            preprocess: if i == 0 {
                spec.scale.map(|s| outpost_protocol::Preprocess { scale: Some(s), ..Default::default() })
            } else {
                None
            },
            postprocess: None,
        })
        .collect();
    let outputs: Vec<TensorSpec> = sig
        .outputs
        .iter()
        .enumerate()
        .map(|(i, (name, dt, shape))| TensorSpec {
            name: name.clone(),
            datatype: *dt,
            shape: shape.clone(),
            preprocess: None,
            postprocess: (i == 0 && spec.labels.is_some()).then(|| Postprocess {
                softmax: false,
                top_k: Some(spec.top_k),
                labels: Some("labels.txt".into()),
            }),
        })
        .collect();
    let mut manifest = Manifest {
        schema: outpost_protocol::manifest::SCHEMA.into(),
        name: spec.name.clone(),
        version: spec.version.clone(),
        files: files.clone(),
        model: ModelSpec {
            format: "onnx".into(),
            file: "model.onnx".into(),
            inputs,
            outputs,
            executor: None,
            runtime: spec.runtime,
        },
        validation: None,
    };
    manifest.validate().map_err(|e| e.to_string())?;
    // The engine that read the model computes the expected outputs.
    let how = outpost_agent::serve::model::LoadAs { runtime: reader, ..outpost_agent::serve::model::LoadAs::TRACT };
    let model = Model::load_as(&dir, &manifest, "", how).map_err(|e| format!("{}: {e}", spec.model.display()))?;
    let response = model.infer(&request).map_err(|e| format!("golden sample: {e}"))?;
    let mut expected =
        serde_json::to_vec_pretty(&ExpectedOutputs { outputs: response.outputs }).map_err(|e| e.to_string())?;
    expected.push(b'\n');
    write(&dir, "sample/expected.json", &expected)?;
    files.push(entry(&dir, "sample/expected.json")?);
    manifest.files = files;
    manifest.validation = Some(Validation {
        input: "sample/input.json".into(),
        expected: "sample/expected.json".into(),
        tolerance: spec.tolerance,
    });
    manifest.validate().map_err(|e| e.to_string())?;
    let bytes = manifest.to_json_pretty();
    write(&dir, "manifest.json", &bytes)?;
    Ok(Registered {
        manifest_path: format!("{}/{}/manifest.json", spec.name, spec.version),
        manifest_sha256: sha256(&bytes),
        manifest,
    })
}

/// Registers one of the hostile models of `fixtures/hostile/` (made by
/// `fixtures/make_hostile.py`) as `name@version` with its golden sample,
/// written as files from `hostile/index.json`: nothing here runs the model
/// (some are built to exhaust whoever does). Returns the manifest's sha256.
pub fn register_hostile(
    fixtures: &Path,
    stem: &str,
    registry: &Path,
    name: &str,
    version: &str,
) -> Result<String, String> {
    let src = fixtures.join("hostile");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(src.join("index.json")).map_err(|e| format!("{}: {e}", src.join("index.json").display()))?,
    )
    .map_err(|e| format!("hostile/index.json: {e}"))?;
    let spec = &index[stem];
    if !spec.is_object() {
        return Err(format!("no hostile fixture named {stem}"));
    }
    let dir = registry.join(name).join(version);
    let mut files = Vec::new();
    for (from, to) in [
        (format!("{stem}.onnx"), "model.onnx"),
        (format!("{stem}.sample.json"), "sample/input.json"),
        (format!("{stem}.expected.json"), "sample/expected.json"),
    ] {
        let bytes = std::fs::read(src.join(&from)).map_err(|e| format!("{from}: {e}"))?;
        write(&dir, to, &bytes)?;
        files.push(serde_json::json!({"path": to, "sha256": sha256(&bytes), "size": bytes.len()}));
    }
    let manifest = serde_json::json!({
        "schema": outpost_protocol::manifest::SCHEMA,
        "name": name,
        "version": version,
        "files": files,
        "model": {"format": "onnx", "file": "model.onnx", "inputs": spec["inputs"], "outputs": spec["outputs"]},
        "validation": {"input": "sample/input.json", "expected": "sample/expected.json", "tolerance": 1e-3},
    });
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    write(&dir, "manifest.json", &bytes)?;
    Ok(sha256(&bytes))
}

/// Serves `root` as static files on `listener` until the process ends: the
/// registry over HTTP. Paths with `..` or other tricks get 404.
pub async fn serve_http(root: PathBuf, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    async fn file(State(root): State<PathBuf>, UrlPath(path): UrlPath<String>) -> axum::response::Response {
        if outpost_protocol::manifest::check_relative_path("path", &path).is_err() {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        }
        match tokio::fs::read(root.join(&path)).await {
            Ok(bytes) => {
                let ct = if path.ends_with(".json") { "application/json" } else { "application/octet-stream" };
                ([(header::CONTENT_TYPE, ct)], bytes).into_response()
            }
            Err(_) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        }
    }
    let app = axum::Router::new().route("/{*path}", axum::routing::get(file)).with_state(root);
    axum::serve(listener, app).await
}

/// Like `serve_http`, but a share `flaky` (0..1) of the model-file
/// downloads fail: half with `503` + `Retry-After: 1`, half cut off midway
/// (the full length announced, half the bytes sent). For the fleet
/// simulation's flaky links; deterministic for a given `seed`.
pub async fn serve_http_flaky(
    root: PathBuf,
    listener: tokio::net::TcpListener,
    flaky: f64,
    seed: u64,
    faults: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::io::Result<()> {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    #[derive(Clone)]
    struct Ctx {
        root: PathBuf,
        flaky: f64,
        counter: Arc<AtomicU64>,
        seed: u64,
        faults: Arc<AtomicU64>,
    }
    async fn file(State(c): State<Ctx>, UrlPath(path): UrlPath<String>) -> axum::response::Response {
        if outpost_protocol::manifest::check_relative_path("path", &path).is_err() {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        }
        // Read in place, not with tokio::fs: the fleet's agents can hold every
        // thread of the blocking pool with their downloads, and those wait
        // for this answer. The files are small and on local (or tmpfs) disk.
        let Ok(bytes) = std::fs::read(c.root.join(&path)) else {
            return (StatusCode::NOT_FOUND, "not found\n").into_response();
        };
        let n = c.counter.fetch_add(1, Ordering::Relaxed);
        let roll = unit(splitmix(c.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        if !path.ends_with("manifest.json") && roll < c.flaky {
            c.faults.fetch_add(1, Ordering::Relaxed);
            if roll < c.flaky / 2.0 {
                return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "busy\n").into_response();
            }
            let len = bytes.len();
            let half = bytes[..len / 2].to_vec();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                vec![Ok(half), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "link cut"))];
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            return ([(header::CONTENT_LENGTH, len.to_string())], body).into_response();
        }
        let ct = if path.ends_with(".json") { "application/json" } else { "application/octet-stream" };
        ([(header::CONTENT_TYPE, ct)], bytes).into_response()
    }
    let ctx = Ctx { root, flaky, counter: Default::default(), seed, faults };
    let app = axum::Router::new().route("/{*path}", axum::routing::get(file)).with_state(ctx);
    axum::serve(listener, app).await
}

/// splitmix64: a small deterministic generator for fault and role draws.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A draw in [0, 1).
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}
