//! Scoring engine: loads an ONNX model with tract (or ONNX Runtime, see
//! [`crate::serve::backend`]), checks it reproduces its golden sample, and
//! runs Open Inference Protocol requests against it.
//!
//! A [`Model`] is immutable once loaded: its optimised plan is `Send + Sync`
//! and `run()` builds fresh state per call, so many worker threads share one
//! model without a lock. The [`crate::serve::Engine`] swaps models atomically.

use outpost_protocol::infer::{OutData, TensorData};
use outpost_protocol::{Datatype, ErrorCode, ErrorInfo, InferRequest, InferResponse, Manifest, TensorOut};
use outpost_protocol::{Postprocess, Preprocess, Runtime};
use std::path::Path;
use std::sync::Arc;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// onnxruntime models up to this size get a session per core (up to 4).
const SESSION_COPIES_MAX_BYTES: u64 = 16 << 20;

/// Models up to this size get a second plan for one-sample requests.
const BATCH_ONE_PLAN_MAX_BYTES: u64 = 64 << 20;

/// One golden-sample run slower than this single-threaded is worth timing on a thread pool.
const MEASURE_ABOVE: std::time::Duration = std::time::Duration::from_millis(5);

/// Whether this build can split one request over every core (the
/// `multithread` cargo feature).
pub const MULTITHREAD: bool = cfg!(feature = "multithread");

/// What `model.executor = multi_thread` gets from a build without the
/// `multithread` feature.
const NO_POOL: &str =
    "single-threaded: the manifest asks for multi_thread but this agent was built without the `multithread` feature";

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A pool of `cores` threads that one request's matrix products are split
/// over, in builds with the `multithread` feature.
#[cfg(feature = "multithread")]
fn thread_pool(cores: usize) -> Option<Executor> {
    Some(Executor::multithread_with_name(cores, "outpost-mm"))
}

#[cfg(not(feature = "multithread"))]
fn thread_pool(_cores: usize) -> Option<Executor> {
    None
}

/// An error an inference request gets: `bad_input` for what the client got
/// wrong (the message says what was expected), `inference_failed` when the
/// model failed on a valid request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InferFailure {
    pub code: ErrorCode,
    pub message: String,
    /// The model returned NaN or infinity for a finite input (a failure
    /// probation rolls back on at once).
    pub non_finite: bool,
}

impl InferFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        InferFailure { code, message: message.into(), non_finite: false }
    }

    fn bad_input(message: impl Into<String>) -> Self {
        InferFailure::new(ErrorCode::BadInput, message)
    }

    pub(crate) fn model(message: impl Into<String>) -> Self {
        InferFailure::new(ErrorCode::InferenceFailed, message)
    }

    /// The model, not the request, is at fault.
    pub fn is_model_failure(&self) -> bool {
        self.code == ErrorCode::InferenceFailed
    }
}

/// An output holding NaN or infinity: the client's fault when its input held
/// one too, the model's otherwise.
/// `moved`: what inputs moved out of `req` held (see [`Model::infer_owned`]).
fn non_finite(output: &str, at: usize, req: &InferRequest, moved: Option<(&str, usize)>) -> InferFailure {
    let bad_in =
        moved.or_else(|| req.inputs.iter().find_map(|t| t.data.first_non_finite().map(|j| (t.name.as_str(), j))));
    match bad_in {
        Some((input, j)) => InferFailure::bad_input(format!(
            "input '{input}' holds NaN or infinity at element {j}, which this model cannot take (its output '{output}' is not finite)"
        )),
        None => InferFailure {
            non_finite: true,
            ..InferFailure::model(format!(
                "non-finite output: '{output}' holds NaN or infinity at element {at} for a finite input"
            ))
        },
    }
}

/// Why a model could not be made to serve. [`ModelError::code`] is the
/// wire's error code; the message names the file and what was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// tract cannot parse, type or plan the model, or an input or output
    /// has a type Outpost cannot serve (`model_load_failed`).
    #[error("{0}")]
    Load(String),
    /// The manifest does not describe the model, or names a file it cannot
    /// read (`invalid_manifest`).
    #[error("{0}")]
    Manifest(String),
    /// The golden sample does not run or is not reproduced (`validation_failed`).
    #[error("{0}")]
    Validation(String),
}

impl ModelError {
    /// The same kind of error, saying `message`.
    pub fn with_message(self, message: String) -> ModelError {
        match self {
            ModelError::Load(_) => ModelError::Load(message),
            ModelError::Manifest(_) => ModelError::Manifest(message),
            ModelError::Validation(_) => ModelError::Validation(message),
        }
    }

    /// The same error with `note` added in parentheses.
    pub fn with_note(self, note: &str) -> ModelError {
        let message = format!("{self} ({note})");
        self.with_message(message)
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ModelError::Load(_) => ErrorCode::ModelLoadFailed,
            ModelError::Manifest(_) => ErrorCode::InvalidManifest,
            ModelError::Validation(_) => ErrorCode::ValidationFailed,
        }
    }
}

/// At the wire: code and message.
impl From<ModelError> for ErrorInfo {
    fn from(e: ModelError) -> ErrorInfo {
        ErrorInfo::new(e.code(), e.to_string())
    }
}

/// Kept for the simulator and tests: loading's error.
pub type LoadError = ModelError;

fn load_failed(message: impl Into<String>) -> ModelError {
    ModelError::Load(message.into())
}

#[derive(Debug)]
struct InputSlot {
    name: String,
    /// What clients send.
    datatype: Datatype,
    /// What the model takes (`preprocess.datatype`, else `datatype`).
    model_datatype: Datatype,
    /// `preprocess.shape`: the layout the model takes.
    reshape: Option<Vec<i64>>,
    /// Per dimension: `Some(n)` fixed, `None` any size.
    dims: Vec<Option<usize>>,
    preprocess: Option<Preprocess>,
}

#[derive(Debug)]
struct OutputSlot {
    name: String,
    /// Index among the plan's outputs.
    index: usize,
    postprocess: Option<Postprocess>,
    labels: Option<Vec<String>>,
}

