//! Small OS helpers the std transports share: whether a process or thread still exists,
//! the calling thread's id, a short retry for a header a peer may have scribbled, and the
//! test-only pause inside a cell lock.

use std::io;
use std::time::{Duration, Instant};

/// How long a reader keeps looking at a header that does not validate before it believes
/// it: vshmd rewrites a scribbled superblock within one 200 ms heal period (FORMAT.md §11).
const SCRIBBLE_GRACE: Duration = Duration::from_secs(1);

/// Runs `attempt` until it succeeds or [`SCRIBBLE_GRACE`] has passed (20 ms apart), and
/// returns its last result.
pub(crate) fn retry_scribbled<T, E>(mut attempt: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let start = Instant::now();
    loop {
        match attempt() {
            Err(_) if start.elapsed() < SCRIBBLE_GRACE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Whether the process or thread `id` still exists (`kill(id, 0)`; dead only on ESRCH).
pub(crate) fn process_alive(id: u32) -> bool {
    // Above PID_MAX_LIMIT (2^22) a token is no process: the guest driver's own
    // (VSHM_KERNEL_TOKEN), which is never to be taken for a dead one.
    const PID_MAX_LIMIT: u32 = 1 << 22;
    if id > PID_MAX_LIMIT {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(id) else {
        return true;
    };
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The calling thread's id, as a non-zero token (mutex ownership).
pub(crate) fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).ok().filter(|&t| t != 0).unwrap_or(1)
}

/// Test only (`VSHM_TEST_PAUSE_IN_CELL_LOCK`): says so on stderr and never returns, so a
/// test can SIGKILL a process that holds its refcount cell lock (tests/tests/vms_cell_lock.rs).
pub(crate) fn pause_forever() {
    eprintln!(
        "vshm: test hook: paused in the cell lock (pid {})",
        std::process::id()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
