//! Unit tests of the index logic, the property tests (any interleaving keeps the stream and
//! the frames), the hostile-peer tests (scribbled indices and lengths are `Corrupt`, and
//! nothing outside the ring is touched) and a two-thread stream.

// Test data are byte patterns cut from counters: truncation is what is meant.
#![allow(clippy::cast_possible_truncation)]

use core::cell::RefCell;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::shm::{RawRegion, SharedMemory};

/// The ring's header lies at this offset of the test memory (a section would put it at
/// its own offset plus the ring's).
const OFF: u64 = 4096;

struct Buf(Vec<u64>);

impl Buf {
    fn new(bytes: u64) -> Buf {
        Buf(vec![0u64; usize::try_from(bytes / 8).expect("small")])
    }
    fn region(&mut self) -> RawRegion<'_> {
        let len = self.0.len() as u64 * 8;
        let base = NonNull::new(self.0.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: the Vec outlives the region (borrowed mutably for its lifetime), is
        // 8-aligned and `len` bytes long.
        unsafe { RawRegion::new(base, len) }
    }
}

/// Memory a ring of `capacity` at [`OFF`] fits in, with room before and after it.
fn buf_for(capacity: u64) -> Buf {
    Buf::new(OFF + HEADER_SIZE + capacity + 4096)
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn with_watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the test finished before its watchdog")
}

#[test]
fn used_accepts_every_state_from_empty_to_full_and_nothing_else() {
    assert_eq!(used(10, 10, 64), Ok(0));
    assert_eq!(used(74, 10, 64), Ok(64));
    assert_eq!(used(u64::MAX, u64::MAX - 64, 64), Ok(64));
    let corrupt = |head, tail| RingError::Corrupt {
        head,
        tail,
        capacity: 64,
    };
    assert_eq!(used(75, 10, 64), Err(corrupt(75, 10)));
    assert_eq!(used(9, 10, 64), Err(corrupt(9, 10)));
    assert_eq!(used(0, u64::MAX, 64), Err(corrupt(0, u64::MAX)));
}

#[test]
fn runs_split_a_span_only_where_it_wraps_around_the_end_of_the_data_area() {
    let mut b = buf_for(64);
    let r = Ring::create(&b.region(), OFF, 64, u64::MAX).expect("create");
    let data = OFF + HEADER_SIZE;
    assert_eq!(r.runs(0, 64), [(data, 64), (data, 0)]);
    assert_eq!(r.runs(64 * 7 + 10, 20), [(data + 10, 20), (data, 0)]);
    assert_eq!(r.runs(60, 10), [(data + 60, 4), (data, 6)]);
    assert_eq!(r.runs(u64::MAX, 2), [(data + 63, 1), (data, 1)]);
    // Never longer than the data area, whatever is asked.
    assert_eq!(r.runs(1, u64::MAX), [(data + 1, 63), (data, 1)]);
}

#[test]
fn geometry_refuses_misaligned_offsets_bad_capacities_and_rings_that_do_not_fit() {
    assert_eq!(check_geometry(4096, 1024, 4096 + 384 + 1024), Ok(()));
    assert_eq!(
        check_geometry(4100, 1024, u64::MAX),
        Err(RingError::Misaligned { offset: 4100 })
    );
    for capacity in [0, 1, 32, 1000, MAX_CAPACITY * 2, u64::MAX] {
        assert_eq!(
            check_geometry(0, capacity, u64::MAX),
            Err(RingError::BadCapacity { capacity })
        );
    }
    assert_eq!(
        check_geometry(4096, 1024, 4096 + 1024),
        Err(RingError::TooSmall {
            need: 384 + 1024,
            room: 1024
        })
    );
    assert_eq!(
        check_geometry(u64::MAX - 63, 64, u64::MAX),
        Err(RingError::TooSmall {
            need: 384 + 64,
            room: 63
        })
    );
}

