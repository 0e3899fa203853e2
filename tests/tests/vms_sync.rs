//! Events and robust mutexes with real VMs: vshmd, two QEMU guests (TCG here, KVM where the
//! host has hardware virtualisation) driven through their command agents, and a host
//! process. An event signalled in one guest wakes a host process and the other guest;
//! signals are never lost between a guest and a host process; two guests allocating blocks
//! in one section at once never overlap; a guest killed while it holds a mutex leaves it to
//! the next locker as STATUS_ABANDONED.

use std::time::Duration;

use vshm::{Acquired, EventOptions};
use vshm_images::Vm;
use vshm_tests::{guest_hold, guest_ok, guest_sh, wait_for, watchdog, Backend};

/// Starts `vshm ARGS` in the background in a guest; [`finish`] waits for it.
fn background(vm: &mut Vm, tag: &str, args: &str) {
    guest_ok(
        vm,
        &format!("vshm {args} > /tmp/{tag}.out 2>&1 & echo $! > /tmp/{tag}.pid"),
    );
}

/// Waits (up to 60 s, the agent's bound) for a background command and returns its output
/// and exit status.
fn finish(vm: &mut Vm, tag: &str) -> String {
    guest_ok(
        vm,
        &format!(
            "p=$(cat /tmp/{tag}.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; \
             cat /tmp/{tag}.out"
        ),
    )
}

#[test]
fn guests_wake_each_other_and_a_host_process_and_a_killed_guests_mutex_is_abandoned() {
    watchdog(Duration::from_secs(600), || {
        let b = Backend::start(&["--size", "16M"]);
        let mut vms = vshm_tests::boot_guests(&b, &["sa", "sb"]);
        let mut gb = vms.pop().expect("sb");
        let mut ga = vms.pop().expect("sa");

        // 1. A manual-reset event: a host thread and guest B wait; guest A signals.
        let host = b.connect();
        let (tick, _) = host
            .create_event(
                Some("tick"),
                &EventOptions {
                    manual_reset: true,
                    persistent: true,
                },
            )
            .expect("event");
        background(&mut gb, "w", "event wait tick --timeout 50000");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| tick.wait(Some(Duration::from_secs(50))));
            // Guest B is waiting once its peer is among the event's waiters or holders.
            assert!(
                wait_for(Duration::from_secs(30), || b
                    .section("tick")
                    .is_some_and(|t| t["refs"].as_u64() >= Some(2))),
                "guest B opened the event: {:?}",
                b.section("tick")
            );
            assert!(guest_ok(&mut ga, "vshm event signal tick").starts_with("STATUS_SUCCESS"));
            assert!(waiter.join().expect("join").is_ok(), "the host thread woke");
        });
        let out = finish(&mut gb, "w");
        assert!(out.contains("was signalled"), "guest B woke: {out}");

        // 2. Hundreds of signals each way between a guest and a host process: none is lost.
        //    (A guest's atomics on the region must be real atomics: under TCG that takes
        //    parallel vCPUs, see images/src/vm.rs.)
        let mut echo = b.vshm_holding(&["event", "echo", "pp", "--count", "1000"]);
        let out = guest_ok(&mut ga, "vshm event ping pp --count 1000");
        assert!(
            out.contains("n=1000"),
            "guest -> host -> guest, 1000 rounds: {out}"
        );
        assert!(echo.wait().expect("echo").success(), "the host echoed 1000");
        background(&mut gb, "e", "event echo qq --count 1000");
        let ping = b.vshm(&["event", "ping", "qq", "--count", "1000"]);
        assert!(
            ping.status.success(),
            "host -> guest -> host, 1000 rounds: {}",
            vshm_tests::stderr(&ping)
        );
        finish(&mut gb, "e");

        // 3. Both guests allocate blocks in one section at the same time: no two overlap.
        b.connect()
            .create(
                Some("pool"),
                &vshm::CreateOptions {
                    max_size: 1 << 20,
                    initial_size: 64 << 10,
                    persistent: true,
                },
            )
            .expect("pool");
        let script = "for i in $(seq 25); do vshm alloc pool 1000 || exit 1; done";
        for (vm, tag) in [(&mut ga, "pa"), (&mut gb, "pb")] {
            guest_ok(
                vm,
                &format!("sh -c '{script}' > /tmp/{tag}.out 2>&1 & echo $! > /tmp/{tag}.pid"),
            );
        }
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for (vm, tag) in [(&mut ga, "pa"), (&mut gb, "pb")] {
            let out = finish(vm, tag);
            for line in out.lines() {
                let mut f = line.split_whitespace().map(str::parse::<u64>);
                match (f.next(), f.next()) {
                    (Some(Ok(offset)), Some(Ok(size))) => blocks.push((offset, size)),
                    _ => panic!("{tag}: unexpected line {line:?} in {out}"),
                }
            }
        }
        assert_eq!(blocks.len(), 50, "25 blocks from each guest");
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "overlap: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        let pool = b.section("pool").expect("pool in status");
        assert_eq!(pool["blocks"]["count"], 50, "{pool}");

        // 4. Guest A holds a mutex and its VM dies; guest B, queued, is told ABANDONED.
        let (robust, _) = host.create_mutex(Some("robust"), true).expect("mutex");
        guest_hold(&mut ga, "m", "mutex lock robust");
        assert!(robust.owner().expect("owner").is_some(), "guest A holds it");
        background(
            &mut gb,
            "l",
            "mutex lock robust --timeout 50000 < /dev/null",
        );
        assert!(
            wait_for(Duration::from_secs(30), || b
                .section("robust")
                .is_some_and(|m| m["queued"] == 1)),
            "guest B queued: {:?}",
            b.section("robust")
        );
        ga.kill();
        let out = finish(&mut gb, "l");
        assert!(
            out.contains("STATUS_ABANDONED"),
            "guest B after A died: {out}"
        );
        // B released it when its stdin (/dev/null) closed; the next locker gets it clean.
        assert_eq!(
            robust.lock(Some(Duration::from_secs(10))).expect("lock"),
            Acquired::Clean
        );
        robust.unlock().expect("unlock");
        let gone = guest_sh(&mut gb, "vshm mutex create tick");
        assert!(
            gone.text.contains("STATUS_INVALID_HANDLE"),
            "kind clash in a guest: {}",
            gone.text
        );
    });
}
