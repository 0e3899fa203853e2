//! Robust mutexes over both kinds of transport (issue 11: the library's API "works
//! unchanged"; the seeds' contract: a mutex held by a peer that dies is handed to the next
//! locker as STATUS_ABANDONED). One scenario, written once against `Namespace<T>`, run by a
//! peer on vshmd's ivshmem socket and by a peer on its vshm device (LOCK/UNLOCK requests,
//! docs/VHOST-USER.md §5.1), each against an ivshmem host peer; then what only the device
//! has: its queue across a VM's threads, its timeouts, and its departures.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vshm::host::vhost_user::VhostUserTransport;
use vshm::host::HostTransport;
use vshm::{Acquired, Device, Disposition, Error, Namespace, Status, Transport};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);
const LONG: Option<Duration> = Some(Duration::from_secs(20));

fn status(e: Error) -> Option<Status> {
    match e {
        Error::Status(s) | Error::Refused { status: s, .. } => Some(s),
        _ => None,
    }
}

/// Exclusion, hand-over in arrival order, timeouts and misuse behave the same whoever `ns`
/// is; `host` is another peer on the ivshmem socket.
fn mutexes_behave_alike<T: Transport + Sync>(ns: &Namespace<T>, host: &Namespace<HostTransport>) {
    let (m, d) = ns.create_mutex(Some("alike/m"), false).expect("create");
    assert_eq!(d, Disposition::Created);
    let (again, d) = ns.create_mutex(Some("alike/m"), false).expect("open");
    assert_eq!(d, Disposition::Opened);
    drop(again);
    let hm = host.open_mutex("alike/m").expect("host opens");

    // Exclusion: held here, the host cannot take it; locking it again here is a deadlock.
    assert_eq!(m.lock(LONG).expect("lock"), Acquired::Clean);
    assert!(m.is_held().expect("is_held"));
    assert_eq!(hm.try_lock().expect("host tries"), None);
    assert_eq!(
        m.try_lock().map_err(status),
        Err(Some(Status::PossibleDeadlock))
    );
    assert_eq!(
        hm.unlock().map_err(status),
        Err(Some(Status::MutantNotOwned)),
        "only the owner unlocks"
    );

    // A queued locker gets it when the owner unlocks, not before.
    let host_has_it = AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let got = hm.lock(LONG).expect("host's queued lock");
            host_has_it.store(true, Ordering::SeqCst);
            hm.unlock().expect("the host's thread unlocks");
            got
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!host_has_it.load(Ordering::SeqCst), "excluded while held");
        m.unlock().expect("unlock");
        assert!(!m.is_held().expect("is_held"));
        assert_eq!(waiter.join().expect("waiter"), Acquired::Clean);
    });
    assert!(host_has_it.load(Ordering::SeqCst));
    assert_eq!(hm.lock(LONG).expect("host locks"), Acquired::Clean);

    // Held by the host: a timed lock here times out, a try says no; unlocked, it is free.
    let started = Instant::now();
    assert_eq!(
        m.lock(Some(Duration::from_millis(200))).map_err(status),
        Err(Some(Status::Timeout))
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(m.try_lock().expect("try while the host holds it"), None);
    hm.unlock().expect("host unlocks");
    assert_eq!(
        m.try_lock().expect("try when free"),
        Some(Acquired::Clean),
        "a timed-out locker left the queue: the mutex is free, not handed to it"
    );
    m.close().expect("close releases it first");
    assert_eq!(
        hm.lock(LONG).expect("free after the close"),
        Acquired::Clean
    );
    hm.unlock().expect("unlock");

    // A name used by another kind: STATUS_INVALID_HANDLE.
    let (_e, _) = host
        .create_event(Some("alike/e"), &vshm::EventOptions::default())
        .expect("event");
    assert_eq!(
        ns.open_mutex("alike/e").map(|_| ()).map_err(status),
        Err(Some(Status::InvalidHandle))
    );
}

