//! Handing a running region to a new vshmd process (`vshmd --takeover`,
//! docs/OPERATIONS.md): the file descriptors and the byte stream that carry it.
//!
//! The old process listens on `<control>.handoff` (mode 0600; only its own user, or root,
//! is answered). The exchange on one connection, per region:
//!
//! 1. new → old: [`HELLO`] (8 bytes) and the protocol version (u32 LE).
//! 2. old → new: a header (magic, JSON length u64, fd count u32), then the fds in chunks of
//!    at most [`FDS_PER_MESSAGE`], each chunk riding on one byte (SCM_RIGHTS carries at most
//!    253 fds per message), then the JSON: the state, or why the old process refuses.
//!    From here until step 4 the old process's loop waits: it serves nothing.
//! 3. new → old: [`COMMIT`] once it has rebuilt and checked everything; anything else (or
//!    the connection closing) and the old process resumes serving as before.
//! 4. old → new: [`RELEASED`]; the old process then stops without removing the socket
//!    files, and the new one starts serving. A new process that does not read `RELEASED`
//!    never serves: one region is never served by two processes.
//!
//! The JSON names fds by their index in the order they were sent ([`FdTable`]); one fd
//! sent once may be named many times (an eventfd is both a client's and in other clients'
//! queued messages), and the receiver shares it again ([`Received`]).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// What a new process says first.
pub const HELLO: &[u8; 8] = b"VSHMTAKE";
/// The version of this exchange.
pub const VERSION: u32 = 1;
/// Magic of the old process's header.
const OFFER: &[u8; 8] = b"VSHMSTAT";
/// The new process took everything over.
pub const COMMIT: u8 = b'C';
/// The old process let go.
pub const RELEASED: u8 = b'R';
/// Fds per SCM_RIGHTS message (the kernel's limit is 253).
pub const FDS_PER_MESSAGE: usize = 250;
/// Longest the JSON may be (a region's state is far smaller; a guard against garbage).
const MAX_JSON: u64 = 1 << 30;
/// Most fds one handoff may carry.
const MAX_FDS: u32 = 1 << 20;
/// How long either side waits for the other at each step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The handoff socket of a region whose control socket is `control`.
pub fn handoff_path(control: &Path) -> PathBuf {
    let mut s = control.as_os_str().to_owned();
    s.push(".handoff");
    PathBuf::from(s)
}

