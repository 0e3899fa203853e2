//! Events, robust mutexes and section notifications between host-process peers, through a
//! real vshmd: the kind clash of every pair, wake-ups across peers and threads, mutual
//! exclusion, FIFO hand-over, abandonment by a killed holder, and the CLI around them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use vshm::{Acquired, CreateOptions, Error, EventOptions, Status};
use vshm_tests::{kill9, release, stderr, stdout, wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(60);
const LONG: Option<Duration> = Some(Duration::from_secs(10));
const SHORT: Option<Duration> = Some(Duration::from_millis(150));

fn status_of<T>(r: Result<T, Error>) -> Option<Status> {
    r.err().map(|e| e.status())
}

#[test]
fn a_name_used_by_one_kind_of_object_is_invalid_handle_for_every_other_kind() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (_s, _) = ns
            .create(Some("sec"), &CreateOptions::new(4096))
            .expect("section");
        let (_e, _) = ns
            .create_event(Some("evt"), &EventOptions::default())
            .expect("event");
        let (_m, _) = ns.create_mutex(Some("mtx"), false).expect("mutex");
        let invalid = Some(Status::InvalidHandle);
        for name in ["evt", "mtx"] {
            assert_eq!(status_of(ns.open(name)), invalid, "open section {name}");
            assert_eq!(
                status_of(ns.create(Some(name), &CreateOptions::new(4096))),
                invalid,
                "create section {name}"
            );
        }
        for name in ["sec", "mtx"] {
            assert_eq!(status_of(ns.open_event(name)), invalid, "open event {name}");
            assert_eq!(
                status_of(ns.create_event(Some(name), &EventOptions::default())),
                invalid,
                "create event {name}"
            );
        }
        for name in ["sec", "evt"] {
            assert_eq!(status_of(ns.open_mutex(name)), invalid, "open mutex {name}");
            assert_eq!(
                status_of(ns.create_mutex(Some(name), false)),
                invalid,
                "create mutex {name}"
            );
        }
        // The clash is also decided by the host when the name is not found locally first:
        // another peer asks.
        let other = b.connect();
        assert_eq!(
            status_of(other.create_mutex(Some("sec"), true)),
            invalid,
            "a second peer's create-or-open"
        );
    });
}

#[test]
fn an_event_signalled_by_one_peer_wakes_a_waiting_peer() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let a = b.connect();
        let (ev, _) = a
            .create_event(Some("frame-ready"), &EventOptions::default())
            .expect("event");
        let started = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let c = b.connect();
                let ev = c.open_event("frame-ready").expect("open");
                started.store(true, Ordering::SeqCst);
                ev.wait(LONG)
            });
            assert!(wait_for(Duration::from_secs(5), || started.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(50));
            ev.signal().expect("signal");
            assert_eq!(waiter.join().expect("join").ok(), Some(()), "woken");
        });
        assert!(!ev.is_signaled().expect("state"), "auto reset: taken");
        assert_eq!(ev.signal_count().expect("count"), 1);
    });
}

#[test]
fn an_auto_reset_signal_wakes_one_waiter_and_a_manual_reset_signal_wakes_all() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let a = b.connect();
        for (name, manual, expect_woken) in [("auto", false, 1), ("manual", true, 3)] {
            let opts = EventOptions {
                manual_reset: manual,
                persistent: false,
            };
            let (ev, _) = a.create_event(Some(name), &opts).expect("event");
            let ready = AtomicUsize::new(0);
            let woken = std::thread::scope(|s| {
                let waiters: Vec<_> = (0..3)
                    .map(|_| {
                        s.spawn(|| {
                            let c = b.connect();
                            let ev = c.open_event(name).expect("open");
                            ready.fetch_add(1, Ordering::SeqCst);
                            ev.wait(Some(Duration::from_millis(1500))).is_ok()
                        })
                    })
                    .collect();
                assert!(wait_for(Duration::from_secs(5), || ready
                    .load(Ordering::SeqCst)
                    == 3));
                std::thread::sleep(Duration::from_millis(100));
                ev.signal().expect("signal");
                waiters
                    .into_iter()
                    .map(|w| w.join().expect("join"))
                    .filter(|&woke| woke)
                    .count()
            });
            assert_eq!(woken, expect_woken, "{name}");
        }
    });
}

