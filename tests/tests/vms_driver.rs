//! The vshm Linux guest driver (guest/linux-driver) in real QEMU guests (TCG here, KVM
//! where the host has hardware virtualisation): guest "d" boots with the driver loaded by
//! the image's init, guest "s" without it (`vshm_nodriver`), so the `vshm` CLI runs over
//! /dev/vshm0 in one and over sysfs in the other, against the same vshmd.
//!
//! Skipped, with a message, when the image has no vshm.ko (`cargo xtask images` could not
//! install the kernel headers or build it: it says why).

use std::time::Duration;

use vshm_images::{Vm, VmConfig};
use vshm_tests::{guest_hold, guest_ok, guest_release, guest_sh, wait_for, watchdog, Backend};

/// Boots one guest per (name, driver loaded), concurrently.
fn boot(b: &Backend, specs: &[(&str, bool)]) -> Vec<Vm> {
    let image = vshm_tests::guest_image();
    let starting: Vec<_> = specs
        .iter()
        .map(|&(name, driver)| {
            let mut cfg = VmConfig::new(name, &image, &b.socket, b.dir());
            cfg.driver = driver;
            Vm::start(&cfg).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    starting
        .into_iter()
        .map(|s| {
            s.wait_ready(Duration::from_secs(180))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn driver_built() -> bool {
    if vshm_tests::guest_image().driver.is_none() {
        eprintln!(
            "SKIPPED: the guest image has no vshm.ko (see the warning `cargo xtask images` \
             printed: the kernel headers could not be installed or the build failed)"
        );
        return false;
    }
    true
}

/// Starts `vshm ARGS` in the background in a guest.
fn background(vm: &mut Vm, tag: &str, args: &str) {
    guest_ok(
        vm,
        &format!("vshm {args} > /tmp/{tag}.out 2>&1 & echo $! > /tmp/{tag}.pid"),
    );
}

/// Waits (up to 60 s, the agent's bound) for a background command; returns its output.
fn finish(vm: &mut Vm, tag: &str) -> String {
    guest_ok(
        vm,
        &format!(
            "p=$(cat /tmp/{tag}.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; \
             cat /tmp/{tag}.out"
        ),
    )
}

/// CPU time (utime + stime, clock ticks of 10 ms) the background command `tag` uses over
/// a 2 s window while it waits.
fn cpu_ticks_over_2s(vm: &mut Vm, tag: &str) -> (u64, u64) {
    let out = guest_ok(
        vm,
        &format!(
            "p=$(cat /tmp/{tag}.pid); kill -0 $p || exit 1; \
             set -- $(cut -d' ' -f14,15 /proc/$p/stat); a=$(($1+$2)); sleep 2; \
             set -- $(cut -d' ' -f14,15 /proc/$p/stat); echo $a $(($1+$2))"
        ),
    );
    let v: Vec<u64> = out
        .split_whitespace()
        .map(|t| t.parse().expect("ticks"))
        .collect();
    assert_eq!(v.len(), 2, "{out}");
    (v[0], v[1])
}

fn refs(b: &Backend, name: &str) -> u64 {
    b.section(name)
        .and_then(|s| s["refs"].as_u64())
        .unwrap_or(0)
}

#[test]
fn the_driver_maps_rings_and_wakes_and_sysfs_guests_still_work_beside_it() {
    if !driver_built() {
        return;
    }
    watchdog(Duration::from_secs(600), || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "16M"]);
        let mut vms = boot(&b, &[("d", true), ("s", false)]);
        let mut s = vms.pop().expect("s");
        let mut d = vms.pop().expect("d");

        // 1. The module loads in d and /dev/vshm0 appears (owner-only by default); s has
        //    no driver. init says which.
        assert!(
            d.console().contains("vshm-guest: vshm driver loaded"),
            "{}",
            d.console()
        );
        assert!(
            guest_ok(&mut d, "grep -c '^vshm ' /proc/modules").trim() == "1",
            "vshm is in /proc/modules"
        );
        let node = guest_ok(&mut d, "ls -l /dev/vshm0");
        assert!(node.starts_with("crw-------"), "{node}");
        let kernel_log = guest_ok(&mut d, "dmesg | grep 'vshm: /dev/vshm0'");
        assert!(
            kernel_log.contains("2 MSI-X vectors"),
            "the driver took both vectors: {kernel_log}"
        );
        assert!(
            s.console()
                .contains("vshm driver not loaded (vshm_nodriver"),
            "{}",
            s.console()
        );
        assert!(!guest_sh(&mut s, "ls /dev/vshm0").success());

        // 2. d creates and writes through the driver; s reads through sysfs, and back.
        guest_ok(
            &mut d,
            "vshm create drv --max 1M --initial 64K --persistent",
        );
        guest_ok(
            &mut d,
            "vshm write drv --offset 4096 --data THROUGH-THE-DRIVER",
        );
        assert_eq!(
            guest_ok(&mut s, "vshm read drv --offset 4096 --len 18"),
            "THROUGH-THE-DRIVER"
        );
        guest_ok(&mut s, "vshm write drv --offset 8192 --data THROUGH-SYSFS");
        assert_eq!(
            guest_ok(&mut d, "vshm read drv --offset 8192 --len 13"),
            "THROUGH-SYSFS"
        );
        // The CLI in d really maps /dev/vshm0 (the driver owns the BARs there), in s
        // sysfs's resource2.
        guest_hold(&mut d, "hd", "hold drv");
        guest_hold(&mut s, "hs", "hold drv");
        assert_eq!(refs(&b, "drv"), 2);
        let maps = guest_ok(&mut d, "grep /dev/vshm0 /proc/$(cat /tmp/hd.pid)/maps");
        assert!(!maps.is_empty(), "the holder maps /dev/vshm0");
        let maps = guest_ok(&mut s, "grep resource2 /proc/$(cat /tmp/hs.pid)/maps");
        assert!(!maps.is_empty(), "the holder maps resource2");
        vshm_tests::guest_release(&mut d, "hd");
        vshm_tests::guest_release(&mut s, "hs");
        assert_eq!(refs(&b, "drv"), 0);

        // 3. A process in d sleeps in an event wait (poll() on /dev/vshm0) until s signals
        //    it; over 2 s of waiting it uses almost no CPU. The same wait in s (sysfs,
        //    polling with backoff) is measured for comparison, not asserted.
        guest_ok(&mut d, "vshm event create ev --persistent");
        background(&mut d, "w", "event wait ev --timeout 30000");
        assert!(
            wait_for(Duration::from_secs(30), || refs(&b, "ev") >= 1),
            "the waiter opened the event: {:?}",
            b.section("ev")
        );
        let (before, after) = cpu_ticks_over_2s(&mut d, "w");
        assert!(guest_ok(&mut s, "vshm event signal ev").starts_with("STATUS_SUCCESS"));
        let out = finish(&mut d, "w");
        assert!(out.contains("was signalled"), "d's waiter woke: {out}");
        let driver_ticks = after - before;
        eprintln!(
            "CPU over a 2 s wait, driver (poll on /dev/vshm0): {driver_ticks} ticks of 10 ms"
        );
        assert!(
            driver_ticks <= 20,
            "a waiter sleeping on the driver uses well under its wait: {driver_ticks} ticks \
             of 200"
        );

        background(&mut s, "w", "event wait ev --timeout 30000");
        assert!(
            wait_for(Duration::from_secs(30), || refs(&b, "ev") >= 1),
            "the sysfs waiter opened the event"
        );
        let (before, after) = cpu_ticks_over_2s(&mut s, "w");
        assert!(guest_ok(&mut d, "vshm event signal ev").starts_with("STATUS_SUCCESS"));
        let out = finish(&mut s, "w");
        assert!(out.contains("was signalled"), "s's waiter woke: {out}");
        eprintln!(
            "CPU over a 2 s wait, sysfs (polling with backoff): {} ticks of 10 ms",
            after - before
        );

        // 4. Readings, not assertions: event round trips guest -> host process -> guest,
        //    through the driver (interrupts, WB) and through sysfs (polling, UC-).
        for (vm, name, label) in [(&mut d, "pd", "driver"), (&mut s, "ps", "sysfs")] {
            let mut echo = b.vshm_holding(&["event", "echo", name, "--count", "500"]);
            let out = guest_ok(vm, &format!("vshm event ping {name} --count 500"));
            assert!(out.contains("n=500"), "{label}: {out}");
            assert!(echo.wait().expect("echo").success(), "the host echoed 500");
            eprintln!("guest -> host -> guest, {label}: {}", out.trim());
        }
    });
}

#[test]
fn the_driver_unbinds_under_an_open_file_unloads_and_reloads_with_its_mode_and_group() {
    if !driver_built() {
        return;
    }
    watchdog(Duration::from_secs(400), || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "16M"]);
        let mut vms = boot(&b, &[("u", true)]);
        let mut u = vms.pop().expect("u");
        guest_ok(&mut u, "vshm create kept --max 64K --persistent");
        guest_ok(&mut u, "vshm write kept --data KEPT");
        assert!(guest_ok(&mut u, "grep -c vshm /proc/interrupts").trim() == "2");

        // 1. Unbind while a process has the region mapped and a shell holds the device
        //    open: the node goes, the open file answers ENODEV, the interrupts are freed.
        guest_hold(&mut u, "h", "hold kept");
        let out = guest_sh(
            &mut u,
            "exec 3</dev/vshm0; \
             bdf=$(basename $(readlink /sys/class/vshm/vshm0/device)); \
             echo $bdf > /sys/bus/pci/drivers/vshm/unbind || exit 1; \
             ls /dev/vshm0 2>/dev/null && exit 2; \
             dd bs=144 count=1 <&3 2>&1 >/dev/null; \
             grep -c vshm /proc/interrupts",
        );
        assert!(
            out.text.contains("No such device"),
            "a read on a file opened before unbind fails with ENODEV: {}",
            out.text
        );
        assert!(
            out.text.trim_end().ends_with('0'),
            "no vshm interrupt is left: {}",
            out.text
        );
        // The holder's pages were zapped: its release touches the region and dies (SIGBUS);
        // wait until it is gone (its file is closed with it).
        guest_ok(
            &mut u,
            "p=$(cat /tmp/h.pid); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.05; done",
        );
        assert!(guest_ok(&mut u, "dmesg | grep 'vshm: /dev/vshm0 removed'").contains("removed"));

        // 2. Unload (nothing is open any more), then load again with another mode and
        //    group: the device is bound again and works.
        guest_ok(&mut u, "rmmod vshm");
        assert!(guest_ok(&mut u, "grep -c '^vshm ' /proc/modules || true").trim() == "0");
        guest_ok(&mut u, "insmod /lib/modules/vshm.ko mode=0660 group=100");
        let node = guest_ok(&mut u, "ls -ln /dev/vshm0");
        let fields: Vec<&str> = node.split_whitespace().collect();
        assert!(
            fields.first() == Some(&"crw-rw----") && fields.get(3) == Some(&"100"),
            "mode 0660, group 100: {node}"
        );
        assert_eq!(guest_ok(&mut u, "vshm read kept --len 4"), "KEPT");
        assert!(guest_ok(&mut u, "grep -c vshm /proc/interrupts").trim() == "2");
        // A user in that group opens a section through the driver without root; one
        // outside it is refused.
        guest_ok(
            &mut u,
            "echo 'user:x:1000:100::/tmp:/bin/sh' >> /etc/passwd; \
             echo 'other:x:1001:1001::/tmp:/bin/sh' >> /etc/passwd; \
             echo 'users:x:100:' >> /etc/group",
        );
        assert_eq!(
            guest_ok(&mut u, "su user -c 'vshm read kept --len 4'"),
            "KEPT",
            "uid 1000 in group 100"
        );
        let denied = guest_sh(&mut u, "su other -c 'vshm read kept --len 4'");
        assert!(
            !denied.success() && denied.text.contains("ermission denied"),
            "uid 1001 outside group 100: {}",
            denied.text
        );
        // 3. And unloading while bound (nothing open) unbinds first.
        guest_ok(&mut u, "rmmod vshm");
        assert!(guest_ok(&mut u, "grep -c vshm /proc/interrupts || true").trim() == "0");
        // The kernel complained about nothing on the way (no WARN or BUG — both print
        // "cut here" —, Oops, or refcount_t underflow/overflow).
        let complaints = guest_ok(
            &mut u,
            "dmesg | grep -E 'cut here|BUG:|Oops|refcount_t' || true",
        );
        assert!(complaints.trim().is_empty(), "kernel log: {complaints}");
    });
}

