//! Unit tests, the fault-injection recovery test and the model-based property test.

use core::cell::Cell;
use core::ptr::NonNull;
use std::collections::BTreeMap;
use std::vec::Vec;

use proptest::prelude::*;

use super::heap::order_for;
use super::*;
use crate::shm::{Fault, RawRegion, SharedMemory};

/// A section at region offset `OFF` in a zeroed buffer.
const OFF: u64 = 4096;

struct Buf(Vec<u64>);

impl Buf {
    fn new(bytes: usize) -> Buf {
        Buf(vec![0u64; bytes / 8])
    }
    fn region(&mut self) -> RawRegion<'_> {
        let len = self.0.len() as u64 * 8;
        let base = NonNull::new(self.0.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: the Vec outlives the region (borrowed mutably for its lifetime), is
        // 8-aligned and `len` bytes long.
        unsafe { RawRegion::new(base, len) }
    }
}

/// Simulated peer table: slot → incarnation; tokens in `dead_tokens` are dead.
#[derive(Default)]
struct FakePeers {
    inc: std::cell::RefCell<BTreeMap<u32, u64>>,
    dead_tokens: std::cell::RefCell<Vec<u32>>,
}

impl FakePeers {
    fn with(slots: &[(u32, u64)]) -> FakePeers {
        let p = FakePeers::default();
        for &(s, i) in slots {
            p.inc.borrow_mut().insert(s, i);
        }
        p
    }
    fn kill(&self, slot: u32) {
        self.inc.borrow_mut().remove(&slot);
    }
}

impl Peers for FakePeers {
    fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
        self.inc.borrow().get(&slot.0).copied()
    }
    fn token_alive(&self, token: u32) -> bool {
        !self.dead_tokens.borrow().contains(&token)
    }
    fn fingerprint(&self) -> u64 {
        self.inc.borrow().iter().fold(0, |a, (s, i)| {
            a ^ (u64::from(*s) << 40 | i).wrapping_mul(31)
        }) ^ self.inc.borrow().len() as u64
    }
}

fn me(slot: u32) -> Me {
    Me {
        slot: PeerSlot(slot),
        incarnation: u64::from(slot) + 1,
        token: 1,
    }
}

/// Allocates as the guest library does: grows the section on NeedGrow and retries.
fn alloc<M: SharedMemory + ?Sized>(
    mem: &M,
    size: &mut u64,
    max: u64,
    who: Me,
    peers: &dyn Peers,
    (len, align, owned): (u64, u64, bool),
) -> Result<(u64, u64), BlockError> {
    loop {
        let heap = Heap::new(mem, RegionOffset(OFF), *size, max, 7)?;
        let r = heap
            .lock(who, peers)
            .and_then(|mut g| g.allocate(len, align, owned.then_some((who.slot, who.incarnation))));
        match r {
            Err(BlockError::NeedGrow { min_size }) => {
                assert!(
                    min_size > *size && min_size <= max,
                    "{min_size} {size} {max}"
                );
                *size = min_size;
            }
            r => return r,
        }
    }
}

fn free<M: SharedMemory + ?Sized>(
    mem: &M,
    size: u64,
    max: u64,
    who: Me,
    peers: &dyn Peers,
    data: u64,
) -> Result<u64, BlockError> {
    let heap = Heap::new(mem, RegionOffset(OFF), size, max, 7)?;
    let mut g = heap.lock(who, peers)?;
    g.free(data, None)
}

fn checked(mem: &RawRegion<'_>, size: u64) -> BlockStats {
    match verify(mem, RegionOffset(OFF), size) {
        Ok(Some(s)) => s,
        other => panic!("allocator does not verify: {other:?}"),
    }
}

#[test]
fn header_words_round_trip_and_reject_another_offset_or_heap() {
    let t = Tag {
        state: state::USED,
        order: 9,
        owner: 3,
        lead: 4,
    };
    let w = encode(42, 1024, t);
    assert_eq!(decode(42, 1024, w), Some(t));
    assert_eq!(decode(42, 2048, w), None, "moved to another offset");
    assert_eq!(decode(43, 1024, w), None, "another heap");
    assert_eq!(decode(42, 1024, w ^ 1), None, "a flipped bit");
}