/// A loaded, optimised model ready to serve.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub version: String,
    /// Identifies the exact bundle (the manifest's sha256).
    pub manifest_sha256: String,
    runner: Runner,
    inputs: Vec<InputSlot>,
    outputs: Vec<OutputSlot>,
    /// How loading went, for the log and events (e.g. "value_info ignored").
    pub load_notes: Vec<String>,
    /// Time from reading the file to a runnable plan.
    pub load_time: std::time::Duration,
    /// What the golden-sample check and the executor choice found (after `validate`).
    pub validation: String,
    /// The golden sample's best run time (after `validate`, when it ran).
    pub golden: Option<std::time::Duration>,
    /// Which engine serves and why (after `backend::prepare`, or from a settlement).
    pub backend: Option<outpost_protocol::Backend>,
    /// The golden sample's time on the engine `auto` did not pick (ms).
    pub(crate) golden_other: Option<(&'static str, f64)>,
    output_specs: Vec<(String, &'static str, Vec<i64>)>,
    /// Requests with at most this many input elements run on the calling
    /// thread instead of a blocking-pool thread (two thread hand-offs cost
    /// more than such a model's run): set when the golden sample runs in
    /// under [`INLINE_BELOW`]. 0: never.
    inline_max_elements: usize,
    /// See [`Model::max_body_bytes`] (worked out once, at load).
    max_body: Option<usize>,
}

/// The largest request body inputs of these shapes need (see [`Model::max_body_bytes`]).
fn max_body(inputs: &[InputSlot]) -> Option<usize> {
    let mut elements: usize = 0;
    for slot in inputs {
        let n = slot.dims.iter().try_fold(1usize, |acc, d| d.and_then(|d| acc.checked_mul(d)))?;
        elements = elements.checked_add(n)?;
    }
    elements.checked_mul(64)?.checked_add(64 << 10)
}

/// What runs a model's requests.
enum Runner {
    Tract {
        plan: Arc<TypedRunnableModel>,
        /// The same model with a dynamic batch fixed to 1, for one-sample requests.
        plan_one: Option<Arc<TypedRunnableModel>>,
        /// Single-threaded unless the manifest or a measurement chose otherwise.
        executor: Executor,
    },
    #[cfg(feature = "onnxruntime")]
    Onnxruntime(crate::serve::onnxruntime::Sessions),
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Runner::Tract { plan_one, .. } => write!(f, "tract (batch-1 plan: {})", plan_one.is_some()),
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(s) => write!(f, "onnxruntime {s:?}"),
        }
    }
}

/// How to load a model: on which engine, with how many threads per request
/// and (onnxruntime) how many sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadAs {
    /// `Tract` or `Onnxruntime` (`Auto` is [`crate::serve::backend::prepare`]'s to settle).
    pub runtime: Runtime,
    /// Threads one request runs on (tract: 1, or a pool of every core).
    pub threads: usize,
    /// onnxruntime: sessions, each running one request at a time.
    pub sessions: usize,
}

impl LoadAs {
    pub const TRACT: LoadAs = LoadAs { runtime: Runtime::Tract, threads: 1, sessions: 1 };
}

fn tract_runtime() -> Runtime {
    Runtime::Tract
}

/// What a validation settled about how a model runs (see [`Model::settled`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settled {
    /// The engine (records from before the choice: tract).
    #[serde(default = "tract_runtime")]
    pub runtime: Runtime,
    /// Why that engine, and the golden sample's time on each (the `active` event's `backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<outpost_protocol::Backend>,
    /// Requests split over a pool of every core (else one thread each).
    pub multi_thread: bool,
    /// See `Model::inline_max_elements`.
    pub inline_max_elements: usize,
    /// The golden sample's verdict and the executor choice, for the log.
    pub validation: String,
}

/// A model whose golden sample runs faster than this serves small requests inline.
const INLINE_BELOW: std::time::Duration = std::time::Duration::from_micros(100);

/// What `register` reads from a model file: names, element types and shapes
/// (-1 for a dynamic dimension) of its inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub inputs: Vec<(String, Datatype, Vec<i64>)>,
    pub outputs: Vec<(String, Datatype, Vec<i64>)>,
}

pub fn datatype_of(dt: DatumType) -> Option<Datatype> {
    Some(match dt {
        DatumType::Bool => Datatype::Bool,
        DatumType::U8 => Datatype::Uint8,
        DatumType::U16 => Datatype::Uint16,
        DatumType::U32 => Datatype::Uint32,
        DatumType::U64 => Datatype::Uint64,
        DatumType::I8 => Datatype::Int8,
        DatumType::I16 => Datatype::Int16,
        DatumType::I32 => Datatype::Int32,
        DatumType::I64 => Datatype::Int64,
        DatumType::F16 => Datatype::Fp16,
        DatumType::F32 => Datatype::Fp32,
        DatumType::F64 => Datatype::Fp64,
        _ => return None,
    })
}

fn datum_of(d: Datatype) -> DatumType {
    match d {
        Datatype::Bool => DatumType::Bool,
        Datatype::Uint8 => DatumType::U8,
        Datatype::Uint16 => DatumType::U16,
        Datatype::Uint32 => DatumType::U32,
        Datatype::Uint64 => DatumType::U64,
        Datatype::Int8 => DatumType::I8,
        Datatype::Int16 => DatumType::I16,
        Datatype::Int32 => DatumType::I32,
        Datatype::Int64 => DatumType::I64,
        Datatype::Fp16 => DatumType::F16,
        Datatype::Fp32 => DatumType::F32,
        Datatype::Fp64 => DatumType::F64,
    }
}

/// Renders a shape for messages: `[N, 64]`, `-1` shown as `N` for the first
/// dimension and `?` elsewhere.
pub fn shape_text(dims: &[Option<usize>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Some(n) => n.to_string(),
            None if i == 0 => "N".into(),
            None => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The ONNX graph input names, in order, and their declared facts.
fn graph_inputs(model: &InferenceModel) -> TractResult<Vec<(String, InferenceFact)>> {
    model
        .input_outlets()?
        .iter()
        .enumerate()
        .map(|(i, o)| Ok((model.node(o.node).name.clone(), model.input_fact(i)?.clone())))
        .collect()
}

fn graph_output_names(model: &InferenceModel) -> TractResult<Vec<String>> {
    model
        .output_outlets()?
        .iter()
        .map(|o| Ok(model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone())))
        .collect()
}

fn parse_onnx(path: &Path, ignore_value_info: bool) -> TractResult<InferenceModel> {
    tract_onnx::onnx().with_ignore_value_info(ignore_value_info).model_for_path(path)
}

/// Reads a model's signature (for `register`). `fixed` gives concrete shapes
/// for inputs whose dimensions are dynamic (`--shape input=1,3,320,320`).
/// Like [`Model::load`], retries with the file's value_info ignored.
pub fn read_signature(path: &Path, fixed: &[(String, Vec<i64>)]) -> Result<Signature, LoadError> {
    signature_with(path, fixed, false).or_else(|first| signature_with(path, fixed, true).map_err(|_| first))
}

fn signature_with(path: &Path, fixed: &[(String, Vec<i64>)], ignore_value_info: bool) -> Result<Signature, LoadError> {
    let file = path.display();
    let mut model =
        parse_onnx(path, ignore_value_info).map_err(|e| load_failed(format!("{file}: cannot parse ONNX: {e:#}")))?;
    let declared = graph_inputs(&model).map_err(|e| load_failed(format!("{file}: {e:#}")))?;
    for (n, _) in fixed {
        if !declared.iter().any(|(name, _)| name == n) {
            let names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
            return Err(load_failed(format!("--shape names input '{n}', but the model's inputs are {names:?}")));
        }
    }
    let mut inputs = Vec::new();
    for (i, (name, fact)) in declared.iter().enumerate() {
        let dt = fact
            .datum_type
            .concretize()
            .ok_or_else(|| load_failed(format!("{file}: input '{name}' has no element type")))?;
        let datatype = datatype_of(dt).ok_or_else(|| {
            load_failed(format!("{file}: input '{name}' has type {dt:?}, which Outpost cannot serve"))
        })?;
        let shape: Vec<i64> = match fixed.iter().find(|(n, _)| n == name) {
            Some((_, s)) => {
                fix_input(&mut model, i, dt, s).map_err(|e| load_failed(format!("{file}: input '{name}': {e:#}")))?;
                s.clone()
            }
            None if fact.shape.is_open() => {
                return Err(load_failed(format!(
                    "{file}: input '{name}' has an unknown rank: give its shape with --shape {name}=D1,D2,..."
                )));
            }
            None => fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok()).unwrap_or(-1)).collect(),
        };
        inputs.push((name.clone(), datatype, shape));
    }
    let names = graph_output_names(&model).map_err(|e| load_failed(format!("{e:#}")))?;
    let typed = model.into_typed().map_err(|e| load_failed(format!("{file}: cannot type the model: {e:#}")))?;
    let mut outputs = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let fact = typed.output_fact(i).map_err(|e| load_failed(format!("{e:#}")))?;
        let datatype = datatype_of(fact.datum_type).ok_or_else(|| {
            load_failed(format!("{file}: output '{name}' has type {:?}, which Outpost cannot serve", fact.datum_type))
        })?;
        let shape = fact.shape.iter().map(|d| d.to_i64().unwrap_or(-1)).collect();
        outputs.push((name, datatype, shape));
    }
    Ok(Signature { inputs, outputs })
}

