//! Several regions in one vshmd: every region is a [`Daemon`] of its own (memfd, arbiter,
//! ivshmem server, control socket, event loop) running on its own thread `vshmd-<name>`,
//! so a slow client or a scribbler in one region never reaches another.
//!
//! Signals are handled once, here: the main thread blocks SIGINT/SIGTERM/SIGHUP before any
//! thread exists (threads inherit the mask) and waits on one signalfd; on a signal it rings
//! each loop's stop bell. A loop that ends without being asked (an error, a panic) stops
//! all the others too: vshmd never keeps serving some regions while one has silently died.
//! Each loop removes its own sockets as it ends; vshmd exits when every loop has ended.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::{Config, Daemon, DaemonError, Ended, Stopper, TakenOver};

/// Why a region could not start, or why vshmd stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    /// Creating a region failed (everything created before it is gone again).
    #[error("region {region}: {source}")]
    Start {
        /// The region's name.
        region: String,
        /// Cause.
        source: DaemonError,
    },
    /// Its thread could not be started.
    #[error("region {region}: cannot start its thread: {source}")]
    Spawn {
        /// The region's name.
        region: String,
        /// Cause.
        source: io::Error,
    },
    /// Its event loop failed.
    #[error("region {region}: {source}")]
    Failed {
        /// The region's name.
        region: String,
        /// Cause.
        source: DaemonError,
    },
    /// Its thread panicked.
    #[error("region {region}: its event loop panicked")]
    Panicked {
        /// The region's name.
        region: String,
    },
    /// Its event loop returned although nobody asked it to stop.
    #[error("region {region}: its event loop stopped on its own (see the log above)")]
    Ended {
        /// The region's name.
        region: String,
    },
    /// Taking it over from the running vshmd failed (that one serves on).
    #[error("region {region}: {source}")]
    Takeover {
        /// The region's name.
        region: String,
        /// Cause.
        source: DaemonError,
    },
    /// The running vshmd did not confirm it let go of the region.
    #[error("region {region}: {source}")]
    Commit {
        /// The region's name.
        region: String,
        /// Cause.
        source: crate::handoff::HandoffError,
    },
    /// Waiting for signals failed.
    #[error("cannot wait for signals: {0}")]
    Signals(io::Error),
    /// `--fd-store` without systemd, or the store or journal failed.
    #[error("region {region}: {source}")]
    FdStore {
        /// The region's name ("-" before any).
        region: String,
        /// Cause.
        source: crate::fdstore::FdStoreError,
    },
    /// `--fd-store` needs a service manager to keep the fds.
    #[error("--fd-store: $NOTIFY_SOCKET is not set; run vshmd under systemd with FileDescriptorStoreMax= (packaging/systemd/vshmd@.service)")]
    NoServiceManager,
}

/// One region started with `--fd-store`: fresh, or recovered from the store after a crash.
pub type KeptRegion = (Daemon, Option<TakenOver>);

/// Starts every region kept in systemd's fd store (`vshmd --fd-store`, `crate::fdstore`):
/// a region whose journal systemd passed back is recovered from it (its VMs stay
/// attached), any other is created afresh and stored. All or nothing, as [`start`]; the
/// socket files of regions recovered before a failure stay (their fds are still stored).
pub fn start_kept(
    configs: Vec<Config>,
    mut listen: crate::fdstore::ListenFds,
) -> Result<Vec<KeptRegion>, RegionsError> {
    use crate::fdstore::{self, FdStore};
    let notifier = crate::notify::notifier().ok_or(RegionsError::NoServiceManager)?;
    let mut started: Vec<KeptRegion> = Vec::with_capacity(configs.len());
    let fail = |started: &mut Vec<KeptRegion>, e: RegionsError| {
        while let Some((mut d, _)) = started.pop() {
            d.keep_files();
        }
        e
    };
    for config in configs {
        let region = config.name.clone();
        let store_err = |source| RegionsError::FdStore {
            region: region.clone(),
            source,
        };
        let found = match fdstore::recover(notifier, &region, &mut listen) {
            Ok(f) => f,
            Err(e) => return Err(fail(&mut started, store_err(e))),
        };
        let kept = match found {
            Some(found) => Daemon::recover(config, found).map(|(d, t)| (d, Some(t))),
            None => Daemon::new(config).map(|d| (d, None)),
        };
        let (mut daemon, taken) = match kept {
            Ok(k) => k,
            Err(source) => {
                return Err(fail(
                    &mut started,
                    RegionsError::Start {
                        region: region.clone(),
                        source,
                    },
                ))
            }
        };
        if taken.is_none() {
            let stored =
                FdStore::new(notifier, &region).and_then(|store| daemon.keep_in_fd_store(store));
            if let Err(e) = stored {
                return Err(fail(&mut started, store_err(e)));
            }
        }
        started.push((daemon, taken));
    }
    let rest = listen.discard_rest(Some(notifier));
    if !rest.is_empty() {
        tracing::warn!(names = ?rest, "stored fds of regions no longer configured: closed");
    }
    Ok(started)
}