#[test]
fn a_zero_section_becomes_an_allocator_that_tiles_it_and_frees_back_to_one_state() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1)]);
    let (mut size, max) = (64 * 1024, 64 * 1024);
    assert_eq!(stats(&m, RegionOffset(OFF), size), Ok(None));
    let (d, usable) = alloc(&m, &mut size, max, me(0), &peers, (100, 8, false)).expect("alloc");
    assert_eq!(usable, 128 - 16);
    assert_eq!(d % 16, 0);
    let s = checked(&m, size);
    assert_eq!((s.in_use, s.count), (128, 1));
    assert_eq!(s.arena, 64 * 1024 - HEADER_SIZE);
    let fresh_largest = 32 * 1024;
    assert_eq!(s.largest_free, fresh_largest);
    assert_eq!(free(&m, size, max, me(0), &peers, d), Ok(usable));
    let s = checked(&m, size);
    assert_eq!((s.in_use, s.count, s.free), (0, 0, s.arena));
    assert_eq!(s.largest_free, fresh_largest);
}

#[test]
fn aligned_blocks_are_aligned_and_free_through_their_lead_record() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1)]);
    let (mut size, max) = (256 * 1024, 256 * 1024);
    let mut got = Vec::new();
    for align in [1u64, 16, 32, 64, 4096, 65536] {
        let (d, u) = alloc(&m, &mut size, max, me(0), &peers, (24, align, false)).expect("alloc");
        assert_eq!(d % align, 0, "align {align}");
        assert!(u >= 24);
        got.push(d);
    }
    checked(&m, size);
    for d in got {
        free(&m, size, max, me(0), &peers, d).expect("free");
    }
    assert_eq!(checked(&m, size).in_use, 0);
}

#[test]
fn bad_frees_are_refused_with_their_status_and_change_nothing() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1)]);
    let (mut size, max) = (64 * 1024, 64 * 1024);
    let (d, _) = alloc(&m, &mut size, max, me(0), &peers, (100, 8, false)).expect("alloc");
    let (d2, _) = alloc(&m, &mut size, max, me(0), &peers, (1000, 64, false)).expect("alloc");
    let before = checked(&m, size);
    let bad = |data: u64| free(&m, size, max, me(0), &peers, data);
    // Forged or foreign offsets: not a block.
    for data in [
        0,
        8,
        16,
        HEADER_SIZE,
        d + 16,
        d - 8,
        d2 - 16,
        size + 16,
        u64::MAX,
    ] {
        let e = bad(data).expect_err("refused");
        assert_eq!(e.status(), Status::InvalidParameter, "{data:#x}: {e:?}");
    }
    // Wrong size.
    let heap = Heap::new(&m, RegionOffset(OFF), size, max, 7).expect("heap");
    let e = heap.lock(me(0), &peers).expect("lock").free(d, Some(5));
    assert_eq!(e, Err(BlockError::WrongSize { size: 112 }));
    assert_eq!(checked(&m, size), before);
    // Double free.
    free(&m, size, max, me(0), &peers, d).expect("first free");
    assert_eq!(bad(d), Err(BlockError::DoubleFree { offset: d }));
    assert_eq!(
        bad(d).map_err(BlockError::status),
        Err(Status::InvalidParameter)
    );
    // A scribbled header: refused, the rest keeps working.
    m.store_u64(
        OFF + d2 - 64,
        0x1234_5678,
        core::sync::atomic::Ordering::SeqCst,
    )
    .expect("scribble");
    assert!(matches!(bad(d2), Err(BlockError::NotABlock { .. })));
    let (d3, _) = alloc(&m, &mut size, max, me(0), &peers, (10, 8, false)).expect("alloc");
    free(&m, size, max, me(0), &peers, d3).expect("free");
    // A block of another section: its offset is no block here, and the two allocators
    // have different heap ids (the guest library's Block carries it and checks it first).
    let mut other = Buf::new(1 << 20);
    let om = other.region();
    let mut osize = 64 * 1024u64;
    let (od, _) = alloc(&om, &mut osize, max, me(0), &peers, (3000, 8, false)).expect("alloc");
    assert_eq!(
        free(&m, size, max, me(0), &peers, od).map_err(BlockError::status),
        Err(Status::InvalidParameter)
    );
    let id = |mem: &RawRegion<'_>| {
        let h = Heap::new(mem, RegionOffset(OFF), 64 * 1024, max, 0).expect("heap");
        let g = h.lock(me(0), &peers).expect("lock");
        g.heap_id()
    };
    assert_ne!(id(&m), 0);
    assert_eq!(id(&m), id(&m));
    let _ = (om.size(), osize);
    // The scribbled header is what a check of the whole allocator reports.
    assert_eq!(
        verify(&m, RegionOffset(OFF), size),
        Err(BlockError::Corrupt { offset: d2 - 64 })
    );
}

