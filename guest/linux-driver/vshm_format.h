/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * vshm_format.h - the few constants of the vshm region format (docs/FORMAT.md, version 4)
 * the driver's per-process cleanup needs beyond what struct vshm_track carries: the
 * refcount cell and lease word encodings (§5, §7), the peer-table entry (§4) and the
 * mailbox request/response words (§9). Mirrored from the vshm-format crate;
 * tests/driver_abi.rs checks every value against it.
 */
#ifndef VSHM_FORMAT_H
#define VSHM_FORMAT_H

/* Refcount cell: bit 31 = the peer-local transition lock; bits 0..30 = the handle count
 * (unlocked) or the lock owner's token (locked). */
#define VSHM_REF_LOCK 0x80000000u
#define VSHM_REF_COUNT 0x7FFFFFFFu

/* Lease word: bit i = peer slot i holds the object; KEEP = persistent; CLOSED = final. */
#define VSHM_LEASE_CLOSED (1ULL << 63)
#define VSHM_LEASE_KEEP (1ULL << 62)
#define VSHM_LEASE_HOLDERS (VSHM_LEASE_KEEP - 1)
/* CAS attempts on a lease word before leaving it to the host's sweep. */
#define VSHM_CAS_TRIES (1u << 16)

/* Mutex owner word (the entry's sync word): slot + 1 in bits 0..8, token in bits 8..40. */
#define VSHM_MUTEX_OWNER ((1ULL << 40) - 1)

/* Peer-table entry. */
#define VSHM_PEER_STATE_OFF 0
#define VSHM_PEER_ID_OFF 4
#define VSHM_PEER_INCARNATION_OFF 8
#define VSHM_PEER_CONNECTED 1

/* Mailbox (2048 bytes): request words, then the response at 1280. */
#define VSHM_MAILBOX_SIZE 2048
#define VSHM_MB_REQ_SEQ_OFF 0
#define VSHM_MB_LOCK_OFF 8
#define VSHM_MB_OP_OFF 12
#define VSHM_MB_SLOT_OFF 24
#define VSHM_MB_GENERATION_OFF 32
#define VSHM_MB_SIZE_OFF 48
/* UNLOCK on behalf of a dead owner: the owner token the poster saw (§6a). */
#define VSHM_MB_MAX_SIZE_OFF 40
/* A post writes request bytes 12 up to here (the peer's audit words follow). */
#define VSHM_MB_BODY_END 1168
#define VSHM_MB_RESP_SEQ_OFF 1280
#define VSHM_MB_STATUS_OFF 1288
/* The close hint (not part of a request) and its "several closes: sweep" value. */
#define VSHM_MB_CLOSED_HINT_OFF 1184
#define VSHM_CLOSED_HINT_MANY 0xFFFFFFFFFFFFFFFFULL
#define VSHM_OP_UNLOCK 6

/* Doorbell vector 0: the host's control vector (requests, last closes). */
#define VSHM_VECTOR_CONTROL 0

#endif /* VSHM_FORMAT_H */
