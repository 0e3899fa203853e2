//! The library's `Namespace`/`Section`/`Event` API over both kinds of transport (issue 11:
//! "works unchanged"): one scenario, written once against `Namespace<T>`, run by a peer on
//! vshmd's ivshmem socket (a shared header) and by a peer on its vhost-user socket (the
//! vshm device: requests, a window that holds only what it opened), each beside an
//! ivshmem host peer that checks what it sees.

use std::time::Duration;

use vshm::host::vhost_user::VhostUserTransport;
use vshm::host::HostTransport;
use vshm::{
    CreateOptions, Device, DeviceTransport, Disposition, Error, EventOptions, Namespace, Status,
    Transport,
};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);

fn status(e: Error) -> Option<Status> {
    match e {
        Error::Status(s) | Error::Refused { status: s, .. } => Some(s),
        _ => None,
    }
}

/// Sections and events behave the same whoever `ns` is; `host` is another peer on the
/// ivshmem socket.
fn sections_and_events_behave_alike<T: Transport>(
    ns: &Namespace<T>,
    host: &Namespace<HostTransport>,
) {
    // Create-or-open: created once, opened after; the host sees the bytes.
    let opts = CreateOptions {
        max_size: 64 << 10,
        initial_size: 8 << 10,
        persistent: false,
    };
    let (a, d) = ns.create(Some("alike/a"), &opts).expect("create");
    assert_eq!(d, Disposition::Created);
    assert_eq!((a.size(), a.max_size()), (8 << 10, 64 << 10));
    let (again, d) = ns.create(Some("alike/a"), &opts).expect("create again");
    assert_eq!(d, Disposition::Opened);
    a.write_at(100, b"from the peer").expect("write");
    let mut buf = [0u8; 13];
    again
        .read_at(100, &mut buf)
        .expect("read through the second handle");
    assert_eq!(&buf, b"from the peer");
    let h = host.open("alike/a").expect("host opens");
    h.read_at(100, &mut buf).expect("host reads");
    assert_eq!(&buf, b"from the peer");
    h.write_at(200, b"from the host").expect("host writes");
    a.read_at(200, &mut buf).expect("read the host's bytes");
    assert_eq!(&buf, b"from the host");
    // Past the size: refused, not a fault.
    assert_eq!(
        a.write_at(8 << 10, b"x").map_err(status),
        Err(Some(Status::InvalidParameter))
    );

    // A read-only handle reads and refuses writes.
    let ro = ns.open_read_only("alike/a").expect("read-only open");
    ro.read_at(200, &mut buf).expect("read-only read");
    assert_eq!(&buf, b"from the host");
    assert_eq!(
        ro.write_at(0, b"x").map_err(status),
        Err(Some(Status::AccessDenied))
    );

    // Grow: the new bytes are there for this handle and the host.
    a.grow(16 << 10).expect("grow");
    assert_eq!(a.size(), 16 << 10);
    a.write_at(12 << 10, b"grown")
        .expect("write past the old size");
    let mut five = [0u8; 5];
    h.read_at(12 << 10, &mut five)
        .expect("host reads the grown part");
    assert_eq!(&five, b"grown");

    // A name used by another kind: STATUS_INVALID_HANDLE (Rtk).
    assert_eq!(
        ns.create_event(Some("alike/a"), &EventOptions::default())
            .map(|_| ())
            .map_err(status),
        Err(Some(Status::InvalidHandle))
    );
    assert_eq!(
        ns.open_event("alike/a").map(|_| ()).map_err(status),
        Err(Some(Status::InvalidHandle))
    );

    // Notify and wait: a change by the host wakes the peer; no change is a timeout.
    h.notify().expect("host notifies");
    let seen = a
        .wait_change(Some(Duration::from_secs(10)))
        .expect("the change");
    assert!(seen >= 1, "{seen}");
    assert_eq!(
        a.wait_change(Some(Duration::from_millis(100)))
            .map_err(status),
        Err(Some(Status::Timeout))
    );
    a.notify().expect("peer notifies");
    h.wait_change(Some(Duration::from_secs(10)))
        .expect("the host sees the peer's change");

    // Events: the host's signal ends the peer's wait, and an auto-reset one is taken.
    let (ev, d) = ns
        .create_event(Some("alike/e"), &EventOptions::default())
        .expect("event");
    assert_eq!(d, Disposition::Created);
    let hev = host.open_event("alike/e").expect("host opens the event");
    hev.signal().expect("host signals");
    ev.wait(Some(Duration::from_secs(10))).expect("signalled");
    assert_eq!(
        ev.wait(Some(Duration::from_millis(100))).map_err(status),
        Err(Some(Status::Timeout)),
        "the signal was taken"
    );
    ev.signal().expect("peer signals");
    hev.wait(Some(Duration::from_secs(10)))
        .expect("the host takes the peer's signal");

    // Info and delete by name; the last close destroys it.
    let info = ns.info("alike/a").expect("info");
    assert_eq!(
        (info.kind, info.max_size),
        (vshm::format::layout::kind::SECTION, 64 << 10)
    );
    ns.delete("alike/a").expect("delete");
    assert_eq!(
        host.open("alike/a").map(|_| ()).map_err(status),
        Err(Some(Status::ObjectNameNotFound)),
        "the name is gone at once"
    );
    a.read_at(100, &mut buf)
        .expect("a deleted section lives while held");
    assert_eq!(&buf, b"from the peer");
    for s in [a, again, ro] {
        s.close().expect("close");
    }
    drop(h);
    ev.close().expect("close the event");
    assert!(
        wait_for(Duration::from_secs(5), || host
            .objects()
            .all(|o| o.name() != Some("alike/a"))),
        "the last close destroyed it"
    );
}

