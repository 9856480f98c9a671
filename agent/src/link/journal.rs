//! The outbox for what the device says while the broker is unreachable:
//! events, answers and telemetry are appended to `DATA/journal.jsonl`
//! (fsynced, so a reboot during the outage keeps them) and published in
//! order when the connection returns.
//!
//! Bounded in bytes on disk (`journal.max_bytes`): when a message would
//! pass the bound, the oldest telemetry goes first, then the oldest
//! answers, and deployment events only when nothing else is left; what is
//! dropped is counted (telemetry reports it). Only an index (where each
//! line is, how long, of which kind) is held in memory: the messages are
//! read back from the file when they are replayed.
//!
//! Retained messages (state, availability) are not journaled: the agent
//! republishes its current state on every connection, which is the truth.

use super::publisher::Outgoing;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Default bound: some 50,000 events of a few hundred bytes.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Entry {
    topic: String,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Vec<u8>>,
}

/// What a journaled message is, in the order it is given up when the journal is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Telemetry,
    Answer,
    Event,
}

impl Kind {
    fn of(topic: &str) -> Kind {
        if topic.ends_with("/telemetry") {
            Kind::Telemetry
        } else if topic.ends_with("/events") {
            Kind::Event
        } else {
            Kind::Answer
        }
    }
}

/// One line of the file.
#[derive(Debug, Clone, Copy)]
struct Line {
    len: u64,
    kind: Kind,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
    /// The file's lines, oldest first (the file is exactly these, in order).
    lines: VecDeque<Line>,
    bytes: u64,
    /// Messages dropped to keep the bound since the agent started.
    pub dropped: u64,
}

impl Journal {
    /// Opens the journal, keeping what an earlier run could not publish.
    /// Unreadable lines (a write cut by a power loss) are dropped.
    pub fn open(dir: &Path, max_bytes: u64) -> Journal {
        let path = dir.join("journal.jsonl");
        let mut j = Journal { path, max_bytes: max_bytes.max(1), lines: VecDeque::new(), bytes: 0, dropped: 0 };
        j.reload();
        if !j.lines.is_empty() {
            tracing::info!(
                pending = j.lines.len(),
                bytes = j.bytes,
                "journal of an earlier outage found: it is published on connect"
            );
        }
        j
    }

