//! Blocks inside a section against a real vshmd: grow on demand, concurrent host peers,
//! a peer killed holding the allocator lock, owned blocks of a gone peer.

use std::time::Duration;

use vshm::blocks::AllocOptions;
use vshm::format::blocks::{lock_word, Heap, Me, PeerTable};
use vshm::format::shm::SharedMemory;
use vshm::{CreateOptions, Error, Status, Transport};
use vshm_tests::{kill9, stderr, stdout, wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);

fn heap_options(max: u64, initial: u64) -> CreateOptions {
    CreateOptions {
        max_size: max,
        initial_size: initial,
        persistent: true,
    }
}

fn no_peers_connected(b: &Backend) -> bool {
    b.status()["peers"]
        .as_array()
        .is_some_and(|p| p.iter().all(|p| p["connected"] == false))
}

#[test]
fn a_section_grows_on_demand_up_to_its_max_then_says_no_memory() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let ns = b.connect();
        let (s, _) = ns
            .create(Some("grows"), &heap_options(256 * 1024, 4096))
            .expect("create");
        let big = s.allocate(40 * 1024, 16).expect("grows to fit");
        assert!(s.size() > 4096 && s.size() <= 256 * 1024, "{}", s.size());
        assert!(big.size >= 40 * 1024);
        let mut n = 0;
        let err = loop {
            match s.allocate(3000, 64) {
                Ok(blk) => {
                    assert_eq!(blk.offset % 64, 0);
                    s.write_at(blk.offset, &[7; 3000]).expect("write the block");
                    n += 1;
                }
                Err(e) => break e,
            }
        };
        assert_eq!(err, Error::Status(Status::NoMemory));
        assert_eq!(s.size(), 256 * 1024, "failed only at the max size");
        assert!(n >= 40, "{n} blocks of 4 KiB in 256 KiB");
        let st = s.block_stats().expect("stats").expect("an allocator");
        assert_eq!(st.count, n + 1);
        assert!(st.largest_free < 4096);
        // The status document shows it.
        let sec = b.section("grows").expect("section");
        assert_eq!(sec["blocks"]["count"], n + 1, "{sec}");
        // vshm free/alloc from the command line.
        let out = b.vshm(&["free", "grows", &big.offset.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let again = b.vshm(&["free", "grows", &big.offset.to_string()]);
        assert!(!again.status.success(), "a double free is refused");
        let out = b.vshm(&["alloc", "grows", "1000", "--align", "256"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let off: u64 = stdout(&out)
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .expect("offset printed");
        assert_eq!(off % 256, 0);
    });
}

#[test]
fn four_host_peers_allocating_at_once_never_share_a_byte() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let ns = b.connect();
        let (s, _) = ns
            .create(Some("shared"), &heap_options(1 << 20, 8192))
            .expect("create");
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let b = &b;
                scope.spawn(move || {
                    let ns = b.connect();
                    let s = ns.open("shared").expect("open");
                    let mut held = Vec::new();
                    for i in 0..150u64 {
                        let len = 1 + (i * 131 + u64::from(t) * 17) % 2000;
                        let blk = s.allocate(len, 8).expect("allocate");
                        let fill = vec![t + 1; usize::try_from(blk.size).expect("small")];
                        s.write_at(blk.offset, &fill).expect("write");
                        held.push(blk);
                        if i % 3 == 0 {
                            let old =
                                held.swap_remove(usize::try_from(i).expect("small") % held.len());
                            let mut back = vec![0; usize::try_from(old.size).expect("small")];
                            s.read_at(old.offset, &mut back).expect("read");
                            assert!(
                                back.iter().all(|&x| x == t + 1),
                                "peer {t}: block overwritten"
                            );
                            s.free(old).expect("free");
                        }
                    }
                    for blk in held {
                        let mut back = vec![0; usize::try_from(blk.size).expect("small")];
                        s.read_at(blk.offset, &mut back).expect("read");
                        assert!(
                            back.iter().all(|&x| x == t + 1),
                            "peer {t}: block overwritten"
                        );
                        s.free(blk).expect("free");
                    }
                });
            }
        });
        let st = s.block_stats().expect("stats").expect("allocator");
        assert_eq!((st.in_use, st.count), (0, 0));
        assert_eq!(st.free, st.arena);
    });
}

