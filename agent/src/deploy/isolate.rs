//! A new version's first load and golden sample run in a child process:
//! the agent's own binary, `outpost validate-model DIR`. Whatever the model
//! does there (allocate without bound, compute for minutes, make tract
//! panic, crash the runtime) happens to the child, under a memory limit
//! (`RLIMIT_DATA`, and the first in line for the OOM killer) and a time
//! limit (the agent kills it), while the agent goes on serving and talking
//! to the broker. The agent then loads the version itself, knowing its load
//! fits (the same bytes just loaded within the limit), and applies what the
//! child settled (the executor) without running the model again.
//!
//! The child speaks one JSON object per line on stdout (`Said`); how it
//! ended is judged by its exit status, never by the text it printed.
//!
//! The child also chooses the engine (`serve::backend`): with `auto` it
//! says when tract passed (`Candidate`) before it first touches ONNX
//! Runtime (`Trying`), so a library or model that crashes ONNX Runtime
//! leaves tract serving, and the agent opens the library only after a
//! child used it.

use crate::deploy::fetch::{Cancel, FetchError};
use crate::serve::backend::Step;
use crate::serve::model::Settled;
use crate::sys::alloc::EXIT_ALLOC_REFUSED;
use outpost_protocol::manifest::MANIFEST_FILE;
use outpost_protocol::{ErrorCode, ErrorInfo, Manifest, Runtime};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The subcommand the agent runs itself as.
pub const SUBCOMMAND: &str = "validate-model";

/// Where a new version's first load and golden sample run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In a child process of this executable, which must be the `outpost`
    /// binary (it has the `validate-model` subcommand): `/proc/self/exe`.
    Child(std::path::PathBuf),
    /// In the calling process, without limits: the simulator's in-process
    /// devices and the unit tests, whose executable is not `outpost`.
    InProcess,
}

impl Isolation {
    /// The running `outpost` binary (even if replaced on disk since it
    /// started), or what `OUTPOST_SELF_EXE` names: a command that runs this
    /// same binary, e.g. under an emulator (the aarch64 tests run the agent
    /// under qemu-user, which cannot execute `/proc/self/exe` itself).
    pub fn this_binary() -> Isolation {
        match std::env::var_os("OUTPOST_SELF_EXE") {
            Some(exe) if !exe.is_empty() => Isolation::Child(exe.into()),
            _ => Isolation::Child("/proc/self/exe".into()),
        }
    }
}

/// The limits of one isolated validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Most bytes the child may allocate (`None`: no limit of its own).
    pub memory: Option<u64>,
    /// Longest the first load and golden sample may take together.
    pub timeout: Duration,
}

/// What a successful isolated validation found.
#[derive(Debug, Clone)]
pub struct Validated {
    pub settled: Settled,
    pub load_notes: Vec<String>,
    pub load_ms: f64,
    pub validate_ms: f64,
    /// The child's peak resident memory.
    pub peak_bytes: u64,
}

/// Where the child was when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Starting,
    Loading,
    Validating,
}

impl Stage {
    fn doing(self) -> &'static str {
        match self {
            Stage::Starting => "starting",
            Stage::Loading => "loading the model",
            Stage::Validating => "running the golden sample",
        }
    }
}

