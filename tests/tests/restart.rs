//! Restarting and upgrading vshmd without disturbing its peers (docs/OPERATIONS.md): a new
//! vshmd started with `--takeover` receives the region, its sockets and every peer's
//! connection and eventfds from the running one, which exits 0. Host-process peers keep
//! their sections, data and handles and go on creating, deleting, growing and signalling;
//! an upgrade runs another binary; a takeover that cannot work leaves the old one serving.
//! (A QEMU guest through a takeover: `vms.rs`.)

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vshm::{CreateOptions, EventOptions};
use vshm_tests::{bin, stderr, wait_for, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(90);

fn epoch(b: &Backend) -> u64 {
    b.status()["region"]["epoch"].as_u64().expect("epoch")
}

#[test]
fn host_peers_keep_their_sections_data_and_handles_through_a_graceful_takeover() {
    watchdog(LIMIT, || {
        let mut b = Backend::start(&["--size", "8M"]);
        let old_pid = b.pid();
        let a = b.connect();
        let c = b.connect();
        let (sec, _) = a
            .create(Some("kept"), &CreateOptions::new(64 * 1024))
            .expect("create");
        sec.write_at(100, b"written before the restart")
            .expect("write");
        let sec_c = c.open("kept").expect("open");
        let (ev, _) = a
            .create_event(Some("bell"), &EventOptions::default())
            .expect("event");
        let ev_c = c.open_event("bell").expect("open event");
        let before = epoch(&b);

        b.take_over();

        assert_ne!(b.pid(), old_pid, "another process serves now");
        assert_eq!(
            epoch(&b),
            before.wrapping_add(1),
            "backend_epoch moved on by one"
        );
        let status = b.status();
        assert_eq!(
            status["peers"].as_array().map(Vec::len),
            Some(2),
            "{status}"
        );
        assert_eq!(b.section("kept").expect("kept")["refs"], 2);
        // Bytes written before are read after, by the other peer.
        let mut got = [0u8; 26];
        sec_c.read_at(100, &mut got).expect("read");
        assert_eq!(&got, b"written before the restart");
        // Requests are served by the new process: create, grow, delete.
        let grow = CreateOptions {
            max_size: 256 * 1024,
            initial_size: 4096,
            persistent: false,
        };
        let (after, _) = c.create(Some("after"), &grow).expect("create after");
        after.grow(128 * 1024).expect("grow after");
        assert_eq!(b.section("after").expect("after")["size"], 128 * 1024);
        a.delete("after").expect("delete after");
        after.close().expect("close");
        assert!(
            wait_for(Duration::from_secs(5), || b.section("after").is_none()),
            "deleted and closed: destroyed"
        );
        // Events wake across the new process.
        let started = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                started.store(true, Ordering::SeqCst);
                ev_c.wait(Some(Duration::from_secs(10)))
            });
            assert!(wait_for(Duration::from_secs(5), || started.load(Ordering::SeqCst)));
            std::thread::sleep(Duration::from_millis(50));
            ev.signal().expect("signal");
            assert!(waiter.join().expect("join").is_ok(), "woken");
        });
        // A newcomer gets the region from the new process.
        let d = b.connect();
        let sec_d = d.open("kept").expect("a newcomer opens it");
        sec_d.close().expect("close");
        // Handles taken before the restart still count: the last close destroys.
        sec.close().expect("close a");
        assert!(b.section("kept").is_some(), "c still holds it");
        sec_c.close().expect("close c");
        assert!(
            wait_for(Duration::from_secs(5), || b.section("kept").is_none()),
            "the last close after the restart destroyed it"
        );
        assert!(b.exited().is_none(), "the new vshmd still runs");
    });
}

#[test]
fn an_upgrade_runs_another_binary_and_can_be_taken_over_again() {
    watchdog(LIMIT, || {
        let mut b = Backend::start(&["--size", "4M"]);
        let a = b.connect();
        let (sec, _) = a
            .create(Some("data"), &CreateOptions::new(8192))
            .expect("create");
        sec.write_at(0, b"v1").expect("write");
        let before = epoch(&b);
        // The "new version": a copy of the binary somewhere else.
        let dir = TempDir::new("upgrade");
        let next = dir.path().join("vshmd-next");
        std::fs::copy(bin("vshmd"), &next).expect("copy vshmd");
        b.take_over_with(&next);
        let exe = std::fs::read_link(format!("/proc/{}/exe", b.pid())).expect("exe");
        assert_eq!(exe, next, "the upgraded binary serves");
        let mut got = [0u8; 2];
        sec.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"v1");
        sec.write_at(0, b"v2").expect("write");
        // And back (a second takeover of a region that was taken over once).
        b.take_over();
        assert_eq!(epoch(&b), before.wrapping_add(2));
        let (more, _) = a
            .create(Some("more"), &CreateOptions::new(4096))
            .expect("create after two takeovers");
        more.close().expect("close");
        sec.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"v2");
        sec.close().expect("close");
        assert!(wait_for(Duration::from_secs(5), || b
            .section("data")
            .is_none()));
    });
}

