// SPDX-License-Identifier: GPL-2.0
/*
 * vshm - Linux guest driver for the ivshmem-doorbell device vshmd serves (PCI 1af4:1110).
 *
 * One /dev/vshmN per bound PCI function: mmap of the shared region (BAR2) with a
 * cacheable (write-back) mapping, ioctls for the peer id / region size / vectors and to
 * ring a peer's doorbell, and the MSI-X interrupts delivered as poll()/read() readiness.
 * The user-space ABI is vshm_ioctl.h; docs/GUEST.md describes it.
 *
 * Lifetime: the device state (struct vshm_dev) is reference counted; every open file
 * holds a reference. Unbinding (or unloading, which unbinds first) marks the device dead
 * under dev->lock, zaps every user mapping of the region, wakes every waiter and frees the
 * interrupts and BARs at once; open files then fail every operation with -ENODEV and the
 * state is freed when the last of them is released. The module cannot be unloaded while
 * a file is open (the char device's owner is this module).
 *
 * Caching: see vshm_mmap(). Per-process cleanup (the hold table, VSHM_IOC_TRACK): see
 * vshm_reap.c.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kref.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/rwsem.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/wait.h>

#include "vshm_internal.h"

static ushort mode = 0600;
module_param(mode, ushort, 0444);
MODULE_PARM_DESC(mode, "permission bits of /dev/vshmN (default 0600)");

static uint group;
module_param(group, uint, 0444);
MODULE_PARM_DESC(group, "numeric group id owning /dev/vshmN (default 0)");

static DEFINE_MUTEX(vshm_minors_lock);
static DEFINE_IDR(vshm_minors);
static dev_t vshm_devt;
static struct cdev vshm_cdev;
static struct class *vshm_class;

void vshm_dev_free(struct kref *ref)
{
	kfree(container_of(ref, struct vshm_dev, ref));
}

static irqreturn_t vshm_irq(int irq, void *arg)
{
	struct vshm_irq *vi = arg;
	struct vshm_dev *dev = vi->dev;

	atomic64_inc(&dev->counts[vi->vector]);
	atomic64_inc(&dev->total);
	wake_up_interruptible_all(&dev->wq);
	return IRQ_HANDLED;
}

static int vshm_open(struct inode *inode, struct file *filp)
{
	struct vshm_dev *dev;
	struct vshm_file *f;

	mutex_lock(&vshm_minors_lock);
	dev = idr_find(&vshm_minors, iminor(inode));
	if (dev)
		kref_get(&dev->ref);
	mutex_unlock(&vshm_minors_lock);
	if (!dev)
		return -ENODEV;
	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f) {
		kref_put(&dev->ref, vshm_dev_free);
		return -ENOMEM;
	}
	f->dev = dev;
	f->filp = filp;
	f->seen = atomic64_read(&dev->total);
	mutex_lock(&dev->files_lock);
	list_add(&f->node, &dev->files);
	mutex_unlock(&dev->files_lock);
	filp->private_data = f;
	return nonseekable_open(inode, filp);
}

static int vshm_release(struct inode *inode, struct file *filp)
{
	struct vshm_file *f = filp->private_data;
	struct vshm_dev *dev = f->dev;

	mutex_lock(&dev->files_lock);
	list_del(&f->node);
	mutex_unlock(&dev->files_lock);
	/* The process is gone (or closed its last reference): what it still held goes. */
	vshm_reap(f);
	kfree(f);
	kref_put(&dev->ref, vshm_dev_free);
	return 0;
}