/// Sets input `i` to element type `dt` and `shape` (-1 = dynamic). A dynamic
/// dimension keeps the model's own symbol (e.g. "batch", so inputs sharing it
/// stay tied), else becomes `N` for the first dimension and a fresh symbol
/// elsewhere.
fn fix_input(model: &mut InferenceModel, i: usize, dt: DatumType, shape: &[i64]) -> TractResult<()> {
    let fact = model.input_fact(i)?;
    let own: Vec<Option<TDim>> = if fact.shape.is_open() {
        vec![None; shape.len()]
    } else {
        fact.shape.dims().map(|d| d.concretize()).collect()
    };
    let mut dims: TVec<TDim> = TVec::new();
    for (j, d) in shape.iter().enumerate() {
        let dim = match (usize::try_from(*d), own.get(j).cloned().flatten()) {
            (Ok(n), _) => n.to_dim(),
            (Err(_), Some(sym)) if sym.to_i64().is_err() => sym,
            (Err(_), _) if j == 0 => model.symbols.sym("N").to_dim(),
            (Err(_), _) => model.symbols.sym(&format!("outpost_{i}_{j}")).to_dim(),
        };
        dims.push(dim);
    }
    model.set_input_fact(i, InferenceFact::dt_shape(dt, dims))
}

impl Model {
    /// Loads the model of a verified bundle in `dir` with tract, one thread
    /// per request. Does not run the golden sample: see [`Model::validate`].
    pub fn load(dir: &Path, manifest: &Manifest, manifest_sha256: &str) -> Result<Model, LoadError> {
        Model::load_as(dir, manifest, manifest_sha256, LoadAs::TRACT)
    }

    /// Loads the model of a verified bundle in `dir` on the engine `how`
    /// names. Does not run the golden sample: see [`Model::validate`].
    pub fn load_as(dir: &Path, manifest: &Manifest, manifest_sha256: &str, how: LoadAs) -> Result<Model, LoadError> {
        let started = std::time::Instant::now();
        let file = &manifest.model.file;
        let path = dir.join(file);
        let mut notes = Vec::new();
        let (runner, outputs_named) = match how.runtime {
            Runtime::Onnxruntime => onnxruntime_runner(&path, manifest, how)?,
            _ => tract_runner(&path, manifest, how, &mut notes)?,
        };
        #[cfg_attr(not(feature = "onnxruntime"), allow(unused_mut))]
        let mut inputs: Vec<InputSlot> = manifest
            .model
            .inputs
            .iter()
            .map(|t| InputSlot {
                name: t.name.clone(),
                datatype: t.datatype,
                model_datatype: t.preprocess.as_ref().and_then(|p| p.datatype).unwrap_or(t.datatype),
                reshape: t.preprocess.as_ref().and_then(|p| p.shape.clone()),
                dims: t.shape.iter().map(|d| usize::try_from(*d).ok()).collect(),
                preprocess: t.preprocess.clone(),
            })
            .collect();
        // A size the model fixes where the manifest says any: the model's
        // (a client sending another gets bad_input, not a model failure).
        #[cfg(feature = "onnxruntime")]
        if let Runner::Onnxruntime(sessions) = &runner {
            for slot in inputs.iter_mut().filter(|s| s.reshape.is_none()) {
                let Some((_, dims)) = sessions.input_dims.iter().find(|(n, _)| *n == slot.name) else { continue };
                for (d, m) in slot.dims.iter_mut().zip(dims) {
                    if d.is_none() && *m >= 0 {
                        *d = Some(*m as usize);
                    }
                }
            }
        }
        let mut outputs = Vec::new();
        for spec in &manifest.model.outputs {
            let index = outputs_named.iter().position(|n| n == &spec.name).ok_or_else(|| {
                ModelError::Manifest(format!(
                    "{file}: manifest output '{}' is not an output of the model, which has {outputs_named:?}",
                    spec.name
                ))
            })?;
            let labels = match spec.postprocess.as_ref().and_then(|p| p.labels.as_ref()) {
                Some(l) => {
                    let text = std::fs::read_to_string(dir.join(l))
                        .map_err(|e| ModelError::Manifest(format!("{l}: cannot read labels: {e}")))?;
                    Some(text.lines().map(|s| s.trim_end_matches('\r').to_string()).collect())
                }
                None => None,
            };
            outputs.push(OutputSlot { name: spec.name.clone(), index, postprocess: spec.postprocess.clone(), labels });
        }
        Ok(Model {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_sha256: manifest_sha256.to_string(),
            runner,
            max_body: max_body(&inputs),
            inputs,
            outputs,
            load_notes: notes,
            load_time: started.elapsed(),
            validation: String::new(),
            golden: None,
            backend: None,
            golden_other: None,
            inline_max_elements: 0,
            output_specs: output_specs(manifest),
        })
    }

    /// Runs the golden sample of the bundle in `dir` and compares every
    /// expected output within the manifest's tolerance; outputs must be finite.
    /// Checks the golden sample, then settles how requests run (the
    /// manifest's `executor`, measured on the sample when `auto`).
    pub fn validate(&mut self, dir: &Path, manifest: &Manifest) -> Result<String, ModelError> {
        let verdict = self.check_golden_sample(dir, manifest)?;
        let choice = manifest.model.executor.unwrap_or(outpost_protocol::Executor::Auto);
        let note = self.choose_executor(choice, dir, manifest);
        self.validation = format!("{verdict}; {note}");
        Ok(self.validation.clone())
    }

    fn check_golden_sample(&self, dir: &Path, manifest: &Manifest) -> Result<String, ModelError> {
        let Some(v) = &manifest.validation else {
            return Ok("no golden sample in the manifest: validation skipped".into());
        };
        let invalid = ModelError::Manifest;
        let input = std::fs::read(dir.join(&v.input)).map_err(|e| invalid(format!("{}: {e}", v.input)))?;
        let request = InferRequest::from_json(&input)
            .map_err(|e| invalid(format!("{}: not an inference request: {e}", v.input)))?;
        let expected_bytes =
            std::fs::read(dir.join(&v.expected)).map_err(|e| invalid(format!("{}: {e}", v.expected)))?;
        let expected: ExpectedOutputs = serde_json::from_slice(&expected_bytes)
            .map_err(|e| invalid(format!("{}: expected {{\"outputs\": [...]}}: {e}", v.expected)))?;
        let response = self
            .infer(&request)
            .map_err(|e| ModelError::Validation(format!("golden sample {} does not run: {e}", v.input)))?;
        compare_outputs(&expected.outputs, &response.outputs, v.tolerance).map_err(ModelError::Validation)
    }

