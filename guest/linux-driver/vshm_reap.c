// SPDX-License-Identifier: GPL-2.0
/*
 * Per-process cleanup (docs/FORMAT.md §11b).
 *
 * All processes of a guest share one vshm peer, so a process killed with handles open
 * would leak them until the whole VM disconnects. The kernel is the one party that learns
 * reliably when a process is gone: the release of its /dev/vshmN file. So:
 *
 * - VSHM_IOC_TRACK gives the file a hold table (one struct vshm_hold per object slot,
 *   vmalloc'ed, mapped at mmap offset region_size). The library adds to an entry after
 *   every open that succeeded and subtracts before every close, and records the thread
 *   that owns a mutex: plain atomics on its own memory, no system call per open or close.
 * - At release, a work item (not the exiting task) closes what the table still counts,
 *   with the same algorithms as the library (FORMAT.md §7 release, steal), rings vshmd
 *   so it sweeps at once, and posts UNLOCK for each mutex a thread of the process owned
 *   (a token other than the owner's: vshmd releases it as abandoned, §6a). A cell or
 *   mailbox lock the dead process left taken is taken over.
 *
 * The region is shared memory any peer can write. Every offset is checked against the
 * region once, at TRACK; values read from the region are only compared and CASed, never
 * used to compute an address, and every loop on a word another party may rewrite is
 * bounded (a busy word is retried later, until a deadline, then left to vshmd).
 */
#include <linux/module.h>
#include <linux/delay.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/mm.h>
#include <linux/overflow.h>
#include <linux/pci.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>

#include "vshm_internal.h"
#include "vshm_format.h"

/* How long the cleanup of one released file may keep retrying busy words. */
#define VSHM_REAP_DEADLINE_MS 2000
/* Pause between retries while a word is busy (a live user of the peer holds a lock). */
#define VSHM_REAP_RETRY_MS 5
/* Spins on a locked cell before the cleanup steps back and retries later. */
#define VSHM_REAP_SPINS 1000
/* How long a posted UNLOCK waits for vshmd's answer. */
#define VSHM_REAP_ANSWER_MS 500

struct vshm_holds {
	struct vshm_track t;
	struct vshm_hold *table;
	size_t len;
	/* The process that asked for the table, and the lock token it uses (its pid as it
	 * saw it, std::process::id()): a cell or mailbox lock tagged with it is taken over
	 * once that process is gone. */
	struct pid *pid;
	u32 token;
};

struct vshm_reaper {
	struct work_struct work;
	struct vshm_dev *dev;
	struct vshm_holds *h;
	unsigned long deadline;
	u32 peer_id; /* IVPosition, read once (an MMIO read is a VM exit) */
	bool mailbox_checked;
	bool released;
};

static struct workqueue_struct *vshm_wq;

static void vshm_holds_free(struct vshm_holds *h)
{
	if (!h)
		return;
	vfree(h->table);
	put_pid(h->pid);
	kfree(h);
}

/* Whether off + len lies inside a region of size total (no overflow), off aligned to align. */
static bool vshm_in_region(u64 off, u64 len, u64 total, u64 align)
{
	u64 end;

	return !check_add_overflow(off, len, &end) && end <= total && !(off & (align - 1));
}

/* Checks every word the cleanup can touch, for every object slot, once. */
static bool vshm_track_valid(const struct vshm_track *t, u64 total)
{
	u64 entries, cells;

	if (t->peer_slot > 61 || !t->max_objects || t->max_objects > 65536)
		return false;
	if (!t->object_stride || t->object_stride % 8)
		return false;
	if (t->generation_off % 8 || t->lease_off % 8 || t->sync_off % 8)
		return false;
	if ((u64)t->generation_off + 8 > t->object_stride ||
	    (u64)t->lease_off + 8 > t->object_stride || (u64)t->sync_off + 8 > t->object_stride)
		return false;
	/* t->max_objects <= 65536 and the stride is a u32: no overflow in u64. */
	entries = (u64)t->max_objects * t->object_stride;
	cells = (u64)t->max_objects * 4;
	return vshm_in_region(t->object_table, entries, total, 8) &&
	       vshm_in_region(t->cells, cells, total, 4) &&
	       vshm_in_region(t->mailbox, VSHM_MAILBOX_SIZE, total, 8) &&
	       vshm_in_region(t->peer_entry, 16, total, 8);
}

