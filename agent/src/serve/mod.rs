//! The serving side: the active model behind an atomically swapped handle and
//! a bounded pool of blocking workers.
//!
//! Requests in flight keep the `Arc<Model>` they started with; a swap only
//! changes what new requests get, and the old model is freed when its last
//! request ends. When every worker is busy and the queue is full, a request
//! is refused at once with `overloaded` instead of queueing without bound.

pub mod backend;
pub(crate) mod http;
pub(crate) mod latency;
pub mod metrics;
pub mod model;
pub mod models;
pub(crate) mod mqtt;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub(crate) mod probation;
pub mod shadow;

use arc_swap::ArcSwapOption;
pub use metrics::Transport;
use model::{InferFailure, Model};
use outpost_protocol::{ErrorCode, InferRequest, InferResponse};
use probation::{Limits, Outcome as ProbationOutcome, Verdict, Watch};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Semaphore;

/// Default inference worker threads.
pub const DEFAULT_WORKERS: usize = 2;
/// Default requests allowed to wait for a worker.
pub const DEFAULT_MAX_QUEUE: usize = 64;

/// Bounds of the worker pool.
#[derive(Debug)]
struct Pool {
    /// Admission: workers + queue slots. Failing to get one means `overloaded`.
    admission: Arc<Semaphore>,
    /// Concurrency: one permit per worker thread.
    workers: Arc<Semaphore>,
    sizes: (usize, usize),
}

impl Pool {
    fn new(workers: usize, max_queue: usize) -> Pool {
        let workers = workers.max(1);
        Pool {
            admission: Arc::new(Semaphore::new(workers + max_queue)),
            workers: Arc::new(Semaphore::new(workers)),
            sizes: (workers, max_queue),
        }
    }
}

/// The outcome of one request body, with what the transport needs to answer it.
#[derive(Debug)]
pub struct Answer {
    pub id: Option<String>,
    /// MQTT only: where the client asked the answer to go.
    pub reply_to: Option<String>,
    /// HTTP only: the outputs the client wants in binary form.
    pub binary: outpost_protocol::binary::BinaryOutputs,
    pub result: Result<InferResponse, InferFailure>,
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Requests admitted and waiting for a worker.
    pub waiting: AtomicU64,
    /// Requests a worker is running.
    pub running: AtomicU64,
    /// Automatic rollbacks after a failed probation.
    pub rollbacks: AtomicU64,
    /// MQTT requests whose reply topic is outside the reply prefixes.
    pub reply_refused: AtomicU64,
    /// Latencies of answered requests since start (for `/metrics`).
    pub latency: Histogram,
    /// The labelled counters of `/metrics`.
    pub tally: Arc<metrics::Tally>,
}

/// Upper bounds of the latency histogram buckets, in microseconds.
/// From 10 µs: a small model answers in tens of microseconds.
pub const LATENCY_BUCKETS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A cumulative latency histogram with fixed buckets (Prometheus style).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is +Inf, the total) and the sum in µs.
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        let mut acc = 0;
        let cumulative = self.counts.iter().map(|c| {
            acc += c.load(Ordering::Relaxed);
            acc
        });
        (cumulative.collect(), self.sum_us.load(Ordering::Relaxed))
    }
}