#[test]
fn sections_and_events_behave_alike_for_a_peer_on_the_ivshmem_socket() {
    watchdog(LIMIT, || {
        let (b, _vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let host = b.connect();
        sections_and_events_behave_alike(&b.connect(), &host);
    });
}

#[test]
fn sections_and_events_behave_alike_for_a_peer_on_the_vshm_device() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let dev = VhostUserTransport::connect(&vpath).expect("connect to the vshm device");
        let ns = Namespace::attach(Device(dev)).expect("attach over the device");
        sections_and_events_behave_alike(&ns, &host);
    });
}

#[test]
fn a_peer_on_the_vshm_device_sees_no_header_and_only_the_sections_it_opened() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (other, _) = host
            .create(Some("only/other"), &CreateOptions::new(4096))
            .expect("host creates");
        other.write_at(0, b"secret").expect("host writes");
        let dev = VhostUserTransport::connect(&vpath).expect("connect");
        let ns = Namespace::attach(Device(dev)).expect("attach");
        assert_eq!(ns.objects().count(), 0, "no object table");
        assert_eq!(ns.peers().count(), 0, "no peer table");
        let (mine, _) = ns
            .create(Some("only/mine"), &CreateOptions::new(4096))
            .expect("create");
        // The whole window but this section's pages reads as zero: not the host's bytes.
        let window = ns.transport().region();
        let mut all = vec![
            0u8;
            usize::try_from(vshm::format::shm::SharedMemory::size(&window))
                .expect("size")
        ];
        vshm::format::shm::SharedMemory::read_bytes(&window, 0, &mut all).expect("read the window");
        let at = usize::try_from(mine.offset().0).expect("offset");
        assert!(all[..at].iter().all(|&b| b == 0));
        assert!(all[at + 4096..].iter().all(|&b| b == 0));
        assert!(!all.windows(6).any(|w| w == b"secret"));
        // Duplicates are not there over the device: said, not faked.
        assert_eq!(
            mine.duplicate().map(|_| ()).map_err(status),
            Err(Some(Status::NotSupported))
        );
    });
}

#[test]
fn a_read_only_open_over_the_device_can_be_stored_to_through_the_window_without_a_fault_or_a_leak()
{
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (h, _) = host
            .create(Some("ro/s"), &CreateOptions::new(4096))
            .expect("host creates");
        h.write_at(0, b"original").expect("host writes");
        let dev = VhostUserTransport::connect(&vpath).expect("connect");
        let ns = Namespace::attach(Device(dev)).expect("attach");
        let ro = ns.open_read_only("ro/s").expect("read-only open");
        // Safe code may store anywhere in the window: the process must not fault, and the
        // store must not reach the section.
        let window = ns.transport().region();
        vshm::format::shm::SharedMemory::write_bytes(&window, ro.offset().0, b"scribble")
            .expect("a store into the window");
        let mut buf = [0u8; 8];
        h.read_at(0, &mut buf).expect("host reads");
        assert_eq!(
            &buf, b"original",
            "a read-only mapping's store reaches nobody"
        );
        assert_eq!(
            ro.write_at(0, b"x").map_err(status),
            Err(Some(Status::AccessDenied))
        );
    });
}

#[test]
fn after_vshmd_died_a_device_peers_reads_and_writes_fail_instead_of_showing_zeros() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let dev = VhostUserTransport::connect(&vpath).expect("connect");
        let ns = Namespace::attach(Device(dev)).expect("attach");
        let (s, _) = ns
            .create(Some("gone/s"), &CreateOptions::new(4096))
            .expect("create");
        s.write_at(0, b"before").expect("write");
        let pid = libc::pid_t::try_from(b.pid()).expect("pid");
        // SAFETY: kill(2) on the vshmd this test started (still our unreaped child).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert!(
            wait_for(Duration::from_secs(10), || s
                .read_at(0, &mut [0u8; 6])
                .is_err()),
            "reads fail once the device is gone"
        );
        let mut buf = [0u8; 6];
        assert!(matches!(
            s.read_at(0, &mut buf),
            Err(Error::Transport(vshm::TransportError::BackendGone))
        ));
        assert!(s.write_at(0, b"after").is_err());
    });
}

