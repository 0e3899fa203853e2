//! The command string (at guest-physical 0x7000): commands separated by `;`, words by
//! whitespace; numbers in decimal or `0x` hex.

/// One command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd<'a> {
    /// `create NAME SIZE [MAX]`: create-or-open a section (MAX defaults to SIZE).
    Create {
        /// Its name.
        name: &'a str,
        /// Initial size.
        size: u64,
        /// Maximum size.
        max: u64,
    },
    /// `open NAME [ro]`.
    Open {
        /// Its name.
        name: &'a str,
        /// Map it read-only.
        read_only: bool,
    },
    /// `fill NAME BYTE`: write BYTE to every byte of the section.
    Fill {
        /// The handle's name.
        name: &'a str,
        /// The value.
        byte: u8,
    },
    /// `check NAME BYTE`: every byte of the section must be BYTE.
    Check {
        /// The handle's name.
        name: &'a str,
        /// The value.
        byte: u8,
    },
    /// `peek OFFSET LEN`: LEN (≤ [`MAX_PEEK`]) bytes of the window at OFFSET, in hex.
    Peek {
        /// Window offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `close NAME`.
    Close {
        /// The handle's name.
        name: &'a str,
    },
    /// `event NAME`: create-or-open an auto-reset event.
    Event {
        /// Its name.
        name: &'a str,
    },
    /// `signal NAME`: signal the event (or notify the section) NAME names.
    Signal {
        /// The handle's name.
        name: &'a str,
    },
    /// `wait NAME MS`: wait until the event is signalled (or the section changes), at most
    /// MS milliseconds (0: no limit).
    Wait {
        /// The handle's name.
        name: &'a str,
        /// Timeout in ms.
        ms: u64,
    },
    /// `spin`: loop forever.
    Spin,
    /// `done`: end the run (implicit after the last command).
    Done,
}

/// Most bytes one `peek` prints.
pub const MAX_PEEK: u64 = 64;

/// Why a command could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError<'a> {
    /// The first word is no command.
    Unknown(&'a str),
    /// Wrong arguments; the usage of the command.
    Usage(&'static str),
}

/// The non-empty commands of `args`, each as its text and the parse of it.
pub fn commands(args: &str) -> impl Iterator<Item = (&str, Result<Cmd<'_>, ParseError<'_>>)> {
    args.split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| (c, parse(c)))
}

/// Parses one command (non-empty text).
pub fn parse(text: &str) -> Result<Cmd<'_>, ParseError<'_>> {
    let mut w = text.split_ascii_whitespace();
    let verb = w.next().unwrap_or("");
    let mut args = [""; 4];
    let mut n = 0;
    for a in w {
        if n == args.len() {
            n += 1;
            break;
        }
        args[n] = a;
        n += 1;
    }
    let usage = |u: &'static str| ParseError::Usage(u);
    match verb {
        "create" => {
            const U: &str = "create NAME SIZE [MAX]";
            let (name, size) = match (n, number(args[1])) {
                (2 | 3, Some(size)) => (args[0], size),
                _ => return Err(usage(U)),
            };
            let max = if n == 3 {
                number(args[2]).ok_or(usage(U))?
            } else {
                size
            };
            Ok(Cmd::Create { name, size, max })
        }
        "open" => match (n, args[1]) {
            (1, _) => Ok(Cmd::Open {
                name: args[0],
                read_only: false,
            }),
            (2, "ro") => Ok(Cmd::Open {
                name: args[0],
                read_only: true,
            }),
            _ => Err(usage("open NAME [ro]")),
        },
        "fill" | "check" => {
            let byte = match (n, number(args[1]).and_then(|b| u8::try_from(b).ok())) {
                (2, Some(b)) => b,
                _ if verb == "fill" => return Err(usage("fill NAME BYTE")),
                _ => return Err(usage("check NAME BYTE")),
            };
            let name = args[0];
            Ok(if verb == "fill" {
                Cmd::Fill { name, byte }
            } else {
                Cmd::Check { name, byte }
            })
        }
        "peek" => match (n, number(args[0]), number(args[1])) {
            (2, Some(offset), Some(len)) if len <= MAX_PEEK => Ok(Cmd::Peek { offset, len }),
            _ => Err(usage("peek OFFSET LEN (LEN <= 64)")),
        },
        "close" if n == 1 => Ok(Cmd::Close { name: args[0] }),
        "close" => Err(usage("close NAME")),
        "event" if n == 1 => Ok(Cmd::Event { name: args[0] }),
        "event" => Err(usage("event NAME")),
        "signal" if n == 1 => Ok(Cmd::Signal { name: args[0] }),
        "signal" => Err(usage("signal NAME")),
        "wait" => match (n, number(args[1])) {
            (2, Some(ms)) if ms <= u64::from(u32::MAX) => Ok(Cmd::Wait { name: args[0], ms }),
            _ => Err(usage("wait NAME MS")),
        },
        "spin" if n == 0 => Ok(Cmd::Spin),
        "spin" => Err(usage("spin")),
        "done" if n == 0 => Ok(Cmd::Done),
        "done" => Err(usage("done")),
        other => Err(ParseError::Unknown(other)),
    }
}

