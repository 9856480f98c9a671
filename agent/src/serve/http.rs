//! The local HTTP endpoint: KServe Open Inference Protocol v2 (REST/JSON), so
//! Triton and KServe clients work unchanged against the device, plus
//! `/metrics` in Prometheus text format.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v2/health/live` | 200 while the process runs |
//! | `GET /v2/health/ready` | 200 when a model serves, else 503 |
//! | `GET /v2` | server metadata |
//! | `GET /v2/models/{name}[/versions/{v}]` | model metadata: inputs, outputs, version |
//! | `GET /v2/models/{name}[/versions/{v}]/ready` | 200 when that model (version) serves |
//! | `POST /v2/models/{name}[/versions/{v}]/infer` | an inference |
//! | `GET /metrics` | counters and the active model |
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 404 (no such model or
//! version), 413 (body too large), 503 (overloaded or no model) or 500.

use crate::serve::model::Model;
use crate::serve::models::{Models, Route};
use crate::serve::{Engine, Transport};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outpost_protocol::ErrorCode;
use serde_json::json;
use std::sync::Arc;

/// What one client, or many, may hold of the endpoint: set by the `http.*`
/// configuration keys, defaults in [`Limits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A connection must send a complete request head within this time of
    /// opening, or of its previous answer (slow headers and idle keep-alive
    /// connections are closed after it).
    pub header_timeout: std::time::Duration,
    /// A request's body must arrive within this time of its head.
    pub body_timeout: std::time::Duration,
    /// Open connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Largest request body; a model whose input shapes are all fixed
    /// lowers it to what they need (see `Model::max_body_bytes`).
    pub max_body: usize,
    /// Memory all requests in flight may hold together, each counted as
    /// [`PARSED_FACTOR`] times its body (JSON numbers become 8-byte values,
    /// then tensors); a request that would pass it is refused `overloaded`
    /// before its body is read.
    pub max_inflight_bytes: usize,
}

/// What a request body is counted as against `max_inflight_bytes`: the
/// memory it takes once parsed, estimated as this many times its size.
pub const PARSED_FACTOR: usize = 8;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            max_connections: 256,
            // A 640×640×3 FP32 image as JSON text is ~25 MB.
            max_body: 64 << 20,
            // One body at the cap at a time, or many small ones.
            max_inflight_bytes: 512 << 20,
        }
    }
}

/// What the endpoint's connections share: the limits and the bytes held.
#[derive(Debug)]
pub struct Admission {
    pub limits: Limits,
    /// KiB of request bodies in flight (`max_inflight_bytes` / 1024 permits).
    inflight_kib: Arc<tokio::sync::Semaphore>,
    connections: Arc<tokio::sync::Semaphore>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            inflight_kib: Arc::new(tokio::sync::Semaphore::new((limits.max_inflight_bytes / 1024).max(1))),
            connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1))),
        })
    }
}

/// An OIP error body: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// An OIP error body with the protocol's error code beside the message
/// (`{"error": "...", "code": "bad_input"}`), as MQTT answers carry it.
fn coded(code: ErrorCode, message: impl Into<String>) -> Response {
    (status_of(code), axum::Json(json!({"error": message.into(), "code": code}))).into_response()
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadInput => StatusCode::BAD_REQUEST,
        ErrorCode::NoModel | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The OIP router over the device's models.
pub fn router(models: Arc<Models>, admission: Arc<Admission>) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { axum::Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(|s, Path(name): Path<String>| metadata(s, name, None)))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(|s, Path((n, v)): Path<(String, String)>| metadata(s, n, Some(v))),
        )
        .route("/v2/models/{name}/ready", get(|s, Path(name): Path<String>| model_ready(s, name, None)))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(|s, Path((n, v)): Path<(String, String)>| model_ready(s, n, Some(v))),
        )
        .route("/v2/models/{name}/infer", post(|s, a, Path(name): Path<String>, r| infer(s, a, name, None, r)))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(|s, a, Path((n, v)): Path<(String, String)>, r| infer(s, a, n, Some(v), r)),
        )
        .route("/metrics", get(|State(m): State<Arc<Models>>| metrics(State(m.default.clone()))))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route: see /v2/health/ready, /v2/models/{name}, /v2/models/{name}/infer",
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            let allowed = if uri.path().ends_with("/infer") { "POST" } else { "GET" };
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}: use {allowed}", uri.path()))
        })
        .layer(axum::Extension(admission))
        .with_state(models)
}

