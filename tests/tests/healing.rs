//! vshmd owns what it publishes: a peer scribbling over the superblock, the peer table or
//! the object table breaks the namespace only until vshmd's next heal (200 ms), after which
//! honest peers work again — and vshmctl counts the repairs and names the ranges.
//! Real vshmd, real sockets and memfds; the hostile writer is a peer mapping the region.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use vshm::host::{HostTransport, Mapping};
use vshm::{CreateOptions, Disposition, Namespace, Status};
use vshm_format::layout::{holder_bit, kind, object_state, Layout, OBJ_LEASE_OFF};
use vshm_format::lease;
use vshm_format::object::{self, make_entry};
use vshm_format::shm::{bytes_of, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};
use vshm_tests::{wait_for, watchdog, Backend, XorShift};

const LIMIT: Duration = Duration::from_secs(60);
/// "Within one period" and then some: the heal runs every 200 ms.
const HEALED: Duration = Duration::from_secs(1);

/// A peer that maps the region and writes wherever it likes.
struct Scribbler {
    _transport: HostTransport,
    map: Mapping,
    layout: Layout,
    rng: XorShift,
}

impl Scribbler {
    fn new(b: &Backend) -> Scribbler {
        let t = HostTransport::connect(&b.socket).expect("connect");
        let map = vshm_tests::map(t.memfd());
        let layout = *Namespace::attach(HostTransport::connect(&b.socket).expect("connect"))
            .expect("attach")
            .layout();
        Scribbler {
            _transport: t,
            map,
            layout,
            rng: XorShift(0x5eed_1234_abcd_ef01),
        }
    }

    fn random(&mut self, at: u64, len: usize) {
        let junk: Vec<u8> = (0..len)
            .map(|_| self.rng.next_u64().to_le_bytes()[0])
            .collect();
        self.map.region().write_bytes(at, &junk).expect("scribble");
    }
}

fn counter(b: &Backend, name: &str) -> u64 {
    b.status()["counters"][name].as_u64().expect("counter")
}

/// The details of the `repaired` events in vshmctl dump's event ring.
fn repaired(b: &Backend) -> Vec<String> {
    let out = b.vshmctl(&["dump"]);
    assert!(out.status.success(), "{}", vshm_tests::stderr(&out));
    let d: Value = serde_json::from_slice(&out.stdout).expect("dump json");
    d["recent_events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "repaired")
        .filter_map(|e| e["detail"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_scribbled_superblock_is_healed_and_later_peers_attach_again() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let mut evil = Scribbler::new(&b);
        evil.random(0, 256);
        // The very next attach succeeds: the transport looks again at a header that does
        // not validate until vshmd has healed it.
        let ns = Namespace::attach(HostTransport::connect(&b.socket).expect("connect"))
            .expect("attach right after the scribble");
        ns.create(Some("after"), &CreateOptions::new(4096))
            .expect("and works");
        assert!(counter(&b, "heals") >= 1);
        let r = repaired(&b);
        assert!(
            r.iter().any(|d| d.starts_with("superblock [0x0, 0x100)")),
            "{r:?}"
        );
    });
}

#[test]
fn scribbled_object_entries_are_republished_and_both_names_work_again() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let owner = b.connect();
        let (alpha, _) = owner
            .create(Some("alpha"), &CreateOptions::new(4096))
            .expect("alpha");
        let (beta, _) = owner
            .create(Some("beta"), &CreateOptions::new(4096))
            .expect("beta");
        let mut evil = Scribbler::new(&b);
        let l = evil.layout;
        let a_base = l.object_entry(alpha.slot()).expect("entry");
        let b_base = l.object_entry(beta.slot()).expect("entry");
        evil.random(a_base, 64);
        // beta's name, in the name area (FORMAT.md §5b) where its entry says it is.
        let region = evil.map.region();
        let head = object::snapshot(&region, &l, beta.slot(), false).expect("beta's entry");
        let b_name = object::check_name_ref(&l, head.name_off, head.name_len)
            .expect("a sane reference")
            .expect("named");
        region.write_bytes(b_name + 1, b"XXXX").expect("name");
        assert_ne!(b_base, b_name);
        let other = b.connect();
        assert!(
            wait_for(HEALED, || other.open("alpha").is_ok()
                && other.open("beta").is_ok()),
            "both names open again within a second"
        );
        for (name, slot) in [("alpha", alpha.slot()), ("beta", beta.slot())] {
            assert_eq!(other.info(name).expect("info").slot, slot);
            let (s, d) = other
                .create(Some(name), &CreateOptions::new(4096))
                .expect("create-or-open");
            assert_eq!((d, s.slot()), (Disposition::Opened, slot));
            assert_eq!(d.status(), Status::ObjectNameExists);
            drop(s);
            other.delete(name).expect("delete");
        }
        assert!(counter(&b, "heals") >= 2);
        let r = repaired(&b);
        assert!(
            r.iter().any(|d| d.starts_with(&format!(
                "object slot {} [{a_base:#x}, {:#x})",
                alpha.slot().raw(),
                a_base + 128
            ))),
            "{r:?}"
        );
    });
}