static ssize_t vshm_read(struct file *filp, char __user *buf, size_t len, loff_t *ppos)
{
	struct vshm_file *f = filp->private_data;
	struct vshm_dev *dev = f->dev;
	struct vshm_events ev;
	unsigned int i;
	u64 total;
	int ret;

	if (len < sizeof(ev))
		return -EINVAL;
	for (;;) {
		if (READ_ONCE(dev->dead))
			return -ENODEV;
		total = atomic64_read(&dev->total);
		if (total != READ_ONCE(f->seen))
			break;
		if (filp->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(dev->wq,
					       READ_ONCE(dev->dead) ||
					       atomic64_read(&dev->total) != READ_ONCE(f->seen));
		if (ret)
			return ret;
	}
	memset(&ev, 0, sizeof(ev));
	ev.total = total;
	ev.kicks = atomic64_read(&dev->kicks);
	for (i = 0; i < VSHM_MAX_VECTORS; i++)
		ev.counts[i] = atomic64_read(&dev->counts[i]);
	if (copy_to_user(buf, &ev, sizeof(ev)))
		return -EFAULT;
	WRITE_ONCE(f->seen, total);
	return sizeof(ev);
}

static __poll_t vshm_poll(struct file *filp, poll_table *wait)
{
	struct vshm_file *f = filp->private_data;
	struct vshm_dev *dev = f->dev;

	poll_wait(filp, &dev->wq, wait);
	if (READ_ONCE(dev->dead))
		return EPOLLHUP | EPOLLERR;
	if (atomic64_read(&dev->total) != READ_ONCE(f->seen))
		return EPOLLIN | EPOLLRDNORM;
	return 0;
}

static long vshm_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct vshm_file *f = filp->private_data;
	struct vshm_dev *dev = f->dev;
	void __user *uarg = (void __user *)arg;
	struct vshm_info info;
	struct vshm_ring ring;
	struct vshm_track track;
	long ret = 0;

	/* User memory is copied outside dev->lock: a fault on our own mapping takes it too. */
	if (cmd == VSHM_IOC_RING) {
		if (copy_from_user(&ring, uarg, sizeof(ring)))
			return -EFAULT;
		if (ring.peer > 0xffff || ring.vector > 0xffff)
			return -EINVAL;
	}
	if (cmd == VSHM_IOC_TRACK) {
		if (copy_from_user(&track, uarg, sizeof(track)))
			return -EFAULT;
		return vshm_track(f, &track);
	}
	memset(&info, 0, sizeof(info));
	down_read(&dev->lock);
	if (dev->dead) {
		ret = -ENODEV;
		goto out;
	}
	switch (cmd) {
	case VSHM_IOC_INFO:
		info.abi_version = VSHM_ABI_VERSION;
		info.peer_id = ioread32(dev->regs + IVSHMEM_IVPOSITION);
		info.region_size = dev->shm_len;
		info.vectors = dev->nvec;
		info.flags = VSHM_INFO_TRACK;
		break;
	case VSHM_IOC_RING:
		iowrite32((ring.peer << 16) | ring.vector, dev->regs + IVSHMEM_DOORBELL);
		break;
	case VSHM_IOC_KICK:
		atomic64_inc(&dev->kicks);
		atomic64_inc(&dev->total);
		wake_up_interruptible_all(&dev->wq);
		break;
	default:
		ret = -ENOTTY;
	}
out:
	up_read(&dev->lock);
	if (!ret && cmd == VSHM_IOC_INFO && copy_to_user(uarg, &info, sizeof(info)))
		ret = -EFAULT;
	return ret;
}

static vm_fault_t vshm_fault(struct vm_fault *vmf)
{
	struct vshm_file *f = vmf->vma->vm_private_data;
	struct vshm_dev *dev = f->dev;
	vm_fault_t ret = VM_FAULT_SIGBUS;

	down_read(&dev->lock);
	if (!dev->dead && vmf->pgoff < (dev->shm_len >> PAGE_SHIFT))
		ret = vmf_insert_pfn(vmf->vma, vmf->address,
				     (dev->shm_phys >> PAGE_SHIFT) + vmf->pgoff);
	up_read(&dev->lock);
	return ret;
}

static const struct vm_operations_struct vshm_vm_ops = {
	.fault = vshm_fault,
};

