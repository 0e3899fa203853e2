//! The error every namespace operation returns, and how each maps to an NTSTATUS.

use vshm_format::layout::LayoutError;
use vshm_format::mailbox::Refusal;
use vshm_format::object::EntryError;
use vshm_format::ring::RingError;
use vshm_format::shm::Fault;
use vshm_format::{NameError, ObjectSlot, Status};

use crate::TransportError;

/// A failed namespace operation. Small and `Copy` so the no_std core can return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The namespace said no, with an NTSTATUS (e.g. [`Status::ObjectNameNotFound`]).
    Status(Status),
    /// The backend said no because a limit was hit, and said which (FORMAT.md §9): the
    /// status is [`Status::InsufficientResources`]. Match on [`Error::status`] to treat it
    /// like [`Error::Status`].
    Refused {
        /// The NTSTATUS of the answer.
        status: Status,
        /// Which limit (object table, heap extent, …), with its numbers.
        reason: Refusal,
    },
    /// The transport failed.
    Transport(TransportError),
    /// The region's header does not validate.
    Region(LayoutError),
    /// The backend did not answer a request within the reply timeout (ms).
    Timeout(u64),
    /// A section's block allocator lock stayed taken by another live taker for the whole
    /// lock timeout.
    LockTimeout {
        /// How long this process waited (ms).
        ms: u64,
        /// The lock word last seen (the taker's slot + 1, incarnation and token; FORMAT.md).
        owner: u64,
    },
    /// The backend answered with something that does not validate (raw status, slot).
    BadResponse(u32, ObjectSlot),
    /// Kept losing races with other peers on this operation.
    Contended,
    /// This peer was disconnected by the backend (its slot is reclaimed or reused); its
    /// handles are gone and it must not touch the region's tables any more.
    Detached,
    /// Another process of this peer holds the request mailbox (its token) and is alive.
    MailboxBusy(u32),
    /// An access to the region failed its bounds or alignment check (a table or handle
    /// pointing outside the mapping): the offset and length asked for.
    Fault(Fault),
    /// An object entry failed validation: which field, with the values found (offset,
    /// sizes, slot state, name rule). Never [`EntryError::Busy`], which is
    /// [`Error::Contended`].
    Entry(EntryError),
    /// The object this handle held was destroyed behind this process's back (someone
    /// cleared its hold, docs/FORMAT.md §11a): its memory is fenced off from this process
    /// and the handle is dead; close it. STATUS_INVALID_HANDLE.
    Revoked {
        /// The object's slot.
        slot: ObjectSlot,
        /// The object's generation.
        generation: vshm_format::Generation,
    },
    /// A byte ring inside a section refused (a bad argument) or found its shared state
    /// impossible ([`RingError::Corrupt`], with the values read).
    Ring(RingError),
}