#[test]
fn a_section_holding_data_is_not_taken_for_an_allocator() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1)]);
    m.write_bytes(OFF + 100, b"user data").expect("write");
    let heap = Heap::new(&m, RegionOffset(OFF), 8192, 8192, 1).expect("heap");
    assert_eq!(heap.lock(me(0), &peers).err(), Some(BlockError::NotAHeap));
    assert_eq!(stats(&m, RegionOffset(OFF), 8192), Ok(None));
}

#[test]
fn growth_is_asked_for_only_up_to_the_max_size() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1)]);
    let (mut size, max) = (1024, 64 * 1024);
    // 16 KiB of data needs a 32 KiB block, which needs a 64 KiB section.
    let (d, _) = alloc(&m, &mut size, max, me(0), &peers, (16 * 1024, 8, false)).expect("fits");
    assert_eq!(size, 64 * 1024);
    assert_eq!(d, 32 * 1024 + 16);
    let e = alloc(&m, &mut size, max, me(0), &peers, (16 * 1024, 8, false));
    assert_eq!(e, Err(BlockError::NoMemory));
    assert_eq!(BlockError::NoMemory.status(), Status::NoMemory);
    checked(&m, size);
}

#[test]
fn a_lock_of_a_gone_peer_or_dead_token_is_broken_and_a_live_one_is_not() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1), (1, 2)]);
    let (size, max) = (8192, 8192);
    let heap = Heap::new(&m, RegionOffset(OFF), size, max, 1).expect("heap");
    let held = heap.lock(me(1), &peers).expect("lock");
    core::mem::forget(held); // peer 1 stops here
    assert!(matches!(
        heap.lock(me(0), &peers),
        Err(BlockError::Busy { .. })
    ));
    // Another process of peer 1, while the first is alive: waits.
    let sibling = Me { token: 9, ..me(1) };
    assert!(matches!(
        heap.lock(sibling, &peers),
        Err(BlockError::Busy { .. })
    ));
    peers.dead_tokens.borrow_mut().push(1);
    let g = heap.lock(sibling, &peers).expect("dead token: broken");
    assert!(g.recovered());
    core::mem::forget(g);
    peers.kill(1);
    let g = heap.lock(me(0), &peers).expect("gone peer: broken");
    assert!(g.recovered());
    drop(g);
    assert_eq!(checked(&m, size).recoveries, 2);
}

#[test]
fn owned_blocks_of_a_gone_peer_are_reclaimed_by_the_next_locker() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let peers = FakePeers::with(&[(0, 1), (1, 2)]);
    let (mut size, max) = (64 * 1024, 64 * 1024);
    let (kept, _) = alloc(&m, &mut size, max, me(1), &peers, (100, 8, false)).expect("alloc");
    let (owned, _) = alloc(&m, &mut size, max, me(1), &peers, (100, 8, true)).expect("alloc");
    assert_eq!(checked(&m, size).owned, 1);
    peers.kill(1);
    let heap = Heap::new(&m, RegionOffset(OFF), size, max, 7).expect("heap");
    drop(heap.lock(me(0), &peers).expect("lock"));
    let s = checked(&m, size);
    assert_eq!((s.owned, s.count, s.reclaimed), (0, 1, 1));
    assert!(matches!(
        free(&m, size, max, me(0), &peers, owned),
        Err(BlockError::DoubleFree { .. })
    ));
    free(&m, size, max, me(0), &peers, kept).expect("persistent block stays until freed");
}

/// A SharedMemory that "dies" after `budget` writes: every later store, CAS or byte write
/// fails and changes nothing, as if the peer had been killed there.
struct Dying<'a> {
    inner: &'a RawRegion<'a>,
    budget: Cell<u64>,
}

impl Dying<'_> {
    fn spend(&self, offset: u64) -> Result<(), Fault> {
        match self.budget.get() {
            0 => Err(Fault::ReadOnly { offset }),
            n => {
                self.budget.set(n - 1);
                Ok(())
            }
        }
    }
}

