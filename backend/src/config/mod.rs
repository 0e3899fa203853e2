//! `vshmd --config FILE`: reads the TOML file (`file.rs`), checks it, and combines it with
//! the command-line options into one daemon [`Config`] (with its policy [`Rules`]) per
//! region.
//!
//! Precedence (docs/CONFIG.md): a command-line option overrides the same key of the file's
//! only region (options are refused with a file of several regions); a flag
//! (`--hugepages`, `--lock`) can only turn its key on; anything neither gives takes
//! vshmd's default. Two sockets (or a socket and a control socket) on one path, two
//! regions of one name or two metrics listeners on one address are an error naming both,
//! wherever each came from (`across.rs`). Everything is checked here, before vshmd creates
//! anything.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

use crate::daemon::{Config, DaemonError, ListenConfig};
use crate::policy::{Patterns, Policy, Rate, Rule, Rules, MAIN_SOCKET, UNRESTRICTED};

mod across;
mod file;
mod ids;
#[cfg(test)]
mod tests;

use file::{FileDoc, Owner, PolicyFile, RegionFile, Regions};

/// Defaults of the options (also in `vshmd --help` and docs/CONFIG.md).
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// See [`DEFAULT_SIZE`].
pub const DEFAULT_MAX_PEERS: u32 = 16;
/// See [`DEFAULT_SIZE`].
pub const DEFAULT_VECTORS: u32 = 2;
/// `--quarantine-ms` when not given (FORMAT.md §11a).
pub const DEFAULT_QUARANTINE_MS: u32 = 2000;
/// The longest quarantine accepted (10 minutes): longer only hides memory from everyone.
pub const MAX_QUARANTINE_MS: u32 = 600_000;
/// See [`DEFAULT_SIZE`].
pub const DEFAULT_CONTROL_MODE: u32 = 0o600;
/// `--linger-us` when not given: how long the event loop keeps looking for the next event
/// after a peer rang before it sleeps (BENCHMARKS.md P2).
pub const DEFAULT_LINGER_US: u32 = 50;
/// The longest linger accepted (1 ms): longer only burns a core.
pub const MAX_LINGER_US: u32 = 1000;
/// See [`DEFAULT_SIZE`].
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// The command-line options: `None` (or `false`) = not given.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--size`.
    pub size: Option<u64>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// `--max-peers`.
    pub max_peers: Option<u32>,
    /// `--max-objects`.
    pub max_objects: Option<u32>,
    /// `--name-bytes`.
    pub name_bytes: Option<u64>,
    /// `--vectors`.
    pub vectors: Option<u32>,
    /// `--hugepages`.
    pub hugepages: bool,
    /// `--lock`.
    pub lock: bool,
    /// `--control-mode`.
    pub control_mode: Option<u32>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--quarantine-ms`.
    pub quarantine_ms: Option<u32>,
    /// `--linger-us`.
    pub linger_us: Option<u32>,
}

impl Options {
    /// The first option given that sets a key of the region (all but `--config`), if any.
    fn region_option(&self) -> Option<&'static str> {
        [
            (self.socket.is_some(), "--socket"),
            (self.size.is_some(), "--size"),
            (self.control.is_some(), "--control"),
            (self.max_peers.is_some(), "--max-peers"),
            (self.max_objects.is_some(), "--max-objects"),
            (self.name_bytes.is_some(), "--name-bytes"),
            (self.vectors.is_some(), "--vectors"),
            (self.hugepages, "--hugepages"),
            (self.lock, "--lock"),
            (self.control_mode.is_some(), "--control-mode"),
            (self.metrics.is_some(), "--metrics"),
            (self.quarantine_ms.is_some(), "--quarantine-ms"),
            (self.linger_us.is_some(), "--linger-us"),
        ]
        .into_iter()
        .find_map(|(given, option)| given.then_some(option))
    }
}

/// Why the configuration is unusable. Each names the file, and the key and line where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: cannot read the configuration: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type (toml's message: line,
    /// column, the line itself and the problem).
    #[error("{}: {message}", file.display())]
    Parse {
        /// The file.
        file: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A value toml accepted but vshmd cannot use.
    #[error("{where_}: {key}: {problem}")]
    Invalid {
        /// `FILE:LINE`, or `FILE`.
        where_: String,
        /// The key, dotted (`region.listen[1].policy`).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// Two settings that cannot both hold (each named with where it came from).
    #[error("{first} conflicts with {second}: {problem}")]
    Conflict {
        /// One setting.
        first: String,
        /// The other.
        second: String,
        /// Why.
        problem: String,
    },
    /// A command-line option is unusable, or something required is missing.
    #[error("{0}")]
    Option(String),
    /// An option that sets a region's key, with a file of several regions.
    #[error(
        "{option} sets a key of one region, but {} has {regions} regions: set the key in \
         each [[region]] table instead",
        file.display()
    )]
    OptionWithRegions {
        /// The option (`--size`).
        option: &'static str,
        /// The file.
        file: PathBuf,
        /// How many regions it has.
        regions: usize,
    },
}

/// Where a setting came from, for messages.
#[derive(Debug, Clone)]
enum Origin {
    /// Neither the options nor the file gave it: the key it would have had.
    Default(String),
    Flag(&'static str),
    Key {
        key: String,
        at: String,
    },
}

impl Origin {
    fn describe(&self, value: &str) -> String {
        match self {
            Origin::Default(key) => format!("the default {key} {value}"),
            Origin::Flag(f) => format!("{f} {value}"),
            Origin::Key { key, at } => format!("{key} = {value} ({at})"),
        }
    }
}

/// Line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at)
        .map_or(0, |t| t.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// The file being read, for messages with lines.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn at<T>(&self, s: &Spanned<T>) -> String {
        format!(
            "{}:{}",
            self.path.display(),
            line_of(self.text, s.span().start)
        )
    }

    fn invalid<T>(
        &self,
        s: &Spanned<T>,
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            where_: self.at(s),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn origin<T>(&self, s: &Spanned<T>, key: &str) -> Origin {
        Origin::Key {
            key: key.to_string(),
            at: self.at(s),
        }
    }
}

/// The header's bytes per object with the default 16 peers (FORMAT.md §2): its entry (128),
/// its default share of the name area (64), two name-index entries (16) and a refcount cell
/// in each peer's row (4 × 16).
const HEADER_BYTES_PER_OBJECT: u64 = std::mem::size_of::<vshm_format::layout::ObjectEntry>() as u64
    + vshm_format::layout::DEFAULT_NAME_BYTES_PER_OBJECT
    + 2 * vshm_format::index::INDEX_ENTRY_SIZE
    + 4 * DEFAULT_MAX_PEERS as u64;

/// 1024 objects for regions of 8 MiB and more; for smaller ones, as many as keep their part
/// of the header within a sixteenth of the region (at least 16).
pub fn default_max_objects(size: u64) -> u32 {
    let fit = size / 16 / HEADER_BYTES_PER_OBJECT;
    u32::try_from(fit.clamp(16, 1024)).unwrap_or(1024)
}

/// Reads `opts.config` (if given) and combines it with the other options: one [`Config`]
/// per region, in the file's order (exactly one without a file).
pub fn resolve(opts: &Options) -> Result<Vec<Config>, ConfigError> {
    match &opts.config {
        None => {
            let one = combine(opts, None, None, &Policies::default())?;
            across::check(std::slice::from_ref(&one))?;
            Ok(vec![one.config])
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                file: path.clone(),
                source,
            })?;
            resolve_text(opts, path, &text)
        }
    }
}

/// [`resolve`] with the file's text already read (tests).
pub fn resolve_text(opts: &Options, path: &Path, text: &str) -> Result<Vec<Config>, ConfigError> {
    let parse_err = |e: toml::de::Error| ConfigError::Parse {
        file: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    };
    let doc: FileDoc = toml::from_str(text).map_err(parse_err)?;
    let src = Source { path, text };
    let regions: Vec<RegionIn<'_>> = match &doc.region {
        None => Vec::new(),
        Some(r) => match r.get_ref() {
            Regions::One(file) => vec![RegionIn {
                key: "region".into(),
                at: src.at(r),
                file,
                count: 1,
            }],
            Regions::Many(list) => list
                .iter()
                .enumerate()
                .map(|(i, f)| RegionIn {
                    key: format!("region[{i}]"),
                    at: src.at(f),
                    file: f.get_ref(),
                    count: list.len(),
                })
                .collect(),
        },
    };
    // An option sets a key of "the" region: with several, it would be ambiguous which.
    if regions.len() > 1 {
        if let Some(option) = opts.region_option() {
            return Err(ConfigError::OptionWithRegions {
                option,
                file: path.to_owned(),
                regions: regions.len(),
            });
        }
    }
    let policies = policies(&src, &doc)?;
    let resolved = if regions.is_empty() {
        if opts.socket.is_none() {
            return Err(ConfigError::Invalid {
                where_: path.display().to_string(),
                key: "region".into(),
                problem: "no [region] table (and no --socket)".into(),
            });
        }
        vec![combine(opts, Some(&src), None, &policies)?]
    } else {
        regions
            .iter()
            .map(|r| combine(opts, Some(&src), Some(r), &policies))
            .collect::<Result<Vec<_>, _>>()?
    };
    // Names, paths and addresses that regions would share: each checked alone is fine.
    across::check(&resolved)?;
    Ok(resolved.into_iter().map(|r| r.config).collect())
}

/// One region of the file, with where it is (for messages).
struct RegionIn<'a> {
    /// `region` (the `[region]` form) or `region[I]` (the `[[region]]` form).
    key: String,
    /// `FILE:LINE` of its table.
    at: String,
    file: &'a RegionFile,
    /// How many regions the file has.
    count: usize,
}

/// One region combined with the options, and what [`across`] compares between regions:
/// each setting with a description of where it came from.
#[derive(Debug, Clone)]
struct Resolved {
    config: Config,
    /// Its name.
    name: String,
    /// Where its name came from.
    name_origin: String,
    /// Every socket path of the region.
    paths: Vec<(PathBuf, String)>,
    /// Its metrics address, if any.
    metrics: Option<(SocketAddr, String)>,
}

/// The file's policies by name (not counting the built-in `unrestricted`).
#[derive(Default)]
struct Policies(Vec<(String, Arc<Policy>)>);

/// The default name of a file's only region (or of the region the options describe).
pub const DEFAULT_REGION_NAME: &str = "default";

/// The longest region name (it becomes part of the thread's name and of log lines).
pub const MAX_REGION_NAME: usize = 32;

/// Checks a region's name: letters, digits, `-`, `_` and `.`, at most
/// [`MAX_REGION_NAME`] bytes.
fn region_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_REGION_NAME {
        return Some(format!(
            "{name:?}: a region's name has 1 to {MAX_REGION_NAME} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Some(format!(
            "{name:?}: a region's name may hold letters, digits, '-', '_' and '.'"
        ));
    }
    None
}

/// A value over its limit, named where it came from: the file's key and line, or the option.
fn over_limit(origin: Origin, value: u32, problem: String) -> ConfigError {
    match origin {
        Origin::Key { key, at } => ConfigError::Invalid {
            where_: at,
            key,
            problem,
        },
        other => ConfigError::Option(other.describe(&format!("{value}: {problem}"))),
    }
}

fn combine(
    opts: &Options,
    src: Option<&Source<'_>>,
    region_in: Option<&RegionIn<'_>>,
    policies: &Policies,
) -> Result<Resolved, ConfigError> {
    let region: Option<&RegionFile> = region_in.map(|r| r.file);
    let prefix = region_in.map_or("region", |r| r.key.as_str());
    let (name, name_origin) = match (region_in, src) {
        (Some(r), Some(src)) => match &r.file.name {
            Some(n) => {
                let key = format!("{prefix}.name");
                if let Some(problem) = region_name_problem(n.get_ref()) {
                    return Err(src.invalid(n, key, problem));
                }
                let origin = src.origin(n, &key).describe(&format!("{:?}", n.get_ref()));
                (n.get_ref().clone(), origin)
            }
            None if r.count > 1 => {
                return Err(ConfigError::Invalid {
                    where_: r.at.clone(),
                    key: format!("{prefix}.name"),
                    problem: format!(
                        "missing: each of the file's {} regions needs a name (logs, status \
                         and its thread are named after it)",
                        r.count
                    ),
                })
            }
            None => (
                DEFAULT_REGION_NAME.to_string(),
                format!("{prefix} ({})", r.at),
            ),
        },
        _ => (DEFAULT_REGION_NAME.to_string(), "the region".to_string()),
    };
    // One setting: the option, else the file's key, else the default; with its origin.
    macro_rules! pick {
        ($opt:expr, $flag:literal, $key:ident, $default:expr) => {{
            let from_file = region.and_then(|r| r.$key.as_ref());
            let key = format!("{prefix}.{}", stringify!($key));
            match ($opt, from_file, src) {
                (Some(v), _, _) => (v, Origin::Flag($flag)),
                (None, Some(s), Some(src)) => (s.get_ref().clone(), src.origin(s, &key)),
                _ => ($default, Origin::Default(key)),
            }
        }};
    }
    let (socket, socket_origin) =
        match pick!(opts.socket.clone(), "--socket", socket, PathBuf::new()) {
            (_, Origin::Default(_)) => {
                return Err(match (src, region_in) {
                    (Some(_), Some(r)) if r.count > 1 => ConfigError::Invalid {
                        where_: r.at.clone(),
                        key: format!("{prefix}.socket"),
                        problem: "missing: every region needs its socket".into(),
                    },
                    (Some(src), _) => ConfigError::Option(format!(
                        "{}: no socket: give region.socket, or --socket",
                        src.path.display()
                    )),
                    (None, _) => ConfigError::Option(
                        "--socket is required (or --config with region.socket)".into(),
                    ),
                })
            }
            found => found,
        };
    let (size, size_origin) = pick!(
        opts.size.map(file::Size),
        "--size",
        size,
        file::Size(DEFAULT_SIZE)
    );
    let size = size.0;
    let (max_peers, peers_origin) =
        pick!(opts.max_peers, "--max-peers", max_peers, DEFAULT_MAX_PEERS);
    let (max_objects, objects_origin) = pick!(
        opts.max_objects,
        "--max-objects",
        max_objects,
        default_max_objects(size)
    );
    // The name area (FORMAT.md §5b): unset means the format's default for max_objects.
    let names_key = format!("{prefix}.name_bytes");
    let (name_bytes, names_origin) = match (
        opts.name_bytes,
        region.and_then(|r| r.name_bytes.as_ref()),
        src,
    ) {
        (Some(v), _, _) => (Some(v), Origin::Flag("--name-bytes")),
        (None, Some(s), Some(src)) => (Some(s.get_ref().0), src.origin(s, &names_key)),
        _ => (None, Origin::Default(names_key)),
    };
    let (vectors, vectors_origin) = pick!(opts.vectors, "--vectors", vectors, DEFAULT_VECTORS);
    let (quarantine_ms, quarantine_origin) = pick!(
        opts.quarantine_ms,
        "--quarantine-ms",
        quarantine_ms,
        DEFAULT_QUARANTINE_MS
    );
    if quarantine_ms > MAX_QUARANTINE_MS {
        return Err(over_limit(
            quarantine_origin,
            quarantine_ms,
            format!(
                "{quarantine_ms} ms is more than the limit of {MAX_QUARANTINE_MS} ms (10 minutes)"
            ),
        ));
    }
    let (linger_us, linger_origin) =
        pick!(opts.linger_us, "--linger-us", linger_us, DEFAULT_LINGER_US);
    if linger_us > MAX_LINGER_US {
        return Err(over_limit(
            linger_origin,
            linger_us,
            format!("{linger_us} µs is more than the limit of {MAX_LINGER_US} µs"),
        ));
    }
    let (control_mode, _) = pick!(
        opts.control_mode.map(file::Mode),
        "--control-mode",
        control_mode,
        file::Mode(DEFAULT_CONTROL_MODE)
    );
    let (control, control_origin) = pick!(opts.control.clone(), "--control", control, {
        let mut p = socket.clone().into_os_string();
        p.push(".ctl");
        PathBuf::from(p)
    });
    let metrics_key = format!("{prefix}.metrics");
    let metrics = match (opts.metrics, region.and_then(|r| r.metrics.as_ref()), src) {
        (Some(a), _, _) => Some(a),
        (None, Some(s), Some(src)) => Some(s.get_ref().parse::<SocketAddr>().map_err(|e| {
            src.invalid(
                s,
                &metrics_key,
                format!("{:?}: {e} (e.g. \"127.0.0.1:9464\")", s.get_ref()),
            )
        })?),
        _ => None,
    };
    if let Some(addr) = &metrics {
        if let Err(e) = crate::daemon::loopback_only(addr) {
            return Err(
                match (opts.metrics, region.and_then(|r| r.metrics.as_ref()), src) {
                    (None, Some(s), Some(src)) => src.invalid(s, &metrics_key, e.to_string()),
                    _ => ConfigError::Option(e.to_string()),
                },
            );
        }
    }
    let hugepages = opts.hugepages || region.and_then(|r| r.hugepages).unwrap_or(false);
    let lock = opts.lock || region.and_then(|r| r.lock).unwrap_or(false);

    let (socket_mode, socket_group, listen, rules) = match (src, region) {
        (Some(src), Some(region)) => sockets_and_rules(src, region, prefix, policies)?,
        _ => (DEFAULT_SOCKET_MODE, None, Vec::new(), Rules::unrestricted()),
    };

    // Every path is a different socket (checked with the other regions' in `across`).
    let mut paths: Vec<(PathBuf, String)> = vec![
        (
            socket.clone(),
            socket_origin.describe(&socket.display().to_string()),
        ),
        (
            control.clone(),
            control_origin.describe(&control.display().to_string()),
        ),
    ];
    if let (Some(src), Some(region)) = (src, region) {
        for (i, l) in region.listen.iter().enumerate() {
            let p = l.get_ref().path.get_ref();
            paths.push((
                p.clone(),
                src.origin(&l.get_ref().path, &format!("{prefix}.listen[{i}].path"))
                    .describe(&p.display().to_string()),
            ));
        }
    }
    let metrics_origin = match (opts.metrics, region.and_then(|r| r.metrics.as_ref()), src) {
        (Some(_), _, _) => Origin::Flag("--metrics"),
        (None, Some(s), Some(src)) => src.origin(s, &metrics_key),
        _ => Origin::Default(metrics_key.clone()),
    };

    let config = Config {
        name: name.clone(),
        socket,
        control,
        size,
        max_peers,
        max_objects,
        name_bytes,
        vectors,
        hugepages,
        lock,
        control_mode: control_mode.0,
        metrics,
        socket_mode,
        socket_group,
        listen,
        policy: rules,
        config_file: src.map(|s| s.path.to_owned()),
        quarantine: std::time::Duration::from_millis(u64::from(quarantine_ms)),
        linger: std::time::Duration::from_micros(u64::from(linger_us)),
    };
    // The layout's own checks (power-of-two size, peer and object counts), named after
    // the key they came from when that was the file.
    if let Err(DaemonError::Config(msg)) = config.layout(4096) {
        let origins = [
            ("--size", &size_origin),
            ("--max-peers", &peers_origin),
            ("--max-objects", &objects_origin),
            ("--name-bytes", &names_origin),
            ("--vectors", &vectors_origin),
        ];
        for (flag, origin) in origins {
            if let (Some(rest), Origin::Key { key, at }) = (msg.strip_prefix(flag), origin) {
                return Err(ConfigError::Invalid {
                    where_: at.clone(),
                    key: key.clone(),
                    problem: format!("{}{rest}", key.rsplit('.').next().unwrap_or(key)),
                });
            }
        }
        return Err(ConfigError::Option(msg));
    }
    Ok(Resolved {
        metrics: config
            .metrics
            .map(|a| (a, metrics_origin.describe(&a.to_string()))),
        config,
        name,
        name_origin,
        paths,
    })
}

type Sockets = (u32, Option<u32>, Vec<ListenConfig>, Rules);

/// The file's `[policy.NAME]` tables, built once and shared by every region.
fn policies(src: &Source<'_>, doc: &FileDoc) -> Result<Policies, ConfigError> {
    let mut policies: Vec<(String, Arc<Policy>)> = Vec::new();
    for (name, p) in &doc.policy {
        let key = format!("policy.{}", name.get_ref());
        if name.get_ref() == UNRESTRICTED {
            return Err(src.invalid(name, key, format!("{UNRESTRICTED:?} is the built-in policy that allows everything; choose another name")));
        }
        policies.push((
            name.get_ref().clone(),
            Arc::new(build_policy(src, name.get_ref(), &key, p)?),
        ));
    }
    Ok(Policies(policies))
}

/// A region's sockets and rules, every reference checked.
fn sockets_and_rules(
    src: &Source<'_>,
    region: &RegionFile,
    prefix: &str,
    policies: &Policies,
) -> Result<Sockets, ConfigError> {
    let policies = &policies.0;
    let lookup = |s: &Spanned<String>, key: &str| -> Result<Arc<Policy>, ConfigError> {
        if s.get_ref() == UNRESTRICTED {
            return Ok(Arc::new(Policy::unrestricted()));
        }
        policies
            .iter()
            .find(|(n, _)| n == s.get_ref())
            .map(|(_, p)| p.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = policies.iter().map(|(n, _)| n.as_str()).collect();
                src.invalid(
                    s,
                    key,
                    format!(
                        "no policy {:?} (defined: {}; built in: {UNRESTRICTED})",
                        s.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })
    };
    let default_policy = match &region.policy {
        Some(p) => lookup(p, &format!("{prefix}.policy"))?,
        None => Arc::new(Policy::unrestricted()),
    };
    let socket_mode = region
        .socket_mode
        .as_ref()
        .map_or(DEFAULT_SOCKET_MODE, |m| m.get_ref().0);
    let socket_group = match &region.socket_group {
        Some(g) => Some(group_id(src, g, &format!("{prefix}.socket_group"))?),
        None => None,
    };
    let mut sockets = vec![(MAIN_SOCKET.to_string(), default_policy.clone())];
    let mut listen = Vec::new();
    // "vhost-user": the VMs of `vshmd --vhost-user` (rules may single them out; with no
    // rule they get the region's policy). A listen socket may not take the name.
    let mut names: HashSet<String> = HashSet::from([
        MAIN_SOCKET.to_string(),
        crate::policy::VHOST_USER_SOCKET.to_string(),
    ]);
    for (i, l) in region.listen.iter().enumerate() {
        let l = l.get_ref();
        let key = format!("{prefix}.listen[{i}]");
        let name = l.name.get_ref();
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(src.invalid(
                &l.name,
                format!("{key}.name"),
                format!("{name:?}: each socket needs its own non-empty name ({MAIN_SOCKET:?} is {prefix}.socket)"),
            ));
        }
        let policy = match &l.policy {
            Some(p) => lookup(p, &format!("{key}.policy"))?,
            None => default_policy.clone(),
        };
        let group = match &l.group {
            Some(g) => Some(group_id(src, g, &format!("{key}.group"))?),
            None => None,
        };
        sockets.push((name.clone(), policy.clone()));
        listen.push(ListenConfig {
            name: name.clone(),
            path: l.path.get_ref().clone(),
            mode: l
                .mode
                .as_ref()
                .map_or(DEFAULT_SOCKET_MODE, |m| m.get_ref().0),
            group,
            policy: policy.name.clone(),
        });
    }
    let mut rules = Vec::new();
    for (i, r) in region.rule.iter().enumerate() {
        let r = r.get_ref();
        let key = format!("{prefix}.rule[{i}]");
        if let Some(s) = &r.socket {
            if !names.contains(s.get_ref()) {
                return Err(src.invalid(
                    s,
                    format!("{key}.socket"),
                    format!(
                        "no socket named {:?} ({MAIN_SOCKET:?} or a {prefix}.listen name)",
                        s.get_ref()
                    ),
                ));
            }
        }
        rules.push(Rule {
            socket: r.socket.as_ref().map(|s| s.get_ref().clone()),
            uid: match &r.user {
                Some(u) => Some(user_id(src, u, &format!("{key}.user"))?),
                None => None,
            },
            gid: match &r.group {
                Some(g) => Some(group_id(src, g, &format!("{key}.group"))?),
                None => None,
            },
            name: r.name.as_ref().map(|p| p.0.clone()),
            policy: lookup(&r.policy, &format!("{key}.policy"))?,
        });
    }
    Ok((
        socket_mode,
        socket_group,
        listen,
        Rules::new(rules, sockets),
    ))
}

fn build_policy(
    src: &Source<'_>,
    name: &str,
    key: &str,
    p: &Spanned<PolicyFile>,
) -> Result<Policy, ConfigError> {
    let f = p.get_ref();
    let patterns = |list: &Option<Vec<file::Pattern>>, absent: Patterns| {
        list.as_ref().map_or(absent, |l| {
            Patterns::new(l.iter().map(|p| p.0.clone()).collect())
        })
    };
    let positive = |v: &Spanned<f64>, k: &str, min: f64| -> Result<f64, ConfigError> {
        let x = *v.get_ref();
        if x.is_finite() && x >= min && x > 0.0 {
            Ok(x)
        } else {
            Err(src.invalid(
                v,
                format!("{key}.{k}"),
                format!("{x}: must be a number of at least {min} and above 0"),
            ))
        }
    };
    let rate = match (&f.max_request_rate, &f.request_burst) {
        (None, None) => None,
        (None, Some(b)) => {
            return Err(src.invalid(b, format!("{key}.request_burst"), "needs max_request_rate"))
        }
        (Some(r), burst) => {
            let per_sec = positive(r, "max_request_rate", 0.0)?;
            let burst = match burst {
                Some(b) => positive(b, "request_burst", 1.0)?,
                None => per_sec.max(1.0),
            };
            Some(Rate { per_sec, burst })
        }
    };
    Ok(Policy {
        name: name.to_string(),
        create: patterns(&f.create, Patterns::any()),
        open: patterns(&f.open, Patterns::any()),
        delete: patterns(&f.delete, Patterns::any()),
        // Deleting what another VM created is a right given explicitly (SECURITY.md).
        delete_others: patterns(&f.delete_others, Patterns::none()),
        max_bytes: f.max_bytes.map(|s| s.0),
        max_objects: f.max_objects,
        max_handles: f.max_handles,
        rate,
    })
}

fn user_id(src: &Source<'_>, o: &Spanned<Owner>, key: &str) -> Result<u32, ConfigError> {
    match o.get_ref() {
        Owner::Id(n) => Ok(*n),
        Owner::Name(n) => match ids::user(n) {
            Ok(Some(uid)) => Ok(uid),
            Ok(None) => Err(src.invalid(o, key, format!("no user {n:?} on this system"))),
            Err(e) => Err(src.invalid(o, key, format!("cannot look up user {n:?}: {e}"))),
        },
    }
}

fn group_id(src: &Source<'_>, o: &Spanned<Owner>, key: &str) -> Result<u32, ConfigError> {
    match o.get_ref() {
        Owner::Id(n) => Ok(*n),
        Owner::Name(n) => match ids::group(n) {
            Ok(Some(gid)) => Ok(gid),
            Ok(None) => Err(src.invalid(o, key, format!("no group {n:?} on this system"))),
            Err(e) => Err(src.invalid(o, key, format!("cannot look up group {n:?}: {e}"))),
        },
    }
}