long vshm_track(struct vshm_file *f, const struct vshm_track *t)
{
	struct vshm_dev *dev = f->dev;
	struct vshm_holds *h;
	long ret = 0;

	h = kzalloc(sizeof(*h), GFP_KERNEL);
	if (!h)
		return -ENOMEM;
	h->t = *t;
	h->len = PAGE_ALIGN((size_t)t->max_objects * sizeof(struct vshm_hold));
	down_read(&dev->lock);
	if (dev->dead) {
		ret = -ENODEV;
	} else if (!vshm_track_valid(t, dev->shm_len)) {
		ret = -EINVAL;
	} else if (READ_ONCE(f->holds)) {
		ret = -EBUSY;
	}
	up_read(&dev->lock);
	if (ret)
		goto err;
	h->table = vmalloc_user(h->len);
	if (!h->table) {
		ret = -ENOMEM;
		goto err;
	}
	h->pid = get_pid(task_tgid(current));
	h->token = task_tgid_vnr(current);
	/* One table per file: a second TRACK (another thread racing) loses. */
	if (cmpxchg(&f->holds, NULL, h)) {
		ret = -EBUSY;
		goto err;
	}
	return 0;
err:
	vshm_holds_free(h);
	return ret;
}

int vshm_holds_mmap(struct vshm_file *f, struct vm_area_struct *vma)
{
	struct vshm_holds *h = READ_ONCE(f->holds);

	if (!h)
		return -EINVAL;
	if (vma->vm_end - vma->vm_start > h->len)
		return -EINVAL;
	return remap_vmalloc_range(vma, h->table, 0);
}

/* The region word at `off` (checked at TRACK). */
static inline u32 *vshm_u32(struct vshm_dev *dev, u64 off)
{
	return (u32 *)((u8 *)dev->shm + off);
}

static inline u64 *vshm_u64(struct vshm_dev *dev, u64 off)
{
	return (u64 *)((u8 *)dev->shm + off);
}

/*
 * Whether the process that took lock token `token` (a pid as that process saw it) is gone,
 * for a lock found tagged with it. Only our own process's token is ever judged. Gone: no
 * process has that number in its pid namespace any more, or the number still names our
 * process and none of its threads is alive. A number reused by another process is that
 * process's: alive.
 */
static bool vshm_token_gone(const struct vshm_holds *h, u32 token)
{
	struct task_struct *task;
	struct pid *pid;
	bool gone;

	if (!token || (token & VSHM_REF_COUNT) != (h->token & VSHM_REF_COUNT))
		return false;
	rcu_read_lock();
	pid = find_pid_ns(h->token, ns_of_pid(h->pid));
	if (!pid) {
		gone = true;
	} else if (pid != h->pid) {
		gone = false;
	} else {
		task = pid_task(pid, PIDTYPE_TGID);
		gone = !task || !atomic_read(&task->signal->live);
	}
	rcu_read_unlock();
	return gone;
}

/* FORMAT.md §7 close_if_unheld: CLOSED into a word with no holders and no KEEP. */
static bool vshm_close_if_unheld(u64 *lease, u64 w)
{
	unsigned int tries;
	u64 cur;

	for (tries = 0; tries < VSHM_CAS_TRIES; tries++) {
		if (w & (VSHM_LEASE_HOLDERS | VSHM_LEASE_KEEP | VSHM_LEASE_CLOSED))
			return false;
		cur = cmpxchg64(lease, w, w | VSHM_LEASE_CLOSED);
		if (cur == w)
			return true;
		w = cur;
	}
	return false;
}

/* Drops the peer's holder bit; closes the object if that left it unheld. Returns whether
 * this closed it (vshmd must be rung). */
static bool vshm_drop_holder_bit(u64 *lease, u64 bit)
{
	/* One locked AND: it cannot be starved by a peer rewriting the word, unlike a CAS
	 * loop. What the word says after it is what close_if_unheld looks at, as after the
	 * library's fetch_and. */
	atomic64_andnot(bit, (atomic64_t *)lease);
	return vshm_close_if_unheld(lease, READ_ONCE(*lease));
}

enum vshm_closed { VSHM_HELD, VSHM_LAST_HOLD, VSHM_NOT_HELD, VSHM_BUSY };

