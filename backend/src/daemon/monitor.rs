//! The daemon's monitor-facing half: the control socket (status, metrics, dump, admin),
//! event watchers, and the Prometheus endpoint. Runs in the event-loop thread between
//! requests; nothing here holds a lock the request path takes.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use event_manager::EventOps;

use super::Daemon;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::telemetry::Event;

/// Events kept for late watchers and dumps.
const RING: usize = 1024;

/// Watchers and the recent-event ring.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    streams: Vec<UnixStream>,
    ring: VecDeque<Event>,
}

impl Watchers {
    /// Adds a subscriber (already answered `{"ok":true}`).
    fn add(&mut self, stream: UnixStream) {
        if stream.set_nonblocking(true).is_ok() {
            self.streams.push(stream);
        }
    }

    /// Records events and sends them to every watcher; a watcher that cannot take a line
    /// right away is dropped (it would otherwise stall vshmd).
    pub(super) fn publish(&mut self, events: impl Iterator<Item = Event>) {
        for e in events {
            if !self.streams.is_empty() {
                if let Ok(mut line) = serde_json::to_string(&e) {
                    line.push('\n');
                    self.streams.retain(|mut s| match s.write(line.as_bytes()) {
                        Ok(n) if n == line.len() => true,
                        _ => {
                            tracing::info!("dropping an event watcher that fell behind or left");
                            false
                        }
                    });
                }
            }
            if self.ring.len() == RING {
                self.ring.pop_front();
            }
            self.ring.push_back(e);
        }
    }

    /// The most recent events, oldest first.
    pub(super) fn recent(&self) -> impl Iterator<Item = &Event> {
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

impl Daemon {
    /// Serves one control connection.
    pub(super) fn control_request(&mut self, ops: &mut EventOps) {
        let Ok((stream, _)) = self.control.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let request = match control::read_request(&stream) {
            Ok(r) => r,
            Err(e) => {
                let _ = control::write_response(&stream, &ControlResponse::err(e, None));
                return;
            }
        };
        if request.is_admin() {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            let caller = crate::server::peer_credentials(&stream).map(|c| c.uid);
            if caller != Some(me) && caller != Some(0) {
                self.arbiter
                    .count_denial(&format!("{} from uid {caller:?}", request.name()));
                let resp = ControlResponse::err(
                    format!(
                        "{} needs vshmd's own user or root (caller uid {caller:?})",
                        request.name()
                    ),
                    Some(vshm_format::Status::AccessDenied.name()),
                );
                let _ = control::write_response(&stream, &resp);
                return;
            }
        }
        let resp = match request {
            ControlRequest::Status => ControlResponse::ok(self.status_json()),
            ControlRequest::Metrics => ControlResponse::ok(self.metrics_text().into()),
            ControlRequest::Dump => {
                let mut dump = self.arbiter.dump();
                dump["recent_events"] =
                    serde_json::to_value(self.watchers.recent().collect::<Vec<_>>())
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
                if self.server.client(peer).is_some() {
                    self.drop_client(peer, ops);
                    ControlResponse::ok(serde_json::json!({ "disconnected": peer }))
                } else {
                    let s = vshm_format::Status::InvalidHandle;
                    ControlResponse::err(format!("no connected peer {peer}"), Some(s.name()))
                }
            }
            ControlRequest::Watch => {
                if control::write_response(&stream, &ControlResponse::ok(serde_json::Value::Null))
                    .is_ok()
                {
                    self.watchers.add(stream);
                }
                return;
            }
        };
        if let Err(e) = control::write_response(&stream, &resp) {
            tracing::debug!("control client went away: {e}");
        }
    }

    /// The Prometheus text.
    pub(super) fn metrics_text(&self) -> String {
        crate::metrics::render(&self.arbiter.status(), self.arbiter.request_stats())
    }

    /// Serves one HTTP request on the metrics listener (GET /metrics), bounded to 1 s.
    pub(super) fn metrics_request(&mut self, listener: &TcpListener) {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4096];
        let mut got = 0;
        while got < buf.len() {
            match stream.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..got]);
        let path = head.split_whitespace().nth(1).unwrap_or("");
        let (code, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
            ("200 OK", self.metrics_text())
        } else {
            (
                "404 Not Found",
                "only GET /metrics is served here\n".to_string(),
            )
        };
        let reply = format!(
            "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes());
    }
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
