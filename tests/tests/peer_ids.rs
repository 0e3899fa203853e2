//! Peer ids never run out (FORMAT.md §15): with the id space made small for the test
//! (`VSHMD_TEST_MAX_PEER_ID`), peers connect and leave five times as often as there are ids
//! while one peer stays connected throughout — a host process, then a stock QEMU guest, the
//! witness whose per-id eventfd arrays QEMU 7.2 would free on a "peer left" and write into
//! if the id came back.

use std::collections::BTreeSet;
use std::time::Duration;

use vshm::Transport;
use vshm_format::PeerId;
use vshm_tests::{boot_guests, guest_ok, guest_peer_id, wait_for, watchdog, Backend};

/// The id space the tests cycle through.
const MAX_ID: u16 = 8;

fn backend(extra: &[&str]) -> Backend {
    let max = MAX_ID.to_string();
    Backend::start_with_env(extra, &[("VSHMD_TEST_MAX_PEER_ID", &max)])
}

fn connected(b: &Backend) -> usize {
    b.status()["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count())
}

/// Connects and drops a host peer `cycles` times (each waits until vshmd saw it leave, so
/// each connect is a reuse, not a fresh id); returns the ids they got. Each one rings
/// `ring` (the long-lived peer) on vector 1 before it leaves.
fn cycle(b: &Backend, cycles: usize, ring: PeerId, before: usize) -> Vec<PeerId> {
    let mut ids = Vec::new();
    for i in 0..cycles {
        let ns = b.connect();
        ids.push(ns.peer_id());
        ns.transport()
            .ring(ring, 1)
            .unwrap_or_else(|e| panic!("cycle {i}: ringing {ring:?}: {e}"));
        drop(ns);
        assert!(
            wait_for(Duration::from_secs(5), || connected(b) == before),
            "cycle {i}: the peer was seen to leave"
        );
    }
    ids
}

#[test]
fn with_one_long_lived_host_peer_five_times_the_id_space_of_peers_come_and_go() {
    watchdog(Duration::from_secs(120), || {
        let b = backend(&["--size", "4M", "--vectors", "2"]);
        let long = b.connect();
        let cycles = 5 * usize::from(MAX_ID);
        let ids = cycle(&b, cycles, long.peer_id(), 1);
        assert_eq!(ids.len(), cycles, "every connect succeeded");
        let distinct: BTreeSet<PeerId> = ids.iter().copied().collect();
        assert!(
            distinct
                .iter()
                .all(|&id| id != long.peer_id() && id.raw() <= MAX_ID),
            "ids stay in the space and never collide: {distinct:?}"
        );
        // The long-lived peer was never told a departure and still works with a newcomer.
        let opts = vshm::CreateOptions {
            persistent: true,
            ..vshm::CreateOptions::new(4096)
        };
        let (s, _) = long
            .create(Some("still-here"), &opts)
            .expect("the long-lived peer creates");
        s.write_at(0, b"alive").expect("write");
        let other = b.connect();
        let mut buf = [0u8; 5];
        other
            .open("still-here")
            .expect("a newcomer opens it")
            .read_at(0, &mut buf)
            .expect("read");
        assert_eq!(&buf, b"alive");
    });
}

#[test]
fn a_qemu_guest_stays_attached_and_working_while_host_peers_cycle_through_the_id_space() {
    watchdog(Duration::from_secs(600), || {
        let b = backend(&["--size", "64M"]);
        let mut vm = boot_guests(&b, &["witness"]).pop().expect("guest");
        let guest = PeerId(u16::try_from(guest_peer_id(&mut vm)).expect("a u16 id"));
        guest_ok(&mut vm, "vshm create ping --max 4K --persistent");
        let cycles = 5 * usize::from(MAX_ID);
        let ids = cycle(&b, cycles, guest, 1);
        let distinct: BTreeSet<PeerId> = ids.iter().copied().collect();
        assert!(
            distinct.len() < cycles && distinct.iter().all(|id| id.raw() <= MAX_ID),
            "ids were reused within the space: {distinct:?}"
        );
        // QEMU is alive and the guest still rings vshmd and is rung back: request round
        // trips through the doorbell and the guest's own vectors.
        let out = guest_ok(&mut vm, "vshm rtt ping --count 5 --copy-mib 1");
        assert!(
            out.contains("request round trip") && out.contains("copy out of section"),
            "{out}"
        );
        guest_ok(
            &mut vm,
            "vshm create pong --max 4K --persistent && vshm delete pong",
        );
        assert!(
            b.status()["peers"].as_array().is_some_and(|p| p
                .iter()
                .any(|p| p["id"] == u64::from(guest.raw()) && p["connected"] == true)),
            "the guest is still connected: {}",
            b.status()
        );
        assert!(
            std::path::Path::new(&format!("/proc/{}", vm.pid())).exists(),
            "QEMU did not exit"
        );
    });
}
