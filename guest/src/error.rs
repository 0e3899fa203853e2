//! The error every namespace operation returns.

use vshm_format::layout::LayoutError;
use vshm_format::Status;

use crate::TransportError;

/// A failed namespace operation. Small and `Copy` so the no_std core can return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The namespace said no, with an NTSTATUS (e.g. [`Status::ObjectNameNotFound`]).
    Status(Status),
    /// The transport failed.
    Transport(TransportError),
    /// The region's header does not validate.
    Region(LayoutError),
    /// The backend did not answer a request within the reply timeout (ms).
    Timeout(u64),
    /// The backend answered with something that does not validate (raw status, slot).
    BadResponse(u32, u32),
    /// Kept losing races with other peers on this operation.
    Contended,
    /// This peer was disconnected by the backend (its slot is reclaimed or reused); its
    /// handles are gone and it must not touch the region's tables any more.
    Detached,
    /// Another process of this peer holds the request mailbox (its token) and is alive.
    MailboxBusy(u32),
}

impl Error {
    /// The NTSTATUS closest to this error, for C callers and the CLI.
    pub fn status(&self) -> Status {
        match *self {
            Error::Status(s) => s,
            Error::Transport(_) | Error::Timeout(_) => Status::InsufficientResources,
            Error::Region(_) | Error::BadResponse(..) => Status::InvalidHandle,
            Error::Contended => Status::ObjectNameNotFound,
            Error::Detached => Status::InvalidHandle,
            Error::MailboxBusy(_) => Status::InsufficientResources,
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Status(s)
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        Error::Transport(e)
    }
}

impl From<vshm_format::object::EntryError> for Error {
    fn from(e: vshm_format::object::EntryError) -> Self {
        match e {
            // The host kept an entry busy: the caller may look again.
            vshm_format::object::EntryError::Busy => Error::Contended,
            _ => Error::Status(Status::InvalidHandle),
        }
    }
}

impl From<vshm_format::shm::Fault> for Error {
    fn from(_: vshm_format::shm::Fault) -> Self {
        Error::Status(Status::InvalidHandle)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Status(s) => write!(f, "{s}"),
            Error::Transport(e) => write!(f, "{e}"),
            Error::Region(e) => write!(f, "invalid vshm region: {e}"),
            Error::Timeout(ms) => write!(f, "the vshm backend did not answer within {ms} ms"),
            Error::BadResponse(st, slot) => {
                write!(
                    f,
                    "the backend sent an invalid response (status {st:#x}, slot {slot})"
                )
            }
            Error::Contended => write!(f, "gave up after repeated races with other peers"),
            Error::Detached => write!(f, "this peer was disconnected by the vshm backend"),
            Error::MailboxBusy(owner) => write!(
                f,
                "another process of this peer (token {owner}) holds the request mailbox"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
