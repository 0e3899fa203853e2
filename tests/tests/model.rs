//! Model-based property test: random create/open/duplicate/close/grow/delete/crash sequences
//! from several peers, run against the real arbiter over a real memfd with the real guest
//! library, and compared step by step with a plain in-memory model of the namespace.
//!
//! The transport is a loopback (ringing the host calls the arbiter synchronously): a mock
//! used only to test the namespace logic; the socket transport has its own tests.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;
use vshm::format::layout::{object_state, Layout};
use vshm::format::mailbox::Refusal;
use vshm::format::shm::RawRegion;
use vshm::format::PeerId;
use vshm::{
    CreateOptions, Disposition, Error, Namespace, Section, Status, Transport, TransportError,
};
use vshm_backend::arbiter::Arbiter;
use vshm_backend::region::Region;

const PEERS: usize = 3;
const NAMES: [&str; 4] = ["alpha", "beta", "Alpha", "gamma"];
const MAX_OBJECTS: u32 = 6;
const PAGE: u64 = 4096;

struct Loopback {
    region: RawRegion<'static>,
    peer_id: PeerId,
    arbiter: Rc<RefCell<Arbiter<Region>>>,
}

impl Transport for Loopback {
    fn region(&self) -> RawRegion<'_> {
        self.region
    }
    fn peer_id(&self) -> PeerId {
        self.peer_id
    }
    fn ring(&self, peer: PeerId, _vector: u16) -> Result<(), TransportError> {
        if peer == PeerId::HOST {
            let mut a = self.arbiter.borrow_mut();
            a.service(self.peer_id);
            a.sweep();
        }
        Ok(())
    }
    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        _t: Duration,
    ) -> Result<bool, TransportError> {
        Ok(ready())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        peer: usize,
        name: usize,
        persistent: bool,
        pages: u64,
        initial: u64,
    },
    Open {
        peer: usize,
        name: usize,
    },
    Duplicate {
        peer: usize,
        handle: usize,
    },
    Close {
        peer: usize,
        handle: usize,
    },
    Grow {
        peer: usize,
        handle: usize,
        pages: u64,
    },
    Delete {
        peer: usize,
        name: usize,
    },
    DeleteHandle {
        peer: usize,
        handle: usize,
    },
    Crash {
        peer: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let peer = 0..PEERS;
    let name = 0..NAMES.len();
    prop_oneof![
        3 => (peer.clone(), name.clone(), any::<bool>(), 1u64..4, 0u64..4)
            .prop_map(|(peer, name, persistent, pages, initial)| Op::Create { peer, name, persistent, pages, initial }),
        3 => (peer.clone(), name.clone()).prop_map(|(peer, name)| Op::Open { peer, name }),
        1 => (peer.clone(), 0usize..8).prop_map(|(peer, handle)| Op::Duplicate { peer, handle }),
        4 => (peer.clone(), 0usize..8).prop_map(|(peer, handle)| Op::Close { peer, handle }),
        1 => (peer.clone(), 0usize..8, 0u64..5).prop_map(|(peer, handle, pages)| Op::Grow { peer, handle, pages }),
        2 => (peer.clone(), name).prop_map(|(peer, name)| Op::Delete { peer, name }),
        1 => (peer.clone(), 0usize..8).prop_map(|(peer, handle)| Op::DeleteHandle { peer, handle }),
        1 => peer.prop_map(|peer| Op::Crash { peer }),
    ]
}

/// The model: objects by model id.
#[derive(Debug, Clone)]
struct MObj {
    name: &'static str,
    persistent: bool,
    deleted: bool,
    size: u64,
    max: u64,
    generation: u64,
    /// Whether the model id was written at offset 0 (only if created with ≥ 8 bytes).
    tagged: bool,
    holds: [u32; PEERS],
}