#[test]
fn create_stores_the_magic_last_and_attach_finds_the_same_ring() {
    let mut b = buf_for(256);
    let mem = b.region();
    let limit = OFF + HEADER_SIZE + 256;
    let r = Ring::create(&mem, OFF, 256, limit).expect("create");
    assert_eq!(mem.load_u64(OFF, Ordering::SeqCst), Ok(MAGIC));
    let h: RingHeader = read_pod(&mem, OFF).expect("header");
    assert_eq!((h.version, h.header_size, h.capacity), (1, 384, 256));
    assert_eq!((h.head, h.tail), (0, 0));
    assert_eq!(Ring::attach(&mem, OFF, limit), Ok(r));
    assert_eq!(r.end(), limit);
    // The capacity is read once: a later scribble changes nothing for an attached side.
    mem.store_u64(OFF + CAPACITY_OFF, 1 << 40, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(r.capacity(), 256);
    assert_eq!(
        Ring::attach(&mem, OFF, limit),
        Err(RingError::TooSmall {
            need: 384 + (1 << 40),
            room: 384 + 256
        })
    );
}

#[test]
fn a_second_create_is_refused_and_attach_refuses_what_is_not_a_ready_ring() {
    let mut b = buf_for(256);
    let mem = b.region();
    assert_eq!(
        Ring::attach(&mem, OFF, u64::MAX),
        Err(RingError::NotARing { magic: 0 })
    );
    Ring::create(&mem, OFF, 256, u64::MAX).expect("create");
    assert_eq!(
        Ring::create(&mem, OFF, 256, u64::MAX),
        Err(RingError::InUse { magic: MAGIC })
    );
    mem.store_u64(OFF, MAGIC_INIT, Ordering::SeqCst)
        .expect("store");
    assert_eq!(
        Ring::attach(&mem, OFF, u64::MAX),
        Err(RingError::NotARing { magic: MAGIC_INIT })
    );
    mem.store_u64(OFF, MAGIC, Ordering::SeqCst).expect("store");
    mem.store_u32(OFF + 8, 2, Ordering::SeqCst).expect("store");
    assert_eq!(
        Ring::attach(&mem, OFF, u64::MAX),
        Err(RingError::Version { found: 2 })
    );
    mem.store_u32(OFF + 8, 1, Ordering::SeqCst).expect("store");
    mem.store_u32(OFF + 12, 64, Ordering::SeqCst)
        .expect("store");
    assert_eq!(
        Ring::attach(&mem, OFF, u64::MAX),
        Err(RingError::HeaderSize { found: 64 })
    );
    assert_eq!(
        Ring::attach(&mem, OFF + 8, u64::MAX),
        Err(RingError::Misaligned { offset: OFF + 8 })
    );
}

#[test]
fn bytes_written_are_read_back_in_order_across_the_wrap() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    let data: Vec<u8> = (0..100).collect();
    assert_eq!(
        p.write(&mem, &data),
        Ok(64),
        "a full ring takes its capacity"
    );
    assert_eq!(p.write(&mem, &data[64..]), Ok(0), "and then nothing");
    let mut out = [0u8; 50];
    assert_eq!(c.read(&mem, &mut out), Ok(50));
    assert_eq!(&out[..], &data[..50]);
    assert_eq!(p.write(&mem, &data[64..]), Ok(36), "wraps around the end");
    let mut rest = [0u8; 100];
    assert_eq!(c.read(&mem, &mut rest), Ok(50));
    assert_eq!(&rest[..50], &data[50..]);
    assert_eq!(c.read(&mem, &mut rest), Ok(0), "empty");
    assert_eq!((p.head(), c.tail()), (100, 100));
}

#[test]
fn frames_wrap_around_the_end_prefix_and_payload_alike() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    let mut out = [0u8; 60];
    // Move the indices so that successive frames split their prefix, then their payload.
    for shift in 0..70u8 {
        let frame: Vec<u8> = (0..shift % 50).map(|i| i ^ shift).collect();
        assert_eq!(p.send_frame(&mem, &frame), Ok(true), "shift {shift}");
        assert_eq!(c.peek_frame(&mem), Ok(Some(frame.len() as u64)));
        assert_eq!(c.recv_frame(&mem, &mut out), Ok(Some(frame.len())));
        assert_eq!(&out[..frame.len()], &frame[..]);
        assert_eq!(c.recv_frame(&mem, &mut out), Ok(None));
        let filler = [shift; 3];
        assert_eq!(
            p.send_frame(&mem, &filler[..usize::from(shift % 3)]),
            Ok(true)
        );
        assert!(c.recv_frame(&mem, &mut out).expect("filler").is_some());
    }
}

