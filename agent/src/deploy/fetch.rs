//! Downloads of manifests and bundle files over `http://`, `https://` and
//! `file://`, hashing while streaming and never reading past a size cap.
//!
//! Blocking (ureq): run on blocking threads. Transient failures (connect
//! errors, timeouts, 5xx, 408, 429, truncated bodies) are retried a bounded
//! number of times with jittered exponential backoff; other 4xx, digest and
//! size errors fail at once.

use outpost_protocol::{ErrorCode, ErrorInfo, hex, short_digest};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Largest manifest accepted: manifests are small JSON, anything bigger is a mistake or an attack.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Set when a newer desired state supersedes the download in progress.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>, Arc<AtomicBool>);

impl Cancel {
    /// A newer desired state replaces this deployment.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// The agent is stopping: the deployment is interrupted, not replaced,
    /// and resumes at the next start.
    pub fn stop(&self) {
        self.1.store(true, Ordering::SeqCst);
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn is_stopping(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FetchError {
    Failed(ErrorInfo),
    Cancelled,
}

impl From<ErrorInfo> for FetchError {
    fn from(e: ErrorInfo) -> Self {
        FetchError::Failed(e)
    }
}

impl From<crate::serve::model::ModelError> for FetchError {
    fn from(e: crate::serve::model::ModelError) -> Self {
        FetchError::Failed(e.into())
    }
}

impl From<crate::deploy::store::StoreError> for FetchError {
    fn from(e: crate::deploy::store::StoreError) -> Self {
        FetchError::Failed(e.into())
    }
}

/// Timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// No byte for this long = stalled. There is deliberately no total deadline:
    /// a large file on a slow link must be able to finish.
    pub stall_timeout: Duration,
    pub attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Certificate authorities trusted for `https://`, instead of the
    /// system's ([`crate::sys::tls::system_roots`]) (`--ca-file`: a private registry's CA).
    pub roots: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// The one directory `file://` URLs may read from (`download.file_root`,
    /// for labs); `None`: `file://` is refused (a deployer must not be able
    /// to probe or copy the device's own files).
    pub file_root: Option<std::path::PathBuf>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            attempts: 4,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            roots: None,
            file_root: None,
        }
    }
}

/// A file to fetch and what it must turn out to be.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub url: &'a str,
    /// Name for messages (the file's path in the bundle).
    pub what: &'a str,
    pub sha256: &'a str,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct Fetcher {
    agent: Arc<std::sync::OnceLock<ureq::Agent>>,
    config: FetchConfig,
}

/// Why a download failed. [`DownloadError::code`] is the wire's error code;
/// the message names the file, the URL and what was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DownloadError {
    /// The transfer failed: connection, HTTP status, TLS, a stall, a
    /// `file://` path that cannot be read (`download_failed`).
    #[error("{0}")]
    Transfer(String),
    /// The bytes are not those the digest names (`digest_mismatch`).
    #[error("{0}")]
    Digest(String),
    /// Fewer bytes than declared (`size_mismatch`).
    #[error("{0}")]
    Size(String),
    /// More bytes than declared or allowed (`too_large`).
    #[error("{0}")]
    TooLarge(String),
    /// Writing what arrived to the store failed (`disk_full` when it is full).
    #[error("{message}")]
    Write { message: String, disk_full: bool },
    /// A URL the device's configuration does not allow (`url_refused`).
    #[error("{0}")]
    Refused(String),
    /// Every attempt failed, the last one so.
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp { last: Box<DownloadError>, attempts: u32 },
}

impl DownloadError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DownloadError::Transfer(_) => ErrorCode::DownloadFailed,
            DownloadError::Refused(_) => ErrorCode::UrlRefused,
            DownloadError::Digest(_) => ErrorCode::DigestMismatch,
            DownloadError::Size(_) => ErrorCode::SizeMismatch,
            DownloadError::TooLarge(_) => ErrorCode::TooLarge,
            DownloadError::Write { disk_full: true, .. } => ErrorCode::DiskFull,
            DownloadError::Write { .. } => ErrorCode::Internal,
            DownloadError::GaveUp { last, .. } => last.code(),
        }
    }
}

/// At the wire: code and message.
impl From<DownloadError> for ErrorInfo {
    fn from(e: DownloadError) -> ErrorInfo {
        ErrorInfo::new(e.code(), e.to_string())
    }
}

/// One attempt's failure, and whether trying again may help.
struct AttemptError {
    error: DownloadError,
    transient: bool,
    /// The server's Retry-After, if it sent one.
    retry_after: Option<Duration>,
    cancelled: bool,
}

