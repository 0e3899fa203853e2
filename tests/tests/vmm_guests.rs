//! End to end on the vhost-user path (issue 11): vshmd, `vshm-vmm` VMs running the
//! freestanding guest built from the no_std core (guest/freestanding), and a host-process
//! peer on the ivshmem socket, in one namespace. What one VM writes the host and another VM
//! read; a VM's window shows nothing it did not open (not another VM's bytes, not what it
//! closed); a killed VMM's holds are reclaimed within a second.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vshm_tests::freestanding::guest_elf;
use vshm_tests::{bin, command, kill9, serial, wait_for, watchdog, Backend};

/// A running VMM whose guest's lines arrive on a channel.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Guest {
    fn start(socket: &Path, args: &str) -> Guest {
        let mut child = command(&bin("vshm-vmm"))
            .arg("--guest")
            .arg(guest_elf())
            .arg("--vshm")
            .arg(socket)
            .arg("--args")
            .arg(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start vshm-vmm");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) starting with `prefix`.
    fn line(&mut self, prefix: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(e) => panic!("no line {prefix:?} ({e}); the guest said: {:#?}", self.seen),
            }
        }
    }

    /// Waits for the VMM to exit; its status.
    fn exit(mut self) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait().expect("wait vshm-vmm");
        self.seen.extend(self.lines.try_iter());
        (status.code(), self.seen)
    }
}

/// The value of `key=` in a guest's line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_owned()
}

#[test]
fn vms_share_a_section_with_the_host_see_only_what_they_opened_and_are_reclaimed_when_killed() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    watchdog(Duration::from_secs(240), || {
        let (b, vpath) =
            Backend::start_with_vhost_user(&["--size", "8M", "--vhost-user-window", "16M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (shared, _) = host
            .create(Some("shared"), &vshm::CreateOptions::new(64 << 10))
            .expect("the host creates the section");

        // VM B holds a section of its own, full of 0xbb, and stays.
        let mut vm_b = Guest::start(&vpath, "create b-only 4096; fill b-only 0xbb; spin");
        let made = vm_b.line("vshm-guest: create b-only");
        assert_eq!(field(&made, "status"), "0x00000000", "{made}");
        let b_window = field(&made, "window");
        vm_b.line("vshm-guest: fill b-only");

        // VM A: where B has its section, A's window is empty; A opens the host's section,
        // writes it, closes it, and then sees nothing there either.
        let vm_a = Guest::start(
            &vpath,
            &format!(
                "peek {b_window} 16; create shared 65536; fill shared 0x5a; close shared; \
                 peek {b_window} 16; peek 0 16"
            ),
        );
        let (code, said) = vm_a.exit();
        assert_eq!(code, Some(0), "VM A: {said:#?}");
        let peeks: Vec<&String> = said.iter().filter(|l| l.contains(" peek ")).collect();
        assert_eq!(peeks.len(), 3, "{said:#?}");
        for p in &peeks {
            assert!(
                !p.contains("bb"),
                "VM B's bytes showed in VM A's window: {p}"
            );
            assert!(
                !p.contains("5a"),
                "a closed section still showed in the window: {p}"
            );
        }
        assert!(said
            .iter()
            .any(|l| l.starts_with("vshm-guest: close shared")));

        // The host reads what VM A wrote; VM C opens it read-only and reads it too.
        let mut bytes = vec![0u8; 64 << 10];
        shared.read_at(0, &mut bytes).expect("read");
        assert!(
            bytes.iter().all(|b| *b == 0x5a),
            "the host sees VM A's bytes"
        );
        let vm_c = Guest::start(&vpath, "open shared ro; check shared 0x5a");
        let (code, said) = vm_c.exit();
        assert_eq!(code, Some(0), "VM C: {said:#?}");
        let open = said
            .iter()
            .find(|l| l.starts_with("vshm-guest: open shared"))
            .expect("VM C's open line");
        assert_eq!(field(open, "writable"), "0", "{open}");

        // Killing VM B's VMM gives its section back within a second.
        assert!(b.section("b-only").is_some(), "{}", b.status());
        let mut child = vm_b.child;
        kill9(&mut child);
        let killed = Instant::now();
        assert!(
            wait_for(Duration::from_secs(1), || b.section("b-only").is_none()),
            "VM B's section was not reclaimed within 1 s of the kill: {}",
            b.status()
        );
        eprintln!("reclaimed {:?} after the kill", killed.elapsed());
        assert_eq!(b.section("shared").expect("listed")["refs"], 1);
    });
}

#[test]
fn a_vm_waits_on_an_event_through_the_device_until_a_host_peer_signals_it() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    let _one_at_a_time = serial();
    watchdog(Duration::from_secs(120), || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (ev, _) = host
            .create_event(Some("frame-ready"), &vshm::EventOptions::default())
            .expect("the host creates the event");

        // Nothing signals it at first: the first wait times out; the second is pending
        // (the device answers it later, out of order) until the host signals.
        let mut vm = Guest::start(
            &vpath,
            "event frame-ready; wait frame-ready 200; wait frame-ready 60000",
        );
        let opened = vm.line("vshm-guest: event frame-ready");
        assert!(opened.contains("slot="), "{opened}");
        let timed_out = vm.line("vshm-guest: wait frame-ready ms=200");
        assert_eq!(
            field(&timed_out, "status"),
            "0x00000102",
            "STATUS_TIMEOUT: {timed_out}"
        );
        // The second WAIT is on the queue now, or about to be: either way the signal ends it.
        std::thread::sleep(Duration::from_millis(300));
        ev.signal().expect("signal");
        let woke = vm.line("vshm-guest: wait frame-ready ms=60000");
        assert_eq!(field(&woke, "status"), "0x00000000", "{woke}");
        let (code, said) = vm.exit();
        assert_eq!(
            code,
            Some(1),
            "the timed-out wait counts as a failure: {said:#?}"
        );
    });
}
