//! vshmd killed with SIGKILL and started again by its service manager (docs/OPERATIONS.md,
//! "Crash restart"): with `--fd-store` the region's memfd, sockets and every peer's
//! connection and eventfds wait in systemd's fd store beside a journal of its state, and
//! the new process rebuilds the region from them. The test plays systemd
//! (`vshm_tests::supervisor`). Peers keep their sections, data and handles and go on
//! creating, growing and deleting; a peer that left while vshmd was down is reclaimed.
//! (A QEMU guest through a crash restart: `vms.rs`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vshm::{CreateOptions, EventOptions};
use vshm_tests::supervisor::Supervised;
use vshm_tests::{wait_for, watchdog};

const LIMIT: Duration = Duration::from_secs(90);

fn epoch(s: &Supervised) -> u64 {
    s.status()["region"]["epoch"].as_u64().expect("epoch")
}

fn connected_peers(s: &Supervised) -> usize {
    s.status()["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count())
}

fn section(s: &Supervised, name: &str) -> Option<serde_json::Value> {
    s.status()["sections"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .cloned()
}

#[test]
fn host_peers_keep_their_sections_data_and_handles_through_a_kill_9_and_a_restart() {
    watchdog(LIMIT, || {
        let mut s = Supervised::start(&["--size", "8M"]);
        let stored = s.stored();
        for want in ["memfd", "socket", "control", "journal.0", "journal.1"] {
            assert!(
                stored.iter().any(|n| n.ends_with(&format!("/{want}"))),
                "{want} is not in the fd store: {stored:?}"
            );
        }
        let a = s.connect();
        let c = s.connect();
        let (sec, _) = a
            .create(Some("kept"), &CreateOptions::new(64 * 1024))
            .expect("create");
        sec.write_at(100, b"written before the crash")
            .expect("write");
        let sec_c = c.open("kept").expect("open");
        let (ev, _) = a
            .create_event(Some("bell"), &EventOptions::default())
            .expect("event");
        let ev_c = c.open_event("bell").expect("open event");
        let (old_pid, before) = (s.pid(), epoch(&s));

        s.kill9();
        s.restart();

        assert_ne!(s.pid(), old_pid, "another process serves now");
        assert_eq!(
            epoch(&s),
            before.wrapping_add(1),
            "backend_epoch moved on by one"
        );
        let status = s.status();
        assert_eq!(connected_peers(&s), 2, "{status}");
        assert_eq!(section(&s, "kept").expect("kept")["refs"], 2);
        let mut got = [0u8; 24];
        sec_c.read_at(100, &mut got).expect("read");
        assert_eq!(&got, b"written before the crash");
        // Requests are served by the new process: create, grow, delete.
        let grow = CreateOptions {
            max_size: 256 * 1024,
            initial_size: 4096,
            persistent: false,
        };
        let (after, _) = c.create(Some("after"), &grow).expect("create after");
        after.grow(128 * 1024).expect("grow after");
        assert_eq!(section(&s, "after").expect("after")["size"], 128 * 1024);
        a.delete("after").expect("delete after");
        after.close().expect("close");
        assert!(
            wait_for(Duration::from_secs(5), || section(&s, "after").is_none()),
            "deleted and closed: destroyed"
        );
        // Events wake across the crash.
        let started = AtomicBool::new(false);
        std::thread::scope(|t| {
            let waiter = t.spawn(|| {
                started.store(true, Ordering::SeqCst);
                ev_c.wait(Some(Duration::from_secs(10)))
            });
            while !started.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(50));
            ev.signal().expect("signal");
            waiter.join().expect("waiter").expect("woken");
        });
        // A peer that arrives after the restart sees the same namespace.
        let late = s.connect();
        let sec_late = late.open("kept").expect("open after the restart");
        sec_late.read_at(100, &mut got).expect("read");
        assert_eq!(&got, b"written before the crash");
        drop((sec, sec_c, sec_late));
    });
}

#[test]
fn a_peer_that_left_while_vshmd_was_down_is_reclaimed_after_the_restart() {
    watchdog(LIMIT, || {
        let mut s = Supervised::start(&["--size", "8M"]);
        let stays = s.connect();
        let leaves = s.connect();
        let (kept, _) = stays
            .create(Some("kept"), &CreateOptions::new(4096))
            .expect("kept");
        let (gone, _) = leaves
            .create(Some("its own"), &CreateOptions::new(4096))
            .expect("its own");
        let shared = leaves.open("kept").expect("open kept");
        s.kill9();
        // Its process ends while nobody serves the region: systemd drops its connection.
        drop((gone, shared));
        drop(leaves);
        s.restart();
        assert!(
            wait_for(Duration::from_secs(5), || connected_peers(&s) == 1),
            "the peer that left is still counted: {}",
            s.status()
        );
        assert!(
            wait_for(Duration::from_secs(5), || section(&s, "its own").is_none()),
            "its section outlived it"
        );
        assert_eq!(section(&s, "kept").expect("kept")["refs"], 1);
        kept.write_at(0, b"still mine").expect("write");
        // Its id, eventfds and slot are reused by the next peer as after any departure.
        let next = s.connect();
        next.open("kept").expect("open");
    });
}

#[test]
fn vshmd_killed_at_any_moment_under_load_loses_nothing_an_honest_peer_holds() {
    use vshm_tests::chaos::{background_crew, create_shared_objects_in, Crew, Length, RACING};
    let length = Length::from_env();
    let kills = length.pick(4, 30);
    watchdog(length.pick(LIMIT, Duration::from_secs(900)), move || {
        let mut s = Supervised::start(&["--size", "32M", "--max-peers", "16"]);
        let owner = s.connect();
        create_shared_objects_in(&owner);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let crew = Crew::on_socket(s.socket.clone(), 0xC4A5_11ED);
        let honest = background_crew(crew, 4, std::sync::Arc::clone(&stop));
        let mut rng = vshm_tests::XorShift(0x5EED_C4A5);
        for _ in 0..kills {
            // Anywhere in a request, a reclaim, a heal or a journal write.
            std::thread::sleep(Duration::from_millis(150 + rng.below(600)));
            s.kill9();
            s.restart();
        }
        stop.store(true, Ordering::Relaxed);
        let tally = honest.join().expect("honest crew");
        tally.assert_honest(RACING);
        assert!(tally.runs > 0, "no peer run finished");
        // Every run ended and left: only the owner is connected, the persistent objects
        // are whole, and every non-persistent section is gone.
        assert!(
            wait_for(Duration::from_secs(10), || connected_peers(&s) == 1),
            "{}",
            s.status()
        );
        let status = s.status();
        let names: Vec<&str> = status["sections"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x["name"].as_str()).collect())
            .unwrap_or_default();
        for kept in ["pool", "counter"] {
            assert!(names.contains(&kept), "{kept} lost: {status}");
        }
        owner
            .open("pool")
            .expect("the pool opens after the crashes");
    });
}
