//! Which inference engine runs a model: tract (in every build) or ONNX
//! Runtime (the `onnxruntime` feature, with the device's library).
//!
//! `model.runtime` in the manifest, else the device's `runtime.default`:
//! - `tract`: tract only.
//! - `onnxruntime`: ONNX Runtime; where it is unavailable (a build without
//!   it, no library configured, a library that does not open) tract serves
//!   and the `active` event says why.
//! - `auto`: tract loads the model and runs its golden sample, then ONNX
//!   Runtime does (when available); of those that reproduce the sample the
//!   faster serves (ONNX Runtime only when at least 1.2 times faster: tract
//!   costs no library in memory), or the only one that does.
//!
//! In the agent this runs in the isolated validation child
//! (`deploy::isolate`), which reports each step: when ONNX Runtime crashes
//! the child after tract already passed, tract serves.

use crate::serve::model::{LoadAs, Model, ModelError};
use outpost_protocol::{Backend, Manifest, Runtime};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why a build cannot run ONNX Runtime.
pub const NOT_BUILT: &str = "this agent was built without the `onnxruntime` feature";

/// ONNX Runtime must be this much faster than tract for `auto` to pick it.
const ONNXRUNTIME_MARGIN: f64 = 1.2;

/// The device's engine settings (`runtime.default`, `runtime.onnxruntime_library`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtimes {
    pub default: Runtime,
    pub onnxruntime_library: Option<PathBuf>,
}

static CONFIG: OnceLock<Runtimes> = OnceLock::new();

/// Sets the process's engine settings (the first call wins: the library
/// cannot change in a running process).
pub fn configure(r: Runtimes) {
    let _ = CONFIG.set(r);
}

/// The process's engine settings (defaults when never configured).
pub fn config() -> Runtimes {
    CONFIG.get().cloned().unwrap_or_default()
}

/// The configured ONNX Runtime library, or why there is none (not opened).
pub fn library() -> Result<PathBuf, String> {
    if !cfg!(feature = "onnxruntime") {
        return Err(NOT_BUILT.into());
    }
    config().onnxruntime_library.ok_or_else(|| "runtime.onnxruntime_library is not set".into())
}

/// Opens the ONNX Runtime library (once per process), or says why it cannot.
pub fn available() -> Result<(), String> {
    let library = library()?;
    #[cfg(feature = "onnxruntime")]
    {
        crate::serve::onnxruntime::environment(&library).map(|_| ())
    }
    #[cfg(not(feature = "onnxruntime"))]
    {
        let _ = library;
        Err(NOT_BUILT.into())
    }
}

/// What [`prepare`] is doing, for a parent watching the isolated child.
#[derive(Debug)]
pub enum Step<'a> {
    /// About to load the model on this engine: a crash from here on is its.
    Trying(Runtime),
    /// Loaded on the engine it tried last.
    Loaded { load_ms: f64, notes: &'a [String] },
    /// A model that passed its golden sample and serves if what follows
    /// (trying the other engine) crashes.
    Candidate(crate::serve::model::Settled),
}