/*
 * One close on the peer's cell for a slot (FORMAT.md §7 release), as the peer's kernel
 * user. A lock tagged with the dead process is taken over and repaired (§7 steal); a lock
 * of a live user is waited for briefly, then VSHM_BUSY (retry later).
 */
static enum vshm_closed vshm_close_one(struct vshm_reaper *r, u32 *cell, u64 *lease, u64 bit)
{
	u32 locked = VSHM_REF_LOCK | VSHM_KERNEL_TOKEN;
	unsigned int spins;
	u32 v, n;

	for (spins = 0; spins < VSHM_REAP_SPINS; spins++) {
		v = smp_load_acquire(cell);
		if (v & VSHM_REF_LOCK) {
			if (vshm_token_gone(r->h, v & VSHM_REF_COUNT) && cmpxchg(cell, v, locked) == v) {
				/* The dead process was moving the peer between 0 and 1 handles. */
				if (vshm_drop_holder_bit(lease, bit))
					r->released = true;
				smp_store_release(cell, 0);
			}
			cpu_relax();
			continue;
		}
		n = v & VSHM_REF_COUNT;
		if (!n)
			return VSHM_NOT_HELD;
		if (n > 1) {
			if (cmpxchg(cell, v, v - 1) == v)
				return VSHM_HELD;
			continue;
		}
		if (cmpxchg(cell, v, locked) != v)
			continue;
		n = vshm_drop_holder_bit(lease, bit);
		smp_store_release(cell, 0);
		return n ? VSHM_LAST_HOLD : VSHM_HELD;
	}
	return VSHM_BUSY;
}

static void vshm_ring_host(struct vshm_dev *dev)
{
	iowrite32((0u << 16) | VSHM_VECTOR_CONTROL, dev->regs + IVSHMEM_DOORBELL);
}

/*
 * Posts UNLOCK (slot, generation) with the kernel's token, naming the dead owner, and
 * waits for the answer (FORMAT.md §9 peer side). The token differs from the owner's, so
 * vshmd releases the mutex as abandoned (§6a: released on behalf of a dead owner) if its
 * word still names that owner. -EBUSY: the mailbox is in use by a live user of the peer;
 * retry later.
 */
static int vshm_post_unlock(struct vshm_reaper *r, u32 slot, u64 generation, u32 owner)
{
	struct vshm_dev *dev = r->dev;
	u64 mb = r->h->t.mailbox;
	u32 *lock = vshm_u32(dev, mb + VSHM_MB_LOCK_OFF);
	u64 *req_seq = vshm_u64(dev, mb + VSHM_MB_REQ_SEQ_OFF);
	u64 *resp_seq = vshm_u64(dev, mb + VSHM_MB_RESP_SEQ_OFF);
	unsigned long until;
	u64 seq, prev_req, prev_resp;
	int ret = -ETIMEDOUT;

	if (READ_ONCE(*lock) != 0 || cmpxchg(lock, 0, VSHM_KERNEL_TOKEN) != 0)
		return -EBUSY;
	prev_req = smp_load_acquire(req_seq);
	prev_resp = smp_load_acquire(resp_seq);
	seq = max(prev_req, prev_resp) + 1;
	if (!seq)
		seq = 1;
	WRITE_ONCE(*req_seq, 0);
	smp_mb();
	memset((u8 *)dev->shm + mb + VSHM_MB_OP_OFF, 0, VSHM_MB_BODY_END - VSHM_MB_OP_OFF);
	WRITE_ONCE(*vshm_u32(dev, mb + VSHM_MB_OP_OFF), VSHM_OP_UNLOCK);
	WRITE_ONCE(*vshm_u32(dev, mb + VSHM_MB_SLOT_OFF), slot);
	WRITE_ONCE(*vshm_u64(dev, mb + VSHM_MB_GENERATION_OFF), generation);
	WRITE_ONCE(*vshm_u64(dev, mb + VSHM_MB_SIZE_OFF), VSHM_KERNEL_TOKEN);
	/* The owner we saw: if the mutex moved on meanwhile, vshmd does nothing. */
	WRITE_ONCE(*vshm_u64(dev, mb + VSHM_MB_MAX_SIZE_OFF), owner);
	smp_store_release(req_seq, seq);
	vshm_ring_host(dev);
	until = jiffies + msecs_to_jiffies(VSHM_REAP_ANSWER_MS);
	while (time_before(jiffies, until)) {
		if (smp_load_acquire(resp_seq) == seq) {
			ret = 0;
			break;
		}
		usleep_range(100, 300);
	}
	smp_store_release(lock, 0);
	return ret;
}