struct World {
    arbiter: Rc<RefCell<Arbiter<Region>>>,
    mapping: &'static vshm::host::Mapping,
    /// Peer ids hand out like vshmd's server: counting up, never reused.
    next_peer_id: u16,
    peers: Vec<&'static Namespace<Loopback>>,
    handles: Vec<Vec<(u64, Section<'static, Loopback>)>>,
    objects: BTreeMap<u64, MObj>,
    names: BTreeMap<&'static str, u64>,
    next_id: u64,
    heap: u64,
}

impl World {
    fn new() -> World {
        let region = Region::create(1 << 20, false, false).expect("memfd");
        let mapping: &'static vshm::host::Mapping =
            Box::leak(Box::new(vshm_tests::map(region.file())));
        let layout = Layout::compute(1 << 20, 4, MAX_OBJECTS, 1, PAGE).expect("layout");
        let mut arbiter = Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter");
        // The model is about the namespace; the quarantine (which delays reuse) has tests
        // of its own (backend arbiter tests_quarantine, tests/quarantine.rs).
        arbiter.set_quarantine(Duration::ZERO);
        let arbiter = Rc::new(RefCell::new(arbiter));
        let mut peers = Vec::new();
        for i in 0..PEERS {
            let id = u16::try_from(i + 1).expect("id");
            arbiter
                .borrow_mut()
                .peer_connected(PeerId(id))
                .expect("connect");
            let t = Loopback {
                region: mapping.region(),
                peer_id: PeerId(id),
                arbiter: Rc::clone(&arbiter),
            };
            peers.push(&*Box::leak(Box::new(Namespace::attach(t).expect("attach"))));
        }
        let heap = arbiter.borrow().status().region.heap_size;
        World {
            arbiter,
            mapping,
            next_peer_id: u16::try_from(PEERS + 1).expect("id"),
            peers,
            handles: (0..PEERS).map(|_| Vec::new()).collect(),
            objects: BTreeMap::new(),
            names: BTreeMap::new(),
            next_id: 1,
            heap,
        }
    }

    fn total(o: &MObj) -> u32 {
        o.holds.iter().sum()
    }

    /// Applies the model's destruction rule to `id`.
    fn maybe_destroy(&mut self, id: u64) {
        let dead = self
            .objects
            .get(&id)
            .is_some_and(|o| Self::total(o) == 0 && (!o.persistent || o.deleted));
        if dead {
            let o = self.objects.remove(&id).expect("present");
            if !o.deleted {
                self.names.remove(o.name);
            }
        }
    }

