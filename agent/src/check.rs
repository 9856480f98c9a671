//! `outpost check-bundle`: runs a bundle through exactly the agent's
//! deployment pipeline (download or read, sha256 and size checks, safe paths,
//! memory check, load, golden sample) in a throw-away store, and reports each
//! step, so an operator can try a bundle on a lab device or in CI before
//! rolling it out. Nothing is published and nothing serves.

use crate::deploy::fetch::{Cancel, FetchConfig, Fetcher};
use crate::deploy::pipeline::{Ended, Pipeline};
use crate::deploy::store::Store;
use crate::report::Reporter;
use crate::serve::Engine;
use outpost_protocol::{Deployment, DeploymentEvent, ErrorInfo, Manifest, ModelRef, Topics};
use std::sync::Arc;

/// The bundle, as a manifest URL (`http(s)://`, `file://`) or a path.
pub fn manifest_url(bundle: &str) -> Result<String, String> {
    if bundle.contains("://") {
        return Ok(bundle.to_string());
    }
    let path = std::fs::canonicalize(bundle).map_err(|e| format!("{bundle}: {e}"))?;
    let path = if path.is_dir() { path.join("manifest.json") } else { path };
    let path = path.to_str().ok_or_else(|| format!("{bundle}: the path is not UTF-8"))?;
    Ok(format!("file://{}", crate::deploy::fetch::percent_encode_path(path)))
}

/// Checks the bundle at `url`; `sha256` is the manifest digest a deployment
/// would carry (computed from the manifest when not given). Prints each step.
/// `Ok` with the model's report when the agent would serve it.
pub async fn check_bundle(url: &str, sha256: Option<String>, fetch: FetchConfig) -> Result<String, ErrorInfo> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        ErrorInfo::new(outpost_protocol::ErrorCode::Internal, format!("{what}: {e}"))
    };
    let data =
        tempfile::tempdir().map_err(|e| internal("cannot create a temporary store (is TMPDIR writable?)", &e))?;
    let store = Arc::new(
        Store::open(data.path()).map_err(|e| internal("cannot open the temporary store (is TMPDIR writable?)", &e))?,
    );
    let fetcher = Fetcher::new(fetch);
    // The manifest's own name and version: what a deployment of it would say.
    let (bytes, digest) = {
        let (f, u) = (fetcher.clone(), url.to_string());
        tokio::task::spawn_blocking(move || f.fetch_unverified(&u))
            .await
            .map_err(|e| internal("the manifest download stopped", &e))??
    };
    let manifest = Manifest::from_json(&bytes).map_err(|e| e.info())?;
    let sha = sha256.unwrap_or(digest);
    let d = Deployment {
        schema: outpost_protocol::deployment::SCHEMA.into(),
        deployment_id: "check-bundle".into(),
        revision: 1,
        model: ModelRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            manifest_url: url.to_string(),
            manifest_sha256: sha,
        },
        serving: Default::default(),
        policy: Default::default(),
        target: None,
        slot: None,
        shadow: None,
    };
    d.validate().map_err(|e| e.info())?;
    let (tx, mut rx) = crate::link::publisher::outbox();
    let reporter = Arc::new(Reporter::new("check-bundle", &[], Topics::default(), tx));
    let pipeline = Arc::new(Pipeline {
        store,
        fetcher,
        engine: Arc::new(Engine::new(1, 0)),
        reporter,
        limits: arc_swap::ArcSwap::from_pointee(crate::deploy::pipeline::Limits::new(1, 0)),
        http: Default::default(),
        // `outpost check-bundle`: the model runs isolated, as on a device.
        isolation: crate::deploy::isolate::Isolation::this_binary(),
        slot: None,
    });
    let printer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Ok(ev) = DeploymentEvent::from_json(&m.payload) {
                println!("  {}", ev.summary());
            }
        }
    });
    let ended = tokio::task::spawn_blocking(move || pipeline.prepare(&d, &Cancel::default(), &[], &|| Ok(())))
        .await
        .map_err(|e| internal("the check stopped", &e))?;
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), printer).await;
    match ended {
        Ok(prepared) => {
            let model = prepared.model;
            let tensors = |l: Vec<(String, &str, Vec<i64>)>| {
                l.into_iter().map(|(n, d, s)| format!("{n} {d} {s:?}")).collect::<Vec<_>>().join(", ")
            };
            Ok(format!(
                "{}@{}: inputs {}; outputs {}; loaded in {} ms; {}",
                model.name,
                model.version,
                tensors(model.input_signature()),
                tensors(model.output_signature()),
                model.load_time.as_millis(),
                model.validation
            ))
        }
        Err(Ended::Failed(e)) => Err(e),
        Err(Ended::Superseded) => Err(ErrorInfo::new(outpost_protocol::ErrorCode::Internal, "interrupted")),
    }
}
