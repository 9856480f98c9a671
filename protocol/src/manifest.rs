//! `Manifest`: one registered model version, the logical container of its files.
//! Stored at `REGISTRY/{name}/{version}/manifest.json`; each file's URL defaults
//! to its `path` relative to the manifest URL.

use crate::{ErrorCode, ProtocolError, check_schema, infer::Datatype, is_sha256_hex, parse_json};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

pub const SCHEMA: &str = "outpost.manifest.v1";

/// The name of the manifest in a bundle and in a stored version: the agent
/// writes it there itself, so no file of the bundle may take it.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub name: String,
    pub version: String,
    pub files: Vec<FileEntry>,
    pub model: ModelSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path inside the version, `/`-separated, no `..`, not absolute.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// Overrides where the file is fetched from (e.g. a CDN); absolute URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Only `onnx` today.
    pub format: String,
    /// The `path` of the model file among `files`.
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How one request runs: on one thread (the default for most models),
    /// or with its matrix products split over every core. `auto` (the
    /// default) measures both on the golden sample at deployment and keeps
    /// the faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<Executor>,
    /// Which inference engine runs the model: `tract` (built into every
    /// agent), `onnxruntime` (agents built with it and given the library),
    /// or `auto` (the default, unless the device's `runtime.default` says
    /// otherwise): each available engine loads the model and runs the golden
    /// sample, and the faster one that reproduces it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

/// The inference engine a model runs on (`model.runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    #[default]
    Auto,
    Tract,
    Onnxruntime,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Auto => "auto",
            Runtime::Tract => "tract",
            Runtime::Onnxruntime => "onnxruntime",
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Runtime, String> {
        match s {
            "auto" => Ok(Runtime::Auto),
            "tract" => Ok(Runtime::Tract),
            "onnxruntime" => Ok(Runtime::Onnxruntime),
            other => Err(format!("unknown runtime '{other}': expected auto, tract or onnxruntime")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    Auto,
    SingleThread,
    MultiThread,
}

/// A model input or output. `shape` uses -1 for a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postprocess: Option<Postprocess>,
}

/// Applied on the device to a request's input before the model sees it:
/// `x * scale`, then `(x - mean) / std` (per channel when given as arrays of
/// the length of dimension 1, else one value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f64>>,
    /// The type the model takes, when clients send another (e.g. UINT8
    /// pixels to an FP32 model): values are cast before scale/mean/std.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datatype: Option<Datatype>,
    /// The shape the model takes, when clients send another layout with the
    /// same elements (e.g. [-1, 8, 8] to a model of [-1, 64]); one -1 at most,
    /// inferred from the element count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<i64>>,
}

/// Applied to a model output before it is answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Postprocess {
    /// Apply softmax over the last axis.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub softmax: bool,
    /// Also answer the k best classes per row (`{name}_top_k` output of labels or indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Path among `files` of a labels file, one label per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
}

/// The golden sample: an Open Inference Protocol request body and the response
/// outputs the model must reproduce within `tolerance` (absolute, per element)
/// before it may serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub input: String,
    pub expected: String,
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-4
}

/// Hard bound on files in one version, so a hostile manifest cannot make the
/// agent plan millions of downloads.
pub const MAX_FILES: usize = 1024;