fn permanent(error: DownloadError) -> AttemptError {
    AttemptError { error, transient: false, retry_after: None, cancelled: false }
}

fn cancelled() -> AttemptError {
    AttemptError {
        error: DownloadError::Transfer("cancelled".into()),
        transient: false,
        retry_after: None,
        cancelled: true,
    }
}

fn transient(error: DownloadError) -> AttemptError {
    AttemptError { error, transient: true, retry_after: None, cancelled: false }
}

/// Called before each retry with (attempt number that failed, its error, delay).
pub type OnRetry<'a> = &'a mut dyn FnMut(u32, &DownloadError, Duration);

impl Fetcher {
    /// Attempts per download.
    pub fn attempts(&self) -> u32 {
        self.config.attempts.max(1)
    }

    pub fn new(config: FetchConfig) -> Fetcher {
        Fetcher { agent: Arc::new(std::sync::OnceLock::new()), config }
    }

    /// The HTTP client, made on the first `http(s)://` download (so a device
    /// that never downloads never reads the system's CA bundle).
    fn agent(&self) -> &ureq::Agent {
        self.agent.get_or_init(|| self.make_agent())
    }

    fn make_agent(&self) -> ureq::Agent {
        let config = &self.config;
        // Without tls.ca_file and without a system bundle nothing is trusted:
        // `open` says why before trying an https:// URL.
        let system =
            if config.roots.is_none() { crate::sys::tls::system_roots().unwrap_or_default() } else { Arc::default() };
        let roots = config.roots.as_deref().unwrap_or(&system);
        let certs: Vec<_> = roots.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()).collect();
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.response_timeout))
            .timeout_per_read(Some(config.stall_timeout))
            // Statuses are handled here, to read Retry-After and 206.
            .http_status_as_error(false)
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")))
            .build()
            .into()
    }

    /// Fetches a whole small document (a manifest), at most `max` bytes, and
    /// checks its sha256.
    pub fn fetch_bytes(
        &self,
        url: &str,
        what: &str,
        expected_sha256: &str,
        max: u64,
        cancel: &Cancel,
        on_retry: OnRetry<'_>,
    ) -> Result<Vec<u8>, FetchError> {
        let (bytes, digest) = self.fetch_document(url, what, max, cancel, on_retry)?;
        check_digest(what, expected_sha256, &digest).map_err(|e| FetchError::Failed(e.error.into()))?;
        Ok(bytes)
    }

    /// Fetches a manifest without a digest to check against (`check-bundle`
    /// when the operator gives none): its bytes and their sha256.
    pub fn fetch_unverified(&self, url: &str) -> Result<(Vec<u8>, String), ErrorInfo> {
        match self.fetch_document(url, "manifest.json", MAX_MANIFEST_BYTES, &Cancel::default(), &mut |_, _, _| {}) {
            Ok((bytes, digest)) => Ok((bytes, hex(&digest))),
            Err(FetchError::Failed(e)) => Err(e),
            Err(FetchError::Cancelled) => Err(ErrorInfo::new(ErrorCode::Internal, "cancelled")),
        }
    }

    /// A whole document of at most `max` bytes, with its sha256.
    fn fetch_document(
        &self,
        url: &str,
        what: &str,
        max: u64,
        cancel: &Cancel,
        on_retry: OnRetry<'_>,
    ) -> Result<(Vec<u8>, [u8; 32]), FetchError> {
        let mut out = Vec::new();
        let mut digest = [0u8; 32];
        self.with_retries(url, cancel, on_retry, &mut |_| {
            out.clear();
            let (reader, _) = self.open(url, what, 0)?;
            let (hasher, n) = copy_capped(reader, &mut out, Sha256::new(), 0, max, what, url, cancel, &mut |_| {})?;
            if n > max {
                return Err(permanent(DownloadError::TooLarge(format!("{what}: larger than the {max}-byte limit"))));
            }
            digest = hasher.finalize().into();
            Ok(())
        })?;
        Ok((out, digest))
    }

    /// Downloads one file into `partial`, resuming from what it already holds
    /// (after a dropped connection or an agent restart) with an HTTP `Range`
    /// request, and checks size and sha256 of the whole. `progress` gets the
    /// bytes held so far.
    pub fn fetch_file(
        &self,
        file: &Wanted<'_>,
        partial: &Path,
        cancel: &Cancel,
        on_retry: OnRetry<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), FetchError> {
        let Wanted { url, what, sha256: expected_sha256, size } = *file;
        self.with_retries(url, cancel, on_retry, &mut |_| {
            let (hasher, have) = hash_prefix(partial, size).map_err(|e| io_error(what, &e))?;
            let (reader, resumed) = self.open(url, what, have)?;
            let (hasher, start) = if resumed { (hasher, have) } else { (Sha256::new(), 0) };
            let mut f = std::fs::OpenOptions::new()
                // Never write through a symlink that appeared since hash_prefix looked.
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .create(true)
                .write(true)
                .append(resumed)
                .truncate(!resumed)
                .open(partial)
                .map_err(|e| io_error(what, &e))?;
            // Unbuffered (reads come in 64 KiB chunks): what arrived is on disk
            // if the agent dies, and the next start resumes from there.
            let (hasher, n) = copy_capped(reader, &mut f, hasher, start, size, what, url, cancel, progress)?;
            if n > size {
                let _ = std::fs::remove_file(partial);
                return Err(permanent(DownloadError::TooLarge(format!(
                    "{what}: larger than the {size} bytes the manifest declares (stopped at {n})"
                ))));
            }
            if n < size {
                // A short body is usually a dropped connection: the next try resumes.
                return Err(transient(DownloadError::Size(format!("{what}: expected {size} bytes, got {n}"))));
            }
            let result = check_digest(what, expected_sha256, &hasher.finalize().into());
            if result.is_err() {
                let _ = std::fs::remove_file(partial);
            }
            result
        })
    }

    fn with_retries(
        &self,
        url: &str,
        cancel: &Cancel,
        on_retry: OnRetry<'_>,
        attempt: &mut dyn FnMut(u32) -> Result<(), AttemptError>,
    ) -> Result<(), FetchError> {
        let attempts = self.config.attempts.max(1);
        let mut last = None;
        for n in 0..attempts {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            match attempt(n) {
                Ok(()) => return Ok(()),
                Err(e) if e.cancelled => return Err(FetchError::Cancelled),
                Err(e) if !e.transient => return Err(FetchError::Failed(e.error.into())),
                Err(e) => {
                    tracing::warn!(url = %crate::sys::redact_url(url), attempt = n + 1, error = %e.error, "transient download failure");
                    if n + 1 < attempts {
                        let delay = self.backoff(n, e.retry_after);
                        on_retry(n + 1, &e.error, delay);
                        sleep_cancellable(delay, cancel)?;
                    }
                    last = Some(e.error);
                }
            }
        }
        let last = last
            .unwrap_or_else(|| DownloadError::Transfer(format!("{}: no attempt made", crate::sys::redact_url(url))));
        Err(FetchError::Failed(DownloadError::GaveUp { last: Box::new(last), attempts }.into()))
    }

    /// [`crate::sys::backoff_delay`] from `backoff_base`; a server's Retry-After is
    /// honoured up to `backoff_max`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = crate::sys::backoff_delay(self.config.backoff_base, attempt, self.config.backoff_max);
        match retry_after {
            Some(r) => r.min(self.config.backoff_max).max(jittered),
            None => jittered,
        }
    }

    /// The file a `file://` URL names, if `download.file_root` allows it:
    /// resolved (`..`, symbolic links) and inside the root. Nothing is said
    /// about a path outside it, not even whether it exists.
    fn local_path(&self, path: &str, what: &str) -> Result<String, DownloadError> {
        let Some(root) = &self.config.file_root else {
            return Err(DownloadError::Refused(format!(
                "{what}: file:// URLs are off on this device (only http:// and https://; a lab can allow a \
                 directory with download.file_root)"
            )));
        };
        let outside = || {
            DownloadError::Refused(format!(
                "{what}: file://{path} is not inside download.file_root ({})",
                root.display()
            ))
        };
        let root = std::fs::canonicalize(root).map_err(|_| outside())?;
        match std::fs::canonicalize(path) {
            Ok(p) if p.starts_with(&root) => Ok(p.to_string_lossy().into_owned()),
            Ok(_) => Err(outside()),
            // Missing: said only for a path that would be inside.
            Err(e) => match std::path::Path::new(path).parent().and_then(|p| std::fs::canonicalize(p).ok()) {
                Some(parent) if parent.starts_with(&root) => {
                    Err(DownloadError::Transfer(format!("{what}: cannot open {path}: {e}")))
                }
                _ => Err(outside()),
            },
        }
    }

    /// Opens `url` from byte `from` on. Returns the body and whether it starts
    /// at `from` (true) or at 0 (the server ignored the range).
    fn open(&self, url: &str, what: &str, from: u64) -> Result<(Box<dyn Read + Send>, bool), AttemptError> {
        // What messages show: no password, no query string (a presigned URL's token).
        let shown = crate::sys::redact_url(url);
        if let Some(path) = url.strip_prefix("file://") {
            let path = self.local_path(&percent_decode(path), what).map_err(permanent)?;
            let mut f = std::fs::File::open(&path).map_err(|e| {
                // A missing file will not appear by retrying; an I/O error might.
                let t = !matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
                let error = DownloadError::Transfer(format!("{what}: cannot open {path}: {e}"));
                AttemptError { error, transient: t, retry_after: None, cancelled: false }
            })?;
            let resumed = from > 0 && f.seek(std::io::SeekFrom::Start(from)).is_ok();
            return Ok((Box::new(f), resumed));
        }
        if url.starts_with("https://")
            && self.config.roots.is_none()
            && let Err(e) = crate::sys::tls::system_roots()
        {
            return Err(permanent(DownloadError::Transfer(format!("{what}: {shown}: cannot verify the server: {e}"))));
        }
        let mut req = self.agent().get(url);
        if from > 0 {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e @ (ureq::Error::BadUri(_) | ureq::Error::RequireHttpsOnly(_) | ureq::Error::TooManyRedirects)) => {
                return Err(permanent(DownloadError::Transfer(format!("{what}: {shown}: {e}"))));
            }
            // A certificate the device does not trust will not become trusted by retrying.
            Err(e) if untrusted_certificate(&e) => {
                return Err(permanent(DownloadError::Transfer(format!(
                    "{what}: {shown}: {e} ({})",
                    if self.config.roots.is_some() {
                        "is the registry's CA in the agent's tls.ca_file / --ca-file?"
                    } else {
                        "is the registry's CA in the system's CA bundle? a private CA goes in tls.ca_file"
                    }
                ))));
            }
            Err(e) => return Err(transient(DownloadError::Transfer(format!("{what}: {shown}: {e}")))),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        match status {
            200 => Ok((Box::new(resp.into_body().into_reader()), false)),
            206 if from > 0 => Ok((Box::new(resp.into_body().into_reader()), true)),
            416 => {
                // The range no longer fits the file (it changed, or we hold too much): start over.
                Err(AttemptError {
                    error: DownloadError::Transfer(format!("{what}: HTTP 416 from {shown} for bytes={from}-")),
                    transient: true,
                    retry_after: None,
                    cancelled: false,
                })
                .inspect_err(|_| tracing::info!(url = %shown, "range refused; the next attempt starts from 0"))
            }
            s => {
                let msg = format!("{what}: HTTP {s} from {shown}");
                if s >= 500 || s == 408 || s == 429 {
                    Err(AttemptError {
                        error: DownloadError::Transfer(msg),
                        transient: true,
                        retry_after,
                        cancelled: false,
                    })
                } else {
                    Err(permanent(DownloadError::Transfer(msg)))
                }
            }
        }
    }
}