impl SharedMemory for Dying<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn load_u32(&self, o: u64, ord: core::sync::atomic::Ordering) -> Result<u32, Fault> {
        self.inner.load_u32(o, ord)
    }
    fn load_u64(&self, o: u64, ord: core::sync::atomic::Ordering) -> Result<u64, Fault> {
        self.inner.load_u64(o, ord)
    }
    fn store_u32(&self, o: u64, v: u32, ord: core::sync::atomic::Ordering) -> Result<(), Fault> {
        self.spend(o)?;
        self.inner.store_u32(o, v, ord)
    }
    fn store_u64(&self, o: u64, v: u64, ord: core::sync::atomic::Ordering) -> Result<(), Fault> {
        self.spend(o)?;
        self.inner.store_u64(o, v, ord)
    }
    fn cas_u32(&self, o: u64, c: u32, n: u32) -> Result<Result<u32, u32>, Fault> {
        self.spend(o)?;
        self.inner.cas_u32(o, c, n)
    }
    fn cas_u64(&self, o: u64, c: u64, n: u64) -> Result<Result<u64, u64>, Fault> {
        self.spend(o)?;
        self.inner.cas_u64(o, c, n)
    }
    fn fetch_and_u64(&self, o: u64, m: u64) -> Result<u64, Fault> {
        self.spend(o)?;
        self.inner.fetch_and_u64(o, m)
    }
    fn fetch_or_u64(&self, o: u64, b: u64) -> Result<u64, Fault> {
        self.spend(o)?;
        self.inner.fetch_or_u64(o, b)
    }
    fn read_bytes(&self, o: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.inner.read_bytes(o, buf)
    }
    fn write_bytes(&self, o: u64, d: &[u8]) -> Result<(), Fault> {
        self.spend(o)?;
        self.inner.write_bytes(o, d)
    }
}

/// What the dying peer does.
#[derive(Clone, Copy, Debug)]
enum Step {
    Init,
    Alloc(u64, u64),
    Free,
    Grow,
}

#[test]
fn a_peer_killed_after_any_write_of_any_operation_leaves_a_recoverable_allocator() {
    for step in [
        Step::Init,
        Step::Alloc(24, 8),
        Step::Alloc(3000, 8),
        Step::Alloc(100, 256),
        Step::Free,
        Step::Grow,
    ] {
        let mut n = 0u64;
        loop {
            let mut b = Buf::new(1 << 20);
            let m = b.region();
            let peers = FakePeers::with(&[(0, 1), (1, 2)]);
            let max = 64 * 1024;
            let mut size = if matches!(step, Step::Grow) {
                8192
            } else {
                max
            };
            let mut mine = Vec::new();
            if !matches!(step, Step::Init) {
                for (len, align) in [(100, 8), (2000, 8), (40, 64), (500, 8)] {
                    mine.push(
                        alloc(&m, &mut size, max, me(0), &peers, (len, align, false))
                            .expect("setup")
                            .0,
                    );
                }
                free(&m, size, max, me(0), &peers, mine.remove(1)).expect("setup free");
            }
            let victim = if matches!(step, Step::Free) {
                alloc(&m, &mut size, max, me(1), &peers, (700, 8, true))
                    .expect("setup")
                    .0
            } else {
                0
            };
            let dying = Dying {
                inner: &m,
                budget: Cell::new(n),
            };
            let grown = if matches!(step, Step::Grow) {
                max
            } else {
                size
            };
            let heap = Heap::new(&dying, RegionOffset(OFF), grown, max, 7).expect("heap");
            let finished = heap.lock(me(1), &peers).and_then(|mut g| match step {
                Step::Init | Step::Grow => Ok(()),
                Step::Alloc(len, align) => {
                    g.allocate(len, align, Some((PeerSlot(1), 2))).map(|_| ())
                }
                Step::Free => g.free(victim, None).map(|_| ()),
            });
            let survived = finished.is_ok() && dying.budget.get() > 0;
            // Peer 1 is gone (vshmd says so); peer 0 carries on.
            peers.kill(1);
            let size = grown;
            let heap = Heap::new(&m, RegionOffset(OFF), size, max, 7).expect("heap");
            drop(
                heap.lock(me(0), &peers)
                    .unwrap_or_else(|e| panic!("{step:?} after {n} writes: {e:?}")),
            );
            let s = checked(&m, size);
            assert_eq!(
                s.owned, 0,
                "{step:?}/{n}: the dead peer's owned block is reclaimed"
            );
            for d in mine {
                free(&m, size, max, me(0), &peers, d)
                    .unwrap_or_else(|e| panic!("{step:?}/{n}: {e:?}"));
            }
            let s = checked(&m, size);
            assert_eq!((s.in_use, s.count, s.free), (0, 0, s.arena), "{step:?}/{n}");
            assert_eq!(
                s.arena,
                size - HEADER_SIZE,
                "{step:?}/{n}: the whole section is tiled"
            );
            assert_eq!(s.largest_free, model_largest(size & !31, &BTreeMap::new()));
            if survived {
                break;
            }
            n += 1;
            assert!(n < 10_000, "{step:?} never finished");
        }
    }
}

