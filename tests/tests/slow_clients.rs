//! No client can stall vshmd's single event loop: ivshmem clients that read their socket
//! slowly, clients that stop reading mid-handshake, and idle monitor connections, each
//! next to an honest peer whose operations must go through. Latencies are measured and
//! printed (run with `--nocapture`); the assertions only use a generous bound.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vshm::host::HostTransport;
use vshm_control::ControlRequest;
use vshm_tests::{kill9, recv_msg, stderr, wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(90);
/// What an honest peer's operation may take, however the others behave (generous: the
/// measured figures are printed, not asserted).
const BOUND: Duration = Duration::from_secs(2);

/// Runs `op` and returns how long it took, failing if it took longer than [`BOUND`].
fn timed<T>(what: &str, log: &mut Vec<(String, Duration)>, op: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = op();
    let took = t.elapsed();
    println!("{what}: {took:?}");
    assert!(
        took < BOUND,
        "{what} took {took:?} (bound {BOUND:?}); so far: {log:?}"
    );
    log.push((what.to_owned(), took));
    out
}

#[test]
fn clients_that_read_one_message_every_40_ms_do_not_slow_an_honest_peer() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M", "--vectors", "64", "--max-peers", "16"]);
        let mut log = Vec::new();
        // Six slow peers, as in the report: each reads one message every 40 ms; every
        // handshake is 3 + 64 × (peers + 1) messages with an fd each.
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicUsize::new(0));
        let mut slow = Vec::new();
        for _ in 0..6 {
            let sock = UnixStream::connect(&b.socket).expect("connect a slow client");
            let (stop, ended) = (stop.clone(), ended.clone());
            slow.push(std::thread::spawn(move || {
                let mut read = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if recv_msg(&sock).is_none() {
                        ended.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    read += 1;
                    std::thread::sleep(Duration::from_millis(40));
                }
                read
            }));
        }
        // The honest peer meanwhile, over the slow clients' handshakes and past their
        // deadline (2 s), when they are cut off and fenced.
        let start = Instant::now();
        let mut round = 0;
        while start.elapsed() < Duration::from_millis(4500) {
            round += 1;
            timed(&format!("round {round}: vshmctl status"), &mut log, || {
                assert!(b.vshmctl(&["status"]).status.success());
            });
            let name = format!("s{round}");
            timed(&format!("round {round}: vshm create"), &mut log, || {
                let out = b.vshm(&["create", &name, "--max", "64K", "--persistent"]);
                assert!(out.status.success(), "{}", stderr(&out));
            });
            timed(&format!("round {round}: vshm write+read"), &mut log, || {
                let w = b.vshm(&["write", &name, "--offset", "0", "--data", "hello"]);
                assert!(w.status.success(), "{}", stderr(&w));
                let r = b.vshm(&["read", &name, "--offset", "0", "--len", "5"]);
                assert!(r.status.success(), "{}", stderr(&r));
            });
            timed(
                &format!("round {round}: in-process attach"),
                &mut log,
                || {
                    let ns = b.connect();
                    drop(ns.open(&name).expect("open"));
                },
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let connected = b.status()["peers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count());
        stop.store(true, Ordering::Relaxed);
        let reads: Vec<usize> = slow.into_iter().map(|t| t.join().expect("join")).collect();
        let worst = log.iter().map(|(_, d)| *d).max().unwrap_or_default();
        println!(
            "slow clients read {reads:?} messages; {} of 6 connected at the end ({} had \
             read to the end of their stream); {round} rounds; worst honest operation \
             {worst:?}",
            connected,
            ended.load(Ordering::Relaxed)
        );
    });
}

#[test]
fn a_handshake_larger_than_the_socket_buffer_arrives_whole_and_in_order() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M", "--vectors", "64", "--max-peers", "8"]);
        let peers: Vec<_> = (0..6).map(|_| b.connect()).collect();
        let late = UnixStream::connect(&b.socket).expect("connect");
        // It starts reading late: what did not fit in the socket waits in vshmd's queue.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let mut msgs = Vec::new();
        let (v, _) = recv_msg(&late).expect("version");
        let (id, _) = recv_msg(&late).expect("id");
        let (m, shm) = recv_msg(&late).expect("memory");
        assert_eq!((v, m, shm.is_some()), (0, -1, true));
        while msgs.iter().filter(|(p, _)| *p == id).count() < 64 {
            let (p, fd) = recv_msg(&late).expect("an eventfd message");
            msgs.push((p, fd.is_some()));
        }
        println!(
            "read the remaining {} handshake messages in {:?}",
            msgs.len(),
            t.elapsed()
        );
        assert_eq!(msgs.len(), 64 * 8, "host, six peers and itself, 64 each");
        assert!(msgs.iter().all(|(_, fd)| *fd), "each with its eventfd");
        let order: Vec<i64> = msgs.chunks(64).map(|c| c[0].0).collect();
        assert!(
            msgs.chunks(64).all(|c| c.iter().all(|m| m.0 == c[0].0)),
            "in runs of 64 per peer"
        );
        assert_eq!(order.first(), Some(&0), "the host first");
        assert_eq!(order.last(), Some(&id), "itself last");
        // It stays connected: it took its handshake within the deadline.
        std::thread::sleep(Duration::from_millis(2500));
        let connected = b.status()["peers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count());
        assert_eq!(connected, 7);
        drop(peers);
    });
}

