//! The ivshmem server protocol byte by byte, as QEMU sees it, over a real socket; and the
//! mailbox protocol driven by hand, including requests a hostile peer would send.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vshm_format::layout::{Layout, Request, Superblock, MB_RESPONSE_OFF};
use vshm_format::mailbox;
use vshm_format::shm::{bytes_of, read_pod, SharedMemory};
use vshm_format::{Generation, ObjectSlot, Status};
use vshm_tests::{recv_msg, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(30);

fn handshake(sock: &UnixStream, vectors: usize) -> (i64, File, Vec<(i64, File)>) {
    let (v, fd) = recv_msg(sock).expect("version");
    assert_eq!(
        (v, fd.is_none()),
        (0, true),
        "protocol version 0 without fd"
    );
    let (id, fd) = recv_msg(sock).expect("peer id");
    assert!(
        fd.is_none() && (1..=62).contains(&id),
        "own id {id} without fd"
    );
    let (m, shm) = recv_msg(sock).expect("shm");
    assert_eq!(m, -1, "shared memory is announced as -1");
    let shm = shm.expect("shared memory fd");
    let mut rest = Vec::new();
    // Everything up to and including our own id `vectors` times.
    while rest.iter().filter(|(p, _)| *p == id).count() < vectors {
        let (p, fd) = recv_msg(sock).expect("peer message");
        rest.push((p, fd.expect("eventfd with each peer message")));
    }
    (id, shm, rest)
}

#[test]
fn the_handshake_is_qemus_ivshmem_protocol() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M", "--vectors", "3"]);
        let a = UnixStream::connect(&b.socket).expect("connect a");
        let (id_a, shm, msgs) = handshake(&a, 3);
        assert_eq!(
            shm.metadata().expect("stat").len(),
            2 << 20,
            "the memfd is the region"
        );
        let ids: Vec<i64> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            ids,
            vec![0, 0, 0, id_a, id_a, id_a],
            "host peer 0 first, then our own vectors"
        );

        let c = UnixStream::connect(&b.socket).expect("connect c");
        let (id_c, _, msgs_c) = handshake(&c, 3);
        assert_ne!(id_a, id_c);
        let ids: Vec<i64> = msgs_c.iter().map(|m| m.0).collect();
        assert_eq!(ids, vec![0, 0, 0, id_a, id_a, id_a, id_c, id_c, id_c]);
        // a hears about c: c's id once per vector, each with an fd.
        for _ in 0..3 {
            let (p, fd) = recv_msg(&a).expect("join");
            assert_eq!((p, fd.is_some()), (id_c, true));
        }
        // A peer leaving is not announced (FORMAT.md §15): a hears nothing more.
        drop(c);
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert!(recv_msg(&a).is_none(), "no departure message");
    });
}

fn ring(fd: &File) {
    use std::io::Write;
    (&*fd).write_all(&1u64.to_ne_bytes()).expect("ring");
}

fn wait_readable(fd: &File) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 5000) == 1 }
}

