//! ONNX Runtime as a second inference engine (the `onnxruntime` cargo
//! feature), through the `ort` crate with the library opened at run time
//! from `runtime.onnxruntime_library`.
//!
//! The library is process-wide: it is opened once, on first use, and a
//! failure to open it is kept (ort panics on any call once its library
//! failed to load, so nothing here touches ort unless the open succeeded).
//! A model's sessions run one request each at a time (`Session::run` takes
//! `&mut self`): a model keeps a small pool of them.
//!
//! Containment: the first use of the library for a deployment happens in
//! the isolated validation child (`deploy::isolate`): a library whose
//! initialisers crash, or a model that crashes it, ends the child, not the
//! agent. The agent opens the library only once a child has loaded it.

use crate::serve::model::{InferFailure, ModelError};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use outpost_protocol::Datatype;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};
use tract_onnx::prelude::{DatumType, IntoTValue, TValue, TVec, Tensor, f16};

static LIBRARY: OnceLock<(PathBuf, Result<ort::environment::Environment, String>)> = OnceLock::new();

/// Opens the library at `path` (once per process; a later call with another
/// path gets an error naming the one in use). The error says why, in words
/// an operator can act on.
pub fn environment(path: &Path) -> Result<&'static ort::environment::Environment, String> {
    let (opened, env) = LIBRARY.get_or_init(|| (path.to_path_buf(), open(path)));
    if opened != path {
        return Err(format!(
            "the agent already opened {} (runtime.onnxruntime_library changed: restart the agent)",
            opened.display()
        ));
    }
    env.as_ref().map_err(Clone::clone)
}

fn open(path: &Path) -> Result<ort::environment::Environment, String> {
    if !path.is_file() {
        return Err(format!(
            "{} does not exist (runtime.onnxruntime_library; the `onnxruntime` wheel from PyPI ships it as onnxruntime/capi/libonnxruntime.so.VERSION)",
            path.display()
        ));
    }
    let builder = ort::init_from(path).map_err(|e| {
        // The Display of a dlopen failure hides dlerror's reason; its source has it.
        let why = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        format!("cannot open {}: {e}{why}", path.display())
    })?;
    builder.with_name("outpost").build().map_err(|e| format!("{}: cannot start ONNX Runtime: {e}", path.display()))
}

/// A model's sessions: each runs one request at a time; requests beyond
/// the pool wait for one to be free.
pub struct Sessions {
    /// Idle sessions, each with its run options (which outputs to compute).
    free: Mutex<Vec<(Session, RunOptions<HasSelectedOutputs>)>>,
    returned: Condvar,
    /// Input names in the order of the manifest's inputs (as `infer` passes them).
    inputs: Vec<String>,
    /// The outputs the manifest names, in its order: the only ones computed.
    pub outputs: Vec<String>,
    /// Each input's dimensions as the model declares them (-1: any).
    pub input_dims: Vec<(String, Vec<i64>)>,
    /// Threads one request runs on.
    pub threads: usize,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("outputs", &self.outputs).field("threads", &self.threads).finish()
    }
}

fn session(env: &ort::environment::Environment, path: &Path, threads: usize) -> Result<Session, ModelError> {
    let file = path.display();
    let failed = |e: ort::Error| ModelError::Load(format!("{file}: onnxruntime cannot load the model: {e}"));
    // Every graph optimisation, as ONNX Runtime's own default (ORT_ENABLE_ALL)
    // and Python's. A builder error carries the builder back: only its
    // message is kept.
    let failed_with = |e: ort::Error<ort::session::builder::SessionBuilder>| failed(e.into());
    let mut builder = Session::builder(env)
        .map_err(failed)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(failed_with)?
        .with_intra_threads(threads)
        .map_err(failed_with)?
        .with_inter_threads(1)
        .map_err(failed_with)?
        .with_parallel_execution(false)
        .map_err(failed_with)?
        // Idle threads sleep instead of spinning: an edge device's cores
        // are shared with everything else it runs.
        .with_intra_op_spinning(false)
        .map_err(failed_with)?;
    builder.commit_from_file(path).map_err(failed)
}

/// The element type Outpost serves for an ONNX Runtime tensor type.
fn datatype(t: TensorElementType) -> Option<Datatype> {
    Some(match t {
        TensorElementType::Float32 => Datatype::Fp32,
        TensorElementType::Float64 => Datatype::Fp64,
        TensorElementType::Float16 => Datatype::Fp16,
        TensorElementType::Int8 => Datatype::Int8,
        TensorElementType::Int16 => Datatype::Int16,
        TensorElementType::Int32 => Datatype::Int32,
        TensorElementType::Int64 => Datatype::Int64,
        TensorElementType::Uint8 => Datatype::Uint8,
        TensorElementType::Uint16 => Datatype::Uint16,
        TensorElementType::Uint32 => Datatype::Uint32,
        TensorElementType::Uint64 => Datatype::Uint64,
        TensorElementType::Bool => Datatype::Bool,
        _ => return None,
    })
}

