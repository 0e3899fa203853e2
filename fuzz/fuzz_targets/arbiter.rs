//! The arbiter against a peer that scribbles anywhere: a real `Arbiter` over a small memfd
//! `Region` (1 MiB, 4 peer slots, 8 objects; peers 1-3 connected), driven by a sequence of
//! steps the fuzzer mutates: scribbles (any bytes at any offset in the first 64 KiB, which
//! covers the whole header and the start of the heap), well-formed and raw requests posted
//! to a peer's mailbox and serviced, lease acquires and releases, peers leaving and new
//! ones arriving, `service`, `sweep`, `heal`, `status`. Nothing may panic, and after a final
//! `heal` + `sweep` the published header must validate: the superblock gives back the
//! arbiter's layout; every peer entry validates and the peer table shows exactly the
//! connected peers in their slots; every object entry validates and agrees with the
//! arbiter's private record (FREE exactly where it has none, else the
//! record's generation and kind), and every LIVE, open name is found by name (the healed
//! name index).
//!
//! Input: a sequence of steps, each an opcode byte and its operands (see `step`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use vshm_backend::arbiter::Arbiter;
use vshm_backend::region::Region;

use vshm_format::layout::{kind, op, Layout, Request, Superblock, LEASE_CLOSED, OBJ_LEASE_OFF};
use vshm_format::lease;
use vshm_format::mailbox;
use vshm_format::object;
use vshm_format::peer::read_peer_entry;
use vshm_format::shm::{read_pod, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot};
use vshm_fuzz::pod_from;

const REGION: u64 = 1 << 20;
/// Scribbles land in `[0, SCRIBBLE_SPAN)`: the header (about 20 KiB) and the heap's start.
const SCRIBBLE_SPAN: u64 = 64 << 10;
/// Steps per input, so one input cannot run for long.
const MAX_STEPS: usize = 256;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

struct World {
    a: Arbiter<Region>,
    /// Connected peers: (id, slot).
    peers: Vec<(PeerId, PeerSlot)>,
    next_id: u16,
}

impl World {
    fn new() -> World {
        let region = Region::create(REGION, false, false).expect("memfd");
        let layout = Layout::compute(REGION, 4, 8, 1, 4096).expect("layout");
        let mut a = Arbiter::new(region, layout, 1, [7; 16]).expect("arbiter");
        let peers = (1..=3)
            .map(|id| (PeerId(id), a.peer_connected(PeerId(id)).expect("connect")))
            .collect();
        World {
            a,
            peers,
            next_id: 4,
        }
    }

    /// A connected peer picked by `b` (or a stale id if none is connected).
    fn peer(&self, b: u8) -> (PeerId, PeerSlot) {
        if self.peers.is_empty() {
            return (PeerId(1), PeerSlot(0));
        }
        self.peers[usize::from(b) % self.peers.len()]
    }

    /// The generation the arbiter holds for `slot`, else one made up from `b`.
    fn generation(&self, slot: ObjectSlot, b: u8) -> Generation {
        match self.a.record_at(slot) {
            Some(r) if b & 0x80 == 0 => r.generation,
            _ => Generation(u64::from(b & 0x7f)),
        }
    }

    fn post_and_service(&mut self, (id, slot): (PeerId, PeerSlot), req: &Request) {
        let _ = mailbox::post(self.a.mem(), self.a.layout(), slot, req);
        self.a.service(id);
    }

