//! The serving side: the active model behind an atomically swapped handle and
//! a bounded pool of blocking workers.
//!
//! Requests in flight keep the `Arc<Model>` they started with; a swap only
//! changes what new requests get, and the old model is freed when its last
//! request ends. When every worker is busy and the queue is full, a request
//! is refused at once with `overloaded` instead of queueing without bound.

use crate::engine::{InferFailure, Model};
use arc_swap::ArcSwapOption;
use outpost_protocol::{ErrorCode, InferRequest, InferResponse};
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
    pub result: Result<InferResponse, InferFailure>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub rejected: AtomicU64,
}

#[derive(Debug)]
pub struct Engine {
    active: ArcSwapOption<Model>,
    /// The worker pool's bounds, swapped whole when a deployment sets new ones;
    /// requests already admitted keep the permits of the pool they entered.
    pool: arc_swap::ArcSwap<Pool>,
    pub counters: Counters,
    /// Per-interval latencies of answered requests, for telemetry.
    pub latencies: crate::telemetry::Latencies,
}

impl Engine {
    pub fn new(workers: usize, max_queue: usize) -> Engine {
        Engine {
            active: ArcSwapOption::empty(),
            pool: arc_swap::ArcSwap::from_pointee(Pool::new(workers, max_queue)),
            counters: Counters::default(),
            latencies: Default::default(),
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

    /// The model serving now.
    pub fn active(&self) -> Option<Arc<Model>> {
        self.active.load_full()
    }

    /// Makes `model` serve new requests; returns the one it replaces.
    pub fn swap(&self, model: Option<Arc<Model>>) -> Option<Arc<Model>> {
        self.active.swap(model)
    }

    /// Runs a request body as it arrived (over MQTT or HTTP): parsed once; a
    /// body that is not a request is counted as a failed request and answered
    /// `bad_input` with the field at fault.
    pub async fn infer_body(&self, body: &[u8]) -> Answer {
        match InferRequest::from_json(body) {
            Ok(mut req) => {
                let (id, reply_to) = (req.id.clone(), req.reply_to.take());
                Answer { id, reply_to, result: self.infer(req).await }
            }
            Err(e) => {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                let (id, reply_to) = InferRequest::salvage(body);
                Answer { id, reply_to, result: Err(InferFailure { code: e.code, message: e.to_string() }) }
            }
        }
    }

    /// Runs one request on a worker thread, or refuses it at once.
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, InferFailure> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = self.infer_inner(req).await;
        if result.is_ok() {
            self.latencies.record(started.elapsed().as_micros() as u64);
        }
        if let Err(e) = &result {
            let counter = if e.code == ErrorCode::Overloaded { &self.counters.rejected } else { &self.counters.errors };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn infer_inner(&self, req: InferRequest) -> Result<InferResponse, InferFailure> {
        let Some(model) = self.active.load_full() else {
            return Err(InferFailure {
                code: ErrorCode::NoModel,
                message: "no model is deployed on this device".into(),
            });
        };
        let pool = self.pool.load_full();
        let Ok(_admitted) = pool.admission.clone().try_acquire_owned() else {
            return Err(InferFailure {
                code: ErrorCode::Overloaded,
                message: "every worker is busy and the queue is full: retry later".into(),
            });
        };
        let _worker = pool
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| InferFailure { code: ErrorCode::Internal, message: "worker pool closed".into() })?;
        tokio::task::spawn_blocking(move || model.infer(&req))
            .await
            .map_err(|e| InferFailure { code: ErrorCode::Internal, message: format!("inference worker failed: {e}") })?
    }
}