#[test]
fn an_honest_holder_survives_a_scribbled_peer_table() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let honest = b.connect();
        let (s, _) = honest
            .create(Some("kept"), &CreateOptions::new(4096))
            .expect("create");
        s.write_at(0, b"before").expect("write");
        let mut evil = Scribbler::new(&b);
        let table = evil.layout.peer_entry(PeerSlot(0)).expect("peer table");
        let len = 64 * evil.layout.max_peers as usize;
        evil.random(table, len);
        // The very next operations meet the scribbled entry: they wait for the heal
        // instead of concluding the peer was detached.
        s.write_at(6, b" after").expect("write after the scribble");
        let mut buf = [0u8; 12];
        s.read_at(0, &mut buf).expect("read");
        assert_eq!(&buf, b"before after");
        let other = b.connect();
        assert!(other.open("kept").is_ok());
        assert_eq!(b.status()["peers"].as_array().expect("peers").len(), 4);
        assert!(counter(&b, "heals") >= 1);
        let r = repaired(&b);
        assert!(r.iter().any(|d| d.starts_with("peer slot ")), "{r:?}");
    });
}

#[test]
fn a_forged_live_entry_in_a_free_slot_is_erased_and_holds_nothing() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let owner = b.connect();
        let (victim, _) = owner
            .create(Some("victim"), &CreateOptions::new(8192))
            .expect("victim");
        victim.write_at(0, b"secret").expect("write");
        let evil = Scribbler::new(&b);
        let l = evil.layout;
        let forged = ObjectSlot(l.max_objects - 1);
        let base = l.object_entry(forged).expect("entry");
        let entry = make_entry(
            Generation(1 << 40),
            object_state::LIVE,
            kind::SECTION,
            RegionOffset(victim.offset().raw()),
            8192,
            8192,
            false,
            Some("forged"),
            PeerId(1),
        );
        // Written as a hostile peer would: the name (in the name area's last granule,
        // which no name of this test uses), a lease word that looks held (by the owner's
        // slot), then the head.
        let mut entry = entry;
        entry.name_off = u32::try_from(l.name_area_size - 8).expect("small area");
        let region = evil.map.region();
        region
            .write_bytes(l.name_area + u64::from(entry.name_off), b"forged")
            .expect("name");
        region
            .store_u64(
                base + OBJ_LEASE_OFF,
                holder_bit(PeerSlot(0)),
                Ordering::SeqCst,
            )
            .expect("lease");
        region
            .write_bytes(base, &bytes_of(&entry)[..64])
            .expect("head");
        let other = b.connect();
        // Lookups go through the name index, which only vshmd writes: the forged name is
        // not found by name at all (a scan of the table would meet it until the heal).
        assert!(other
            .open("forged")
            .is_err_and(|e| e.status() == Status::ObjectNameNotFound));
        assert!(
            wait_for(HEALED, || object::scan_by_name(&region, &l, "forged")
                == Ok(None)),
            "the forged entry is gone within a second"
        );
        assert_eq!(object::find_by_name(&region, &l, "forged"), Ok(None));
        assert!(
            lease::acquire(&region, &l, PeerSlot(1), forged, Generation(1 << 40), false).is_err(),
            "no hold can be taken through the erased slot"
        );
        assert_eq!(
            region.load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst),
            Ok(vshm_format::layout::LEASE_CLOSED)
        );
        let mut buf = [0u8; 6];
        other
            .open("victim")
            .expect("victim")
            .read_at(0, &mut buf)
            .expect("read");
        assert_eq!(&buf, b"secret");
        assert!(counter(&b, "heals") >= 1);
        let r = repaired(&b);
        assert!(
            r.iter().any(|d| d.starts_with(&format!(
                "object slot {} [{base:#x}, {:#x}) (FREE image)",
                forged.raw(),
                base + 128
            ))),
            "{r:?}"
        );
    });
}

#[test]
fn a_peer_that_attached_while_its_incarnation_was_scribbled_is_not_detached_once_it_is_healed() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let evil = Scribbler::new(&b);
        let t = HostTransport::connect(&b.socket).expect("connect");
        let me = vshm::Transport::peer_id(&t);
        let slot = (0..evil.layout.max_peers)
            .map(PeerSlot)
            .find(|&s| {
                vshm_format::object::read_peer(&evil.map.region(), &evil.layout, s)
                    .is_some_and(|p| p.peer_id == me)
            })
            .expect("own slot");
        // Only the incarnation is hit, so the entry still validates as this peer's: the
        // attach that reads it now records a wrong value.
        let at = evil.layout.peer_entry(slot).expect("entry")
            + vshm_format::layout::PEER_INCARNATION_OFF;
        evil.map
            .region()
            .store_u64(at, 0xDEAD_BEEF, Ordering::SeqCst)
            .expect("scribble");
        let ns = Namespace::attach(t).expect("attach");
        // vshmd heals the entry; the peer must carry on, not conclude it was detached.
        let (s, _) = ns
            .create(Some("after-heal"), &CreateOptions::new(64 << 10))
            .expect("create after the heal");
        s.write_at(0, b"ok").expect("write");
        assert!(b.section("after-heal").is_some());
    });
}
