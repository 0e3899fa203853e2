//! The daemon's monitor-facing half: control-socket requests (status, metrics, dump, admin),
//! event watchers, and the Prometheus endpoint. Every connection is non-blocking and served
//! from the event loop as its bytes arrive, with a deadline, a size cap and a cap on how
//! many are open: a slow or hostile client can never stall the request path, and nothing
//! here holds a lock the request path takes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use super::{Daemon, TOKEN_CONN};
use crate::telemetry::Event;
use vshm_control::{ControlRequest, ControlResponse};
use vshm_format::PeerId;

/// Events kept for late watchers and dumps.
const RING: usize = 1024;
/// Event watchers at once; a further `watch` is refused (the connection still got a slot).
pub(super) const MAX_WATCHERS: usize = 16;
/// One-shot connections (status, metrics, dump, admin, and any connection that has not
/// said what it wants yet) at once. When all are taken, a new connection takes the slot
/// of the oldest one (the soonest to time out anyway): a status or admin request always
/// gets served, however many idle connections are open.
pub(super) const MAX_ONESHOTS: usize = 32;
/// Monitor connections open at once.
pub(super) const MAX_CONNS: usize = MAX_WATCHERS + MAX_ONESHOTS;
/// Time a client has to send its request and take the answer.
const DEADLINE: Duration = Duration::from_secs(2);
/// Largest control request line.
const CONTROL_MAX: usize = 64 * 1024;
/// Largest HTTP request head.
const HTTP_MAX: usize = 8 * 1024;
/// Most unsent bytes a watcher may fall behind by before it is dropped.
const WATCHER_BACKLOG: usize = 1 << 20;

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The control socket.
    Control,
    /// The metrics HTTP endpoint.
    Metrics,
}

#[derive(Debug)]
struct Conn {
    stream: Stream,
    kind: Kind,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    /// None for a watcher, which stays as long as it keeps up.
    deadline: Option<Instant>,
    watcher: bool,
    /// A one-shot request was answered: close once the answer is out.
    answered: bool,
    /// Watching for writability (output pending).
    want_out: bool,
}

/// Monitor connections and the recent-event ring.
#[derive(Debug, Default)]
pub(super) struct Monitor {
    conns: Vec<Option<Conn>>,
    ring: VecDeque<Event>,
    /// Listeners taken out of epoll after an accept error (out of fds), until the next tick.
    paused: Vec<Kind>,
}

impl Monitor {
    /// The most recent events, oldest first.
    fn recent(&self) -> impl Iterator<Item = &Event> {
        self.ring.iter()
    }
}

/// A readable label for a peer process: QEMU's `-name` (`-name guest=X,...` or `-name X`),
/// else the program name.
pub(super) fn process_label(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if let Some(i) = args.iter().position(|a| a == "-name") {
        if let Some(v) = args.get(i + 1) {
            let name = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("guest="))
                .unwrap_or_else(|| v.split(',').next().unwrap_or(v));
            return Some(name.to_owned());
        }
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim().to_owned())
}

/// [`process_label`], cut to 64 characters (it comes from another process's argv).
pub(super) fn short_label(pid: i32) -> Option<String> {
    process_label(pid).map(|l| l.chars().take(64).collect())
}

fn token(index: usize) -> u32 {
    TOKEN_CONN | u32::try_from(index).unwrap_or(0)
}

fn response_line(resp: &ControlResponse) -> Vec<u8> {
    let mut line = serde_json::to_vec(resp).unwrap_or_default();
    line.push(b'\n');
    line
}

