//! Surviving a crash of vshmd under systemd (docs/OPERATIONS.md, "Crash restart").
//!
//! QEMU cannot reconnect to a restarted ivshmem server, so what a region cannot be rebuilt
//! without — the memfd, the listening sockets, every client's connection and eventfds —
//! lives in systemd's file-descriptor store as well as in vshmd (`sd_notify` `FDSTORE=1`,
//! each fd under a name that stays the same for the same file: [`FdTable`]). Beside them
//! sits a journal of the region's private state (the very state a takeover hands over) in
//! two memfds written in turn, each whole or marked invalid, so a kill at any moment leaves
//! at least one whole. When vshmd dies, systemd keeps the fds; when it starts vshmd again it
//! passes them back (`LISTEN_FDS`, `LISTEN_FDNAMES`), and vshmd rebuilds the region from the
//! newest whole journal as if it had been handed over ([`recover`]).
//!
//! The journal is written after each event the region's loop handled, so it can lag the
//! published header by the effects of one event; `crate::arbiter` reconciles what the
//! header shows beyond it (`Arbiter::adopt_ahead`). Nothing here knows what the state means.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::handoff::{FdTable, Received};
use crate::notify::{Notifier, NotifyError};

/// The journal's magic (bytes 0..8).
const MAGIC: &[u8; 8] = b"VSHMJRNL";
/// Its layout version (bytes 8..12).
const VERSION: u32 = 1;
/// Header bytes before the payload: magic, version, 4 reserved, seq u64 (0: being
/// written), names length u64, state length u64, FNV-1a 64 of the payload, reserved.
const HEADER: u64 = HEADER_BYTES as u64;
/// [`HEADER`] as an array length.
const HEADER_BYTES: usize = 64;
/// Largest payload read back (a region's state is far smaller; a guard against garbage).
const MAX_PAYLOAD: u64 = 1 << 30;
/// The names of the two journals in the store (after the region's prefix).
const JOURNALS: [&str; 2] = ["journal.0", "journal.1"];

/// Why the fd store or the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    /// A journal memfd could not be made.
    #[error("cannot create the journal memfd: {0}")]
    Memfd(io::Error),
    /// Writing the journal failed.
    #[error("cannot write the journal: {0}")]
    Write(io::Error),
    /// Talking to systemd failed.
    #[error(transparent)]
    Notify(NotifyError),
    /// The service manager's socket is full (it is not reading now): try again later.
    #[error("the service manager is not reading its notify socket now")]
    Busy,
    /// `LISTEN_FDS` or `LISTEN_FDNAMES` do not parse.
    #[error("{var}={value:?}: {why}")]
    ListenFds {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The stored fds hold a journal, but no whole one.
    #[error("region {region}: the journals systemd kept are not whole ({why}); stop the unit to start the region afresh")]
    NoWholeJournal {
        /// The region.
        region: String,
        /// What the newest one lacked.
        why: String,
    },
}

/// The prefix of a region's names in the store: `<region>/`. Region names never hold a
/// `/` (`config`: letters, digits, `-_.`), so no region's prefix is another's (`vm` and
/// `vm.b` would be with a dot).
fn region_prefix(region: &str) -> String {
    format!("{region}/")
}

impl From<NotifyError> for FdStoreError {
    fn from(e: NotifyError) -> Self {
        if e.would_block() {
            FdStoreError::Busy
        } else {
            FdStoreError::Notify(e)
        }
    }
}

