//! Where vshmd's log goes: the systemd journal (native fields, priorities, the region as a
//! field) when it runs under systemd or is told to, plain lines on stderr otherwise.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// `vshmd --log`: where to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal if systemd started vshmd (`$JOURNAL_STREAM` is set), else stderr.
    Auto,
    /// The systemd journal (falls back to stderr, with a warning, if it is unreachable).
    Journal,
    /// Plain lines on stderr.
    Stderr,
}

/// Whether stderr is the journal: systemd sets `$JOURNAL_STREAM` for services whose
/// output it connects to the journal.
fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty())
}

/// Installs the global subscriber (filter: `$RUST_LOG`, default `info`). Returns the target
/// actually used.
pub fn init(target: LogTarget) -> LogTarget {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = match target {
        LogTarget::Journal => true,
        LogTarget::Auto => under_systemd(),
        LogTarget::Stderr => false,
    };
    let mut fallback = None;
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("vshmd".into());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return LogTarget::Journal;
            }
            Err(e) => fallback = Some(e),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(e) = fallback {
        tracing::warn!("cannot reach the systemd journal ({e}): logging to stderr");
    }
    LogTarget::Stderr
}