impl Manifest {
    /// Parses and validates a manifest. Errors are `invalid_manifest`,
    /// `unsafe_path` or `unsupported_schema`, with the field path.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ProtocolError> {
        check_schema(bytes, SCHEMA).map_err(|e| e.with_code(ErrorCode::InvalidManifest))?;
        let m: Manifest = parse_json(bytes).map_err(|e| e.with_code(ErrorCode::InvalidManifest))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json_pretty(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Sum of the declared file sizes: the download budget of this version.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |path: String, expected: &str, found: String| {
            Err(ProtocolError { code: ErrorCode::InvalidManifest, path, expected: expected.into(), found })
        };
        if self.name.is_empty() || self.version.is_empty() {
            return bad("name".into(), "non-empty name and version", format!("{:?}@{:?}", self.name, self.version));
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return bad("files".into(), "1 to 1024 files", self.files.len().to_string());
        }
        let mut seen = HashSet::new();
        for (i, f) in self.files.iter().enumerate() {
            check_relative_path(&format!("files[{i}].path"), &f.path)?;
            // Case-folded so two paths that collide on a case-insensitive disk are refused too.
            if !seen.insert(f.path.to_ascii_lowercase()) {
                return bad(format!("files[{i}].path"), "each path listed once", format!("\"{}\" again", f.path));
            }
            // The agent writes the manifest itself beside the files: a bundle
            // file of that name would be overwritten (and its stored blob is
            // shared with every version holding the same bytes).
            if f.path.eq_ignore_ascii_case(MANIFEST_FILE) {
                return bad(
                    format!("files[{i}].path"),
                    "a path other than manifest.json (the name of the manifest itself, which the agent writes)",
                    format!("\"{}\"", f.path),
                );
            }
            if !is_sha256_hex(&f.sha256) {
                return bad(
                    format!("files[{i}].sha256"),
                    "64 lowercase hex digits",
                    crate::error::excerpt(&f.sha256, 80),
                );
            }
            if let Some(url) = &f.url {
                crate::deployment::check_url(&format!("files[{i}].url"), url)
                    .map_err(|e| e.with_code(ErrorCode::InvalidManifest))?;
            }
        }
        // A path that is a prefix directory of another would need to be a file and a directory at once.
        for f in &self.files {
            let dir = format!("{}/", f.path.to_ascii_lowercase());
            if let Some(other) = self.files.iter().find(|o| o.path.to_ascii_lowercase().starts_with(&dir)) {
                return bad(
                    "files".into(),
                    "no path that is also a directory of another",
                    format!("\"{}\" and \"{}\"", f.path, other.path),
                );
            }
        }
        if self.model.format != "onnx" {
            return bad("model.format".into(), "\"onnx\"", format!("\"{}\"", self.model.format));
        }
        if self.file(&self.model.file).is_none() {
            return bad("model.file".into(), "the path of one of `files`", format!("\"{}\"", self.model.file));
        }
        if self.model.inputs.is_empty() {
            return bad("model.inputs".into(), "at least one input", "none".into());
        }
        if self.model.outputs.is_empty() {
            return bad("model.outputs".into(), "at least one output", "none".into());
        }
        for (kind, list) in [("inputs", &self.model.inputs), ("outputs", &self.model.outputs)] {
            let mut names = HashSet::new();
            for (i, t) in list.iter().enumerate() {
                if t.name.is_empty() || !names.insert(t.name.as_str()) {
                    return bad(
                        format!("model.{kind}[{i}].name"),
                        "a unique, non-empty name",
                        format!("\"{}\"", t.name),
                    );
                }
                if let Some(d) = t.shape.iter().find(|d| **d < -1 || **d == 0) {
                    return bad(
                        format!("model.{kind}[{i}].shape"),
                        "dimensions >= 1, or -1 for dynamic",
                        d.to_string(),
                    );
                }
                if let Some(shape) = t.preprocess.as_ref().and_then(|p| p.shape.as_ref())
                    && (shape.iter().filter(|d| **d == -1).count() > 1 || shape.iter().any(|d| *d < -1 || *d == 0))
                {
                    return bad(
                        format!("model.{kind}[{i}].preprocess.shape"),
                        "dimensions >= 1 and at most one -1",
                        format!("{shape:?}"),
                    );
                }
                if let Some(p) = &t.preprocess {
                    for (field, v) in [("mean", &p.mean), ("std", &p.std)] {
                        if let Some(v) = v
                            && (v.is_empty() || v.iter().any(|x| !x.is_finite()))
                        {
                            return bad(
                                format!("model.{kind}[{i}].preprocess.{field}"),
                                "a non-empty list of finite numbers",
                                format!("{v:?}"),
                            );
                        }
                    }
                    if let Some(s) = &p.std
                        && s.contains(&0.0)
                    {
                        return bad(format!("model.{kind}[{i}].preprocess.std"), "non-zero values", format!("{s:?}"));
                    }
                }
                if let Some(labels) = t.postprocess.as_ref().and_then(|p| p.labels.as_ref())
                    && self.file(labels).is_none()
                {
                    return bad(
                        format!("model.{kind}[{i}].postprocess.labels"),
                        "the path of one of `files`",
                        format!("\"{labels}\""),
                    );
                }
            }
        }
        if let Some(v) = &self.validation {
            for (field, p) in [("input", &v.input), ("expected", &v.expected)] {
                if self.file(p).is_none() {
                    return bad(format!("validation.{field}"), "the path of one of `files`", format!("\"{p}\""));
                }
            }
            if !(v.tolerance.is_finite() && v.tolerance >= 0.0) {
                return bad("validation.tolerance".into(), "a finite number >= 0", v.tolerance.to_string());
            }
        }
        Ok(())
    }
}

