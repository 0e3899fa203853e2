/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vshm_internal.h - what the driver's two halves share: the device and open-file state
 * (vshm_dev.c) and the per-process cleanup (vshm_reap.c).
 */
#ifndef VSHM_INTERNAL_H
#define VSHM_INTERNAL_H

#include <linux/atomic.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/pid.h>
#include <linux/rwsem.h>
#include <linux/types.h>
#include <linux/wait.h>

#include "vshm_ioctl.h"

#define VSHM_MAX_DEVICES 64

/* ivshmem BAR0 registers (QEMU docs/specs/ivshmem-spec.rst). */
#define IVSHMEM_IVPOSITION 8
#define IVSHMEM_DOORBELL 12

struct device;
struct file;
struct pci_dev;
struct vm_area_struct;
struct vshm_dev;

struct vshm_irq {
	struct vshm_dev *dev;
	unsigned int vector;
};

struct vshm_dev {
	struct kref ref;
	/* Write: unbind. Read: every operation that touches the hardware or the mapping. */
	struct rw_semaphore lock;
	bool dead;
	struct pci_dev *pdev;
	void __iomem *regs;
	/* Kernel WB mapping of BAR2: it also reserves the WB memory type (see vshm_mmap). */
	void *shm;
	phys_addr_t shm_phys;
	resource_size_t shm_len;
	int minor;
	struct device *node;
	unsigned int nvec;
	struct vshm_irq irqs[VSHM_MAX_VECTORS];
	atomic64_t total;
	atomic64_t kicks;
	atomic64_t counts[VSHM_MAX_VECTORS];
	wait_queue_head_t wq;
	struct mutex files_lock;
	struct list_head files;
};

struct vshm_holds;

struct vshm_file {
	struct vshm_dev *dev;
	struct file *filp;
	struct list_head node;
	u64 seen;
	/* Set once by VSHM_IOC_TRACK (under dev->lock); handed to the reaper at release. */
	struct vshm_holds *holds;
};

void vshm_dev_free(struct kref *ref);

/* vshm_reap.c */
int vshm_reap_init(void);
void vshm_reap_exit(void);
long vshm_track(struct vshm_file *f, const struct vshm_track *t);
int vshm_holds_mmap(struct vshm_file *f, struct vm_area_struct *vma);
/* Called at the file's release: closes what its process still held, off this thread. */
void vshm_reap(struct vshm_file *f);

#endif /* VSHM_INTERNAL_H */