#[test]
fn a_frame_that_can_never_fit_is_refused_and_one_that_does_not_fit_now_waits() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    assert_eq!(
        p.send_frame(&mem, &[0; 61]),
        Err(RingError::FrameTooLarge { len: 61, max: 60 })
    );
    assert_eq!(p.head(), 0, "nothing written");
    assert_eq!(p.send_frame(&mem, &[7; 30]), Ok(true));
    assert_eq!(p.send_frame(&mem, &[8; 30]), Ok(false), "34 + 34 > 64");
    let mut out = [0u8; 60];
    assert_eq!(c.recv_frame(&mem, &mut out), Ok(Some(30)));
    assert_eq!(p.send_frame(&mem, &[8; 60]), Ok(true), "the longest frame");
    assert_eq!(c.recv_frame(&mem, &mut out), Ok(Some(60)));
    assert_eq!(out, [8; 60]);
}

#[test]
fn a_buffer_shorter_than_the_frame_is_refused_and_the_frame_stays() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    assert_eq!(p.send_frame(&mem, b"hello"), Ok(true));
    assert_eq!(
        c.recv_frame(&mem, &mut [0u8; 4]),
        Err(RingError::BufferTooSmall { need: 5, have: 4 })
    );
    let mut out = [0u8; 5];
    assert_eq!(c.recv_frame(&mem, &mut out), Ok(Some(5)));
    assert_eq!(&out, b"hello");
}

// ---- the hostile peer ----

/// Memory that records every access: (is a write, offset, length).
struct Recorder<'a> {
    mem: RawRegion<'a>,
    log: RefCell<Vec<(bool, u64, u64)>>,
}

impl<'a> Recorder<'a> {
    fn new(mem: RawRegion<'a>) -> Self {
        Recorder {
            mem,
            log: RefCell::new(Vec::new()),
        }
    }
    fn note(&self, write: bool, offset: u64, len: u64) {
        self.log.borrow_mut().push((write, offset, len));
    }
    /// Asserts that every access since the last call read inside the ring and wrote only its
    /// data area or `own` (the index this side stores).
    fn check(&self, ring: &Ring, own: u64) {
        let data = ring.offset() + HEADER_SIZE;
        for &(write, offset, len) in self.log.borrow().iter() {
            let end = offset + len;
            assert!(
                offset >= ring.offset() && end <= ring.end(),
                "access of {len} at {offset:#x} outside the ring"
            );
            if write {
                assert!(
                    (offset >= data && end <= ring.end()) || (offset == own && len == 8),
                    "write of {len} at {offset:#x} outside the data area and own index"
                );
            }
        }
        self.log.borrow_mut().clear();
    }
}

impl SharedMemory for Recorder<'_> {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        self.note(false, offset, 4);
        self.mem.load_u32(offset, order)
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        self.note(false, offset, 8);
        self.mem.load_u64(offset, order)
    }
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault> {
        self.note(true, offset, 4);
        self.mem.store_u32(offset, value, order)
    }
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault> {
        self.note(true, offset, 8);
        self.mem.store_u64(offset, value, order)
    }
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault> {
        self.note(true, offset, 4);
        self.mem.cas_u32(offset, current, new)
    }
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault> {
        self.note(true, offset, 8);
        self.mem.cas_u64(offset, current, new)
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault> {
        self.note(true, offset, 8);
        self.mem.fetch_and_u64(offset, mask)
    }
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault> {
        self.note(true, offset, 8);
        self.mem.fetch_or_u64(offset, bits)
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        self.note(false, offset, buf.len() as u64);
        self.mem.read_bytes(offset, buf)
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        self.note(true, offset, data.len() as u64);
        self.mem.write_bytes(offset, data)
    }
}

fn is_corrupt(e: &RingError) -> bool {
    matches!(
        e,
        RingError::Corrupt { .. } | RingError::CorruptFrame { .. }
    )
}

