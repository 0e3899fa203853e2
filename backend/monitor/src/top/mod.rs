//! `vshmctl top`: a live terminal view of a running vshmd.
//!
//! Three layers, so that everything but the terminal itself is testable:
//! - [`App`], a pure model: the last status document, the counters of the one before, the
//!   rates computed from both, the last refresh error and the sort order;
//! - [`render`], a pure function drawing an [`App`] into a ratatui [`Frame`];
//! - [`run`], the thin shell: terminal setup and restore, the event loop, status requests.
//!
//! The status document comes from vshmd (docs/MONITOR.md names its fields); nothing in it is
//! trusted to be there or well-typed: a missing or odd field renders as `-`.
//!
//! Files: the model here; [`render`] in `render.rs`; the terminal shell in `terminal.rs`.

mod render;
mod terminal;
#[cfg(test)]
mod tests;

pub use render::render;
pub use terminal::run;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde_json::Value;

/// How the sections table is ordered (largest first either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    /// By current size, then name.
    #[default]
    Size,
    /// By total handles, then size, then name.
    Refs,
}

/// Counter totals of one status document and when it arrived.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    pid: Option<u64>,
    requests: Option<u64>,
    doorbells: Option<u64>,
}

impl Sample {
    fn of(doc: &Value, at: Instant) -> Sample {
        Sample {
            at,
            pid: doc["vshmd"]["pid"].as_u64(),
            requests: doc["counters"]["requests"].as_u64(),
            doorbells: doc["counters"]["doorbells"].as_u64(),
        }
    }
}

/// Per-second rates between the two last status documents (`None`: not known yet, or not
/// comparable, e.g. vshmd restarted in between).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Control and namespace requests answered per second.
    pub requests: Option<f64>,
    /// Doorbells rung per second.
    pub doorbells: Option<f64>,
}

/// `(new - old) / seconds`, when both totals are there and did not go backwards.
fn rate(old: Option<u64>, new: Option<u64>, secs: f64) -> Option<f64> {
    let delta = new?.checked_sub(old?)?;
    #[allow(clippy::cast_precision_loss)] // a rate for people
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// The model behind the view: pure, fed with status documents and keys.
#[derive(Debug)]
pub struct App {
    control: PathBuf,
    doc: Option<Value>,
    last: Option<Sample>,
    rates: Rates,
    error: Option<String>,
    sort: SortBy,
    quit: bool,
}

impl App {
    /// A model with no document yet, showing `control` in its footer.
    pub fn new(control: &Path) -> App {
        App {
            control: control.to_owned(),
            doc: None,
            last: None,
            rates: Rates::default(),
            error: None,
            sort: SortBy::default(),
            quit: false,
        }
    }

    /// Takes a fresh status document that arrived at `now`: the rates are the counters'
    /// differences from the previous document over the time between them. Clears any error.
    pub fn update(&mut self, doc: Value, now: Instant) {
        let sample = Sample::of(&doc, now);
        self.rates = match self.last {
            // A different vshmd (or one without a pid) counts from zero again.
            Some(prev) if prev.pid == sample.pid && prev.pid.is_some() => {
                let secs = now.saturating_duration_since(prev.at).as_secs_f64();
                Rates {
                    requests: rate(prev.requests, sample.requests, secs),
                    doorbells: rate(prev.doorbells, sample.doorbells, secs),
                }
            }
            _ => Rates::default(),
        };
        self.last = Some(sample);
        self.doc = Some(doc);
        self.error = None;
    }

    /// A refresh failed: shows `error` (the last document stays on screen until the next
    /// refresh succeeds).
    pub fn fail(&mut self, error: impl Into<String>) {
        self.error = Some(error.into());
    }

    /// Handles a key: `s`/`r` choose the sort order, `q`, Esc and Ctrl-C quit.
    pub fn on_key(&mut self, key: KeyEvent) {
        match key.code {
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.quit = true;
            }
            KeyCode::Char('q') | KeyCode::Esc => self.quit = true,
            KeyCode::Char('s') => self.sort = SortBy::Size,
            KeyCode::Char('r') => self.sort = SortBy::Refs,
            _ => {}
        }
    }

    /// Whether a quit key was pressed.
    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// The sort order.
    pub fn sort(&self) -> SortBy {
        self.sort
    }

    /// The rates from the last two documents.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// The last refresh error, if the last refresh failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The sections of the last document, in display order.
    /// The events and mutexes of the status document, by name.
    fn sync_objects(&self) -> Vec<&Value> {
        let mut objects: Vec<&Value> = self
            .doc
            .as_ref()
            .and_then(|d| d["sections"].as_array())
            .into_iter()
            .flatten()
            .filter(|s| is_sync(s))
            .collect();
        let name = |s: &Value| s["name"].as_str().unwrap_or("").to_owned();
        objects.sort_by_key(|s| name(s));
        objects
    }

    fn sections(&self) -> Vec<&Value> {
        let mut sections: Vec<&Value> = self
            .doc
            .as_ref()
            .and_then(|d| d["sections"].as_array())
            .into_iter()
            .flatten()
            .filter(|s| !is_sync(s))
            .collect();
        let size = |s: &Value| s["size"].as_u64().unwrap_or(0);
        let refs = |s: &Value| s["refs"].as_u64().unwrap_or(0);
        let name = |s: &Value| s["name"].as_str().unwrap_or("").to_owned();
        match self.sort {
            SortBy::Size => {
                sections.sort_by(|a, b| size(b).cmp(&size(a)).then_with(|| name(a).cmp(&name(b))))
            }
            SortBy::Refs => sections.sort_by(|a, b| {
                refs(b)
                    .cmp(&refs(a))
                    .then_with(|| size(b).cmp(&size(a)))
                    .then_with(|| name(a).cmp(&name(b)))
            }),
        }
        sections
    }
}

// ---- formatting: every field may be missing ----

/// An event or a mutex row of the status document (they share the `sections` array with a
/// `kind`); anything else, including a row without a kind, is shown as a section.
fn is_sync(s: &Value) -> bool {
    matches!(s["kind"].as_str(), Some("event" | "mutex"))
}