/*
 * The region is mapped into user space cacheable (write-back), page by page at fault
 * time with vmf_insert_pfn():
 *
 * - Write-back, not UC or WC: the region is ordinary RAM on the host side (vshmd's memfd,
 *   mapped WB by every host process and by QEMU), and the namespace runs CAS and ordered
 *   loads/stores on shared words, which WC does not order. This assumes x86 coherence: a
 *   guest's WB mapping and the host's WB mapping of the same pages are coherent (TCG
 *   executes guest accesses as host accesses; KVM on Intel maps the BAR WB through EPT;
 *   KVM on AMD combines the guest's PAT type with the host's, so the guest must ask for
 *   WB - which is what this driver does). Other architectures are not covered.
 * - The PAT memory type of BAR2 is reserved as WB once, at probe, by memremap(MEMREMAP_WB)
 *   (kept: it is also the kernel's own view of the region). vmf_insert_pfn() takes the
 *   reserved type for the page, so user mappings are WB too; without the reservation an
 *   MMIO page would be inserted UC-.
 * - At fault time, not remap_pfn_range() at mmap time: a fault checks dev->dead under
 *   dev->lock, so after unbind (dead set, then every mapping zapped) no page of a BAR that
 *   is no longer ours can be mapped again; remap_pfn_range() at mmap time could race with
 *   the zap before the new VMA is linked.
 */
static int vshm_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct vshm_file *f = filp->private_data;
	struct vshm_dev *dev = f->dev;
	unsigned long npages = dev->shm_len >> PAGE_SHIFT;
	unsigned long pages = vma_pages(vma);
	int ret = 0;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	/* Offset region_size: this file's hold table (vshm_reap.c), not the region. */
	if (vma->vm_pgoff == npages)
		return vshm_holds_mmap(f, vma);
	down_read(&dev->lock);
	if (dev->dead) {
		ret = -ENODEV;
	} else if (vma->vm_pgoff >= npages || pages > npages - vma->vm_pgoff) {
		ret = -EINVAL;
	} else {
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
		vm_flags_set(vma, VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP);
#else
		vma->vm_flags |= VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP;
#endif
		vma->vm_ops = &vshm_vm_ops;
		vma->vm_private_data = f;
	}
	up_read(&dev->lock);
	return ret;
}

static const struct file_operations vshm_fops = {
	.owner = THIS_MODULE,
	.open = vshm_open,
	.release = vshm_release,
	.read = vshm_read,
	.poll = vshm_poll,
	.unlocked_ioctl = vshm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = vshm_mmap,
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
	.llseek = no_llseek, /* gone in 6.12, where nonseekable_open() alone says it */
#endif
};

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
static char *vshm_devnode(const struct device *d, umode_t *m, kuid_t *uid, kgid_t *gid)
#else
static char *vshm_devnode(struct device *d, umode_t *m, kuid_t *uid, kgid_t *gid)
#endif
{
	if (m)
		*m = mode & 0777;
	if (gid)
		*gid = KGIDT_INIT(group);
	return NULL;
}

static const struct device_type vshm_node_type = {
	.name = "vshm",
	.devnode = vshm_devnode,
};

static void vshm_node_release(struct device *d)
{
	kfree(d);
}

static void vshm_free_irqs(struct vshm_dev *dev)
{
	unsigned int i;

	for (i = 0; i < dev->nvec; i++)
		free_irq(pci_irq_vector(dev->pdev, i), &dev->irqs[i]);
	if (dev->nvec)
		pci_free_irq_vectors(dev->pdev);
	dev->nvec = 0;
}

