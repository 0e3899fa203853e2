//! The control socket: one JSON request line in, one JSON response line out.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"metrics"}`, `{"cmd":"dump"}`,
//! `{"cmd":"delete","name":"N"}`, `{"cmd":"disconnect","peer":ID}`, `{"cmd":"watch"}`.
//! Responses: `{"ok":true,"result":...}` or `{"ok":false,"error":"...","status":"STATUS_..."}`;
//! `watch` answers `{"ok":true}` and then streams one event object per line until the
//! client goes away. The socket is created mode 0600 (`vshmd --control-mode` widens it);
//! `delete`, `disconnect` and `dump` also require vshmd's own user or root.
//!
//! This crate is the contract between vshmd (the server side lives in vshmd's event loop)
//! and its clients (vshmctl, tests): the request and response types, the client calls, and
//! the documents both sides print ([`superblock`]). It knows nothing of either side.
#![warn(missing_docs)]

pub mod superblock;

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// The status document.
    Status,
    /// Prometheus text exposition (the result is a string).
    Metrics,
    /// Header and authoritative state, for bug reports (admin).
    Dump,
    /// Delete a section by name as the host (admin).
    Delete {
        /// Section name.
        name: String,
    },
    /// Drop a peer's connection and reclaim what it held (admin).
    Disconnect {
        /// Peer id.
        peer: u16,
    },
    /// Stream events.
    Watch,
}

impl ControlRequest {
    /// A short name for logs and events (never the arguments: they come from the client).
    pub fn name(&self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Metrics => "metrics",
            ControlRequest::Dump => "dump",
            ControlRequest::Delete { .. } => "delete",
            ControlRequest::Disconnect { .. } => "disconnect",
            ControlRequest::Watch => "watch",
        }
    }

    /// Whether only vshmd's own user (or root) may send it.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            ControlRequest::Dump
                | ControlRequest::Delete { .. }
                | ControlRequest::Disconnect { .. }
        )
    }
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result document (status) or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// NTSTATUS name, when the failure is a namespace status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl ControlResponse {
    /// Success with a result.
    pub fn ok(result: serde_json::Value) -> Self {
        ControlResponse {
            ok: true,
            result: Some(result),
            error: None,
            status: None,
        }
    }
    /// Failure.
    pub fn err(error: impl Into<String>, status: Option<&str>) -> Self {
        ControlResponse {
            ok: false,
            result: None,
            error: Some(error.into()),
            status: status.map(str::to_owned),
        }
    }
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No vshmd there.
    #[error("cannot reach vshmd's control socket {path}: {source}")]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// I/O failed mid-request.
    #[error("control socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The answer was not a response.
    #[error("vshmd sent an unreadable response: {0}")]
    Decode(#[from] serde_json::Error),
    /// vshmd refused the request.
    #[error("{error}{}", status.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Refused {
        /// Its message.
        error: String,
        /// NTSTATUS name.
        status: Option<String>,
    },
}

/// Connects, sends `req` and reads the first response line.
fn exchange(
    path: &Path,
    req: &ControlRequest,
) -> Result<(BufReader<UnixStream>, ControlResponse), ControlError> {
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    let resp: ControlResponse = serde_json::from_str(&answer)?;
    if !resp.ok {
        return Err(ControlError::Refused {
            error: resp.error.unwrap_or_else(|| "request refused".into()),
            status: resp.status,
        });
    }
    Ok((reader, resp))
}

/// Sends one request and returns the result document.
pub fn request(path: &Path, req: &ControlRequest) -> Result<serde_json::Value, ControlError> {
    let (_, resp) = exchange(path, req)?;
    Ok(resp.result.unwrap_or(serde_json::Value::Null))
}

/// Subscribes to vshmd's events and calls `on_event` for each until it returns false or
/// vshmd closes the stream.
pub fn watch(
    path: &Path,
    mut on_event: impl FnMut(serde_json::Value) -> bool,
) -> Result<(), ControlError> {
    let (mut reader, _) = exchange(path, &ControlRequest::Watch)?;
    // Events come when they come: no read timeout on the stream.
    reader.get_ref().set_read_timeout(None)?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !on_event(serde_json::from_str(line.trim())?) {
            return Ok(());
        }
    }
}