/// A number in decimal or `0x` hex; `None` if it is not one or does not fit 64 bits.
pub fn number(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in digits.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn numbers_are_decimal_or_hex_and_never_wrap() {
        assert_eq!(number("4096"), Some(4096));
        assert_eq!(number("0x1000"), Some(4096));
        assert_eq!(number("0XfF"), Some(255));
        assert_eq!(number("18446744073709551615"), Some(u64::MAX));
        assert_eq!(number("18446744073709551616"), None);
        assert_eq!(number("0x1_0000"), None);
        assert_eq!(number("0x"), None);
        assert_eq!(number(""), None);
        assert_eq!(number("12a"), None);
        assert_eq!(number("-1"), None);
    }

    #[test]
    fn events_are_created_signalled_and_waited_for_with_a_timeout() {
        assert_eq!(parse("event ev"), Ok(Cmd::Event { name: "ev" }));
        assert_eq!(parse("signal ev"), Ok(Cmd::Signal { name: "ev" }));
        assert_eq!(
            parse("wait ev 0x100"),
            Ok(Cmd::Wait {
                name: "ev",
                ms: 256
            })
        );
        assert_eq!(parse("wait ev"), Err(ParseError::Usage("wait NAME MS")));
        assert_eq!(
            parse("wait ev 4294967296"),
            Err(ParseError::Usage("wait NAME MS")),
            "the timeout is a 32-bit count of ms"
        );
        assert_eq!(parse("event"), Err(ParseError::Usage("event NAME")));
        assert_eq!(parse("signal a b"), Err(ParseError::Usage("signal NAME")));
    }

    #[test]
    fn the_command_string_splits_into_commands() {
        let got: Vec<_> = commands(
            " create demo 4096; create big 0x1000 0x4000 ;open demo ro;;open demo;\
             fill demo 0x41; check demo 65 ; peek 0x10 16; close demo; spin;done ",
        )
        .map(|(_, c)| c)
        .collect();
        assert_eq!(
            got,
            [
                Ok(Cmd::Create {
                    name: "demo",
                    size: 4096,
                    max: 4096
                }),
                Ok(Cmd::Create {
                    name: "big",
                    size: 0x1000,
                    max: 0x4000
                }),
                Ok(Cmd::Open {
                    name: "demo",
                    read_only: true
                }),
                Ok(Cmd::Open {
                    name: "demo",
                    read_only: false
                }),
                Ok(Cmd::Fill {
                    name: "demo",
                    byte: 0x41
                }),
                Ok(Cmd::Check {
                    name: "demo",
                    byte: 65
                }),
                Ok(Cmd::Peek {
                    offset: 16,
                    len: 16
                }),
                Ok(Cmd::Close { name: "demo" }),
                Ok(Cmd::Spin),
                Ok(Cmd::Done),
            ]
        );
        assert_eq!(commands(" ; ;\t").count(), 0);
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        assert_eq!(
            parse("frobnicate x"),
            Err(ParseError::Unknown("frobnicate"))
        );
        for (text, usage) in [
            ("create", "create NAME SIZE [MAX]"),
            ("create demo", "create NAME SIZE [MAX]"),
            ("create demo x", "create NAME SIZE [MAX]"),
            ("create demo 1 y", "create NAME SIZE [MAX]"),
            ("create demo 1 2 3", "create NAME SIZE [MAX]"),
            ("create demo 1 2 3 4 5", "create NAME SIZE [MAX]"),
            ("open", "open NAME [ro]"),
            ("open demo rw", "open NAME [ro]"),
            ("fill demo 256", "fill NAME BYTE"),
            ("fill demo", "fill NAME BYTE"),
            ("check demo 0x100", "check NAME BYTE"),
            ("peek 0 65", "peek OFFSET LEN (LEN <= 64)"),
            ("peek 0", "peek OFFSET LEN (LEN <= 64)"),
            ("close", "close NAME"),
            ("close a b", "close NAME"),
            ("spin 1", "spin"),
            ("done now", "done"),
        ] {
            assert_eq!(parse(text), Err(ParseError::Usage(usage)), "{text}");
        }
    }
}
