//! KServe Open Inference Protocol v2 (JSON) request and response bodies, the
//! same over MQTT (`infer` / `predictions`) and the local HTTP port.

use crate::{ErrorCode, ProtocolError, parse_json};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Tensor element types of the Open Inference Protocol that Outpost serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Datatype {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    Uint8,
    #[serde(rename = "UINT16")]
    Uint16,
    #[serde(rename = "UINT32")]
    Uint32,
    #[serde(rename = "UINT64")]
    Uint64,
    #[serde(rename = "INT8")]
    Int8,
    #[serde(rename = "INT16")]
    Int16,
    #[serde(rename = "INT32")]
    Int32,
    #[serde(rename = "INT64")]
    Int64,
    #[serde(rename = "FP16")]
    Fp16,
    #[serde(rename = "FP32")]
    Fp32,
    #[serde(rename = "FP64")]
    Fp64,
}

impl Datatype {
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64)
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flat tensor contents in row-major order. On input the protocol allows flat
/// or nested arrays; both parse to the same flat list. Integers stay exact
/// (`I64`) unless a float appears, which turns the list into `F64`.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f64 (for comparisons and pre-processing).
    /// Index of the first NaN or infinity (floating-point data only).
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
            _ => None,
        }
    }

    pub fn get_f64(&self, i: usize) -> Option<f64> {
        Some(match self {
            TensorData::Bool(v) => f64::from(u8::from(*v.get(i)?)),
            TensorData::I64(v) => *v.get(i)? as f64,
            TensorData::U64(v) => *v.get(i)? as f64,
            TensorData::F32(v) => f64::from(*v.get(i)?),
            TensorData::F64(v) => *v.get(i)?,
        })
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            TensorData::Bool(v) => v.iter().map(|x| f64::from(u8::from(*x))).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::U64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::F64(v) => v.clone(),
        }
    }
}

impl Serialize for TensorData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TensorData::Bool(v) => v.serialize(s),
            TensorData::I64(v) => v.serialize(s),
            TensorData::U64(v) => v.serialize(s),
            TensorData::F32(v) => v.serialize(s),
            TensorData::F64(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut acc = Acc::Empty;
        Flatten { acc: &mut acc, depth: 0 }.deserialize(d)?;
        Ok(match acc {
            Acc::Empty => TensorData::F64(Vec::new()),
            Acc::Bool(v) => TensorData::Bool(v),
            Acc::Int(v) => TensorData::I64(v),
            Acc::Float(v) => TensorData::F64(v),
        })
    }
}

enum Acc {
    Empty,
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Float(Vec<f64>),
}

impl Acc {
    fn push_int(&mut self, x: i64) -> Result<(), &'static str> {
        match self {
            Acc::Empty => *self = Acc::Int(vec![x]),
            Acc::Int(v) => v.push(x),
            Acc::Float(v) => v.push(x as f64),
            Acc::Bool(_) => return Err("a mix of booleans and numbers"),
        }
        Ok(())
    }
    fn push_float(&mut self, x: f64) -> Result<(), &'static str> {
        match self {
            Acc::Empty => *self = Acc::Float(vec![x]),
            Acc::Int(v) => {
                let mut f: Vec<f64> = v.iter().map(|i| *i as f64).collect();
                f.push(x);
                *self = Acc::Float(f);
            }
            Acc::Float(v) => v.push(x),
            Acc::Bool(_) => return Err("a mix of booleans and numbers"),
        }
        Ok(())
    }
    fn push_bool(&mut self, x: bool) -> Result<(), &'static str> {
        match self {
            Acc::Empty => *self = Acc::Bool(vec![x]),
            Acc::Bool(v) => v.push(x),
            _ => return Err("a mix of booleans and numbers"),
        }
        Ok(())
    }
}

/// Nesting bound: tensors deeper than this are not a real request.
const MAX_DEPTH: usize = 32;

struct Flatten<'a> {
    acc: &'a mut Acc,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array (flat or nested) of numbers or booleans")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("arrays nested deeper than 32 levels"));
        }
        while seq.next_element_seed(Flatten { acc: self.acc, depth: self.depth + 1 })?.is_some() {}
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.check_depth()?;
        self.acc.push_int(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match i64::try_from(v) {
            Ok(i) => self.visit_i64(i),
            Err(_) => {
                self.check_depth()?;
                self.acc.push_float(v as f64).map_err(E::custom)
            }
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.check_depth()?;
        self.acc.push_float(v).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.check_depth()?;
        self.acc.push_bool(v).map_err(E::custom)
    }
}

impl Flatten<'_> {
    fn check_depth<E: de::Error>(&self) -> Result<(), E> {
        if self.depth == 0 { Err(E::custom("an array, found a single value")) } else { Ok(()) }
    }
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorIn {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: Datatype,
    /// Absent when the tensor comes in the binary part of the body
    /// (`parameters.binary_data_size`, see [`crate::binary`]).
    #[serde(default)]
    pub data: TensorData,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

impl TensorIn {
    /// Bytes of this tensor in the binary part of the body, if it is there.
    pub fn binary_data_size(&self) -> Option<u64> {
        self.parameters.as_ref()?.get("binary_data_size")?.as_u64()
    }
}

/// An output the client asks for (all outputs when the list is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: Vec<TensorIn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<RequestedOutput>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// MQTT only: topic to answer on instead of `predictions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorOut {
    pub name: String,
    pub shape: Vec<usize>,
    pub datatype: String,
    pub data: OutData,
}

