//! Object names: validation (Rtk rules) with [`NameError`] saying which rule is broken,
//! the fixed-size name field of a request, and the hash stored beside each name.

use crate::layout::{MAX_NAME_BYTES, MAX_NAME_CHARS};
use crate::Status;

/// Why a name breaks the namespace rules. Every variant means
/// [`Status::ObjectNameInvalid`] on the wire ([`NameError::status`]); the fields say where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The empty string (an unnamed object passes no name at all).
    Empty,
    /// More bytes than a name field holds ([`MAX_NAME_BYTES`]).
    TooLong {
        /// Length in bytes.
        bytes: usize,
    },
    /// More than [`MAX_NAME_CHARS`] Unicode scalar values.
    TooManyChars {
        /// Length in characters.
        chars: usize,
    },
    /// A backslash (the path separator).
    Backslash {
        /// Byte offset of the first one.
        at: usize,
    },
    /// A NUL character.
    Nul {
        /// Byte offset of the first one.
        at: usize,
    },
    /// Bytes from shared memory that are not UTF-8.
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
}

impl NameError {
    /// The NTSTATUS for any invalid name: [`Status::ObjectNameInvalid`].
    pub const fn status(self) -> Status {
        Status::ObjectNameInvalid
    }
}

impl From<NameError> for Status {
    fn from(e: NameError) -> Status {
        e.status()
    }
}

impl core::fmt::Display for NameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            NameError::Empty => write!(f, "the name is empty"),
            NameError::TooLong { bytes } => {
                write!(f, "the name is {bytes} bytes, over {MAX_NAME_BYTES}")
            }
            NameError::TooManyChars { chars } => {
                write!(f, "the name is {chars} characters, over {MAX_NAME_CHARS}")
            }
            NameError::Backslash { at } => write!(f, "the name contains a backslash at byte {at}"),
            NameError::Nul { at } => write!(f, "the name contains a NUL at byte {at}"),
            NameError::NotUtf8 { valid_up_to } => {
                write!(f, "the name is not valid UTF-8 after byte {valid_up_to}")
            }
        }
    }
}

/// Checks a name against the namespace rules: 1..=260 Unicode scalar values, case-sensitive,
/// any character except the backslash path separator and NUL.
///
/// The error says which rule is broken; all of them are [`Status::ObjectNameInvalid`]. When
/// several are, the first of: empty, too many bytes, a backslash, a NUL, too many
/// characters. (An *unnamed* object is expressed by passing no name at all, never by an
/// empty string.)
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { bytes: name.len() });
    }
    if let Some(at) = name.find('\\') {
        return Err(NameError::Backslash { at });
    }
    if let Some(at) = name.find('\0') {
        return Err(NameError::Nul { at });
    }
    // A name of at most MAX_NAME_CHARS bytes has at most as many characters: count them
    // only for longer (multi-byte) names.
    if name.len() > MAX_NAME_CHARS {
        let chars = name.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(NameError::TooManyChars { chars });
        }
    }
    Ok(())
}

/// Validates raw name bytes read from shared memory (UTF-8 + [`validate_name`]).
pub fn validate_name_bytes(bytes: &[u8]) -> Result<&str, NameError> {
    let name = core::str::from_utf8(bytes).map_err(|e| NameError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    validate_name(name)?;
    Ok(name)
}

/// The fixed-size name field of a request: the bytes (zero-padded) and their length. (An
/// object entry refers to its name in the name area instead, FORMAT.md §5b.) `name` must
/// already be validated (≤ 1040 bytes); longer input is truncated.
pub fn name_field(name: &str) -> ([u8; MAX_NAME_BYTES], u32) {
    let b = name.as_bytes();
    let len = b.len().min(MAX_NAME_BYTES);
    let mut field = [0u8; MAX_NAME_BYTES];
    field[..len].copy_from_slice(&b[..len]);
    (field, crate::layout::const_u32(len))
}

/// FNV-1a (32-bit) of the UTF-8 bytes. Lets a lookup skip most table entries without
/// comparing names; a match is always confirmed by comparing the bytes.
pub const fn name_hash(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811C_9DC5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_up_to_260_characters_are_valid_and_261_are_not() {
        let mut buf = [b'a'; 261];
        let ok = core::str::from_utf8(&buf[..260]).expect("ascii");
        assert_eq!(validate_name(ok), Ok(()));
        buf[0] = b'b';
        let long = core::str::from_utf8(&buf).expect("ascii");
        assert_eq!(
            validate_name(long),
            Err(NameError::TooManyChars { chars: 261 })
        );
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        // 260 four-byte characters = 1040 bytes: still valid.
        let mut s = [0u8; 1040];
        for chunk in s.chunks_mut(4) {
            chunk.copy_from_slice("😀".as_bytes());
        }
        let name = core::str::from_utf8(&s).expect("utf8");
        assert_eq!(validate_name(name), Ok(()));
    }

    #[test]
    fn a_name_over_1040_bytes_is_too_long_with_its_byte_count() {
        let s = "é".repeat(521); // 1042 bytes, 521 characters
        assert_eq!(validate_name(&s), Err(NameError::TooLong { bytes: 1042 }));
    }

    #[test]
    fn backslash_and_nul_report_the_byte_offset_of_the_first_one() {
        assert_eq!(validate_name("é\\b\\"), Err(NameError::Backslash { at: 2 }));
        assert_eq!(validate_name("ab\0"), Err(NameError::Nul { at: 2 }));
        assert_eq!(
            validate_name("a\0\\"),
            Err(NameError::Backslash { at: 2 }),
            "a backslash is reported before a NUL"
        );
        assert_eq!(validate_name("Frame/0 é"), Ok(()));
    }

    #[test]
    fn the_empty_name_is_its_own_error() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
    }

    #[test]
    fn invalid_utf8_from_shared_memory_reports_the_valid_prefix() {
        assert_eq!(
            validate_name_bytes(&[0x41, 0xff, 0x41]),
            Err(NameError::NotUtf8 { valid_up_to: 1 })
        );
        assert_eq!(validate_name_bytes(b"ok"), Ok("ok"));
    }

    #[test]
    fn every_name_error_is_object_name_invalid_and_says_why() {
        let all = [
            NameError::Empty,
            NameError::TooLong { bytes: 1041 },
            NameError::TooManyChars { chars: 261 },
            NameError::Backslash { at: 3 },
            NameError::Nul { at: 4 },
            NameError::NotUtf8 { valid_up_to: 5 },
        ];
        for e in all {
            assert_eq!(e.status(), Status::ObjectNameInvalid);
            assert_eq!(Status::from(e), Status::ObjectNameInvalid);
        }
        let text = |e: NameError| {
            let mut s = String::new();
            core::fmt::write(&mut s, format_args!("{e}")).expect("fmt");
            s
        };
        assert_eq!(text(all[0]), "the name is empty");
        assert_eq!(text(all[1]), "the name is 1041 bytes, over 1040");
        assert_eq!(text(all[2]), "the name is 261 characters, over 260");
        assert_eq!(text(all[3]), "the name contains a backslash at byte 3");
        assert_eq!(text(all[4]), "the name contains a NUL at byte 4");
        assert_eq!(text(all[5]), "the name is not valid UTF-8 after byte 5");
    }

    #[test]
    fn hash_is_case_sensitive() {
        assert_ne!(name_hash(b"Frame"), name_hash(b"frame"));
        assert_eq!(name_hash(b""), 0x811C_9DC5);
    }
}
