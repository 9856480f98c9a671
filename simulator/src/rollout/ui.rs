//! Live progress of a rollout, on stderr (stdout keeps the final report,
//! for scripts): on a terminal one line updated in place under the
//! messages; elsewhere plain lines, a count at most every
//! [`PLAIN_INTERVAL`](crate::progress::PLAIN_INTERVAL). Silent when the
//! engine runs as a library without progress.

use crate::progress::{PLAIN_INTERVAL, Stream, counts_line};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Ui {
    enabled: bool,
    terminal: bool,
    bar: Option<ProgressBar>,
    /// The plain count in progress: (total, what, started, last line).
    plain: Option<(u64, String, Instant, Option<Instant>)>,
}

impl Ui {
    pub fn new(enabled: bool) -> Ui {
        Ui { enabled, terminal: enabled && Stream::Stderr.is_terminal(), bar: None, plain: None }
    }

    /// A message that stays (above the live line on a terminal). Control
    /// characters are escaped: device names and errors come from whoever
    /// can publish on the broker, and must not drive the operator's terminal.
    pub fn say(&self, line: &str) {
        if !self.enabled {
            return;
        }
        let line = escape(line, false);
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Starts a count towards `total` (`what`: `active`, `s soaked`).
    pub fn begin(&mut self, total: u64, what: &str) {
        self.end();
        if !self.enabled {
            return;
        }
        if self.terminal {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let template = format!("  {{elapsed:>5}} [{{bar:30}}] {{pos}}/{{len}} {what}  {{msg}}");
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            self.bar = Some(bar);
        } else {
            self.plain = Some((total, what.to_string(), Instant::now(), None));
        }
    }

    pub fn update(&mut self, done: u64, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(text.to_string());
        } else if let Some((total, what, started, last)) = &mut self.plain {
            let now = Instant::now();
            if last.is_none_or(|t| now.saturating_duration_since(t) >= PLAIN_INTERVAL) {
                *last = Some(now);
                eprintln!("  {}", counts_line(now.saturating_duration_since(*started), done, *total, what, text));
            }
        }
    }

    /// Ends the count in progress (its last figures stay in the messages that follow).
    pub fn end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.plain = None;
    }
}

/// `text` with its control characters and its invisible bidirectional and
/// zero-width marks escaped, as `status` does (newlines kept with `keep_newlines`).
pub fn escape(text: &str, keep_newlines: bool) -> String {
    text.chars()
        .map(|c| {
            let invisible =
                matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
            if (c.is_control() && !(keep_newlines && c == '\n')) || invisible {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn devices_words_cannot_drive_the_terminal() {
        assert_eq!(super::escape("cam\u{1b}[2J\rx\ny", false), "cam\\u{1b}[2J\\rx\\ny");
        assert_eq!(super::escape("a\u{7}\nb", true), "a\\u{7}\nb");
        // Bidirectional overrides and zero-width marks reorder or hide text: escaped too.
        assert_eq!(super::escape("cam\u{202e}1-mac\u{200b}", false), "cam\\u{202e}1-mac\\u{200b}");
        assert_eq!(super::escape("\u{2066}x\u{feff}", true), "\\u{2066}x\\u{feff}");
    }
}