#[test]
fn peers_on_threads_never_get_overlapping_blocks() {
    let mut b = Buf::new(1 << 20);
    let m = b.region();
    let max = 256 * 1024u64;
    struct Shared;
    impl Peers for Shared {
        fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
            Some(u64::from(slot.0) + 1)
        }
        fn token_alive(&self, _: u32) -> bool {
            true
        }
        fn fingerprint(&self) -> u64 {
            1
        }
    }
    let size = std::sync::atomic::AtomicU64::new(4096);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (m, size) = (&m, &size);
            s.spawn(move || {
                let mut held: Vec<(u64, u64)> = Vec::new();
                for i in 0..300u64 {
                    if i % 3 == 2 {
                        if let Some((d, u)) = held.pop() {
                            let mut buf = vec![0u8; usize::try_from(u).expect("small")];
                            m.read_bytes(OFF + d, &mut buf).expect("read");
                            assert!(buf.iter().all(|&x| x == tag_byte(t)), "overwritten");
                            loop {
                                let sz = size.load(core::sync::atomic::Ordering::SeqCst);
                                let heap =
                                    Heap::new(m, RegionOffset(OFF), sz, max, 3).expect("heap");
                                match heap.lock(me(t), &Shared) {
                                    Ok(mut g) => {
                                        g.free(d, Some(u)).expect("free");
                                        break;
                                    }
                                    Err(BlockError::Busy { .. } | BlockError::Stale) => {
                                        std::thread::yield_now()
                                    }
                                    Err(e) => panic!("{e:?}"),
                                };
                            }
                        }
                        continue;
                    }
                    let len = 1 + (i * 37 + u64::from(t) * 11) % 700;
                    let r = loop {
                        let sz = size.load(core::sync::atomic::Ordering::SeqCst);
                        let heap = Heap::new(m, RegionOffset(OFF), sz, max, 3).expect("heap");
                        match heap
                            .lock(me(t), &Shared)
                            .and_then(|mut g| g.allocate(len, 8, None))
                        {
                            Ok(r) => break Some(r),
                            Err(BlockError::NeedGrow { min_size }) => {
                                size.fetch_max(min_size, core::sync::atomic::Ordering::SeqCst);
                            }
                            Err(BlockError::NoMemory) => break None,
                            Err(BlockError::Busy { .. } | BlockError::Stale) => {
                                std::thread::yield_now()
                            }
                            Err(e) => panic!("{e:?}"),
                        }
                    };
                    if let Some((d, u)) = r {
                        m.write_bytes(
                            OFF + d,
                            &vec![tag_byte(t); usize::try_from(u).expect("small")],
                        )
                        .expect("write");
                        held.push((d, u));
                    }
                }
                for (d, u) in held {
                    let mut buf = vec![0u8; usize::try_from(u).expect("small")];
                    m.read_bytes(OFF + d, &mut buf).expect("read");
                    assert!(buf.iter().all(|&x| x == tag_byte(t)), "overwritten");
                }
            });
        }
    });
    checked(&m, size.load(core::sync::atomic::Ordering::SeqCst));
}

fn tag_byte(t: u32) -> u8 {
    u8::try_from(t + 1).expect("small")
}

