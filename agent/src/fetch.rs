//! Downloads of manifests and bundle files over `http://`, `https://` and
//! `file://`, hashing while streaming and never reading past a size cap.
//!
//! Blocking (ureq): run on blocking threads. Transient failures (connect
//! errors, timeouts, 5xx, 408, 429, truncated bodies) are retried a bounded
//! number of times with jittered exponential backoff; other 4xx, digest and
//! size errors fail at once.

use outpost_protocol::{ErrorCode, ErrorInfo, hex, short_digest};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Largest manifest accepted: manifests are small JSON, anything bigger is a mistake or an attack.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Set when a newer desired state supersedes the download in progress.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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
    agent: ureq::Agent,
    config: FetchConfig,
}

/// One attempt's failure, and whether trying again may help.
struct AttemptError {
    info: ErrorInfo,
    transient: bool,
}

fn permanent(code: ErrorCode, message: String) -> AttemptError {
    AttemptError { info: ErrorInfo::new(code, message), transient: false }
}

fn transient(code: ErrorCode, message: String) -> AttemptError {
    AttemptError { info: ErrorInfo::new(code, message), transient: true }
}

impl Fetcher {
    pub fn new(config: FetchConfig) -> Fetcher {
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.response_timeout))
            .timeout_per_read(Some(config.stall_timeout))
            .http_status_as_error(true)
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Fetcher { agent, config }
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
    ) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::new();
        self.with_retries(url, cancel, &mut |_| {
            out.clear();
            let (hash, n) = self.stream(url, what, max, cancel, &mut out, &mut |_| {})?;
            if n > max {
                return Err(permanent(ErrorCode::TooLarge, format!("{what}: larger than the {max}-byte limit")));
            }
            check_digest(what, expected_sha256, &hash)
        })?;
        Ok(out)
    }

    /// Streams one file into `sink`, checking size and sha256 as it goes.
    /// `progress` gets the bytes written so far after every chunk.
    pub fn fetch_file(
        &self,
        file: &Wanted<'_>,
        sink: &mut dyn FnMut() -> std::io::Result<Box<dyn Write>>,
        cancel: &Cancel,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), FetchError> {
        let Wanted { url, what, sha256: expected_sha256, size } = *file;
        self.with_retries(url, cancel, &mut |_| {
            let mut w = sink().map_err(|e| io_error(what, &e))?;
            let (hash, n) = self.stream(url, what, size, cancel, &mut w, progress)?;
            w.flush().map_err(|e| io_error(what, &e))?;
            if n > size {
                return Err(permanent(
                    ErrorCode::TooLarge,
                    format!("{what}: larger than the {size} bytes the manifest declares (stopped at {n})"),
                ));
            }
            if n < size {
                // A short body is usually a dropped connection: worth another try.
                return Err(transient(ErrorCode::SizeMismatch, format!("{what}: expected {size} bytes, got {n}")));
            }
            check_digest(what, expected_sha256, &hash)
        })
    }

    fn with_retries(
        &self,
        url: &str,
        cancel: &Cancel,
        attempt: &mut dyn FnMut(u32) -> Result<(), AttemptError>,
    ) -> Result<(), FetchError> {
        let mut last = None;
        for n in 0..self.config.attempts.max(1) {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            match attempt(n) {
                Ok(()) => return Ok(()),
                Err(e) if e.info.code == ErrorCode::Internal && e.info.message == CANCELLED => {
                    return Err(FetchError::Cancelled);
                }
                Err(e) if !e.transient => return Err(FetchError::Failed(e.info)),
                Err(e) => {
                    tracing::warn!(url, attempt = n + 1, error = %e.info, "transient download failure");
                    last = Some(e.info);
                    if n + 1 < self.config.attempts {
                        self.sleep_backoff(n, cancel)?;
                    }
                }
            }
        }
        let info = last.unwrap_or_else(|| ErrorInfo::new(ErrorCode::DownloadFailed, format!("{url}: no attempt made")));
        Err(FetchError::Failed(ErrorInfo::new(
            info.code,
            format!("{} (gave up after {} attempts)", info.message, self.config.attempts.max(1)),
        )))
    }

    fn sleep_backoff(&self, attempt: u32, cancel: &Cancel) -> Result<(), FetchError> {
        let exp = self.config.backoff_base.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.config.backoff_max);
        // Full jitter in [capped/2, capped]: devices that failed together do not retry together.
        let jitter = capped.mul_f64(0.5 + 0.5 * crate::jitter());
        let deadline = std::time::Instant::now() + jitter;
        while std::time::Instant::now() < deadline {
            if cancel.is_cancelled() {
                return Err(FetchError::Cancelled);
            }
            std::thread::sleep(
                Duration::from_millis(50).min(deadline.saturating_duration_since(std::time::Instant::now())),
            );
        }
        Ok(())
    }

    /// One attempt: opens the URL and copies at most `cap + 1` bytes into `w`.
    fn stream(
        &self,
        url: &str,
        what: &str,
        cap: u64,
        cancel: &Cancel,
        w: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<([u8; 32], u64), AttemptError> {
        let mut reader = self.open(url, what)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n: u64 = 0;
        loop {
            if cancel.is_cancelled() {
                return Err(AttemptError { info: ErrorInfo::new(ErrorCode::Internal, CANCELLED), transient: false });
            }
            let want = buf.len().min((cap + 1 - n.min(cap + 1)) as usize);
            if want == 0 {
                // One byte past the cap was read: stop now rather than after the whole body.
                return Ok((hasher.finalize().into(), n));
            }
            let got = match reader.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(transient(
                        ErrorCode::DownloadFailed,
                        format!("{what}: reading {url}: {}", describe_io(&e)),
                    ));
                }
            };
            hasher.update(&buf[..got]);
            w.write_all(&buf[..got]).map_err(|e| io_error(what, &e))?;
            n += got as u64;
            progress(n.min(cap));
        }
        Ok((hasher.finalize().into(), n))
    }

    fn open(&self, url: &str, what: &str) -> Result<Box<dyn Read + Send>, AttemptError> {
        if let Some(path) = url.strip_prefix("file://") {
            let path = percent_decode(path);
            return std::fs::File::open(&path).map(|f| Box::new(f) as Box<dyn Read + Send>).map_err(|e| {
                let code = ErrorCode::DownloadFailed;
                // A missing file will not appear by retrying; an I/O error might.
                let t = e.kind() != std::io::ErrorKind::NotFound && e.kind() != std::io::ErrorKind::PermissionDenied;
                AttemptError { info: ErrorInfo::new(code, format!("{what}: cannot open {path}: {e}")), transient: t }
            });
        }
        match self.agent.get(url).call() {
            Ok(resp) => Ok(Box::new(resp.into_body().into_reader())),
            Err(ureq::Error::StatusCode(code)) => {
                let msg = format!("{what}: HTTP {code} from {url}");
                if code >= 500 || code == 408 || code == 429 {
                    Err(transient(ErrorCode::DownloadFailed, msg))
                } else {
                    Err(permanent(ErrorCode::DownloadFailed, msg))
                }
            }
            Err(e @ (ureq::Error::BadUri(_) | ureq::Error::RequireHttpsOnly(_) | ureq::Error::TooManyRedirects)) => {
                Err(permanent(ErrorCode::DownloadFailed, format!("{what}: {url}: {e}")))
            }
            Err(e) => Err(transient(ErrorCode::DownloadFailed, format!("{what}: {url}: {e}"))),
        }
    }
}

