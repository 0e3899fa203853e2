use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proptest::prelude::*;

use super::*;
use crate::ids::{Generation, PeerId, RegionOffset};
use crate::layout::{kind, object_state};
use crate::name::name_hash;
use crate::object::{self, find_by_name, make_entry, publish, scan_by_name};
use crate::shm::{zeroed, RawRegion};

/// A heap-backed region and the host's side of it: records by name, the index mirror.
struct Host<'a> {
    mem: RawRegion<'a>,
    layout: Layout,
    index: HostIndex,
    names: BTreeMap<String, ObjectSlot>,
    next_generation: u64,
}

fn buffer() -> Vec<u64> {
    std::vec![0u64; (1 << 20) / 8]
}

impl<'a> Host<'a> {
    fn new(buf: &'a mut [u64], max_objects: u32) -> Host<'a> {
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: `buf` is 8-aligned, `len` bytes long and outlives the region ('a).
        let mem = unsafe { RawRegion::new(base, (buf.len() * 8) as u64) };
        let layout = Layout::compute(1 << 20, 2, max_objects, 1, 4096).expect("layout");
        Host {
            mem,
            layout,
            index: HostIndex::new(&layout),
            names: BTreeMap::new(),
            next_generation: 1,
        }
    }

    fn free_slot(&self) -> Option<ObjectSlot> {
        (0..self.layout.max_objects)
            .map(ObjectSlot)
            .find(|s| !self.names.values().any(|t| t == s))
    }

    /// CREATE as vshmd does it: index entry first, then the entry published LIVE.
    fn create(&mut self, name: &str) -> ObjectSlot {
        let slot = self.free_slot().expect("a free slot");
        self.create_in(name, slot);
        slot
    }

    fn create_in(&mut self, name: &str, slot: ObjectSlot) {
        let e = make_entry(
            Generation(self.next_generation),
            object_state::LIVE,
            kind::EVENT,
            RegionOffset(0),
            0,
            0,
            false,
            Some(name),
            PeerId(1),
        );
        self.next_generation += 1;
        self.index
            .insert(&self.mem, &self.layout, name_hash(name.as_bytes()), slot)
            .expect("index insert");
        publish_in_own_granules(&self.mem, &self.layout, slot, e, name);
        self.names.insert(name.to_string(), slot);
    }

    /// DELETE + destroy: the entry goes FREE first, then the index entry is removed.
    fn destroy(&mut self, name: &str) {
        let slot = self.names.remove(name).expect("live");
        publish(&self.mem, &self.layout, slot, &zeroed()).expect("publish FREE");
        let removed = self
            .index
            .remove(&self.mem, &self.layout, name_hash(name.as_bytes()), slot)
            .expect("index remove");
        assert!(removed, "{name} was indexed");
    }

    fn find(&self, name: &str) -> Result<Option<ObjectSlot>, crate::object::EntryError> {
        find_by_name(&self.mem, &self.layout, name).map(|o| o.map(|i| i.slot))
    }

    fn assert_all_found(&self) {
        for (n, &s) in &self.names {
            assert_eq!(self.find(n), Ok(Some(s)), "{n} is live in slot {}", s.0);
        }
    }

    fn probe_only(&self, name: &str) -> Probe<ObjectSlot> {
        let hash = name_hash(name.as_bytes());
        probe(&self.mem, &self.layout, hash, |slot| {
            let r = object::read_object(&self.mem, &self.layout, slot)?;
            Ok::<_, crate::object::EntryError>(match r {
                Some(i) if i.name() == Some(name) && i.state == object_state::LIVE => {
                    Candidate::Match(slot)
                }
                _ => Candidate::Other,
            })
        })
        .expect("probe")
    }
}

/// Names whose probe starts at `pos` in an index of `slots` entries.
fn names_homed_at(pos: u32, slots: u32, n: usize) -> Vec<String> {
    (0u32..)
        .map(|i| std::format!("n{i}"))
        .filter(|s| home(name_hash(s.as_bytes()), slots) == pos)
        .take(n)
        .collect()
}

#[test]
fn index_sizes_are_powers_of_two_at_least_twice_the_table() {
    assert_eq!(index_slots(1), 16);
    assert_eq!(index_slots(8), 16);
    assert_eq!(index_slots(9), 32);
    assert_eq!(index_slots(1024), 2048);
    assert_eq!(index_slots(1000), 2048);
    assert_eq!(index_slots(65_536), 131_072);
    for n in [1, 3, 100, 1000, 4097, 65_535] {
        let s = index_slots(n);
        assert!(s.is_power_of_two() && s >= 2 * n, "{n} → {s}");
    }
}

#[test]
fn entries_decode_to_what_was_encoded_and_out_of_range_slots_are_invalid() {
    let w = entry(0xDEAD_BEEF, ObjectSlot(5));
    assert_eq!(w, 0xDEAD_BEEF_0000_0006);
    assert_eq!(
        decode(w, 6),
        IndexWord::Points {
            hash: 0xDEAD_BEEF,
            slot: ObjectSlot(5)
        }
    );
    assert_eq!(
        decode(w, 5),
        IndexWord::Invalid(w),
        "slot 5 of a 5-slot table"
    );
    assert_eq!(decode(0, 5), IndexWord::Empty);
    assert_eq!(decode(u64::MAX, 5), IndexWord::Tombstone);
    assert_eq!(
        decode(7 << 32, 5),
        IndexWord::Invalid(7 << 32),
        "slot + 1 = 0"
    );
}

#[test]
fn homes_spread_sequential_names_so_probes_stay_short() {
    // 65 536 names like the benchmark's in the largest index: linear probing at half load.
    let slots = index_slots(65_536);
    let mut words = std::vec![INDEX_EMPTY; slots as usize];
    let mut longest = 0u32;
    let mut total = 0u64;
    for i in 0..65_536u32 {
        let name = std::format!("fill/{i:06}");
        let h = name_hash(name.as_bytes());
        let pos = free_position(&words, h).expect("room");
        let dist = pos.wrapping_sub(home(h, slots)) & (slots - 1);
        longest = longest.max(dist);
        total += u64::from(dist);
        words[pos as usize] = entry(h, ObjectSlot(i));
    }
    let mean = total as f64 / 65_536.0;
    assert!(mean < 2.0, "mean displacement {mean}");
    assert!(longest < 128, "longest displacement {longest}");
}

#[test]
fn inserted_names_are_found_and_removed_ones_are_not() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 16);
    let a = h.create("alpha");
    let b = h.create("beta");
    assert_eq!(h.find("alpha"), Ok(Some(a)));
    assert_eq!(h.find("beta"), Ok(Some(b)));
    assert_eq!(h.find("gamma"), Ok(None));
    h.destroy("alpha");
    assert_eq!(h.find("alpha"), Ok(None));
    assert_eq!(h.find("beta"), Ok(Some(b)));
    assert_eq!(h.index.live(), 1);
    // The same name again, in another slot.
    let c = h.create_in_other("alpha", a);
    assert_eq!(h.find("alpha"), Ok(Some(c)));
}