#[test]
fn a_client_that_stops_reading_after_the_memory_is_cut_off_and_its_slot_fenced() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M", "--vectors", "64", "--max-peers", "8"]);
        // Six honest peers, so the handshake (3 + 64 × 8 messages with fds) is more than a
        // socket buffer holds.
        let peers: Vec<_> = (0..6).map(|_| b.connect()).collect();
        let stuck = UnixStream::connect(&b.socket).expect("connect");
        for _ in 0..3 {
            recv_msg(&stuck).expect("version, id, memory");
        }
        // It holds the memory and reads nothing more: within about 2 s it is cut off.
        let t = Instant::now();
        stuck
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut drained = 0usize;
        let cut = wait_for(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(100));
            b.status()["peers"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["connected"] == true).count() == 6)
        });
        println!("cut off after {:?}", t.elapsed());
        assert!(cut, "the stuck client is dropped");
        // Its socket was closed after what it had queued was dropped.
        while let Some((_, _)) = recv_msg(&stuck) {
            drained += 1;
        }
        println!("it could still read {drained} messages the kernel held");
        // Its process (this one) still runs, so its slot is fenced: 6 connected + 1 fenced
        // leaves one slot of 8.
        let seventh = b.connect();
        let eighth = HostTransport::connect(&b.socket);
        assert!(
            eighth.is_err(),
            "the stuck client's slot is fenced while its process runs"
        );
        drop((seventh, peers));
    });
}

#[test]
fn forty_watchers_leave_status_and_admin_requests_a_slot() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let mut line = serde_json::to_vec(&ControlRequest::Watch).expect("json");
        line.push(b'\n');
        let mut watchers = Vec::new();
        for _ in 0..40 {
            let mut s = UnixStream::connect(&b.control).expect("connect");
            s.write_all(&line).expect("watch");
            watchers.push(s);
        }
        let mut ok = 0;
        let mut full = 0;
        for s in &watchers {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut answer = String::new();
            BufReader::new(s).read_line(&mut answer).expect("answer");
            if answer.contains("watcher slots full") {
                full += 1;
            } else {
                ok += 1;
            }
        }
        println!("{ok} watchers accepted, {full} told the watcher slots are full");
        assert_eq!((ok, full), (16, 24), "16 watchers, the rest told why not");
        // And 40 connections that never say anything.
        let idle: Vec<UnixStream> = (0..40)
            .map(|_| UnixStream::connect(&b.control).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut log = Vec::new();
        timed(
            "vshmctl status with 16 watchers and 40 idle",
            &mut log,
            || {
                let out = b.vshmctl(&["status"]);
                assert!(out.status.success(), "{}", stderr(&out));
            },
        );
        timed(
            "vshmctl dump with 16 watchers and 40 idle",
            &mut log,
            || {
                let out = b.vshmctl(&["dump"]);
                assert!(out.status.success(), "{}", stderr(&out));
            },
        );
        drop((idle, watchers));
    });
}

#[test]
fn a_cut_off_peer_is_fenced_until_its_process_exits_and_unfenced_right_after() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M", "--max-peers", "1"]);
        let heap = b.status()["region"]["heap_size"].as_u64().expect("heap");
        let free = || b.status()["region"]["free"].as_u64();
        let mut p = b.vshm_holding(&["create", "a", "--max", "64K", "--hold"]);
        let id = b.status()["peers"][0]["id"].as_u64().expect("p's id");
        assert!(b.vshmctl(&["disconnect", &id.to_string()]).status.success());
        // Fenced while p runs, however long that is.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(free(), Some(heap - (64 << 10)), "a's memory is held back");
        assert!(!b.vshm(&["list"]).status.success(), "p's slot is fenced");
        kill9(&mut p);
        let exited = Instant::now();
        assert!(
            wait_for(BOUND, || free() == Some(heap)),
            "the fence lifts once p has exited"
        );
        println!("unfenced {:?} after p exited", exited.elapsed());
        let out = b.vshm(&["list"]);
        assert!(out.status.success(), "the slot is free: {}", stderr(&out));
    });
}