/* Whether the peer table still gives our slot to this VM's connection of TRACK time:
 * otherwise the peer was reclaimed (its holds went with it) and the row is not ours. */
static bool vshm_still_attached(struct vshm_reaper *r)
{
	struct vshm_dev *dev = r->dev;
	const struct vshm_track *t = &r->h->t;
	u32 id = r->peer_id;

	return smp_load_acquire(vshm_u32(dev, t->peer_entry + VSHM_PEER_STATE_OFF)) ==
		       VSHM_PEER_CONNECTED &&
	       READ_ONCE(*vshm_u32(dev, t->peer_entry + VSHM_PEER_ID_OFF)) == id &&
	       READ_ONCE(*vshm_u64(dev, t->peer_entry + VSHM_PEER_INCARNATION_OFF)) ==
		       t->incarnation;
}

/* Frees the mailbox lock if the dead process left it taken (it died mid-request). */
static void vshm_free_mailbox_lock(struct vshm_reaper *r)
{
	u32 *lock = vshm_u32(r->dev, r->h->t.mailbox + VSHM_MB_LOCK_OFF);
	u32 v = READ_ONCE(*lock);

	if (vshm_token_gone(r->h, v))
		cmpxchg(lock, v, 0);
}

/* Whether the cleanup has run out of time (checked inside every loop). */
static bool vshm_reap_late(const struct vshm_reaper *r)
{
	return time_after(jiffies, r->deadline);
}

/*
 * One slot: the cell lock the dead process may have left, its mutex, its handles. Returns
 * false if a word was busy (a live user of the peer holds it): the entry keeps what is
 * left, and the next pass comes back to it.
 */
static bool vshm_reap_slot(struct vshm_reaper *r, u32 slot)
{
	struct vshm_dev *dev = r->dev;
	const struct vshm_track *t = &r->h->t;
	struct vshm_hold *e = &r->h->table[slot];
	u64 bit = 1ULL << t->peer_slot;
	u64 entry = t->object_table + (u64)slot * t->object_stride;
	u32 *cell = vshm_u32(dev, t->cells + (u64)slot * 4);
	u64 *lease = vshm_u64(dev, entry + t->lease_off);
	u32 v = READ_ONCE(*cell);
	u64 gen, sync;

	/* A cell lock the dead process held while opening or closing (its table does not
	 * count that handle: +1 comes after the open, -1 before the close). */
	if ((v & VSHM_REF_LOCK) && vshm_token_gone(r->h, v & VSHM_REF_COUNT) &&
	    cmpxchg(cell, v, VSHM_REF_LOCK | VSHM_KERNEL_TOKEN) == v) {
		if (vshm_drop_holder_bit(lease, bit))
			r->released = true;
		smp_store_release(cell, 0);
	}
	if (!e->count && !e->owner)
		return true;
	/* The object is no longer the one the process held (its hold was revoked, §11a, and
	 * the slot reused): nothing of ours is counted there. */
	gen = READ_ONCE(*vshm_u64(dev, entry + t->generation_off));
	if (gen != e->generation) {
		e->count = 0;
		e->owner = 0;
		return true;
	}
	if (e->owner) {
		sync = READ_ONCE(*vshm_u64(dev, entry + t->sync_off));
		if ((sync & VSHM_MUTEX_OWNER) !=
		    ((u64)(t->peer_slot + 1) | ((u64)e->owner << 8))) {
			e->owner = 0; /* released already, or never taken */
		} else if (vshm_post_unlock(r, slot, gen, e->owner)) {
			return false; /* mailbox busy, or no answer yet: look again next pass */
		} else {
			e->owner = 0;
		}
		/* Waiting for vshmd may have taken long: is the row still ours? */
		if (!vshm_still_attached(r))
			return true;
	}
	/* Never more closes than the cell counts: a table scribbled by its own process must
	 * not keep the driver busy for 2^32 closes. */
	v = READ_ONCE(*cell);
	if (!(v & VSHM_REF_LOCK) && e->count > (v & VSHM_REF_COUNT))
		e->count = v & VSHM_REF_COUNT;
	while (e->count) {
		if (vshm_reap_late(r))
			return false;
		switch (vshm_close_one(r, cell, lease, bit)) {
		case VSHM_BUSY:
			return false;
		case VSHM_NOT_HELD:
			e->count = 0;
			break;
		case VSHM_LAST_HOLD:
		case VSHM_HELD:
			e->count--;
			r->released = true;
			break;
		}
		cond_resched();
	}
	return true;
}