    /// The largest request body this model's inputs can need, when every
    /// input dimension is fixed: 64 bytes per element (a JSON number with
    /// its separator and generous whitespace) plus 64 KiB for the rest.
    /// `None` when a dimension is dynamic (the configured cap applies).
    pub fn max_body_bytes(&self) -> Option<usize> {
        self.max_body
    }

    /// What validation settled about how this model runs, to apply to the
    /// same bundle loaded in another process (the agent, after an isolated
    /// validation) or after a restart (which does not revalidate).
    pub fn settled(&self) -> Settled {
        Settled {
            runtime: self.runtime(),
            backend: self.backend.clone(),
            multi_thread: self.threads() > 1,
            inline_max_elements: self.inline_max_elements,
            validation: self.validation.clone(),
        }
    }

    /// Loads the bundle in `dir` the way a validation of it settled (its
    /// engine, its threads) without running it.
    pub fn load_settled(
        dir: &Path,
        manifest: &Manifest,
        manifest_sha256: &str,
        s: &Settled,
    ) -> Result<Model, LoadError> {
        let cores = cores();
        // Single-threaded requests run side by side, one per onnxruntime
        // session; each session holds its own copy of the weights, so a big
        // model gets one (requests then take turns).
        let model_bytes = manifest.file(&manifest.model.file).map_or(u64::MAX, |f| f.size);
        let sessions = match s.multi_thread || model_bytes > SESSION_COPIES_MAX_BYTES {
            true => 1,
            false => cores.min(4),
        };
        let how = LoadAs { runtime: s.runtime, threads: if s.multi_thread { cores } else { 1 }, sessions };
        let mut model = Model::load_as(dir, manifest, manifest_sha256, how)?;
        model.settle(s);
        Ok(model)
    }

    /// Applies what a validation of this same bundle settled.
    // One variant in builds without the `onnxruntime` feature.
    #[allow(irrefutable_let_patterns)]
    pub fn settle(&mut self, s: &Settled) {
        if let Runner::Tract { executor, .. } = &mut self.runner {
            *executor = match s.multi_thread {
                true => thread_pool(cores()).unwrap_or(Executor::SingleThread),
                false => Executor::SingleThread,
            };
        }
        self.inline_max_elements = s.inline_max_elements;
        self.validation = s.validation.clone();
        self.backend = s.backend.clone();
    }

    /// The engine running this model.
    pub fn runtime(&self) -> Runtime {
        match &self.runner {
            Runner::Tract { .. } => Runtime::Tract,
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(_) => Runtime::Onnxruntime,
        }
    }

    /// Threads one request runs on.
    pub fn threads(&self) -> usize {
        match &self.runner {
            Runner::Tract { executor, .. } if matches!(executor, Executor::SingleThread) => 1,
            Runner::Tract { .. } => cores(),
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(s) => s.threads,
        }
    }

