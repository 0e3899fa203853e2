//! Any bytes as the name index: `object::find_by_name` never panics, never reads outside
//! the region, and never returns an object that is not the LIVE one of the name asked
//! for; after the host's heal (`HostIndex::heal`) every live name is found again and the
//! absent one is not (FORMAT.md §5a).
//!
//! Input: 8 bytes of sequence word, then up to 16 × 8 bytes of entries (zero-padded) for
//! the 16-entry index of the small layout, whose 8 object slots hold three LIVE names
//! ("a" in slot 0, "b" in slot 3, "c" in slot 7) published the way vshmd publishes them.
#![no_main]

use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use vshm_format::index::{store_entry, HostIndex};
use vshm_format::layout::{kind, object_state};
use vshm_format::object::{find_by_name, make_entry, publish_named, EntryError};
use vshm_format::shm::SharedMemory;
use vshm_format::{name_hash, Generation, ObjectSlot, PeerId, RegionOffset};
use vshm_fuzz::{layout, prefix, Buf};

const LIVE: [(&str, u32); 3] = [("a", 0), ("b", 3), ("c", 7)];

fuzz_target!(|data: &[u8]| {
    let l = layout(0);
    let mut buf = Buf::new(usize::try_from(l.region_size).expect("small"));
    let mem = buf.region();
    let mut ix = HostIndex::new(&l);
    for (i, &(name, slot)) in (1u64..).zip(LIVE.iter()) {
        let slot = ObjectSlot(slot);
        ix.insert(&mem, &l, name_hash(name.as_bytes()), slot)
            .expect("insert");
        let mut e = make_entry(
            Generation(i),
            object_state::LIVE,
            kind::EVENT,
            RegionOffset(0),
            0,
            0,
            false,
            Some(name),
            PeerId(1),
        );
        // Each name in its own granule of the name area (FORMAT.md §5b).
        e.name_off = slot.0 * 8;
        publish_named(&mem, &l, slot, &e, name.as_bytes()).expect("publish");
    }
    // The scribble.
    let seq = u64::from_le_bytes(prefix(data));
    mem.store_u64(l.index_seq(), seq, Ordering::SeqCst)
        .expect("seq");
    let rest = data.get(8..).unwrap_or(&[]);
    for (pos, chunk) in (0..l.index_slots).zip(rest.chunks(8)) {
        store_entry(&mem, &l, pos, u64::from_le_bytes(prefix(chunk))).expect("entry");
    }
    for name in ["a", "b", "c", "d"] {
        let want = LIVE.iter().find(|x| x.0 == name).map(|x| ObjectSlot(x.1));
        match find_by_name(&mem, &l, name) {
            Ok(Some(info)) => {
                assert_eq!(Some(info.slot), want, "{name} found in the wrong slot");
                assert_eq!(info.name(), Some(name));
            }
            Ok(None) | Err(EntryError::Busy) => {}
            Err(e) => panic!("{name}: {e:?}"),
        }
    }
    // The host puts it back.
    ix.heal(&mem, &l).expect("heal");
    for name in ["a", "b", "c", "d"] {
        let want = LIVE.iter().find(|x| x.0 == name).map(|x| ObjectSlot(x.1));
        let got = find_by_name(&mem, &l, name).expect("after heal");
        assert_eq!(got.map(|i| i.slot), want, "{name} after heal");
    }
});
