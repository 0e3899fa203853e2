//! `vshmctl inspect` against a real vshmd: its memfd read straight from /proc/PID/fd/N, and
//! corrupted copies of it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vshm_format::layout::{holder_bit, Layout, ObjectEntry, Superblock, OBJ_LEASE_OFF};
use vshm_format::shm::{bytes_of_mut, zeroed};
use vshm_monitor::inspect::{inspect, Report, Severity};
use vshm_tests::{bin, command, release, stderr, stdout, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

/// vshmd's region memfd, the way an operator finds it: /proc/PID/fd/N → "/memfd:vshm".
fn memfd_path(b: &Backend) -> PathBuf {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", b.pid())).expect("proc fd dir");
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:vshm") {
            return fd.path();
        }
    }
    panic!("vshmd has no memfd:vshm open");
}

/// Three sections: "alpha" (persistent, 64 KiB, held by one peer), "beta" (persistent,
/// 8 KiB, unheld) and "gamma" (non-persistent, 16 KiB, held by its creator). Returns the
/// two holder processes.
fn populate(b: &Backend) -> Vec<std::process::Child> {
    for (name, max) in [("alpha", "64K"), ("beta", "8K")] {
        let out = b.vshm(&["create", name, "--max", max, "--persistent"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    vec![
        b.vshm_holding(&["hold", "alpha"]),
        b.vshm_holding(&["create", "gamma", "--max", "16K", "--hold"]),
    ]
}

fn slot_of(status: &Value, name: &str) -> u32 {
    status["sections"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .and_then(|s| s["slot"].as_u64())
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or_else(|| panic!("no section {name} in {status}"))
}

fn errors_at<'a>(report: &'a Report, where_: &str) -> Vec<&'a str> {
    report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && f.where_ == where_)
        .map(|f| f.what.as_str())
        .collect()
}

/// The region layout, from a copy's superblock.
fn layout_of(bytes: &[u8]) -> Layout {
    let mut sb = zeroed::<Superblock>();
    bytes_of_mut(&mut sb).copy_from_slice(&bytes[..size_of::<Superblock>()]);
    Layout::from_superblock(&sb, bytes.len() as u64).expect("copy has a valid superblock")
}

fn put_u64(bytes: &mut [u8], at: u64, v: u64) {
    let at = usize::try_from(at).expect("offset");
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(bytes: &[u8], at: u64) -> u64 {
    let at = usize::try_from(at).expect("offset");
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[test]
fn a_live_region_read_from_proc_inspects_clean_and_matches_vshmctl_status() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let holders = populate(&b);
        let status = b.status();
        let report = inspect(&memfd_path(&b)).expect("inspect the live memfd");

        assert!(report.ok, "{:#?}", report.findings);
        let unexpected: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.severity != Severity::Note)
            .collect();
        assert!(unexpected.is_empty(), "{unexpected:#?}");
        let sb = report.superblock.as_ref().expect("superblock");
        assert!(sb.valid && sb.magic_ok);
        assert_eq!(sb.region_size, 16 << 20);
        assert_eq!(Some(sb.epoch), status["region"]["epoch"].as_u64());
        assert_eq!(
            Some(u64::from(sb.max_peers)),
            status["region"]["max_peers"].as_u64()
        );

        // Peers: the two holders, same ids in the same slots as vshmd's own records.
        let mut want_peers: Vec<(u64, u64)> = status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter(|p| p["connected"] == true)
            .map(|p| {
                (
                    p["slot"].as_u64().expect("slot"),
                    p["id"].as_u64().expect("id"),
                )
            })
            .collect();
        want_peers.sort_unstable();
        let got_peers: Vec<(u64, u64)> = report
            .peers
            .iter()
            .map(|p| (u64::from(p.slot), u64::from(p.id)))
            .collect();
        assert_eq!(got_peers, want_peers);
        assert_eq!(got_peers.len(), 2);

        // Objects: every section vshmd lists, with its name, sizes and holders.
        let sections = status["sections"].as_array().expect("sections");
        assert_eq!(report.objects.len(), sections.len());
        for s in sections {
            let slot = s["slot"].as_u64().expect("slot");
            let o = report
                .objects
                .iter()
                .find(|o| u64::from(o.slot) == slot)
                .unwrap_or_else(|| panic!("slot {slot} missing from {:#?}", report.objects));
            assert_eq!(o.name.as_deref(), s["name"].as_str());
            assert_eq!(Some(o.size), s["size"].as_u64());
            assert_eq!(Some(o.max_size), s["max_size"].as_u64());
            assert_eq!(Some(o.offset), s["offset"].as_u64());
            assert_eq!(Some(o.generation), s["generation"].as_u64());
            assert_eq!(Some(o.persistent), s["persistent"].as_bool());
            assert_eq!(o.state, "LIVE");
            let want_refs: Vec<(u64, u64)> = s["refs_by_peer"]
                .as_array()
                .expect("refs_by_peer")
                .iter()
                .map(|p| (p[0].as_u64().expect("id"), p[1].as_u64().expect("n")))
                .collect();
            let got_refs: Vec<(u64, u64)> = o
                .refs_by_peer
                .iter()
                .map(|&(id, n)| (u64::from(id), u64::from(n)))
                .collect();
            assert_eq!(got_refs, want_refs, "{}", o.slot);
            let holder_ids: Vec<u64> = want_refs.iter().map(|x| x.0).collect();
            let got_holders: Vec<u64> = o.holders.iter().map(|&id| u64::from(id)).collect();
            assert_eq!(got_holders, holder_ids, "holder bits of slot {}", o.slot);
        }
        let by_name = |n: &str| {
            report
                .objects
                .iter()
                .find(|o| o.name.as_deref() == Some(n))
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(by_name("alpha").max_size, 64 << 10);
        assert_eq!(by_name("alpha").holders.len(), 1);
        assert!(by_name("alpha").keep && by_name("beta").keep);
        assert!(by_name("beta").holders.is_empty());
        assert_eq!(by_name("gamma").max_size, 16 << 10);
        assert_eq!(by_name("gamma").holders.len(), 1);
        assert_ne!(by_name("alpha").holders, by_name("gamma").holders);
        let heap = report.heap.as_ref().expect("heap");
        assert_eq!(heap.reserved, (64 + 8 + 16) << 10);
        assert_eq!(Some(heap.reserved), status["region"]["used"].as_u64());
        for h in holders {
            release(h);
        }
    });
}