#[test]
fn a_head_beyond_the_capacity_or_behind_the_tail_is_corrupt_for_the_consumer() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    let mut out = [0u8; 64];
    for (head, tail) in [(65, 0), (u64::MAX, 0)] {
        mem.store_u64(OFF + HEAD_OFF, head, Ordering::SeqCst)
            .expect("scribble");
        assert_eq!(
            c.read(&mem, &mut out),
            Err(RingError::Corrupt {
                head,
                tail,
                capacity: 64
            })
        );
    }
    // The consumer's own index changed behind its back.
    mem.store_u64(OFF + HEAD_OFF, 10, Ordering::SeqCst)
        .expect("scribble");
    mem.store_u64(OFF + TAIL_OFF, 5, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(
        c.read(&mem, &mut out),
        Err(RingError::Corrupt {
            head: 10,
            tail: 5,
            capacity: 64
        })
    );
}

#[test]
fn a_tail_past_the_head_or_going_back_is_corrupt_for_the_producer() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    assert_eq!(p.write(&mem, &[1; 64]), Ok(64));
    mem.store_u64(OFF + TAIL_OFF, 65, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(
        p.write(&mem, &[1]),
        Err(RingError::Corrupt {
            head: 64,
            tail: 65,
            capacity: 64
        })
    );
    mem.store_u64(OFF + TAIL_OFF, 32, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(
        p.write(&mem, &[1]),
        Ok(1),
        "a tail that moved forward is fine"
    );
    mem.store_u64(OFF + TAIL_OFF, 0, Ordering::SeqCst)
        .expect("scribble");
    assert!(matches!(
        p.write(&mem, &[1; 64]),
        Err(RingError::Corrupt { tail: 0, .. })
    ));
}

#[test]
fn indices_near_two_to_the_64_are_corrupt_rather_than_overflowing() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let near = u64::MAX - 3;
    mem.store_u64(OFF + HEAD_OFF, near, Ordering::SeqCst)
        .expect("scribble");
    mem.store_u64(OFF + TAIL_OFF, near, Ordering::SeqCst)
        .expect("scribble");
    let mut p = Producer::new(&mem, ring).expect("a consistent state");
    assert_eq!(p.write(&mem, &[1; 3]), Ok(3));
    assert!(matches!(
        p.write(&mem, &[1; 3]),
        Err(RingError::Corrupt { .. })
    ));
    assert!(matches!(
        p.send_frame(&mem, &[]),
        Err(RingError::Corrupt { .. })
    ));
    let mut c = Consumer::new(&mem, ring).expect("a consistent state");
    let mut out = [0u8; 3];
    assert_eq!(c.read(&mem, &mut out), Ok(3));
}

#[test]
fn a_forged_frame_length_is_corrupt_and_nothing_is_taken() {
    let mut b = buf_for(64);
    let mem = b.region();
    let ring = Ring::create(&mem, OFF, 64, u64::MAX).expect("create");
    let mut p = Producer::new(&mem, ring).expect("producer");
    let mut c = Consumer::new(&mem, ring).expect("consumer");
    assert_eq!(p.send_frame(&mem, &[5; 10]), Ok(true));
    let data = OFF + HEADER_SIZE;
    let mut out = [0u8; 64];
    for (forged, available) in [(61u32, 14), (u32::MAX, 14), (11, 14)] {
        mem.write_bytes(data, &forged.to_le_bytes())
            .expect("scribble");
        assert_eq!(
            c.recv_frame(&mem, &mut out),
            Err(RingError::CorruptFrame {
                len: Some(forged),
                available,
                capacity: 64
            })
        );
        assert_eq!(c.tail(), 0, "nothing taken");
    }
    // A head that cuts a prefix short (seen by a consumer that has not looked before: one
    // that has keeps using the head it validated until it needs more).
    mem.write_bytes(data, &10u32.to_le_bytes())
        .expect("restore");
    mem.store_u64(OFF + HEAD_OFF, 2, Ordering::SeqCst)
        .expect("scribble");
    let mut c2 = Consumer::new(&mem, ring).expect("consumer");
    assert_eq!(
        c2.recv_frame(&mem, &mut out),
        Err(RingError::CorruptFrame {
            len: None,
            available: 2,
            capacity: 64
        })
    );
}

/// What a scribbler stores between two operations.
#[derive(Clone, Debug)]
enum Scribble {
    Head(u64),
    Tail(u64),
    /// A u32 at this data position (a frame length, or anything).
    Data(u64, u32),
    Nothing,
}

