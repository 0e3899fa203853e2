//! `vshm::host::vhost_user::VhostUserTransport`: a host process as its own vhost-user
//! frontend and driver of the vshm device (docs/VHOST-USER.md), against a real
//! `vshmd --vhost-user` beside an ivshmem host peer in one namespace. Driven straight
//! through `DeviceTransport::call` with the device's requests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vshm::format::layout::{kind, Request, Response};
use vshm::format::mailbox;
use vshm::format::shm::{bytes_of, zeroed, SharedMemory};
use vshm::format::virtio::{
    ListRecord, MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_LIST, OP_OPEN, OP_SIGNAL, OP_WAIT,
    RESP_MAP_FLAGS_OFF,
};
use vshm::format::Status;
use vshm::host::vhost_user::VhostUserTransport;
use vshm::{CreateOptions, DeviceTransport, EventOptions, TransportError};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(60);
const ANSWER: Duration = Duration::from_secs(10);

/// vshmd with a vhost-user socket (window `window`), once the socket is there.
fn start(window: &str) -> (Backend, PathBuf) {
    let (b, vpath) =
        Backend::start_with_vhost_user(&["--size", "8M", "--vhost-user-window", window]);
    assert!(
        wait_for(Duration::from_secs(10), || vpath.exists()),
        "the vhost-user socket is there"
    );
    (b, vpath)
}

fn connect(vpath: &Path) -> VhostUserTransport {
    VhostUserTransport::connect(vpath).expect("connect to the vshm device")
}

/// `req` answered within [`ANSWER`].
fn request(t: &VhostUserTransport, req: &Request) -> Response {
    t.call(req, &mut [], ANSWER)
        .expect("call")
        .expect("an answer within 10 s")
}

/// CREATE of a section: 64 KiB reserved, 8 KiB now.
fn create(name: &str) -> Request {
    mailbox::create_request(Some(name), kind::SECTION, 64 << 10, 8 << 10, false)
}

/// A request naming `name` (OPEN of any kind).
fn open(name: &str, flags: u32) -> Request {
    let mut r = create(name);
    r.op = OP_OPEN;
    r.kind = 0;
    r.flags |= flags;
    r
}

/// A request naming the object `resp` answered for.
fn on(op: u32, resp: &Response, size: u64) -> Request {
    let mut r: Request = zeroed();
    r.op = op;
    r.slot = resp.slot;
    r.generation = resp.generation;
    r.size = size;
    r
}

/// CLOSE of the handle `resp` answered (named by its window offset).
fn close(resp: &Response) -> Request {
    on(OP_CLOSE, resp, resp.offset)
}

fn map_flags(r: &Response) -> u32 {
    let b = bytes_of(r);
    u32::from_le_bytes(
        b[RESP_MAP_FLAGS_OFF..RESP_MAP_FLAGS_OFF + 4]
            .try_into()
            .expect("4 bytes"),
    )
}

fn ok(r: &Response) {
    assert_eq!(
        Status::from_code(r.status),
        Some(Status::Success),
        "status {:#x}",
        r.status
    );
}

#[test]
fn connecting_reports_the_window_vshmd_was_given() {
    watchdog(LIMIT, || {
        let (_b, vpath) = start("2M");
        let t = connect(&vpath);
        assert_eq!(t.window_size(), 2 << 20);
        assert_eq!(t.config().window_size, 2 << 20);
        assert_eq!(t.window().size(), 2 << 20);
        assert!(t.read_only_supported());
        assert!(t.events_supported(), "the event queue runs");
        assert_eq!(t.config().quarantine_ms, 2000, "vshmd's default quarantine");
        let mut b = [1u8; 16];
        t.window().read_bytes(0, &mut b).expect("read");
        assert_eq!(b, [0; 16], "nothing mapped yet: zeroes");
    });
}

