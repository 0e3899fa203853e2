//! vshmd under a service manager: the test plays systemd's side of sd_notify(3) — a
//! datagram socket named by `$NOTIFY_SOCKET` — and checks that `READY=1` comes only once
//! the ivshmem socket takes peers, and `STOPPING=1` on SIGTERM.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Stdio;
use std::time::Duration;

use vshm::host::HostTransport;
use vshm::Namespace;
use vshm_tests::{bin, command, watchdog, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

/// The next notification, or a failure naming what was expected.
fn next(socket: &UnixDatagram, expecting: &str) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification while waiting for {expecting}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Starts vshmd with `NOTIFY_SOCKET=address` and checks the whole conversation.
fn conversation(notify: &UnixDatagram, address: &str, dir: &TempDir) {
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let socket = dir.path().join("vshm.sock");
    let mut vshmd = command(&bin("vshmd"))
        .arg("--socket")
        .arg(&socket)
        .args(["--size", "4M"])
        .env("NOTIFY_SOCKET", address)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vshmd");

    let ready = next(notify, "READY=1");
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=serving 1 region(s) on ")
                && l.ends_with(&*socket.to_string_lossy())),
        "{ready:?}"
    );
    // The moment READY=1 is out, a peer attaches without retrying.
    let transport = HostTransport::connect(&socket).expect("connect right after READY=1");
    let ns = Namespace::attach(transport).expect("attach right after READY=1");
    drop(ns);

    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(vshmd.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM");
    let stopping = next(notify, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = vshmd.wait().expect("wait");
    assert!(status.success(), "{status}");
}

#[test]
fn ready_comes_once_the_socket_takes_peers_and_stopping_on_sigterm() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("notify");
        let path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&path).expect("bind");
        conversation(&notify, &path.to_string_lossy(), &dir);
    });
}

#[test]
fn an_abstract_notify_socket_works_too() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("notify-abstract");
        let name = format!("vshm-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let notify = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        conversation(&notify, &format!("@{name}"), &dir);
    });
}
