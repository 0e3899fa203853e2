/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * vshm_ioctl.h - user-space ABI of the vshm Linux guest driver (/dev/vshmN).
 *
 * One /dev/vshmN per ivshmem-doorbell PCI function (1af4:1110) the driver binds.
 * Usable from C (kernel and user space); mirrored in Rust in guest/src/driver.rs.
 *
 *   mmap(fd, offset 0..region_size)  the shared region (BAR2), MAP_SHARED only, mapped
 *                                   cacheable (write-back): see docs/GUEST.md.
 *   ioctl(fd, VSHM_IOC_INFO, &info) peer id (IVPosition), region size, MSI-X vectors.
 *   ioctl(fd, VSHM_IOC_RING, &ring) rings `ring.peer`'s doorbell on `ring.vector`
 *                                   (a write of (peer << 16) | vector to BAR0 offset 12).
 *   ioctl(fd, VSHM_IOC_KICK)        wakes every waiter of this device in this guest
 *                                   without an interrupt (a local change, e.g. a lock
 *                                   released): counted in `kicks`.
 *   ioctl(fd, VSHM_IOC_TRACK, &t)   (flags VSHM_INFO_TRACK) gives this open file a hold table of
 *                                   t.max_objects struct vshm_hold entries, mapped with
 *                                   mmap(fd, offset region_size, length
 *                                   vshm_holds_len(t.max_objects)): the process records
 *                                   its handles and mutex ownerships there, and when the
 *                                   file is released (exit, SIGKILL, OOM kill) the driver
 *                                   closes what it still holds (docs/FORMAT.md §11b).
 *                                   Once per open file (EBUSY after); EINVAL names no
 *                                   field: every offset must lie inside the region.
 *   poll(fd)                        POLLIN when an interrupt (any vector) or a kick
 *                                   arrived since this open file last read;
 *                                   POLLHUP|POLLERR once the device is gone (unbound).
 *   read(fd, &events, sizeof events) blocks (unless O_NONBLOCK: EAGAIN) until something
 *                                   arrived since this open file last read, then returns
 *                                   the device's cumulative counters and marks them seen.
 *                                   The buffer must hold a struct vshm_events (EINVAL).
 *
 * Every open file has its own "seen" mark (initialised at open to the current total), so
 * several waiters never consume each other's wake-ups: give each waiting thread its own
 * open file. After the device is unbound every operation fails with ENODEV and the
 * region's pages are unmapped (accesses raise SIGBUS).
 */
#ifndef VSHM_IOCTL_H
#define VSHM_IOCTL_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
#else
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#endif

/* The ABI version VSHM_IOC_INFO reports; bumped on an incompatible change. Additions
 * are announced in vshm_info.flags instead, so older programs keep working. */
#define VSHM_ABI_VERSION 1

/* vshm_info.flags: VSHM_IOC_TRACK and the hold table are there. */
#define VSHM_INFO_TRACK 0x1u

/* The most MSI-X vectors the driver uses per device (counts[] has this many entries). */
#define VSHM_MAX_VECTORS 16

struct vshm_info {
	__u32 abi_version; /* VSHM_ABI_VERSION */
	__u32 peer_id;     /* IVPosition, read from BAR0 at the call */
	__u64 region_size; /* BAR2 length in bytes */
	__u32 vectors;     /* MSI-X vectors with a handler (<= VSHM_MAX_VECTORS) */
	__u32 flags;       /* VSHM_INFO_* bits: what this driver offers beyond ABI 1 */
};

struct vshm_ring {
	__u32 peer;   /* destination peer id, 0..65535 */
	__u32 vector; /* its vector, 0..65535 (QEMU uses the low 8 bits) */
};

struct vshm_events {
	__u64 total;  /* interrupts on all vectors + kicks since the device was bound */
	__u64 kicks;  /* VSHM_IOC_KICK calls since the device was bound */
	__u64 counts[VSHM_MAX_VECTORS]; /* interrupts per vector since the device was bound */
};

/*
 * Where this peer's state lives in the region (from the superblock and the peer table the
 * library validated at attach), so the driver can close a dead process's handles with the
 * same algorithms (docs/FORMAT.md §7, §9). Region offsets; the driver checks that every
 * word it will touch lies inside the region and is naturally aligned.
 */
struct vshm_track {
	__u32 peer_slot;      /* this peer's slot, 0..61 */
	__u32 max_objects;    /* object slots, 1..65536: entries in the hold table */
	__u64 incarnation;    /* the peer table's incarnation of peer_slot at attach */
	__u64 peer_entry;     /* the peer-table entry of peer_slot */
	__u64 object_table;   /* object slot 0's entry */
	__u64 cells;          /* this peer's refcount cell for object slot 0 (u32 per slot) */
	__u64 mailbox;        /* this peer's mailbox */
	__u32 object_stride;  /* bytes per object entry */
	__u32 generation_off; /* the u64 generation in an entry */
	__u32 lease_off;      /* the u64 lease word in an entry */
	__u32 sync_off;       /* the u64 sync (mutex owner) word in an entry */
};

/*
 * One hold-table entry per object slot, written by the process (atomics: its threads share
 * it), read by the driver once the file is released. A process that writes nonsense here
 * hurts only its own VM's counts, which it can already do through the region.
 */
struct vshm_hold {
	__u64 generation; /* the object's generation when the process last took a handle */
	__u32 count;      /* handles the process holds on the slot: +1 after an open, -1 before a close */
	__u32 owner;      /* non-zero: the token (thread id) of the process's thread owning the mutex */
};

/* Bytes to mmap for a hold table of n entries (whole pages). */
#define vshm_holds_len(n) ((((__u64)(n) * sizeof(struct vshm_hold)) + 4095) & ~(__u64)4095)

/* The lock token the driver uses in cells and the mailbox: above any pid (PID_MAX_LIMIT is
 * 2^22), so no process ever takes it for a dead one. */
#define VSHM_KERNEL_TOKEN 0x3FFFFFFFu

#define VSHM_IOC_MAGIC 0xB6
#define VSHM_IOC_INFO _IOR(VSHM_IOC_MAGIC, 0x00, struct vshm_info)
#define VSHM_IOC_RING _IOW(VSHM_IOC_MAGIC, 0x01, struct vshm_ring)
#define VSHM_IOC_KICK _IO(VSHM_IOC_MAGIC, 0x02)
#define VSHM_IOC_TRACK _IOW(VSHM_IOC_MAGIC, 0x03, struct vshm_track)

#endif /* VSHM_IOCTL_H */
