//! Stress with kills: 8 peer processes (`vshm-stress-peer`) allocate and free owner-tagged
//! blocks in one section, signal and wait on one event and lock one mutex for a bounded
//! time, while 3 of them are killed with SIGKILL mid-run. Afterwards: no survivor saw an
//! overlapping block or got stuck, no mutex is held by a dead peer, and the allocator is
//! consistent and whole once the dead peers' blocks are reclaimed.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vshm::blocks::AllocOptions;
use vshm::{CreateOptions, EventOptions};
use vshm_tests::{bin, command, kill9, stderr, watchdog, Backend};

const PEERS: u64 = 8;
const KILLED: [(usize, u64); 3] = [(1, 300), (4, 900), (6, 1500)];
const RUN_MS: u64 = 3000;

fn spawn_peer(b: &Backend, seed: u64) -> Child {
    command(&bin("vshm-stress-peer"))
        .arg(&b.socket)
        .arg(seed.to_string())
        .arg(RUN_MS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vshm-stress-peer")
}

#[test]
fn eight_peers_with_three_killed_leave_no_held_mutex_no_stuck_waiter_and_a_whole_allocator() {
    watchdog(Duration::from_secs(120), || {
        let b = Backend::start(&["--size", "32M"]);
        let setup = b.connect();
        let keep = |max| CreateOptions {
            max_size: max,
            initial_size: 64 << 10,
            persistent: true,
        };
        setup.create(Some("pool"), &keep(4 << 20)).expect("pool");
        setup
            .create(Some("counter"), &keep(64 << 10))
            .expect("counter");
        let opts = EventOptions {
            manual_reset: false,
            persistent: true,
        };
        setup.create_event(Some("tick"), &opts).expect("tick");
        setup.create_mutex(Some("lock"), true).expect("lock");

        let start = Instant::now();
        let mut peers: Vec<Option<Child>> = (0..PEERS)
            .map(|i| Some(spawn_peer(&b, 0x5EED_0000 + i * 7919)))
            .collect();
        for (who, at_ms) in KILLED {
            let at = Duration::from_millis(at_ms);
            std::thread::sleep(at.saturating_sub(start.elapsed()));
            if let Some(mut child) = peers[who].take() {
                kill9(&mut child);
            }
        }
        for (i, child) in peers.into_iter().enumerate() {
            let Some(child) = child else { continue };
            let out = child.wait_with_output().expect("wait peer");
            assert!(
                out.status.success(),
                "survivor {i} exited {} (3 = overlapping blocks): {}",
                out.status,
                stderr(&out)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("done ops="),
                "survivor {i} finished its run"
            );
        }

        // The mutex is free: not held by a dead peer, nobody queued.
        let lock = b.section("lock").expect("lock in status");
        assert!(lock["owner"].is_null(), "owner after the run: {lock}");
        assert_eq!(lock["queued"], 0, "{lock}");

        // The next locker of the allocator reclaims the dead peers' owned blocks; then the
        // pool is whole again.
        let pool = setup.open("pool").expect("open pool");
        let b1 = pool
            .allocate_with(64, 16, AllocOptions { owned: true })
            .expect("allocate after the run");
        pool.free(b1).expect("free");
        let stats = pool
            .block_stats()
            .expect("stats")
            .expect("pool has an allocator");
        assert_eq!(
            (stats.in_use, stats.count),
            (0, 0),
            "every block freed or reclaimed: {stats:?}"
        );
        let inspect = b.vshmctl(&[
            "inspect",
            "--memfd",
            &format!("/proc/{}/fd/{}", b.pid(), memfd_fd(b.pid())),
        ]);
        assert_eq!(
            inspect.status.code(),
            Some(0),
            "the region is consistent: {}{}",
            String::from_utf8_lossy(&inspect.stdout),
            stderr(&inspect)
        );
    });
}

/// vshmd's memfd, found the way an operator would (`ls -l /proc/PID/fd`).
fn memfd_fd(pid: u32) -> String {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:vshm") {
            return fd.file_name().to_string_lossy().into_owned();
        }
    }
    panic!("vshmd has no memfd:vshm open");
}