#[test]
fn a_guest_with_two_devices_gets_two_nodes_and_picks_one_by_pci_address() {
    if !driver_built() {
        return;
    }
    watchdog(Duration::from_secs(300), || {
        let _one = vshm_tests::serial();
        let b0 = Backend::start(&["--size", "16M"]);
        let b1 = Backend::start(&["--size", "16M"]);
        let image = vshm_tests::guest_image();
        let mut cfg = VmConfig::new("m", &image, &b0.socket, b0.dir());
        cfg.extra_sockets = vec![b1.socket.clone()];
        let mut m = Vm::start(&cfg)
            .and_then(|s| s.wait_ready(Duration::from_secs(180)))
            .unwrap_or_else(|e| panic!("{e}"));
        let nodes = guest_ok(&mut m, "ls /dev | grep '^vshm'");
        assert_eq!(
            nodes.split_whitespace().collect::<Vec<_>>(),
            ["vshm0", "vshm1"],
            "one node per function"
        );
        let ambiguous = guest_sh(&mut m, "vshm list");
        assert!(
            !ambiguous.success() && ambiguous.text.contains("several vshm driver devices"),
            "{}",
            ambiguous.text
        );
        let bdf = |m: &mut Vm, n: u32| {
            guest_ok(
                m,
                &format!("basename $(readlink /sys/class/vshm/vshm{n}/device)"),
            )
            .trim()
            .to_owned()
        };
        let (p0, p1) = (bdf(&mut m, 0), bdf(&mut m, 1));
        assert_ne!(p0, p1);
        guest_ok(
            &mut m,
            &format!("vshm --pci {p0} create on-vshm0 --max 64K --persistent"),
        );
        guest_ok(
            &mut m,
            &format!("vshm --pci {p1} create on-vshm1 --max 64K --persistent"),
        );
        let in_b0 = b0.section("on-vshm0").is_some();
        assert!(
            in_b0 != b1.section("on-vshm0").is_some(),
            "created in exactly one region"
        );
        let (first, second) = if in_b0 { (&b0, &b1) } else { (&b1, &b0) };
        assert!(
            second.section("on-vshm1").is_some() && first.section("on-vshm1").is_none(),
            "--pci chose the other device's region"
        );

        // Unbinding one function leaves the other working; binding it again brings it back.
        guest_ok(
            &mut m,
            &format!("echo {p1} > /sys/bus/pci/drivers/vshm/unbind"),
        );
        assert_eq!(guest_ok(&mut m, "ls /dev | grep '^vshm'").trim(), "vshm0");
        assert!(guest_ok(&mut m, "vshm list").contains("on-vshm0"));
        guest_ok(
            &mut m,
            &format!("echo {p1} > /sys/bus/pci/drivers/vshm/bind"),
        );
        assert!(guest_ok(&mut m, &format!("vshm --pci {p1} list")).contains("on-vshm1"));
    });
}