/// The model's largest free block: free blocks are the maximal buddy-tree nodes of
/// `[512, covered)` that hold no used block (full coalescing).
fn model_largest(covered: u64, used: &BTreeMap<u64, u64>) -> u64 {
    fn node(a: u64, size: u64, used: &BTreeMap<u64, u64>) -> u64 {
        let inside = used.range(a..a + size).next();
        let straddles = used
            .range(..a)
            .next_back()
            .is_some_and(|(&o, &s)| o + s > a);
        match (inside, straddles) {
            (None, false) => size,
            (Some((&o, &s)), _) if o == a && s == size => 0,
            _ if size > 1 << MIN_ORDER => {
                node(a, size / 2, used).max(node(a + size / 2, size / 2, used))
            }
            _ => 0,
        }
    }
    let mut p = HEADER_SIZE;
    let mut best = 0;
    while p + (1 << MIN_ORDER) <= covered {
        let mut k = p.trailing_zeros().min(MAX_ORDER);
        while p + (1 << k) > covered {
            k -= 1;
        }
        best = best.max(node(p, 1 << k, used));
        p += 1 << k;
    }
    best
}

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        peer: u32,
        len: u64,
        align_log: u32,
        owned: bool,
    },
    Free {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..4u32, 1..3000u64, 0..8u32, any::<bool>()).prop_map(|(peer, len, align_log, owned)| Op::Alloc { peer, len, align_log, owned }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_allocations_and_frees_from_several_peers_match_the_model(
        ops in proptest::collection::vec(op(), 1..120),
        initial in 1024u64..16384,
    ) {
        let mut b = Buf::new(1 << 20);
        let m = b.region();
        let peers = FakePeers::with(&[(0, 1), (1, 2), (2, 3), (3, 4)]);
        let max = 128 * 1024u64;
        let mut size = initial;
        // Model: block start → block size, and data offset → (block start, peer).
        let mut used: BTreeMap<u64, u64> = BTreeMap::new();
        let mut live: Vec<(u64, u64, u32)> = Vec::new();
        let heap = Heap::new(&m, RegionOffset(OFF), size, max, 7).expect("heap");
        drop(heap.lock(me(0), &peers).expect("initialise"));
        for op in ops {
            match op {
                Op::Alloc { peer, len, align_log, owned } => {
                    let align = 1u64 << align_log;
                    let (order, lead) = order_for(len, align).expect("order");
                    match alloc(&m, &mut size, max, me(peer), &peers, (len, align, owned)) {
                        Ok((d, usable)) => {
                            prop_assert_eq!(d % align, 0);
                            prop_assert!(usable >= len);
                            let start = d - lead;
                            let bsize = 1u64 << order;
                            prop_assert!(start >= HEADER_SIZE && start + bsize <= size);
                            prop_assert!(used.range(..start + bsize).next_back().is_none_or(|(&o, &s)| o + s <= start), "overlap at {:#x}", start);
                            used.insert(start, bsize);
                            live.push((d, start, peer));
                        }
                        Err(BlockError::NoMemory) => {
                            // Only when even the max size could not hold it.
                            prop_assert!(model_largest(max & !31, &used) < 1u64 << order);
                        }
                        Err(e) => prop_assert!(false, "alloc: {:?}", e),
                    }
                }
                Op::Free { pick } => {
                    if live.is_empty() { continue; }
                    let (d, start, peer) = live.swap_remove(pick % live.len());
                    let bsize = used.remove(&start).expect("model");
                    let usable = free(&m, size, max, me(peer), &peers, d).expect("free");
                    prop_assert!(usable < bsize);
                    // A double free: refused (reported as a double free unless the free
                    // list links overwrote an aligned block's lead record).
                    let again = free(&m, size, max, me(peer), &peers, d);
                    prop_assert!(matches!(again, Err(BlockError::DoubleFree { .. } | BlockError::NotABlock { .. })), "{:?}", again);
                }
            }
            let s = checked(&m, size);
            let in_use: u64 = used.values().sum();
            prop_assert_eq!(s.in_use, in_use);
            prop_assert_eq!(s.count, used.len() as u64);
            prop_assert_eq!(s.free, s.arena - in_use);
            prop_assert_eq!(s.largest_free, model_largest(s.arena + HEADER_SIZE, &used));
            prop_assert_eq!(s.fragmentation, fragmentation(s.free, s.largest_free));
        }
        for (d, _, peer) in live {
            free(&m, size, max, me(peer), &peers, d).expect("free");
        }
        let s = checked(&m, size);
        prop_assert_eq!((s.in_use, s.count, s.free), (0, 0, s.arena));
        prop_assert_eq!(s.largest_free, model_largest(s.arena + HEADER_SIZE, &BTreeMap::new()));
    }
}
