//! The Open Inference Protocol's binary tensor data extension (HTTP): the body
//! is the JSON request followed by raw tensor bytes, and the
//! `Inference-Header-Content-Length` header gives the length of the JSON part.
//! An input whose `parameters.binary_data_size` is set takes its values from
//! the binary part, in input order: little-endian, row-major, `BOOL` one byte.
//! Outputs come back binary when the request's `parameters.binary_data_output`
//! is true (an output's own `parameters.binary_data` overrides it), which is
//! what Triton's Python client asks for by default.

use crate::infer::{OutData, TensorData};
use crate::{Datatype, ErrorCode, InferRequest, InferResponse, ProtocolError};

/// The HTTP header that announces a binary body.
pub const HEADER: &str = "inference-header-content-length";

impl Datatype {
    /// Bytes per element in binary form.
    pub fn size(self) -> usize {
        match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 => 2,
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => 8,
        }
    }
}

fn bad(path: String, expected: impl Into<String>, found: impl Into<String>) -> ProtocolError {
    ProtocolError { code: ErrorCode::BadInput, path, expected: expected.into(), found: found.into() }
}

/// Parses a body of the binary extension: `json_len` bytes of JSON request,
/// then the binary tensors.
pub fn decode_request(body: &[u8], json_len: usize) -> Result<InferRequest, ProtocolError> {
    if json_len > body.len() {
        return Err(bad(
            "Inference-Header-Content-Length".into(),
            format!("at most the body length, {} bytes", body.len()),
            json_len.to_string(),
        ));
    }
    let (header, mut rest) = body.split_at(json_len);
    let mut req = InferRequest::parse_header(header)?;
    for (i, t) in req.inputs.iter_mut().enumerate() {
        let elements = t.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d as usize)).unwrap_or(usize::MAX);
        let Some(size) = t.binary_data_size() else {
            if t.data.is_empty() && elements > 0 {
                return Err(bad(
                    format!("inputs[{i}].data"),
                    format!("the tensor's {elements} values, or parameters.binary_data_size"),
                    "nothing",
                ));
            }
            continue;
        };
        let want = elements.saturating_mul(t.datatype.size());
        if size as usize != want {
            return Err(bad(
                format!("inputs[{i}].parameters.binary_data_size"),
                format!("{want} bytes ({elements} {} elements of shape {:?})", t.datatype, t.shape),
                size.to_string(),
            ));
        }
        if rest.len() < want {
            return Err(bad(
                format!("inputs[{i}]"),
                format!("{want} bytes of binary data"),
                format!("{} bytes left in the body", rest.len()),
            ));
        }
        let (bytes, tail) = rest.split_at(want);
        t.data = decode(t.datatype, bytes);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad(
            "body".into(),
            "binary data for the inputs that declare binary_data_size, nothing more",
            format!("{} bytes more", rest.len()),
        ));
    }
    Ok(req)
}

fn decode(dt: Datatype, b: &[u8]) -> TensorData {
    macro_rules! ints {
        ($t:ty, $n:expr) => {
            TensorData::I64(
                b.chunks_exact($n).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()) as i64).collect(),
            )
        };
    }
    match dt {
        Datatype::Bool => TensorData::Bool(b.iter().map(|x| *x != 0).collect()),
        Datatype::Uint8 => TensorData::I64(b.iter().map(|x| i64::from(*x)).collect()),
        Datatype::Int8 => TensorData::I64(b.iter().map(|x| i64::from(*x as i8)).collect()),
        Datatype::Uint16 => ints!(u16, 2),
        Datatype::Int16 => ints!(i16, 2),
        Datatype::Uint32 => ints!(u32, 4),
        Datatype::Int32 => ints!(i32, 4),
        Datatype::Int64 => ints!(i64, 8),
        Datatype::Uint64 => {
            TensorData::U64(b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
        }
        Datatype::Fp16 => TensorData::F32(
            b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes(c.try_into().unwrap_or_default()))).collect(),
        ),
        Datatype::Fp32 => {
            TensorData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())).collect())
        }
        Datatype::Fp64 => {
            TensorData::F64(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
        }
    }
}

/// IEEE 754 half precision to single.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let frac = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let shift = frac.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((frac << shift) & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        e => sign | ((u32::from(e) + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Which outputs a request wants in binary form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BinaryOutputs {
    all: bool,
    each: Vec<(String, bool)>,
}

impl BinaryOutputs {
    pub fn of(req: &InferRequest) -> BinaryOutputs {
        let flag = |p: &Option<serde_json::Value>, key: &str| p.as_ref()?.get(key)?.as_bool();
        BinaryOutputs {
            all: flag(&req.parameters, "binary_data_output").unwrap_or(false),
            each: req
                .outputs
                .iter()
                .flatten()
                .filter_map(|o| Some((o.name.clone(), flag(&o.parameters, "binary_data")?)))
                .collect(),
        }
    }

    pub fn wants(&self, output: &str) -> bool {
        self.each.iter().find(|(n, _)| n == output).map_or(self.all, |(_, b)| *b)
    }

    pub fn any(&self) -> bool {
        self.all || self.each.iter().any(|(_, b)| *b)
    }
}

