//! Per-VM access control and quotas: what a peer may create, open and delete, how much it
//! may hold, how fast it may ask. Who a peer is ([`Identity`]: the socket it connected to,
//! SO_PEERCRED, the process label), which [`Policy`] it gets ([`Rules::resolve`]), and the
//! checks the arbiter asks before it acts ([`Policy::check_create`], ...). Knows nothing of
//! files or TOML (`config/` builds [`Rules`]) nor of the region (the arbiter passes in
//! what it counted). Docs: docs/CONFIG.md, docs/SECURITY.md "Access control and quotas".

use std::fmt;
use std::sync::Arc;

use vshm_format::Status;

mod glob;
mod rate;
#[cfg(test)]
mod tests;

pub use glob::{Glob, GlobError};
pub use rate::RateLimiter;

/// Name of the built-in policy that allows everything (vshmd without `--config`).
pub const UNRESTRICTED: &str = "unrestricted";

/// The name of the listening socket given by `--socket` / `region.socket`.
pub const MAIN_SOCKET: &str = "main";
/// The socket name rules see for VMs attached through the vhost-user device (`vshmd
/// --vhost-user`, docs/VHOST-USER.md); no rule matching, they get the region's policy.
pub const VHOST_USER_SOCKET: &str = "vhost-user";

/// A set of name patterns. Unnamed objects are matched as the empty name, so only a
/// pattern like `*` covers them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Vec<Glob>);

impl Patterns {
    /// Every name (`["*"]`).
    pub fn any() -> Patterns {
        Patterns(Glob::new("*").into_iter().collect())
    }

    /// No name at all.
    pub fn none() -> Patterns {
        Patterns(Vec::new())
    }

    /// These patterns.
    pub fn new(globs: Vec<Glob>) -> Patterns {
        Patterns(globs)
    }

    /// Whether some pattern matches `name` (unnamed: `None`, matched as "").
    pub fn matches(&self, name: Option<&str>) -> bool {
        let name = name.unwrap_or("");
        self.0.iter().any(|g| g.matches(name))
    }

    /// The patterns as written, for messages.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".to_string();
        }
        let list: Vec<&str> = self.0.iter().map(Glob::as_str).collect();
        list.join(", ")
    }
}

/// A request rate: a token bucket refilled at `per_sec`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second in the long run (> 0).
    pub per_sec: f64,
    /// Requests that may come at once after a quiet spell (>= 1).
    pub burst: f64,
}

/// What a VM (or a group of them) may do. `None` limits are unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Its name in the configuration (shown in `vshmctl status`).
    pub name: String,
    /// Names it may create (CREATE of a name that does not exist).
    pub create: Patterns,
    /// Names it may open. **Advisory**: opens never reach vshmd (see SECURITY.md); vshmd
    /// only refuses a CREATE that finds the name existing, and reports holders it sees.
    pub open: Patterns,
    /// Names it may delete among the objects its own VM created.
    pub delete: Patterns,
    /// Names it may delete among objects another VM created.
    pub delete_others: Patterns,
    /// Heap bytes its VM's objects may reserve together (each max size rounded up to the
    /// heap's granularity).
    pub max_bytes: Option<u64>,
    /// Objects (sections, events, mutexes) its VM's may have at once.
    pub max_objects: Option<u64>,
    /// Handles it may hold. **Advisory**, like `open`: reported, not refused.
    pub max_handles: Option<u64>,
    /// Requests per second (UNLOCK and CANCEL are never refused: they give things back).
    pub rate: Option<Rate>,
}

impl Policy {
    /// The built-in policy: everything allowed, no limits (vshmd's behaviour without a
    /// configuration).
    pub fn unrestricted() -> Policy {
        Policy {
            name: UNRESTRICTED.to_string(),
            create: Patterns::any(),
            open: Patterns::any(),
            delete: Patterns::any(),
            delete_others: Patterns::any(),
            max_bytes: None,
            max_objects: None,
            max_handles: None,
            rate: None,
        }
    }