/// Output contents: numbers (any [`TensorData`]) or strings (labels of a top-k output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutData {
    Numbers(TensorData),
    Strings(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub outputs: Vec<TensorOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

/// An error answer: `{"id": "r-1", "error": "...", "code": "bad_input"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub error: String,
    pub code: ErrorCode,
}

/// What arrives on `predictions`: an answer or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InferReply {
    Error(InferError),
    Ok(InferResponse),
}

impl Default for TensorData {
    fn default() -> Self {
        TensorData::F32(Vec::new())
    }
}

impl InferRequest {
    /// Parses a JSON request; errors are `bad_input` with the field path.
    pub fn from_json(bytes: &[u8]) -> Result<InferRequest, ProtocolError> {
        let r = InferRequest::parse_header(bytes)?;
        for (i, t) in r.inputs.iter().enumerate() {
            if t.binary_data_size().is_some() {
                return Err(ProtocolError {
                    code: ErrorCode::BadInput,
                    path: format!("inputs[{i}].parameters.binary_data_size"),
                    expected: "a binary body announced by the Inference-Header-Content-Length header (HTTP only)"
                        .into(),
                    found: "a JSON-only body".into(),
                });
            }
            let elements = t.shape.iter().try_fold(1i64, |n, d| n.checked_mul(*d)).unwrap_or(i64::MAX);
            if t.data.is_empty() && elements > 0 {
                return Err(ProtocolError {
                    code: ErrorCode::BadInput,
                    path: format!("inputs[{i}].data"),
                    expected: format!("the tensor's {elements} values"),
                    found: "nothing".into(),
                });
            }
        }
        Ok(r)
    }

    /// Parses the JSON part of a request; `data` may be absent.
    pub(crate) fn parse_header(bytes: &[u8]) -> Result<InferRequest, ProtocolError> {
        let r: InferRequest = parse_json(bytes).map_err(|e| e.with_code(ErrorCode::BadInput))?;
        if r.inputs.is_empty() {
            return Err(ProtocolError {
                code: ErrorCode::BadInput,
                path: "inputs".into(),
                expected: "at least one input tensor".into(),
                found: "[]".into(),
            });
        }
        for (i, t) in r.inputs.iter().enumerate() {
            if let Some(d) = t.shape.iter().find(|d| **d < 0) {
                return Err(ProtocolError {
                    code: ErrorCode::BadInput,
                    path: format!("inputs[{i}].shape"),
                    expected: "non-negative dimensions".into(),
                    found: d.to_string(),
                });
            }
        }
        Ok(r)
    }

    /// The `id` and `reply_to` of a body that does not parse as a request,
    /// so the error answer can still carry the id and go where it was asked.
    pub fn salvage(bytes: &[u8]) -> (Option<String>, Option<String>) {
        #[derive(Deserialize)]
        struct Envelope {
            id: Option<serde_json::Value>,
            reply_to: Option<serde_json::Value>,
        }
        let Ok(e) = serde_json::from_slice::<Envelope>(bytes) else { return (None, None) };
        let id = e.id.map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        });
        (id, e.reply_to.and_then(|v| v.as_str().map(str::to_string)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_data_parse_alike() {
        let a: TensorData = serde_json::from_str("[[1, 2], [3, 4]]").unwrap();
        let b: TensorData = serde_json::from_str("[1, 2, 3, 4]").unwrap();
        assert_eq!(a, TensorData::I64(vec![1, 2, 3, 4]));
        assert_eq!(a, b);
        let c: TensorData = serde_json::from_str("[1, 2.5]").unwrap();
        assert_eq!(c, TensorData::F64(vec![1.0, 2.5]));
        let d: TensorData = serde_json::from_str("[[true], [false]]").unwrap();
        assert_eq!(d, TensorData::Bool(vec![true, false]));
        assert_eq!(serde_json::from_str::<TensorData>("[]").unwrap().len(), 0);
    }

    #[test]
    fn bad_data_is_refused_with_a_reason() {
        for (json, why) in [
            ("[1, \"x\"]", "invalid type: string"),
            ("[true, 1]", "a mix of booleans and numbers"),
            ("3", "found a single value"),
        ] {
            let e = serde_json::from_str::<TensorData>(json).unwrap_err().to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn request_errors_are_bad_input_with_path() {
        let e = InferRequest::from_json(
            br#"{"id":"r","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,"a"]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadInput);
        assert_eq!(e.path, "inputs[0].data[1]");
        let e =
            InferRequest::from_json(br#"{"id":"r","inputs":[{"name":"x","shape":[1,2],"datatype":"FP8","data":[1]}]}"#)
                .unwrap_err();
        assert_eq!(e.path, "inputs[0].datatype");
        assert_eq!(
            InferRequest::salvage(br#"{"id":"r-9","inputs":5,"reply_to":"t/x"}"#),
            (Some("r-9".into()), Some("t/x".into()))
        );
    }

    #[test]
    fn reply_parses_as_error_or_answer() {
        let e: InferReply = serde_json::from_str(r#"{"id":"r","error":"no model","code":"no_model"}"#).unwrap();
        assert!(matches!(e, InferReply::Error(InferError { code: ErrorCode::NoModel, .. })));
        let ok: InferReply = serde_json::from_str(
            r#"{"id":"r","model_name":"m","model_version":"1","outputs":[{"name":"y","shape":[1],"datatype":"FP32","data":[0.5]}]}"#,
        )
        .unwrap();
        assert!(matches!(ok, InferReply::Ok(_)));
    }
}