fn device(b: &Backend, vpath: &std::path::Path) -> Namespace<Device<VhostUserTransport>> {
    assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
    let _ = b;
    let dev = VhostUserTransport::connect(vpath).expect("connect to the vshm device");
    Namespace::attach(Device(dev)).expect("attach over the device")
}

#[test]
fn mutexes_behave_alike_for_a_peer_on_the_ivshmem_socket() {
    watchdog(LIMIT, || {
        let (b, _vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        mutexes_behave_alike(&b.connect(), &b.connect());
    });
}

#[test]
fn mutexes_behave_alike_for_a_peer_on_the_vshm_device() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let host = b.connect();
        mutexes_behave_alike(&device(&b, &vpath), &host);
    });
}

#[test]
fn threads_of_one_vm_queue_for_a_mutex_over_the_device_in_arrival_order() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let ns = device(&b, &vpath);
        let (m, _) = ns.create_mutex(Some("vm/m"), false).expect("create");
        assert_eq!(m.lock(LONG).expect("lock"), Acquired::Clean);
        let order = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let mut threads = Vec::new();
            for i in 0..3 {
                let (m, order) = (&m, &order);
                threads.push(s.spawn(move || {
                    assert_eq!(m.lock(LONG).expect("queued lock"), Acquired::Clean);
                    assert!(m.is_held().expect("is_held"), "the granted thread holds it");
                    order.lock().expect("order").push(i);
                    std::thread::sleep(Duration::from_millis(20));
                    m.unlock().expect("unlock");
                }));
                // Arrival order: each is queued before the next asks.
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(order.lock().expect("order").is_empty(), "all excluded");
            m.unlock().expect("first unlock");
            for t in threads {
                t.join().expect("thread");
            }
        });
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2]);
    });
}

/// Locks `m` from a thread that then ends: the mutex stays held by that thread's token, so
/// dropping the handle from here does not unlock it (as when the owner dies).
fn lock_from_a_thread_that_ends<T: Transport + Sync>(m: &vshm::Mutex<'_, T>) {
    std::thread::scope(|s| {
        let got = s.spawn(|| m.lock(LONG).expect("lock")).join();
        assert_eq!(got.expect("locker"), Acquired::Clean);
    });
    assert!(!m.is_held().expect("is_held"), "held by the other thread");
}

#[test]
fn a_vm_that_disconnects_holding_a_mutex_hands_it_over_as_abandoned() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let host = b.connect();
        let (hm, _) = host.create_mutex(Some("gone/m"), false).expect("create");
        std::thread::scope(|s| {
            let ns = device(&b, &vpath);
            let m = ns.open_mutex("gone/m").expect("open over the device");
            lock_from_a_thread_that_ends(&m);
            let waiter = s.spawn(|| {
                let got = hm.lock(LONG).expect("queued behind the VM");
                hm.unlock().expect("unlock");
                got
            });
            std::thread::sleep(Duration::from_millis(300));
            // The VM goes away holding it.
            drop(m);
            drop(ns);
            assert_eq!(waiter.join().expect("waiter"), Acquired::Abandoned);
        });
        assert_eq!(hm.lock(LONG).expect("again"), Acquired::Clean, "told once");
    });
}

#[test]
fn a_queued_lock_over_the_device_is_granted_abandoned_when_the_owner_peer_dies() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        let ns = device(&b, &vpath);
        let (m, _) = ns.create_mutex(Some("dies/m"), true).expect("create");
        std::thread::scope(|s| {
            let owner = b.connect();
            let om = owner.open_mutex("dies/m").expect("owner opens");
            lock_from_a_thread_that_ends(&om);
            let waiter = s.spawn(|| {
                let got = m.lock(LONG);
                assert!(m.is_held().expect("is_held"), "the granted thread holds it");
                m.unlock().expect("unlock");
                got
            });
            std::thread::sleep(Duration::from_millis(300));
            drop(om);
            drop(owner);
            assert_eq!(
                waiter.join().expect("waiter").expect("granted"),
                Acquired::Abandoned
            );
        });
        assert_eq!(m.lock(LONG).expect("again"), Acquired::Clean, "told once");
    });
}