/// Name, element type and shape (-1 dynamic) of each input and output.
pub type Signature = (Vec<(String, Datatype, Vec<i64>)>, Vec<(String, Datatype, Vec<i64>)>);

fn describe(s: &Session, file: &Path) -> Result<Signature, ModelError> {
    let mut sides = [Vec::new(), Vec::new()];
    for (side, list, what) in [(0, s.inputs(), "input"), (1, s.outputs(), "output")] {
        for o in list {
            let name = o.name().to_string();
            match o.dtype() {
                ValueType::Tensor { ty, shape, .. } => match datatype(*ty) {
                    Some(dt) => {
                        let dims = shape.iter().map(|d| if *d < 0 { -1 } else { *d }).collect();
                        sides[side].push((name, dt, dims));
                    }
                    // An output no manifest names may be of any type: marked, refused where used.
                    None if side == 1 => sides[side].push((name, Datatype::Fp32, vec![i64::MIN])),
                    None => {
                        return Err(ModelError::Load(format!(
                            "{}: {what} '{name}' has type {ty:?}, which Outpost cannot serve",
                            file.display()
                        )));
                    }
                },
                // A sequence or a map: marked, refused where it is used.
                _ => sides[side].push((name, Datatype::Fp32, vec![i64::MIN])),
            }
        }
    }
    let [inputs, outputs] = sides;
    Ok((inputs, outputs))
}

/// The inputs and outputs of the model file at `path` (for `register`).
pub fn read_signature(library: &Path, path: &Path) -> Result<Signature, ModelError> {
    let env = environment(library).map_err(ModelError::Load)?;
    let s = session(env, path, 1)?;
    let (inputs, outputs) = describe(&s, path)?;
    let file = path.display();
    if let Some((name, ..)) = inputs.iter().chain(&outputs).find(|(_, _, d)| d.first() == Some(&i64::MIN)) {
        return Err(ModelError::Load(format!(
            "{file}: '{name}' is not a tensor of a type Outpost serves (a string, or a sequence or map such as skl2onnx's ZipMap: convert with options={{id(model): {{'zipmap': False}}}})"
        )));
    }
    Ok((inputs, outputs))
}

impl Sessions {
    /// Loads the model at `path` into `pool` sessions of `threads` threads,
    /// checked against the manifest's inputs (`(name, datatype and shape
    /// the model takes)`) and the outputs it names.
    pub fn load(
        library: &Path,
        path: &Path,
        inputs: &[(String, Datatype, Vec<i64>)],
        outputs: &[String],
        threads: usize,
        pool: usize,
    ) -> Result<Sessions, ModelError> {
        let env = environment(library).map_err(|e| ModelError::Load(format!("onnxruntime unavailable: {e}")))?;
        let first = session(env, path, threads)?;
        let (declared, produced) = describe(&first, path)?;
        let file = path.display();
        let names: Vec<&str> = declared.iter().map(|(n, ..)| n.as_str()).collect();
        if declared.len() != inputs.len() || inputs.iter().any(|(n, ..)| !names.contains(&n.as_str())) {
            let listed: Vec<&str> = inputs.iter().map(|(n, ..)| n.as_str()).collect();
            return Err(ModelError::Manifest(format!(
                "{file}: the manifest lists inputs {listed:?}, the model has {names:?}"
            )));
        }
        for (name, want, shape) in inputs {
            let Some((_, dt, dims)) = declared.iter().find(|(n, ..)| n == name) else { continue };
            if dims.first() == Some(&i64::MIN) {
                return Err(ModelError::Load(format!("{file}: input '{name}' is not a tensor")));
            }
            if dt != want {
                return Err(ModelError::Manifest(format!(
                    "{file}: input '{name}' is {dt} in the model, {want} in the manifest (preprocess.datatype)"
                )));
            }
            if dims.len() != shape.len() {
                return Err(ModelError::Manifest(format!(
                    "{file}: input '{name}' has rank {} in the model, {} in the manifest",
                    dims.len(),
                    shape.len()
                )));
            }
            // A size the model fixes must be the manifest's (a -1 there is
            // narrowed to it: clients get bad_input, not a model failure).
            if let Some(j) = (0..dims.len()).find(|j| dims[*j] >= 0 && shape[*j] >= 0 && dims[*j] != shape[*j]) {
                return Err(ModelError::Manifest(format!(
                    "{file}: input '{name}' dimension {j} is {} in the model, {} in the manifest",
                    dims[j], shape[j]
                )));
            }
        }
        let produced_names: Vec<String> = produced.iter().map(|(n, ..)| n.clone()).collect();
        for name in outputs {
            match produced.iter().find(|(n, ..)| n == name) {
                None => {
                    return Err(ModelError::Manifest(format!(
                        "{file}: manifest output '{name}' is not an output of the model, which has {produced_names:?}"
                    )));
                }
                Some((_, _, d)) if d.first() == Some(&i64::MIN) => {
                    return Err(ModelError::Load(format!(
                        "{file}: output '{name}' is not a tensor of a type Outpost serves (a string, or a sequence or map such as skl2onnx's ZipMap: convert with options={{id(model): {{'zipmap': False}}}})"
                    )));
                }
                Some(_) => {}
            }
        }
        let options = || -> Result<RunOptions<HasSelectedOutputs>, ModelError> {
            let selector = outputs.iter().fold(OutputSelector::no_default(), |s, name| s.with(name.clone()));
            Ok(RunOptions::new()
                .map_err(|e| ModelError::Load(format!("{file}: onnxruntime: {e}")))?
                .with_outputs(selector))
        };
        let mut free = vec![(first, options()?)];
        for _ in 1..pool.max(1) {
            free.push((session(env, path, threads)?, options()?));
        }
        Ok(Sessions {
            free: Mutex::new(free),
            returned: Condvar::new(),
            inputs: inputs.iter().map(|(n, ..)| n.clone()).collect(),
            outputs: outputs.to_vec(),
            input_dims: declared.into_iter().map(|(n, _, d)| (n, d)).collect(),
            threads,
        })
    }