fn scribble() -> impl Strategy<Value = Scribble> {
    let index = prop_oneof![
        any::<u64>(),
        0u64..300,
        (u64::MAX - 300)..=u64::MAX,
        Just(0u64)
    ];
    prop_oneof![
        index.clone().prop_map(Scribble::Head),
        index.prop_map(Scribble::Tail),
        (0u64..64, any::<u32>()).prop_map(|(p, v)| Scribble::Data(p, v)),
        Just(Scribble::Nothing),
    ]
}

proptest! {
    /// A hostile peer scribbles indices and data between the producer's and the consumer's
    /// operations: every operation either works or says `Corrupt`; none panics, reads
    /// outside the ring, or writes outside the data area and its own index.
    #[test]
    fn scribbled_indices_and_lengths_are_corrupt_and_never_reach_outside_the_ring(
        steps in proptest::collection::vec((scribble(), 0u8..4, 0usize..80), 1..60)
    ) {
        let mut b = buf_for(64);
        let raw = b.region();
        let mem = Recorder::new(raw);
        let ring = Ring::create(&mem, OFF, 64, OFF + HEADER_SIZE + 64).expect("create");
        let mut p = Producer::new(&mem, ring).expect("producer");
        let mut c = Consumer::new(&mem, ring).expect("consumer");
        mem.log.borrow_mut().clear();
        let payload = [0xA5u8; 80];
        let mut out = [0u8; 80];
        for (s, op, len) in steps {
            match s {
                Scribble::Head(v) => raw.store_u64(OFF + HEAD_OFF, v, Ordering::SeqCst).expect("in bounds"),
                Scribble::Tail(v) => raw.store_u64(OFF + TAIL_OFF, v, Ordering::SeqCst).expect("in bounds"),
                Scribble::Data(at, v) => raw.write_bytes(OFF + HEADER_SIZE + at.min(60), &v.to_le_bytes()).expect("in bounds"),
                Scribble::Nothing => {}
            }
            let (result, own) = match op {
                0 => (p.write(&mem, &payload[..len]).map(|_| ()), OFF + HEAD_OFF),
                1 => (p.send_frame(&mem, &payload[..len]).map(|_| ()), OFF + HEAD_OFF),
                2 => (c.read(&mem, &mut out[..len]).map(|_| ()), OFF + TAIL_OFF),
                _ => (c.recv_frame(&mem, &mut out[..len]).map(|_| ()), OFF + TAIL_OFF),
            };
            if let Err(e) = result {
                prop_assert!(
                    is_corrupt(&e) || matches!(e, RingError::FrameTooLarge { .. } | RingError::BufferTooSmall { .. }),
                    "{e:?}"
                );
            }
            mem.check(&ring, own);
        }
    }

    /// Writes and reads of any sizes, in any order: the bytes read are the bytes written,
    /// in order, and everything written is read once drained.
    #[test]
    fn any_interleaving_of_writes_and_reads_preserves_the_byte_stream(
        log_capacity in 6u32..12,
        ops in proptest::collection::vec((any::<bool>(), 0usize..5000), 1..200)
    ) {
        let capacity = 1u64 << log_capacity;
        let mut b = buf_for(capacity);
        let mem = b.region();
        let ring = Ring::create(&mem, OFF, capacity, u64::MAX).expect("create");
        let mut p = Producer::new(&mem, ring).expect("producer");
        let mut c = Consumer::new(&mem, ring).expect("consumer");
        let mut sent: Vec<u8> = Vec::new();
        let mut got: Vec<u8> = Vec::new();
        let mut next = 0u32;
        let mut buf = vec![0u8; 5000];
        for (write, len) in ops {
            if write {
                let data: Vec<u8> = (0..len).map(|i| (next.wrapping_add(i as u32) % 251) as u8).collect();
                let n = p.write(&mem, &data).expect("write");
                prop_assert!(n <= len);
                prop_assert_eq!(n as u64, (capacity - (sent.len() - got.len()) as u64).min(len as u64));
                sent.extend_from_slice(&data[..n]);
                next = next.wrapping_add(n as u32);
            } else {
                let n = c.read(&mem, &mut buf[..len]).expect("read");
                prop_assert_eq!(n, (sent.len() - got.len()).min(len));
                got.extend_from_slice(&buf[..n]);
            }
            prop_assert_eq!(&got[..], &sent[..got.len()]);
        }
        loop {
            let n = c.read(&mem, &mut buf).expect("drain");
            if n == 0 { break; }
            got.extend_from_slice(&buf[..n]);
        }
        prop_assert_eq!(got, sent);
    }

    /// Frames of any sizes sent and received in any order arrive whole and in order; a
    /// send that does not fit now sends nothing.
    #[test]
    fn any_interleaving_of_sends_and_receives_delivers_the_frames_in_order(
        log_capacity in 6u32..10,
        ops in proptest::collection::vec((any::<bool>(), 0usize..600), 1..200)
    ) {
        let capacity = 1u64 << log_capacity;
        let mut b = buf_for(capacity);
        let mem = b.region();
        let ring = Ring::create(&mem, OFF, capacity, u64::MAX).expect("create");
        let mut p = Producer::new(&mem, ring).expect("producer");
        let mut c = Consumer::new(&mem, ring).expect("consumer");
        let mut queued: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut buf = vec![0u8; 1024];
        for (k, (send, len)) in ops.into_iter().enumerate() {
            if send {
                let frame: Vec<u8> = (0..len).map(|i| (i ^ k) as u8).collect();
                match p.send_frame(&mem, &frame) {
                    Ok(true) => queued.push_back(frame),
                    Ok(false) => {
                        let in_ring: u64 = queued.iter().map(|f| 4 + f.len() as u64).sum();
                        prop_assert!(in_ring + 4 + len as u64 > capacity);
                    }
                    Err(RingError::FrameTooLarge { len: l, max }) => {
                        prop_assert_eq!((l, max), (len as u64, capacity - 4));
                    }
                    Err(e) => prop_assert!(false, "{e:?}"),
                }
            } else {
                match c.recv_frame(&mem, &mut buf).expect("recv") {
                    Some(n) => {
                        let want = queued.pop_front().expect("a frame was queued");
                        prop_assert_eq!(&buf[..n], &want[..]);
                    }
                    None => prop_assert!(queued.is_empty()),
                }
            }
        }
    }
}