static int vshm_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct vshm_dev *dev;
	struct device *node;
	unsigned int i;
	int ret, nvec;

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	kref_init(&dev->ref);
	init_rwsem(&dev->lock);
	init_waitqueue_head(&dev->wq);
	mutex_init(&dev->files_lock);
	INIT_LIST_HEAD(&dev->files);
	dev->pdev = pdev;
	dev->minor = -1;

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_free;
	ret = pci_request_regions(pdev, "vshm");
	if (ret)
		goto err_disable;
	dev->regs = pci_iomap(pdev, 0, 0x100);
	dev->shm_phys = pci_resource_start(pdev, 2);
	dev->shm_len = pci_resource_len(pdev, 2);
	if (!dev->regs || !dev->shm_len || (dev->shm_len & ~PAGE_MASK) ||
	    (dev->shm_phys & ~PAGE_MASK)) {
		dev_err(&pdev->dev, "vshm: BAR0 or BAR2 missing or not page-aligned\n");
		ret = -ENODEV;
		goto err_regions;
	}
	dev->shm = memremap(dev->shm_phys, dev->shm_len, MEMREMAP_WB);
	if (!dev->shm) {
		dev_err(&pdev->dev, "vshm: cannot map BAR2 write-back\n");
		ret = -ENOMEM;
		goto err_regions;
	}

	/* ivshmem-doorbell is MSI-X only; ivshmem-plain has no vectors (the region works,
	 * waiting falls back to polling in user space). */
	nvec = pci_msix_vec_count(pdev);
	if (nvec > 0) {
		nvec = pci_alloc_irq_vectors(pdev, 1, min(nvec, VSHM_MAX_VECTORS), PCI_IRQ_MSIX);
		if (nvec < 0) {
			ret = nvec;
			dev_err(&pdev->dev, "vshm: no MSI-X vectors (%d)\n", ret);
			goto err_memunmap;
		}
		for (i = 0; i < nvec; i++) {
			dev->irqs[i].dev = dev;
			dev->irqs[i].vector = i;
			ret = request_irq(pci_irq_vector(pdev, i), vshm_irq, 0, "vshm",
					  &dev->irqs[i]);
			if (ret) {
				dev->nvec = i;
				vshm_free_irqs(dev);
				if (!i)
					pci_free_irq_vectors(pdev);
				goto err_memunmap;
			}
			dev->nvec = i + 1;
		}
	}
	/* MSI-X messages are memory writes by the device. */
	pci_set_master(pdev);

	mutex_lock(&vshm_minors_lock);
	ret = idr_alloc(&vshm_minors, NULL, 0, VSHM_MAX_DEVICES, GFP_KERNEL);
	mutex_unlock(&vshm_minors_lock);
	if (ret < 0)
		goto err_irqs;
	dev->minor = ret;

	node = kzalloc(sizeof(*node), GFP_KERNEL);
	if (!node) {
		ret = -ENOMEM;
		goto err_minor;
	}
	device_initialize(node);
	node->devt = MKDEV(MAJOR(vshm_devt), dev->minor);
	node->class = vshm_class;
	node->parent = &pdev->dev;
	node->type = &vshm_node_type;
	node->release = vshm_node_release;
	ret = dev_set_name(node, "vshm%d", dev->minor);
	if (!ret)
		ret = device_add(node);
	if (ret) {
		put_device(node);
		goto err_minor;
	}
	dev->node = node;
	pci_set_drvdata(pdev, dev);

	mutex_lock(&vshm_minors_lock);
	idr_replace(&vshm_minors, dev, dev->minor);
	mutex_unlock(&vshm_minors_lock);
	dev_info(&pdev->dev, "vshm: /dev/vshm%d: peer id %u, region %llu bytes, %u MSI-X vectors\n",
		 dev->minor, ioread32(dev->regs + IVSHMEM_IVPOSITION),
		 (unsigned long long)dev->shm_len, dev->nvec);
	return 0;

err_minor:
	mutex_lock(&vshm_minors_lock);
	idr_remove(&vshm_minors, dev->minor);
	mutex_unlock(&vshm_minors_lock);