    fn step(&mut self, inp: &mut Input<'_>) -> Option<()> {
        let layout = *self.a.layout();
        match inp.byte()? % 10 {
            // Scribble a few bytes anywhere in the header or the heap's start.
            0 => {
                let off = u64::from(inp.u16()) % SCRIBBLE_SPAN;
                let len = usize::from(inp.byte()? % 33);
                let bytes = inp.bytes(len).to_vec();
                let _ = self.a.mem().write_bytes(off, &bytes);
            }
            // Scribble one aligned word (seq counters, lease words, offsets, sizes).
            1 => {
                let off = (u64::from(inp.u16()) % SCRIBBLE_SPAN) & !7;
                let v = inp.u64();
                let _ = self.a.mem().write_bytes(off, &v.to_le_bytes());
            }
            // A well-formed request from a connected peer.
            2 => {
                let who = self.peer(inp.byte()?);
                let t = inp.byte()?;
                let x = inp.byte()?;
                let slot = ObjectSlot(u32::from(x) % 9);
                let generation = self.generation(slot, inp.byte()?);
                let name = format!("n{}", x % 6);
                let req = match t % 8 {
                    0 => {
                        let max = (u64::from(x >> 4) + 1) * 4096;
                        let size = u64::from(inp.byte()?) * 64;
                        mailbox::create_request(
                            (x & 8 == 0).then_some(name.as_str()),
                            kind::SECTION,
                            max,
                            size.min(max),
                            t & 0x10 != 0,
                        )
                    }
                    1 => mailbox::create_sync_request(
                        (x & 8 == 0).then_some(name.as_str()),
                        if t & 0x20 != 0 {
                            kind::MUTEX
                        } else {
                            kind::EVENT
                        },
                        t & 0x10 != 0,
                        t & 0x40 != 0 && t & 0x20 == 0,
                    ),
                    2 => mailbox::delete_request(slot, generation),
                    3 => mailbox::grow_request(slot, generation, u64::from(inp.u16()) * 16),
                    4 => mailbox::wake_request(slot, generation),
                    5 => mailbox::mutex_request(op::LOCK, slot, generation, u32::from(t >> 4) + 1),
                    6 => {
                        mailbox::mutex_request(op::UNLOCK, slot, generation, u32::from(t >> 4) + 1)
                    }
                    _ => {
                        mailbox::mutex_request(op::CANCEL, slot, generation, u32::from(t >> 4) + 1)
                    }
                };
                self.post_and_service(who, &req);
            }
            // A raw request: the fuzzer's bytes as the request head (name included).
            3 => {
                let who = self.peer(inp.byte()?);
                let len = usize::from(inp.byte()?);
                let req: Request = pod_from(inp.bytes(len));
                self.post_and_service(who, &req);
            }
            // A doorbell with whatever the mailbox holds (scribbled, stale or nothing).
            4 => {
                let (id, _) = self.peer(inp.byte()?);
                self.a.service(id);
            }
            5 => {
                self.a.sweep();
            }
            6 => {
                self.a.heal();
            }
            // A peer takes or drops a hold on an object through the lease protocol.
            7 => {
                let (_, peer) = self.peer(inp.byte()?);
                let x = inp.byte()?;
                let slot = ObjectSlot(u32::from(x) % 8);
                let generation = self.generation(slot, inp.byte()?);
                if x & 0x10 == 0 {
                    let _ = lease::acquire(
                        self.a.mem(),
                        &layout,
                        peer,
                        slot,
                        generation,
                        x & 0x20 != 0,
                    );
                } else {
                    let _ = lease::release(self.a.mem(), &layout, peer, slot);
                }
            }
            // A peer leaves (its holds are reclaimed) or a new one arrives.
            8 => {
                let b = inp.byte()?;
                if b & 1 == 0 && !self.peers.is_empty() {
                    let i = usize::from(b >> 1) % self.peers.len();
                    let (id, _) = self.peers.remove(i);
                    if b & 2 == 0 {
                        self.a.peer_gone(id);
                    } else {
                        let (_, fenced) = self.a.peer_gone_fenced(id);
                        if let Some(slot) = fenced.filter(|_| b & 4 != 0) {
                            self.a.unfence(slot);
                        }
                    }
                } else if let Ok(slot) = self.a.peer_connected(PeerId(self.next_id)) {
                    self.peers.push((PeerId(self.next_id), slot));
                    self.next_id = self.next_id.wrapping_add(1).max(1);
                }
            }
            // What the monitor and the event loop read.
            _ => {
                self.a.observe_handles();
                let _ = self.a.status();
                let _ = self.a.dump();
            }
        }
        self.a.drain_events().for_each(drop);
        self.a.drain_rings().for_each(drop);
        Some(())
    }

    /// After the scribbling stops, one heal and one sweep leave a header readers accept.
    fn check_published(&mut self) {
        self.a.heal();
        self.a.sweep();
        let layout = *self.a.layout();
        let mem = self.a.mem();
        let sb: Superblock = read_pod(mem, 0).expect("superblock in bounds");
        assert_eq!(Layout::from_superblock(&sb, mem.size()), Ok(layout));
        for slot in (0..layout.max_peers).map(PeerSlot) {
            let info = match read_peer_entry(mem, &layout, slot) {
                Ok(info) => info,
                Err(e) => panic!("peer slot {} does not validate after heal: {e}", slot.0),
            };
            let connected = self
                .peers
                .iter()
                .find(|(_, s)| *s == slot)
                .map(|(id, _)| *id);
            assert_eq!(info.map(|i| i.peer_id), connected, "peer slot {}", slot.0);
        }
        for slot in (0..layout.max_objects).map(ObjectSlot) {
            let read = object::read_object(mem, &layout, slot);
            let record = self.a.record_at(slot);
            match (read, record) {
                (Ok(None), None) => {}
                (Ok(Some(info)), Some(r)) => {
                    assert_eq!(info.generation, r.generation, "slot {}", slot.0);
                    assert_eq!(info.kind, r.kind, "slot {}", slot.0);
                    assert_eq!(info.offset, r.offset, "slot {}", slot.0);
                    assert_eq!(info.max_size, r.max_size, "slot {}", slot.0);
                    // A LIVE, open name is found by name: the healed name index has it.
                    let lease = layout
                        .object_entry(slot)
                        .and_then(|b| mem.load_u64(b + OBJ_LEASE_OFF, Ordering::SeqCst).ok())
                        .unwrap_or(LEASE_CLOSED);
                    if let (Some(n), false) = (&r.name, r.unlinked) {
                        if lease & LEASE_CLOSED == 0 {
                            let found = object::find_by_name(mem, &layout, n);
                            assert_eq!(
                                found.map(|o| o.map(|i| i.slot)),
                                Ok(Some(slot)),
                                "{n:?} by name after heal + sweep"
                            );
                        }
                    }
                }
                (read, record) => panic!(
                    "object slot {} after heal + sweep: entry {read:?}, record {record:?}",
                    slot.0
                ),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = World::new();
    let mut inp = Input(data);
    for _ in 0..MAX_STEPS {
        if w.step(&mut inp).is_none() {
            break;
        }
    }
    w.check_published();
});