/// Why a handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// No running vshmd answers on the handoff socket.
    #[error("cannot reach the running vshmd at {path}: {source}")]
    Connect {
        /// The handoff socket.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("the handoff connection failed while {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The other side does not speak this exchange.
    #[error("the other side sent {got:?} where {want:?} belongs (another vshmd version?)")]
    Protocol {
        /// What was expected.
        want: String,
        /// What came.
        got: String,
    },
    /// The running vshmd refused to hand over.
    #[error("the running vshmd refused: {0}")]
    Refused(String),
    /// The state names an fd that was not sent, or one twice as a sole owner.
    #[error("the state names fd #{0}, which was not sent or was already taken")]
    MissingFd(u32),
    /// The state did not parse.
    #[error("the handed-over state does not parse: {0}")]
    Json(#[from] serde_json::Error),
    /// The old process did not confirm it let go.
    #[error("the running vshmd did not confirm it let go ({0}); not serving")]
    NotReleased(String),
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> HandoffError {
    move |source| HandoffError::Io { step, source }
}

/// The fds to send, each once, numbered in sending order, each with a name that stays the
/// same for the same file as long as it lives (the systemd fd store keeps fds by name across
/// a crash: `crate::fdstore`; a handoff ignores the names).
#[derive(Debug, Default)]
pub struct FdTable {
    fds: Vec<RawFd>,
    names: Vec<String>,
    index: HashMap<RawFd, u32>,
}

impl FdTable {
    /// The index of `fd` in the table (added under `name()` if new; an fd added twice keeps
    /// its first name). The fd must stay open until sent.
    pub fn add(&mut self, fd: &impl AsRawFd, name: impl FnOnce() -> String) -> u32 {
        let raw = fd.as_raw_fd();
        if let Some(&i) = self.index.get(&raw) {
            return i;
        }
        let i = u32::try_from(self.fds.len()).unwrap_or(u32::MAX);
        self.fds.push(raw);
        self.names.push(name());
        self.index.insert(raw, i);
        i
    }

    /// Number of fds.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// No fds.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The fds with their names, in index order.
    pub fn named(&self) -> impl Iterator<Item = (RawFd, &str)> + '_ {
        self.fds
            .iter()
            .copied()
            .zip(self.names.iter().map(String::as_str))
    }

    /// The names in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// An fd attached to a queued ivshmem message (as `server.rs` keeps them).
pub type Shared = Arc<dyn AsRawFd + Send + Sync>;

/// The fds received, by index: taken once by their sole owner, or shared.
#[derive(Debug, Default)]
pub struct Received {
    fds: Vec<Option<OwnedFd>>,
    eventfds: HashMap<u32, Arc<EventFd>>,
    shared: HashMap<u32, Arc<OwnedFd>>,
    /// Recovered from systemd's fd store rather than handed over: a client connection that
    /// is missing was closed by its client (systemd drops a stored socket that hangs up).
    closed_streams: bool,
}

impl Received {
    /// Fds found elsewhere (systemd's fd store, `crate::fdstore`), by index; `None` where
    /// a named fd was not found. A missing client connection is then taken for one its
    /// client closed ([`Received::stream`]).
    pub fn recovered(fds: Vec<Option<OwnedFd>>) -> Received {
        Received {
            fds,
            closed_streams: true,
            ..Received::default()
        }
    }

    /// Fd `i` as a client's connection. When recovering from the fd store, a connection
    /// that is not there was hung up by its client: it comes back as a socket whose other
    /// end is closed, so the first read sees the departure and reclaims it as usual.
    pub fn stream(&mut self, i: u32) -> Result<UnixStream, HandoffError> {
        match self.take(i) {
            Ok(fd) => Ok(UnixStream::from(fd)),
            Err(e) if !self.closed_streams => Err(e),
            Err(_) => closed_stream(),
        }
    }

    /// Recovered from systemd's fd store (not handed over): a client whose fds are not all
    /// there is cut off rather than failing the whole recovery.
    pub fn is_recovered(&self) -> bool {
        self.closed_streams
    }

    /// Fd `i`, for its one owner.
    pub fn take(&mut self, i: u32) -> Result<OwnedFd, HandoffError> {
        self.fds
            .get_mut(i as usize)
            .and_then(Option::take)
            .ok_or(HandoffError::MissingFd(i))
    }

    /// Fd `i` as an eventfd, shared by everyone who names it.
    pub fn eventfd(&mut self, i: u32) -> Result<Arc<EventFd>, HandoffError> {
        if let Some(e) = self.eventfds.get(&i) {
            return Ok(e.clone());
        }
        let fd = self.take(i)?;
        // SAFETY: `fd` is an open fd we own (received over SCM_RIGHTS, taken once); the
        // EventFd takes that ownership over. It was an eventfd in the sending process.
        let e = Arc::new(unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) });
        self.eventfds.insert(i, e.clone());
        Ok(e)
    }

    /// Fd `i` as attached to a queued message: the eventfd if it is one already taken as
    /// such, else a shared plain fd.
    pub fn attached(&mut self, i: u32) -> Result<Shared, HandoffError> {
        if let Some(e) = self.eventfds.get(&i) {
            return Ok(e.clone());
        }
        if let Some(f) = self.shared.get(&i) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.take(i)?);
        self.shared.insert(i, f.clone());
        Ok(f)
    }

    /// How many fds arrived.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// None arrived.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// A connected socket whose other end is closed: a client that stands for one that is gone