#[test]
fn threads_of_one_process_wait_on_different_events_without_stealing_wake_ups() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (first, _) = ns
            .create_event(Some("first"), &EventOptions::default())
            .expect("first");
        let (second, _) = ns
            .create_event(Some("second"), &EventOptions::default())
            .expect("second");
        let other = b.connect();
        std::thread::scope(|s| {
            let w1 = s.spawn(|| first.wait(LONG));
            let w2 = s.spawn(|| second.wait(LONG));
            std::thread::sleep(Duration::from_millis(100));
            let e2 = other.open_event("second").expect("open");
            e2.signal().expect("signal second");
            assert!(w2.join().expect("join").is_ok(), "second woke");
            let e1 = other.open_event("first").expect("open");
            e1.signal().expect("signal first");
            assert!(w1.join().expect("join").is_ok(), "first woke");
        });
    });
}

#[test]
fn a_wait_that_nobody_signals_ends_with_status_timeout() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (ev, _) = ns
            .create_event(None, &EventOptions::default())
            .expect("unnamed event");
        assert_eq!(status_of(ev.wait(SHORT)), Some(Status::Timeout));
        let (sec, _) = ns.create(None, &CreateOptions::new(4096)).expect("section");
        assert_eq!(status_of(sec.wait_change(SHORT)), Some(Status::Timeout));
    });
}

#[test]
fn a_section_notify_wakes_a_reader_waiting_for_a_change() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let writer = b.connect();
        let (frames, _) = writer
            .create(Some("frames"), &CreateOptions::new(4096))
            .expect("section");
        let ready = AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let c = b.connect();
                let frames = c.open("frames").expect("open");
                ready.store(true, Ordering::SeqCst);
                let n = frames.wait_change(LONG)?;
                let mut buf = [0u8; 5];
                frames.read_at(0, &mut buf)?;
                Ok::<_, Error>((n, buf))
            });
            assert!(wait_for(Duration::from_secs(5), || ready.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(50));
            frames.write_at(0, b"frame").expect("write");
            frames.notify().expect("notify");
            let (n, buf) = reader.join().expect("join").expect("woken");
            assert_eq!(n, 1);
            assert_eq!(&buf, b"frame");
        });
    });
}

#[test]
fn a_mutex_keeps_a_non_atomic_counter_exact_across_peers() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let setup = b.connect();
        let (_counter, _) = setup
            .create(Some("counter"), &CreateOptions::new(4096))
            .expect("counter");
        let (_m, _) = setup.create_mutex(Some("lock"), false).expect("mutex");
        const PEERS: usize = 4;
        const ROUNDS: u64 = 150;
        std::thread::scope(|s| {
            for _ in 0..PEERS {
                s.spawn(|| {
                    let ns = b.connect();
                    let m = ns.open_mutex("lock").expect("open mutex");
                    let c = ns.open("counter").expect("open counter");
                    for _ in 0..ROUNDS {
                        assert_eq!(m.lock(LONG).expect("lock"), Acquired::Clean);
                        let mut v = [0u8; 8];
                        c.read_at(0, &mut v).expect("read");
                        std::thread::yield_now();
                        let next = u64::from_le_bytes(v) + 1;
                        c.write_at(0, &next.to_le_bytes()).expect("write");
                        m.unlock().expect("unlock");
                    }
                });
            }
        });
        let c = setup.open("counter").expect("open");
        let mut v = [0u8; 8];
        c.read_at(0, &mut v).expect("read");
        assert_eq!(u64::from_le_bytes(v), PEERS as u64 * ROUNDS);
    });
}

#[test]
fn a_mutex_is_owned_by_one_thread_and_is_not_recursive() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (m, _) = ns.create_mutex(Some("m"), false).expect("mutex");
        assert_eq!(m.try_lock().expect("try"), Some(Acquired::Clean));
        assert_eq!(status_of(m.lock(SHORT)), Some(Status::PossibleDeadlock));
        let other = b.connect();
        let m2 = other.open_mutex("m").expect("open");
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(m2.try_lock().expect("try"), None, "held elsewhere");
                assert_eq!(status_of(m2.unlock()), Some(Status::MutantNotOwned));
                assert_eq!(status_of(m2.lock(SHORT)), Some(Status::Timeout));
            });
        });
        m.unlock().expect("unlock");
        assert_eq!(status_of(m.unlock()), Some(Status::MutantNotOwned));
        assert_eq!(m2.try_lock().expect("free now"), Some(Acquired::Clean));
        m2.unlock().expect("unlock");
    });
}

#[test]
fn queued_lockers_get_the_mutex_in_the_order_they_asked() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (m, _) = ns.create_mutex(Some("fifo"), false).expect("mutex");
        m.lock(LONG).expect("lock");
        let order = StdMutex::new(Vec::new());
        std::thread::scope(|s| {
            for who in 0..3usize {
                let (b, order) = (&b, &order);
                s.spawn(move || {
                    let c = b.connect();
                    let m = c.open_mutex("fifo").expect("open");
                    m.lock(LONG).expect("lock");
                    order.lock().expect("order").push(who);
                    std::thread::sleep(Duration::from_millis(20));
                    m.unlock().expect("unlock");
                });
                // Let this locker queue up before the next one asks.
                assert!(
                    wait_for(Duration::from_secs(5), || b
                        .section("fifo")
                        .is_some_and(|s| s["queued"] == who as u64 + 1)),
                    "locker {who} queued: {:?}",
                    b.section("fifo")
                );
            }
            m.unlock().expect("hand over");
        });
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2]);
    });
}

