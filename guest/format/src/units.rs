//! Sizes as people type them: `4096`, `64K`, `16M`, `1G` (binary multiples; an optional
//! `iB`/`B` after the suffix is accepted). Shared by vshmd and the `vshm` CLI.

/// Why a size string was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional K/M/G/T suffix.
    Syntax,
    /// The value does not fit in 64 bits.
    Overflow,
}

impl core::fmt::Display for SizeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SizeError::Syntax => {
                write!(
                    f,
                    "expected a number with an optional K, M, G or T suffix (e.g. 64M)"
                )
            }
            SizeError::Overflow => write!(f, "size does not fit in 64 bits"),
        }
    }
}

/// Parses a size.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(SizeError::Syntax);
    }
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow)?;
    let shift = match suffix.trim_start() {
        "" | "B" => 0,
        "K" | "k" | "KB" | "KiB" => 10,
        "M" | "m" | "MB" | "MiB" => 20,
        "G" | "g" | "GB" | "GiB" => 30,
        "T" | "t" | "TB" | "TiB" => 40,
        _ => return Err(SizeError::Syntax),
    };
    n.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_suffixes_and_reject_junk() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size(" 2 G "), Ok(2 << 30));
        assert_eq!(parse_size("3X"), Err(SizeError::Syntax));
        assert_eq!(parse_size("-1"), Err(SizeError::Syntax));
        assert_eq!(parse_size(""), Err(SizeError::Syntax));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::Overflow));
        assert_eq!(parse_size("17179869184G"), Err(SizeError::Overflow));
    }
}