    /// Whether a CREATE of `name` reserving `reserved` heap bytes may go ahead, given what
    /// the requester's VM holds already.
    pub fn check_create(
        &self,
        name: Option<&str>,
        reserved: u64,
        usage: Usage,
    ) -> Result<(), Denial> {
        if !self.create.matches(name) {
            return Err(self.not_allowed(Right::Create, name));
        }
        if let Some(limit) = self.max_objects {
            if usage.objects >= limit {
                return Err(Denial::Quota {
                    policy: self.name.clone(),
                    what: Quota::Objects,
                    limit,
                    used: usage.objects,
                    wanted: 1,
                });
            }
        }
        if let Some(limit) = self.max_bytes {
            if usage.bytes.saturating_add(reserved) > limit {
                return Err(Denial::Quota {
                    policy: self.name.clone(),
                    what: Quota::Bytes,
                    limit,
                    used: usage.bytes,
                    wanted: reserved,
                });
            }
        }
        Ok(())
    }

    /// Whether `name` may be opened (advisory: see [`Policy::open`]).
    pub fn check_open(&self, name: Option<&str>) -> Result<(), Denial> {
        if self.open.matches(name) {
            Ok(())
        } else {
            Err(self.not_allowed(Right::Open, name))
        }
    }

    /// Whether `name` may be deleted; `own`: the requester's VM created it.
    pub fn check_delete(&self, name: Option<&str>, own: bool) -> Result<(), Denial> {
        let (patterns, right) = if own {
            (&self.delete, Right::Delete)
        } else {
            (&self.delete_others, Right::DeleteOthers)
        };
        if patterns.matches(name) {
            Ok(())
        } else {
            Err(self.not_allowed(right, name))
        }
    }

    fn not_allowed(&self, right: Right, name: Option<&str>) -> Denial {
        Denial::NotAllowed {
            policy: self.name.clone(),
            right,
            name: name.map(str::to_owned),
            patterns: self.patterns(right).describe(),
        }
    }

    fn patterns(&self, right: Right) -> &Patterns {
        match right {
            Right::Create => &self.create,
            Right::Open => &self.open,
            Right::Delete => &self.delete,
            Right::DeleteOthers => &self.delete_others,
        }
    }
}

/// What a VM's objects take up now (counted by the arbiter from its records).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Heap bytes reserved.
    pub bytes: u64,
    /// Objects alive (LIVE, or deleted but still held).
    pub objects: u64,
}

/// A right a pattern list grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// `create`.
    Create,
    /// `open`.
    Open,
    /// `delete`.
    Delete,
    /// `delete_others`.
    DeleteOthers,
}

impl Right {
    /// The configuration key.
    pub fn key(self) -> &'static str {
        match self {
            Right::Create => "create",
            Right::Open => "open",
            Right::Delete => "delete",
            Right::DeleteOthers => "delete_others",
        }
    }
}

/// A limit a quota denial hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `max_bytes`.
    Bytes,
    /// `max_objects`.
    Objects,
}

/// Why a policy refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Denial {
    /// The name matches none of the patterns of the right needed (ACCESS_DENIED).
    #[error("{} is outside policy {policy:?}'s {} patterns ({patterns})", show(name.as_deref()), right.key())]
    NotAllowed {
        /// The policy.
        policy: String,
        /// The right that was needed.
        right: Right,
        /// The object's name (`None`: unnamed).
        name: Option<String>,
        /// The patterns that did not match.
        patterns: String,
    },
    /// A quota would be exceeded (QUOTA_EXCEEDED).
    #[error("{}", quota_text(policy, *what, *limit, *used, *wanted))]
    Quota {
        /// The policy.
        policy: String,
        /// Which quota.
        what: Quota,
        /// Its limit.
        limit: u64,
        /// What the VM uses now.
        used: u64,
        /// What the request adds.
        wanted: u64,
    },
    /// More requests than the policy's rate allows (QUOTA_EXCEEDED).
    #[error("policy {policy:?} allows {per_sec} requests/s (burst {burst}): request refused")]
    Rate {
        /// The policy.
        policy: String,
        /// Its rate.
        per_sec: f64,
        /// Its burst.
        burst: f64,
    },
}

fn show(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{n:?}"),
        None => "<unnamed>".to_string(),
    }
}