/// reads the end of stream at once and is reclaimed as any departure.
pub fn closed_stream() -> Result<UnixStream, HandoffError> {
    let (ours, theirs) = UnixStream::pair().map_err(io_err("making a closed socket"))?;
    drop(theirs);
    ours.set_nonblocking(true)
        .map_err(io_err("making a closed socket"))?;
    Ok(ours)
}

/// Sets the timeouts both sides use on the handoff connection.
pub fn set_timeouts(stream: &UnixStream, timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// New process: connects to the running vshmd's handoff socket and says hello.
pub fn connect(path: &Path) -> Result<UnixStream, HandoffError> {
    let stream = UnixStream::connect(path).map_err(|source| HandoffError::Connect {
        path: path.to_owned(),
        source,
    })?;
    set_timeouts(&stream, STEP_TIMEOUT).map_err(io_err("setting timeouts"))?;
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    (&stream)
        .write_all(&hello)
        .map_err(io_err("saying hello"))?;
    Ok(stream)
}

/// Old process: reads the new one's hello.
pub fn read_hello(stream: &UnixStream) -> Result<(), HandoffError> {
    let mut b = [0u8; 12];
    (&*stream)
        .read_exact(&mut b)
        .map_err(io_err("reading the hello"))?;
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if &b[..8] != HELLO || version != VERSION {
        return Err(HandoffError::Protocol {
            want: format!("{} version {VERSION}", String::from_utf8_lossy(HELLO)),
            got: format!("{} version {version}", String::from_utf8_lossy(&b[..8])),
        });
    }
    Ok(())
}

/// Sends `json` with the fds of `table` (old process, step 2).
pub fn send_state(stream: &UnixStream, json: &[u8], table: &FdTable) -> Result<(), HandoffError> {
    let mut header = OFFER.to_vec();
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let count = u32::try_from(table.fds.len()).unwrap_or(u32::MAX);
    header.extend_from_slice(&count.to_le_bytes());
    (&*stream)
        .write_all(&header)
        .map_err(io_err("sending the header"))?;
    for chunk in table.fds.chunks(FDS_PER_MESSAGE) {
        // One byte carries each chunk; the receiver reads exactly one byte per chunk, and a
        // stream socket never merges data across an SCM_RIGHTS boundary.
        let sent = stream
            .send_with_fds(&[[b'F'].as_ref()], chunk)
            .map_err(|e| io_err("sending file descriptors")(io::Error::from(e)))?;
        if sent != 1 {
            return Err(io_err("sending file descriptors")(io::Error::from(
                io::ErrorKind::WriteZero,
            )));
        }
    }
    (&*stream)
        .write_all(json)
        .map_err(io_err("sending the state"))
}

/// Receives the state and its fds (new process, step 2).
pub fn recv_state(stream: &UnixStream) -> Result<(Vec<u8>, Received), HandoffError> {
    let mut header = [0u8; 20];
    (&*stream)
        .read_exact(&mut header)
        .map_err(io_err("reading the header"))?;
    if &header[..8] != OFFER {
        return Err(HandoffError::Protocol {
            want: String::from_utf8_lossy(OFFER).into_owned(),
            got: String::from_utf8_lossy(&header[..8]).into_owned(),
        });
    }
    let json_len = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    let count = u32::from_le_bytes(header[16..20].try_into().unwrap_or([0; 4]));
    if json_len > MAX_JSON || count > MAX_FDS {
        return Err(HandoffError::Protocol {
            want: format!("at most {MAX_JSON} bytes and {MAX_FDS} fds"),
            got: format!("{json_len} bytes and {count} fds"),
        });
    }
    let mut received = Received::default();
    while received.fds.len() < count as usize {
        let want = (count as usize - received.fds.len()).min(FDS_PER_MESSAGE);
        let mut raw = vec![-1; want];
        let mut byte = [0u8; 1];
        let mut iov = [libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: byte.len(),
        }];
        // SAFETY: the iovec points at `byte`, a live local buffer of its stated length, and
        // `raw` has room for `want` fds; recv_with_fds writes only there.
        let (n, got) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io_err("receiving file descriptors")(io::Error::from(e)))?;
        for &fd in &raw[..got] {
            // SAFETY: the kernel just installed this fd for us; nobody else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Not inherited by anything this process might start.
            // SAFETY: fcntl on an fd we own, integer arguments.
            unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            received.fds.push(Some(owned));
        }
        if n != 1 || got == 0 {
            return Err(HandoffError::Protocol {
                want: format!("{count} file descriptors"),
                got: format!("{} and then {n} byte(s) with {got}", received.fds.len()),
            });
        }
    }
    let len = usize::try_from(json_len).map_err(|_| HandoffError::Protocol {
        want: "a state that fits in memory".into(),
        got: format!("{json_len} bytes"),
    })?;
    let mut json = vec![0u8; len];
    (&*stream)
        .read_exact(&mut json)
        .map_err(io_err("reading the state"))?;
    Ok((json, received))
}