#[test]
fn garbage_requests_get_error_replies_and_the_backend_keeps_serving() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M"]);
        let sock = UnixStream::connect(&b.socket).expect("connect");
        let (id, shm, msgs) = handshake(&sock, 2);
        let bar = vshm_tests::map(&shm);
        let region = bar.region();
        let sb: Superblock = read_pod(&region, 0).expect("superblock");
        let layout = Layout::from_superblock(&sb, region.size()).expect("valid header");
        let id16 = vshm_format::PeerId(u16::try_from(id).expect("id"));
        let slot = vshm_format::object::find_peer_slot(&region, &layout, id16).expect("our slot");
        let host_bell = &msgs[0].1;
        let own = &msgs.iter().find(|m| m.0 == id).expect("own vector 0").1;
        let mb = layout.mailbox(slot).expect("mailbox");

        let mut cases: Vec<(Request, Status)> = Vec::new();
        let mut r = mailbox::create_request(Some("ok"), 1, 4096, 4096, false);
        r.op = 99;
        cases.push((r, Status::InvalidParameter));
        let mut r = mailbox::create_request(Some("ok"), 1, 4096, 4096, false);
        r.name_len = 5000;
        cases.push((r, Status::ObjectNameInvalid));
        let mut r = mailbox::create_request(Some("ok"), 1, 4096, 4096, false);
        r.name[0] = 0xFF; // not UTF-8
        cases.push((r, Status::ObjectNameInvalid));
        let mut r = mailbox::create_request(Some("ok"), 1, 4096, 4096, false);
        r.name[1] = b'\\';
        cases.push((r, Status::ObjectNameInvalid));
        cases.push((
            mailbox::create_request(Some("ok"), 1, 0, 0, false),
            Status::InvalidParameter,
        ));
        cases.push((
            mailbox::create_request(Some("ok"), 1, 4096, 8192, false),
            Status::InvalidParameter,
        ));
        cases.push((
            mailbox::create_request(Some("ok"), 1, u64::MAX, 1, false),
            Status::InsufficientResources,
        ));
        cases.push((
            mailbox::create_request(Some("ok"), 77, 4096, 4096, false),
            Status::InvalidParameter,
        ));
        // Events and mutexes have no memory: asking for some is a bad parameter.
        cases.push((
            mailbox::create_request(Some("ev"), 2, 4096, 4096, false),
            Status::InvalidParameter,
        ));
        let mut r = mailbox::create_request(Some("mx"), 3, 0, 0, false);
        r.flags |= vshm_format::layout::object_flags::MANUAL_RESET;
        cases.push((r, Status::InvalidParameter));
        cases.push((
            mailbox::wake_request(ObjectSlot(u32::MAX), Generation(1)),
            Status::InvalidHandle,
        ));
        cases.push((
            mailbox::mutex_request(
                vshm_format::layout::op::LOCK,
                ObjectSlot(0),
                Generation(1),
                0,
            ),
            Status::InvalidParameter,
        ));
        let mut r = mailbox::create_request(Some("ok"), 1, 4096, 4096, false);
        r.flags |= 0x100;
        cases.push((r, Status::InvalidParameter));
        cases.push((
            mailbox::delete_request(ObjectSlot(u32::MAX), Generation(1)),
            Status::InvalidHandle,
        ));
        cases.push((
            mailbox::delete_request(ObjectSlot(3), Generation(12345)),
            Status::ObjectNameNotFound,
        ));
        cases.push((
            mailbox::grow_request(ObjectSlot(0), Generation(1), 4096),
            Status::InvalidHandle,
        ));

        for (seq, (req, want)) in (1u64..).zip(cases) {
            // Write the request the way a peer does, then a sequence number.
            let bytes = bytes_of(&req);
            region.write_bytes(mb + 12, &bytes[12..]).expect("request");
            region.store_u64(mb, seq, Ordering::Release).expect("seq");
            ring(host_bell);
            assert!(
                wait_readable(own),
                "the host rang us back for request {seq}"
            );
            let mut buf = [0u8; 8];
            let _ = std::io::Read::read(&mut &*own, &mut buf);
            let resp_seq = region
                .load_u64(mb + MB_RESPONSE_OFF, Ordering::Acquire)
                .expect("resp");
            assert_eq!(resp_seq, seq);
            let status = region
                .load_u32(mb + MB_RESPONSE_OFF + 8, Ordering::Acquire)
                .expect("status");
            assert_eq!(
                Status::from_code(status),
                Some(want),
                "request {seq}: {req:?}"
            );
        }
        // Scribble over every table (peers, objects, rows, mailboxes): the backend survives,
        // keeps its own state, and fresh peers still create and open by name.
        let len = usize::try_from(layout.heap_offset - layout.peer_table).expect("len");
        region
            .write_bytes(layout.peer_table, &vec![0xA5; len])
            .expect("scribble");
        ring(host_bell);
        assert_eq!(
            b.status()["region"]["size"].as_u64(),
            Some(2 << 20),
            "backend alive"
        );
        let ns = b.connect();
        let (s, _) = ns
            .create(Some("after"), &vshm::CreateOptions::new(4096))
            .expect("create");
        s.write_at(0, b"fine").expect("write");
        let other = b.connect();
        let mut buf = [0u8; 4];
        other
            .open("after")
            .expect("open")
            .read_at(0, &mut buf)
            .expect("read");
        assert_eq!(&buf, b"fine");
    });
}

#[test]
fn a_departed_peer_id_is_never_announced_and_its_reuse_sends_a_witness_nothing() {
    // QEMU frees its per-id eventfd array when told a peer left and writes into it if the
    // id joins again: vshmd never announces a departure, and hands the id on with the same
    // eventfds, which a client that saw the id already holds (FORMAT.md §15).
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "2M", "--max-peers", "3", "--vectors", "2"]);
        let witness = UnixStream::connect(&b.socket).expect("connect");
        let (wid, _, _) = handshake(&witness, 2);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let s = UnixStream::connect(&b.socket).expect("connect");
            let (id, _, _) = handshake(&s, 2);
            seen.push(id);
            drop(s);
            // The departure is processed before the next connect is accepted.
            assert!(
                vshm_tests::wait_for(Duration::from_secs(5), || {
                    b.status()["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().filter(|p| p["connected"] == true).count() == 1)
                }),
                "peer {id} left"
            );
        }
        assert!(!seen.contains(&wid));
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "the parked id is handed on: {seen:?}"
        );
        witness
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut told = Vec::new();
        while let Some((id, fd)) = recv_msg(&witness) {
            assert!(fd.is_some(), "peer {id} announced as gone");
            told.push(id);
        }
        assert_eq!(
            told,
            vec![seen[0], seen[0]],
            "the witness learns the id's eventfds once (one per vector), never again"
        );
    });
}
