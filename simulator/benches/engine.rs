//! Engine choices, measured side by side in one run (this machine is shared
//! and noisy, so only the ratios mean much):
//!
//! 1. one-sample requests on a model with a dynamic batch: on the symbolic
//!    plan alone, on the agent's extra batch-1 plan, and on a model whose
//!    manifest fixes the batch to 1 (digits MLP and CNN);
//! 2. tract's single-threaded vs multi-threaded executor, on the digits CNN
//!    and on a detector-sized convnet (480x640x3 input), and what `auto` picks.
//!
//! Run: `python3 fixtures/make_large_models.py && cargo bench -p outpost-sim --bench engine`
//! (without the large models, part 2 covers the digits CNN only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use outpost_agent::serve::model::Model;
use outpost_protocol::{Executor, InferRequest, Manifest};
use outpost_sim::registry::{RegisterSpec, register};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Registers `model` and loads it as the agent would; `edit` may change the manifest first.
fn load(
    registry: &Path,
    model: &Path,
    version: &str,
    shapes: Vec<(String, Vec<i64>)>,
    edit: impl Fn(&mut Manifest),
) -> (Model, InferRequest) {
    let r = register(&RegisterSpec {
        model: model.to_path_buf(),
        name: "bench".into(),
        version: version.into(),
        registry: registry.to_path_buf(),
        labels: None,
        sample: None,
        shapes,
        tolerance: 1e-3,
        top_k: 0,
        scale: None,
        runtime: None,
    })
    .unwrap();
    let dir = registry.join("bench").join(version);
    let mut manifest = r.manifest;
    edit(&mut manifest);
    let mut m = Model::load(&dir, &manifest, &r.manifest_sha256).unwrap();
    let verdict = m.validate(&dir, &manifest).unwrap();
    println!("    {version}: {verdict}");
    let sample = manifest.validation.as_ref().unwrap().input.clone();
    let req = InferRequest::from_json(&std::fs::read(dir.join(sample)).unwrap()).unwrap();
    (m, req)
}

/// Median time of one request over `n` runs (after a warm-up).
fn median(m: &Model, req: &InferRequest, n: usize) -> Duration {
    for _ in 0..n.min(20) {
        m.infer(req).unwrap();
    }
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            m.infer(req).unwrap();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[n / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let reg = tempfile::tempdir().unwrap();
    let fixtures = root().join("fixtures");
    println!(
        "1. one-sample requests, dynamic batch: symbolic plan only / with the batch-1 plan / batch fixed to 1 (median of 5000)"
    );
    for (name, file) in [("digits MLP", "digits-mlp.onnx"), ("digits CNN", "digits-cnn.onnx")] {
        let path = fixtures.join(file);
        let (with_one, req) = load(reg.path(), &path, &format!("{file}-sym"), vec![], |_| {});
        let (fixed, req1) = load(reg.path(), &path, &format!("{file}-1"), vec![("input".into(), vec![1, 64])], |_| {});
        let (symbolic, _) = load(reg.path(), &path, &format!("{file}-sym-only"), vec![], |_| {});
        let symbolic = symbolic.without_batch_one_plan();
        let (a, b, c) = (median(&symbolic, &req, 5000), median(&with_one, &req, 5000), median(&fixed, &req1, 5000));
        println!(
            "  {name:<12} symbolic only {:>8.1} us   with batch-1 plan {:>8.1} us   fixed {:>8.1} us   symbolic/with = {:.2}",
            us(a),
            us(b),
            us(c),
            us(a) / us(b)
        );
    }

    println!("\n2. executor: single thread vs a pool of every core (one request at a time)");
    if !outpost_agent::serve::model::MULTITHREAD {
        println!("  (skipped: built without the multi-thread executor; add --features multithread)");
        return;
    }
    let detector = root().join("target/large-models/detector-480x640.onnx");
    let mut cases = vec![("digits-cnn", fixtures.join("digits-cnn.onnx"), 2000)];
    if detector.exists() {
        cases.push(("detector-480x640", detector, 20));
    } else {
        println!("  (no target/large-models/detector-480x640.onnx: run fixtures/make_large_models.py)");
    }
    for (name, path, n) in cases {
        let force = |e: Executor| move |m: &mut Manifest| m.model.executor = Some(e);
        let (single, req) = load(reg.path(), &path, &format!("{name}-st"), vec![], force(Executor::SingleThread));
        let (multi, _) = load(reg.path(), &path, &format!("{name}-mt"), vec![], force(Executor::MultiThread));
        let _ = load(reg.path(), &path, &format!("{name}-auto"), vec![], |_| {});
        let (a, b) = (median(&single, &req, n), median(&multi, &req, n));
        println!(
            "  {name:<16} single {:>10.1} us   multi {:>10.1} us   single/multi = {:.2}",
            us(a),
            us(b),
            us(a) / us(b)
        );
    }
}
