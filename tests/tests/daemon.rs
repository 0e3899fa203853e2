//! vshmd's own behaviour: options, sockets, signals.

use std::process::Stdio;
use std::time::Duration;

use vshm_tests::{bin, command, stderr, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

fn vshmd_fails(args: &[&str], expect: &str) {
    let dir = TempDir::new("bad");
    let socket = dir.path().join("s");
    let out = command(&bin("vshmd"))
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vshmd");
    assert!(!out.status.success(), "vshmd {args:?} should fail");
    assert!(
        stderr(&out).contains(expect),
        "vshmd {args:?}: {}",
        stderr(&out)
    );
    assert!(!socket.exists(), "no socket left behind");
    assert!(
        !dir.path().join("s.ctl").exists(),
        "no control socket left behind"
    );
}

#[test]
fn vshmd_rejects_bad_options_with_a_clear_error_and_leaves_nothing_behind() {
    watchdog(LIMIT, || {
        vshmd_fails(&["--size", "3M"], "power of two");
        vshmd_fails(&["--size", "12Q"], "invalid size");
        vshmd_fails(&["--size", "512K"], "power of two");
        vshmd_fails(&["--max-peers", "63"], "--max-peers 63");
        vshmd_fails(&["--max-peers", "0"], "--max-peers 0");
        vshmd_fails(&["--max-objects", "0"], "--max-objects 0");
        vshmd_fails(&["--size", "1M", "--max-objects", "65536"], "needs");
        vshmd_fails(&["--vectors", "0"], "--vectors 0");
    });
}

#[test]
fn hugepages_without_configured_huge_pages_is_a_clear_error() {
    let free = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default();
    if free != "0" {
        // This host has huge pages; the error path cannot be provoked here.
        return;
    }
    watchdog(LIMIT, || vshmd_fails(&["--hugepages"], "nr_hugepages"));
}

#[test]
fn vshmd_refuses_a_socket_a_live_server_owns() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "1M"]);
        let out = command(&bin("vshmd"))
            .arg("--socket")
            .arg(&b.socket)
            .arg("--control")
            .arg(b.dir().join("other.ctl"))
            .output()
            .expect("run vshmd");
        assert!(!out.status.success());
        assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
        assert!(b.socket.exists(), "the live server's socket is untouched");
        assert!(b.status()["region"]["size"].as_u64() == Some(1 << 20));
    });
}

#[test]
fn vshmd_exits_zero_on_sigterm_and_removes_its_sockets() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "1M"]);
        let _peer = b.connect();
        let (socket, control) = (b.socket.clone(), b.control.clone());
        let status = b.terminate();
        assert!(status.success(), "exit status {status}");
        assert!(!socket.exists() && !control.exists(), "sockets removed");
    });
}

#[test]
fn a_peer_learns_when_the_backend_is_gone() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "1M"]);
        let ns = b.connect();
        let status = b.terminate();
        assert!(status.success());
        assert!(vshm_tests::wait_for(Duration::from_secs(2), || ns
            .transport()
            .backend_gone()));
        let err = ns
            .create(Some("x"), &vshm::CreateOptions::new(4096))
            .expect_err("no backend to create");
        assert_eq!(
            err,
            vshm::Error::Transport(vshm::TransportError::BackendGone)
        );
    });
}
