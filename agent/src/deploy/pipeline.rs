//! One deployment up to its swap: manifest → files → version → memory
//! check → load → golden sample → the HTTP port bound. Runs on a blocking
//! thread and reports every phase; writes no state (the deployer swaps the
//! result in and records it). Any failure leaves the model already serving
//! untouched.

use crate::deploy::fetch::{Cancel, DownloadError, FetchError, Fetcher, MAX_MANIFEST_BYTES, OnRetry, Wanted, file_url};
use crate::deploy::isolate::{Bounds, Isolation};
use crate::deploy::store::Store;
use crate::report::Reporter;
use crate::serve::Engine;
use crate::serve::model::Model;
use outpost_protocol::{Deployment, ErrorCode, ErrorInfo, Manifest, Phase, Progress, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Minimum time between two `downloading` progress events.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// What a deployment needs to run, shared with the blocking thread it runs on.
#[derive(Debug)]
pub struct Pipeline {
    pub store: Arc<Store>,
    pub fetcher: Fetcher,
    pub engine: Arc<Engine>,
    pub reporter: Arc<Reporter>,
    /// The agent's limits (configuration; SIGHUP replaces them).
    pub limits: arc_swap::ArcSwap<Limits>,
    /// The local HTTP endpoint, which a deployment's `serving.http_port` moves (unset: HTTP is off).
    pub http: std::sync::OnceLock<Arc<crate::serve::http::Endpoint>>,
    /// Where a new version's first load and golden sample run.
    pub isolation: Isolation,
    /// The model slot it deploys to (None: the default slot).
    pub slot: Option<String>,
}

/// Limits from the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Workers and queue length when the deployment does not set them.
    pub workers: usize,
    pub max_queue: usize,
    /// Most bytes the store may hold (blobs and partial downloads); `None`: only the filesystem limits it.
    pub store_quota: Option<u64>,
    /// Largest bundle (sum of its files) accepted; `None`: no limit.
    pub max_model_size: Option<u64>,
    /// Memory the isolated validation may allocate; `None`: what the device
    /// has available (see `memory::validation_limit`).
    pub validation_memory: Option<u64>,
    /// Longest the isolated first load and golden sample may take.
    pub validation_timeout: Duration,
    /// Free space downloads leave on the filesystem.
    pub disk_reserve: u64,
    /// Restart: run the stored active version's golden sample again (isolated) before serving it.
    pub revalidate_at_start: bool,
    /// The crash-loop breaker's threshold.
    pub breaker: crate::deploy::breaker::Policy,
}

/// Default of `limits.validation_timeout`.
pub const DEFAULT_VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Default of `limits.disk_reserve`.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;

impl Limits {
    pub fn new(workers: usize, max_queue: usize) -> Limits {
        Limits {
            workers,
            max_queue,
            store_quota: None,
            max_model_size: None,
            validation_memory: None,
            validation_timeout: DEFAULT_VALIDATION_TIMEOUT,
            disk_reserve: DEFAULT_DISK_RESERVE,
            revalidate_at_start: false,
            breaker: Default::default(),
        }
    }
}

/// Milliseconds, to 0.01.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// How a deployment ended, when it did not end prepared.
#[derive(Debug)]
pub enum Ended {
    Failed(ErrorInfo),
    Superseded,
}

impl From<FetchError> for Ended {
    fn from(e: FetchError) -> Ended {
        match e {
            FetchError::Cancelled => Ended::Superseded,
            FetchError::Failed(e) => Ended::Failed(e),
        }
    }
}

impl From<ErrorInfo> for Ended {
    fn from(e: ErrorInfo) -> Ended {
        Ended::Failed(e)
    }
}

/// A version ready to swap in: loaded, its golden sample reproduced, and
/// (if the deployment moves the HTTP endpoint) its port already bound.
#[derive(Debug)]
pub struct Prepared {
    pub model: Arc<Model>,
    /// The new port, bound; the endpoint moves to it at the swap (dropped,
    /// it closes: a superseded deployment moves nothing).
    pub listener: Option<tokio::net::TcpListener>,
    pub started: Instant,
    pub timings: outpost_protocol::Timings,
    /// The candidate the deployment scores in shadow, loaded and validated like the model.
    pub shadow: Option<Arc<Model>>,
}