fn http_response(code: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Daemon {
    /// Accepts a monitor connection and starts watching it (or refuses it when full).
    pub(super) fn accept_monitor(&mut self, kind: Kind, ops: &mut EventOps) {
        let stream = match kind {
            Kind::Control => self.control.accept().map(|(s, _)| Stream::Unix(s)),
            Kind::Metrics => match &self.metrics {
                Some(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                None => return,
            },
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // Out of fds, typically: stop taking connections until the next tick.
                tracing::warn!("accepting a monitor connection failed: {e}");
                self.pause_listener(kind, ops);
                return;
            }
        };
        let nonblocking = match &stream {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        };
        let oneshots = self.monitor.conns.iter().flatten().filter(|c| !c.watcher);
        if oneshots.count() >= MAX_ONESHOTS {
            let slots = self.monitor.conns.iter().enumerate().map(|(i, c)| {
                (
                    i,
                    c.as_ref()
                        .and_then(|c| (!c.watcher).then_some(c.deadline))
                        .flatten(),
                )
            });
            if let Some(oldest) = oldest_oneshot(slots) {
                tracing::info!(
                    "{MAX_ONESHOTS} monitor requests are open: closing the oldest for a new one"
                );
                self.close_conn(oldest, ops);
            }
        }
        let index = match self.monitor.conns.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.monitor.conns.len() < MAX_CONNS => {
                self.monitor.conns.push(None);
                self.monitor.conns.len() - 1
            }
            None => {
                tracing::debug!("refusing a monitor connection: {MAX_CONNS} are open");
                return;
            }
        };
        if nonblocking.is_err()
            || ops
                .add(Events::with_data_raw(
                    stream.fd(),
                    token(index),
                    EventSet::IN,
                ))
                .is_err()
        {
            return;
        }
        self.monitor.conns[index] = Some(Conn {
            stream,
            kind,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            deadline: Some(Instant::now() + DEADLINE),
            watcher: false,
            answered: false,
            want_out: false,
        });
    }

    fn close_conn(&mut self, index: usize, ops: &mut EventOps) {
        if let Some(c) = self.monitor.conns.get_mut(index).and_then(Option::take) {
            let _ = ops.remove(Events::empty_raw(c.stream.fd()));
        }
    }

    /// Readable or writable monitor connection.
    pub(super) fn conn_event(&mut self, index: usize, set: EventSet, ops: &mut EventOps) {
        let readable = set.contains(EventSet::IN) || set.contains(EventSet::HANG_UP);
        if readable && !self.conn_read(index, ops) {
            self.close_conn(index, ops);
            return;
        }
        self.conn_flush(index, ops);
    }

    /// Reads what is there; acts once a whole request is in. False = close it.
    fn conn_read(&mut self, index: usize, ops: &mut EventOps) -> bool {
        let Some(c) = self.monitor.conns.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if c.watcher || c.answered {
                        continue; // nothing more is expected from them
                    }
                    c.input.extend_from_slice(&buf[..n]);
                    let max = if c.kind == Kind::Control {
                        CONTROL_MAX
                    } else {
                        HTTP_MAX
                    };
                    if c.input.len() > max {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if c.watcher || c.answered {
            // A watcher that hung up is done; an answered one-shot finishes its write.
            return !(eof && c.watcher);
        }
        let kind = c.kind;
        let request = match kind {
            Kind::Control => c
                .input
                .iter()
                .position(|&b| b == b'\n')
                .map(|end| c.input[..end].to_vec()),
            Kind::Metrics => c
                .input
                .windows(4)
                .any(|w| w == b"\r\n\r\n")
                .then(|| c.input.clone()),
        };
        let caller = match &c.stream {
            Stream::Unix(s) => crate::server::peer_credentials(s).map(|cred| cred.uid),
            Stream::Tcp(_) => None,
        };
        let Some(request) = request else {
            // Incomplete: wait for more, unless the client has stopped sending.
            return !eof;
        };
        let reply = match kind {
            Kind::Control => match serde_json::from_slice::<ControlRequest>(&request) {
                Ok(req) => self.control_request(req, caller, index, ops),
                Err(e) => response_line(&ControlResponse::err(format!("bad request: {e}"), None)),
            },
            Kind::Metrics => {
                let head = String::from_utf8_lossy(&request);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    http_response("200 OK", &self.metrics_text())
                } else {
                    http_response("404 Not Found", "only GET /metrics is served here\n")
                }
            }
        };
        let Some(c) = self.monitor.conns.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        c.output = reply;
        c.sent = 0;
        c.answered = !c.watcher;
        true
    }

    /// Answers a parsed control request; returns the response line.
    fn control_request(
        &mut self,
        request: ControlRequest,
        caller: Option<u32>,
        index: usize,
        ops: &mut EventOps,
    ) -> Vec<u8> {
        if request.is_admin() {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if caller != Some(me) && caller != Some(0) {
                self.arbiter
                    .count_denial(&format!("{} from uid {caller:?}", request.name()));
                return response_line(&ControlResponse::err(
                    format!(
                        "{} needs vshmd's own user or root (caller uid {caller:?})",
                        request.name()
                    ),
                    Some(vshm_format::Status::AccessDenied.name()),
                ));
            }
        }
        let resp = match request {
            ControlRequest::Status => ControlResponse::ok(self.status_json()),
            ControlRequest::Metrics => ControlResponse::ok(self.metrics_text().into()),
            ControlRequest::Dump => {
                let mut dump = self.arbiter.dump();
                dump["recent_events"] =
                    serde_json::to_value(self.monitor.recent().collect::<Vec<_>>())
                        .unwrap_or_default();
                dump["status"] = self.status_json();
                ControlResponse::ok(dump)
            }
            ControlRequest::Delete { name } => match self.arbiter.delete_by_name(&name) {
                Ok(()) => ControlResponse::ok(serde_json::json!({ "deleted": name })),
                Err(s) => {
                    ControlResponse::err(format!("cannot delete {name:?}: {s}"), Some(s.name()))
                }
            },
            ControlRequest::Disconnect { peer } => {
                // The control protocol carries the bare id.
                let id = PeerId(peer);
                if self.server.client(id).is_some() {
                    self.drop_client(id, true, ops);
                    ControlResponse::ok(serde_json::json!({ "disconnected": peer }))
                } else {
                    let s = vshm_format::Status::InvalidHandle;
                    ControlResponse::err(format!("no connected peer {peer}"), Some(s.name()))
                }
            }
            ControlRequest::Watch => {
                let watchers = self.monitor.conns.iter().flatten().filter(|c| c.watcher);
                if watchers.count() >= MAX_WATCHERS {
                    // Answered like a one-shot: the connection closes after the error.
                    ControlResponse::err(
                        format!(
                            "watcher slots full: {MAX_WATCHERS} watchers are connected \
                             (status and admin requests are still served)"
                        ),
                        Some(vshm_format::Status::QuotaExceeded.name()),
                    )
                } else {
                    if let Some(c) = self.monitor.conns.get_mut(index).and_then(Option::as_mut) {
                        c.watcher = true;
                        c.deadline = None;
                    }
                    ControlResponse::ok(serde_json::Value::Null)
                }
            }
        };
        response_line(&resp)
    }

    /// Writes what it can; closes a finished one-shot connection; watches for writability
    /// while output is pending.
    fn conn_flush(&mut self, index: usize, ops: &mut EventOps) {
        let Some(c) = self.monitor.conns.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        while c.sent < c.output.len() {
            match c.stream.write(&c.output[c.sent..]) {
                Ok(0) => break,
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close_conn(index, ops);
                    return;
                }
            }
        }
        let pending = c.sent < c.output.len();
        if !pending {
            c.output.clear();
            c.sent = 0;
            if c.answered {
                self.close_conn(index, ops);
                return;
            }
        }
        if pending != c.want_out {
            c.want_out = pending;
            let set = if pending {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            let _ = ops.modify(Events::with_data_raw(c.stream.fd(), token(index), set));
        }
    }

    /// Drops connections past their deadline. Runs on the timer.
    pub(super) fn expire_conns(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        for i in 0..self.monitor.conns.len() {
            let late = self.monitor.conns[i]
                .as_ref()
                .and_then(|c| c.deadline)
                .is_some_and(|d| now > d);
            if late {
                self.close_conn(i, ops);
            }
        }
    }

    /// Moves the arbiter's new events into the ring and out to the watchers; a watcher
    /// that falls [`WATCHER_BACKLOG`] bytes behind is dropped.
    pub(super) fn publish_events(&mut self, ops: &mut EventOps) {
        let events: Vec<Event> = self.arbiter.drain_events().collect();
        if events.is_empty() {
            return;
        }
        let mut lines = Vec::new();
        if self.monitor.conns.iter().flatten().any(|c| c.watcher) {
            for e in &events {
                if let Ok(mut l) = serde_json::to_vec(e) {
                    l.push(b'\n');
                    lines.extend_from_slice(&l);
                }
            }
        }
        for e in events {
            if self.monitor.ring.len() == RING {
                self.monitor.ring.pop_front();
            }
            self.monitor.ring.push_back(e);
        }
        if lines.is_empty() {
            return;
        }
        for i in 0..self.monitor.conns.len() {
            let Some(c) = self.monitor.conns[i].as_mut() else {
                continue;
            };
            if !c.watcher {
                continue;
            }
            if c.output.len() - c.sent + lines.len() > WATCHER_BACKLOG {
                tracing::info!("dropping an event watcher that fell behind");
                self.close_conn(i, ops);
                continue;
            }
            c.output.extend_from_slice(&lines);
            self.conn_flush(i, ops);
        }
    }

    fn pause_listener(&mut self, kind: Kind, ops: &mut EventOps) {
        let fd = match kind {
            Kind::Control => self.control.as_raw_fd(),
            Kind::Metrics => match &self.metrics {
                Some(l) => l.as_raw_fd(),
                None => return,
            },
        };
        if !self.monitor.paused.contains(&kind) && ops.remove(Events::empty_raw(fd)).is_ok() {
            self.monitor.paused.push(kind);
        }
    }

    /// Puts paused listeners back. Runs on the timer.
    pub(super) fn resume_listeners(&mut self, ops: &mut EventOps) {
        for kind in std::mem::take(&mut self.monitor.paused) {
            let (fd, tok) = match kind {
                Kind::Control => (self.control.as_raw_fd(), super::TOKEN_CONTROL),
                Kind::Metrics => match &self.metrics {
                    Some(l) => (l.as_raw_fd(), super::TOKEN_METRICS),
                    None => continue,
                },
            };
            let _ = ops.add(Events::with_data_raw(fd, tok, EventSet::IN));
        }
    }

    /// The Prometheus text.
    pub(super) fn metrics_text(&self) -> String {
        crate::metrics::render(&self.arbiter.status(), self.arbiter.request_stats())
    }
}

/// Of monitor slots given as (index, deadline of a one-shot connection or None for a free
/// slot or a watcher), the one-shot connection that times out first.
fn oldest_oneshot(slots: impl Iterator<Item = (usize, Option<Instant>)>) -> Option<usize> {
    slots
        .filter_map(|(i, d)| d.map(|d| (d, i)))
        .min()
        .map(|(_, i)| i)
}

/// Checks that a metrics address is on loopback (metrics are for this host's collector).
pub fn loopback_only(addr: &std::net::SocketAddr) -> io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--metrics {addr}: serve metrics on loopback only (127.0.0.1 or [::1])"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_request_takes_the_slot_of_the_one_shot_that_times_out_first_never_a_watcher() {
        let t = Instant::now();
        let s = |secs| Some(t + Duration::from_secs(secs));
        // Slot 1 is a watcher (or free), 0 and 2 are one-shots; 2 is older.
        assert_eq!(
            oldest_oneshot([(0, s(5)), (1, None), (2, s(3))].into_iter()),
            Some(2)
        );
        assert_eq!(oldest_oneshot([(0, None), (1, None)].into_iter()), None);
    }
}