#[test]
fn corrupted_copies_of_a_live_region_report_each_corruption_at_its_slot() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let holders = populate(&b);
        let status = b.status();
        let (alpha, beta, gamma) = (
            slot_of(&status, "alpha"),
            slot_of(&status, "beta"),
            slot_of(&status, "gamma"),
        );
        let original = std::fs::read(memfd_path(&b)).expect("copy the memfd");
        let layout = layout_of(&original);
        let connected: Vec<u64> = status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter(|p| p["connected"] == true)
            .filter_map(|p| p["slot"].as_u64())
            .collect();
        let absent = (0..layout.max_peers)
            .rev()
            .find(|s| !connected.contains(&u64::from(*s)))
            .expect("a free peer slot");
        let entry = |slot: u32| {
            layout
                .object_entry(vshm_format::ObjectSlot(slot))
                .expect("object slot")
        };

        let mut bytes = original.clone();
        // alpha's memory "moves" past the end of the heap.
        put_u64(
            &mut bytes,
            entry(alpha) + std::mem::offset_of!(ObjectEntry, offset) as u64,
            layout.region_size,
        );
        // beta's name gets a backslash.
        let name_at = usize::try_from(name_of(&bytes, &layout, beta)).expect("offset");
        bytes[name_at] = b'\\';
        // gamma's lease word claims a holder in a slot nobody is connected to.
        let lease_at = entry(gamma) + OBJ_LEASE_OFF;
        let w = get_u64(&bytes, lease_at);
        put_u64(
            &mut bytes,
            lease_at,
            w | holder_bit(vshm_format::PeerSlot(absent)),
        );

        let dir = TempDir::new("inspect");
        let corrupt = dir.path().join("corrupt.region");
        std::fs::write(&corrupt, &bytes).expect("write copy");
        let report = inspect(&corrupt).expect("inspect the copy");
        assert!(!report.ok);
        let at = |s: u32| format!("object slot {s}");
        let alpha_errors = errors_at(&report, &at(alpha));
        assert!(
            alpha_errors
                .iter()
                .any(|e| e.contains("BadRange") && e.contains("beyond the heap")),
            "{:#?}",
            report.findings
        );
        let beta_errors = errors_at(&report, &at(beta));
        assert!(
            beta_errors
                .iter()
                .any(|e| e.contains("BadName") && e.contains("backslash")),
            "{:#?}",
            report.findings
        );
        let gamma_errors = errors_at(&report, &at(gamma));
        assert!(
            gamma_errors
                .iter()
                .any(|e| e.contains(&format!("holder bits of peer slots {absent} where no peer"))),
            "{:#?}",
            report.findings
        );
        // The corrupted entries are not listed as objects; gamma still is (its entry is
        // valid, its lease word is not).
        let listed: Vec<u32> = report.objects.iter().map(|o| o.slot).collect();
        assert!(!listed.contains(&alpha) && !listed.contains(&beta) && listed.contains(&gamma));

        // A second copy with a bad magic: the superblock is the finding, nothing is decoded.
        let mut bad_magic = original.clone();
        bad_magic[0] ^= 0x20;
        let second = dir.path().join("bad-magic.region");
        std::fs::write(&second, &bad_magic).expect("write copy");
        let report = inspect(&second).expect("inspect the copy");
        assert!(!report.ok);
        assert_eq!(report.errors, 1, "{:#?}", report.findings);
        assert!(errors_at(&report, "superblock")
            .iter()
            .any(|e| e.contains("bad magic")));
        assert!(report.objects.is_empty() && report.peers.is_empty());

        // The live region itself was only read.
        assert!(inspect(&memfd_path(&b)).expect("inspect").ok);
        for h in holders {
            release(h);
        }
    });
}