    /// Runs one request: `values` in the manifest's input order; the
    /// outputs come back in the model's output order.
    pub fn run(&self, values: TVec<TValue>) -> Result<TVec<TValue>, InferFailure> {
        let mut lent = Lent { pool: self, session: None };
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            while lent.session.is_none() {
                match free.pop() {
                    Some(s) => lent.session = Some(s),
                    None => free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner()),
                }
            }
        }
        let (session, options) = lent.session.as_mut().ok_or_else(|| InferFailure::model("no onnxruntime session"))?;
        self.run_on(session, options, &values)
    }

    fn run_on(
        &self,
        session: &mut Session,
        options: &RunOptions<HasSelectedOutputs>,
        values: &[TValue],
    ) -> Result<TVec<TValue>, InferFailure> {
        let failed = |e: ort::Error| InferFailure::model(format!("model run failed: {e}"));
        let mut inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(values.len());
        for (name, v) in self.inputs.iter().zip(values) {
            inputs.push((name.as_str(), input(v).map_err(failed)?));
        }
        let outputs = session.run_with_options(inputs, options).map_err(failed)?;
        let mut out = TVec::new();
        for name in &self.outputs {
            let v = outputs
                .get(name.as_str())
                .ok_or_else(|| InferFailure::model(format!("model run failed: no output '{name}'")))?;
            out.push(output(v).map_err(failed)?.into_tvalue());
        }
        Ok(out)
    }
}

/// A session out of the pool, given back however the run ends (a panic too).
struct Lent<'a> {
    pool: &'a Sessions,
    session: Option<(Session, RunOptions<HasSelectedOutputs>)>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.pool.free.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            self.pool.returned.notify_one();
        }
    }
}

/// A borrowed view of a tract tensor for ONNX Runtime (no copy).
fn input(t: &Tensor) -> ort::Result<ort::session::SessionInputValue<'_>> {
    let shape: Vec<usize> = t.shape().to_vec();
    macro_rules! view {
        ($ty:ty) => {{
            let data =
                t.try_as_plain_ram().and_then(|p| p.as_slice::<$ty>()).map_err(|e| ort::Error::new(e.to_string()))?;
            TensorRef::from_array_view((shape, data))?.into()
        }};
    }
    Ok(match t.datum_type() {
        DatumType::F32 => view!(f32),
        DatumType::F64 => view!(f64),
        DatumType::F16 => view!(f16),
        DatumType::I8 => view!(i8),
        DatumType::I16 => view!(i16),
        DatumType::I32 => view!(i32),
        DatumType::I64 => view!(i64),
        DatumType::U8 => view!(u8),
        DatumType::U16 => view!(u16),
        DatumType::U32 => view!(u32),
        DatumType::U64 => view!(u64),
        DatumType::Bool => view!(bool),
        other => return Err(ort::Error::new(format!("input of type {other:?}"))),
    })
}

/// An ONNX Runtime output as a tract tensor (one copy).
fn output(v: &DynValue) -> ort::Result<Tensor> {
    macro_rules! copy {
        ($ty:ty) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>()?;
            let dims: Vec<usize> = shape.iter().map(|d| (*d).max(0) as usize).collect();
            Tensor::from_shape(&dims, data).map_err(|e| ort::Error::new(e.to_string()))?
        }};
    }
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(ort::Error::new(format!("an output of type {} (not a tensor)", v.dtype())));
    };
    Ok(match ty {
        TensorElementType::Float32 => copy!(f32),
        TensorElementType::Float64 => copy!(f64),
        TensorElementType::Float16 => copy!(f16),
        TensorElementType::Int8 => copy!(i8),
        TensorElementType::Int16 => copy!(i16),
        TensorElementType::Int32 => copy!(i32),
        TensorElementType::Int64 => copy!(i64),
        TensorElementType::Uint8 => copy!(u8),
        TensorElementType::Uint16 => copy!(u16),
        TensorElementType::Uint32 => copy!(u32),
        TensorElementType::Uint64 => copy!(u64),
        TensorElementType::Bool => copy!(bool),
        other => return Err(ort::Error::new(format!("an output of type {other:?}"))),
    })
}