impl Host<'_> {
    fn create_in_other(&mut self, name: &str, not: ObjectSlot) -> ObjectSlot {
        let slot = (0..self.layout.max_objects)
            .map(ObjectSlot)
            .find(|s| *s != not && !self.names.values().any(|t| t == s))
            .expect("free");
        self.create_in(name, slot);
        slot
    }
}

#[test]
fn a_probe_wraps_around_the_end_of_the_index_and_goes_past_tombstones() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 4); // 16 entries
    let slots = h.layout.index_slots;
    let names = names_homed_at(slots - 1, slots, 3);
    for n in &names {
        h.create(n);
    }
    let pos = |h: &Host<'_>, n: &str| {
        let hash = name_hash(n.as_bytes());
        position_of(h.index.words(), hash, entry(hash, h.names[n])).expect("indexed")
    };
    assert_eq!(
        names.iter().map(|n| pos(&h, n)).collect::<Vec<_>>(),
        std::vec![slots - 1, 0, 1]
    );
    h.assert_all_found();
    // Remove the one at the end: the other two are still reached through its tombstone.
    h.destroy(&names[0]);
    assert_eq!(h.index.words()[(slots - 1) as usize], INDEX_TOMBSTONE);
    h.assert_all_found();
    assert_eq!(h.find(&names[0]), Ok(None));
    // A new name with the same home reuses the tombstone.
    let more = names_homed_at(slots - 1, slots, 4);
    h.create(&more[3]);
    assert_eq!(pos(&h, &more[3]), slots - 1);
    h.assert_all_found();
}

#[test]
fn tombstones_are_dropped_by_a_rebuild_before_they_fill_the_index() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 8); // 16 entries, rebuilt at 12 taken
    h.create("keep");
    let seq0 = h.index.seq();
    for i in 0..100 {
        let n = std::format!("churn{i}");
        h.create(&n);
        h.destroy(&n);
        let taken = h
            .index
            .words()
            .iter()
            .filter(|&&w| w != INDEX_EMPTY)
            .count();
        assert!(taken <= 12, "{taken} entries taken");
        h.assert_all_found();
        assert_eq!(h.find(&n), Ok(None));
    }
    assert!(h.index.seq() > seq0, "rebuilt under the sequence word");
    assert_eq!(h.index.seq() & 1, 0);
}

#[test]
fn a_full_table_of_names_is_indexed_and_found() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 64);
    for i in 0..64 {
        h.create(&std::format!("obj{i}"));
    }
    h.assert_all_found();
    assert_eq!(h.find("obj64"), Ok(None));
    assert_eq!(h.probe_only("obj64"), Probe::NotFound);
}