/// The deployment of a deployment's shadow candidate: the same id,
/// revision and policy, the candidate's model, nothing else.
pub fn shadow_deployment(d: &Deployment) -> Option<Deployment> {
    let s = d.shadow.as_ref()?;
    Some(Deployment { model: s.model.clone(), shadow: None, serving: Default::default(), ..d.clone() })
}

impl Pipeline {
    /// The slot's key in the store's retention (`""`: the default slot).
    pub fn slot_key(&self) -> &str {
        self.slot.as_deref().unwrap_or("")
    }

    /// Everything up to (not including) the swap, reporting each phase.
    /// `protected`: versions retention may not evict to make room.
    /// `installing` is called (and must have recorded it) before the
    /// model's code first runs in this process: from then until the swap an
    /// unclean exit is blamed on it (the crash-loop breaker). Its error
    /// ends the deployment (`Cancelled`: the agent is stopping).
    pub fn prepare(
        &self,
        d: &Deployment,
        cancel: &Cancel,
        protected: &[String],
        installing: &dyn Fn() -> Result<(), FetchError>,
    ) -> Result<Prepared, Ended> {
        let started = Instant::now();
        let mut timings = outpost_protocol::Timings::default();
        let model = self.load(d, cancel, protected, installing, &mut timings)?;
        // The shadow candidate goes through the same steps (its events say which model).
        let shadow = match shadow_deployment(d) {
            Some(sd) => {
                let mut keep = protected.to_vec();
                keep.push(d.model.manifest_sha256.clone());
                let mut ignored = outpost_protocol::Timings::default();
                Some(self.load(&sd, cancel, &keep, installing, &mut ignored)?)
            }
            None => None,
        };
        // The port is the last thing that can fail: after it, the swap.
        let listener = match self.http.get() {
            Some(http) => http.bind_port(d.serving.http_port)?,
            None => None,
        };
        Ok(Prepared { model, listener, started, timings, shadow })
    }