/// Ready when a model serves (in any slot).
async fn ready(State(models): State<Arc<Models>>) -> Response {
    match models.serving().first() {
        Some(_) => axum::Json(json!({"ready": true})).into_response(),
        // OIP v2: 200 means ready, a 4xx not ready (Triton answers 400).
        None => (StatusCode::BAD_REQUEST, axum::Json(json!({"ready": false}))).into_response(),
    }
}

async fn server_metadata() -> Response {
    axum::Json(json!({"name": "outpost", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}))
        .into_response()
}

/// A model or version this device does not serve: 404 `no_model`, or 503
/// `no_model` (retry later) when nothing is deployed at all.
struct NotServed(StatusCode, String);

impl IntoResponse for NotServed {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1, "code": ErrorCode::NoModel}))).into_response()
    }
}

/// The engine and active model the path names: a model slot serving by
/// that name, else the default slot's model by the model's name.
fn find(models: &Models, name: &str, version: Option<&str>) -> Result<(Arc<Engine>, Arc<Model>), NotServed> {
    let (engine, model) = match models.route(name) {
        Route::Slot(engine) => match (engine.active(), models.default.active()) {
            (Some(m), _) => (engine, m),
            // An empty slot does not hide a default-slot model of that name.
            (None, Some(m)) if m.name == name => (models.default.clone(), m),
            (None, _) => {
                return Err(NotServed(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("model slot '{name}' has no model deployed"),
                ));
            }
        },
        Route::Default(engine) => {
            let Some(model) = engine.active() else {
                let slots = models.serving();
                return Err(match slots.is_empty() {
                    true => NotServed(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("model '{name}' is not served here: no model is deployed"),
                    ),
                    false => NotServed(StatusCode::NOT_FOUND, not_here(name, &slots)),
                });
            };
            if model.name != name {
                return Err(NotServed(StatusCode::NOT_FOUND, not_here(name, &models.serving())));
            }
            (engine, model)
        }
    };
    if let Some(v) = version
        && v != model.version
    {
        return Err(NotServed(
            StatusCode::NOT_FOUND,
            format!("version '{v}' of '{name}' is not served here; this device serves version '{}'", model.version),
        ));
    }
    Ok((engine, model))
}

/// "model 'x' is not served here; this device serves 'a', 'b'".
fn not_here(name: &str, serving: &[(String, Arc<Model>)]) -> String {
    let names: Vec<String> = serving.iter().map(|(n, _)| format!("'{n}'")).collect();
    format!("model '{name}' is not served here; this device serves {}", names.join(", "))
}

async fn metadata(State(models): State<Arc<Models>>, name: String, version: Option<String>) -> Response {
    let model = match find(&models, &name, version.as_deref()) {
        Ok((_, m)) => m,
        // Metadata of a model that is not here is a 404, deployed or not.
        Err(NotServed(_, message)) => return NotServed(StatusCode::NOT_FOUND, message).into_response(),
    };
    let tensors = |list: Vec<(String, &str, Vec<i64>)>| {
        list.into_iter().map(|(n, d, s)| json!({"name": n, "datatype": d, "shape": s})).collect::<Vec<_>>()
    };
    axum::Json(json!({
        "name": name,
        "versions": [model.version],
        "platform": model.platform(),
        "inputs": tensors(model.input_signature()),
        "outputs": tensors(model.output_signature()),
    }))
    .into_response()
}

async fn model_ready(State(models): State<Arc<Models>>, name: String, version: Option<String>) -> Response {
    match find(&models, &name, version.as_deref()) {
        Ok(_) => axum::Json(json!({"name": name, "ready": true})).into_response(),
        // OIP v2: not ready is a 4xx; 404 for a model not served here.
        Err(NotServed(status, message)) => {
            let status = if status == StatusCode::NOT_FOUND { status } else { StatusCode::BAD_REQUEST };
            (status, axum::Json(json!({"name": name, "ready": false, "error": message}))).into_response()
        }
    }
}