/// Encodes a response: plain JSON (`None` header length) when no output is
/// wanted binary, else the JSON part, with `parameters.binary_data_size` in
/// place of `data` for the binary outputs, followed by their bytes.
pub fn encode_response(resp: &InferResponse, binary: &BinaryOutputs) -> (Vec<u8>, Option<usize>) {
    if !binary.any() {
        return (serde_json::to_vec(resp).unwrap_or_default(), None);
    }
    let mut json = serde_json::to_value(resp).unwrap_or_default();
    let mut tail = Vec::new();
    if let Some(outputs) = json.get_mut("outputs").and_then(|o| o.as_array_mut()) {
        for (o, out) in outputs.iter_mut().zip(&resp.outputs) {
            if !binary.wants(&out.name) {
                continue;
            }
            let start = tail.len();
            encode(&out.datatype, &out.data, &mut tail);
            if let Some(obj) = o.as_object_mut() {
                obj.remove("data");
                obj.insert("parameters".into(), serde_json::json!({"binary_data_size": tail.len() - start}));
            }
        }
    }
    let mut body = serde_json::to_vec(&json).unwrap_or_default();
    let json_len = body.len();
    body.extend_from_slice(&tail);
    (body, Some(json_len))
}

fn encode(datatype: &str, data: &OutData, out: &mut Vec<u8>) {
    match data {
        OutData::Strings(v) => {
            for s in v {
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        OutData::Numbers(TensorData::F32(v)) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        OutData::Numbers(TensorData::F64(v)) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        OutData::Numbers(TensorData::Bool(v)) => out.extend(v.iter().map(|b| u8::from(*b))),
        OutData::Numbers(TensorData::U64(v)) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        // Integers are held as i64 and written at the width their datatype names.
        OutData::Numbers(TensorData::I64(v)) => match datatype {
            "INT8" | "UINT8" => out.extend(v.iter().map(|x| *x as u8)),
            "INT16" | "UINT16" => v.iter().for_each(|x| out.extend_from_slice(&(*x as u16).to_le_bytes())),
            "INT32" | "UINT32" => v.iter().for_each(|x| out.extend_from_slice(&(*x as u32).to_le_bytes())),
            _ => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(header: serde_json::Value, tail: &[u8]) -> (Vec<u8>, usize) {
        let mut b = serde_json::to_vec(&header).unwrap();
        let n = b.len();
        b.extend_from_slice(tail);
        (b, n)
    }

    #[test]
    fn binary_inputs_decode_in_order_and_mix_with_json_ones() {
        let mut tail = Vec::new();
        for x in [1.5f32, -2.0] {
            tail.extend_from_slice(&x.to_le_bytes());
        }
        tail.extend_from_slice(&[0, 255, 7]);
        let (b, n) = body(
            serde_json::json!({"inputs": [
                {"name": "a", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "j", "shape": [1], "datatype": "INT64", "data": [4]},
                {"name": "u", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}]}),
            &tail,
        );
        let r = decode_request(&b, n).unwrap();
        assert_eq!(r.inputs[0].data, TensorData::F32(vec![1.5, -2.0]));
        assert_eq!(r.inputs[1].data, TensorData::I64(vec![4]));
        assert_eq!(r.inputs[2].data, TensorData::I64(vec![0, 255, 7]));
    }

    #[test]
    fn sizes_that_do_not_add_up_are_bad_input_with_the_field() {
        let h = serde_json::json!({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]});
        let (b, n) = body(h, &[0; 4]);
        let e = decode_request(&b, n).unwrap_err();
        assert_eq!((e.code, e.path.as_str()), (ErrorCode::BadInput, "inputs[0].parameters.binary_data_size"));
        assert!(e.to_string().contains("expected 8 bytes (2 FP32 elements of shape [2])"), "{e}");

        let h = serde_json::json!({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]});
        let (b, n) = body(h.clone(), &[0; 5]);
        assert_eq!(decode_request(&b, n).unwrap_err().path, "inputs[0]");
        let (b, n) = body(h, &[0; 9]);
        assert_eq!(decode_request(&b, n).unwrap_err().path, "body");
        assert_eq!(decode_request(b"{}", 99).unwrap_err().path, "Inference-Header-Content-Length");

        // The binary parameter in a JSON-only body, and a tensor without data.
        let e = InferRequest::from_json(
            br#"{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "inputs[0].parameters.binary_data_size");
        let e =
            InferRequest::from_json(br#"{"inputs": [{"name": "a", "shape": [2], "datatype": "FP32"}]}"#).unwrap_err();
        assert_eq!(e.path, "inputs[0].data");
    }

    #[test]
    fn half_floats_convert_exactly() {
        for (h, f) in [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x7bff, 65504.0), (0, 0.0)] {
            assert_eq!(f16_to_f32(h), f, "{h:#x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }

    #[test]
    fn outputs_come_back_binary_when_asked() {
        let resp = InferResponse {
            id: None,
            model_name: "m".into(),
            model_version: "1".into(),
            outputs: vec![
                crate::TensorOut {
                    name: "p".into(),
                    shape: vec![2],
                    datatype: "FP32".into(),
                    data: OutData::Numbers(TensorData::F32(vec![0.25, 0.75])),
                },
                crate::TensorOut {
                    name: "p_top_k".into(),
                    shape: vec![1],
                    datatype: "BYTES".into(),
                    data: OutData::Strings(vec!["cat".into()]),
                },
            ],
            parameters: None,
        };
        let req: InferRequest = serde_json::from_value(serde_json::json!({"inputs": [],
            "parameters": {"binary_data_output": true}, "outputs": [{"name": "p_top_k", "parameters": {"binary_data": false}}]}))
        .unwrap();
        let (b, n) = encode_response(&resp, &BinaryOutputs::of(&req));
        let n = n.unwrap();
        let head: serde_json::Value = serde_json::from_slice(&b[..n]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(head["outputs"][1]["data"], serde_json::json!(["cat"]));
        assert_eq!(&b[n..], [0.25f32.to_le_bytes(), 0.75f32.to_le_bytes()].concat());
        let plain = encode_response(&resp, &BinaryOutputs::default());
        assert_eq!(plain.1, None);
    }
}
