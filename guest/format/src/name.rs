//! Object names: validation (Rtk rules) and the hash stored beside each name.

use crate::layout::{MAX_NAME_BYTES, MAX_NAME_CHARS};
use crate::Status;

/// Checks a name against the namespace rules: 1..=260 Unicode scalar values, case-sensitive,
/// any character except the backslash path separator and NUL.
///
/// Returns [`Status::ObjectNameInvalid`] for anything else. (An *unnamed* object is expressed
/// by passing no name at all, never by an empty string.)
pub fn validate_name(name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(Status::ObjectNameInvalid);
    }
    let mut chars = 0usize;
    for c in name.chars() {
        if c == '\\' || c == '\0' {
            return Err(Status::ObjectNameInvalid);
        }
        chars += 1;
    }
    if chars > MAX_NAME_CHARS {
        return Err(Status::ObjectNameInvalid);
    }
    Ok(())
}

/// Validates raw name bytes read from shared memory (UTF-8 + [`validate_name`]).
pub fn validate_name_bytes(bytes: &[u8]) -> Result<&str, Status> {
    let name = core::str::from_utf8(bytes).map_err(|_| Status::ObjectNameInvalid)?;
    validate_name(name)?;
    Ok(name)
}

/// The fixed-size name field of an entry or request: the bytes (zero-padded) and their length.
/// `name` must already be validated (≤ 1040 bytes); longer input is truncated.
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
        assert_eq!(validate_name(long), Err(Status::ObjectNameInvalid));
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
    fn backslash_nul_and_empty_are_invalid() {
        assert_eq!(validate_name("a\\b"), Err(Status::ObjectNameInvalid));
        assert_eq!(validate_name("a\0b"), Err(Status::ObjectNameInvalid));
        assert_eq!(validate_name(""), Err(Status::ObjectNameInvalid));
        assert_eq!(validate_name("Frame/0 é"), Ok(()));
    }

    #[test]
    fn invalid_utf8_from_shared_memory_is_rejected() {
        assert_eq!(
            validate_name_bytes(&[0xff, 0x41]),
            Err(Status::ObjectNameInvalid)
        );
        assert_eq!(validate_name_bytes(b"ok"), Ok("ok"));
    }

    #[test]
    fn hash_is_case_sensitive() {
        assert_ne!(name_hash(b"Frame"), name_hash(b"frame"));
        assert_eq!(name_hash(b""), 0x811C_9DC5);
    }
}