async fn infer(
    State(models): State<Arc<Models>>,
    axum::Extension(admission): axum::Extension<Arc<Admission>>,
    name: String,
    version: Option<String>,
    request: axum::extract::Request,
) -> Response {
    let (engine, model) = match find(&models, &name, version.as_deref()) {
        Ok(found) => found,
        Err(r) => {
            // The device's counters only: no slot's telemetry takes the blame.
            models.default.count_device_refusal(ErrorCode::NoModel, Transport::Http);
            return r.into_response();
        }
    };
    let headers = request.headers();
    let binary_header = match headers.get(outpost_protocol::binary::HEADER) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("Inference-Header-Content-Length: expected a byte count, found {v:?}"),
                );
            }
        },
    };
    // Admission, before a byte of the body is read: its size against the
    // cap, a free place in the queue, and room among the bytes in flight.
    let limits = admission.limits;
    let (cap, why) = match model.max_body_bytes() {
        Some(m) if m < limits.max_body => (m, "what this model's input shapes need"),
        _ => (limits.max_body, "http.max_body"),
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if let Some(n) = declared
        && n > cap
    {
        return refused(
            &engine,
            ErrorCode::TooLarge,
            format!("the body is {n} bytes, over the limit of {cap} bytes ({why})"),
        );
    }
    if !engine.has_room() {
        return refused(
            &engine,
            ErrorCode::Overloaded,
            "every worker is busy and the queue is full: retry later".into(),
        );
    }
    let hold = declared.unwrap_or(cap).saturating_mul(PARSED_FACTOR).div_ceil(1024).max(1);
    let Ok(_held) = admission.inflight_kib.clone().try_acquire_many_owned(hold.min(u32::MAX as usize) as u32) else {
        return refused(
            &engine,
            ErrorCode::Overloaded,
            format!(
                "the requests in flight already hold close to {} bytes (http.max_inflight_bytes): retry later",
                limits.max_inflight_bytes
            ),
        );
    };
    let body = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(request.into_body(), cap)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some());
            return match too_large {
                true => {
                    refused(&engine, ErrorCode::TooLarge, format!("the body is over the limit of {cap} bytes ({why})"))
                }
                false => error(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")),
            };
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {} s (http.body_timeout)", limits.body_timeout.as_secs()),
            );
        }
    };
    // The swap may happen between `find` and the run: the answer names the
    // version that computed it, as over MQTT.
    let answer = engine.infer_body(&body, binary_header, Transport::Http).await;
    match answer.result {
        Ok(resp) => match outpost_protocol::binary::encode_response(&resp, &answer.binary) {
            (body, None) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            (body, Some(n)) => (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::HeaderName::from_static(outpost_protocol::binary::HEADER), n.to_string()),
                ],
                body,
            )
                .into_response(),
        },
        Err(f) => coded(f.code, f.message),
    }
}

/// A request refused before its body was read, counted like the engine's refusals.
fn refused(engine: &Engine, code: ErrorCode, message: String) -> Response {
    engine.count_refusal(code, Transport::Http);
    coded(code, message)
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    let text = super::metrics::render(&engine);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Serves the router on `listener` until `shutdown` completes; connections
/// still open then get at most 2 s more, or all the time they need when the
/// agent is `stopping` (its drain bounds that by the grace period).
///
/// Each connection is hyper's HTTP/1 with a tokio timer, so the header
/// timeout holds; past `max_connections` a connection is answered 503 and
/// closed at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    models: Arc<Models>,
    admission: Arc<Admission>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let engine = models.default.clone();
    let app = router(models, admission.clone());
    serve_app(listener, app, Some(engine), admission, shutdown, stopping).await
}

/// `/metrics` alone, for `metrics.bind`: a central Prometheus can scrape it
/// without reaching the inference routes.
pub fn metrics_router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "only /metrics is served on this address (metrics.bind)") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics") })
        .with_state(engine)
}

/// Serves the `/metrics` address of `metrics.bind` until the agent stops.
pub async fn serve_metrics(listener: tokio::net::TcpListener, engine: Arc<Engine>) {
    let admission = Admission::new(Limits { max_connections: 16, ..Limits::default() });
    let app = metrics_router(engine);
    serve_app(listener, app, None, admission, std::future::pending(), Default::default()).await
}

/// The connection loop under `app`; connections over the cap are counted
/// as refused requests of `engine` when it is given (the inference port).
async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    engine: Option<Arc<Engine>>,
    admission: Arc<Admission>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let connections = tokio_util::task::TaskTracker::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most often: wait for some to close.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // No Nagle delay on answers: a client waits for each one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let Ok(permit) = admission.connections.clone().try_acquire_owned() else {
            if let Some(engine) = &engine {
                engine.count_refusal(ErrorCode::Overloaded, Transport::Http);
            }
            tokio::spawn(turn_away(tcp, admission.limits.max_connections));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let header_timeout = admission.limits.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    connections.close();
    if stopping.load(std::sync::atomic::Ordering::SeqCst) {
        connections.wait().await;
    } else {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), connections.wait()).await;
    }
}

