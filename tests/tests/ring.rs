//! The SPSC byte ring inside a section (docs/FORMAT.md §6c) through a real vshmd: two host
//! peers streaming frames, woken by the section's notifications; two threads streaming
//! 64 MiB; the one-producer rule; a scribbling peer.

use std::time::{Duration, Instant};

use vshm::host::HostTransport;
use vshm::{CreateOptions, Error, Namespace, Ring, RingError, Status};
use vshm_tests::{watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);
const WAIT: Option<Duration> = Some(Duration::from_secs(30));

fn peer(b: &Backend) -> Namespace<HostTransport> {
    Namespace::attach(HostTransport::connect(&b.socket).expect("connect")).expect("attach")
}

/// Frame `k` of the stream: its length varies so that prefixes and payloads wrap.
fn frame(k: u32) -> Vec<u8> {
    let len = (k.wrapping_mul(2_654_435_761) >> 20) % 1500;
    (0..len).map(|i| (i ^ k).to_le_bytes()[0]).collect()
}

#[test]
fn two_host_peers_stream_frames_through_a_ring_in_a_section() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let (a, c) = (peer(&b), peer(&b));
        assert_ne!(a.peer_id(), c.peer_id(), "two peers");
        const FRAMES: u32 = 3000;
        std::thread::scope(|s| {
            let (section, _) = a
                .create(Some("frames"), &CreateOptions::new(64 * 1024))
                .expect("create");
            // Not at offset 0: a ring can share its section with other data.
            let ring = Ring::create_in(&section, 4096, 4096).expect("create the ring");
            assert_eq!((ring.capacity(), ring.max_frame()), (4096, 4092));
            let consumer = s.spawn(|| {
                let section = c.open("frames").expect("open");
                let ring = Ring::attach(&section, 4096).expect("attach");
                let mut rx = ring.consumer().expect("the consumer's side");
                let mut got = Vec::new();
                for k in 0..FRAMES {
                    rx.recv_frame_blocking(&mut got, WAIT).expect("a frame");
                    assert_eq!(got, frame(k), "frame {k}");
                }
                assert_eq!(rx.recv_frame(&mut got), Ok(false), "nothing more");
            });
            let mut tx = ring.producer().expect("the producer's side");
            for k in 0..FRAMES {
                tx.send_frame_blocking(&frame(k), WAIT).expect("send");
            }
            consumer.join().expect("consumer");
        });
    });
}

#[test]
fn a_producer_thread_and_a_consumer_thread_stream_64_mib_through_a_section() {
    watchdog(LIMIT, || {
        const TOTAL: usize = 64 << 20;
        let b = Backend::start(&["--size", "16M"]);
        let ns = peer(&b);
        let (section, _) = ns
            .create(Some("stream"), &CreateOptions::new(1 << 20))
            .expect("create");
        let ring = Ring::create_in(&section, 0, 256 << 10).expect("ring");
        let start = Instant::now();
        let (sum_in, sum_out) = std::thread::scope(|s| {
            let consumer = s.spawn(|| {
                let mut rx = ring.consumer().expect("consumer");
                let mut buf = vec![0u8; 48 << 10];
                let (mut got, mut sum) = (0usize, 0u64);
                while got < TOTAL {
                    let n = rx.read_blocking(&mut buf, WAIT).expect("read");
                    sum = buf[..n]
                        .iter()
                        .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                    got += n;
                }
                sum
            });
            let mut tx = ring.producer().expect("producer");
            let mut chunk = vec![0u8; 64 << 10];
            let (mut sent, mut sum) = (0usize, 0u64);
            while sent < TOTAL {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = ((sent + i) % 251).to_le_bytes()[0];
                }
                tx.write_all(&chunk, WAIT).expect("write");
                sum = chunk
                    .iter()
                    .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                sent += chunk.len();
            }
            (sum, consumer.join().expect("consumer"))
        });
        let elapsed = start.elapsed();
        assert_eq!(sum_in, sum_out, "the checksums differ");
        // A reading, not an assertion.
        eprintln!(
            "ring over vshmd: 64 MiB through 256 KiB in {elapsed:?}: {:.0} MiB/s",
            64.0 / elapsed.as_secs_f64()
        );
    });
}