/// The peer's handle count on `name` that vshmctl shows for `peer_id`.
fn refs_of(b: &Backend, name: &str, peer_id: u64) -> u64 {
    b.status()["sections"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .and_then(|s| s["refs_by_peer"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .find(|pair| pair[0].as_u64() == Some(peer_id))
        .and_then(|pair| pair[1].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_sigkilled_guest_process_loses_its_handles_and_mutex_while_its_vm_and_other_processes_keep_theirs(
) {
    if !driver_built() {
        return;
    }
    watchdog(Duration::from_secs(400), || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "16M"]);
        for args in [
            &["create", "shared", "--max", "64K", "--persistent"][..],
            &["create", "mine", "--max", "64K", "--persistent"],
            &["mutex", "create", "m", "--persistent"],
        ] {
            let out = b.vshm(args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                vshm_tests::stderr(&out)
            );
        }
        let mut vms = boot(&b, &[("k", true), ("o", false)]);
        let (mut k, mut o) = (vms.remove(0), vms.remove(0));
        let k_id = vshm_tests::guest_peer_id(&mut k);

        // In guest k: a victim holding two sections, another victim owning the mutex, and a
        // keeper holding one of the same sections.
        guest_hold(&mut k, "victim", "hold shared mine");
        guest_hold(&mut k, "keeper", "hold shared");
        guest_hold(&mut k, "owner", "mutex lock m");
        assert_eq!(refs_of(&b, "shared", k_id), 2);
        assert_eq!(refs_of(&b, "mine", k_id), 1);
        // Guest o queues for the mutex behind k's owner.
        background(&mut o, "waiter", "mutex lock m --timeout 60000");
        guest_ok(&mut o, "sleep 1; cat /tmp/waiter.out");

        // SIGKILL both victims: no chance to close anything themselves.
        let killed = std::time::Instant::now();
        guest_ok(
            &mut k,
            "kill -9 $(cat /tmp/victim.pid) $(cat /tmp/owner.pid); \
             while kill -0 $(cat /tmp/victim.pid) 2>/dev/null; do sleep 0.01; done",
        );
        let gone = wait_for(Duration::from_secs(10), || {
            refs_of(&b, "shared", k_id) == 1 && refs_of(&b, "mine", k_id) == 0
        });
        let after = killed.elapsed();
        assert!(
            gone,
            "the victim's handles are closed without the VM detaching: shared {}, mine {}",
            refs_of(&b, "shared", k_id),
            refs_of(&b, "mine", k_id)
        );
        eprintln!("handles of the killed process gone after {after:?} (kill sent through the TCG guest's agent)");
        // The mutex went to the waiter in the other VM, as abandoned.
        let waited = finish(&mut o, "waiter");
        assert!(
            waited.contains("its last owner died holding it"),
            "the waiter in guest o gets the mutex abandoned: {waited}"
        );
        // k stays attached, and the keeper keeps its handle and still works.
        assert!(
            b.status()["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["id"].as_u64() == Some(k_id))),
            "guest k is still attached"
        );
        assert_eq!(refs_of(&b, "shared", k_id), 1);
        guest_ok(&mut k, "vshm write shared --data STILL");
        assert_eq!(guest_ok(&mut o, "vshm read shared --len 5"), "STILL");
        guest_release(&mut k, "keeper");
        assert!(wait_for(Duration::from_secs(10), || refs_of(
            &b, "shared", k_id
        ) == 0));
        let complaints = guest_ok(
            &mut k,
            "dmesg | grep -E 'cut here|BUG:|Oops|refcount_t|vshm: gave up' || true",
        );
        assert!(complaints.trim().is_empty(), "kernel log: {complaints}");
    });
}
