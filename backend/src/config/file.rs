//! The configuration file's schema as serde types (docs/CONFIG.md is the reference): one
//! `[region]` table or several `[[region]]` tables, each with its listening sockets and
//! rules, and named `[policy.NAME]` tables shared by every region.
//! Unknown keys are errors; values that can be checked on their own (sizes, modes,
//! patterns) are checked while parsing, so toml reports them with their line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::policy::Glob;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDoc {
    pub region: Option<Spanned<Regions>>,
    #[serde(default)]
    pub policy: BTreeMap<Spanned<String>, Spanned<PolicyFile>>,
}

/// `[region]` (one table, the original form) or `[[region]]` (a list of tables).
#[derive(Debug)]
pub(super) enum Regions {
    One(Box<RegionFile>),
    Many(Vec<Spanned<RegionFile>>),
}

impl<'de> Deserialize<'de> for Regions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Regions, D::Error> {
        // Not `#[serde(untagged)]`: that would swallow toml's message (line, unknown key)
        // into "did not match any variant". Each form is handed its own deserializer.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Regions;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [region] table or [[region]] tables")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Regions, A::Error> {
                RegionFile::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|r| Regions::One(Box::new(r)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Regions, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Regions::Many)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[region]`: every command-line option of vshmd, plus sockets and rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegionFile {
    pub name: Option<Spanned<String>>,
    pub socket: Option<Spanned<PathBuf>>,
    pub size: Option<Spanned<Size>>,
    pub control: Option<Spanned<PathBuf>>,
    pub control_mode: Option<Spanned<Mode>>,
    pub max_peers: Option<Spanned<u32>>,
    pub max_objects: Option<Spanned<u32>>,
    pub name_bytes: Option<Spanned<Size>>,
    pub vectors: Option<Spanned<u32>>,
    pub hugepages: Option<bool>,
    pub lock: Option<bool>,
    pub metrics: Option<Spanned<String>>,
    pub quarantine_ms: Option<Spanned<u32>>,
    pub linger_us: Option<Spanned<u32>>,
    pub socket_mode: Option<Spanned<Mode>>,
    pub socket_group: Option<Spanned<Owner>>,
    pub policy: Option<Spanned<String>>,
    #[serde(default)]
    pub listen: Vec<Spanned<ListenFile>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RuleFile>>,
}

/// `[[region.listen]]`: a further listening socket of the region.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenFile {
    pub name: Spanned<String>,
    pub path: Spanned<PathBuf>,
    pub mode: Option<Spanned<Mode>>,
    pub group: Option<Spanned<Owner>>,
    pub policy: Option<Spanned<String>>,
}

/// `[[region.rule]]`: peers matching every key given get `policy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    pub socket: Option<Spanned<String>>,
    pub user: Option<Spanned<Owner>>,
    pub group: Option<Spanned<Owner>>,
    pub name: Option<Pattern>,
    pub policy: Spanned<String>,
}

/// `[policy.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub create: Option<Vec<Pattern>>,
    pub open: Option<Vec<Pattern>>,
    pub delete: Option<Vec<Pattern>>,
    pub delete_others: Option<Vec<Pattern>>,
    pub max_bytes: Option<Size>,
    pub max_objects: Option<u64>,
    pub max_handles: Option<u64>,
    pub max_request_rate: Option<Spanned<f64>>,
    pub request_burst: Option<Spanned<f64>>,
}

/// A size: bytes as an integer, or a string with a K/M/G suffix ("64M").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes, or a string such as \"64M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                vshm_format::units::parse_size(v)
                    .map(Size)
                    .map_err(|e| E::custom(format!("invalid size {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Permission bits: a TOML octal integer (`0o660`) or a string of octal digits ("660").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        struct V;
        fn bits<E: de::Error>(m: u32, shown: &dyn fmt::Display) -> Result<Mode, E> {
            if m & !0o777 == 0 {
                Ok(Mode(m))
            } else {
                Err(E::custom(format!(
                    "invalid mode {shown}: permission bits only, e.g. \"660\" or 0o660"
                )))
            }
        }
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("permission bits: 0o660 or \"660\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                let m = u32::try_from(v).unwrap_or(u32::MAX);
                bits(m, &format_args!("{v:#o}"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let digits = v.strip_prefix("0o").unwrap_or(v);
                let m = u32::from_str_radix(digits, 8).unwrap_or(u32::MAX);
                bits(m, &format_args!("{v:?}"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A user or group: a name ("libvirt-qemu") or a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owner {
    Id(u32),
    Name(String),
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Owner, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Owner;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user or group name, or a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Owner, E> {
                u32::try_from(v)
                    .map(Owner::Id)
                    .map_err(|_| E::custom(format!("invalid id {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Owner, E> {
                if v.is_empty() {
                    return Err(E::custom("an empty user or group name"));
                }
                Ok(Owner::Name(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A name pattern (`policy::Glob`), checked while parsing.
#[derive(Debug, Clone)]
pub(super) struct Pattern(pub Glob);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(&s)
            .map(Pattern)
            .map_err(|e| de::Error::custom(format!("invalid pattern {s:?}: {e}")))
    }
}