/// One line of the child's report.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Said {
    /// About to load the model on this engine.
    Trying {
        runtime: Runtime,
    },
    /// Passed on tract; serves if trying ONNX Runtime next ends the child.
    Candidate {
        settled: Settled,
    },
    Loaded {
        load_ms: f64,
        notes: Vec<String>,
    },
    Valid {
        settled: Settled,
        validate_ms: f64,
    },
    Failed {
        error: ErrorInfo,
    },
    Panicked {
        stage: Stage,
        message: String,
    },
    /// Written by the allocator (`sys::alloc`) just before it ends the child.
    AllocRefused {
        bytes: u64,
    },
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Validates the version in `dir` in a child process within `bounds`.
/// Cancelling kills the child.
pub fn validate(
    exe: &Path,
    dir: &Path,
    manifest_sha256: &str,
    bounds: Bounds,
    cancel: &Cancel,
) -> Result<Validated, FetchError> {
    let started = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND).arg(dir).arg("--manifest-sha256").arg(manifest_sha256);
    cmd.arg("--parent-pid").arg(std::process::id().to_string());
    if let Some(m) = bounds.memory {
        cmd.arg("--memory-limit").arg(m.to_string());
    }
    let runtimes = crate::serve::backend::config();
    cmd.arg("--runtime-default").arg(runtimes.default.as_str());
    if let Some(lib) = &runtimes.onnxruntime_library {
        cmd.arg("--onnxruntime-library").arg(lib);
    }
    // The child needs nothing from the environment: not the broker's
    // password, not systemd's notify socket.
    cmd.env_clear();
    // Its own process group: a Ctrl-C in the agent's terminal is the
    // agent's to handle (it cancels the validation).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let internal = |what: String| FetchError::Failed(ErrorInfo::new(ErrorCode::Internal, what));
    let mut child =
        cmd.spawn().map_err(|e| {
        internal(format!(
            "cannot start the isolated validation ({}): {e}; the agent runs it as a child of its own binary (OUTPOST_SELF_EXE names another command, e.g. an emulator's wrapper)",
            exe.display()
        ))
    })?;
    let pid = child.id();
    let stdout = child.stdout.take().map(|o| reader(o, 1 << 20, false));
    let stderr = child.stderr.take().map(|e| reader(e, 2048, true));
    let mut peak = 0u64;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(internal(format!("isolated validation: {e}"))),
        }
        peak = peak.max(peak_rss(pid).unwrap_or(0));
        if cancel.is_cancelled() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FetchError::Cancelled);
        }
        if started.elapsed() >= bounds.timeout {
            timed_out = true;
            let _ = child.kill();
            match child.wait() {
                Ok(s) => break s,
                Err(e) => return Err(internal(format!("isolated validation: {e}"))),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A stop or a newer deployment: the agent's signal may have reached the
    // child first (systemd signals the whole service), so give the cancel a
    // moment to arrive before judging a child ended by SIGHUP, SIGINT or SIGTERM.
    if matches!(status.signal(), Some(1 | 2 | 15)) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !cancel.is_cancelled() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if cancel.is_cancelled() {
        return Err(FetchError::Cancelled);
    }
    let seconds = started.elapsed().as_secs_f64();
    let out = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let said: Vec<Said> = out.split(|b| *b == b'\n').filter_map(|l| serde_json::from_slice(l).ok()).collect();
    let loaded = said.iter().rev().find_map(|s| match s {
        Said::Loaded { load_ms, notes } => Some((*load_ms, notes.clone())),
        _ => None,
    });
    // Where the child was: the last engine it tried, and whether it loaded there.
    let trying = said.iter().rposition(|s| matches!(s, Said::Trying { .. }));
    let loaded_at = said.iter().rposition(|s| matches!(s, Said::Loaded { .. }));
    let stage = match (trying, loaded_at) {
        (Some(t), Some(l)) if l > t => Stage::Validating,
        (Some(_), _) => Stage::Loading,
        (None, Some(_)) => Stage::Validating,
        (None, None) => Stage::Loading,
    };
    // Tract passed, then trying ONNX Runtime ended the child without a
    // verdict: tract serves (a verdict, even a failure, is the child's).
    let on_ort = trying.is_some_and(|t| matches!(said[t], Said::Trying { runtime: Runtime::Onnxruntime }));
    let candidate = said.iter().find_map(|s| match s {
        Said::Candidate { settled } => Some(settled.clone()),
        _ => None,
    });
    let verdict = said.iter().any(|s| matches!(s, Said::Valid { .. } | Said::Failed { .. }));
    let fallback = candidate.filter(|_| on_ort && !verdict);
    let judged = judge(&said, &err, status, stage, peak, seconds, timed_out, bounds, loaded);
    match (judged, fallback) {
        (Err(FetchError::Failed(e)), Some(mut settled)) => {
            // The first engine's load notes and timing stand.
            let (load_ms, load_notes) = said
                .iter()
                .find_map(|s| match s {
                    Said::Loaded { load_ms, notes } => Some((*load_ms, notes.clone())),
                    _ => None,
                })
                .unwrap_or_default();
            let why = format!("failed: {} ({})", e.code, e.message);
            if let Some(b) = settled.backend.as_mut() {
                b.reason = format!("onnxruntime {why}: tract serves");
            }
            settled.validation = format!("{}; tract serves (onnxruntime {why})", settled.validation);
            Ok(Validated { settled, load_notes, load_ms, validate_ms: 0.0, peak_bytes: peak })
        }
        (judged, _) => judged,
    }
}

/// The verdict on a child that ended (or was stopped): what it said, else
/// how it ended.
#[allow(clippy::too_many_arguments)]
fn judge(
    said: &[Said],
    err: &[u8],
    status: std::process::ExitStatus,
    stage: Stage,
    peak: u64,
    seconds: f64,
    timed_out: bool,
    bounds: Bounds,
    loaded: Option<(f64, Vec<String>)>,
) -> Result<Validated, FetchError> {
    // A child that ends within the first poll shows no peak: the refused size is the evidence then.
    let evidence = match peak {
        p if p < 1 << 20 => format!("after {seconds:.1} s"),
        p => format!("after {seconds:.1} s, peak memory {}", mib(p)),
    };
    let limit_text = bounds.memory.map_or_else(|| "no memory limit".to_string(), |m| format!("limit {}", mib(m)));
    let failed = |code: ErrorCode, message: String| Err(FetchError::Failed(ErrorInfo::new(code, message)));
    if timed_out {
        return failed(
            ErrorCode::ResourceLimit,
            format!(
                "{} took longer than the limit of {} s (limits.validation_timeout) and was stopped ({evidence}); the serving model is untouched",
                stage.doing(),
                bounds.timeout.as_secs()
            ),
        );
    }
    for s in said {
        match s {
            Said::AllocRefused { bytes } => {
                return failed(
                    ErrorCode::ResourceLimit,
                    format!(
                        "{}: an allocation of {bytes} bytes was refused ({limit_text}, limits.validation_memory; {evidence}); the serving model is untouched",
                        stage.doing()
                    ),
                );
            }
            Said::Failed { error } => return Err(FetchError::Failed(error.clone())),
            Said::Panicked { stage, message } => {
                let code =
                    if *stage == Stage::Validating { ErrorCode::ValidationFailed } else { ErrorCode::ModelLoadFailed };
                return failed(
                    code,
                    format!(
                        "the runtime panicked while {}: {message} (isolated validation; the serving model is untouched)",
                        stage.doing()
                    ),
                );
            }
            Said::Valid { settled, validate_ms } if status.success() => {
                let (load_ms, load_notes) = loaded.clone().unwrap_or_default();
                return Ok(Validated {
                    settled: settled.clone(),
                    load_notes,
                    load_ms,
                    validate_ms: *validate_ms,
                    peak_bytes: peak,
                });
            }
            _ => {}
        }
    }
    let tail = String::from_utf8_lossy(err).trim().to_string();
    let tail = if tail.is_empty() { String::new() } else { format!("; its last words: {tail}") };
    match (status.signal(), status.code()) {
        // Not our timer: the kernel's OOM killer (the child is first in line).
        (Some(9), _) => failed(
            ErrorCode::ResourceLimit,
            format!(
                "killed while {} by the system, out of memory ({limit_text}; {evidence}){tail}; the serving model is untouched",
                stage.doing()
            ),
        ),
        (Some(sig @ (1 | 2 | 15)), _) => failed(
            ErrorCode::Internal,
            format!(
                "the isolated validation was stopped by signal {sig} from outside the agent while {} ({evidence}); deploy a new revision to try again",
                stage.doing()
            ),
        ),
        (Some(sig), _) => failed(
            ErrorCode::ModelCrashed,
            format!(
                "the runtime crashed while {} (signal {sig}; {evidence}){tail}; the serving model is untouched",
                stage.doing()
            ),
        ),
        (None, Some(EXIT_ALLOC_REFUSED)) => failed(
            ErrorCode::ResourceLimit,
            format!(
                "{}: an allocation was refused ({limit_text}; {evidence}); the serving model is untouched",
                stage.doing()
            ),
        ),
        (None, code) => failed(
            ErrorCode::Internal,
            format!(
                "the isolated validation ended without a verdict (exit code {}; {evidence}){tail}",
                code.map_or_else(|| "none".into(), |c| c.to_string())
            ),
        ),
    }
}

/// Reads a child's pipe to its end, keeping at most `cap` bytes (the first
/// ones, or the last ones when `tail`).
fn reader(mut r: impl Read + Send + 'static, cap: usize, tail: bool) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return kept,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > cap {
                        if tail {
                            kept.drain(..kept.len() - cap);
                        } else {
                            kept.truncate(cap);
                        }
                    }
                }
            }
        }
    })
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