    fn tag(&self, id: u64) -> [u8; 8] {
        id.to_le_bytes()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Create {
                peer,
                name,
                persistent,
                pages,
                initial,
            } => {
                let n = NAMES[name];
                let opts = CreateOptions {
                    max_size: pages * PAGE,
                    initial_size: initial.min(pages) * PAGE,
                    persistent,
                };
                let got = self.peers[peer].create(Some(n), &opts);
                if let Some(&id) = self.names.get(n) {
                    let (s, d) =
                        got.map_err(|e| TestCaseError::fail(format!("create existing {n}: {e}")))?;
                    prop_assert_eq!(d, Disposition::Opened);
                    self.check_tag(&s, id)?;
                    self.objects.get_mut(&id).expect("obj").holds[peer] += 1;
                    self.handles[peer].push((id, s));
                } else if self.objects.len() >= MAX_OBJECTS as usize {
                    prop_assert_eq!(
                        got.err(),
                        Some(Error::Refused {
                            status: Status::InsufficientResources,
                            reason: Refusal::ObjectTableFull {
                                max_objects: u64::from(MAX_OBJECTS)
                            }
                        })
                    );
                } else {
                    let (s, d) =
                        got.map_err(|e| TestCaseError::fail(format!("create {n}: {e}")))?;
                    prop_assert_eq!(d, Disposition::Created);
                    prop_assert_eq!(s.size(), opts.initial_size);
                    let mut first = [0xFFu8; 8];
                    if s.size() >= 8 {
                        s.read_at(0, &mut first).expect("read");
                        prop_assert_eq!(first, [0u8; 8], "new sections read zero");
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    if s.size() >= 8 {
                        s.write_at(0, &self.tag(id)).expect("write tag");
                    }
                    let mut holds = [0; PEERS];
                    holds[peer] = 1;
                    let generation = s.generation().raw();
                    self.objects.insert(
                        id,
                        MObj {
                            name: n,
                            persistent,
                            deleted: false,
                            size: opts.initial_size,
                            max: opts.max_size,
                            generation,
                            tagged: opts.initial_size >= 8,
                            holds,
                        },
                    );
                    self.names.insert(n, id);
                    self.handles[peer].push((id, s));
                }
            }
            Op::Open { peer, name } => {
                let n = NAMES[name];
                let got = self.peers[peer].open(n);
                match self.names.get(n) {
                    Some(&id) => {
                        let s = got.map_err(|e| TestCaseError::fail(format!("open {n}: {e}")))?;
                        self.check_tag(&s, id)?;
                        self.objects.get_mut(&id).expect("obj").holds[peer] += 1;
                        self.handles[peer].push((id, s));
                    }
                    None => {
                        prop_assert_eq!(got.err(), Some(Error::Status(Status::ObjectNameNotFound)))
                    }
                }
            }
            Op::Duplicate { peer, handle } => {
                let Some((id, s)) = self.handles[peer].get(handle) else {
                    return Ok(());
                };
                let id = *id;
                let d = s
                    .duplicate()
                    .map_err(|e| TestCaseError::fail(format!("dup: {e}")))?;
                self.objects.get_mut(&id).expect("obj").holds[peer] += 1;
                self.handles[peer].push((id, d));
            }
            Op::Close { peer, handle } => {
                if handle >= self.handles[peer].len() {
                    return Ok(());
                }
                let (id, s) = self.handles[peer].remove(handle);
                s.close()
                    .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
                self.objects.get_mut(&id).expect("obj").holds[peer] -= 1;
                self.maybe_destroy(id);
            }
            Op::Grow {
                peer,
                handle,
                pages,
            } => {
                let Some((id, s)) = self.handles[peer].get(handle) else {
                    return Ok(());
                };
                let id = *id;
                let o = self.objects.get(&id).expect("obj").clone();
                let new = o.size + pages * PAGE;
                let got = s.grow(new);
                if new <= o.max {
                    prop_assert!(got.is_ok(), "grow {} -> {}: {:?}", o.size, new, got);
                    prop_assert_eq!(s.size(), new);
                    self.objects.get_mut(&id).expect("obj").size = new;
                } else {
                    prop_assert_eq!(got.err(), Some(Error::Status(Status::InvalidParameter)));
                }
            }
            Op::Delete { peer, name } => {
                let n = NAMES[name];
                let got = self.peers[peer].delete(n);
                match self.names.remove(n) {
                    Some(id) => {
                        prop_assert!(got.is_ok(), "delete {}: {:?}", n, got);
                        self.objects.get_mut(&id).expect("obj").deleted = true;
                        self.maybe_destroy(id);
                    }
                    None => {
                        prop_assert_eq!(got.err(), Some(Error::Status(Status::ObjectNameNotFound)))
                    }
                }
            }
            Op::DeleteHandle { peer, handle } => {
                let Some((id, s)) = self.handles[peer].get(handle) else {
                    return Ok(());
                };
                let id = *id;
                let got = s.delete();
                let o = self.objects.get_mut(&id).expect("obj");
                if o.deleted {
                    prop_assert_eq!(got.err(), Some(Error::Status(Status::DeletePending)));
                } else {
                    prop_assert!(got.is_ok(), "delete by handle: {:?}", got);
                    o.deleted = true;
                    self.names.remove(o.name);
                    self.maybe_destroy(id);
                }
            }
            Op::Crash { peer } => {
                // The peer vanishes without closing anything; the host reclaims.
                for (id, s) in self.handles[peer].drain(..) {
                    std::mem::forget(s);
                    self.objects.get_mut(&id).expect("obj").holds[peer] -= 1;
                }
                let old = self.peers[peer].peer_id();
                let id = self.next_peer_id;
                self.next_peer_id += 1;
                let mut a = self.arbiter.borrow_mut();
                a.peer_gone(old);
                a.peer_connected(PeerId(id)).expect("reconnect");
                drop(a);
                // The old attachment is detached for good: it must refuse to touch anything.
                prop_assert_eq!(self.peers[peer].open("alpha").err(), Some(Error::Detached));
                let t = Loopback {
                    region: self.mapping.region(),
                    peer_id: PeerId(id),
                    arbiter: Rc::clone(&self.arbiter),
                };
                self.peers[peer] = Box::leak(Box::new(Namespace::attach(t).expect("re-attach")));
                let ids: Vec<u64> = self.objects.keys().copied().collect();
                for id in ids {
                    self.maybe_destroy(id);
                }
            }
        }
        Ok(())
    }

