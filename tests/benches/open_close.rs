//! What isolation costs: opening and closing a section by name, for a peer on the ivshmem
//! socket (a hold in the shared header, no round trip) and for one on the vshm device (an
//! OPEN and a CLOSE request, each a SHMEM_MAP/UNMAP). Prints µs per open+close pair:
//! `cargo build --release -p vshm-backend --bins && cargo bench -p vshm-tests --bench
//! open_close` (a bench finds vshmd in target/release, as a test does in target/debug).

use std::time::{Duration, Instant};

use vshm::host::vhost_user::VhostUserTransport;
use vshm::{CreateOptions, Device, Namespace, Transport};
use vshm_tests::{wait_for, Backend};

const ROUNDS: u32 = 2000;

fn per_pair<T: Transport>(ns: &Namespace<T>) -> Duration {
    // Warm up (first maps, page tables), then measure.
    for _ in 0..100 {
        drop(ns.open("bench/s").expect("open"));
    }
    let started = Instant::now();
    for _ in 0..ROUNDS {
        ns.open("bench/s").expect("open").close().expect("close");
    }
    started.elapsed() / ROUNDS
}

fn main() {
    let (b, vpath) = Backend::start_with_vhost_user(&["--size", "16M"]);
    assert!(
        wait_for(Duration::from_secs(10), || vpath.exists()),
        "vhost-user socket"
    );
    let host = b.connect();
    let (_keep, _) = host
        .create(Some("bench/s"), &CreateOptions::new(64 << 10))
        .expect("create");
    let header = per_pair(&b.connect());
    let dev = VhostUserTransport::connect(&vpath).expect("connect to the vshm device");
    let device = per_pair(&Namespace::attach(Device(dev)).expect("attach"));
    println!(
        "open+close of a 64 KiB section, {ROUNDS} rounds: ivshmem header {:.1} µs, vshm device {:.1} µs",
        header.as_secs_f64() * 1e6,
        device.as_secs_f64() * 1e6
    );
}