    /// Rebuilds the index from the file (dropping unreadable lines, and
    /// rewriting the file without them).
    fn reload(&mut self) {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let mut clean = true;
        let mut kept: Vec<(Line, &[u8])> = Vec::new();
        for raw in text.split_inclusive(|b| *b == b'\n') {
            match serde_json::from_slice::<Entry>(raw.strip_suffix(b"\n").unwrap_or(raw)) {
                Ok(e) if raw.ends_with(b"\n") => {
                    kept.push((Line { len: raw.len() as u64, kind: Kind::of(&e.topic) }, raw))
                }
                _ => clean = false,
            }
        }
        self.lines = kept.iter().map(|(l, _)| *l).collect();
        self.bytes = self.lines.iter().map(|l| l.len).sum();
        if !clean {
            let text: Vec<u8> = kept.iter().flat_map(|(_, raw)| raw.iter().copied()).collect();
            if self.write_all(&text).is_err() {
                // The index must describe the file: empty-handed rather than wrong.
                self.dropped += self.lines.len() as u64;
                self.lines.clear();
                self.bytes = 0;
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// The index and the file agree (a write that failed half-way, a file
    /// removed behind the agent's back): else the index is rebuilt from it.
    fn check(&mut self) {
        let on_disk = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if on_disk != self.bytes {
            tracing::warn!(on_disk, expected = self.bytes, "the journal file changed under the agent: reindexed");
            self.reload();
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a message belongs in the journal when the broker is away:
    /// reliable, not retained.
    pub fn keeps(m: &Outgoing) -> bool {
        m.reliable && !m.retain
    }

    /// Appends a message (durably). Past the bound, the least important
    /// oldest messages go first (see the module's documentation).
    pub fn push(&mut self, m: Outgoing) {
        self.check();
        let text = line(&m);
        let new = Line { len: text.len() as u64, kind: Kind::of(&m.topic) };
        if self.bytes + new.len > self.max_bytes && !self.make_room(new) {
            self.dropped += 1;
            tracing::warn!(topic = %m.topic, bytes = new.len, bound = self.max_bytes, "journal full of more important messages: this one is dropped");
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_data()));
        match written {
            Ok(()) => {
                self.lines.push_back(new);
                self.bytes += new.len;
            }
            Err(e) => {
                self.dropped += 1;
                tracing::error!(error = %e, "cannot write the journal; the message is lost");
                // A part of the line may have been written: cut it off.
                let _ = std::fs::OpenOptions::new().write(true).open(&self.path).and_then(|f| f.set_len(self.bytes));
            }
        }
    }

    /// Drops old messages no more important than `new` until it fits, with
    /// a tenth of the bound to spare (so the file is not rewritten at every
    /// push); rewrites the file once. False: it cannot fit.
    fn make_room(&mut self, new: Line) -> bool {
        let target = (self.max_bytes - self.max_bytes / 10).saturating_sub(new.len);
        if new.len > self.max_bytes {
            return false;
        }
        let mut drop = vec![false; self.lines.len()];
        let mut bytes = self.bytes;
        // Never a more important message for a less important one.
        for kind in [Kind::Telemetry, Kind::Answer, Kind::Event].into_iter().filter(|k| *k <= new.kind) {
            for (i, l) in self.lines.iter().enumerate() {
                if bytes <= target {
                    break;
                }
                if l.kind == kind {
                    drop[i] = true;
                    bytes -= l.len;
                }
            }
        }
        if bytes + new.len > self.max_bytes {
            return false;
        }
        let gone = drop.iter().filter(|d| **d).count();
        if gone == 0 {
            return true;
        }
        let text = std::fs::read(&self.path).unwrap_or_default();
        let mut kept_text = Vec::with_capacity(bytes as usize);
        let mut kept = VecDeque::with_capacity(self.lines.len() - gone);
        let mut at = 0usize;
        for (l, dropped) in self.lines.iter().zip(&drop) {
            let end = at + l.len as usize;
            if !dropped && let Some(raw) = text.get(at..end) {
                kept_text.extend_from_slice(raw);
                kept.push_back(*l);
            }
            at = end;
        }
        if self.write_all(&kept_text).is_err() {
            return false;
        }
        self.lines = kept;
        self.bytes = kept_text.len() as u64;
        self.dropped += gone as u64;
        tracing::warn!(
            dropped = gone,
            bound = self.max_bytes,
            "journal full: the oldest, least important messages are dropped"
        );
        true
    }

    /// Every message, oldest first, read back from the file: it is trimmed
    /// ([`Journal::forget_first`]) only once they are published, so a crash
    /// during the replay loses nothing.
    pub fn pending(&mut self) -> Vec<Outgoing> {
        if self.lines.is_empty() {
            return Vec::new();
        }
        self.check();
        let text = std::fs::read(&self.path).unwrap_or_default();
        text.split_inclusive(|b| *b == b'\n')
            .take(self.lines.len())
            .filter_map(|raw| serde_json::from_slice::<Entry>(raw).ok())
            .map(|e| Outgoing {
                topic: e.topic,
                payload: e.payload.into_bytes(),
                retain: false,
                reliable: true,
                correlation: e.correlation,
            })
            .collect()
    }

    /// Forgets the `n` oldest messages (published) and rewrites the file.
    pub fn forget_first(&mut self, n: usize) {
        let n = n.min(self.lines.len());
        if n == 0 {
            return;
        }
        let skip: u64 = self.lines.iter().take(n).map(|l| l.len).sum();
        let text = std::fs::read(&self.path).unwrap_or_default();
        let rest = text.get(skip as usize..).unwrap_or_default().to_vec();
        // Only once the file says so: else the next replay repeats them (at
        // least once), and never skips others.
        if self.write_all(&rest).is_ok() {
            self.lines.drain(..n);
            self.bytes = rest.len() as u64;
        }
    }

    /// Writes the whole journal anew (temp file, fsync, rename).
    fn write_all(&self, text: &[u8]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot rewrite the journal");
        }
        result
    }
}

/// A message as one line of the journal file.
fn line(m: &Outgoing) -> String {
    let e = Entry {
        topic: m.topic.clone(),
        payload: String::from_utf8_lossy(&m.payload).into_owned(),
        correlation: m.correlation.clone(),
    };
    serde_json::to_string(&e).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Outgoing {
        on("outpost/devices/d/events", n)
    }

    fn on(topic: &str, n: usize) -> Outgoing {
        Outgoing {
            topic: topic.into(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            retain: false,
            reliable: true,
            correlation: None,
        }
    }

    /// Appends bytes to the file behind the journal's back (a write cut short).
    fn append_raw(dir: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new().append(true).open(dir.join("journal.jsonl")).unwrap().write_all(bytes).unwrap();
    }

    fn payloads(j: &mut Journal) -> Vec<String> {
        j.pending().iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect()
    }

    #[test]
    fn messages_survive_a_restart_in_order_and_leave_once_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 1 << 20);
        for n in 0..3 {
            j.push(msg(n));
        }
        // A line cut by a power loss is dropped, the rest kept.
        append_raw(dir.path(), b"{\"topic\":");
        let mut j = Journal::open(dir.path(), 1 << 20);
        let all = j.pending();
        assert_eq!(payloads(&mut j), ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}"]);
        // Read for a replay but not yet published: still there after a crash.
        assert_eq!(Journal::open(dir.path(), 1 << 20).len(), 3);
        j.push(msg(3));
        j.forget_first(all.len());
        let mut left = Journal::open(dir.path(), 1 << 20);
        assert_eq!(payloads(&mut left), ["{\"n\":3}"]);
        assert_eq!(left.bytes(), std::fs::metadata(dir.path().join("journal.jsonl")).unwrap().len());
    }

    #[test]
    fn a_file_changed_behind_the_agent_is_reindexed_not_cut_at_wrong_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 1 << 20);
        for n in 0..3 {
            j.push(msg(n));
        }
        std::fs::remove_file(dir.path().join("journal.jsonl")).unwrap();
        j.push(msg(3));
        assert_eq!(payloads(&mut j), ["{\"n\":3}"]);
        // A fragment glued to the end (a write cut short): dropped, the rest kept.
        append_raw(dir.path(), b"{\"topic\":\"x");
        j.push(msg(4));
        assert_eq!(payloads(&mut j), ["{\"n\":3}", "{\"n\":4}"]);
        j.forget_first(1);
        assert_eq!(payloads(&mut Journal::open(dir.path(), 1 << 20)), ["{\"n\":4}"]);
    }