#[test]
fn ping_pong_between_two_peers_is_woken_by_notifications_not_by_the_recheck() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let (a, c) = (peer(&b), peer(&b));
        const ROUNDS: u32 = 200;
        let (section, _) = a
            .create(Some("pingpong"), &CreateOptions::new(64 * 1024))
            .expect("create");
        let ping = Ring::create_in(&section, 0, 1024).expect("ping ring");
        let pong = Ring::create_in(&section, 4096, 1024).expect("pong ring");
        let elapsed = std::thread::scope(|s| {
            s.spawn(|| {
                let section = c.open("pingpong").expect("open");
                let ping = Ring::attach(&section, 0).expect("attach ping");
                let pong = Ring::attach(&section, 4096).expect("attach pong");
                let (mut rx, mut tx) = (ping.consumer().expect("rx"), pong.producer().expect("tx"));
                let mut buf = Vec::new();
                for _ in 0..ROUNDS {
                    rx.recv_frame_blocking(&mut buf, WAIT).expect("ping");
                    tx.send_frame_blocking(&buf, WAIT).expect("pong");
                }
            });
            let (mut tx, mut rx) = (ping.producer().expect("tx"), pong.consumer().expect("rx"));
            let mut buf = Vec::new();
            let start = Instant::now();
            for k in 0..ROUNDS {
                tx.send_frame_blocking(&k.to_le_bytes(), WAIT)
                    .expect("ping");
                rx.recv_frame_blocking(&mut buf, WAIT).expect("pong");
                assert_eq!(buf, k.to_le_bytes());
            }
            start.elapsed()
        });
        let per_round = elapsed / ROUNDS;
        eprintln!("ring ping-pong between two peers: {per_round:?} a round trip");
        // Each side sleeps every round (the other answers only after it is woken). A lost
        // wake-up would cost the 50 ms the host transport's waiter re-checks after, twice a
        // round; notifications answer in well under a millisecond unloaded.
        assert!(
            per_round < Duration::from_millis(40),
            "{per_round:?} a round trip: woken by the re-check, not by notifications"
        );
    });
}

#[test]
fn one_producer_and_one_consumer_per_ring_in_a_process() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let ns = peer(&b);
        let (section, _) = ns
            .create(Some("one"), &CreateOptions::new(64 * 1024))
            .expect("create");
        let ring = Ring::create_in(&section, 0, 1024).expect("ring");
        assert_eq!(
            Ring::create_in(&section, 0, 1024).map(|_| ()),
            Err(Error::Ring(RingError::InUse {
                magic: vshm_format::ring::MAGIC
            }))
        );
        let again = Ring::attach(&section, 0).expect("attach");
        let tx = ring.producer().expect("producer");
        let taken = Err(Error::Ring(RingError::SideTaken { producer: true }));
        assert_eq!(ring.producer().map(|_| ()), taken);
        assert_eq!(
            again.producer().map(|_| ()),
            taken,
            "through another Ring too"
        );
        let rx = again.consumer().expect("consumer");
        assert_eq!(
            ring.consumer().map(|_| ()),
            Err(Error::Ring(RingError::SideTaken { producer: false }))
        );
        drop((tx, rx));
        ring.producer().expect("free again once dropped");
        // A read-only handle cannot take a side: both store an index.
        let ro = ns.open_read_only("one").expect("open read-only");
        let ro_ring = Ring::attach(&ro, 0).expect("attach read-only");
        assert_eq!(
            ro_ring.consumer().map(|_| ()),
            Err(Error::Status(Status::AccessDenied))
        );
        // A ring that does not fit in the section's size.
        assert_eq!(
            Ring::create_in(&section, 32 * 1024, 32 * 1024).map(|_| ()),
            Err(Error::Ring(RingError::TooSmall {
                need: 384 + 32 * 1024,
                room: 32 * 1024
            }))
        );
    });
}

#[test]
fn a_peer_scribbling_the_head_makes_the_other_consumer_see_corrupt_not_garbage() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let (a, c) = (peer(&b), peer(&b));
        let (section, _) = a
            .create(Some("victim"), &CreateOptions::new(64 * 1024))
            .expect("create");
        let ring = Ring::create_in(&section, 0, 1024).expect("ring");
        let mut tx = ring.producer().expect("producer");
        tx.send_frame(b"honest").expect("send");
        let other = c.open("victim").expect("open");
        let theirs = Ring::attach(&other, 0).expect("attach");
        let mut rx = theirs.consumer().expect("consumer");
        let mut got = Vec::new();
        assert_eq!(rx.recv_frame(&mut got), Ok(true));
        assert_eq!(got, b"honest");
        // A third peer stores a head far beyond what the ring can hold.
        let scribbler = peer(&b);
        let s = scribbler.open("victim").expect("open");
        s.write_at(128, &(1u64 << 40).to_le_bytes())
            .expect("scribble");
        assert_eq!(
            rx.recv_frame(&mut got),
            Err(Error::Ring(RingError::Corrupt {
                head: 1 << 40,
                tail: 10,
                capacity: 1024
            }))
        );
        // And a forged frame length, with an honest-looking head.
        s.write_at(128, &14u64.to_le_bytes()).expect("restore");
        s.write_at(384 + 10, &5000u32.to_le_bytes()).expect("forge");
        drop(rx);
        let mut rx = theirs.consumer().expect("consumer again");
        assert_eq!(
            rx.recv_frame(&mut got),
            Err(Error::Ring(RingError::CorruptFrame {
                len: Some(5000),
                available: 4,
                capacity: 1024
            }))
        );
        // The producer notices its own index was changed behind its back.
        assert!(matches!(
            tx.send_frame(b"x"),
            Err(Error::Ring(RingError::Corrupt { head: 14, .. }))
        ));
    });
}