fn vshmctl_inspect(path: &Path, json: bool) -> std::process::Output {
    let mut c = command(&bin("vshmctl"));
    c.arg("inspect").arg("--memfd").arg(path);
    if json {
        c.arg("--json");
    }
    c.output().expect("run vshmctl inspect")
}

/// The command as an operator runs it: exit codes and both output formats.
#[test]
fn vshmctl_inspect_exits_0_on_a_healthy_region_1_on_a_corrupted_copy_and_2_on_a_missing_file() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let holders = populate(&b);
        let memfd = memfd_path(&b);

        let text = vshmctl_inspect(&memfd, false);
        assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
        let out = stdout(&text);
        for name in [
            "alpha",
            "beta",
            "gamma",
            "OBJECTS (3)",
            "PEERS (2 connected)",
            "OK",
        ] {
            assert!(out.contains(name), "{name} missing from:\n{out}");
        }

        let json = vshmctl_inspect(&memfd, true);
        assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
        let doc: Value = serde_json::from_slice(&json.stdout).expect("inspect --json");
        assert_eq!(doc["ok"], true);
        assert_eq!(doc["objects"].as_array().map(Vec::len), Some(3));
        assert_eq!(doc["superblock"]["magic_ok"], true);

        let dir = TempDir::new("inspect-cli");
        let mut bytes = std::fs::read(&memfd).expect("copy the memfd");
        let layout = layout_of(&bytes);
        let slot = slot_of(&b.status(), "beta");
        let at = name_of(&bytes, &layout, slot);
        bytes[usize::try_from(at).expect("offset")] = b'\\';
        let corrupt = dir.path().join("corrupt.region");
        std::fs::write(&corrupt, &bytes).expect("write copy");

        let text = vshmctl_inspect(&corrupt, false);
        assert_eq!(text.status.code(), Some(1), "{}", stderr(&text));
        let out = stdout(&text);
        assert!(
            out.contains(&format!("object slot {slot}")) && out.contains("backslash"),
            "{out}"
        );
        let json = vshmctl_inspect(&corrupt, true);
        assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
        let doc: Value = serde_json::from_slice(&json.stdout).expect("inspect --json");
        assert_eq!(doc["ok"], false);
        assert_eq!(doc["findings"][0]["where"], format!("object slot {slot}"));
        assert_eq!(doc["findings"][0]["severity"], "error");

        let missing = vshmctl_inspect(&dir.path().join("missing"), false);
        assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
        assert!(
            stderr(&missing).contains("cannot open"),
            "{}",
            stderr(&missing)
        );
        for h in holders {
            release(h);
        }
    });
}

/// Region offset of the name of the object in `slot` of a region copy: the name area plus
/// the entry's `name_off` (FORMAT.md §5b).
fn name_of(bytes: &[u8], layout: &Layout, slot: u32) -> u64 {
    let at = layout
        .object_entry(vshm_format::ObjectSlot(slot))
        .expect("slot")
        + std::mem::offset_of!(ObjectEntry, name_off) as u64;
    let at = usize::try_from(at).expect("offset");
    let off = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    layout.name_area + u64::from(off)
}