/// SIGINT, SIGTERM and SIGHUP, blocked in this thread and readable from one fd.
#[derive(Debug)]
pub struct Signals(File);

/// Blocks SIGINT/SIGTERM/SIGHUP in the calling thread and returns a signalfd for them.
/// Call before any thread is started: threads inherit the mask, so only the signalfd sees
/// them.
pub fn block_signals() -> io::Result<Signals> {
    // SAFETY: plain libc signal-set manipulation on a local sigset_t; sigprocmask and
    // signalfd get valid pointers and we check their results; the new fd is ours.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Signals(File::from_raw_fd(fd)))
    }
}

/// Creates every region, in order, or none: if one fails, the ones created before it are
/// dropped (their sockets removed, their memory freed) and the error names the region.
pub fn start(configs: Vec<Config>) -> Result<Vec<Daemon>, RegionsError> {
    let mut daemons = Vec::with_capacity(configs.len());
    for config in configs {
        let region = config.name.clone();
        match Daemon::new(config) {
            Ok(d) => daemons.push(d),
            Err(source) => {
                // Newest first, the reverse of creation.
                while let Some(d) = daemons.pop() {
                    drop(d);
                }
                return Err(RegionsError::Start { region, source });
            }
        }
    }
    Ok(daemons)
}

/// The regions taken over, and the error that stopped the commits part way (if one did).
pub type TakenRegions = (Vec<(Daemon, TakenOver)>, Option<RegionsError>);

/// Takes every region over from the vshmd serving it (`vshmd --takeover`): first each
/// region's state is received and rebuilt (each old loop waits meanwhile), and only if all
/// of them were is each committed. If one fails before that, every connection is dropped
/// and the old process resumes serving all of them. A commit can fail only if the old
/// process died or stopped answering; the regions committed before it are served here,
/// the error is returned beside them.
pub fn take_over(configs: Vec<Config>) -> Result<TakenRegions, RegionsError> {
    let mut pending = Vec::with_capacity(configs.len());
    for config in configs {
        let region = config.name.clone();
        match Daemon::take_over(config) {
            Ok(p) => pending.push(p),
            // Dropping `pending` closes the connections: every old loop resumes.
            Err(source) => return Err(RegionsError::Takeover { region, source }),
        }
    }
    let mut taken = Vec::with_capacity(pending.len());
    for (mut daemon, stream, t) in pending {
        let region = daemon.name().to_string();
        match crate::handoff::commit(&stream) {
            Ok(()) => {
                daemon.took_over(&t, "takeover");
                taken.push((daemon, t));
            }
            Err(source) if taken.is_empty() => {
                return Err(RegionsError::Commit { region, source });
            }
            Err(source) => {
                // The ones not committed yet resume in the old process as their
                // connections close.
                return Ok((taken, Some(RegionsError::Commit { region, source })));
            }
        }
    }
    Ok((taken, None))
}

/// One running region, as the main thread sees it.
struct Running {
    name: String,
    stopper: Stopper,
    /// Set by its thread as it ends, before it rings `ended`.
    done: Arc<AtomicBool>,
    /// Set by its thread if it handed the region over (before `done`).
    handed_off: Arc<AtomicBool>,
    thread: JoinHandle<Result<Ended, DaemonError>>,
}

/// Rings `ended` when its thread ends, however it ends (return or panic).
struct EndGuard {
    done: Arc<AtomicBool>,
    ended: Arc<EventFd>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        let _ = self.ended.write(1);
    }
}

