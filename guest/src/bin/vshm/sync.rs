//! `vshm event …`, `vshm mutex …`, `vshm notify` and `vshm wait-change`: the namespace's
//! events, robust mutexes and section change notifications from the command line.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use vshm::{Acquired, Disposition, EventOptions, Namespace, Status, Transport};

use super::{ctx, interrupted, wait_for_release, Failure};

/// How often a blocking command looks for SIGINT/SIGTERM/SIGHUP while it waits.
const SLICE: Duration = Duration::from_millis(200);

#[derive(Debug, Subcommand)]
pub(crate) enum EventCommand {
    /// Create an event, or open it if the name exists.
    Create {
        /// Event name.
        name: String,
        /// Keep it until deleted, not until the last handle closes.
        #[arg(long)]
        persistent: bool,
        /// Stay signalled until reset (else a wait takes the signal).
        #[arg(long)]
        manual_reset: bool,
        /// Keep the handle open until stdin closes or a signal arrives.
        #[arg(long)]
        hold: bool,
        /// With --hold: ignore stdin, release only on SIGTERM/SIGINT/SIGHUP.
        #[arg(long, requires = "hold")]
        until_signal: bool,
    },
    /// Signal an event (wakes its waiters).
    Signal {
        /// Event name.
        name: String,
    },
    /// Clear a signal nobody took.
    Reset {
        /// Event name.
        name: String,
    },
    /// Wait until the event is signalled (STATUS_TIMEOUT after --timeout).
    Wait {
        /// Event name.
        name: String,
        /// Give up after this many milliseconds [default: wait until signalled].
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MutexCommand {
    /// Create a mutex, or open it if the name exists.
    Create {
        /// Mutex name.
        name: String,
        /// Keep it until deleted, not until the last handle closes.
        #[arg(long)]
        persistent: bool,
        /// Keep the handle open until stdin closes or a signal arrives.
        #[arg(long)]
        hold: bool,
        /// With --hold: ignore stdin, release only on SIGTERM/SIGINT/SIGHUP.
        #[arg(long, requires = "hold")]
        until_signal: bool,
    },
    /// Lock a mutex and hold it until stdin closes or a signal arrives (as `vshm hold`
    /// does); prints STATUS_SUCCESS, or STATUS_ABANDONED if its last owner died holding it.
    Lock {
        /// Mutex name.
        name: String,
        /// Give up after this many milliseconds (STATUS_TIMEOUT) [default: wait].
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
        /// Ignore stdin, release only on SIGTERM/SIGINT/SIGHUP.
        #[arg(long)]
        until_signal: bool,
    },
}

fn flush() {
    let _ = std::io::stdout().lock().flush();
}

pub(crate) fn event<T: Transport>(ns: &Namespace<T>, cmd: EventCommand) -> Result<(), Failure> {
    match cmd {
        EventCommand::Create {
            name,
            persistent,
            manual_reset,
            hold,
            until_signal,
        } => {
            let opts = EventOptions {
                manual_reset,
                persistent,
            };
            let (event, disposition) = ns
                .create_event(Some(&name), &opts)
                .map_err(ctx("create event", &name))?;
            let verb = match disposition {
                Disposition::Created => "created",
                Disposition::Opened => "opened existing",
            };
            say!(
                "{}: {verb} event {name:?} (slot {}, {})",
                disposition.status().name(),
                event.slot(),
                if event.manual_reset() {
                    "manual reset"
                } else {
                    "auto reset"
                }
            );
            if hold {
                say!("holding; close stdin or send SIGTERM to release");
                flush();
                wait_for_release(until_signal)?;
            }
            event.close()?;
        }
        EventCommand::Signal { name } => {
            let event = ns.open_event(&name).map_err(ctx("open event", &name))?;
            event.signal().map_err(ctx("signal", &name))?;
            say!("{}: signalled {name:?}", Status::Success.name());
            event.close()?;
        }
        EventCommand::Reset { name } => {
            let event = ns.open_event(&name).map_err(ctx("open event", &name))?;
            event.reset().map_err(ctx("reset", &name))?;
            say!("{}: reset {name:?}", Status::Success.name());
            event.close()?;
        }
        EventCommand::Wait { name, timeout } => {
            let event = ns.open_event(&name).map_err(ctx("open event", &name))?;
            sliced(timeout, |slice| event.wait(Some(slice))).map_err(ctx("wait", &name))?;
            say!("{}: {name:?} was signalled", Status::Success.name());
            event.close()?;
        }
    }
    Ok(())
}

pub(crate) fn mutex<T: Transport>(ns: &Namespace<T>, cmd: MutexCommand) -> Result<(), Failure> {
    match cmd {
        MutexCommand::Create {
            name,
            persistent,
            hold,
            until_signal,
        } => {
            let (mutex, disposition) = ns
                .create_mutex(Some(&name), persistent)
                .map_err(ctx("create mutex", &name))?;
            let verb = match disposition {
                Disposition::Created => "created",
                Disposition::Opened => "opened existing",
            };
            say!(
                "{}: {verb} mutex {name:?} (slot {})",
                disposition.status().name(),
                mutex.slot()
            );
            if hold {
                say!("holding; close stdin or send SIGTERM to release");
                flush();
                wait_for_release(until_signal)?;
            }
            mutex.close()?;
        }
        MutexCommand::Lock {
            name,
            timeout,
            until_signal,
        } => {
            let mutex = ns.open_mutex(&name).map_err(ctx("open mutex", &name))?;
            let got = mutex
                .lock_while(timeout.map(Duration::from_millis), &mut || !interrupted())
                .map_err(|e| {
                    if interrupted() {
                        Failure(format!("interrupted: lock {name:?}"))
                    } else {
                        ctx("lock", &name)(e)
                    }
                })?;
            let how = match got {
                Acquired::Clean => "locked",
                Acquired::Abandoned => "locked (its last owner died holding it)",
            };
            say!("{}: {how} {name:?}", got.status().name());
            say!("holding; close stdin or send SIGTERM to release");
            flush();
            wait_for_release(until_signal)?;
            mutex.unlock().map_err(ctx("unlock", &name))?;
            mutex.close()?;
        }
    }
    Ok(())
}

/// `vshm notify SECTION`.
pub(crate) fn notify<T: Transport>(ns: &Namespace<T>, name: &str) -> Result<(), Failure> {
    let section = ns.open(name).map_err(ctx("open", name))?;
    section.notify().map_err(ctx("notify", name))?;
    say!("{}: notified {name:?}", Status::Success.name());
    section.close()?;
    Ok(())
}

/// `vshm wait-change SECTION`.
pub(crate) fn wait_change<T: Transport>(
    ns: &Namespace<T>,
    name: &str,
    timeout: Option<u64>,
) -> Result<(), Failure> {
    let section = ns.open(name).map_err(ctx("open", name))?;
    let count = sliced(timeout, |slice| section.wait_change(Some(slice)))
        .map_err(ctx("wait-change", name))?;
    say!(
        "{}: {name:?} changed (change {count})",
        Status::Success.name()
    );
    section.close()?;
    Ok(())
}

/// Runs a wait in slices so that a termination signal (held back for every command) ends
/// it; `timeout_ms` bounds the whole wait (STATUS_TIMEOUT).
fn sliced<R>(
    timeout_ms: Option<u64>,
    mut wait: impl FnMut(Duration) -> Result<R, vshm::Error>,
) -> Result<R, vshm::Error> {
    let mut left = timeout_ms.map(Duration::from_millis);
    loop {
        let slice = left.map_or(SLICE, |l| l.min(SLICE));
        match wait(slice) {
            Err(vshm::Error::Status(Status::Timeout)) => {}
            other => return other,
        }
        if interrupted() {
            return Err(Status::Timeout.into());
        }
        if let Some(l) = left.as_mut() {
            *l = l.saturating_sub(slice);
            if l.is_zero() {
                return Err(Status::Timeout.into());
            }
        }
    }
}