    /// The OIP `platform` of the model metadata (Triton's names).
    pub fn platform(&self) -> &'static str {
        match self.runtime() {
            Runtime::Onnxruntime => "onnxruntime_onnx",
            _ => "onnx_tract",
        }
    }

    /// Runs requests on every core (`multi`) or one thread each; false when
    /// this build cannot (tract without the `multithread` feature).
    fn set_multi(&mut self, multi: bool, dir: &Path, manifest: &Manifest) -> bool {
        let threads = if multi { cores() } else { 1 };
        match &mut self.runner {
            Runner::Tract { executor, .. } => match (multi, thread_pool(threads)) {
                (false, _) => *executor = Executor::SingleThread,
                (true, Some(pool)) => *executor = pool,
                (true, None) => return false,
            },
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(_) => {
                let how = LoadAs { runtime: Runtime::Onnxruntime, threads, sessions: 1 };
                match onnxruntime_runner(&dir.join(&manifest.model.file), manifest, how) {
                    Ok((runner, _)) => self.runner = runner,
                    Err(_) => return false,
                }
            }
        }
        let _ = (dir, manifest);
        true
    }

    /// Whether `req` is small enough to run on the calling thread (see `inline_max_elements`).
    pub fn runs_inline(&self, req: &InferRequest) -> bool {
        let elements: usize = req.inputs.iter().map(|t| t.data.len()).sum();
        elements > 0 && elements <= self.inline_max_elements
    }

    /// Drops the batch-1 plan, so every request runs on the symbolic-batch
    /// plan (for measuring what the batch-1 plan buys).
    #[allow(irrefutable_let_patterns)]
    pub fn without_batch_one_plan(mut self) -> Model {
        if let Runner::Tract { plan_one, .. } = &mut self.runner {
            *plan_one = None;
        }
        self
    }

    /// How requests run. `auto`: when one golden-sample run takes over
    /// [`MEASURE_ABOVE`] single-threaded, time it on every core too (tract's
    /// thread pool, onnxruntime's intra-op threads) and keep that only if it
    /// is clearly faster (small models lose to the dispatch cost, big
    /// convnets win). Records the golden sample's best time.
    fn choose_executor(&mut self, choice: outpost_protocol::Executor, dir: &Path, manifest: &Manifest) -> String {
        use outpost_protocol::Executor as Choice;
        let cores = cores();
        let sample = manifest
            .validation
            .as_ref()
            .and_then(|v| std::fs::read(dir.join(&v.input)).ok())
            .and_then(|b| InferRequest::from_json(&b).ok());
        let time = |m: &Model| -> Option<std::time::Duration> {
            let req = sample.as_ref()?;
            let mut best = std::time::Duration::MAX;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                m.infer(req).ok()?;
                best = best.min(t.elapsed());
            }
            Some(best)
        };
        match choice {
            Choice::SingleThread => {
                self.golden = time(self);
                return "single-threaded (manifest)".into();
            }
            Choice::MultiThread => {
                if !self.set_multi(true, dir, manifest) {
                    self.golden = time(self);
                    return NO_POOL.into();
                }
                self.golden = time(self);
                return format!("multi-threaded on {cores} cores (manifest)");
            }
            Choice::Auto => {}
        }
        let Some(single) = time(self) else { return "single-threaded".into() };
        self.golden = Some(single);
        if single < INLINE_BELOW
            && let Some(req) = &sample
        {
            // Up to 8 times the sample's size: at most ~0.8 ms on the calling thread.
            self.inline_max_elements = req.inputs.iter().map(|t| t.data.len().max(1)).sum::<usize>() * 8;
        }
        let single_only = || format!("single-threaded ({:.2} ms per golden sample)", single.as_secs_f64() * 1e3);
        if single < MEASURE_ABOVE || cores < 2 || !self.set_multi(true, dir, manifest) {
            return single_only();
        }
        let multi = time(self).unwrap_or(std::time::Duration::MAX);
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        if multi.as_secs_f64() * 1.2 < single.as_secs_f64() {
            self.golden = Some(multi);
            format!("multi-threaded on {cores} cores: {:.1} ms vs {:.1} ms single-threaded", ms(multi), ms(single))
        } else {
            self.set_multi(false, dir, manifest);
            format!("single-threaded: {:.1} ms vs {:.1} ms on {cores} cores", ms(single), ms(multi))
        }
    }

    /// Runs one request: checks names, types and shapes against the model,
    /// pre-processes, runs, post-processes.
    pub fn infer(&self, req: &InferRequest) -> Result<InferResponse, InferFailure> {
        self.run(req, Vec::new(), None)
    }

    /// [`Model::infer`] for a request the caller no longer needs: FP32
    /// inputs that go to the model as they are move into it instead of
    /// being copied (a 480x640 image is 3.7 MB).
    pub fn infer_owned(&self, mut req: InferRequest) -> Result<InferResponse, InferFailure> {
        let mut moved = Vec::with_capacity(req.inputs.len());
        let mut bad: Option<(String, usize)> = None;
        for t in req.inputs.iter_mut() {
            let slot = self.inputs.iter().find(|s| s.name == t.name);
            match (slot, &mut t.data) {
                (Some(slot), TensorData::F32(v)) if movable(slot, t.datatype, &t.shape, v.len()) => {
                    // Checked now: the data leaves the request.
                    if bad.is_none()
                        && let Some(j) = v.iter().position(|x| !x.is_finite())
                    {
                        bad = Some((t.name.clone(), j));
                    }
                    moved.push(Some(std::mem::take(v)));
                }
                _ => moved.push(None),
            }
        }
        let bad = bad.as_ref().map(|(n, j)| (n.as_str(), *j));
        self.run(&req, moved, bad)
    }

    /// Runs `req`; `moved[i]` is input i's data when it was moved out of it.
    fn run(
        &self,
        req: &InferRequest,
        mut moved: Vec<Option<Vec<f32>>>,
        moved_bad: Option<(&str, usize)>,
    ) -> Result<InferResponse, InferFailure> {
        for t in &req.inputs {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                let names: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(InferFailure::bad_input(format!(
                    "unknown input '{}': the model's inputs are {names:?}",
                    t.name
                )));
            }
        }
        let mut values = TVec::new();
        for slot in &self.inputs {
            let i = req.inputs.iter().position(|t| t.name == slot.name).ok_or_else(|| {
                InferFailure::bad_input(format!(
                    "missing input '{}' ({} {})",
                    slot.name,
                    slot.datatype,
                    shape_text(&slot.dims)
                ))
            })?;
            let t = &req.inputs[i];
            let tensor = match moved.get_mut(i).and_then(Option::take) {
                Some(data) => {
                    let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
                    tensor_of(&shape, data)
                        .map_err(|e| InferFailure::new(ErrorCode::Internal, format!("input '{}': {e:#}", t.name)))?
                }
                None => to_tensor(slot, t)?,
            };
            values.push(tensor.into_tvalue());
        }
        let requested: Option<Vec<&str>> = req.outputs.as_ref().map(|o| o.iter().map(|r| r.name.as_str()).collect());
        if let Some(names) = &requested {
            for n in names {
                if !self.outputs.iter().any(|o| o.name == *n || format!("{}_top_k", o.name) == *n) {
                    let have: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
                    return Err(InferFailure::bad_input(format!(
                        "unknown output '{n}': the model's outputs are {have:?}"
                    )));
                }
            }
        }
        let results = match &self.runner {
            Runner::Tract { plan, plan_one, executor } => {
                let plan = match plan_one {
                    Some(one) if values.iter().all(|v| v.shape().first() == Some(&1)) => one,
                    _ => plan,
                };
                tract_linalg::multithread::multithread_tract_scope(executor.clone(), || plan.run(values))
                    .map_err(|e| InferFailure::model(format!("model run failed: {e:#}")))?
            }
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(sessions) => sessions.run(values)?,
        };
        let mut outputs = Vec::new();
        for slot in &self.outputs {
            let value = results
                .get(slot.index)
                .ok_or_else(|| InferFailure::new(ErrorCode::Internal, "model returned too few outputs"))?;
            let (mut out, rows_cols) = from_tensor(&slot.name, value)?;
            if let OutData::Numbers(data) = &out.data
                && let Some(at) = data.first_non_finite()
            {
                return Err(non_finite(&slot.name, at, req, moved_bad));
            }
            if let Some(post) = &slot.postprocess {
                if post.softmax {
                    softmax_rows(&mut out.data, rows_cols.1);
                }
                if let Some(k) = post.top_k
                    && let Some(top) = top_k(slot, &out, rows_cols, k)
                {
                    let want_top = requested.as_ref().is_none_or(|n| n.contains(&top.name.as_str()));
                    let want_main = requested.as_ref().is_none_or(|n| n.contains(&slot.name.as_str()));
                    if want_main {
                        outputs.push(out);
                    }
                    if want_top {
                        outputs.push(top);
                    }
                    continue;
                }
            }
            if requested.as_ref().is_none_or(|n| n.contains(&slot.name.as_str())) {
                outputs.push(out);
            }
        }
        Ok(InferResponse {
            id: req.id.clone(),
            model_name: self.name.clone(),
            model_version: self.version.clone(),
            outputs,
            parameters: None,
        })
    }

    /// Output metadata as `(name, datatype, shape with -1 for dynamic)`, from the manifest.
    pub fn output_signature(&self) -> Vec<(String, &'static str, Vec<i64>)> {
        self.output_specs.clone()
    }

    /// Input metadata as `(name, datatype, shape with -1 for dynamic)`.
    pub fn input_signature(&self) -> Vec<(String, &'static str, Vec<i64>)> {
        self.inputs
            .iter()
            .map(|s| (s.name.clone(), s.datatype.as_str(), s.dims.iter().map(|d| d.map_or(-1, |n| n as i64)).collect()))
            .collect()
    }
}

/// The expected-outputs file of a golden sample.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct ExpectedOutputs {
    pub outputs: Vec<TensorOut>,
}

/// Compares expected with actual outputs; the error names the worst element.
pub fn compare_outputs(expected: &[TensorOut], actual: &[TensorOut], tolerance: f64) -> Result<String, String> {
    let mut worst_overall = 0.0f64;
    for e in expected {
        let a = actual
            .iter()
            .find(|a| a.name == e.name)
            .ok_or_else(|| format!("expected output '{}' was not produced", e.name))?;
        if a.shape != e.shape {
            return Err(format!("output '{}': expected shape {:?}, got {:?}", e.name, e.shape, a.shape));
        }
        match (&e.data, &a.data) {
            (OutData::Strings(x), OutData::Strings(y)) => {
                if let Some(i) = (0..x.len()).find(|i| x.get(*i) != y.get(*i)) {
                    return Err(format!(
                        "output '{}' element {i}: expected {:?}, got {:?}",
                        e.name,
                        x.get(i),
                        y.get(i)
                    ));
                }
            }
            (OutData::Numbers(x), OutData::Numbers(y)) => {
                if x.len() != y.len() {
                    return Err(format!("output '{}': expected {} values, got {}", e.name, x.len(), y.len()));
                }
                let mut worst: Option<(usize, f64, f64, f64)> = None;
                for i in 0..y.len() {
                    let (ev, av) = (x.get_f64(i).unwrap_or(f64::NAN), y.get_f64(i).unwrap_or(f64::NAN));
                    if !av.is_finite() {
                        return Err(format!(
                            "output '{}' element {i} is {av}, not a finite number (expected {ev})",
                            e.name
                        ));
                    }
                    let d = (ev - av).abs();
                    if worst.is_none_or(|w| d > w.3) {
                        worst = Some((i, ev, av, d));
                    }
                }
                if let Some((i, ev, av, d)) = worst {
                    if d > tolerance || d.is_nan() {
                        return Err(format!(
                            "output '{}' element {i}: expected {ev}, got {av} (|difference| {d:.3e} > tolerance {tolerance})",
                            e.name
                        ));
                    }
                    worst_overall = worst_overall.max(d);
                }
            }
            _ => {
                return Err(format!("output '{}': expected {}, got {}", e.name, kind(&e.data), kind(&a.data)));
            }
        }
    }
    Ok(format!(
        "golden sample reproduced: {} output(s), largest difference {worst_overall:.3e} (tolerance {tolerance})",
        expected.len()
    ))
}