/// Decrements a gauge when dropped (a request leaving the queue or a worker).
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(g: &'a AtomicU64) -> Gauge<'a> {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A version on probation: the model, the one it replaced (kept loaded for
/// an instant rollback, and to answer requests the new one fails), and the
/// token its verdict carries.
#[derive(Debug)]
struct OnProbation {
    token: u64,
    model: Arc<Model>,
    previous: Arc<Model>,
    watch: Watch,
}

/// The end of a probation, sent to the deployer to record and report.
#[derive(Debug)]
pub struct ProbationEnd {
    /// Which probation this judges ([`Engine::swap_on_probation`]'s token).
    pub token: u64,
    pub model: Arc<Model>,
    pub previous: Arc<Model>,
    /// `Fail` (already rolled back) or `Pass`.
    pub verdict: Verdict,
}

/// A sampled request and its answer, for the `capture` topic (the feedback loop).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capture {
    pub schema: &'static str,
    pub at: String,
    pub model_name: String,
    pub model_version: String,
    pub request: InferRequest,
    pub response: InferResponse,
}

/// Most captures per second, whatever the rate: capture must not crowd out the device's link.
pub const CAPTURES_PER_SECOND: u32 = 10;

/// Latencies of the last requests, to know the serving version's p99 at a swap.
const RECENT: usize = 1024;

#[derive(Debug)]
pub struct Engine {
    active: ArcSwapOption<Model>,
    probation: std::sync::Mutex<Option<OnProbation>>,
    /// Whether `probation` holds a version: lets every request outside a
    /// probation window skip the lock.
    on_probation: std::sync::atomic::AtomicBool,
    probation_tokens: AtomicU64,
    verdicts: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<ProbationEnd>>>,
    /// (model identity, latency in µs) of the last requests.
    recent: std::sync::Mutex<std::collections::VecDeque<(usize, u64)>>,
    /// Share of answered requests captured (the deployment's `capture_rate`), as f64 bits.
    capture_rate: AtomicU64,
    /// Where captures go, and the (second, count) of the rate limit.
    captures: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Capture>>>,
    capture_budget: std::sync::Mutex<(u64, u32)>,
    /// The worker pool's bounds, swapped whole when a deployment sets new ones;
    /// requests already admitted keep the permits of the pool they entered.
    pool: arc_swap::ArcSwap<Pool>,
    /// Shared by the engines of every model slot: `/metrics` counts the device.
    pub counters: Arc<Counters>,
    /// Per-interval latencies of answered requests, for telemetry.
    pub(crate) latencies: latency::Latencies,
    /// What the agent loop adds to `/metrics` (MQTT link, journal, store).
    pub metrics_source: std::sync::OnceLock<Box<dyn metrics::Source>>,
    /// This engine's own requests, errors and refusals as overloaded (the
    /// shared `counters` count the device's): its slot's telemetry.
    pub(crate) own: [AtomicU64; 4],
    /// The candidate scored in shadow beside the active model, if any.
    shadow: ArcSwapOption<shadow::Shadow>,
}

impl Engine {
    pub fn new(workers: usize, max_queue: usize) -> Engine {
        Engine::sharing(workers, max_queue, Default::default())
    }

    /// An engine of its own (a model slot's: its own model, worker pool,
    /// probation and latencies) counting into `counters`.
    pub fn sharing(workers: usize, max_queue: usize, counters: Arc<Counters>) -> Engine {
        Engine {
            active: ArcSwapOption::empty(),
            probation: Default::default(),
            on_probation: Default::default(),
            probation_tokens: AtomicU64::new(0),
            verdicts: Default::default(),
            recent: Default::default(),
            capture_rate: AtomicU64::new(0),
            captures: Default::default(),
            capture_budget: Default::default(),
            pool: arc_swap::ArcSwap::from_pointee(Pool::new(workers, max_queue)),
            counters,
            latencies: Default::default(),
            metrics_source: Default::default(),
            own: Default::default(),
            shadow: ArcSwapOption::empty(),
        }
    }

    /// Workers and queue length in force.
    pub fn pool_sizes(&self) -> (usize, usize) {
        self.pool.load().sizes
    }

    /// Sets workers and queue length (a deployment's `serving`); a no-op when unchanged.
    pub fn resize(&self, workers: usize, max_queue: usize) {
        if self.pool_sizes() != (workers.max(1), max_queue) {
            self.pool.store(Arc::new(Pool::new(workers, max_queue)));
        }
    }

    /// Name and version of the model on probation, if one is.
    pub fn probation_of(&self) -> Option<(String, String)> {
        if !self.on_probation.load(Ordering::SeqCst) {
            return None;
        }
        self.lock_probation().as_ref().map(|p| (p.model.name.clone(), p.model.version.clone()))
    }

    /// The model serving now.
    pub fn active(&self) -> Option<Arc<Model>> {
        self.active.load_full()
    }

    /// Makes `model` serve new requests; returns the one it replaces. Ends
    /// any probation (a newer deployment or an undeploy decides now).
    pub fn swap(&self, model: Option<Arc<Model>>) -> Option<Arc<Model>> {
        self.take_probation(&mut self.lock_probation(), |_| true);
        self.active.swap(model)
    }

    /// Ends the probation in `guard` if `which` picks it.
    fn take_probation(
        &self,
        guard: &mut Option<OnProbation>,
        which: impl FnOnce(&mut OnProbation) -> bool,
    ) -> Option<OnProbation> {
        let p = guard.take_if(which);
        if guard.is_none() {
            self.on_probation.store(false, Ordering::SeqCst);
        }
        p
    }

    /// Sets the share of requests captured (the deployment's `serving.capture_rate`).
    pub fn set_capture_rate(&self, rate: f64) {
        self.capture_rate.store(rate.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Where captures go (the agent's publisher).
    pub fn on_capture(&self, tx: tokio::sync::mpsc::UnboundedSender<Capture>) {
        *self.captures.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Draws whether this request is captured: by the rate, then within
    /// [`CAPTURES_PER_SECOND`].
    fn sample_capture(&self) -> bool {
        let rate = f64::from_bits(self.capture_rate.load(Ordering::Relaxed));
        if rate <= 0.0 || crate::sys::jitter() >= rate {
            return false;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut b = self.capture_budget.lock().unwrap_or_else(|p| p.into_inner());
        if b.0 != now {
            *b = (now, 0);
        }
        b.1 += 1;
        b.1 <= CAPTURES_PER_SECOND
    }

    fn capture(&self, request: InferRequest, response: &InferResponse) {
        if let Some(tx) = self.captures.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(Capture {
                schema: "outpost.capture.v1",
                at: crate::sys::now_rfc3339(),
                model_name: response.model_name.clone(),
                model_version: response.model_version.clone(),
                request,
                response: response.clone(),
            });
        }
    }

    /// Where probation verdicts go (the agent's reporter).
    pub fn on_probation_end(&self, tx: tokio::sync::mpsc::UnboundedSender<ProbationEnd>) {
        *self.verdicts.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn lock_probation(&self) -> std::sync::MutexGuard<'_, Option<OnProbation>> {
        self.probation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in `model` on probation: until the window closes it is watched,
    /// requests it fails are answered by the version it replaced, and
    /// breaking a limit swaps that version back at once. The version it
    /// replaces is read under the probation lock, so a rollback in progress
    /// is seen: returns the probation's token and that version, or None (no
    /// model served, or the same version) after a plain swap. Any probation
    /// in progress ends (without a verdict: it was replaced).
    pub fn swap_on_probation(&self, model: Arc<Model>, limits: Limits) -> Option<(u64, Arc<Model>)> {
        let mut p = self.lock_probation();
        self.take_probation(&mut p, |_| true);
        let previous = self.active.load_full().filter(|m| m.manifest_sha256 != model.manifest_sha256);
        let Some(previous) = previous else {
            self.active.store(Some(model));
            return None;
        };
        let baseline = {
            let id = Arc::as_ptr(&previous) as usize;
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let samples: Vec<u64> = recent.iter().filter(|(m, _)| *m == id).map(|(_, us)| *us).collect();
            probation::p99_us(&samples).map(std::time::Duration::from_micros)
        };
        let token = self.probation_tokens.fetch_add(1, Ordering::Relaxed) + 1;
        *p = Some(OnProbation {
            token,
            model: model.clone(),
            previous: previous.clone(),
            watch: Watch::new(limits, baseline),
        });
        self.on_probation.store(true, Ordering::SeqCst);
        self.active.store(Some(model));
        Some((token, previous))
    }

    /// Closes the window of probation `token` (if it is still running): the
    /// version passes, or is rolled back if it broke a limit.
    pub fn close_probation(&self, token: u64) {
        let mut guard = self.lock_probation();
        if let Some(p) = self.take_probation(&mut guard, |p| p.token == token) {
            let verdict = p.watch.close();
            self.end_probation(p, verdict);
        }
    }

    /// Reports a verdict; on `Fail`, first puts the previous version back
    /// (unless something else was swapped in meanwhile).
    fn end_probation(&self, p: OnProbation, verdict: Verdict) {
        if matches!(verdict, Verdict::Fail(_)) {
            self.counters.rollbacks.fetch_add(1, Ordering::Relaxed);
            let current = self.active.load();
            if current.as_ref().is_some_and(|m| Arc::ptr_eq(m, &p.model)) {
                self.active.store(Some(p.previous.clone()));
            }
        }
        if let Some(tx) = self.verdicts.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(ProbationEnd { token: p.token, model: p.model, previous: p.previous, verdict });
        }
    }

    /// Counts a request the model on probation ran; rolls back on a breach.
    fn watch(&self, model: &Arc<Model>, outcome: ProbationOutcome) {
        if !self.on_probation.load(Ordering::SeqCst) {
            return;
        }
        let mut guard = self.lock_probation();
        let Some(p) = guard.as_mut().filter(|p| Arc::ptr_eq(&p.model, model)) else { return };
        if let Verdict::Fail(e) = p.watch.record(outcome)
            && let Some(p) = self.take_probation(&mut guard, |_| true)
        {
            self.end_probation(p, Verdict::Fail(e));
        }
    }

    /// The version a request to `model` falls back to while `model` is on probation.
    fn fallback_for(&self, model: &Arc<Model>) -> Option<Arc<Model>> {
        if !self.on_probation.load(Ordering::SeqCst) {
            return None;
        }
        self.lock_probation().as_ref().filter(|p| Arc::ptr_eq(&p.model, model)).map(|p| p.previous.clone())
    }

    /// Requests admitted and not yet answered (waiting or running).
    pub fn in_flight(&self) -> u64 {
        self.counters.waiting.load(std::sync::atomic::Ordering::Relaxed)
            + self.counters.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn remember_latency(&self, model: &Arc<Model>, us: u64) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back((Arc::as_ptr(model) as usize, us));
    }

    /// Runs a request body as it arrived (over MQTT or HTTP): parsed once; a
    /// body that is not a request is counted as a failed request and answered
    /// `bad_input` with the field at fault. `binary_header` is the length of
    /// the JSON part of a body in the binary tensor extension (HTTP).
    pub async fn infer_body(&self, body: &[u8], binary_header: Option<usize>, transport: Transport) -> Answer {
        let parsed = match binary_header {
            Some(n) => outpost_protocol::binary::decode_request(body, n),
            None => InferRequest::from_json(body),
        };
        match parsed {
            Ok(mut req) => {
                let (id, reply_to) = (req.id.clone(), req.reply_to.take());
                let binary = outpost_protocol::binary::BinaryOutputs::of(&req);
                let sampled = self.sample_capture().then(|| req.clone());
                let result = self.infer(req, transport).await;
                if let (Some(req), Ok(resp)) = (sampled, &result) {
                    self.capture(req, resp);
                }
                Answer { id, reply_to, binary, result }
            }
            Err(e) => {
                let head = binary_header.and_then(|n| body.get(..n)).unwrap_or(body);
                self.refuse(head, InferFailure::new(e.code, e.to_string()), transport)
            }
        }
    }

    /// Answers a body that is not run (unreadable, or over a size limit):
    /// counted as a failed request, answered with `failure` under the `id`
    /// and `reply_to` salvaged from it.
    pub fn refuse(&self, body: &[u8], failure: InferFailure, transport: Transport) -> Answer {
        self.count_refusal(failure.code, transport);
        let (id, reply_to) = InferRequest::salvage(body);
        Answer { id, reply_to, binary: Default::default(), result: Err(failure) }
    }

    /// Whether a request would find a place in the queue now (checked before
    /// a body is read; the run takes its place for real).
    pub fn has_room(&self) -> bool {
        self.pool.load().admission.available_permits() > 0
    }

    /// Counts a request refused before it was read (`overloaded` or too large).
    pub fn count_refusal(&self, code: ErrorCode, transport: Transport) {
        self.count_request(transport);
        self.count_error(code, transport);
    }

    /// Counts a request no model of this device took (a name not served
    /// here) in `/metrics` only (labelled with this engine's model, as
    /// before model slots), not in this engine's own telemetry.
    pub fn count_device_refusal(&self, code: ErrorCode, transport: Transport) {
        let active = self.active.load();
        self.counters.tally.request(transport, active.as_ref().map_or("", |m| m.name.as_str()));
        self.counters.tally.error(transport, code);
    }

    /// This engine's requests, errors other than `overloaded`, `overloaded`
    /// refusals, and requests the model failed (`inference_failed`) since start.
    pub fn own_counts(&self) -> [u64; 4] {
        self.own.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    fn count_request(&self, transport: Transport) {
        self.own[0].fetch_add(1, Ordering::Relaxed);
        let active = self.active.load();
        self.counters.tally.request(transport, active.as_ref().map_or("", |m| m.name.as_str()));
    }

    fn count_error(&self, code: ErrorCode, transport: Transport) {
        // Errors other than `overloaded`, and `overloaded`, as telemetry reports them.
        self.own[if code == ErrorCode::Overloaded { 2 } else { 1 }].fetch_add(1, Ordering::Relaxed);
        if code == ErrorCode::InferenceFailed {
            self.own[3].fetch_add(1, Ordering::Relaxed);
        }
        self.counters.tally.error(transport, code);
    }

    /// Sets the candidate scored in shadow (None: none); returns the one it replaces.
    pub fn set_shadow(&self, shadow: Option<Arc<shadow::Shadow>>) -> Option<Arc<shadow::Shadow>> {
        self.shadow.swap(shadow)
    }

    pub fn shadow(&self) -> Option<Arc<shadow::Shadow>> {
        self.shadow.load_full()
    }

    /// Runs one request on a worker thread, or refuses it at once.
    pub async fn infer(&self, req: InferRequest, transport: Transport) -> Result<InferResponse, InferFailure> {
        self.count_request(transport);
        let started = std::time::Instant::now();
        // Claimed before the request is copied: a busy candidate costs nothing.
        let shadow = self.shadow.load_full().filter(|s| s.sampled()).and_then(|s| s.claim()).map(|c| (c, req.clone()));
        let result = self.infer_inner(req).await;
        if let Ok(resp) = &result {
            let us = started.elapsed().as_micros() as u64;
            self.latencies.record(us);
            self.counters.latency.record(us);
            if let Some((s, req)) = shadow {
                s.score(req, resp.clone(), us);
            }
        }
        if let Err(e) = &result {
            self.count_error(e.code, transport);
        }
        result
    }

    async fn infer_inner(&self, req: InferRequest) -> Result<InferResponse, InferFailure> {
        let Some(model) = self.active.load_full() else {
            return Err(InferFailure::new(ErrorCode::NoModel, "no model is deployed on this device"));
        };
        let pool = self.pool.load_full();
        let Ok(_admitted) = pool.admission.clone().try_acquire_owned() else {
            return Err(InferFailure::new(
                ErrorCode::Overloaded,
                "every worker is busy and the queue is full: retry later",
            ));
        };
        let queued = Gauge::enter(&self.counters.waiting);
        let _worker = pool
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| InferFailure::new(ErrorCode::Internal, "worker pool closed"))?;
        drop(queued);
        let _running = Gauge::enter(&self.counters.running);
        let fallback = self.fallback_for(&model);
        let m = model.clone();
        let inline = model.runs_inline(&req);
        let work = move || {
            let t = std::time::Instant::now();
            // Without a fallback the request is not needed again: its big
            // inputs move into the model instead of being copied.
            let (first, kept) = match &fallback {
                Some(_) => (m.infer(&req), Some(req)),
                None => (m.infer_owned(req), None),
            };
            let took = t.elapsed();
            // A version on probation that fails a valid request: the version
            // it replaced answers instead, so the client sees no failure.
            let second = match (&first, fallback, kept) {
                (Err(e), Some(previous), Some(req)) if e.is_model_failure() => Some(previous.infer(&req)),
                _ => None,
            };
            (first, took, second)
        };
        // A model that answers in microseconds runs here: handing it to the
        // blocking pool and back would cost more than the run.
        let (first, took, second) = if inline {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|_| InferFailure::new(ErrorCode::Internal, "inference worker failed: the model panicked"))?
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| InferFailure::new(ErrorCode::Internal, format!("inference worker failed: {e}")))?
        };
        match &first {
            Ok(_) => {
                self.remember_latency(&model, took.as_micros() as u64);
                self.watch(&model, ProbationOutcome::Answered(took));
            }
            Err(e) if e.is_model_failure() => {
                self.watch(&model, ProbationOutcome::Failed { message: e.message.clone(), non_finite: e.non_finite })
            }
            Err(_) => {}
        }
        if let Some(second) = second {
            if let Err(e) = &first {
                tracing::warn!(model = %model.version, error = %e, "the version on probation failed a request; the previous version answered it");
            }
            return second;
        }
        first
    }
}
