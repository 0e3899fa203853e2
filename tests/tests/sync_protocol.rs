//! Events and mutexes over a real vshmd socket, driven by raw peers (the ivshmem handshake
//! by hand, requests posted into their mailboxes, their eventfds read directly): WAKE rings
//! a waiting holder on vector 1 and nobody else, and so does a signaller ringing a waiter
//! itself; a mutex handoff rings the new owner.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vshm_format::layout::{kind, mutex_word, op, Layout, Request, Response, Superblock};
use vshm_format::shm::{read_pod, SharedMemory};
use vshm_format::{lease, mailbox, sync};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};
use vshm_tests::{recv_msg, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(30);

/// A peer speaking the protocols by hand.
struct RawPeer {
    _sock: UnixStream,
    map: vshm::host::Mapping,
    layout: Layout,
    slot: PeerSlot,
    /// The host's vector 0 (ring to post a request).
    host_bell: File,
    /// Our own eventfds, by vector.
    own: Vec<File>,
}

impl RawPeer {
    fn connect(b: &Backend, vectors: usize) -> RawPeer {
        let sock = UnixStream::connect(&b.socket).expect("connect");
        let (v, _) = recv_msg(&sock).expect("version");
        assert_eq!(v, 0);
        let (id, _) = recv_msg(&sock).expect("id");
        let (_, shm) = recv_msg(&sock).expect("shm");
        let shm = shm.expect("memfd");
        let mut host = Vec::new();
        let mut own = Vec::new();
        while own.len() < vectors {
            let (p, fd) = recv_msg(&sock).expect("peer message");
            let fd = fd.expect("eventfd");
            if p == 0 {
                host.push(fd);
            } else if p == id {
                own.push(fd);
            }
        }
        let map = vshm_tests::map(&shm);
        let region = map.region();
        let sb: Superblock = read_pod(&region, 0).expect("superblock");
        let layout = Layout::from_superblock(&sb, region.size()).expect("header");
        let id = PeerId(u16::try_from(id).expect("id"));
        let slot = vshm_format::object::find_peer_slot(&region, &layout, id).expect("slot");
        RawPeer {
            _sock: sock,
            map,
            layout,
            slot,
            host_bell: host.into_iter().next().expect("host vector 0"),
            own,
        }
    }

    /// Posts `req`, rings the host, waits for the answer (and drains the vector-0 ring).
    fn request(&self, req: &Request) -> Response {
        let region = self.map.region();
        let seq = mailbox::post(&region, &self.layout, self.slot, req).expect("post");
        ring(&self.host_bell);
        assert!(readable(&self.own[0], 5000), "the host answers");
        drain(&self.own[0]);
        mailbox::poll(&region, &self.layout, self.slot, seq)
            .expect("poll")
            .expect("response")
    }

    fn hold(&self, r: &Response) {
        lease::acquire(
            &self.map.region(),
            &self.layout,
            self.slot,
            ObjectSlot(r.slot),
            Generation(r.generation),
            false,
        )
        .expect("hold");
    }
}

fn ring(fd: &File) {
    use std::io::Write;
    (&*fd).write_all(&1u64.to_ne_bytes()).expect("ring");
}

fn drain(fd: &File) {
    let mut buf = [0u8; 8];
    let _ = std::io::Read::read(&mut &*fd, &mut buf);
}

fn readable(fd: &File, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// The waiter's wake vector (1) rang, its control vector did not, and a holder that does not
/// wait was not rung.
fn only_the_waiter_is_rung(waiter: &RawPeer, bystander: &RawPeer) {
    assert!(
        readable(&waiter.own[1], 5000),
        "the waiter is rung on vector 1"
    );
    assert!(!readable(&waiter.own[0], 0), "not on the control vector");
    assert!(
        !readable(&bystander.own[1], 300),
        "a holder that does not wait is not rung"
    );
}

fn status(r: &Response) -> Option<Status> {
    Status::from_code(r.status)
}

#[test]
fn wake_rings_the_waiting_holders_wake_vector_and_not_a_holder_that_does_not_wait() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M", "--vectors", "2"]);
        let signaller = RawPeer::connect(&b, 2);
        let waiter = RawPeer::connect(&b, 2);
        let bystander = RawPeer::connect(&b, 2);
        let req = mailbox::create_sync_request(Some("ev"), kind::EVENT, false, false);
        let ev = signaller.request(&req);
        assert_eq!(status(&ev), Some(Status::Success));
        for p in [&signaller, &waiter, &bystander] {
            p.hold(&ev);
        }
        let s = ObjectSlot(ev.slot);
        sync::register_waiter(&waiter.map.region(), &waiter.layout, s, waiter.slot).expect("wait");
        let region = signaller.map.region();
        assert!(
            sync::event_set(&region, &signaller.layout, s).expect("signal"),
            "a waiter is registered: WAKE must follow"
        );
        let w = signaller.request(&mailbox::wake_request(s, Generation(ev.generation)));
        assert_eq!(status(&w), Some(Status::Success));
        only_the_waiter_is_rung(&waiter, &bystander);
        assert!(!readable(&signaller.own[1], 0), "nor is the signaller");
        assert_eq!(sync::waiters(&region, &signaller.layout, s), Ok(0));
        assert_eq!(b.section("ev").expect("row")["wakes"].as_u64(), Some(1));
    });
}