#[test]
fn a_holder_killed_with_the_lock_is_released_and_the_next_locker_is_told_abandoned() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let ns = b.connect();
        let (m, _) = ns.create_mutex(Some("robust"), true).expect("mutex");
        let mut holder = b.vshm_holding(&["mutex", "lock", "robust"]);
        assert!(
            wait_for(Duration::from_secs(5), || m
                .owner()
                .ok()
                .flatten()
                .is_some()),
            "the child holds it"
        );
        let waiter = std::thread::scope(|s| {
            // The lock belongs to the thread that took it: that thread also releases it.
            let w = s.spawn(|| {
                let got = m.lock(LONG)?;
                m.unlock()?;
                Ok::<_, Error>(got)
            });
            std::thread::sleep(Duration::from_millis(100));
            kill9(&mut holder);
            w.join().expect("join")
        });
        assert_eq!(waiter.expect("lock after the kill"), Acquired::Abandoned);
        assert_eq!(
            m.lock(LONG).expect("again"),
            Acquired::Clean,
            "reported once"
        );
        m.unlock().expect("unlock");
        let s = b.section("robust").expect("status");
        assert_eq!(s["abandoned"], 1, "{s}");
    });
}

#[test]
fn the_cli_signals_and_waits_for_events_and_locks_mutexes() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let c = b.vshm(&["event", "create", "go", "--persistent", "--manual-reset"]);
        assert!(c.status.success(), "{}", stderr(&c));
        assert!(stdout(&c).starts_with("STATUS_SUCCESS"), "{}", stdout(&c));
        let w = b.vshm(&["event", "wait", "go", "--timeout", "100"]);
        assert!(!w.status.success());
        assert!(stderr(&w).contains("STATUS_TIMEOUT"), "{}", stderr(&w));
        assert!(b.vshm(&["event", "signal", "go"]).status.success());
        let w = b.vshm(&["event", "wait", "go", "--timeout", "5000"]);
        assert!(w.status.success(), "{}", stderr(&w));
        let clash = b.vshm(&["mutex", "create", "go"]);
        assert!(!clash.status.success());
        assert!(
            stderr(&clash).contains("STATUS_INVALID_HANDLE"),
            "{}",
            stderr(&clash)
        );
        assert!(b
            .vshm(&["mutex", "create", "m", "--persistent"])
            .status
            .success());
        let holder = b.vshm_holding(&["mutex", "lock", "m"]);
        let busy = b.vshm(&["mutex", "lock", "m", "--timeout", "200"]);
        assert!(!busy.status.success());
        assert!(
            stderr(&busy).contains("STATUS_TIMEOUT"),
            "{}",
            stderr(&busy)
        );
        release(holder);
        let again = b.vshm_holding(&["mutex", "lock", "m", "--timeout", "5000"]);
        release(again);
        let n = b.vshm(&["notify", "nosuch"]);
        assert!(
            stderr(&n).contains("STATUS_OBJECT_NAME_NOT_FOUND"),
            "{}",
            stderr(&n)
        );
    });
}

#[test]
fn a_locker_whose_peer_is_cut_off_while_it_waits_fails_instead_of_hanging() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let owner = b.connect();
        let (m, _) = owner.create_mutex(Some("m"), true).expect("mutex");
        m.lock(LONG).expect("lock");
        let waiter = b.connect();
        let wm = waiter.open_mutex("m").expect("open");
        let id = waiter.peer_id();
        let got = std::thread::scope(|s| {
            let w = s.spawn(|| wm.lock(Some(Duration::from_secs(20))));
            assert!(
                wait_for(Duration::from_secs(5), || b
                    .section("m")
                    .is_some_and(|s| s["queued"] == 1)),
                "queued"
            );
            let out = b.vshmctl(&["disconnect", &id.to_string()]);
            assert!(out.status.success(), "{}", stderr(&out));
            w.join().expect("join")
        });
        assert_eq!(got.err(), Some(Error::Detached));
        m.unlock().expect("unlock");
        let s = b.section("m").expect("status");
        assert_eq!(s["queued"], 0, "no entry left behind: {s}");
        assert!(s["owner"].is_null(), "{s}");
    });
}