#[test]
fn the_config_space_carries_vshmds_quarantine_time_to_the_driver() {
    watchdog(LIMIT, || {
        let (_b, vpath) =
            Backend::start_with_vhost_user(&["--size", "8M", "--quarantine-ms", "4500"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let t = connect(&vpath);
        assert_eq!(t.config().quarantine_ms, 4500);
        assert_eq!(vshm::DeviceTransport::quarantine_ms(&t), Some(4500));
    });
}

#[test]
fn a_created_section_is_shared_with_an_ivshmem_peer_both_ways_and_gone_from_the_window_after_close()
{
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let t = connect(&vpath);
        let made = request(&t, &create("both ways"));
        ok(&made);
        assert_eq!(map_flags(&made), MAP_WRITABLE);
        assert_eq!((made.size, made.max_size), (8 << 10, 64 << 10));
        let w = t.window();
        w.write_bytes(made.offset, b"from the device side")
            .expect("write");

        let sec = host.open("both ways").expect("the ivshmem peer opens it");
        let mut got = [0u8; 20];
        sec.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"from the device side");
        sec.write_at(4096 + 7, b"from the host").expect("write");
        let mut back = [0u8; 13];
        w.read_bytes(made.offset + 4096 + 7, &mut back)
            .expect("read");
        assert_eq!(&back, b"from the host");

        ok(&request(&t, &close(&made)));
        let mut after = [9u8; 20];
        w.read_bytes(made.offset, &mut after).expect("read");
        assert_eq!(after, [0; 20], "unmapped: zeroes");
        w.read_bytes(made.offset + 4096 + 7, &mut back)
            .expect("read");
        assert_eq!(back, [0; 13]);
        // The section lives on in the ivshmem peer.
        sec.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"from the device side");
    });
}

#[test]
fn a_read_only_open_is_mapped_read_only() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let (sec, _) = host
            .create(Some("look only"), &CreateOptions::new(16 << 10))
            .expect("create");
        sec.write_at(0, b"read me").expect("write");
        let t = connect(&vpath);
        let rw = request(&t, &open("look only", 0));
        ok(&rw);
        assert_eq!(map_flags(&rw), MAP_WRITABLE);
        let ro = request(&t, &open("look only", OPEN_READ_ONLY));
        ok(&ro);
        assert_eq!(map_flags(&ro), 0, "read-only");
        assert_ne!(ro.offset, rw.offset, "a mapping of its own");
        let mut got = [0u8; 7];
        t.window().read_bytes(ro.offset, &mut got).expect("read");
        assert_eq!(&got, b"read me", "readable");
    });
}

#[test]
fn a_pending_wait_lets_other_threads_requests_complete_and_a_host_signal_completes_it() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let (ev, _) = host
            .create_event(Some("bell"), &EventOptions::default())
            .expect("event");
        let t = connect(&vpath);
        let e = request(&t, &open("bell", 0));
        ok(&e);
        std::thread::scope(|sc| {
            let waiter = sc.spawn(|| {
                let started = Instant::now();
                let r = t.call(&on(OP_WAIT, &e, 0), &mut [], Duration::from_secs(20));
                (r, started.elapsed())
            });
            // Meanwhile, other requests are answered (several threads, many each).
            let workers: Vec<_> = (0..3)
                .map(|i| {
                    let t = &t;
                    sc.spawn(move || {
                        for j in 0..10 {
                            let name = format!("busy {i} {j}");
                            let made = request(t, &create(&name));
                            ok(&made);
                            ok(&request(t, &close(&made)));
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("worker");
            }
            assert!(!waiter.is_finished(), "the WAIT is still pending");
            ev.signal().expect("signal");
            let (r, took) = waiter.join().expect("waiter");
            let r = r.expect("call").expect("the WAIT was answered");
            ok(&r);
            assert_eq!((r.slot, r.generation), (e.slot, e.generation));
            assert!(took < Duration::from_secs(20));
        });
        // A WAIT that times out on the device's side, and one that times out on ours
        // (its slot stays taken until the device answers it; others go on meanwhile).
        let timed = request(&t, &on(OP_WAIT, &e, 50));
        assert_eq!(Status::from_code(timed.status), Some(Status::Timeout));
        let gave_up = t
            .call(&on(OP_WAIT, &e, 300), &mut [], Duration::from_millis(20))
            .expect("call");
        assert!(gave_up.is_none(), "no answer within 20 ms");
        ok(&request(&t, &open("bell", 0)));
        std::thread::sleep(Duration::from_millis(400));
        ok(&request(&t, &open("bell", 0)));
    });
}

#[test]
fn list_returns_records_of_the_names_it_may_open() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let (_sec, _) = host
            .create(Some("listed a"), &CreateOptions::new(4096))
            .expect("create");
        let (_ev, _) = host
            .create_event(Some("listed b"), &EventOptions::default())
            .expect("event");
        let t = connect(&vpath);
        let mut list: Request = zeroed();
        list.op = OP_LIST;
        let mut room = vec![0u8; 4096];
        let r = t
            .call(&list, &mut room, ANSWER)
            .expect("call")
            .expect("answered");
        ok(&r);
        assert_eq!(r.size, r.max_size, "everything fit");
        let n = usize::try_from(r.size).expect("size");
        let records: Vec<(String, u8)> = ListRecord::parse(&room[..n])
            .map(|rec| (String::from_utf8_lossy(rec.name).into_owned(), rec.kind))
            .collect();
        assert_eq!(
            records,
            vec![
                (
                    "listed a".to_owned(),
                    u8::try_from(kind::SECTION).expect("kind")
                ),
                (
                    "listed b".to_owned(),
                    u8::try_from(kind::EVENT).expect("kind")
                ),
            ]
        );
        assert_eq!(r.limit, 2, "two records");
        // No room: the counts only.
        let counts = t
            .call(&list, &mut [], ANSWER)
            .expect("call")
            .expect("answered");
        ok(&counts);
        assert_eq!((counts.size, counts.max_size), (0, r.max_size));
    });
}