fn quota_text(policy: &str, what: Quota, limit: u64, used: u64, wanted: u64) -> String {
    match what {
        Quota::Bytes => format!(
            "policy {policy:?} max_bytes {limit}: {used} bytes reserved, {wanted} more wanted"
        ),
        Quota::Objects => format!("policy {policy:?} max_objects {limit}: {used} objects exist"),
    }
}

impl Denial {
    /// The status the requester gets.
    pub fn status(&self) -> Status {
        match self {
            Denial::NotAllowed { .. } => Status::AccessDenied,
            Denial::Quota { .. } | Denial::Rate { .. } => Status::QuotaExceeded,
        }
    }
}

/// Who a connecting peer is: what vshmd can know about the process at the other end.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The name of the listening socket it connected to ([`MAIN_SOCKET`] or a `listen`
    /// entry's name).
    pub socket: String,
    /// SO_PEERCRED uid.
    pub uid: Option<u32>,
    /// SO_PEERCRED gid.
    pub gid: Option<u32>,
    /// QEMU's `-name guest=` (or `-name X`), else the process name (/proc/PID/comm).
    pub label: Option<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        write!(
            f,
            "socket {} uid {} gid {} name {}",
            self.socket,
            opt(self.uid),
            opt(self.gid),
            self.label.as_deref().unwrap_or("?")
        )
    }
}

/// One rule: a peer whose identity has every value given here gets `policy`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The listening socket's name.
    pub socket: Option<String>,
    /// uid.
    pub uid: Option<u32>,
    /// gid.
    pub gid: Option<u32>,
    /// A pattern for the label.
    pub name: Option<Glob>,
    /// The policy it gets.
    pub policy: Arc<Policy>,
}

impl Rule {
    fn matches(&self, id: &Identity) -> bool {
        self.socket.as_ref().is_none_or(|s| *s == id.socket)
            && self.uid.is_none_or(|u| id.uid == Some(u))
            && self.gid.is_none_or(|g| id.gid == Some(g))
            && self
                .name
                .as_ref()
                .is_none_or(|g| id.label.as_deref().is_some_and(|l| g.matches(l)))
    }
}

/// What a peer got: its policy, and the account its objects and requests count against.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The policy.
    pub policy: Arc<Policy>,
    /// The VM it counts as (shared by every connection with the same identity: a VM that
    /// reconnects finds its objects still counted, and its request budget unchanged).
    pub account: Arc<Identity>,
}

impl Grant {
    /// The grant of a peer nothing is known about: unrestricted (the arbiter without a
    /// configuration, and its unit tests).
    pub fn unrestricted(socket: &str) -> Grant {
        Grant {
            policy: Arc::new(Policy::unrestricted()),
            account: Arc::new(Identity {
                socket: socket.to_string(),
                uid: None,
                gid: None,
                label: None,
            }),
        }
    }
}

/// Which policy each peer gets: the first rule whose values all match, else the policy of
/// the socket it connected to.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    /// (socket name, its policy).
    sockets: Vec<(String, Arc<Policy>)>,
    /// For a socket without one (cannot happen through `config/`; defensive).
    fallback: Arc<Policy>,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::unrestricted()
    }
}

impl Rules {
    /// Everyone unrestricted: vshmd without a configuration.
    pub fn unrestricted() -> Rules {
        Rules {
            rules: Vec::new(),
            sockets: Vec::new(),
            fallback: Arc::new(Policy::unrestricted()),
        }
    }

    /// Rules in order, and each socket's policy.
    pub fn new(rules: Vec<Rule>, sockets: Vec<(String, Arc<Policy>)>) -> Rules {
        Rules {
            rules,
            sockets,
            fallback: Arc::new(Policy::unrestricted()),
        }
    }

    /// The grant for a peer with identity `id`.
    pub fn resolve(&self, id: &Identity) -> Grant {
        let policy = self
            .rules
            .iter()
            .find(|r| r.matches(id))
            .map(|r| r.policy.clone())
            .or_else(|| {
                self.sockets
                    .iter()
                    .find(|(s, _)| *s == id.socket)
                    .map(|(_, p)| p.clone())
            })
            .unwrap_or_else(|| self.fallback.clone());
        Grant {
            policy,
            account: Arc::new(id.clone()),
        }
    }
}