impl Error {
    /// The NTSTATUS closest to this error, for C callers and the CLI.
    pub fn status(&self) -> Status {
        match *self {
            Error::Status(s) | Error::Refused { status: s, .. } => s,
            Error::Transport(_) | Error::Timeout(_) | Error::LockTimeout { .. } => {
                Status::InsufficientResources
            }
            Error::Region(_) | Error::BadResponse(..) => Status::InvalidHandle,
            Error::Contended => Status::ObjectNameNotFound,
            Error::Detached | Error::Revoked { .. } => Status::InvalidHandle,
            Error::MailboxBusy(_) => Status::InsufficientResources,
            Error::Fault(_) | Error::Entry(_) => Status::InvalidHandle,
            Error::Ring(e) => e.status(),
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

impl From<EntryError> for Error {
    fn from(e: EntryError) -> Self {
        match e {
            // The host kept an entry busy: the caller may look again.
            EntryError::Busy => Error::Contended,
            EntryError::Fault(f) => Error::Fault(f),
            _ => Error::Entry(e),
        }
    }
}

impl From<RingError> for Error {
    fn from(e: RingError) -> Self {
        match e {
            RingError::Fault(f) => Error::Fault(f),
            e => Error::Ring(e),
        }
    }
}

impl From<Fault> for Error {
    fn from(f: Fault) -> Self {
        Error::Fault(f)
    }
}

/// An invalid name is [`Status::ObjectNameInvalid`], exactly as the host answers it: the
/// caller passed the name and has it to show, and code matching on
/// `Error::Status(Status::ObjectNameInvalid)` keeps working. [`vshm_format::validate_name`]
/// gives the rule that was broken when that is wanted.
impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::Status(e.status())
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Status(s) => write!(f, "{s}"),
            Error::Refused { status, reason } => write!(f, "{status}: {reason}"),
            Error::Transport(e) => write!(f, "{e}"),
            Error::Region(e) => write!(f, "invalid vshm region: {e}"),
            Error::Timeout(ms) => write!(f, "the vshm backend did not answer within {ms} ms"),
            Error::LockTimeout { ms, owner } => write!(
                f,
                "a section's block allocator stayed locked by another taker (lock word {owner:#x}) for {ms} ms"
            ),
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
            // The status first, as for every error that used to print only it; then what
            // actually happened, for bug reports.
            Error::Fault(x) => write!(f, "{}: {x}", self.status()),
            Error::Entry(e) => write!(f, "{}: invalid object entry: {e}", self.status()),
            Error::Revoked { slot, generation } => write!(
                f,
                "{}: the object this handle held (slot {slot}, generation {generation}) was \
                 destroyed behind this process's back",
                self.status()
            ),
            Error::Ring(e) => write!(f, "{}: {e}", self.status()),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use vshm_format::object::RangeProblem;

    #[test]
    fn a_fault_keeps_its_offset_and_length_and_still_reports_invalid_handle() {
        let e = Error::from(Fault::OutOfBounds {
            offset: 0x2000,
            len: 8,
        });
        assert_eq!(
            e,
            Error::Fault(Fault::OutOfBounds {
                offset: 0x2000,
                len: 8
            })
        );
        assert_eq!(e.status(), Status::InvalidHandle);
        assert_eq!(
            e.to_string(),
            "STATUS_INVALID_HANDLE (0xC0000008): access of 8 bytes at 0x2000 is outside the region"
        );
    }

    #[test]
    fn an_invalid_entry_keeps_its_values_and_still_reports_invalid_handle() {
        let bad = EntryError::BadRange {
            offset: 0x1000,
            size: 10,
            max_size: 4096,
            problem: RangeProblem::BeforeHeap {
                heap_offset: 0x8000,
            },
        };
        let e = Error::from(bad);
        assert_eq!(e, Error::Entry(bad));
        assert_eq!(e.status(), Status::InvalidHandle);
        assert_eq!(
            e.to_string(),
            "STATUS_INVALID_HANDLE (0xC0000008): invalid object entry: range [0x1000, 0x2000) \
             starts before the heap at 0x8000"
        );
        let f = Fault::Misaligned { offset: 4 };
        assert_eq!(Error::from(EntryError::Fault(f)), Error::Fault(f));
        assert_eq!(Error::from(EntryError::Busy), Error::Contended);
    }

    #[test]
    fn a_refusal_keeps_its_status_and_says_which_limit() {
        let e = Error::Refused {
            status: Status::InsufficientResources,
            reason: Refusal::ObjectTableFull { max_objects: 1024 },
        };
        assert_eq!(e.status(), Status::InsufficientResources);
        assert_eq!(
            e.to_string(),
            "STATUS_INSUFFICIENT_RESOURCES (0xC000009A): the object table is full (1024 objects)"
        );
        let e = Error::Refused {
            status: Status::InsufficientResources,
            reason: Refusal::NoFreeExtent {
                wanted: 16 << 20,
                largest: 4 << 20,
            },
        };
        assert_eq!(
            e.to_string(),
            "STATUS_INSUFFICIENT_RESOURCES (0xC000009A): no free heap extent of 16.0 MiB \
             (largest 4.0 MiB)"
        );
    }

    #[test]
    fn an_invalid_name_is_still_the_object_name_invalid_status() {
        let e = Error::from(NameError::Backslash { at: 1 });
        assert_eq!(e, Error::Status(Status::ObjectNameInvalid));
        assert_eq!(e.to_string(), "STATUS_OBJECT_NAME_INVALID (0xC0000033)");
    }
}