/* One pass over the table. Returns whether everything is done. */
static bool vshm_reap_pass(struct vshm_reaper *r)
{
	bool done = true;
	u32 slot;

	for (slot = 0; slot < r->h->t.max_objects; slot++) {
		if (vshm_reap_late(r))
			return false;
		/* The row stops being ours if the peer is reclaimed meanwhile. */
		if (!vshm_still_attached(r))
			return true;
		/* A busy slot is skipped and come back to; the others go on. */
		if (!vshm_reap_slot(r, slot))
			done = false;
		if (!(slot & 255))
			cond_resched();
	}
	return done;
}

static void vshm_reaper_done(struct vshm_reaper *r)
{
	vshm_holds_free(r->h);
	kref_put(&r->dev->ref, vshm_dev_free);
	kfree(r);
}

/*
 * The cleanup of one released file: passes over its table until everything is closed, the
 * device is gone, the row is no longer ours, or the deadline passed; between passes it
 * sleeps with dev->lock released, so an unbind is never held up for long. One work item
 * loops instead of re-queueing itself, so that destroy_workqueue() (module unload) waits
 * for it: no timer can fire into an unloaded module.
 */
static void vshm_reap_work(struct work_struct *work)
{
	struct vshm_reaper *r = container_of(work, struct vshm_reaper, work);
	struct vshm_dev *dev = r->dev;
	bool done = false;

	down_read(&dev->lock);
	if (!dev->dead)
		r->peer_id = ioread32(dev->regs + IVSHMEM_IVPOSITION);
	up_read(&dev->lock);
	while (!done) {
		down_read(&dev->lock);
		if (dev->dead || !vshm_still_attached(r)) {
			done = true;
		} else {
			if (!r->mailbox_checked) {
				vshm_free_mailbox_lock(r);
				r->mailbox_checked = true;
			}
			done = vshm_reap_pass(r);
			/*
			 * vshmd folds the row's counts and reaps closed objects at once: the
			 * close hint says "several, look at every object" (FORMAT.md §9), so
			 * this ring is never taken for one a hint already accounted for.
			 */
			if (r->released) {
				WRITE_ONCE(*vshm_u64(dev, r->h->t.mailbox + VSHM_MB_CLOSED_HINT_OFF),
					   VSHM_CLOSED_HINT_MANY);
				smp_wmb();
				vshm_ring_host(dev);
			}
			r->released = false;
			if (!done && vshm_reap_late(r)) {
				dev_warn(&dev->pdev->dev,
					 "vshm: gave up closing a dead process's handles (busy for %d ms); they go when the VM detaches\n",
					 VSHM_REAP_DEADLINE_MS);
				done = true;
			}
		}
		up_read(&dev->lock);
		if (!done)
			msleep(VSHM_REAP_RETRY_MS);
	}
	vshm_reaper_done(r);
}

void vshm_reap(struct vshm_file *f)
{
	struct vshm_holds *h = xchg(&f->holds, NULL);
	struct vshm_reaper *r;

	if (!h)
		return;
	/* Even after a clean exit (an empty table) the work runs once: the process may have
	 * died holding a cell or mailbox lock, which only a look at the region finds. */
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r) {
		/* Without memory what it held stays counted until the VM detaches. */
		pr_warn("vshm: out of memory: a released file's handles stay open\n");
		vshm_holds_free(h);
		return;
	}
	kref_get(&f->dev->ref);
	r->dev = f->dev;
	r->h = h;
	r->deadline = jiffies + msecs_to_jiffies(VSHM_REAP_DEADLINE_MS);
	INIT_WORK(&r->work, vshm_reap_work);
	queue_work(vshm_wq, &r->work);
}

int vshm_reap_init(void)
{
	vshm_wq = alloc_workqueue("vshm_reap", WQ_UNBOUND, 0);
	return vshm_wq ? 0 : -ENOMEM;
}

void vshm_reap_exit(void)
{
	destroy_workqueue(vshm_wq);
}