    #[test]
    fn the_byte_bound_drops_telemetry_first_then_answers_then_events_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = ["outpost/devices/d/events", "outpost/devices/d/telemetry", "clients/7/answers"];
        let bound: u64 = (10..20).flat_map(|n| kinds.map(|t| line(&on(t, n)).len() as u64)).sum();
        let mut j = Journal::open(dir.path(), bound);
        for n in 10..20 {
            for t in kinds {
                j.push(on(t, n));
            }
        }
        assert_eq!((j.len(), j.dropped, j.bytes()), (30, 0, bound));
        let count = |j: &mut Journal, suffix: &str| j.pending().iter().filter(|m| m.topic.ends_with(suffix)).count();
        // New events push telemetry out first, before any answer or event.
        for n in 20..25 {
            j.push(msg(n));
        }
        assert_eq!((count(&mut j, "/events"), count(&mut j, "/answers")), (15, 10));
        assert!(count(&mut j, "/telemetry") < 10 && j.dropped > 0);
        // Then answers, then (when nothing else is left) the oldest events.
        for n in 25..60 {
            j.push(msg(n));
        }
        assert_eq!((count(&mut j, "/telemetry"), count(&mut j, "/answers")), (0, 0));
        // A telemetry message cannot push an event out: it is dropped itself.
        let before = (j.dropped, count(&mut j, "/events"));
        j.push(on("outpost/devices/d/telemetry", 99));
        assert_eq!((j.dropped, count(&mut j, "/events")), (before.0 + 1, before.1));
        let mut kept = Journal::open(dir.path(), bound);
        assert!(kept.bytes() <= bound, "{} > {bound}", kept.bytes());
        let events: Vec<String> =
            kept.pending().iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
        // The newest events are kept, in order.
        assert_eq!(events.last().map(String::as_str), Some("{\"n\":59}"));
        assert!(Journal::keeps(&msg(1)));
        assert!(!Journal::keeps(&Outgoing { retain: true, ..msg(1) }));
    }
}
