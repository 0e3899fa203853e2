//! Whether the vshmd we talk to speaks our shared format: its status document says which
//! format version it serves (`vshmd.format_version`), and vshmctl warns once if it differs.

use serde_json::Value;
use vshm_format::layout::FORMAT_VERSION;

/// The warning to print when `status` (a status document) reports a format version other
/// than ours; `None` when they agree or when the vshmd is too old to report one (nothing
/// is known then, and a guess would only be noise).
pub fn format_mismatch(status: &Value) -> Option<String> {
    let theirs = status.get("vshmd")?.get("format_version")?.as_u64()?;
    if theirs == u64::from(FORMAT_VERSION) {
        return None;
    }
    let version = status["vshmd"]["version"].as_str().unwrap_or("unknown");
    Some(format!(
        "warning: vshmd {version} serves vshm format {theirs}, this vshmctl speaks format \
         {FORMAT_VERSION}: its output may be misread (install matching versions)"
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_same_format_or_an_unreported_one_is_not_worth_a_warning() {
        let ours = json!({"vshmd": {"version": "0.1.0", "format_version": FORMAT_VERSION}});
        assert_eq!(format_mismatch(&ours), None);
        assert_eq!(format_mismatch(&json!({"vshmd": {"pid": 1}})), None);
        assert_eq!(format_mismatch(&json!({})), None);
    }

    #[test]
    fn another_format_is_named_with_both_numbers() {
        let other = FORMAT_VERSION + 1;
        let doc = json!({"vshmd": {"version": "9.9.9", "format_version": other}});
        let warning = format_mismatch(&doc).expect("a warning");
        assert!(
            warning.contains(&format!("vshmd 9.9.9 serves vshm format {other}"))
                && warning.contains(&format!("speaks format {FORMAT_VERSION}")),
            "{warning}"
        );
    }
}