fn kind(d: &OutData) -> &'static str {
    match d {
        OutData::Numbers(_) => "numbers",
        OutData::Strings(_) => "strings",
    }
}

/// Parses, types and optimises the model with input facts from the manifest
/// into a runnable plan. With `batch_one`, a dynamic first dimension
/// (the batch) is fixed to 1: tract optimises a concrete shape much better
/// (measured: one-sample requests 1.1x faster on the digits MLP, 2.5x on the CNN, see
/// `cargo bench -p outpost-sim --bench engine`).
fn build_plan(
    path: &Path,
    manifest: &Manifest,
    ignore_value_info: bool,
    batch_one: bool,
) -> Result<(Arc<TypedRunnableModel>, Vec<String>), LoadError> {
    let file = &manifest.model.file;
    let mut model =
        parse_onnx(path, ignore_value_info).map_err(|e| load_failed(format!("{file}: cannot parse ONNX: {e:#}")))?;
    let declared = graph_inputs(&model).map_err(|e| load_failed(format!("{file}: {e:#}")))?;
    let declared_names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
    if declared.len() != manifest.model.inputs.len()
        || manifest.model.inputs.iter().any(|t| !declared_names.contains(&t.name.as_str()))
    {
        let listed: Vec<&str> = manifest.model.inputs.iter().map(|t| t.name.as_str()).collect();
        return Err(ModelError::Manifest(format!(
            "{file}: the manifest lists inputs {listed:?}, the model has {declared_names:?}"
        )));
    }
    for (i, (name, fact)) in declared.iter().enumerate() {
        let Some(spec) = manifest.model.inputs.iter().find(|t| &t.name == name) else {
            continue;
        };
        let rank = fact.shape.dims().count();
        let want_rank = spec.preprocess.as_ref().and_then(|p| p.shape.as_ref()).map_or(spec.shape.len(), Vec::len);
        if !fact.shape.is_open() && rank != want_rank {
            return Err(ModelError::Manifest(format!(
                "{file}: input '{name}' has rank {rank} in the model, {want_rank} in the manifest"
            )));
        }
        let pre = spec.preprocess.as_ref();
        let model_dt = pre.and_then(|p| p.datatype).unwrap_or(spec.datatype);
        let mut model_shape = pre.and_then(|p| p.shape.clone()).unwrap_or_else(|| spec.shape.clone());
        if batch_one && model_shape.first() == Some(&-1) {
            model_shape[0] = 1;
        }
        fix_input(&mut model, i, datum_of(model_dt), &model_shape)
            .map_err(|e| load_failed(format!("{file}: input '{name}': {e:#}")))?;
    }
    let names = graph_output_names(&model).map_err(|e| load_failed(format!("{file}: {e:#}")))?;
    let optimized = model
        .into_optimized()
        .map_err(|e| load_failed(format!("{file}: cannot type and optimise the model: {e:#}")))?;
    let plan = optimized.into_runnable().map_err(|e| load_failed(format!("{file}: cannot plan the model: {e:#}")))?;
    Ok((plan, names))
}

/// tract's plans for a model: the one for any batch and, for one-sample
/// requests, one with the batch fixed to 1; and the model's output names.
fn tract_runner(
    path: &Path,
    manifest: &Manifest,
    how: LoadAs,
    notes: &mut Vec<String>,
) -> Result<(Runner, Vec<String>), ModelError> {
    let file = &manifest.model.file;
    let first = build_plan(path, manifest, false, false);
    let mut ignore_value_info = false;
    let (plan, outputs_named) = match first {
        Ok(p) => p,
        Err(first_err) => {
            // Third-party exports often carry value_info shapes that clash with
            // concrete inputs ("Impossible to unify ..."); they load without it.
            match build_plan(path, manifest, true, false) {
                Ok(p) => {
                    notes.push(format!("loaded with the file's value_info ignored (it clashed: {})", first_err));
                    ignore_value_info = true;
                    p
                }
                Err(_) => return Err(first_err),
            }
        }
    };
    // One-sample requests are the common case at the edge: a second plan
    // with the batch fixed to 1 serves them (for models small enough that
    // two plans are cheap).
    let batched = manifest
        .model
        .inputs
        .iter()
        .any(|t| t.preprocess.as_ref().and_then(|p| p.shape.as_ref()).unwrap_or(&t.shape).first() == Some(&-1));
    let model_bytes = manifest.file(file).map_or(u64::MAX, |f| f.size);
    let plan_one = if batched && model_bytes <= BATCH_ONE_PLAN_MAX_BYTES {
        match build_plan(path, manifest, ignore_value_info, true) {
            Ok((p, _)) => Some(p),
            Err(e) => {
                notes.push(format!("no batch-1 plan ({})", e));
                None
            }
        }
    } else {
        None
    };
    let executor = match how.threads > 1 {
        true => thread_pool(how.threads).unwrap_or(Executor::SingleThread),
        false => Executor::SingleThread,
    };
    Ok((Runner::Tract { plan, plan_one, executor }, outputs_named))
}

