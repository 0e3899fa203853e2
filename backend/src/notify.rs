//! systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram of
//! `KEY=VALUE` lines to the UNIX socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! address written `@name`). vshmd says `READY=1` once every region's sockets listen and
//! `STOPPING=1` when it starts to shut down; without `$NOTIFY_SOCKET` nothing is sent.

use std::io;
use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor an `@` abstract name.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    /// The address is too long for a UNIX socket, or otherwise refused.
    #[error("NOTIFY_SOCKET={value:?}: {source}")]
    Address {
        /// The variable's value.
        value: String,
        /// Cause.
        source: io::Error,
    },
    /// Creating the datagram socket or sending failed.
    #[error("sending {state:?} to NOTIFY_SOCKET={value:?}: {source}")]
    Send {
        /// What was being sent.
        state: String,
        /// The variable's value.
        value: String,
        /// Cause.
        source: io::Error,
    },
}

impl NotifyError {
    /// The service manager's socket was full (sending would have waited).
    pub fn would_block(&self) -> bool {
        matches!(self, NotifyError::Send { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Longest [`Notifier::send`] waits for room in the service manager's queue.
pub const SEND_PATIENCE: Duration = Duration::from_secs(5);

/// Where notifications go: the parsed `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    value: String,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `value`: `/path/to/socket` or `@abstract-name`.
    pub fn new(value: &str) -> Result<Notifier, NotifyError> {
        let addr = if let Some(name) = value.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value)
        } else {
            return Err(NotifyError::BadAddress(value.to_owned()));
        };
        let addr = addr.map_err(|source| NotifyError::Address {
            value: value.to_owned(),
            source,
        })?;
        Ok(Notifier {
            value: value.to_owned(),
            addr,
        })
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) in one datagram, waiting
    /// up to [`SEND_PATIENCE`] for room in the service manager's queue (READY=1 must not
    /// be lost to a moment of congestion). For the regions' threads: [`Notifier::try_send`].
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.send_datagram(state, Some(SEND_PATIENCE))
    }

    /// [`Notifier::send`] without waiting: a full queue is an error
    /// ([`NotifyError::would_block`]). A region's loop never waits for the service manager:
    /// its socket is shared by every service and it stops reading now and then (a
    /// daemon-reload).
    pub fn try_send(&self, state: &str) -> Result<(), NotifyError> {
        self.send_datagram(state, None)
    }

    fn send_datagram(&self, state: &str, patience: Option<Duration>) -> Result<(), NotifyError> {
        let failed = |source| NotifyError::Send {
            state: state.to_owned(),
            value: self.value.clone(),
            source,
        };
        // A fresh unbound socket per message: notifications are rare, and nothing is left
        // open for the regions' threads to trip over.
        let socket = UnixDatagram::unbound().map_err(failed)?;
        match patience {
            Some(d) => socket.set_write_timeout(Some(d)).map_err(failed)?,
            None => socket.set_nonblocking(true).map_err(failed)?,
        }
        socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(failed)?;
        Ok(())
    }
}

impl Notifier {
    /// Sends `state` with `fds` attached (SCM_RIGHTS), as `FDSTORE=1` needs, without
    /// waiting (as [`Notifier::try_send`]).
    pub fn try_send_with_fds(&self, state: &str, fds: &[RawFd]) -> Result<(), NotifyError> {
        let failed = |source| NotifyError::Send {
            state: state.to_owned(),
            value: self.value.clone(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(failed)?;
        socket.set_nonblocking(true).map_err(failed)?;
        socket.connect_addr(&self.addr).map_err(failed)?;
        let sent = socket
            .send_with_fds(&[state.as_bytes()], fds)
            .map_err(|e| failed(io::Error::from(e)))?;
        if sent != state.len() {
            return Err(failed(io::Error::from(io::ErrorKind::WriteZero)));
        }
        Ok(())
    }
}

/// The notifier `$NOTIFY_SOCKET` names, read once per process; `None` when vshmd does not
/// run under systemd (or the variable does not parse: logged once).
pub fn notifier() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            Notifier::from_env().unwrap_or_else(|e| {
                tracing::warn!("not notifying the service manager: {e}");
                None
            })
        })
        .as_ref()
}

/// Sends `state` to `$NOTIFY_SOCKET` if vshmd runs under systemd (or anything else playing
/// its part); otherwise does nothing. Failures are logged, never fatal: a supervisor that
/// does not listen must not take the VMs' memory down with it.
pub fn notify(state: &str) {
    if let Some(n) = notifier() {
        if let Err(e) = n.send(state) {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt;

    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_address() {
        let dir = std::env::temp_dir().join(format!("vshm-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify");
        let by_path = UnixDatagram::bind(&path).expect("bind path");
        let path_text = path.to_str().expect("utf-8 temp dir");
        Notifier::new(path_text)
            .expect("path")
            .send("READY=1")
            .expect("send");
        assert_eq!(received(&by_path), "READY=1");

        let name = format!("vshm-notify-test-{}", std::process::id());
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let by_name = UnixDatagram::bind_addr(&abstract_addr).expect("bind abstract");
        Notifier::new(&format!("@{name}"))
            .expect("abstract")
            .send("STOPPING=1\nSTATUS=bye")
            .expect("send");
        assert_eq!(received(&by_name), "STOPPING=1\nSTATUS=bye");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relative_address_is_refused_by_value() {
        let e = Notifier::new("notify.sock").expect_err("relative");
        assert!(
            matches!(&e, NotifyError::BadAddress(v) if v == "notify.sock"),
            "{e}"
        );
    }
}