/// A name as the store takes it: printable ASCII without `:` (sd_pid_notify_with_fds(3));
/// anything else becomes `_`. Region and listener names are already plain.
fn store_name(prefix: &str, name: &str) -> String {
    let mut s: String = format!("{prefix}{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(255);
    s
}

/// FNV-1a, 64 bits: enough to tell a whole journal from a torn one (not an adversary:
/// only vshmd and systemd hold the memfds).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn memfd(name: &str) -> Result<File, FdStoreError> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| FdStoreError::Memfd(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: a valid NUL-terminated name and flags; the fd returned is new and ours.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FdStoreError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nobody else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Writes one journal: invalidates it, writes the payload, then the header that makes it
/// whole. A kill between leaves it invalid (the other journal is the whole one).
fn write_journal(file: &File, seq: u64, names: &[u8], state: &[u8]) -> io::Result<()> {
    file.write_all_at(&[0u8; 8], 16)?;
    let len = HEADER + names.len() as u64 + state.len() as u64;
    if file.metadata()?.len() < len {
        file.set_len(len)?;
    }
    file.write_all_at(names, HEADER)?;
    file.write_all_at(state, HEADER + names.len() as u64)?;
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[24..32].copy_from_slice(&(names.len() as u64).to_le_bytes());
    h[32..40].copy_from_slice(&(state.len() as u64).to_le_bytes());
    h[40..48].copy_from_slice(&fnv1a(&[names, state]).to_le_bytes());
    // The sequence number last: until it is there the journal reads as being written.
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    file.write_all_at(&h[..16], 0)?;
    file.write_all_at(&h[24..], 24)?;
    file.write_all_at(&h[16..24], 16)
}

/// A whole journal: its sequence number, fd names and state.
#[derive(Debug)]
struct Journal {
    seq: u64,
    names: Vec<String>,
    state: Vec<u8>,
}

/// Reads a journal back; why it is not whole otherwise.
fn read_journal(file: &File) -> Result<Journal, String> {
    let mut h = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| format!("header: {e}"))?;
    let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
    if &h[..8] != MAGIC {
        return Err("no journal magic".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4]));
    if version != VERSION {
        return Err(format!(
            "journal version {version}, this vshmd reads {VERSION}"
        ));
    }
    let (seq, names_len, state_len, sum) = (word(16), word(24), word(32), word(40));
    if seq == 0 {
        return Err("it was being written".into());
    }
    if names_len > MAX_PAYLOAD || state_len > MAX_PAYLOAD {
        return Err(format!("lengths {names_len} and {state_len}"));
    }
    let read = |at: u64, len: u64| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; usize::try_from(len).map_err(|_| "too long".to_string())?];
        file.read_exact_at(&mut b, at)
            .map_err(|e| format!("payload: {e}"))?;
        Ok(b)
    };
    let names = read(HEADER, names_len)?;
    let state = read(HEADER + names_len, state_len)?;
    if fnv1a(&[&names, &state]) != sum {
        return Err("its checksum does not match".into());
    }
    let names: Vec<String> =
        serde_json::from_slice(&names).map_err(|e| format!("fd names: {e}"))?;
    Ok(Journal { seq, names, state })
}

/// One region's fds in systemd's store and its journal.
#[derive(Debug)]
pub struct FdStore {
    notifier: &'static Notifier,
    /// `<region>/`: several regions share one store.
    prefix: String,
    /// Names (without the prefix) stored and not removed.
    stored: BTreeSet<String>,
    journals: [File; 2],
    /// The journal the next write goes to.
    next: usize,
    seq: u64,
}