#[test]
fn refresh_size_catches_a_device_peer_up_with_a_grow_made_elsewhere() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let opts = CreateOptions {
            max_size: 64 << 10,
            initial_size: 8 << 10,
            persistent: false,
        };
        let (h, _) = host.create(Some("grow/s"), &opts).expect("host creates");
        let dev = VhostUserTransport::connect(&vpath).expect("connect");
        let ns = Namespace::attach(Device(dev)).expect("attach");
        let s = ns.open("grow/s").expect("open");
        h.grow(32 << 10).expect("host grows");
        h.write_at(30 << 10, b"new pages")
            .expect("host writes the new part");
        assert_eq!(s.size(), 8 << 10, "what is mapped for this handle");
        assert_eq!(s.refresh_size().expect("refresh"), 32 << 10);
        assert_eq!(s.size(), 32 << 10);
        let mut buf = [0u8; 9];
        s.read_at(30 << 10, &mut buf).expect("read the new part");
        assert_eq!(&buf, b"new pages");
        // Over a header it is the entry's size already; refresh says the same.
        let hs = b.connect();
        let other = hs.open("grow/s").expect("open over the header");
        assert_eq!(other.refresh_size().expect("refresh"), 32 << 10);
    });
}

#[test]
fn a_read_only_handle_cannot_allocate_blocks_in_its_section() {
    watchdog(LIMIT, || {
        let (b, _vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let host = b.connect();
        let (_s, _) = host
            .create(Some("ro/blocks"), &CreateOptions::new(64 << 10))
            .expect("create");
        let ns = b.connect();
        let ro = ns.open_read_only("ro/blocks").expect("read-only open");
        assert_eq!(
            ro.allocate(64, 8).map(|_| ()).map_err(status),
            Err(Some(Status::AccessDenied))
        );
    });
}

/// A peer on the vshm device beside an ivshmem host peer: (vshmd, host, the device peer).
fn device_peer() -> (
    Backend,
    Namespace<HostTransport>,
    Namespace<Device<VhostUserTransport>>,
) {
    let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
    assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
    let host = b.connect();
    let dev = VhostUserTransport::connect(&vpath).expect("connect to the vshm device");
    let ns = Namespace::attach(Device(dev)).expect("attach over the device");
    (b, host, ns)
}

#[test]
fn a_section_another_peer_deleted_shows_as_deleted_over_the_device() {
    watchdog(LIMIT, || {
        let (_b, host, ns) = device_peer();
        let (h, _) = host
            .create(Some("news/deleted"), &CreateOptions::new(4096))
            .expect("host creates");
        let s = ns.open("news/deleted").expect("open over the device");
        assert!(!s.is_deleted());
        host.delete("news/deleted")
            .expect("the host deletes the name");
        assert!(h.is_deleted(), "over the header at once");
        assert!(
            wait_for(Duration::from_secs(5), || s.is_deleted()),
            "the device peer hears of the delete (the event queue's DELETED)"
        );
        // The name is gone, the section lives while held.
        s.write_at(0, b"still here").expect("write");
        // The news is kept while a handle is open, then forgotten.
        let (slot, generation) = (s.slot(), s.generation());
        let news = ns.transport().0.news(slot, generation);
        assert_eq!(news.map(|n| n.deleted), Some(true));
        s.close().expect("close");
        assert_eq!(ns.transport().0.news(slot, generation), None);
    });
}

#[test]
fn an_events_signal_count_over_the_device_rises_with_another_peers_signals() {
    watchdog(LIMIT, || {
        let (_b, host, ns) = device_peer();
        let manual = EventOptions {
            manual_reset: true,
            persistent: false,
        };
        let (hev, _) = host
            .create_event(Some("news/count"), &manual)
            .expect("host creates");
        hev.signal().expect("signal before the open");
        let ev = ns.open_event("news/count").expect("open over the device");
        let at_open = ev.signal_count().expect("the count the open saw");
        assert_eq!(at_open, hev.signal_count().expect("host's count"));
        for _ in 0..3 {
            hev.signal().expect("host signals");
        }
        let host_count = hev.signal_count().expect("host's count");
        assert_eq!(host_count, at_open + 3);
        assert!(
            wait_for(Duration::from_secs(5), || ev
                .signal_count()
                .is_ok_and(|c| c == host_count)),
            "the device peer's count catches up (SIGNALLED events): {:?} of {host_count}",
            ev.signal_count()
        );
        // Its own signals count too.
        ev.signal().expect("the device peer signals");
        assert!(wait_for(Duration::from_secs(5), || ev
            .signal_count()
            .is_ok_and(|c| c == host_count + 1)));
    });
}