/// A connection over the cap: a 503 with the reason, then closed.
async fn turn_away(mut tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = format!(
        "{{\"error\":\"overloaded: this endpoint already holds {max} connections (http.max_connections); retry later\"}}"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = tcp.write_all(head.as_bytes()).await;
        let _ = tcp.write_all(body.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// The local endpoint, which a deployment's `serving.http_port` can move to
/// another port without a restart: the new port is bound first (if that
/// fails, nothing changes), then the old one stops taking connections and
/// lets the open ones finish (at most 2 s).
#[derive(Debug)]
pub struct Endpoint {
    ip: std::net::IpAddr,
    /// The port of `--http-bind`, used when a deployment names none.
    default_port: u16,
    models: Arc<Models>,
    runtime: tokio::runtime::Handle,
    admission: Arc<Admission>,
    current: std::sync::Mutex<Option<Running>>,
    /// Set by [`Endpoint::stop`]: no new port, and requests in flight get
    /// all the time the agent's drain gives them.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Listens on `bind` (the agent's `--http-bind`), or on `port` of the same
    /// address when the restored deployment names one and it is free.
    pub fn start(
        bind: std::net::SocketAddr,
        port: Option<u16>,
        models: Arc<Models>,
        limits: Limits,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Endpoint> {
        let ep = Endpoint {
            ip: bind.ip(),
            default_port: bind.port(),
            models,
            runtime,
            admission: Admission::new(limits),
            current: std::sync::Mutex::new(None),
            stopping: Default::default(),
        };
        if let Some(p) = port.filter(|p| *p != bind.port()) {
            match ep.move_to(Some(p)) {
                Ok(()) => return Ok(ep),
                Err(e) => tracing::error!(error = %e, "the deployment's HTTP port is not available; using --http-bind"),
            }
        }
        let listener = ep.bind(bind)?;
        ep.run(listener);
        Ok(ep)
    }

    /// Where it listens now.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.lock().as_ref().map(|r| r.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bind(&self, addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let _guard = self.runtime.enter();
        tokio::net::TcpListener::from_std(l)
    }

    fn run(&self, listener: tokio::net::TcpListener) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            // The agent is stopping: the listener closes as it drops.
            return;
        }
        let addr = listener.local_addr().unwrap_or_else(|_| std::net::SocketAddr::new(self.ip, self.default_port));
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = self.runtime.spawn(serve(
            listener,
            self.models.clone(),
            self.admission.clone(),
            async move {
                let _ = rx.await;
            },
            self.stopping.clone(),
        ));
        tracing::info!(%addr, "Open Inference Protocol endpoint listening");
        if let Some(old) = self.lock().replace(Running { addr, stop, task }) {
            tracing::info!(addr = %old.addr, "the HTTP endpoint moved; the old port closes");
            let _ = old.stop.send(());
        }
    }

    /// Moves to `port` on the same address (`None`: the `--http-bind` port).
    /// Call from a blocking thread. On error the endpoint stays where it was.
    pub fn move_to(&self, port: Option<u16>) -> Result<(), outpost_protocol::ErrorInfo> {
        if let Some(listener) = self.bind_port(port)? {
            self.take_over(listener);
        }
        Ok(())
    }

    /// Binds `port` (`None`: the `--http-bind` port) without moving to it
    /// yet: None when the endpoint is there already. A deployment binds its
    /// port before its swap (where a taken port fails it, changing nothing)
    /// and moves at the swap ([`Endpoint::take_over`]).
    pub fn bind_port(&self, port: Option<u16>) -> Result<Option<tokio::net::TcpListener>, outpost_protocol::ErrorInfo> {
        let addr = std::net::SocketAddr::new(self.ip, port.unwrap_or(self.default_port));
        if self.addr() == Some(addr) {
            return Ok(None);
        }
        self.bind(addr).map(Some).map_err(|e| {
            outpost_protocol::ErrorInfo::new(
                ErrorCode::PortUnavailable,
                format!(
                    "serving.http_port: cannot listen on {addr}: {e}; the HTTP endpoint stays on {}",
                    self.addr().map(|a| a.to_string()).unwrap_or_else(|| "none".into())
                ),
            )
        })
    }

    /// Moves to a port bound by [`Endpoint::bind_port`]: the old one stops
    /// taking connections and lets the open ones finish.
    pub fn take_over(&self, listener: tokio::net::TcpListener) {
        self.run(listener);
    }

    /// Stops listening; open connections finish (the caller bounds the wait).
    pub async fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let running = self.lock().take();
        if let Some(r) = running {
            let _ = r.stop.send(());
            let _ = r.task.await;
        }
    }
}