/// Runs every region on its own thread until a signal arrives or one loop ends (other than
/// by handing its region over); then stops them all and waits for each. Returns every
/// failure (none: a clean stop on a signal, or every region handed over).
pub fn run(daemons: Vec<Daemon>, signals: &Signals) -> Result<(), Vec<RegionsError>> {
    let mut failures = Vec::new();
    let ended = match EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK) {
        Ok(e) => Arc::new(e),
        Err(e) => return Err(vec![RegionsError::Signals(e)]),
    };
    let mut running: Vec<Running> = Vec::with_capacity(daemons.len());
    for daemon in daemons {
        let name = daemon.name().to_string();
        let stopper = match daemon.stopper() {
            Ok(s) => s,
            Err(e) => {
                failures.push(RegionsError::Spawn {
                    region: name,
                    source: e,
                });
                break;
            }
        };
        let done = Arc::new(AtomicBool::new(false));
        let handed_off = Arc::new(AtomicBool::new(false));
        let handed = handed_off.clone();
        let guard = EndGuard {
            done: done.clone(),
            ended: ended.clone(),
        };
        let span_name = name.clone();
        let spawned = std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread's name: enough to tell regions apart in top.
            .name(format!("vshmd-{name}"))
            .spawn(move || {
                let _guard = guard;
                let _span = tracing::info_span!("region", name = %span_name).entered();
                let ended = daemon.run();
                if matches!(ended, Ok(Ended::HandedOff)) {
                    handed.store(true, Ordering::Release);
                }
                ended
            });
        match spawned {
            Ok(thread) => running.push(Running {
                name,
                stopper,
                done,
                handed_off,
                thread,
            }),
            Err(e) => {
                failures.push(RegionsError::Spawn {
                    region: name,
                    source: e,
                });
                break;
            }
        }
    }
    if failures.is_empty() {
        if let Err(e) = wait(signals, &ended, &running) {
            failures.push(RegionsError::Signals(e));
        }
    }
    // Those that ended before anyone asked them to stop did so on their own (unless they
    // handed their region over).
    let unasked: Vec<bool> = running
        .iter()
        .map(|r| r.done.load(Ordering::Acquire) && !r.handed_off.load(Ordering::Acquire))
        .collect();
    // Before the sockets go: systemd then knows the stop is vshmd's own doing.
    crate::notify::notify("STOPPING=1\nSTATUS=stopping");
    for r in &running {
        r.stopper.stop();
    }
    for (r, unasked) in running.into_iter().zip(unasked) {
        match r.thread.join() {
            Ok(Ok(Ended::Stopped)) if unasked => {
                failures.push(RegionsError::Ended { region: r.name })
            }
            Ok(Ok(_)) => {}
            Ok(Err(source)) => failures.push(RegionsError::Failed {
                region: r.name,
                source,
            }),
            Err(_) => failures.push(RegionsError::Panicked { region: r.name }),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// Waits until a signal arrives, a region's thread ends other than by handing its region
/// over, or every region was handed over.
fn wait(signals: &Signals, ended: &EventFd, running: &[Running]) -> io::Result<()> {
    let regions = running.len();
    let mut fds = [
        libc::pollfd {
            fd: signals.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ended.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll on a local array of two initialised pollfds, its length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            // A signalfd_siginfo: its first field is the signal's number.
            let mut info = [0u8; 128];
            let signo = match (&signals.0).read(&mut info) {
                Ok(n) if n >= 4 => u32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
                Ok(_) => 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            tracing::info!("signal {signo}: stopping {regions} region(s)");
            return Ok(());
        }
        if fds[1].revents != 0 {
            let _ = ended.read();
            let handed = |r: &Running| r.handed_off.load(Ordering::Acquire);
            let done = |r: &Running| r.done.load(Ordering::Acquire);
            if running.iter().any(|r| done(r) && !handed(r)) {
                tracing::error!("a region's event loop ended; stopping every region");
                return Ok(());
            }
            if running.iter().all(|r| done(r) && handed(r)) {
                tracing::info!("every region was handed over; exiting");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    /// A fresh scratch directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vshm-regions-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn region(dir: &std::path::Path, name: &str) -> Config {
        let mut c = Config::with_defaults(
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}.ctl")),
        );
        c.name = name.into();
        c.size = 4 << 20;
        c.max_objects = crate::config::default_max_objects(c.size);
        c
    }

    /// Signals that never come (a pipe nobody writes), so the test sees only `ended`.
    fn no_signals() -> (Signals, std::io::PipeWriter) {
        let (r, w) = std::io::pipe().expect("pipe");
        (Signals(File::from(OwnedFd::from(r))), w)
    }

    #[test]
    fn a_region_whose_loop_ends_on_its_own_stops_the_others_and_is_reported() {
        let dir = scratch("ended");
        let daemons = start(vec![region(&dir, "a"), region(&dir, "b")]).expect("start");
        // Region b's loop ends without the supervisor asking (as a failing loop would).
        daemons[1].stopper().expect("stopper").stop();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (signals, _w) = no_signals();
            let _ = tx.send(run(daemons, &signals));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("watchdog: run did not return within 30 s");
        let failures = result.expect_err("one region ended on its own");
        let names: Vec<String> = failures.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            ["region b: its event loop stopped on its own (see the log above)"]
        );
        // Region a was stopped too, and removed its sockets as it ended.
        for f in ["a.sock", "a.ctl", "b.sock", "b.ctl"] {
            assert!(!dir.join(f).exists(), "{f} left behind");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_region_that_cannot_start_takes_the_ones_before_it_down_again() {
        let dir = scratch("start");
        std::fs::create_dir(dir.join("b.sock")).expect("in the way");
        let e = start(vec![region(&dir, "a"), region(&dir, "b")]).expect_err("b cannot bind");
        assert!(
            matches!(&e, RegionsError::Start { region, .. } if region == "b"),
            "{e}"
        );
        assert!(!dir.join("a.sock").exists() && !dir.join("a.ctl").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