#[test]
fn dropping_the_transport_makes_vshmd_reclaim_what_it_alone_held() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let t = connect(&vpath);
        ok(&request(&t, &create("only mine")));
        assert!(host.open("only mine").is_ok(), "there while held");
        drop(t);
        assert!(
            wait_for(Duration::from_secs(10), || host
                .open("only mine")
                .is_err_and(|e| e.status() == Status::ObjectNameNotFound)),
            "the section died with its holder: {}",
            b.status()
        );
    });
}

#[test]
fn a_call_after_vshmd_died_fails_with_backend_gone() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let t = connect(&vpath);
        let made = request(&t, &create("left behind"));
        ok(&made);
        let pid = libc::pid_t::try_from(b.pid()).expect("pid");
        // SAFETY: kill(2) on the vshmd this test started (still our unreaped child).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let started = Instant::now();
        let r = t.call(&open("left behind", 0), &mut [], Duration::from_secs(30));
        assert_eq!(r, Err(TransportError::BackendGone));
        assert!(started.elapsed() < Duration::from_secs(10), "not a hang");
        assert!(t.backend_gone());
        let mut b2 = [7u8; 8];
        t.window().read_bytes(made.offset, &mut b2).expect("read");
        assert_eq!(b2, [0; 8], "nothing stays mapped once vshmd is gone");
        drop(b);
    });
}

#[test]
fn waits_parked_in_every_slot_they_may_take_leave_signal_open_and_close_room_to_complete() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let manual = EventOptions {
            manual_reset: true,
            persistent: false,
        };
        let (gate, _) = host.create_event(Some("gate"), &manual).expect("event");
        let (_other, _) = host
            .create_event(Some("other"), &EventOptions::default())
            .expect("event");
        let t = connect(&vpath);
        let g = request(&t, &open("gate", 0));
        ok(&g);
        let o = request(&t, &open("other", 0));
        ok(&o);
        // More WAITs than there are request slots, none of which the device can answer
        // yet.
        const WAITERS: usize = 60;
        std::thread::scope(|sc| {
            let waiters: Vec<_> = (0..WAITERS)
                .map(|_| {
                    let (t, g) = (&t, &g);
                    sc.spawn(move || {
                        t.call(&on(OP_WAIT, g, 30_000), &mut [], Duration::from_secs(40))
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(500));
            assert!(waiters.iter().all(|w| !w.is_finished()), "all pending");
            // Other requests still find a slot, at once.
            let prompt = Duration::from_secs(3);
            let started = Instant::now();
            let signal = t
                .call(&on(OP_SIGNAL, &o, 0), &mut [], prompt)
                .expect("call")
                .expect("SIGNAL answered while WAITs are parked");
            ok(&signal);
            let again = t
                .call(&open("gate", 0), &mut [], prompt)
                .expect("call")
                .expect("OPEN answered while WAITs are parked");
            ok(&again);
            let closed = t
                .call(&close(&again), &mut [], prompt)
                .expect("call")
                .expect("CLOSE answered while WAITs are parked");
            ok(&closed);
            assert!(started.elapsed() < prompt, "{:?}", started.elapsed());
            // A WAIT that finds WAITs' share taken waits for a slot, its own timeout
            // counting: it times out as the device would have timed it out.
            let started = Instant::now();
            let short = t
                .call(&on(OP_WAIT, &g, 200), &mut [], Duration::from_secs(10))
                .expect("call")
                .expect("the short WAIT was answered");
            assert_eq!(Status::from_code(short.status), Some(Status::Timeout));
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(200) && took < prompt,
                "{took:?}"
            );
            // A WAIT past the cap waited for a slot rather than failing: every one
            // completes once the gate opens.
            gate.signal().expect("host signals the gate");
            for w in waiters {
                let r = w
                    .join()
                    .expect("waiter")
                    .expect("call")
                    .expect("the WAIT was answered");
                ok(&r);
                assert_eq!((r.slot, r.generation), (g.slot, g.generation));
            }
        });
    });
}

/// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the vshmd this test started. A stop returns
/// only once every thread of it is stopped (the signal is delivered asynchronously: a
/// thread still running could answer what the test posts next).
fn signal_vshmd(b: &Backend, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(b.pid()).expect("pid");
    // SAFETY: kill(2) on the vshmd this test started (still our unreaped child).
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    if sig == libc::SIGSTOP {
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                            // The state follows the parenthesised command name.
                            st.rsplit_once(") ")
                                .is_some_and(|(_, rest)| rest.starts_with('T'))
                        })
                    })
                })
                .unwrap_or(false)
        };
        assert!(
            wait_for(Duration::from_secs(10), all_stopped),
            "vshmd's threads stopped"
        );
    }
}

#[test]
fn an_open_given_up_on_before_its_answer_is_closed_by_the_transport_when_the_answer_comes() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let (h, _) = host
            .create(Some("late open"), &CreateOptions::new(16 << 10))
            .expect("create");
        let t = connect(&vpath);
        let holders = || host.holders(h.slot()).count();
        assert_eq!(holders(), 1, "the host alone");
        // vshmd stalled: the OPEN gets no answer in time, and the caller gives up.
        signal_vshmd(&b, libc::SIGSTOP);
        let gave_up = t.call(&open("late open", 0), &mut [], Duration::from_millis(300));
        signal_vshmd(&b, libc::SIGCONT);
        assert_eq!(gave_up, Ok(None), "no answer within 300 ms");
        // A later request is answered after the OPEN (in order): the OPEN was carried out.
        let mut list: Request = zeroed();
        list.op = OP_LIST;
        ok(&request(&t, &list));
        // Its hold is given back without anyone asking.
        assert!(
            wait_for(Duration::from_secs(10), || holders() == 1),
            "the device peer still holds the section ({} holders)",
            holders()
        );
        // So the host's close is the last: the section is destroyed.
        drop(h);
        assert!(
            wait_for(Duration::from_secs(10), || host
                .open("late open")
                .is_err_and(|e| e.status() == Status::ObjectNameNotFound)),
            "destroyed at the last close"
        );
        let mut b2 = [7u8; 8];
        t.window().read_bytes(0, &mut b2).expect("read");
        assert_eq!(b2, [0; 8], "nothing left mapped");
    });
}

#[test]
fn a_signal_taken_by_a_wait_given_up_on_is_given_back_to_the_event() {
    watchdog(LIMIT, || {
        let (b, vpath) = start("4M");
        let host = b.connect();
        let (ev, _) = host
            .create_event(Some("auto"), &EventOptions::default())
            .expect("event");
        let t = connect(&vpath);
        let e = request(&t, &open("auto", 0));
        ok(&e);
        // A WAIT whose caller gives up at once; the device still has it when the signal
        // comes, and it takes it.
        let gave_up = t
            .call(&on(OP_WAIT, &e, 5_000), &mut [], Duration::from_millis(50))
            .expect("call");
        assert!(gave_up.is_none(), "no answer within 50 ms");
        ev.signal().expect("host signals");
        std::thread::sleep(Duration::from_millis(300));
        // The signal is still there for the next waiter.
        let next = request(&t, &on(OP_WAIT, &e, 2_000));
        ok(&next);
    });
}