    fn load(
        &self,
        d: &Deployment,
        cancel: &Cancel,
        protected: &[String],
        installing: &dyn Fn() -> Result<(), FetchError>,
        timings: &mut outpost_protocol::Timings,
    ) -> Result<Arc<Model>, FetchError> {
        let sha = &d.model.manifest_sha256;
        let t = Instant::now();
        let (dir, manifest) = match self.store.verify_version(sha) {
            Ok((dir, manifest, _)) => {
                timings.verify = ms(t.elapsed());
                self.reporter.event(
                    d,
                    Phase::Verifying,
                    None,
                    None,
                    Some("version already in the store: no download".into()),
                );
                (dir, manifest)
            }
            Err(_) => self.download(d, cancel, protected, timings)?,
        };
        if cancel.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        if manifest.name != d.model.name || manifest.version != d.model.version {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidManifest,
                format!(
                    "the manifest is {}@{}, the deployment names {}@{}",
                    manifest.name, manifest.version, d.model.name, d.model.version
                ),
            )
            .into());
        }
        let model_bytes = manifest.file(&manifest.model.file).map_or(0, |f| f.size);
        // One load at a time in the whole agent (every model slot): the
        // memory check and the validation's limit read what the system has
        // left, which a load running beside them would not show yet.
        let _loading = self.store.loading.lock().unwrap_or_else(|p| p.into_inner());
        crate::deploy::memory::check_fits(&manifest.model.file, model_bytes, crate::deploy::memory::available())?;
        self.reporter.event(d, Phase::Loading, None, None, Some(manifest.model.file.clone()));
        let model = match &self.isolation {
            Isolation::Child(exe) => {
                let bounds = self.bounds();
                let v = crate::deploy::isolate::validate(exe, &dir, sha, bounds, cancel)?;
                timings.load = v.load_ms;
                timings.validate = v.validate_ms;
                let notes: String = v.load_notes.iter().map(|n| format!("; {n}")).collect();
                let memory = bounds.memory.map_or_else(|| "no limit".into(), |m| format!("limit {} MiB", m >> 20));
                self.reporter.event(
                    d,
                    Phase::Validating,
                    None,
                    None,
                    Some(format!(
                        "loaded in {:.0} ms{notes}; golden sample run in {:.0} ms, isolated (peak {} MiB, {memory}, timeout {} s)",
                        v.load_ms,
                        v.validate_ms,
                        v.peak_bytes >> 20,
                        bounds.timeout.as_secs()
                    )),
                );
                if cancel.is_cancelled() {
                    return Err(FetchError::Cancelled);
                }
                // The same bytes just loaded within the limit: load them here,
                // and run them the way the validation settled.
                installing()?;
                Model::load_settled(&dir, &manifest, sha, &v.settled)?
            }
            Isolation::InProcess => {
                installing()?;
                let t = Instant::now();
                let mut load_detail = String::new();
                let model = crate::serve::backend::prepare(&dir, &manifest, sha, &mut |step| {
                    if let crate::serve::backend::Step::Loaded { load_ms, notes } = step {
                        timings.load = load_ms;
                        load_detail = format!(
                            "loaded in {load_ms:.0} ms{}",
                            notes.iter().map(|n| format!("; {n}")).collect::<String>()
                        );
                    }
                })?;
                if cancel.is_cancelled() {
                    return Err(FetchError::Cancelled);
                }
                self.reporter.event(d, Phase::Validating, None, None, Some(load_detail));
                timings.validate = (ms(t.elapsed()) - timings.load).max(0.0);
                model
            }
        };
        tracing::info!(model = %manifest.name, version = %manifest.version, "{}", model.validation);
        if cancel.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        Ok(Arc::new(model))
    }

    /// The isolated validation's limits now: the configured memory limit,
    /// or what this process could still allocate less a reserve.
    fn bounds(&self) -> Bounds {
        let limits = self.limits.load();
        Bounds {
            memory: limits
                .validation_memory
                .or_else(|| crate::deploy::memory::validation_limit(crate::deploy::memory::available())),
            timeout: limits.validation_timeout,
        }
    }

    fn download(
        &self,
        d: &Deployment,
        cancel: &Cancel,
        protected: &[String],
        timings: &mut outpost_protocol::Timings,
    ) -> Result<(PathBuf, Manifest), FetchError> {
        let t = Instant::now();
        let (fetcher, url, sha) = (self.fetcher.clone(), d.model.manifest_url.clone(), d.model.manifest_sha256.clone());
        let bytes = self.cancellable(d, "manifest.json", cancel, &mut |_| {}, move |c, on_retry, _| {
            fetcher.fetch_bytes(&url, "manifest.json", &sha, MAX_MANIFEST_BYTES, c, on_retry)
        })?;
        let manifest =
            Manifest::from_json(&bytes).map_err(|e| ErrorInfo::new(e.code, format!("manifest.json: {e}")))?;
        let total = manifest.total_size();
        if let Some(max) = self.limits.load().max_model_size
            && total > max
        {
            return Err(ErrorInfo::new(
                ErrorCode::TooLarge,
                format!("the bundle's files total {total} bytes, over this device's limit of {max} bytes (limits.max_model_size)"),
            )
            .into());
        }
        let missing: Vec<_> = manifest.files.iter().filter(|f| !self.store.has_blob(&f.sha256, f.size)).collect();
        let to_fetch: u64 = missing.iter().map(|f| f.size).sum();
        let reused = manifest.files.len() - missing.len();
        self.make_room(d, &missing, protected)?;
        let detail = format!(
            "{} file(s), {} bytes to fetch{}",
            missing.len(),
            to_fetch,
            if reused > 0 { format!(", {reused} already stored") } else { String::new() }
        );
        self.reporter.event(d, Phase::Downloading, Some(Progress { bytes: 0, total: to_fetch }), None, Some(detail));
        let mut done: u64 = 0;
        let mut last_report = Instant::now();
        for f in missing {
            let url = file_url(&d.model.manifest_url, &f.path, f.url.as_deref())?;
            // Kept across attempts and restarts, so an interrupted transfer resumes.
            let partial = self.store.partial_path(&f.sha256);
            let base = done;
            let mut progress = |n: u64| {
                if last_report.elapsed() >= PROGRESS_INTERVAL {
                    last_report = Instant::now();
                    self.reporter.event(
                        d,
                        Phase::Downloading,
                        Some(Progress { bytes: base + n, total: to_fetch }),
                        None,
                        None,
                    );
                }
            };
            let (fetcher, path, sha, size, part) =
                (self.fetcher.clone(), f.path.clone(), f.sha256.clone(), f.size, partial.clone());
            self.cancellable(d, &f.path, cancel, &mut progress, move |c, on_retry, progress| {
                let wanted = Wanted { url: &url, what: &path, sha256: &sha, size };
                fetcher.fetch_file(&wanted, &part, c, on_retry, progress)
            })?;
            self.store.commit_blob(&partial, &f.sha256)?;
            crate::sys::crash_point("blob-stored");
            done += f.size;
        }
        if to_fetch > 0 {
            self.reporter.event(d, Phase::Downloading, Some(Progress { bytes: done, total: to_fetch }), None, None);
        }
        timings.download = ms(t.elapsed());
        let t = Instant::now();
        self.reporter.event(
            d,
            Phase::Verifying,
            None,
            None,
            Some(format!("{} file(s), {total} bytes, sha256 verified", manifest.files.len())),
        );
        let dir = self.store.materialize(&manifest, &bytes, &d.model.manifest_sha256)?;
        crate::sys::crash_point("version-installed");
        timings.verify = ms(t.elapsed());
        Ok((dir, manifest))
    }

    /// Checks, before any byte is fetched, that the missing files fit under the
    /// store quota and on the filesystem. If they do not, versions kept only
    /// for rollback are evicted first; if that is not enough, `disk_full`
    /// with the figures. The active version is never touched.
    fn make_room(
        &self,
        d: &Deployment,
        missing: &[&outpost_protocol::FileEntry],
        protected: &[String],
    ) -> Result<(), ErrorInfo> {
        let held: u64 = missing.iter().map(|f| self.store.partial_len(&f.sha256).min(f.size)).sum();
        let need = missing.iter().map(|f| f.size).sum::<u64>().saturating_sub(held);
        if need == 0 {
            return Ok(());
        }
        let shortfall = || -> Result<Option<String>, ErrorInfo> {
            if let Some(quota) = self.limits.load().store_quota {
                let (used, _) = self.store.usage();
                if used.saturating_add(need) > quota {
                    return Ok(Some(format!(
                        "{need} more bytes would not fit under the store quota of {quota} bytes ({used} already used)"
                    )));
                }
            }
            let free = self.store.available()?;
            let reserve = self.limits.load().disk_reserve;
            if need.saturating_add(reserve) > free {
                return Ok(Some(format!(
                    "{need} more bytes would not fit on the filesystem ({free} bytes free, {reserve} kept in reserve: limits.disk_reserve)"
                )));
            }
            Ok(None)
        };
        let Some(first) = shortfall()? else { return Ok(()) };
        let partials: Vec<&str> = missing.iter().map(|f| f.sha256.as_str()).collect();
        let Some((removed, freed)) = self.store.collect(self.slot_key(), protected, &partials) else {
            let why = format!("{first}: nothing evicted while another model slot's deployment is in progress");
            return Err(ErrorInfo::new(ErrorCode::DiskFull, why));
        };
        if removed > 0 || freed > 0 {
            let detail = format!("{first}: evicted {removed} version(s) kept for rollback, {freed} bytes freed");
            tracing::warn!("{detail}");
            self.reporter.event(d, Phase::Downloading, None, None, Some(detail));
        }
        match shortfall()? {
            None => Ok(()),
            Some(why) => Err(ErrorInfo::new(
                ErrorCode::DiskFull,
                format!("{why}; nothing was downloaded and the serving model is untouched"),
            )),
        }
    }

    /// Runs a blocking transfer on its own thread so that a newer desired
    /// state cancels it at once, even while a read is blocked on a stalled
    /// link (the abandoned thread stops at its next read or stall timeout and
    /// writes nothing more). Progress and retries come back over a channel.
    fn cancellable<T: Send + 'static>(
        &self,
        d: &Deployment,
        what: &str,
        cancel: &Cancel,
        progress: &mut dyn FnMut(u64),
        work: impl FnOnce(&Cancel, OnRetry<'_>, &mut dyn FnMut(u64)) -> Result<T, FetchError> + Send + 'static,
    ) -> Result<T, FetchError> {
        enum Msg<T> {
            Progress(u64),
            Retry(u32, DownloadError, Duration),
            Done(Result<T, FetchError>),
        }
        let (tx, rx) = std::sync::mpsc::channel::<Msg<T>>();
        let c = cancel.clone();
        std::thread::Builder::new()
            .name("outpost-fetch".into())
            .spawn(move || {
                let (t_retry, t_progress) = (tx.clone(), tx.clone());
                let mut on_retry = |a, e: &DownloadError, delay| {
                    let _ = t_retry.send(Msg::Retry(a, e.clone(), delay));
                };
                let mut on_progress = |n| {
                    let _ = t_progress.send(Msg::Progress(n));
                };
                let result = work(&c, &mut on_retry, &mut on_progress);
                let _ = tx.send(Msg::Done(result));
            })
            .map_err(|e| ErrorInfo::new(ErrorCode::Internal, format!("{what}: cannot start a download thread: {e}")))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Progress(n)) => progress(n),
                Ok(Msg::Retry(a, e, delay)) => self.report_retry(d, what, a, &e, delay),
                Ok(Msg::Done(result)) => return result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if cancel.is_cancelled() => {
                    return Err(FetchError::Cancelled);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ErrorInfo::new(ErrorCode::Internal, format!("{what}: the download thread died")).into());
                }
            }
        }
    }

    /// A retry is visible to the operator as a `downloading` event.
    fn report_retry(&self, d: &Deployment, what: &str, attempt: u32, e: &DownloadError, delay: Duration) {
        let detail = format!(
            "{what}: attempt {attempt} of {} failed ({}: {e}); retrying in {:.1} s",
            self.fetcher.attempts(),
            e.code(),
            delay.as_secs_f64()
        );
        self.reporter.event(d, Phase::Downloading, None, None, Some(detail));
    }

    /// Puts the last active version back in service at start-up, before
    /// and without any network: its files are re-verified against their
    /// digests, it is loaded and run the way its validation settled. Its
    /// golden sample runs again (isolated) only with `limits.revalidate_at_start`.
    /// Returns how it runs now (its settlement, when there is one).
    pub fn restore(
        &self,
        active: &crate::deploy::record::ActiveRecord,
    ) -> Result<Option<crate::serve::model::Settled>, FetchError> {
        let d = &active.deployment;
        let sha = &d.model.manifest_sha256;
        let (dir, manifest, _) = self.store.verify_version(sha)?;
        // On ONNX Runtime: the library is opened by a child first, as at
        // deployment (it may be gone, replaced, or crash since): the child
        // settles again, on tract when ONNX Runtime cannot serve.
        let on_onnxruntime = active.settled.as_ref().is_some_and(|s| s.runtime == Runtime::Onnxruntime);
        let settled = match (&self.isolation, self.limits.load().revalidate_at_start || on_onnxruntime) {
            (Isolation::Child(exe), true) => {
                Some(crate::deploy::isolate::validate(exe, &dir, sha, self.bounds(), &Cancel::default())?.settled)
            }
            _ => active.settled.clone(),
        };
        // A record from before settlements were kept: tract, single-threaded.
        let model = match &settled {
            Some(s) => Model::load_settled(&dir, &manifest, sha, s)?,
            None => Model::load(&dir, &manifest, sha)?,
        };
        tracing::info!(model = %model.name, version = %model.version, "serving the last active version from the store");
        let serving = &d.serving;
        self.engine.resize(
            serving.workers.unwrap_or(self.limits.load().workers),
            serving.max_queue.unwrap_or(self.limits.load().max_queue),
        );
        self.engine.swap(Some(Arc::new(model)));
        self.engine.set_capture_rate(serving.capture_rate.unwrap_or(0.0));
        crate::sys::alloc::release_free_memory();
        Ok(settled)
    }

    /// The shadow candidate of the restored deployment, from the store
    /// (re-verified; its golden sample passed when it was deployed).
    pub fn restore_shadow(&self, d: &Deployment) -> Result<Arc<Model>, FetchError> {
        let sd = shadow_deployment(d).ok_or_else(|| ErrorInfo::new(ErrorCode::Internal, "no shadow"))?;
        let (dir, manifest, _) = self.store.verify_version(&sd.model.manifest_sha256)?;
        // Its settlement is not kept: it is validated again, in a child as
        // at deployment (the agent itself never opens ONNX Runtime first).
        let sha = &sd.model.manifest_sha256;
        let model = match &self.isolation {
            Isolation::Child(exe) => {
                let v = crate::deploy::isolate::validate(exe, &dir, sha, self.bounds(), &Cancel::default())?;
                Model::load_settled(&dir, &manifest, sha, &v.settled)?
            }
            Isolation::InProcess => crate::serve::backend::prepare(&dir, &manifest, sha, &mut |_| {})?,
        };
        Ok(Arc::new(model))
    }
}