#[test]
fn an_index_with_no_empty_entry_falls_back_to_the_scan() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 16);
    h.create("a");
    h.create("b");
    // A scribbler fills every entry with values that point nowhere.
    for pos in 0..h.layout.index_slots {
        store_entry(&h.mem, &h.layout, pos, 0x1234_5678_FFFF_0000).expect("scribble");
    }
    assert_eq!(h.probe_only("a"), Probe::Inconclusive);
    h.assert_all_found();
    assert_eq!(h.find("c"), Ok(None));
}

#[test]
fn a_sequence_word_held_odd_makes_the_lookup_scan_instead() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 16);
    h.create("a");
    h.mem
        .store_u64(h.layout.index_seq(), 7, Ordering::SeqCst)
        .expect("odd");
    // Found through the index all the same? No: a probe waits for an even value, gives up,
    // and the scan answers.
    assert_eq!(h.probe_only("a"), Probe::Inconclusive);
    assert_eq!(h.find("a"), Ok(Some(h.names["a"])));
    assert_eq!(h.find("zz"), Ok(None));
    assert_eq!(
        h.index.heal(&h.mem, &h.layout),
        Ok(Some(None)),
        "heal rewrote it"
    );
    assert_eq!(h.index.seq() & 1, 0);
    assert!(h.index.seq() > 7);
    assert_eq!(h.probe_only("a"), Probe::Found(h.names["a"]));
}

#[test]
fn an_index_that_matches_the_records_is_adopted_and_one_that_does_not_is_refused() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 16);
    for i in 0..10 {
        h.create(&std::format!("x{i}"));
    }
    h.destroy("x3");
    let live: Vec<(u32, ObjectSlot)> = h
        .names
        .iter()
        .map(|(n, &s)| (name_hash(n.as_bytes()), s))
        .collect();
    let adopted = HostIndex::adopt(&h.mem, &h.layout, &live).expect("adopted");
    assert_eq!(adopted, h.index);
    // One live name missing from the records: refused.
    assert_eq!(HostIndex::adopt(&h.mem, &h.layout, &live[1..]), None);
    // One record missing from the index: refused.
    let mut more = live.clone();
    more.push((name_hash(b"ghost"), ObjectSlot(15)));
    assert_eq!(HostIndex::adopt(&h.mem, &h.layout, &more), None);
    // A scribbled entry: refused.
    let pos = h
        .index
        .words()
        .iter()
        .position(|&w| w == INDEX_EMPTY)
        .expect("an empty entry");
    store_entry(&h.mem, &h.layout, u32::try_from(pos).expect("pos"), 99).expect("scribble");
    assert_eq!(HostIndex::adopt(&h.mem, &h.layout, &live), None);
}

#[test]
fn a_lookup_never_says_not_found_for_a_name_live_throughout_while_others_churn() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 32); // 64 entries: rebuilds every few dozen deletes
    let stable: Vec<String> = (0..4).map(|i| std::format!("stable{i}")).collect();
    for n in &stable {
        h.create(n);
    }
    let (mem, layout) = (h.mem, h.layout);
    let want: Vec<(String, ObjectSlot)> = stable.iter().map(|n| (n.clone(), h.names[n])).collect();
    let stop = AtomicBool::new(false);
    let lookups = AtomicU64::new(0);
    let busy = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2 {
            let want = &want;
            let (stop, lookups, busy) = (&stop, &lookups, &busy);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let (n, slot) = &want[i % want.len()];
                    match find_by_name(&mem, &layout, n) {
                        Ok(Some(info)) => assert_eq!(info.slot, *slot),
                        Ok(None) => panic!("false NOT_FOUND for {n}"),
                        Err(crate::object::EntryError::Busy) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                    lookups.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        let rebuilt_from = h.index.seq();
        for round in 0..3000 {
            let n = std::format!("other{}", round % 40);
            if h.names.contains_key(&n) {
                h.destroy(&n);
            } else if h.names.len() < 32 {
                h.create(&n);
            }
            if round % 500 == 0 {
                // A heal that rewrites everything, as after a scribble.
                h.index.publish(&h.mem, &h.layout).expect("republish");
            }
        }
        assert!(h.index.seq() > rebuilt_from);
        stop.store(true, Ordering::Relaxed);
    });
    assert!(lookups.load(Ordering::Relaxed) > 0);
}