/// ONNX Runtime sessions for a model (the library from `runtime.onnxruntime_library`).
#[cfg(feature = "onnxruntime")]
fn onnxruntime_runner(path: &Path, manifest: &Manifest, how: LoadAs) -> Result<(Runner, Vec<String>), ModelError> {
    let library = crate::serve::backend::library().map_err(|e| load_failed(format!("onnxruntime unavailable: {e}")))?;
    let inputs: Vec<(String, Datatype, Vec<i64>)> = manifest
        .model
        .inputs
        .iter()
        .map(|t| {
            let pre = t.preprocess.as_ref();
            let dt = pre.and_then(|p| p.datatype).unwrap_or(t.datatype);
            (t.name.clone(), dt, pre.and_then(|p| p.shape.clone()).unwrap_or_else(|| t.shape.clone()))
        })
        .collect();
    let outputs: Vec<String> = manifest.model.outputs.iter().map(|t| t.name.clone()).collect();
    let sessions =
        crate::serve::onnxruntime::Sessions::load(&library, path, &inputs, &outputs, how.threads, how.sessions)?;
    let names = sessions.outputs.clone();
    Ok((Runner::Onnxruntime(sessions), names))
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime_runner(_: &Path, _: &Manifest, _: LoadAs) -> Result<(Runner, Vec<String>), ModelError> {
    Err(load_failed(format!("onnxruntime unavailable: {}", crate::serve::backend::NOT_BUILT)))
}

/// Whether a request's FP32 data of this type and shape goes to the model
/// as it is (no cast, pre-processing or new layout): what `build_tensor`
/// would accept unchanged.
fn movable(slot: &InputSlot, datatype: Datatype, shape: &[i64], len: usize) -> bool {
    let fits = shape.len() == slot.dims.len()
        && shape.iter().zip(&slot.dims).all(|(g, e)| *g >= 0 && e.is_none_or(|e| *g as usize == e));
    let count = shape.iter().try_fold(1usize, |a, d| a.checked_mul(usize::try_from(*d).ok()?));
    datatype == slot.datatype
        && slot.model_datatype == Datatype::Fp32
        && slot.preprocess.is_none()
        && slot.reshape.is_none()
        && fits
        && count == Some(len)
}

/// The model's input tensor for a request tensor: checked against what
/// clients must send, cast to the model's type and pre-processed, then laid
/// out in the model's shape.
fn to_tensor(slot: &InputSlot, t: &outpost_protocol::TensorIn) -> Result<Tensor, InferFailure> {
    let tensor = build_tensor(slot, t)?;
    let Some(target) = &slot.reshape else { return Ok(tensor) };
    let total = tensor.len();
    let known: usize = target.iter().filter(|d| **d > 0).map(|d| *d as usize).product::<usize>().max(1);
    let shape: Vec<usize> = target.iter().map(|d| if *d > 0 { *d as usize } else { total / known }).collect();
    if shape.iter().product::<usize>() != total {
        return Err(InferFailure::bad_input(format!(
            "input '{}': {total} values do not fit the model's shape {target:?}",
            slot.name
        )));
    }
    tensor
        .into_shape(&shape)
        .map_err(|e| InferFailure::new(ErrorCode::Internal, format!("input '{}': {e:#}", slot.name)))
}

fn build_tensor(slot: &InputSlot, t: &outpost_protocol::TensorIn) -> Result<Tensor, InferFailure> {
    let name = &slot.name;
    if t.datatype != slot.datatype {
        return Err(InferFailure::bad_input(format!(
            "input '{name}': expected datatype {}, got {}",
            slot.datatype, t.datatype
        )));
    }
    let shape_ok = t.shape.len() == slot.dims.len()
        && t.shape.iter().zip(&slot.dims).all(|(g, e)| e.is_none_or(|e| *g as usize == e));
    if !shape_ok {
        return Err(InferFailure::bad_input(format!(
            "input '{name}': expected shape {}, got {:?}",
            shape_text(&slot.dims),
            t.shape
        )));
    }
    let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
    let count = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).unwrap_or(usize::MAX);
    if count != t.data.len() {
        return Err(InferFailure::bad_input(format!(
            "input '{name}': shape {:?} needs {count} values, got {}",
            t.shape,
            t.data.len()
        )));
    }
    let bad =
        |what: &str| InferFailure::bad_input(format!("input '{name}': expected {} data, got {what}", slot.datatype));
    // Integers sent for a float model (UINT8 pixels, say): checked as the
    // integers they claim to be, then converted with the floats.
    if !slot.datatype.is_float() && slot.datatype != Datatype::Bool && slot.model_datatype.is_float() {
        check_ints(name, slot.datatype, &t.data)?;
    }
    let dt = slot.model_datatype;
    // FP32 in, FP32 to the model, nothing to do to it (binary tensors, big
    // images): one copy, no pass through f64.
    if let (TensorData::F32(x), None, Datatype::Fp32) = (&t.data, &slot.preprocess, dt) {
        return tensor_of(&shape, x.clone())
            .map_err(|e| InferFailure::new(ErrorCode::Internal, format!("input '{name}': {e:#}")));
    }
    let tensor = if dt.is_float() {
        // One pass from the request's numbers to the model's type; a copy in
        // f64 only when pre-processing needs one.
        let owned;
        let v: &[f64] = match (&t.data, &slot.preprocess) {
            (TensorData::Bool(_), _) => return Err(bad("booleans")),
            (TensorData::F64(x), None) => x,
            (other, pre) => {
                let mut o = other.to_f64_vec();
                if let Some(p) = pre {
                    preprocess(&mut o, &shape, p);
                }
                owned = o;
                &owned
            }
        };
        match dt {
            Datatype::Fp64 => tensor_of(&shape, v.to_vec()),
            _ => {
                // A number finite in JSON but not in the model's datatype
                // (1e300 as FP32) is the client's error: sent on, it would
                // turn the model's output non-finite and count against it.
                // One pass: cast, and find the first number that did not fit.
                let largest = if dt == Datatype::Fp16 { 65504.0 } else { f64::from(f32::MAX) };
                let mut overflow = None;
                let cast: Vec<f32> = v
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        if overflow.is_none() && x.abs() > largest && x.is_finite() {
                            overflow = Some((i, *x));
                        }
                        *x as f32
                    })
                    .collect();
                if let Some((i, x)) = overflow {
                    return Err(InferFailure::bad_input(format!(
                        "input '{name}': value {x:e} at element {i} does not fit {dt} (largest magnitude {largest:e}); send it in range or scaled"
                    )));
                }
                let t = tensor_of(&shape, cast);
                if dt == Datatype::Fp16 {
                    t.and_then(|t| t.cast_to_dt(DatumType::F16).map(|c| c.into_owned()))
                } else {
                    t
                }
            }
        }
    } else if dt == Datatype::Bool {
        match &t.data {
            TensorData::Bool(b) => Tensor::from_shape(&shape, b),
            TensorData::I64(i) if i.iter().all(|x| *x == 0 || *x == 1) => {
                let b: Vec<bool> = i.iter().map(|x| *x == 1).collect();
                tensor_of(&shape, b)
            }
            _ => return Err(bad("values other than true/false")),
        }
    } else {
        let ints: Vec<i64> = match &t.data {
            TensorData::I64(i) => i.clone(),
            TensorData::U64(u) => u.iter().map(|x| *x as i64).collect(),
            TensorData::Bool(_) => return Err(bad("booleans")),
            TensorData::F32(_) | TensorData::F64(_) => {
                let f = t.data.to_f64_vec();
                if let Some(x) = f.iter().find(|x| x.fract() != 0.0 || !x.is_finite()) {
                    return Err(bad(&format!("a non-integer value {x}")));
                }
                f.iter().map(|x| *x as i64).collect()
            }
        };
        in_range(name, slot.datatype, &ints)?;
        tensor_of(&shape, ints).and_then(|t| t.cast_to_dt(datum_of(dt)).map(|c| c.into_owned()))
    };
    tensor.map_err(|e| InferFailure::new(ErrorCode::Internal, format!("input '{name}': {e:#}")))
}

