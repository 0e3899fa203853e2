//! Any bytes as a mailbox request: `mailbox::decode` never panics, a request it refuses
//! gets a failure status, and a command it accepts satisfies what docs/FORMAT.md promises
//! the host acts on: the op matches; CREATE has known flags, MANUAL_RESET only on an event,
//! a valid name exactly when NAMED, no memory for an event or mutex and for a section
//! `0 < max_size <= heap size`, `size <= max_size`; every other op names a slot inside the
//! object table, and LOCK/UNLOCK/CANCEL carry a non-zero 32-bit token. Posting the request
//! through a mailbox (`post`, then the host's `take_request`) hands the host the same bytes.
//!
//! Input: 1280 request bytes; an optional 1281st byte picks the layout and the mailbox.
#![no_main]

use std::mem::size_of;

use libfuzzer_sys::fuzz_target;
use vshm_format::layout::{kind, object_flags, op, Request, MAX_NAME_BYTES};
use vshm_format::mailbox::{self, Command};
use vshm_format::{validate_name, PeerSlot};
use vshm_fuzz::{layout, pod_from, Buf};

fuzz_target!(|data: &[u8]| {
    let selector = data.get(size_of::<Request>()).copied().unwrap_or(0);
    let l = layout(selector);
    let req: Request = pod_from(data);
    match mailbox::decode(&req, &l) {
        Ok(cmd) => check_accepted(&req, &l, &cmd),
        Err(status) => assert!(!status.is_success(), "refused with {status:?}"),
    }

    // Through a mailbox: the host copies out what the peer posted.
    let peer = PeerSlot(u32::from(selector) % l.max_peers.min(4));
    let end = l.mailbox(peer).expect("in range") + 2048;
    let mut buf = Buf::new(usize::try_from(end).expect("small"));
    let mem = buf.region();
    let seq = mailbox::post(&mem, &l, peer, &req).expect("post");
    let (got_seq, got) = mailbox::take_request(&mem, &l, peer, 0)
        .expect("take")
        .expect("posted");
    assert_eq!(got_seq, seq);
    let mut want = req;
    want.req_seq = seq;
    want.lock = 0;
    // The peer's audit words and close hint after the name are not part of a request:
    // posting leaves them as they were (zero in this fresh buffer).
    want.audited_seq = 0;
    want.revoked_handles = 0;
    want.closed_hint = 0;
    want.reserved2 = [0; 88];
    assert_eq!(got, want);
    assert_eq!(mailbox::take_request(&mem, &l, peer, seq), Ok(None));
});

fn check_accepted(req: &Request, l: &vshm_format::layout::Layout, cmd: &Command<'_>) {
    let target = |slot: vshm_format::ObjectSlot, generation: vshm_format::Generation| {
        assert!(slot.0 < l.max_objects);
        assert!(l.object_entry(slot).is_some());
        assert_eq!(slot.0, req.slot);
        assert_eq!(generation.0, req.generation);
    };
    let token_ok = |token: u32| {
        assert_ne!(token, 0);
        assert_eq!(u64::from(token), req.size);
    };
    match *cmd {
        Command::Create {
            name,
            kind: k,
            max_size,
            initial_size,
            persistent,
            manual_reset,
        } => {
            assert_eq!(req.op, op::CREATE);
            assert_eq!(req.flags & !object_flags::ALL, 0);
            assert_eq!(k, req.kind);
            assert_eq!(persistent, req.flags & object_flags::PERSISTENT != 0);
            assert_eq!(manual_reset, req.flags & object_flags::MANUAL_RESET != 0);
            if manual_reset {
                assert_eq!(k, kind::EVENT);
            }
            match name {
                Some(n) => {
                    assert!(req.flags & object_flags::NAMED != 0);
                    assert_eq!(validate_name(n), Ok(()));
                    assert!(n.len() <= MAX_NAME_BYTES);
                    assert_eq!(n.len(), req.name_len as usize);
                    assert_eq!(n.as_bytes(), &req.name[..n.len()]);
                }
                None => {
                    assert!(req.flags & object_flags::NAMED == 0);
                    assert_eq!(req.name_len, 0);
                }
            }
            match k {
                kind::SECTION => {
                    assert!(max_size > 0 && max_size <= l.heap_size);
                    assert!(initial_size <= max_size);
                    assert_eq!((max_size, initial_size), (req.max_size, req.size));
                }
                kind::EVENT | kind::MUTEX => {
                    assert_eq!((max_size, initial_size), (0, 0));
                    assert_eq!((req.max_size, req.size), (0, 0));
                }
                other => panic!("accepted CREATE of kind {other}"),
            }
        }
        Command::Delete { slot, generation } => {
            assert_eq!(req.op, op::DELETE);
            target(slot, generation);
        }
        Command::Grow {
            slot,
            generation,
            size,
        } => {
            assert_eq!(req.op, op::GROW);
            target(slot, generation);
            assert_eq!(size, req.size);
        }
        Command::Wake { slot, generation } => {
            assert_eq!(req.op, op::WAKE);
            target(slot, generation);
        }
        Command::Lock {
            slot,
            generation,
            token,
        } => {
            assert_eq!(req.op, op::LOCK);
            target(slot, generation);
            token_ok(token);
        }
        Command::Unlock {
            slot,
            generation,
            token,
            presumed_dead,
        } => {
            assert_eq!(req.op, op::UNLOCK);
            target(slot, generation);
            token_ok(token);
            assert_eq!(presumed_dead.map_or(0, u64::from), req.max_size);
        }
        Command::Cancel {
            slot,
            generation,
            token,
        } => {
            assert_eq!(req.op, op::CANCEL);
            target(slot, generation);
            token_ok(token);
        }
    }
}