err_irqs:
	vshm_free_irqs(dev);
	pci_clear_master(pdev);
err_memunmap:
	memunmap(dev->shm);
err_regions:
	if (dev->regs)
		pci_iounmap(pdev, dev->regs);
	pci_release_regions(pdev);
err_disable:
	pci_disable_device(pdev);
err_free:
	kfree(dev);
	return ret;
}

static void vshm_remove(struct pci_dev *pdev)
{
	struct vshm_dev *dev = pci_get_drvdata(pdev);
	struct vshm_file *f;
	unsigned int minor = dev->minor;

	/* No new opens. */
	mutex_lock(&vshm_minors_lock);
	idr_remove(&vshm_minors, dev->minor);
	mutex_unlock(&vshm_minors_lock);
	/* No operation in flight touches the hardware past this point, and none starts. */
	down_write(&dev->lock);
	WRITE_ONCE(dev->dead, true);
	up_write(&dev->lock);
	/* Every page of the region mapped into a process goes (later accesses: SIGBUS); a
	 * hold table past it stays (it is the process's own memory, freed at release). */
	mutex_lock(&dev->files_lock);
	list_for_each_entry(f, &dev->files, node)
		unmap_mapping_range(f->filp->f_mapping, 0, dev->shm_len, 1);
	mutex_unlock(&dev->files_lock);
	wake_up_interruptible_all(&dev->wq);

	device_unregister(dev->node);
	vshm_free_irqs(dev);
	pci_clear_master(pdev);
	memunmap(dev->shm);
	pci_iounmap(pdev, dev->regs);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
	pci_set_drvdata(pdev, NULL);
	dev_info(&pdev->dev, "vshm: /dev/vshm%u removed\n", minor);
	kref_put(&dev->ref, vshm_dev_free);
}

static const struct pci_device_id vshm_ids[] = {
	{ PCI_DEVICE(0x1af4, 0x1110) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, vshm_ids);

static struct pci_driver vshm_driver = {
	.name = "vshm",
	.id_table = vshm_ids,
	.probe = vshm_probe,
	.remove = vshm_remove,
};

static int __init vshm_init(void)
{
	int ret;

	ret = alloc_chrdev_region(&vshm_devt, 0, VSHM_MAX_DEVICES, "vshm");
	if (ret)
		return ret;
	cdev_init(&vshm_cdev, &vshm_fops);
	vshm_cdev.owner = THIS_MODULE;
	ret = cdev_add(&vshm_cdev, vshm_devt, VSHM_MAX_DEVICES);
	if (ret)
		goto err_region;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	vshm_class = class_create("vshm");
#else
	vshm_class = class_create(THIS_MODULE, "vshm");
#endif
	if (IS_ERR(vshm_class)) {
		ret = PTR_ERR(vshm_class);
		goto err_cdev;
	}
	ret = vshm_reap_init();
	if (ret)
		goto err_class;
	ret = pci_register_driver(&vshm_driver);
	if (ret)
		goto err_reap;
	return 0;

err_reap:
	vshm_reap_exit();
err_class:
	class_destroy(vshm_class);
err_cdev:
	cdev_del(&vshm_cdev);
err_region:
	unregister_chrdev_region(vshm_devt, VSHM_MAX_DEVICES);
	return ret;
}

static void __exit vshm_exit(void)
{
	pci_unregister_driver(&vshm_driver);
	/* After unbind: pending cleanups find their device dead and only free. */
	vshm_reap_exit();
	class_destroy(vshm_class);
	cdev_del(&vshm_cdev);
	unregister_chrdev_region(vshm_devt, VSHM_MAX_DEVICES);
	idr_destroy(&vshm_minors);
}

module_init(vshm_init);
module_exit(vshm_exit);

MODULE_DESCRIPTION("vshm: ivshmem-doorbell shared memory for user space (cacheable mapping, MSI-X readiness)");
MODULE_LICENSE("GPL");