/// Loads the bundle in `dir` on the engine its manifest (or the device)
/// asks for, runs the golden sample and, for `auto`, keeps the faster engine.
/// The model returned is validated; `model.backend` says which engine and why.
pub fn prepare(
    dir: &Path,
    manifest: &Manifest,
    manifest_sha256: &str,
    step: &mut dyn FnMut(Step<'_>),
) -> Result<Model, ModelError> {
    let requested = manifest.model.runtime.unwrap_or(config().default);
    let attempt = |runtime: Runtime, step: &mut dyn FnMut(Step<'_>)| -> Result<Model, ModelError> {
        step(Step::Trying(runtime));
        let t = Instant::now();
        let how = LoadAs { runtime, ..LoadAs::TRACT };
        let mut model = Model::load_as(dir, manifest, manifest_sha256, how)?;
        step(Step::Loaded { load_ms: ms(t.elapsed()), notes: &model.load_notes });
        model.validate(dir, manifest)?;
        Ok(model)
    };
    let (model, reason) = match requested {
        Runtime::Tract => (attempt(Runtime::Tract, step)?, "model.runtime = tract".to_string()),
        Runtime::Onnxruntime => match available() {
            Ok(()) => (attempt(Runtime::Onnxruntime, step)?, "model.runtime = onnxruntime".to_string()),
            Err(why) => (attempt(Runtime::Tract, step)?, format!("onnxruntime unavailable ({why}): tract serves")),
        },
        Runtime::Auto => {
            let tract = attempt(Runtime::Tract, step);
            // Not configured: nothing to open (and no step a crash could be blamed on).
            let ort = match library() {
                Err(why) => Err(Unavailable(why)),
                Ok(_) => {
                    if let Ok(t) = &tract {
                        step(Step::Candidate(Settled { backend: Some(backend(t, "tract")), ..t.settled() }));
                    }
                    step(Step::Trying(Runtime::Onnxruntime));
                    match available() {
                        Err(why) => Err(Unavailable(why)),
                        Ok(()) => attempt(Runtime::Onnxruntime, step).map_err(Failed),
                    }
                }
            };
            choose(tract, ort)?
        }
    };
    let mut model = model;
    let b = backend(&model, &reason);
    model.validation = format!("{}; {} serves ({reason})", model.validation, b.runtime);
    model.backend = Some(b);
    Ok(model)
}

use crate::serve::model::Settled;

/// Why `auto` did not use ONNX Runtime.
enum NotOrt {
    Unavailable(String),
    Failed(ModelError),
}
use NotOrt::{Failed, Unavailable};

/// `auto`'s pick between what tract and ONNX Runtime made of the model.
fn choose(tract: Result<Model, ModelError>, ort: Result<Model, NotOrt>) -> Result<(Model, String), ModelError> {
    let golden = |m: &Model| m.golden.map(ms);
    match (tract, ort) {
        (Ok(t), Ok(o)) => {
            let (tt, ot) = (golden(&t), golden(&o));
            let reason = |faster: &str, a: Option<f64>, b: Option<f64>, other: &str| match (a, b) {
                (Some(a), Some(b)) => format!("{faster}: {a:.3} ms vs {b:.3} ms per golden sample on {other}"),
                _ => "no golden sample to time: tract".into(),
            };
            match (tt, ot) {
                (Some(a), Some(b)) if b * ONNXRUNTIME_MARGIN < a => {
                    let mut o = o;
                    o.golden_other = Some(("tract", a));
                    Ok((o, reason("faster", ot, tt, "tract")))
                }
                _ => {
                    let mut t = t;
                    t.golden_other = ot.map(|b| ("onnxruntime", b));
                    let why = match (tt, ot) {
                        (Some(a), Some(b)) if b < a => format!(
                            "onnxruntime not {ONNXRUNTIME_MARGIN}x faster: {b:.3} ms vs {a:.3} ms per golden sample on tract"
                        ),
                        _ => reason("faster", tt, ot, "onnxruntime"),
                    };
                    Ok((t, why))
                }
            }
        }
        (Ok(t), Err(Unavailable(why))) => Ok((t, format!("onnxruntime unavailable: {why}"))),
        (Ok(t), Err(Failed(e))) => Ok((t, format!("onnxruntime failed: {} ({e})", e.code()))),
        (Err(e), Ok(o)) => Ok((o, format!("tract cannot serve it: {} ({e})", e.code()))),
        (Err(e), Err(Unavailable(why))) => Err(e.with_note(&format!("onnxruntime unavailable: {why}"))),
        (Err(te), Err(Failed(oe))) => {
            // The error of the engine that got further, with both stories.
            let both = format!("tract: {te}; onnxruntime: {oe}");
            Err(match te {
                ModelError::Load(_) => oe.with_message(both),
                _ => te.with_message(both),
            })
        }
    }
}

/// The `active` event's `backend` for `model`.
fn backend(model: &Model, reason: &str) -> Backend {
    let mut golden_ms = std::collections::BTreeMap::new();
    if let Some(g) = model.golden {
        golden_ms.insert(model.runtime().to_string(), round3(ms(g)));
    }
    if let Some((other, t)) = model.golden_other {
        golden_ms.insert(other.to_string(), round3(t));
    }
    Backend { runtime: model.runtime().to_string(), threads: model.threads(), reason: reason.to_string(), golden_ms }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A model file's signature (for `register`), read by tract or, when
/// `runtime` asks for it or tract cannot read the model and the library is
/// configured, by ONNX Runtime. Returns the engine that read it.
pub fn read_signature(
    path: &Path,
    fixed: &[(String, Vec<i64>)],
    runtime: Runtime,
) -> Result<(crate::serve::model::Signature, Runtime), ModelError> {
    let tract = match runtime {
        Runtime::Onnxruntime => None,
        _ => match crate::serve::model::read_signature(path, fixed) {
            Ok(s) => return Ok((s, Runtime::Tract)),
            Err(e) => Some(e),
        },
    };
    let ort = match (runtime, library()) {
        (Runtime::Tract, _) => Err("model.runtime = tract".to_string()),
        (_, Err(why)) => Err(why),
        (_, Ok(library)) => onnxruntime_signature(&library, path, fixed),
    };
    match (tract, ort) {
        (_, Ok(s)) => Ok((s, Runtime::Onnxruntime)),
        (Some(e), Err(why)) => Err(e.with_note(&format!("onnxruntime unavailable: {why}"))),
        (None, Err(why)) => Err(ModelError::Load(format!("onnxruntime unavailable: {why}"))),
    }
}

#[cfg(feature = "onnxruntime")]
fn onnxruntime_signature(
    library: &Path,
    path: &Path,
    fixed: &[(String, Vec<i64>)],
) -> Result<crate::serve::model::Signature, String> {
    let (mut inputs, outputs) = crate::serve::onnxruntime::read_signature(library, path).map_err(|e| e.to_string())?;
    for (name, shape) in fixed {
        let names: Vec<String> = inputs.iter().map(|(n, ..)| n.clone()).collect();
        let Some(input) = inputs.iter_mut().find(|(n, ..)| n == name) else {
            return Err(format!("--shape names input '{name}', but the model's inputs are {names:?}"));
        };
        input.2 = shape.clone();
    }
    Ok(crate::serve::model::Signature { inputs, outputs })
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime_signature(
    _: &Path,
    _: &Path,
    _: &[(String, Vec<i64>)],
) -> Result<crate::serve::model::Signature, String> {
    Err(NOT_BUILT.into())
}
