//! Attacks on the allocator's recovery: a scribbled free-list link met in the middle of an
//! operation must never make a block listed twice (overlapping blocks for honest peers).

use core::ptr::NonNull;
use std::vec::Vec;

use super::*;
use crate::shm::RawRegion;

const OFF: u64 = 4096;
const SIZE: u64 = 4096;
const SIZE_USIZE: usize = 4096;

struct Nobody;

impl Peers for Nobody {
    fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
        (slot.0 == 0).then_some(1)
    }
    fn token_alive(&self, _: u32) -> bool {
        true
    }
    fn fingerprint(&self) -> u64 {
        1
    }
}

const ME: Me = Me {
    slot: PeerSlot(0),
    incarnation: 1,
    token: 1,
};

fn with_heap<R>(mem: &RawRegion<'_>, f: impl FnOnce(&mut Guard<'_, '_, RawRegion<'_>>) -> R) -> R {
    let heap = Heap::new(mem, RegionOffset(OFF), SIZE, SIZE, 7).expect("heap");
    let mut g = heap.lock(ME, &Nobody).expect("lock");
    f(&mut g)
}

#[test]
fn a_free_that_meets_a_scribbled_list_head_never_lists_a_block_twice() {
    let mut buf: Vec<u64> = vec![0; 4 * SIZE_USIZE / 8];
    let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
    // SAFETY: buf outlives the region; 8-aligned; its whole length.
    let mem = unsafe { RawRegion::new(base, 4 * SIZE) };
    // Two buddies of order 5 at 512 and 544, both used.
    let a = with_heap(&mem, |g| g.allocate(16, 1, None)).expect("a");
    let b = with_heap(&mem, |g| g.allocate(16, 1, None)).expect("b");
    assert_eq!((a.0, b.0), (512 + 16, 544 + 16));
    with_heap(&mem, |g| g.free(a.0, None)).expect("free a");
    // Scribble the head of the order-6 list: the merge of b with a meets it.
    mem.store_u64(OFF + head_off(6), 8, Ordering::SeqCst)
        .expect("scribble");
    with_heap(&mem, |g| g.free(b.0, None)).expect("free b");
    assert!(
        verify(&mem, RegionOffset(OFF), SIZE).is_ok(),
        "the rebuild left a consistent allocator: {:?}",
        verify(&mem, RegionOffset(OFF), SIZE)
    );
    // Everything is free again: a 16-byte block and a 496-byte block must not overlap.
    let small = with_heap(&mem, |g| g.allocate(16, 1, None)).expect("small");
    let large = with_heap(&mem, |g| g.allocate(496, 1, None)).expect("large");
    let (s0, s1) = (small.0 - 16, small.0 - 16 + 32);
    let (l0, l1) = (large.0 - 16, large.0 - 16 + 512);
    assert!(
        s1 <= l0 || l1 <= s0,
        "blocks [{s0:#x}, {s1:#x}) and [{l0:#x}, {l1:#x}) overlap"
    );
    assert!(
        verify(&mem, RegionOffset(OFF), SIZE).is_ok(),
        "{:?}",
        verify(&mem, RegionOffset(OFF), SIZE)
    );
}
