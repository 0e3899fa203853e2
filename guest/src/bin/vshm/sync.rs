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
    /// Measure wake-up latency: signal NAME.ping, wait for NAME.pong, COUNT times (run
    /// `vshm event echo NAME` in the other peer first). Half a round trip is one wake-up.
    Ping {
        /// Prefix of the two events.
        name: String,
        /// Round trips.
        #[arg(long, default_value_t = 200)]
        count: u32,
    },
    /// The other end of `ping`: wait for NAME.ping, signal NAME.pong, until interrupted or
    /// COUNT round trips.
    Echo {
        /// Prefix of the two events.
        name: String,
        /// Round trips, then exit [default: until a signal].
        #[arg(long)]
        count: Option<u32>,
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
        EventCommand::Ping { name, count } => ping(ns, &name, count)?,
        EventCommand::Echo { name, count } => echo(ns, &name, count)?,
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

/// The two auto-reset events of a ping-pong pair, created if missing.
fn pair<'ns, T: Transport>(
    ns: &'ns Namespace<T>,
    name: &str,
) -> Result<(vshm::Event<'ns, T>, vshm::Event<'ns, T>), Failure> {
    let open = |suffix: &str| {
        let full = format!("{name}.{suffix}");
        ns.create_event(Some(&full), &EventOptions::default())
            .map(|(e, _)| e)
            .map_err(|e| ctx("create event", &full)(e))
    };
    Ok((open("ping")?, open("pong")?))
}

fn ping<T: Transport>(ns: &Namespace<T>, name: &str, count: u32) -> Result<(), Failure> {
    let (ping, pong) = pair(ns, name)?;
    let mut rtt = Vec::new();
    for _ in 0..count.max(1) {
        if interrupted() {
            break;
        }
        let t = std::time::Instant::now();
        ping.signal().map_err(ctx("signal", name))?;
        if let Err(e) = pong.wait(Some(Duration::from_secs(5))) {
            // Say what the two events looked like: a lost signal and a missing echo differ.
            let state = |ev: &vshm::Event<'_, T>| {
                format!(
                    "signalled {:?}, {:?} signals",
                    ev.is_signaled().ok(),
                    ev.signal_count().ok()
                )
            };
            return Err(Failure(format!(
                "{e}: no echo of {name:?} after round trip {} (ping {}; pong {})",
                rtt.len(),
                state(&ping),
                state(&pong)
            )));
        }
        rtt.push(t.elapsed());
    }
    rtt.sort();
    let at = |q: usize| rtt[(rtt.len() - 1) * q / 100].as_secs_f64() * 1e6;
    say!(
        "event round trip n={} min={:.1}us median={:.1}us p99={:.1}us max={:.1}us",
        rtt.len(),
        at(0),
        at(50),
        at(99),
        at(100)
    );
    Ok(())
}

fn echo<T: Transport>(ns: &Namespace<T>, name: &str, count: Option<u32>) -> Result<(), Failure> {
    let (ping, pong) = pair(ns, name)?;
    say!("holding; echoing {name}.ping to {name}.pong");
    flush();
    let mut done = 0u32;
    while count.is_none_or(|c| done < c) && !interrupted() {
        match ping.wait(Some(SLICE)) {
            Ok(()) => {
                pong.signal().map_err(ctx("signal", name))?;
                done += 1;
            }
            Err(vshm::Error::Status(Status::Timeout)) => {}
            Err(e) => return Err(ctx("wait", name)(e)),
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
