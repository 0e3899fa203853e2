//! End-to-end with a real QEMU guest: two processes of one guest share its peer slot, so
//! its refcount cell locks; one is SIGKILLed while it holds the lock for a section
//! (the `vshm` CLI's test-only `VSHM_TEST_PAUSE_IN_CELL_LOCK` stops it there), and the next
//! process of that guest takes the lock over and opens and closes the section (FORMAT.md §7
//! steal) instead of finding the slot poisoned for the whole VM.

use std::time::Duration;

use vshm_tests::{boot_guests, guest_ok, wait_for, watchdog, Backend};

#[test]
fn a_guest_process_killed_inside_its_cell_lock_does_not_poison_the_section_for_the_vm() {
    watchdog(Duration::from_secs(400), || {
        let b = Backend::start(&["--size", "64M"]);
        let mut vm = boot_guests(&b, &["lock"]).pop().expect("guest");
        guest_ok(&mut vm, "vshm create poison --max 64K --persistent");

        // Process 1 opens "poison" and stops inside its cell lock, holder bit set; it is
        // killed there and reaped (a zombie still counts as alive). Then two more processes
        // of the same guest open and close it.
        let out = guest_ok(
            &mut vm,
            "VSHM_TEST_PAUSE_IN_CELL_LOCK=1 vshm open poison > /tmp/p.out 2>&1 & p=$!; \
             i=0; while ! grep -q 'paused in the cell lock' /tmp/p.out; do \
             i=$((i+1)); if [ $i -gt 600 ]; then cat /tmp/p.out; exit 1; fi; sleep 0.05; done; \
             kill -9 $p; wait $p; echo killed $p; \
             vshm open poison && vshm write poison --data after-the-steal && \
             vshm read poison --len 15",
        );
        assert!(out.contains("killed"), "{out}");
        assert!(
            out.contains("after-the-steal"),
            "the section works again: {out}"
        );

        // The host sees no handle left and the dead process's holder bit went with the
        // steal: once deleted, the section is destroyed at once, not kept alive by it.
        let s = b.section("poison").expect("poison is listed");
        assert_eq!(s["refs"], 0, "no handles are counted: {s}");
        guest_ok(&mut vm, "vshm delete poison");
        assert!(
            wait_for(Duration::from_secs(10), || {
                b.status()["sections"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|s| s["name"] != "poison"))
            }),
            "the deleted section was destroyed: {}",
            b.status()
        );
    });
}