#[test]
fn two_threads_stream_64_mib_through_a_64_kib_ring_intact() {
    const TOTAL: u64 = 64 << 20;
    const CAPACITY: u64 = 64 << 10;
    let (elapsed, sum_in, sum_out) = with_watchdog(300, || {
        let mut b = buf_for(CAPACITY);
        let mem = b.region();
        let ring = Ring::create(&mem, OFF, CAPACITY, u64::MAX).expect("create");
        let start = std::time::Instant::now();
        let (sum_in, sum_out) = std::thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut p = Producer::new(&mem, ring).expect("producer");
                let mut chunk = vec![0u8; 7919];
                let (mut sent, mut sum) = (0u64, 0u64);
                while sent < TOTAL {
                    let n = usize::try_from((TOTAL - sent).min(chunk.len() as u64)).expect("small");
                    for (i, b) in chunk[..n].iter_mut().enumerate() {
                        *b = ((sent + i as u64) % 253) as u8;
                    }
                    let mut off = 0;
                    while off < n {
                        match p.write(&mem, &chunk[off..n]).expect("write") {
                            0 => std::thread::yield_now(),
                            k => off += k,
                        }
                    }
                    sum = chunk[..n]
                        .iter()
                        .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                    sent += n as u64;
                }
                sum
            });
            let consumer = s.spawn(|| {
                let mut c = Consumer::new(&mem, ring).expect("consumer");
                let mut buf = vec![0u8; 6007];
                let (mut got, mut sum) = (0u64, 0u64);
                while got < TOTAL {
                    match c.read(&mem, &mut buf).expect("read") {
                        0 => std::thread::yield_now(),
                        n => {
                            sum = buf[..n]
                                .iter()
                                .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                            got += n as u64;
                        }
                    }
                }
                sum
            });
            (
                producer.join().expect("producer"),
                consumer.join().expect("consumer"),
            )
        });
        (start.elapsed(), sum_in, sum_out)
    });
    assert_eq!(sum_in, sum_out, "the checksums differ");
    // A reading, not an assertion (debug builds are slow).
    std::eprintln!(
        "ring: 64 MiB through 64 KiB in {elapsed:?}: {:.0} MiB/s",
        64.0 / elapsed.as_secs_f64()
    );
}