#[test]
fn a_takeover_with_another_region_size_fails_and_the_running_vshmd_serves_on() {
    watchdog(LIMIT, || {
        let mut b = Backend::start(&["--size", "4M"]);
        let old_pid = b.pid();
        let a = b.connect();
        let (sec, _) = a
            .create(Some("stays"), &CreateOptions::new(4096))
            .expect("create");
        let out = b.take_over_output(&[
            OsStr::new("--socket"),
            b.socket.as_os_str(),
            OsStr::new("--size"),
            OsStr::new("8M"),
        ]);
        assert!(!out.status.success(), "the takeover must fail");
        let err = stderr(&out);
        assert!(
            err.contains("--size") && err.contains("4194304") && err.contains("8388608"),
            "the message names the setting and both values: {err}"
        );
        assert!(b.exited().is_none(), "the running vshmd still runs");
        assert_eq!(
            b.status()["vshmd"]["pid"].as_u64(),
            Some(u64::from(old_pid))
        );
        // It serves as before: a request, and a newcomer.
        let (more, _) = a
            .create(Some("more"), &CreateOptions::new(4096))
            .expect("create after the failed takeover");
        more.close().expect("close");
        let c = b.connect();
        c.open("stays").expect("open").close().expect("close");
        sec.close().expect("close");
        // And a real takeover still works after the failed one.
        b.take_over();
        a.create(Some("later"), &CreateOptions::new(4096))
            .expect("create after the takeover")
            .0
            .close()
            .expect("close");
    });
}

#[test]
fn a_takeover_with_nothing_running_says_so_and_exits_non_zero() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("no-takeover");
        let socket = dir.path().join("none.sock");
        let out = vshm_tests::vshmd_output(&[
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--takeover"),
        ]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("cannot reach the running vshmd") && err.contains("none.sock.ctl.handoff"),
            "{err}"
        );
        assert!(!socket.exists(), "nothing was created");
    });
}

const TWO_REGIONS: &str = r#"
[[region]]
name = "a"
socket = "{dir}/vshm.sock"
size = "4M"
[[region.listen]]
name = "la"
path = "{dir}/a-listen.sock"

[[region]]
name = "b"
socket = "{dir}/b.sock"
size = "4M"
"#;

#[test]
fn every_region_of_a_config_file_is_taken_over_with_its_further_listeners() {
    watchdog(LIMIT, || {
        let mut b = Backend::start_with_config(TWO_REGIONS, &[]);
        let in_a = b.connect_to(&b.dir().join("a-listen.sock"));
        let in_b = b.connect_to(&b.dir().join("b.sock"));
        let (sa, _) = in_a
            .create(Some("in-a"), &CreateOptions::new(4096))
            .expect("create in a");
        let (sb, _) = in_b
            .create(Some("in-b"), &CreateOptions::new(4096))
            .expect("create in b");
        sa.write_at(0, b"aa").expect("write");
        sb.write_at(0, b"bb").expect("write");
        b.take_over();
        let b_ctl = b.dir().join("b.sock.ctl");
        let b_status = vshm_control::request(&b_ctl, &vshm_control::ControlRequest::Status)
            .expect("region b answers");
        assert_eq!(
            b_status["vshmd"]["pid"].as_u64(),
            Some(u64::from(b.pid())),
            "region b is served by the new process too"
        );
        let mut got = [0u8; 2];
        sb.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"bb");
        in_b.create(Some("b2"), &CreateOptions::new(4096))
            .expect("create in b after")
            .0
            .close()
            .expect("close");
        // The further listener was handed over too.
        let late = b.connect_to(&b.dir().join("a-listen.sock"));
        let s = late
            .open("in-a")
            .expect("open through the further listener");
        s.read_at(0, &mut got).expect("read");
        assert_eq!(&got, b"aa");
    });
}