static STAGE: AtomicU8 = AtomicU8::new(0);

fn stage() -> Stage {
    match STAGE.load(Ordering::SeqCst) {
        1 => Stage::Loading,
        2 => Stage::Validating,
        _ => Stage::Starting,
    }
}

fn say(s: &Said) {
    use std::io::Write;
    let mut line = serde_json::to_vec(s).unwrap_or_default();
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// The child: `outpost validate-model DIR --manifest-sha256 SHA [--memory-limit BYTES]`.
/// Loads the verified version in `dir` and runs its golden sample, saying
/// how it went on stdout. Returns the exit code.
pub fn child(dir: &Path, manifest_sha256: &str, memory: Option<u64>, parent: Option<u32>) -> u8 {
    crate::sys::alloc::exit_on_refusal();
    // Dies with the agent: a validation the agent no longer waits for stops
    // (and if the agent died before this was set, now).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if let Some(p) = parent
        && rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(p)
    {
        return 3;
    }
    // First in line for the OOM killer, before the agent (raising one's
    // own score needs no privilege).
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    if let Some(m) = memory {
        let limit = rustix::process::Rlimit { current: Some(m), maximum: Some(m) };
        // Fails closed: no limit, no model code.
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Data, limit) {
            say(&Said::Failed {
                error: ErrorInfo::new(
                    ErrorCode::Internal,
                    format!("the isolated validation cannot set its memory limit: {e}"),
                ),
            });
            return 0;
        }
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        say(&Said::Panicked { stage: stage(), message: format!("{text}{at}") });
    }));
    let manifest = match std::fs::read(dir.join(MANIFEST_FILE)) {
        Ok(bytes) => match Manifest::from_json(&bytes) {
            Ok(m) => m,
            Err(e) => {
                say(&Said::Failed { error: ErrorInfo::new(e.code, format!("{MANIFEST_FILE}: {e}")) });
                return 0;
            }
        },
        Err(e) => {
            say(&Said::Failed {
                error: ErrorInfo::new(ErrorCode::Internal, format!("{}: {e}", dir.join(MANIFEST_FILE).display())),
            });
            return 0;
        }
    };
    STAGE.store(1, Ordering::SeqCst);
    let t = Instant::now();
    let mut loaded_at = t;
    let prepared = crate::serve::backend::prepare(dir, &manifest, manifest_sha256, &mut |step| match step {
        Step::Trying(runtime) => {
            STAGE.store(1, Ordering::SeqCst);
            say(&Said::Trying { runtime });
        }
        Step::Loaded { load_ms, notes } => {
            say(&Said::Loaded { load_ms, notes: notes.to_vec() });
            STAGE.store(2, Ordering::SeqCst);
            loaded_at = Instant::now();
        }
        Step::Candidate(settled) => say(&Said::Candidate { settled }),
    });
    match prepared {
        Ok(model) => say(&Said::Valid {
            settled: model.settled(),
            validate_ms: crate::deploy::pipeline::ms(loaded_at.elapsed()),
        }),
        Err(e) => say(&Said::Failed { error: e.into() }),
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocators_line_is_one_the_agent_reads() {
        for size in [0usize, 7, 6_400_000_000, usize::MAX] {
            let mut line = [0u8; 64];
            let n = crate::sys::alloc::refusal_line(size, &mut line);
            assert_eq!(line[n - 1], b'\n');
            match serde_json::from_slice::<Said>(&line[..n - 1]) {
                Ok(Said::AllocRefused { bytes }) => assert_eq!(bytes, size as u64),
                other => panic!("{other:?}: {}", String::from_utf8_lossy(&line[..n])),
            }
        }
    }
}
