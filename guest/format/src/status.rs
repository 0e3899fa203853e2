//! NTSTATUS codes, as the seeds (LSA CreateSharedMemory, RtkCreateSharedMemory) define them.
//!
//! The numeric values are the real NTSTATUS values so that driver writers from that world
//! recognise them on the wire, in logs and in the C ABI.

use core::fmt;

/// A status code carried in mailbox responses and returned by every namespace operation.
///
/// Success and informational codes (`severity < 2`) are not errors: [`Status::ObjectNameExists`]
/// is what create-or-open returns when it opened an existing section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// STATUS_SUCCESS.
    Success = 0x0000_0000,
    /// STATUS_ABANDONED (success): the mutex is now held by the caller, but its previous
    /// owner died holding it, so what it protects may be inconsistent (EOWNERDEAD).
    Abandoned = 0x0000_0080,
    /// STATUS_TIMEOUT (success code): a wait ended because its timeout passed.
    Timeout = 0x0000_0102,
    /// STATUS_PENDING (success code): a LOCK request was queued; the host hands the mutex
    /// over later.
    Pending = 0x0000_0103,
    /// STATUS_OBJECT_NAME_EXISTS (informational): create-or-open opened an existing object.
    ObjectNameExists = 0x4000_0000,
    /// STATUS_INVALID_HANDLE: not a live handle, or the name belongs to another kind of object.
    InvalidHandle = 0xC000_0008,
    /// STATUS_INVALID_PARAMETER: a size, offset or flag is out of range.
    InvalidParameter = 0xC000_000D,
    /// STATUS_NO_MEMORY: a block does not fit in the section, even grown to its max size.
    NoMemory = 0xC000_0017,
    /// STATUS_ACCESS_DENIED.
    AccessDenied = 0xC000_0022,
    /// STATUS_OBJECT_NAME_INVALID: empty, longer than 260 characters, or contains `\` or NUL.
    ObjectNameInvalid = 0xC000_0033,
    /// STATUS_OBJECT_NAME_NOT_FOUND.
    ObjectNameNotFound = 0xC000_0034,
    /// STATUS_QUOTA_EXCEEDED.
    QuotaExceeded = 0xC000_0044,
    /// STATUS_MUTANT_NOT_OWNED: unlock of a mutex the caller does not hold.
    MutantNotOwned = 0xC000_0046,
    /// STATUS_DELETE_PENDING: the object was deleted and lives only until its last handle closes.
    DeletePending = 0xC000_0056,
    /// STATUS_INSUFFICIENT_RESOURCES: the object table or the heap is full.
    InsufficientResources = 0xC000_009A,
    /// STATUS_NOT_SUPPORTED: a request this backend does not implement.
    NotSupported = 0xC000_00BB,
    /// STATUS_POSSIBLE_DEADLOCK: lock of a mutex the caller already holds (mutexes are not
    /// recursive).
    PossibleDeadlock = 0xC000_0194,
}

impl Status {
    /// All known codes, for lookups and tests.
    pub const ALL: [Status; 17] = [
        Status::Success,
        Status::Abandoned,
        Status::Timeout,
        Status::Pending,
        Status::ObjectNameExists,
        Status::InvalidHandle,
        Status::InvalidParameter,
        Status::NoMemory,
        Status::AccessDenied,
        Status::ObjectNameInvalid,
        Status::ObjectNameNotFound,
        Status::QuotaExceeded,
        Status::MutantNotOwned,
        Status::DeletePending,
        Status::InsufficientResources,
        Status::NotSupported,
        Status::PossibleDeadlock,
    ];

    /// The raw NTSTATUS value.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a raw value; `None` for a code this format does not define.
    pub fn from_code(code: u32) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| s.code() == code)
    }

    /// NT_SUCCESS(): success and informational codes.
    pub const fn is_success(self) -> bool {
        (self as u32) >> 30 < 2
    }

    /// The conventional name, as a driver writer would grep for it.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "STATUS_SUCCESS",
            Status::Abandoned => "STATUS_ABANDONED",
            Status::Timeout => "STATUS_TIMEOUT",
            Status::Pending => "STATUS_PENDING",
            Status::NoMemory => "STATUS_NO_MEMORY",
            Status::MutantNotOwned => "STATUS_MUTANT_NOT_OWNED",
            Status::PossibleDeadlock => "STATUS_POSSIBLE_DEADLOCK",
            Status::ObjectNameExists => "STATUS_OBJECT_NAME_EXISTS",
            Status::InvalidHandle => "STATUS_INVALID_HANDLE",
            Status::InvalidParameter => "STATUS_INVALID_PARAMETER",
            Status::AccessDenied => "STATUS_ACCESS_DENIED",
            Status::ObjectNameInvalid => "STATUS_OBJECT_NAME_INVALID",
            Status::ObjectNameNotFound => "STATUS_OBJECT_NAME_NOT_FOUND",
            Status::QuotaExceeded => "STATUS_QUOTA_EXCEEDED",
            Status::DeletePending => "STATUS_DELETE_PENDING",
            Status::InsufficientResources => "STATUS_INSUFFICIENT_RESOURCES",
            Status::NotSupported => "STATUS_NOT_SUPPORTED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:08X})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_the_real_ntstatus_values() {
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        assert_eq!(Status::ObjectNameNotFound.code(), 0xC000_0034);
        assert_eq!(Status::from_code(0xDEAD_BEEF), None);
    }

    #[test]
    fn only_success_and_informational_codes_count_as_success() {
        assert!(Status::Success.is_success());
        assert!(Status::ObjectNameExists.is_success());
        assert!(!Status::ObjectNameInvalid.is_success());
        assert!(!Status::InsufficientResources.is_success());
    }
}