/// Hashes what a partial download already holds; a partial longer than the
/// file can be, or that is not a plain file (a symlink planted in the store
/// would make the download write through it), is discarded.
fn hash_prefix(partial: &Path, size: u64) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    match std::fs::symlink_metadata(partial) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(partial)?,
        Ok(m) if !m.is_file() => {
            tracing::warn!(path = %partial.display(), "a partial download that is not a plain file: removed");
            std::fs::remove_file(partial)?;
        }
        _ => {}
    }
    let mut f = match std::fs::File::open(partial) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() >= size {
        drop(f);
        std::fs::remove_file(partial)?;
        return Ok((hasher, 0));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((hasher, n));
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
}

fn sleep_cancellable(delay: Duration, cancel: &Cancel) -> Result<(), FetchError> {
    let deadline = std::time::Instant::now() + delay;
    loop {
        if cancel.is_cancelled() {
            return Err(FetchError::Cancelled);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Copies the body into `w`, hashing, starting the count at `start`; reads at
/// most one byte past `cap` so an oversized body is stopped at the limit.
#[allow(clippy::too_many_arguments)]
fn copy_capped(
    mut reader: Box<dyn Read + Send>,
    w: &mut dyn Write,
    mut hasher: Sha256,
    start: u64,
    cap: u64,
    what: &str,
    url: &str,
    cancel: &Cancel,
    progress: &mut dyn FnMut(u64),
) -> Result<(Sha256, u64), AttemptError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = start;
    loop {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let want = buf.len().min((cap + 1).saturating_sub(n) as usize);
        if want == 0 {
            return Ok((hasher, n));
        }
        let got = match reader.read(&mut buf[..want]) {
            Ok(0) => return Ok((hasher, n)),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Keep what was written: the next attempt resumes from there.
                let _ = w.flush();
                return Err(transient(DownloadError::Transfer(format!(
                    "{what}: reading {}: {}",
                    crate::sys::redact_url(url),
                    describe_io(&e)
                ))));
            }
        };
        if cancel.is_cancelled() {
            // Superseded while the read was blocked: write nothing more, a newer
            // download may already own this partial file.
            return Err(cancelled());
        }
        hasher.update(&buf[..got]);
        w.write_all(&buf[..got]).map_err(|e| io_error(what, &e))?;
        n += got as u64;
        progress(n.min(cap));
    }
}

fn check_digest(what: &str, expected: &str, got: &[u8; 32]) -> Result<(), AttemptError> {
    let got = hex(got);
    if got == expected {
        Ok(())
    } else {
        Err(permanent(DownloadError::Digest(format!(
            "{what}: expected sha256 {}, got {}",
            short_digest(expected),
            short_digest(&got)
        ))))
    }
}

fn io_error(what: &str, e: &std::io::Error) -> AttemptError {
    permanent(DownloadError::Write {
        message: format!("{what}: writing to the store: {e}"),
        disk_full: e.raw_os_error() == Some(28),
    })
}

/// Whether a request failed because the server's certificate is not trusted
/// (sorted by the error's type, wherever ureq carries the TLS error).
fn untrusted_certificate(e: &ureq::Error) -> bool {
    let tls = match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    matches!(tls, Some(rustls::Error::InvalidCertificate(_)))
}

fn describe_io(e: &std::io::Error) -> String {
    // A read timeout comes as TimedOut, or as ureq's own Timeout wrapped in an io::Error.
    let timed_out = e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<ureq::Error>())
            .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
    if timed_out { format!("stalled: no data within the stall timeout ({e})") } else { e.to_string() }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// What stays literal in a URL path segment: the unreserved characters, the
/// sub-delimiters, ':', '@' and '/' (RFC 3986 `pchar` and the separator).
const PATH_KEEPS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/');

/// The URL of a bundle file: its own `url`, else its path relative to the manifest URL.
pub fn file_url(manifest_url: &str, path: &str, own: Option<&str>) -> Result<String, ErrorInfo> {
    if let Some(u) = own {
        return Ok(u.to_string());
    }
    // The manifest URL's directory: without its query or fragment, up to
    // its last '/' after the authority.
    let base = &manifest_url[..manifest_url.find(['?', '#']).unwrap_or(manifest_url.len())];
    let authority = base.find("://").map(|i| i + 3).ok_or_else(|| {
        ErrorInfo::new(
            ErrorCode::InvalidMessage,
            format!("model.manifest_url: {}: not an absolute URL", crate::sys::redact_url(manifest_url)),
        )
    })?;
    let dir = match base[authority..].rfind('/') {
        Some(i) => base[..authority + i + 1].to_string(),
        None => format!("{base}/"),
    };
    Ok(format!("{dir}{}", percent_encode_path(path)))
}

/// A bundle's relative path as a URL path: every byte but the unreserved
/// ones, the sub-delimiters, ':', '@' and '/' percent-encoded ('%' too: the
/// file's name is taken literally).
pub fn percent_encode_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, PATH_KEEPS).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_errors_map_to_the_wires_codes_and_keep_their_words() {
        let short = DownloadError::Size("model.onnx: expected 10 bytes, got 5".into());
        let gave_up = DownloadError::GaveUp { last: Box::new(short), attempts: 4 };
        let info: ErrorInfo = gave_up.into();
        assert_eq!(info.code, ErrorCode::SizeMismatch);
        assert_eq!(info.message, "model.onnx: expected 10 bytes, got 5 (gave up after 4 attempts)");
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(io_error("model.onnx", &full).error.code(), ErrorCode::DiskFull);
        assert_eq!(DownloadError::Digest("x".into()).code(), ErrorCode::DigestMismatch);
        assert_eq!(DownloadError::TooLarge("x".into()).code(), ErrorCode::TooLarge);
    }

    #[test]
    fn file_urls_resolve_relative_to_the_manifest() {
        assert_eq!(
            file_url("http://r:8/digits/2/manifest.json", "sample/in.json", None).unwrap(),
            "http://r:8/digits/2/sample/in.json"
        );
        assert_eq!(
            file_url("file:///reg/d/2/manifest.json", "model.onnx", None).unwrap(),
            "file:///reg/d/2/model.onnx"
        );
        assert_eq!(file_url("http://r/m.json", "x", Some("https://cdn/x")).unwrap(), "https://cdn/x");
        // The manifest's query (a signed URL's) is not the file's; a host alone is its root.
        assert_eq!(file_url("https://r/a/m.json?sig=1#f", "b/x.onnx", None).unwrap(), "https://r/a/b/x.onnx");
        assert_eq!(file_url("http://r:8", "x.onnx", None).unwrap(), "http://r:8/x.onnx");
        // Names are taken literally, whatever they contain.
        assert_eq!(
            file_url("http://r/m/1/manifest.json", "my model #2/ü 100%.onnx", None).unwrap(),
            "http://r/m/1/my%20model%20%232/%C3%BC%20100%25.onnx"
        );
        assert_eq!(
            file_url("file:///srv/my models/1/manifest.json", "a b.json", None).unwrap(),
            "file:///srv/my models/1/a%20b.json"
        );
        assert!(file_url("manifest.json", "x", None).unwrap_err().message.contains("not an absolute URL"));
    }

    #[test]
    fn file_fetch_checks_size_and_digest_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, b"hello world").unwrap();
        let url = format!("file://{}", p.display());
        let off = Fetcher::new(FetchConfig { attempts: 1, ..Default::default() });
        let c = Cancel::default();
        let mut no_retry = |_: u32, _: &DownloadError, _: Duration| {};
        let Err(FetchError::Failed(e)) = off.fetch_bytes(&url, "blob", &"0".repeat(64), 100, &c, &mut no_retry) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::UrlRefused);
        assert!(e.message.starts_with("blob: file:// URLs are off on this device"), "{}", e.message);
        let f =
            Fetcher::new(FetchConfig { attempts: 1, file_root: Some(dir.path().to_path_buf()), ..Default::default() });
        // Outside the root, existing or not, through `..` or not: the same answer.
        for outside in ["/etc/passwd", "/etc/nope", &format!("{}/../../etc/passwd", dir.path().display())] {
            let Err(FetchError::Failed(e)) =
                f.fetch_bytes(&format!("file://{outside}"), "x", &"0".repeat(64), 100, &c, &mut no_retry)
            else {
                panic!()
            };
            assert_eq!(e.code, ErrorCode::UrlRefused, "{outside}");
            assert!(e.message.contains("is not inside download.file_root"), "{}", e.message);
        }
        let (good, _) = crate::deploy::store::sha256_file(&p).unwrap();
        let c = Cancel::default();
        let mut no_retry = |_: u32, _: &DownloadError, _: Duration| {};
        assert_eq!(f.fetch_bytes(&url, "blob", &good, 100, &c, &mut no_retry).unwrap(), b"hello world");
        let Err(FetchError::Failed(e)) = f.fetch_bytes(&url, "blob", &"0".repeat(64), 100, &c, &mut no_retry) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::DigestMismatch);
        let Err(FetchError::Failed(e)) = f.fetch_bytes(&url, "blob", &good, 3, &c, &mut no_retry) else { panic!() };
        assert_eq!(e.code, ErrorCode::TooLarge);

        let partial = dir.path().join("partial");
        let want = |size| Wanted { url: &url, what: "blob", sha256: &good, size };
        let Err(FetchError::Failed(e)) = f.fetch_file(&want(4), &partial, &c, &mut no_retry, &mut |_| {}) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::TooLarge);
        let Err(FetchError::Failed(e)) = f.fetch_file(&want(19), &partial, &c, &mut no_retry, &mut |_| {}) else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::SizeMismatch);

        // A partial holding the first bytes is resumed, not restarted.
        std::fs::write(&partial, b"hello").unwrap();
        let mut seen = Vec::new();
        f.fetch_file(&want(11), &partial, &c, &mut no_retry, &mut |n| seen.push(n)).unwrap();
        assert_eq!(std::fs::read(&partial).unwrap(), b"hello world");
        assert_eq!(seen, [11]);

        c.cancel();
        assert_eq!(f.fetch_file(&want(11), &partial, &c, &mut no_retry, &mut |_| {}), Err(FetchError::Cancelled));
    }
}