#[test]
fn a_peer_gone_while_holding_the_allocator_lock_does_not_wedge_the_others() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let ns = b.connect();
        let (s, _) = ns
            .create(Some("locked"), &heap_options(64 * 1024, 64 * 1024))
            .expect("create");
        let kept = s.allocate(100, 8).expect("allocate");
        {
            // A second peer takes the allocator lock and vanishes with it.
            let dying = b.connect();
            let ds = dying.open("locked").expect("open");
            let region = dying.transport().region();
            let me_info = dying
                .peers()
                .find(|p| p.peer_id == dying.peer_id())
                .expect("own peer entry");
            let token_alive = |_: u32| true;
            let peers = PeerTable {
                mem: &region,
                layout: dying.layout(),
                token_alive: &token_alive,
            };
            let me = Me {
                slot: me_info.slot,
                incarnation: me_info.incarnation,
                token: 1,
            };
            let heap = Heap::new(&region, ds.offset(), ds.size(), ds.max_size(), 0).expect("heap");
            let guard = heap.lock(me, &peers).expect("lock");
            std::mem::forget(guard);
            let word = region
                .load_u64(ds.offset().raw() + 24, std::sync::atomic::Ordering::SeqCst)
                .expect("lock word");
            assert_eq!(word, lock_word(me), "held by the dying peer");
            std::mem::forget(ds);
        }
        assert!(
            wait_for(Duration::from_secs(5), || b.status()["peers"]
                .as_array()
                .is_some_and(|p| p
                    .iter()
                    .filter(|p| p["connected"] == true)
                    .count()
                    == 1)),
            "the dying peer was not reclaimed"
        );
        let blk = s
            .allocate(200, 8)
            .expect("the lock is broken, not waited on");
        s.free(blk).expect("free");
        s.free(kept).expect("free");
        let st = s.block_stats().expect("stats").expect("allocator");
        assert_eq!(st.recoveries, 1);
        assert_eq!((st.in_use, st.count), (0, 0));
    });
}

#[test]
fn owned_blocks_of_a_killed_peer_are_reclaimed_and_persistent_ones_kept() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let out = b.vshm(&["create", "owned", "--max", "64K", "--persistent"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = b.vshm(&["alloc", "owned", "500"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let mut holder = b.vshm_holding(&["alloc", "owned", "1000", "--owned", "--hold"]);
        {
            let ns = b.connect();
            let s = ns.open("owned").expect("open");
            let st = s.block_stats().expect("stats").expect("allocator");
            assert_eq!((st.count, st.owned), (2, 1));
        }
        kill9(&mut holder);
        assert!(wait_for(Duration::from_secs(5), || no_peers_connected(&b)));
        let ns = b.connect();
        let s = ns.open("owned").expect("open");
        let blk = s
            .allocate_with(10, 8, AllocOptions { owned: true })
            .expect("allocate");
        // The allocator believes a departure once the peer has looked gone for two heal
        // periods (a scribbled peer table must not free a live peer's blocks): a later
        // operation reclaims the block.
        assert!(
            wait_for(Duration::from_secs(5), || {
                let probe = s.allocate(8, 8).expect("probe");
                s.free(probe).expect("free probe");
                s.block_stats()
                    .ok()
                    .flatten()
                    .is_some_and(|st| st.reclaimed == 1)
            }),
            "the killed peer's block is reclaimed"
        );
        let st = s.block_stats().expect("stats").expect("allocator");
        assert_eq!(st.reclaimed, 1, "the killed peer's block, once");
        assert_eq!(
            (st.count, st.owned),
            (2, 1),
            "the persistent block and ours"
        );
        s.free(blk).expect("free");
    });
}