/// A tensor that takes ownership of `v` (no copy).
/// Integer data must be whole numbers within the range of `dt`.
fn check_ints(name: &str, dt: Datatype, data: &TensorData) -> Result<(), InferFailure> {
    let ints: Vec<i64> = match data {
        TensorData::I64(i) => i.clone(),
        TensorData::U64(u) => u.iter().map(|x| (*x).min(i64::MAX as u64) as i64).collect(),
        TensorData::Bool(_) => {
            return Err(InferFailure::bad_input(format!("input '{name}': expected {dt} data, got booleans")));
        }
        TensorData::F32(_) | TensorData::F64(_) => {
            let f = data.to_f64_vec();
            if let Some(x) = f.iter().find(|x| x.fract() != 0.0 || !x.is_finite()) {
                return Err(InferFailure::bad_input(format!(
                    "input '{name}': expected {dt} data, got a non-integer value {x}"
                )));
            }
            f.iter().map(|x| *x as i64).collect()
        }
    };
    in_range(name, dt, &ints)
}

fn in_range(name: &str, dt: Datatype, ints: &[i64]) -> Result<(), InferFailure> {
    let (lo, hi): (i64, i64) = match dt {
        Datatype::Uint8 => (0, u8::MAX as i64),
        Datatype::Uint16 => (0, u16::MAX as i64),
        Datatype::Uint32 => (0, u32::MAX as i64),
        Datatype::Uint64 => (0, i64::MAX),
        Datatype::Int8 => (i8::MIN as i64, i8::MAX as i64),
        Datatype::Int16 => (i16::MIN as i64, i16::MAX as i64),
        Datatype::Int32 => (i32::MIN as i64, i32::MAX as i64),
        _ => (i64::MIN, i64::MAX),
    };
    match ints.iter().enumerate().find(|(_, x)| **x < lo || **x > hi) {
        Some((i, x)) => Err(InferFailure::bad_input(format!(
            "input '{name}' element {i}: {x} is out of range for {dt} ({lo}..={hi})"
        ))),
        None => Ok(()),
    }
}

fn tensor_of<T: Datum>(shape: &[usize], v: Vec<T>) -> TractResult<Tensor> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, v)?.into())
}

/// `x * scale`, then `(x - mean) / std`, per channel (dimension 1) when the
/// lists are as long as that dimension, else with their first value.
fn preprocess(v: &mut [f64], shape: &[usize], p: &Preprocess) {
    if let Some(s) = p.scale {
        v.iter_mut().for_each(|x| *x *= s);
    }
    if p.mean.is_none() && p.std.is_none() {
        return;
    }
    let channels = shape.get(1).copied().unwrap_or(1).max(1);
    let inner: usize = shape.iter().skip(2).product::<usize>().max(1);
    let pick = |list: &Option<Vec<f64>>, c: usize, default: f64| match list {
        Some(l) if l.len() == channels => l[c],
        Some(l) => l.first().copied().unwrap_or(default),
        None => default,
    };
    for (i, x) in v.iter_mut().enumerate() {
        let c = if shape.len() >= 2 { (i / inner) % channels } else { 0 };
        *x = (*x - pick(&p.mean, c, 0.0)) / pick(&p.std, c, 1.0);
    }
}

/// Converts a model output; also returns (rows, last-axis length) for post-processing.
fn from_tensor(name: &str, value: &TValue) -> Result<(TensorOut, (usize, usize)), InferFailure> {
    let shape: Vec<usize> = value.shape().to_vec();
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = value.len() / cols;
    let internal = |e: TractError| InferFailure::new(ErrorCode::Internal, format!("output '{name}': {e:#}"));
    let dt = value.datum_type();
    let (data, datatype) = match dt {
        DatumType::F32 => (TensorData::F32(plain::<f32>(value).map_err(internal)?), "FP32"),
        DatumType::F64 => (TensorData::F64(plain::<f64>(value).map_err(internal)?), "FP64"),
        DatumType::F16 => {
            let c = value.cast_to::<f32>().map_err(internal)?;
            (TensorData::F32(plain::<f32>(&c).map_err(internal)?), "FP32")
        }
        DatumType::Bool => (TensorData::Bool(plain::<bool>(value).map_err(internal)?), "BOOL"),
        DatumType::U64 => (TensorData::U64(plain::<u64>(value).map_err(internal)?), "UINT64"),
        other => {
            let c = value.cast_to::<i64>().map_err(internal)?;
            let label = datatype_of(other).map_or("INT64", Datatype::as_str);
            (TensorData::I64(plain::<i64>(&c).map_err(internal)?), label)
        }
    };
    Ok((
        TensorOut { name: name.to_string(), shape, datatype: datatype.to_string(), data: OutData::Numbers(data) },
        (rows, cols),
    ))
}

fn plain<D: Datum + Clone>(t: &Tensor) -> TractResult<Vec<D>> {
    Ok(t.try_as_plain_ram()?.as_slice::<D>()?.to_vec())
}

fn softmax_rows(data: &mut OutData, cols: usize) {
    let OutData::Numbers(TensorData::F32(v)) = data else {
        return;
    };
    for row in v.chunks_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        row.iter_mut().for_each(|x| *x /= sum);
    }
}

/// What infer can answer, for the model metadata: every output the manifest
/// declares, then the `{name}_top_k` output of each one with a `top_k`
/// postprocess (`BYTES` labels with a labels file, else `INT64` indices; one
/// row per row of the output, `k` columns).
fn output_specs(manifest: &Manifest) -> Vec<(String, &'static str, Vec<i64>)> {
    let declared = manifest.model.outputs.iter().map(|t| (t.name.clone(), t.datatype.as_str(), t.shape.clone()));
    let top_k = manifest.model.outputs.iter().filter_map(|t| {
        let post = t.postprocess.as_ref()?;
        let k = post.top_k? as i64;
        let (cols, lead) = t.shape.split_last().map_or((-1, &[][..]), |(c, l)| (*c, l));
        let rows = if lead.iter().any(|d| *d < 0) { -1 } else { lead.iter().product::<i64>() };
        let k = if cols >= 0 { k.min(cols) } else { k };
        let datatype = if post.labels.is_some() { "BYTES" } else { Datatype::Int64.as_str() };
        Some((format!("{}_top_k", t.name), datatype, vec![rows, k]))
    });
    declared.chain(top_k).collect()
}

/// The k best classes per row, as labels when the bundle has a labels file,
/// else as class indices.
fn top_k(slot: &OutputSlot, out: &TensorOut, (rows, cols): (usize, usize), k: usize) -> Option<TensorOut> {
    let OutData::Numbers(data) = &out.data else {
        return None;
    };
    let k = k.min(cols);
    let mut labels = Vec::with_capacity(rows * k);
    let mut indices = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let mut idx: Vec<usize> = (0..cols).collect();
        let val = |i: usize| data.get_f64(r * cols + i).unwrap_or(f64::NEG_INFINITY);
        idx.sort_by(|a, b| val(*b).total_cmp(&val(*a)));
        for &i in idx.iter().take(k) {
            indices.push(i as i64);
            labels.push(slot.labels.as_ref().and_then(|l| l.get(i).cloned()).unwrap_or_else(|| i.to_string()));
        }
    }
    let (data, datatype) = if slot.labels.is_some() {
        (OutData::Strings(labels), "BYTES")
    } else {
        (OutData::Numbers(TensorData::I64(indices)), "INT64")
    };
    Some(TensorOut { name: format!("{}_top_k", slot.name), shape: vec![rows, k], datatype: datatype.into(), data })
}