impl FdStore {
    /// A store for `region` with two fresh journals, both stored already.
    pub fn new(notifier: &'static Notifier, region: &str) -> Result<FdStore, FdStoreError> {
        let journals = [memfd("vshm-journal")?, memfd("vshm-journal")?];
        let mut store = FdStore {
            notifier,
            prefix: region_prefix(region),
            stored: BTreeSet::new(),
            journals,
            next: 0,
            seq: 0,
        };
        for (i, name) in JOURNALS.iter().enumerate() {
            let fd = store.journals[i].as_raw_fd();
            // A busy service manager: the first record stores them.
            match store.add(name, fd) {
                Ok(()) | Err(FdStoreError::Busy) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(store)
    }

    fn add(&mut self, name: &str, fd: std::os::fd::RawFd) -> Result<(), FdStoreError> {
        let full = store_name(&self.prefix, name);
        self.notifier
            .try_send_with_fds(&format!("FDSTORE=1\nFDNAME={full}"), &[fd])?;
        self.stored.insert(name.to_owned());
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), FdStoreError> {
        let full = store_name(&self.prefix, name);
        self.notifier
            .try_send(&format!("FDSTOREREMOVE=1\nFDNAME={full}"))?;
        self.stored.remove(name);
        Ok(())
    }

    /// Records the region's state: stores the fds in `table` not stored yet, writes the
    /// journal (naming them), then removes the stored fds it no longer names. Returns
    /// whether every fd is stored: a busy service manager (its socket full) leaves some for
    /// the next call, and the journal is written all the same — a client whose fds are
    /// missing at a recovery is cut off, which is right for one that was never told it
    /// is attached (its handshake waits for `true`).
    pub fn record(&mut self, table: &FdTable, state: &[u8]) -> Result<bool, FdStoreError> {
        let mut complete = true;
        for (i, name) in JOURNALS.iter().enumerate() {
            if !self.stored.contains(*name) {
                let fd = self.journals[i].as_raw_fd();
                match self.add(name, fd) {
                    Ok(()) => {}
                    Err(FdStoreError::Busy) => complete = false,
                    Err(e) => return Err(e),
                }
            }
        }
        let new: Vec<(std::os::fd::RawFd, String)> = table
            .named()
            .filter(|(_, n)| !self.stored.contains(*n))
            .map(|(fd, n)| (fd, n.to_owned()))
            .collect();
        for (fd, name) in new {
            if !complete {
                break;
            }
            match self.add(&name, fd) {
                Ok(()) => {}
                Err(FdStoreError::Busy) => complete = false,
                Err(e) => return Err(e),
            }
        }
        let names = serde_json::to_vec(table.names())
            .map_err(|e| FdStoreError::Write(io::Error::other(e)))?;
        self.seq += 1;
        write_journal(&self.journals[self.next], self.seq, &names, state)
            .map_err(FdStoreError::Write)?;
        self.next ^= 1;
        let named: BTreeSet<&str> = table.names().iter().map(String::as_str).collect();
        let gone: Vec<String> = self
            .stored
            .iter()
            .filter(|n| !named.contains(n.as_str()) && !JOURNALS.contains(&n.as_str()))
            .cloned()
            .collect();
        // A removal that must wait is sent after a later journal: the name stays unused.
        for name in gone {
            match self.remove(&name) {
                Ok(()) | Err(FdStoreError::Busy) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(complete)
    }

    /// How many fds are stored (journals included).
    pub fn stored(&self) -> usize {
        self.stored.len()
    }
}

/// The fds systemd passed at start (`LISTEN_FDS`, `LISTEN_FDNAMES`; sd_listen_fds(3)), by
/// name. Empty when they were not meant for this process.
#[derive(Debug, Default)]
pub struct ListenFds {
    fds: BTreeMap<String, Vec<OwnedFd>>,
}

/// The first fd systemd passes.
const LISTEN_FDS_START: i32 = 3;

impl ListenFds {
    /// Takes the passed fds (marking them close-on-exec) and unsets the variables, so
    /// nothing this process starts takes them for its own.
    pub fn from_env() -> Result<ListenFds, FdStoreError> {
        let var = |k: &str| std::env::var(k).ok();
        let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        let (Some(pid), Some(count)) = (pid, count) else {
            return Ok(ListenFds::default());
        };
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(ListenFds::default());
        }
        let n: i32 = count.trim().parse().map_err(|_| FdStoreError::ListenFds {
            var: "LISTEN_FDS",
            value: count.clone(),
            why: "not a number",
        })?;
        if !(0..=65536).contains(&n) {
            return Err(FdStoreError::ListenFds {
                var: "LISTEN_FDS",
                value: count,
                why: "out of range",
            });
        }
        let names: Vec<String> = match names {
            Some(v) if !v.is_empty() => v.split(':').map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        if names.len() != n as usize {
            return Err(FdStoreError::ListenFds {
                var: "LISTEN_FDNAMES",
                value: names.join(":"),
                why: "names a different number of fds than LISTEN_FDS",
            });
        }
        let mut fds: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for (raw, name) in (LISTEN_FDS_START..).zip(names) {
            // SAFETY: systemd passed fds LISTEN_FDS_START.. to this process (LISTEN_PID
            // says so); each is taken exactly once, here.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: fcntl on an fd we own, integer arguments.
            unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
            fds.entry(name).or_default().push(fd);
        }
        Ok(ListenFds { fds })
    }

    /// Whether no fd was passed.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Takes `region`'s fds out, by their names without the region's prefix (one fd per
    /// name; extra fds under one name are closed and reported).
    fn take_region(&mut self, region: &str) -> BTreeMap<String, OwnedFd> {
        let prefix = region_prefix(region);
        let keys: Vec<String> = self
            .fds
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        let mut out = BTreeMap::new();
        for k in keys {
            let mut v = self.fds.remove(&k).unwrap_or_default();
            if v.len() > 1 {
                tracing::warn!(name = %k, count = v.len(), "several stored fds share one name; keeping the first");
            }
            if !v.is_empty() {
                out.insert(k[prefix.len()..].to_owned(), v.swap_remove(0));
            }
        }
        out
    }

    /// The names of fds no region took (regions no longer configured), which the caller
    /// closes; `notifier` removes them from the store.
    pub fn discard_rest(self, notifier: Option<&Notifier>) -> Vec<String> {
        let names: Vec<String> = self.fds.into_keys().collect();
        if let Some(n) = notifier {
            for name in &names {
                let _ = n.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
            }
        }
        names
    }
}

/// A region found in the store: its state (the journal's), the fds it names by index, and
/// the store to go on with.
#[derive(Debug)]
pub struct Recovered {
    /// The journal's state, as written.
    pub state: Vec<u8>,
    /// The fds it names, by index (`None`: not passed back — a client connection systemd
    /// dropped when its client hung up).
    pub fds: Received,
    /// The store, continuing the journal.
    pub store: FdStore,
    /// Names the journal has that were not passed back.
    pub missing: Vec<String>,
    /// Stored fds the journal did not name (stored after its last write): removed from the
    /// store and closed, except client connections (`reconnect`).
    pub unnamed: Vec<String>,
    /// Client connections accepted after the journal's last write: their clients were told
    /// nothing yet (the handshake waits for the journal), so they can be admitted anew.
    pub reconnect: Vec<OwnedFd>,
    /// The journal's sequence number.
    pub seq: u64,
}

/// Finds `region` among the passed fds: `Ok(None)` if it has no journal there (a fresh
/// start). Takes the region's fds out of `listen` either way.
pub fn recover(
    notifier: &'static Notifier,
    region: &str,
    listen: &mut ListenFds,
) -> Result<Option<Recovered>, FdStoreError> {
    let mut fds = listen.take_region(region);
    let journals: Vec<Option<File>> = JOURNALS
        .iter()
        .map(|n| fds.remove(*n).map(File::from))
        .collect();
    if journals.iter().all(Option::is_none) {
        if !fds.is_empty() {
            tracing::warn!(
                region,
                count = fds.len(),
                "stored fds without a journal: closed"
            );
            // Plain removals: a store made here would store journals of its own under the
            // names the region's real ones take next.
            let prefix = region_prefix(region);
            for name in fds.keys() {
                let full = store_name(&prefix, name);
                let _ = notifier.send(&format!("FDSTOREREMOVE=1\nFDNAME={full}"));
            }
        }
        return Ok(None);
    }
    let mut best: Option<(usize, Journal)> = None;
    let mut why = Vec::new();
    for (i, f) in journals.iter().enumerate() {
        let Some(f) = f else {
            why.push(format!("{} missing", JOURNALS[i]));
            continue;
        };
        match read_journal(f) {
            Ok(j) if best.as_ref().is_none_or(|(_, b)| j.seq > b.seq) => best = Some((i, j)),
            Ok(_) => {}
            Err(e) => why.push(format!("{}: {e}", JOURNALS[i])),
        }
    }
    let Some((newest, journal)) = best else {
        return Err(FdStoreError::NoWholeJournal {
            region: region.to_owned(),
            why: why.join("; "),
        });
    };
    let mut files = journals.into_iter();
    let mut take = || match files.next().flatten() {
        Some(f) => Ok((f, true)),
        None => memfd("vshm-journal").map(|f| (f, false)),
    };
    let (j0, j0_stored) = take()?;
    let (j1, j1_stored) = take()?;
    let mut store = FdStore {
        notifier,
        prefix: region_prefix(region),
        stored: BTreeSet::new(),
        journals: [j0, j1],
        next: newest ^ 1,
        seq: journal.seq,
    };
    for (i, was) in [j0_stored, j1_stored].into_iter().enumerate() {
        if was {
            store.stored.insert(JOURNALS[i].to_owned());
        } else {
            let fd = store.journals[i].as_raw_fd();
            store.add(JOURNALS[i], fd)?;
        }
    }
    let mut missing = Vec::new();
    let mut by_index = Vec::with_capacity(journal.names.len());
    for name in &journal.names {
        // The store holds each name once: an fd named twice in the state was one fd.
        let fd = fds.remove(&store_name("", name));
        if fd.is_some() {
            store.stored.insert(name.clone());
        } else if !store.stored.contains(name) {
            missing.push(name.clone());
        }
        by_index.push(fd);
    }
    let mut reconnect = Vec::new();
    let mut unnamed = Vec::new();
    for (name, fd) in fds {
        if name.starts_with("conn.") {
            reconnect.push(fd);
        }
        unnamed.push(name);
    }
    for name in &unnamed {
        store.remove(name)?;
    }
    Ok(Some(Recovered {
        state: journal.state,
        fds: Received::recovered(by_index),
        store,
        missing,
        unnamed,
        reconnect,
        seq: journal.seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_torn_at_any_byte_is_never_taken_for_whole_and_the_other_one_is() {
        let older = memfd("t").expect("memfd");
        write_journal(&older, 1, b"[\"a\"]", b"{\"old\":1}").expect("write");
        let j = read_journal(&older).expect("whole");
        assert_eq!(
            (j.seq, j.names, j.state),
            (1, vec!["a".to_string()], b"{\"old\":1}".to_vec())
        );
        // The newer one killed part way: invalidated first, so it never reads as whole.
        let newer = memfd("t").expect("memfd");
        write_journal(&newer, 2, b"[]", b"{}").expect("write");
        newer.write_all_at(&[0u8; 8], 16).expect("invalidate");
        newer.write_all_at(b"{\"half", HEADER + 2).expect("half");
        assert!(
            read_journal(&newer).is_err(),
            "a journal being written is not whole"
        );
        // Payload bytes changed under a whole header: the checksum says so.
        write_journal(&newer, 2, b"[]", b"{\"x\":1}").expect("write");
        newer.write_all_at(b"2", HEADER + 7).expect("flip");
        let e = read_journal(&newer).expect_err("torn");
        assert!(e.contains("checksum"), "{e}");
    }

    /// Plays systemd's store for a unit test: what the notifier sent, in order (FDSTORE=1
    /// appends, FDSTOREREMOVE=1 drops every fd of the name).
    fn drain(socket: &std::os::unix::net::UnixDatagram, store: &mut Vec<(String, OwnedFd)>) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        socket.set_nonblocking(true).expect("nonblocking");
        loop {
            let mut buf = [0u8; 4096];
            let mut fds = [-1; 8];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at `buf`, live and of its length; `fds` has room.
            let Ok((n, got)) = (unsafe { socket.recv_with_fds(&mut iov, &mut fds) }) else {
                return;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_owned();
            // SAFETY: the kernel just installed these fds for this process.
            let received = fds[..got]
                .iter()
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
            if text.lines().any(|l| l == "FDSTORE=1") {
                store.extend(received.map(|fd| (name.clone(), fd)));
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                store.retain(|(n, _)| *n != name);
            }
        }
    }

    /// Found by an attack: a restart that finds a region's fds in the store but no journal takes the
    /// `recover` branch that "removes" them through a throw-away `FdStore::new`, which
    /// stores two fresh, never-written journals under `<region>/journal.0/1`; `start_kept`
    /// then stores the real ones under the same names. At the next crash `take_region`
    /// keeps the first fd of each name (the empty ones): no whole journal, vshmd refuses
    /// to start, systemd restarts it in a loop.
    #[test]
    fn stray_fds_without_a_journal_do_not_poison_the_next_recovery() {
        let dir = std::env::temp_dir().join(format!("vshm-fdstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify");
        let systemd = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let notifier: &'static Notifier = Box::leak(Box::new(
            Notifier::new(path.to_str().expect("utf-8")).expect("notifier"),
        ));
        let mut store: Vec<(String, OwnedFd)> = Vec::new();
        // Start 1: the store holds a stray fd of region r and no journal.
        let stray = OwnedFd::from(memfd("stray").expect("memfd"));
        let mut listen = ListenFds::default();
        listen.fds.insert("r/memfd".into(), vec![stray]);
        assert!(recover(notifier, "r", &mut listen)
            .expect("recover")
            .is_none());
        // As start_kept goes on: a fresh region, stored with its first journal.
        let region_memfd = memfd("region").expect("memfd");
        let mut fresh = FdStore::new(notifier, "r").expect("store");
        let mut table = FdTable::default();
        table.add(&region_memfd, || "memfd".into());
        fresh.record(&table, b"{\"state\":1}").expect("journal");
        drain(&systemd, &mut store);
        // Start 2, after a crash: systemd passes back what it holds.
        let mut again = ListenFds::default();
        for (name, fd) in store.drain(..) {
            again.fds.entry(name).or_default().push(fd);
        }
        let found = recover(notifier, "r", &mut again);
        let _ = std::fs::remove_dir_all(&dir);
        match found {
            Ok(Some(r)) => assert_eq!(r.state, b"{\"state\":1}".to_vec()),
            other => panic!("the region's own journal was not found: {other:?}"),
        }
    }

    #[test]
    fn names_the_store_would_refuse_are_made_plain() {
        assert_eq!(store_name("r/", "listen.a:b c"), "r/listen.a_b_c");
        assert_eq!(store_name("", &"x".repeat(300)).len(), 255);
    }
}
