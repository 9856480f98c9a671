//! Logging under systemd: journald reads a `<N>` syslog priority at the start
//! of each line written to a stream it collects (sd-daemon(3)), so
//! `journalctl -p warning` shows the agent's warnings and errors. Only when
//! stderr really is that stream: `JOURNAL_STREAM` names its device and inode,
//! and a child or a redirected stderr inherits the variable but not the stream.

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr is the journal stream `JOURNAL_STREAM` names.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else { return false };
    names_stream(&v.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// `JOURNAL_STREAM` is `DEVICE:INODE`, both decimal.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else { return false };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// The syslog priority of a level: error 3, warning 4, info 6, debug 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// A formatter that puts the `<N>` prefix before what `F` writes.
#[derive(Debug)]
pub struct Prioritised<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        // Every line of the event gets the prefix: journald reads one at the
        // start of each line, so a newline inside a message (from a field an
        // outsider chose) must not let the next line claim its own priority.
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        let p = priority(event.metadata().level());
        for line in text.strip_suffix('\n').unwrap_or(&text).split('\n') {
            writeln!(writer, "<{p}>{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_line_starts_with_its_syslog_priority() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let format = tracing_subscriber::fmt::format().without_time().with_target(false).with_ansi(false);
        let subscriber = tracing_subscriber::fmt()
            .event_format(Prioritised(format))
            .with_writer(move || writer.clone())
            .with_max_level(Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e\n<0>forged");
            tracing::warn!(topic = "t", "w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            ["<3>ERROR e", "<3><0>forged", "<4> WARN w topic=\"t\"", "<6> INFO i", "<7>DEBUG d"],
            "{text}"
        );
    }

    #[test]
    fn only_the_stream_journal_stream_names_counts() {
        assert!(names_stream("64769:1234", 64769, 1234));
        assert!(!names_stream("64769:1234", 64769, 1235));
        assert!(!names_stream("64769", 64769, 1234));
        assert!(!names_stream("", 0, 0));
    }
}