    fn check_tag(&self, s: &Section<'static, Loopback>, id: u64) -> Result<(), TestCaseError> {
        if self.objects.get(&id).is_some_and(|o| o.tagged) {
            let mut b = [0u8; 8];
            s.read_at(0, &mut b).expect("read tag");
            prop_assert_eq!(
                b,
                self.tag(id),
                "the handle is on the object the model expects"
            );
        }
        Ok(())
    }

    /// The shared table and the host's status agree with the model.
    fn check(&self) -> Result<(), TestCaseError> {
        let live: BTreeSet<String> = self.peers[0]
            .objects()
            .filter(|o| o.state == object_state::LIVE)
            .filter_map(|o| o.name().map(str::to_owned))
            .collect();
        let want: BTreeSet<String> = self.names.keys().map(|s| s.to_string()).collect();
        prop_assert_eq!(&live, &want, "live names in the shared table");
        let status = self.arbiter.borrow().status();
        prop_assert_eq!(
            status.sections.len(),
            self.objects.len(),
            "objects alive (incl. deleted-but-open)"
        );
        let mut used = 0;
        for o in self.objects.values() {
            used += o.max.div_ceil(PAGE) * PAGE;
        }
        prop_assert_eq!(status.region.free, self.heap - used, "heap accounting");
        for (id, o) in &self.objects {
            let s = status
                .sections
                .iter()
                .find(|s| s.generation == o.generation)
                .ok_or_else(|| {
                    TestCaseError::fail(format!(
                        "model object {id} {o:?} missing from {:?}",
                        status.sections
                    ))
                })?;
            for (p, &n) in o.holds.iter().enumerate() {
                let got = s
                    .refs_by_peer
                    .iter()
                    .find(|x| x.0 == self.peers[p].peer_id().raw())
                    .map_or(0, |x| x.1);
                prop_assert_eq!(got, u64::from(n), "refs of peer {} on {}", p + 1, o.name);
            }
            prop_assert_eq!(s.size, o.size);
            prop_assert_eq!(s.name.as_deref(), Some(o.name));
            prop_assert_eq!(s.deleted, o.deleted);
            prop_assert_eq!(s.persistent, o.persistent);
            prop_assert_eq!(s.refs, u64::from(World::total(o)));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), TestCaseError> {
        for peer in 0..PEERS {
            for (_, s) in self.handles[peer].drain(..) {
                s.close()
                    .map_err(|e| TestCaseError::fail(format!("final close: {e}")))?;
            }
        }
        for n in NAMES {
            let _ = self.peers[0].delete(n);
        }
        let status = self.arbiter.borrow().status();
        prop_assert!(
            status.sections.is_empty(),
            "everything destroyed: {:?}",
            status.sections
        );
        prop_assert_eq!(status.region.free, self.heap, "heap fully free");
        prop_assert_eq!(status.region.free_extents, 1, "and coalesced");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn random_namespace_operations_from_several_peers_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op)?;
            world.check()?;
        }
        world.finish()?;
    }
}