/// Checks a path from a manifest is safe to join to a directory: relative,
/// `/`-separated, no empty, `.` or `..` component, no backslash, drive letter,
/// NUL or control character. Error code `unsafe_path`.
pub fn check_relative_path(field: &str, path: &str) -> Result<(), ProtocolError> {
    let unsafe_path = |why: &str| {
        Err(ProtocolError {
            code: ErrorCode::UnsafePath,
            path: field.to_string(),
            expected: format!("a relative path inside the version directory ({why})"),
            found: crate::error::excerpt(path, 120),
        })
    };
    if path.is_empty() || path.len() > 255 {
        return unsafe_path("1 to 255 bytes");
    }
    if path.starts_with('/') {
        return unsafe_path("not absolute");
    }
    if path.contains('\\') || path.chars().any(char::is_control) || path.contains(':') {
        return unsafe_path("no backslash, colon or control character");
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return unsafe_path("no empty, '.' or '..' component");
        }
        if comp.starts_with(".outpost") {
            return unsafe_path("no component starting with .outpost, which the agent reserves");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> serde_json::Value {
        let h = "b".repeat(64);
        serde_json::json!({"schema": "outpost.manifest.v1", "name": "digits", "version": "2",
         "files": [{"path": "model.onnx", "sha256": h, "size": 27000},
                   {"path": "labels.txt", "sha256": h, "size": 20},
                   {"path": "sample/input.json", "sha256": h, "size": 900},
                   {"path": "sample/expected.json", "sha256": h, "size": 300}],
         "model": {"format": "onnx", "file": "model.onnx",
                   "inputs":  [{"name": "input", "datatype": "FP32", "shape": [-1, 64], "preprocess": {"scale": 0.0625}}],
                   "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10],
                                "postprocess": {"top_k": 3, "labels": "labels.txt"}}]},
         "validation": {"input": "sample/input.json", "expected": "sample/expected.json", "tolerance": 0.0001}})
    }

    fn parse(v: serde_json::Value) -> Result<Manifest, ProtocolError> {
        Manifest::from_json(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn design_example_parses() {
        let m = parse(good()).unwrap();
        assert_eq!(m.total_size(), 28220);
        assert_eq!(m.model.inputs[0].datatype, Datatype::Fp32);
    }

    #[test]
    fn the_runtime_is_one_of_the_engines_and_a_typo_names_the_field() {
        for (r, want) in [("auto", Runtime::Auto), ("tract", Runtime::Tract), ("onnxruntime", Runtime::Onnxruntime)] {
            let mut v = good();
            v["model"]["runtime"] = serde_json::json!(r);
            assert_eq!(parse(v).unwrap().model.runtime, Some(want));
        }
        assert_eq!(parse(good()).unwrap().model.runtime, None);
        let mut v = good();
        v["model"]["runtime"] = serde_json::json!("onnx-runtime");
        let e = parse(v).unwrap_err();
        assert_eq!((e.code, e.path.as_str()), (ErrorCode::InvalidManifest, "model.runtime"), "{e}");
        assert!(e.to_string().contains("auto") && e.to_string().contains("onnxruntime"), "{e}");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for (p, code) in [
            ("../etc/passwd", ErrorCode::UnsafePath),
            ("/etc/passwd", ErrorCode::UnsafePath),
            ("a//b", ErrorCode::UnsafePath),
            ("a/./b", ErrorCode::UnsafePath),
            ("C:\\x", ErrorCode::UnsafePath),
            ("", ErrorCode::UnsafePath),
        ] {
            let mut v = good();
            v["files"][1]["path"] = serde_json::json!(p);
            let e = parse(v).unwrap_err();
            assert_eq!(e.code, code, "{p}: {e}");
            assert_eq!(e.path, "files[1].path");
        }
    }

    #[test]
    fn a_file_may_not_take_the_manifests_own_name() {
        for p in ["manifest.json", "Manifest.JSON"] {
            let mut v = good();
            v["files"][1]["path"] = serde_json::json!(p);
            let e = parse(v).unwrap_err();
            assert_eq!((e.code, e.path.as_str()), (ErrorCode::InvalidManifest, "files[1].path"), "{p}");
            assert!(e.to_string().contains("the name of the manifest itself"), "{e}");
        }
        // In a folder it is only a name.
        let mut v = good();
        let extra = serde_json::json!({"path": "extra/manifest.json", "sha256": "c".repeat(64), "size": 2});
        v["files"].as_array_mut().unwrap().push(extra);
        assert!(parse(v).is_ok());
    }

    #[test]
    fn duplicate_and_dangling_references_are_invalid() {
        let mut v = good();
        v["files"][1]["path"] = serde_json::json!("MODEL.onnx");
        let e = parse(v).unwrap_err();
        assert_eq!((e.code, e.path.as_str()), (ErrorCode::InvalidManifest, "files[1].path"));

        let mut v = good();
        v["model"]["file"] = serde_json::json!("other.onnx");
        assert_eq!(parse(v).unwrap_err().path, "model.file");

        let mut v = good();
        v["validation"]["expected"] = serde_json::json!("nope.json");
        assert_eq!(parse(v).unwrap_err().path, "validation.expected");

        let mut v = good();
        v["files"][1]["path"] = serde_json::json!("model.onnx/x");
        assert_eq!(parse(v).unwrap_err().path, "files");
    }

    #[test]
    fn type_errors_are_invalid_manifest_with_path() {
        let mut v = good();
        v["files"][2]["size"] = serde_json::json!(-5);
        let e = parse(v).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidManifest);
        assert_eq!(e.path, "files[2].size");
        let mut v = good();
        v["model"]["inputs"][0]["datatype"] = serde_json::json!("FP8");
        assert_eq!(parse(v).unwrap_err().path, "model.inputs[0].datatype");
    }
}