const CANCELLED: &str = "\u{0}cancelled";

fn check_digest(what: &str, expected: &str, got: &[u8; 32]) -> Result<(), AttemptError> {
    let got = hex(got);
    if got == expected {
        Ok(())
    } else {
        Err(permanent(
            ErrorCode::DigestMismatch,
            format!("{what}: expected sha256 {}, got {}", short_digest(expected), short_digest(&got)),
        ))
    }
}

fn io_error(what: &str, e: &std::io::Error) -> AttemptError {
    let code = if e.raw_os_error() == Some(28) { ErrorCode::DiskFull } else { ErrorCode::Internal };
    permanent(code, format!("{what}: writing to the store: {e}"))
}

fn describe_io(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut {
        "stalled: no data within the read timeout".into()
    } else {
        e.to_string()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The URL of a bundle file: its own `url`, else its path relative to the manifest URL.
pub fn file_url(manifest_url: &str, path: &str, own: Option<&str>) -> Result<String, ErrorInfo> {
    if let Some(u) = own {
        return Ok(u.to_string());
    }
    let base = url::Url::parse(manifest_url)
        .map_err(|e| ErrorInfo::new(ErrorCode::InvalidMessage, format!("model.manifest_url: {manifest_url}: {e}")))?;
    base.join(path).map(|u| u.to_string()).map_err(|e| {
        ErrorInfo::new(ErrorCode::InvalidManifest, format!("{path}: cannot be resolved against {manifest_url}: {e}"))
    })
}

/// sha256 of a file on disk, streamed.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    let digest: [u8; 32] = hasher.finalize().into();
    Ok((hex(&digest), n))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn file_fetch_checks_size_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, b"hello").unwrap();
        let url = format!("file://{}", p.display());
        let f = Fetcher::new(FetchConfig { attempts: 1, ..Default::default() });
        let (good, _) = sha256_file(&p).unwrap();
        let c = Cancel::default();
        assert_eq!(f.fetch_bytes(&url, "blob", &good, 100, &c).unwrap(), b"hello");
        let Err(FetchError::Failed(e)) = f.fetch_bytes(&url, "blob", &"0".repeat(64), 100, &c) else { panic!() };
        assert_eq!(e.code, ErrorCode::DigestMismatch);
        let Err(FetchError::Failed(e)) = f.fetch_bytes(&url, "blob", &good, 3, &c) else { panic!() };
        assert_eq!(e.code, ErrorCode::TooLarge);
        let mut sink = || Ok(Box::new(std::io::sink()) as Box<dyn Write>);
        let Err(FetchError::Failed(e)) =
            f.fetch_file(&Wanted { url: &url, what: "blob", sha256: &good, size: 4 }, &mut sink, &c, &mut |_| {})
        else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::TooLarge);
        let Err(FetchError::Failed(e)) =
            f.fetch_file(&Wanted { url: &url, what: "blob", sha256: &good, size: 9 }, &mut sink, &c, &mut |_| {})
        else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::SizeMismatch);
        c.cancel();
        assert_eq!(
            f.fetch_file(&Wanted { url: &url, what: "blob", sha256: &good, size: 5 }, &mut sink, &c, &mut |_| {}),
            Err(FetchError::Cancelled)
        );
    }
}
