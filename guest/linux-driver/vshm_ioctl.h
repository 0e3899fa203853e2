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

/* The ABI version VSHM_IOC_INFO reports; bumped on an incompatible change. */
#define VSHM_ABI_VERSION 1

/* The most MSI-X vectors the driver uses per device (counts[] has this many entries). */
#define VSHM_MAX_VECTORS 16

struct vshm_info {
	__u32 abi_version; /* VSHM_ABI_VERSION */
	__u32 peer_id;     /* IVPosition, read from BAR0 at the call */
	__u64 region_size; /* BAR2 length in bytes */
	__u32 vectors;     /* MSI-X vectors with a handler (<= VSHM_MAX_VECTORS) */
	__u32 flags;       /* reserved, 0 */
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

#define VSHM_IOC_MAGIC 0xB6
#define VSHM_IOC_INFO _IOR(VSHM_IOC_MAGIC, 0x00, struct vshm_info)
#define VSHM_IOC_RING _IOW(VSHM_IOC_MAGIC, 0x01, struct vshm_ring)
#define VSHM_IOC_KICK _IO(VSHM_IOC_MAGIC, 0x02)

#endif /* VSHM_IOCTL_H */