#[derive(Clone, Debug)]
enum Op {
    Create(u8),
    Delete(u8),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            (0u8..40).prop_map(Op::Create),
            (0u8..40).prop_map(Op::Delete)
        ],
        0..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_sequence_of_creates_and_deletes_keeps_live_names_findable_and_gone_ones_not(
        ops in ops()
    ) {
        let mut buf = buffer();
        let mut h = Host::new(&mut buf, 16);
        for op in ops {
            match op {
                Op::Create(i) => {
                    let n = std::format!("p{i}");
                    if !h.names.contains_key(&n) && h.free_slot().is_some() {
                        h.create(&n);
                    }
                }
                Op::Delete(i) => {
                    let n = std::format!("p{i}");
                    if h.names.contains_key(&n) {
                        h.destroy(&n);
                    }
                }
            }
            for i in 0..40u8 {
                let n = std::format!("p{i}");
                let want = h.names.get(&n).copied();
                prop_assert_eq!(h.find(&n), Ok(want));
                prop_assert_eq!(h.probe_only(&n), match want {
                    Some(s) => Probe::Found(s),
                    None => Probe::NotFound,
                });
            }
        }
        let live: Vec<(u32, ObjectSlot)> =
            h.names.iter().map(|(n, &s)| (name_hash(n.as_bytes()), s)).collect();
        prop_assert_eq!(HostIndex::adopt(&h.mem, &h.layout, &live), Some(h.index.clone()));
    }

    #[test]
    fn a_scribbled_index_never_misleads_a_reader_and_heal_puts_it_back(
        scribble in proptest::collection::vec(any::<u64>(), 1..64),
        seq in any::<u64>(),
        at in 0u32..64,
    ) {
        let mut buf = buffer();
        let mut h = Host::new(&mut buf, 16);
        for i in 0..12 {
            h.create(&std::format!("s{i}"));
        }
        let slots = h.layout.index_slots;
        for (k, &w) in scribble.iter().enumerate() {
            let pos = (at + u32::try_from(k).expect("k")) % slots;
            store_entry(&h.mem, &h.layout, pos, w).expect("scribble");
        }
        h.mem.store_u64(h.layout.index_seq(), seq, Ordering::SeqCst).expect("seq");
        // Every answer is either right or a miss: never another object, never a panic.
        for i in 0..14 {
            let n = std::format!("s{i}");
            match h.find(&n) {
                Ok(Some(s)) => prop_assert_eq!(Some(s), h.names.get(&n).copied()),
                Ok(None) | Err(crate::object::EntryError::Busy) => {}
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }
        prop_assert!(h.index.heal(&h.mem, &h.layout).expect("heal").is_some());
        h.assert_all_found();
        prop_assert_eq!(h.find("s13"), Ok(None));
        prop_assert_eq!(h.index.heal(&h.mem, &h.layout), Ok(None), "clean after heal");
    }
}

#[test]
fn a_mirror_built_over_a_differently_laid_out_index_publishes_whole_at_its_first_change() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 16);
    for i in 0..8 {
        h.create(&std::format!("t{i}"));
    }
    // Another process's layout of the same names: insertion in reverse order.
    let live: Vec<(u32, ObjectSlot)> = h
        .names
        .iter()
        .rev()
        .map(|(n, &s)| (name_hash(n.as_bytes()), s))
        .collect();
    let mut other = HostIndex::build(&h.layout, live);
    let seq = h.index.seq();
    let slot = h.free_slot().expect("free");
    other
        .insert(&h.mem, &h.layout, name_hash(b"late"), slot)
        .expect("insert");
    assert!(other.seq() > seq, "published under the sequence word");
    h.index = other;
    h.names.insert("late".into(), slot);
    publish_in_own_granules(
        &h.mem,
        &h.layout,
        slot,
        make_entry(
            Generation(1000),
            object_state::LIVE,
            kind::EVENT,
            RegionOffset(0),
            0,
            0,
            false,
            Some("late"),
            PeerId(1),
        ),
        "late",
    );
    h.create_in("late2", h.free_slot().expect("free"));
    h.assert_all_found();
    assert_eq!(h.index.heal(&h.mem, &h.layout), Ok(None));
}

#[test]
fn the_scan_and_the_index_agree() {
    let mut buf = buffer();
    let mut h = Host::new(&mut buf, 32);
    for i in 0..20 {
        h.create(&std::format!("q{i}"));
    }
    for i in (0..20).step_by(3) {
        h.destroy(&std::format!("q{i}"));
    }
    for i in 0..22 {
        let n = std::format!("q{i}");
        assert_eq!(
            scan_by_name(&h.mem, &h.layout, &n).map(|o| o.map(|i| i.slot)),
            h.find(&n)
        );
    }
}

/// Publishes `e` with its name at `slot × 64` in the name area (the default area gives
/// every slot 64 bytes; these tests' names are shorter).
fn publish_in_own_granules<M: crate::shm::SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    mut e: crate::layout::ObjectEntry,
    name: &str,
) {
    assert!(name.len() <= 64);
    e.name_off = slot.0 * 64;
    object::publish_named(mem, layout, slot, &e, name.as_bytes()).expect("publish");
}
