//! A refusal says which limit was hit, to the refused client and on the `vshm` command
//! line: the object table, the heap (and its largest free extent), the peer slots. Real
//! vshmd, real sockets.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vshm::format::mailbox::{ConnectRefusal, Refusal};
use vshm::host::{HostError, HostTransport};
use vshm::{CreateOptions, Error, Status};
use vshm_tests::{stderr, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(60);

fn opts(max_size: u64) -> CreateOptions {
    CreateOptions {
        max_size,
        initial_size: 0,
        persistent: false,
    }
}

#[test]
fn a_full_object_table_is_named_with_its_size_to_the_library_and_on_the_command_line() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M", "--max-objects", "4"]);
        let ns = b.connect();
        let held: Vec<_> = (0..4)
            .map(|i| {
                ns.create(Some(&format!("o{i}")), &opts(4096))
                    .expect("create")
                    .0
            })
            .collect();
        let err = ns
            .create(Some("one-more"), &opts(4096))
            .map(|_| ())
            .expect_err("the table is full");
        assert_eq!(err.status(), Status::InsufficientResources);
        assert_eq!(
            err,
            Error::Refused {
                status: Status::InsufficientResources,
                reason: Refusal::ObjectTableFull { max_objects: 4 },
            }
        );
        assert_eq!(
            err.to_string(),
            "STATUS_INSUFFICIENT_RESOURCES (0xC000009A): the object table is full (4 objects)"
        );
        // Events and mutexes take a table slot too.
        let err = ns
            .create_mutex(Some("mx"), false)
            .map(|_| ())
            .expect_err("the table is full");
        assert_eq!(err.status(), Status::InsufficientResources);
        assert!(err.to_string().contains("object table is full"), "{err}");
        let out = b.vshm(&["create", "x", "--max", "4K"]);
        assert!(!out.status.success());
        assert_eq!(
            stderr(&out).trim(),
            "vshm: STATUS_INSUFFICIENT_RESOURCES (0xC000009A): the object table is full \
             (4 objects): create \"x\""
        );
        drop(held);
    });
}

#[test]
fn a_create_no_free_extent_can_take_names_the_heap_and_its_largest_extent() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let region = &b.status()["region"];
        let heap = region["heap_size"].as_u64().expect("heap_size");
        let ns = b.connect();
        // Leave 64 KiB free: a 1 MiB section fits the heap but no free extent.
        let (_big, _) = ns
            .create(Some("big"), &opts(heap - (64 << 10)))
            .expect("create big");
        let largest = b.status()["region"]["largest_free"]
            .as_u64()
            .expect("largest_free");
        assert!(largest < 1 << 20, "{largest}");
        let err = ns
            .create(Some("more"), &opts(1 << 20))
            .map(|_| ())
            .expect_err("no extent is large enough");
        assert_eq!(err.status(), Status::InsufficientResources);
        assert_eq!(
            err,
            Error::Refused {
                status: Status::InsufficientResources,
                reason: Refusal::NoFreeExtent {
                    wanted: 1 << 20,
                    largest,
                },
            }
        );
        assert_eq!(
            err.to_string(),
            "STATUS_INSUFFICIENT_RESOURCES (0xC000009A): no free heap extent of 1.0 MiB \
             (largest 64.0 KiB)"
        );
        let out = b.vshm(&["create", "more", "--max", "1M"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("no free heap extent of 1.0 MiB (largest 64.0 KiB)"),
            "{}",
            stderr(&out)
        );
        // Larger than the whole heap is its own reason.
        let out = b.vshm(&["create", "huge", "--max", "1G"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(
                "STATUS_INSUFFICIENT_RESOURCES (0xC000009A): 1.0 GiB is larger than the whole heap"
            ),
            "{}",
            stderr(&out)
        );
    });
}

#[test]
fn a_client_refused_for_lack_of_a_peer_slot_is_told_so_and_the_connection_is_closed() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M", "--max-peers", "1"]);
        let _only = b.connect();
        match HostTransport::connect(&b.socket) {
            Err(HostError::Refused { reason, .. }) => {
                assert_eq!(reason, ConnectRefusal::PeerSlotsFull { max_peers: 1 });
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let e = HostTransport::connect(&b.socket).expect_err("refused");
        assert!(
            e.to_string()
                .ends_with("refused the connection: the only peer slot is in use (max_peers 1)"),
            "{e}"
        );
        // On the wire: -1 where the version goes, the detail, then end of stream.
        let mut raw = UnixStream::connect(&b.socket).expect("connect");
        raw.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut bytes = Vec::new();
        raw.read_to_end(&mut bytes).expect("closed by vshmd");
        let msgs: Vec<i64> = bytes
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte messages")))
            .collect();
        assert_eq!(msgs, [-1, 1]);
        let out = b.vshm(&["list"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("refused the connection: the only peer slot is in use"),
            "{}",
            stderr(&out)
        );
    });
}

#[test]
fn with_a_bigger_peer_table_the_refusal_counts_the_slots() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M", "--max-peers", "2"]);
        let _one = b.connect();
        let _two = b.connect();
        let out = b.vshm(&["list"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("all 2 peer slots are in use"),
            "{}",
            stderr(&out)
        );
    });
}