/// New process, step 3 and 4: commits and waits for the old one to let go.
pub fn commit(stream: &UnixStream) -> Result<(), HandoffError> {
    (&*stream)
        .write_all(&[COMMIT])
        .map_err(|e| HandoffError::NotReleased(format!("cannot commit: {e}")))?;
    let mut b = [0u8; 1];
    match (&*stream).read(&mut b) {
        Ok(1) if b[0] == RELEASED => Ok(()),
        Ok(0) => Err(HandoffError::NotReleased("it closed the connection".into())),
        Ok(_) => Err(HandoffError::NotReleased(format!("it answered {:?}", b[0]))),
        Err(e) => Err(HandoffError::NotReleased(e.to_string())),
    }
}

/// Old process, step 3: whether the new process committed (anything else: it did not).
pub fn await_commit(stream: &UnixStream) -> Result<(), HandoffError> {
    let mut b = [0u8; 1];
    match (&*stream).read(&mut b) {
        Ok(1) if b[0] == COMMIT => Ok(()),
        Ok(0) => Err(HandoffError::Io {
            step: "waiting for the commit",
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        }),
        Ok(_) => Err(HandoffError::Protocol {
            want: "commit".into(),
            got: format!("{:?}", b[0]),
        }),
        Err(source) => Err(HandoffError::Io {
            step: "waiting for the commit",
            source,
        }),
    }
}

/// Old process, step 4.
pub fn release(stream: &UnixStream) -> Result<(), HandoffError> {
    (&*stream)
        .write_all(&[RELEASED])
        .map_err(io_err("confirming the release"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_fds_than_one_message_carries_arrive_in_order_and_shared_ones_stay_shared() {
        let (a, b) = UnixStream::pair().expect("pair");
        set_timeouts(&a, STEP_TIMEOUT).expect("timeouts");
        set_timeouts(&b, STEP_TIMEOUT).expect("timeouts");
        let efds: Vec<EventFd> = (0..600)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let mut table = FdTable::default();
        for (i, e) in efds.iter().enumerate() {
            table.add(e, || format!("e{i}"));
        }
        assert_eq!(
            table.add(&efds[3], || "again".into()),
            3,
            "an fd is sent once"
        );
        assert_eq!(table.names()[3], "e3", "under its first name");
        let sender = std::thread::spawn(move || {
            send_state(&a, b"{\"x\":1}", &table).expect("send");
            drop(efds);
        });
        let (json, mut got) = recv_state(&b).expect("recv");
        sender.join().expect("sender");
        assert_eq!(json, b"{\"x\":1}");
        assert_eq!(got.len(), 600);
        // The 500th fd is the 500th eventfd: a write on it is read back there.
        let e = got.eventfd(499).expect("eventfd");
        e.write(7).expect("write");
        assert_eq!(got.eventfd(499).expect("shared").read().expect("read"), 7);
        let attached = got.attached(499).expect("attached");
        assert_eq!(attached.as_raw_fd(), e.as_raw_fd(), "the same fd");
        assert!(matches!(got.take(499), Err(HandoffError::MissingFd(499))));
        assert!(matches!(got.take(600), Err(HandoffError::MissingFd(600))));
    }
}
