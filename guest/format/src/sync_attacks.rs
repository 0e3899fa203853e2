//! Attacks on the sync words as the host touches them: a peer that rewrites a word between
//! every load and CAS of the host must not keep the host (one thread serving every peer)
//! in a loop.

use core::ptr::NonNull;
use core::sync::atomic::Ordering;
use std::vec::Vec;

use crate::ids::{ObjectSlot, PeerSlot};
use crate::layout::{Layout, OBJ_SIGNAL_SEQ_OFF, OBJ_WAITERS_OFF};
use crate::shm::{Fault, RawRegion, SharedMemory};
use crate::sync;

const SIZE: u64 = 1 << 20;

/// A region where a hostile peer sets one more bit of the word at `target` (waiters) or
/// adds 1 to it (counter) right before every CAS on it: the CAS always fails.
struct Racing<'a> {
    inner: RawRegion<'a>,
    target: u64,
}

impl SharedMemory for Racing<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn load_u32(&self, o: u64, ord: Ordering) -> Result<u32, Fault> {
        self.inner.load_u32(o, ord)
    }
    fn load_u64(&self, o: u64, ord: Ordering) -> Result<u64, Fault> {
        self.inner.load_u64(o, ord)
    }
    fn store_u32(&self, o: u64, v: u32, ord: Ordering) -> Result<(), Fault> {
        self.inner.store_u32(o, v, ord)
    }
    fn store_u64(&self, o: u64, v: u64, ord: Ordering) -> Result<(), Fault> {
        self.inner.store_u64(o, v, ord)
    }
    fn cas_u32(&self, o: u64, c: u32, n: u32) -> Result<Result<u32, u32>, Fault> {
        self.inner.cas_u32(o, c, n)
    }
    fn cas_u64(&self, o: u64, c: u64, n: u64) -> Result<Result<u64, u64>, Fault> {
        if o == self.target {
            let v = self.inner.load_u64(o, Ordering::SeqCst)?;
            self.inner
                .store_u64(o, v.wrapping_add(1) | 1, Ordering::SeqCst)?;
        }
        self.inner.cas_u64(o, c, n)
    }
    fn fetch_and_u64(&self, o: u64, m: u64) -> Result<u64, Fault> {
        self.inner.fetch_and_u64(o, m)
    }
    fn fetch_or_u64(&self, o: u64, b: u64) -> Result<u64, Fault> {
        self.inner.fetch_or_u64(o, b)
    }
    fn read_bytes(&self, o: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.inner.read_bytes(o, buf)
    }
    fn write_bytes(&self, o: u64, d: &[u8]) -> Result<(), Fault> {
        self.inner.write_bytes(o, d)
    }
}

/// Runs `f` against a racing region whose hostile word is field `field` of object 1;
/// `true` if it returned within two seconds.
fn returns_in_time(field: u64, f: fn(&Racing<'_>, &Layout) -> bool) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf: Vec<u64> = vec![0; (1 << 20) / 8];
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: buf outlives the region; 8-aligned; SIZE bytes.
        let inner = unsafe { RawRegion::new(base, SIZE) };
        let layout = Layout::compute(SIZE, 4, 8, 2, 4096).expect("layout");
        let target = layout.object_entry(ObjectSlot(1)).expect("entry") + field;
        let mem = Racing { inner, target };
        let _ = tx.send(f(&mem, &layout));
    });
    rx.recv_timeout(std::time::Duration::from_secs(2))
        .unwrap_or(false)
}

#[test]
fn the_host_takes_the_waiters_word_even_while_a_peer_keeps_rewriting_it() {
    assert!(
        returns_in_time(OBJ_WAITERS_OFF, |m, l| {
            sync::register_waiter(m, l, ObjectSlot(1), PeerSlot(2)).expect("register");
            sync::take_waiters(m, l, ObjectSlot(1)).is_ok()
        }),
        "take_waiters spins as long as a peer rewrites the word"
    );
}

#[test]
fn the_host_counts_a_handoff_even_while_a_peer_keeps_rewriting_the_counter() {
    assert!(
        returns_in_time(OBJ_SIGNAL_SEQ_OFF, |m, l| {
            sync::host_count_change(m, l, ObjectSlot(1)).is_ok()
        }),
        "host_count_change spins as long as a peer rewrites the counter"
    );
}