#[test]
fn a_signal_rings_a_waiting_ivshmem_peer_itself_and_vshmd_serves_no_wake() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M", "--vectors", "2"]);
        let waiter = RawPeer::connect(&b, 2);
        let bystander = RawPeer::connect(&b, 2);
        // Connected last, the library's transport has both raw peers' eventfds.
        let signaller = b.connect();
        let (ev, _) = signaller
            .create_event(Some("ev"), &vshm::EventOptions::default())
            .expect("event");
        let req = mailbox::create_sync_request(Some("ev"), kind::EVENT, false, false);
        for p in [&waiter, &bystander] {
            let r = p.request(&req);
            assert_eq!(status(&r), Some(Status::ObjectNameExists), "opened");
            p.hold(&r);
            let me = vshm_format::object::read_peer(&p.map.region(), &p.layout, p.slot)
                .expect("own entry");
            assert!(me.doorbell, "an ivshmem client is published with DOORBELL");
        }
        let s = ObjectSlot(ev.slot().0);
        sync::register_waiter(&waiter.map.region(), &waiter.layout, s, waiter.slot).expect("wait");
        ev.signal().expect("signal");
        only_the_waiter_is_rung(&waiter, &bystander);
        assert_eq!(
            sync::waiters(&waiter.map.region(), &waiter.layout, s),
            Ok(0)
        );
        assert_eq!(
            b.section("ev").expect("row")["wakes"].as_u64(),
            Some(0),
            "the signaller rang the waiter itself: no WAKE request"
        );
    });
}

#[test]
fn a_mutex_handoff_rings_the_queued_waiter_which_then_owns_it() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M", "--vectors", "2"]);
        let first = RawPeer::connect(&b, 2);
        let second = RawPeer::connect(&b, 2);
        let m = first.request(&mailbox::create_sync_request(
            Some("mx"),
            kind::MUTEX,
            false,
            false,
        ));
        assert_eq!(status(&m), Some(Status::Success));
        first.hold(&m);
        second.hold(&m);
        let (s, g) = (ObjectSlot(m.slot), Generation(m.generation));
        let lock = first.request(&mailbox::mutex_request(op::LOCK, s, g, 1));
        assert_eq!(status(&lock), Some(Status::Success));
        let queued = second.request(&mailbox::mutex_request(op::LOCK, s, g, 2));
        assert_eq!(status(&queued), Some(Status::Pending));
        let row = b.section("mx").expect("row");
        assert_eq!(row["kind"], "mutex");
        assert_eq!(row["queued"].as_u64(), Some(1));
        let unlock = first.request(&mailbox::mutex_request(op::UNLOCK, s, g, 1));
        assert_eq!(status(&unlock), Some(Status::Success));
        assert!(readable(&second.own[1], 5000), "the new owner is rung");
        let region = second.map.region();
        assert!(sync::mutex_held_by(
            &region,
            &second.layout,
            s,
            mutex_word::owner(second.slot, 2)
        )
        .expect("word"));
        // The owner leaving abandons it.
        drop(second);
        assert!(vshm_tests::wait_for(Duration::from_secs(5), || b
            .section("mx")
            .is_some_and(
                |r| r["abandoned"].as_u64() == Some(1) && r["owner"].is_null()
            )));
    });
}
