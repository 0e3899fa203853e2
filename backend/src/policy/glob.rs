//! Name patterns for policies: `*` matches any run of characters (`/` included), `?` any one
//! character, everything else itself. Hand-written rather than globset: object names are
//! flat strings (no path semantics, no backslash, FORMAT.md §13), two wildcards are all a
//! policy needs, and vshmd then carries no regex engine.

use std::fmt;

/// A compiled pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    /// The pattern as characters (names are matched by character, not byte).
    chars: Vec<char>,
}

/// Why a pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// The empty pattern matches only the empty name: almost certainly a mistake.
    #[error("an empty pattern matches nothing useful (write \"*\" for every name)")]
    Empty,
    /// Longer than any name can be.
    #[error("a pattern of {0} bytes is longer than any name (1040 bytes)")]
    TooLong(usize),
    /// A character no name may hold.
    #[error("pattern {0:?} holds a backslash or NUL, which no name may contain")]
    BadChar(String),
}

impl Glob {
    /// Compiles `text`.
    pub fn new(text: &str) -> Result<Glob, GlobError> {
        if text.is_empty() {
            return Err(GlobError::Empty);
        }
        // Names are at most 1040 bytes; `*` can stand for many, so allow some slack.
        if text.len() > 2048 {
            return Err(GlobError::TooLong(text.len()));
        }
        if text.contains(['\\', '\0']) {
            return Err(GlobError::BadChar(text.to_owned()));
        }
        Ok(Glob {
            text: text.to_owned(),
            chars: text.chars().collect(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches the whole pattern. Linear in practice: the classic
    /// backtrack-to-the-last-star algorithm, no recursion, no allocation per call.
    pub fn matches(&self, name: &str) -> bool {
        let p = &self.chars;
        let mut pi = 0;
        let mut star: Option<(usize, std::str::CharIndices<'_>)> = None;
        let mut it = name.char_indices();
        loop {
            let save = it.clone();
            match it.next() {
                Some((_, c)) => {
                    if pi < p.len() && p[pi] == '*' {
                        // The star matches nothing for now; `c` is matched again after it.
                        star = Some((pi, save.clone()));
                        pi += 1;
                        it = save;
                    } else if pi < p.len() && (p[pi] == '?' || p[pi] == c) {
                        pi += 1;
                    } else if let Some((spi, sit)) = &mut star {
                        // Let the last star eat one more character and retry after it.
                        sit.next();
                        it = sit.clone();
                        pi = *spi + 1;
                    } else {
                        return false;
                    }
                }
                None => return p[pi..].iter().all(|&c| c == '*'),
            }
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Glob::new(p).expect("pattern").matches(n)
    }

    #[test]
    fn a_star_matches_any_run_of_characters_slashes_included() {
        assert!(m("*", ""));
        assert!(m("*", "a/b/c"));
        assert!(m("web/*", "web/"));
        assert!(m("web/*", "web/a/b"));
        assert!(!m("web/*", "web"));
        assert!(!m("web/*", "webx/a"));
        assert!(m("*.ring", "vm-a/tx.ring"));
        assert!(!m("*.ring", "vm-a/tx.ring2"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(m("a*b*c", "abc"));
        assert!(!m("a*b*c", "acb"));
        assert!(m("**x", "x"));
    }

    #[test]
    fn a_question_mark_matches_exactly_one_character_even_a_multibyte_one() {
        assert!(m("vm-?", "vm-a"));
        assert!(m("vm-?", "vm-é"));
        assert!(!m("vm-?", "vm-"));
        assert!(!m("vm-?", "vm-ab"));
    }

    #[test]
    fn without_wildcards_a_pattern_matches_only_itself() {
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exact2"));
        assert!(!m("exact", "Exact"));
    }

    #[test]
    fn empty_patterns_and_characters_no_name_holds_are_refused() {
        assert_eq!(Glob::new(""), Err(GlobError::Empty));
        assert!(matches!(Glob::new("a\\b"), Err(GlobError::BadChar(_))));
        assert!(matches!(
            Glob::new(&"x".repeat(3000)),
            Err(GlobError::TooLong(3000))
        ));
    }

    #[test]
    fn many_stars_against_a_long_name_finish_quickly() {
        let name = "a".repeat(1000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!m(&pattern, &name));
    }
}
