//! What `--version` prints: the program's version and the shared-format version it speaks.

use crate::layout::FORMAT_VERSION;

/// `"<crate version> (vshm format <FORMAT_VERSION>)"`, shown after the program's name by
/// `vshmd --version`, `vshmctl --version` and `vshm --version`: two programs that print the
/// same format number can share a region, whatever their crate versions.
pub fn version_text(crate_version: &str) -> String {
    format!("{crate_version} (vshm format {FORMAT_VERSION})")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_crate_and_the_format_version() {
        assert_eq!(
            super::version_text("1.2.3"),
            format!("1.2.3 (vshm format {})", crate::layout::FORMAT_VERSION)
        );
    }
}
