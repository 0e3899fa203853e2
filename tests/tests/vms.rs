//! End-to-end with real VMs: vshmd and three QEMU guests (the Debian cloud kernel under TCG,
//! or KVM where the host has hardware virtualisation) booted concurrently, driven through
//! each guest's command agent, with the `vshm` CLI inside the guests using the ivshmem PCI
//! device. The scenarios run in order on the same guests; the last one kills a VM. A guest
//! attached before a `vshmd --takeover` works on through the new vshmd (its own test). The
//! tests run one at a time: TCG guests of several at once starve each other on 2 vCPUs.

use std::time::Duration;

use serde_json::Value;
use vshm_tests::{
    guest_hold, guest_ok, guest_peer_id, guest_release, guest_sh, wait_for, watchdog, Backend,
};

fn refs_of(b: &Backend, name: &str) -> Option<(u64, Vec<(u64, u64)>)> {
    let s = b.section(name)?;
    let by_peer = s["refs_by_peer"]
        .as_array()?
        .iter()
        .map(|p| (p[0].as_u64().unwrap_or(0), p[1].as_u64().unwrap_or(0)))
        .collect();
    Some((s["refs"].as_u64()?, by_peer))
}

fn peer_connected(b: &Backend, id: u64) -> bool {
    b.status()["peers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["id"] == id && p["connected"] == true))
}

#[test]
fn three_guests_share_sections_through_vshmd() {
    watchdog(Duration::from_secs(600), || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "64M"]);
        let mut vms = vshm_tests::boot_guests(&b, &["a", "b", "c"]);
        let mut c = vms.pop().expect("c");
        let mut bb = vms.pop().expect("b");
        let mut a = vms.pop().expect("a");
        let (id_a, id_b, id_c) = (
            guest_peer_id(&mut a),
            guest_peer_id(&mut bb),
            guest_peer_id(&mut c),
        );
        assert!(
            id_a != id_b && id_b != id_c && id_a != id_c,
            "distinct peer ids"
        );
        let st = b.status();
        let qemu_pids: Vec<u64> = st["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect();
        for vm in [&a, &bb, &c] {
            assert!(
                qemu_pids.contains(&u64::from(vm.pid())),
                "QEMU {} is a peer: {st}",
                vm.pid()
            );
        }
        let labels: Vec<&str> = st["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["label"].as_str())
            .collect();
        for name in ["a", "b", "c"] {
            assert!(
                labels.contains(&name),
                "peers are labelled with QEMU's -name: {labels:?}"
            );
        }

        // 1. A creates and writes; B reads the same bytes; C lists it; the host sees refs.
        guest_ok(
            &mut a,
            "vshm create shared --max 1M --initial 64K --persistent",
        );
        guest_ok(
            &mut a,
            "vshm write shared --offset 4096 --data PATTERN-0123456789",
        );
        assert_eq!(
            guest_ok(&mut bb, "vshm read shared --offset 4096 --len 18"),
            "PATTERN-0123456789"
        );
        let list: Value =
            serde_json::from_str(&guest_ok(&mut c, "vshm list --json")).expect("json");
        assert!(list.as_array().is_some_and(|l| l
            .iter()
            .any(|s| s["name"] == "shared" && s["persistent"] == true)));
        guest_hold(&mut a, "a1", "hold shared");
        guest_hold(&mut bb, "b1", "hold shared");
        let (refs, by_peer) = refs_of(&b, "shared").expect("status lists shared");
        assert_eq!(refs, 2);
        assert!(
            by_peer.contains(&(id_a, 1)) && by_peer.contains(&(id_b, 1)),
            "refs per peer: {by_peer:?}"
        );
        guest_release(&mut a, "a1");
        guest_release(&mut bb, "b1");
        assert_eq!(refs_of(&b, "shared").map(|r| r.0), Some(0));

        // 2. A non-persistent section outlives its creator's close, dies at the last close,
        //    and its memory is punched out on the host.
        let before = b.memfd_resident();
        guest_hold(&mut a, "a2", "create temp --max 4M --hold");
        guest_ok(&mut a, "head -c 4194304 /dev/zero | tr '\\000' 'x' > /tmp/x && vshm write temp --file /tmp/x && rm /tmp/x");
        let filled = b.memfd_resident();
        assert!(
            filled >= before + (4 << 20),
            "4 MiB became resident ({before} -> {filled})"
        );
        guest_hold(&mut bb, "b2", "hold temp");
        guest_release(&mut a, "a2");
        assert_eq!(
            refs_of(&b, "temp").map(|r| r.0),
            Some(1),
            "B keeps it alive"
        );
        assert_eq!(
            guest_ok(&mut bb, "vshm read temp --offset 4194300 --len 4"),
            "xxxx"
        );
        guest_release(&mut bb, "b2");
        assert!(
            wait_for(Duration::from_secs(1), || b.section("temp").is_none()),
            "destroyed at B's close"
        );
        let after = b.memfd_resident();
        assert!(
            after + (4 << 20) <= filled,
            "its pages went back to the host ({filled} -> {after})"
        );
        let gone = guest_sh(&mut c, "vshm open temp");
        assert!(
            !gone.success() && gone.text.contains("STATUS_OBJECT_NAME_NOT_FOUND"),
            "{}",
            gone.text
        );

        // 4. Name rules inside a guest.
        let n260 = "n".repeat(260);
        let n261 = "n".repeat(261);
        assert!(guest_ok(
            &mut bb,
            &format!("vshm create {n260} --max 4K --persistent")
        )
        .starts_with("STATUS_SUCCESS"));
        let long = guest_sh(
            &mut bb,
            &format!("vshm create {n261} --max 4K --persistent"),
        );
        assert!(
            !long.success() && long.text.contains("STATUS_OBJECT_NAME_INVALID"),
            "{}",
            long.text
        );
        let bs = guest_sh(&mut bb, "vshm create 'a\\b' --max 4K --persistent");
        assert!(
            !bs.success() && bs.text.contains("STATUS_OBJECT_NAME_INVALID"),
            "{}",
            bs.text
        );
        assert!(guest_ok(&mut bb, "vshm create Case --max 4K --persistent")
            .starts_with("STATUS_SUCCESS"));
        assert!(
            guest_ok(&mut c, "vshm create case --max 4K --persistent")
                .starts_with("STATUS_SUCCESS"),
            "names that differ by case are two sections"
        );
        let missing = guest_sh(&mut c, "vshm open nosuch");
        assert!(
            !missing.success() && missing.text.contains("STATUS_OBJECT_NAME_NOT_FOUND"),
            "{}",
            missing.text
        );

        // 5. A host process and a guest share one section both ways.
        let host = b.vshm(&["create", "bridge", "--max", "64K", "--persistent"]);
        assert!(host.status.success());
        assert!(b
            .vshm(&["write", "bridge", "--data", "from-host"])
            .status
            .success());
        assert_eq!(guest_ok(&mut c, "vshm read bridge --len 9"), "from-host");
        guest_ok(&mut c, "vshm write bridge --offset 100 --data from-guest");
        assert_eq!(
            b.vshm(&["read", "bridge", "--offset", "100", "--len", "10"])
                .stdout,
            b"from-guest"
        );

        // 3. A holds a handle; A's QEMU is killed; the host reclaims within 1 s; B and C go on.
        guest_hold(&mut a, "a3", "hold shared");
        assert_eq!(refs_of(&b, "shared").map(|r| r.0), Some(1));
        a.kill();
        assert!(
            wait_for(Duration::from_secs(1), || !peer_connected(&b, id_a)
                && refs_of(&b, "shared").is_some_and(|r| r.0 == 0)),
            "A gone and its refs reclaimed within 1 s: {}",
            b.status()
        );
        guest_ok(&mut bb, "vshm write shared --data still-working");
        assert_eq!(
            guest_ok(&mut c, "vshm read shared --len 13"),
            "still-working"
        );
        assert!(peer_connected(&b, id_b) && peer_connected(&b, id_c));
    });
}

#[test]
fn a_guest_attached_before_a_takeover_reads_its_data_and_creates_through_the_new_vshmd() {
    watchdog(Duration::from_secs(300), || {
        let _one = vshm_tests::serial();
        let mut b = Backend::start(&["--size", "16M"]);
        let mut vms = vshm_tests::boot_guests(&b, &["g"]);
        let mut g = vms.pop().expect("g");
        guest_ok(&mut g, "vshm create kept --max 64K --persistent");
        guest_ok(&mut g, "vshm write kept --offset 8 --data BEFORE-TAKEOVER");
        let id = guest_peer_id(&mut g);

        b.take_over();

        let doorbells = |b: &Backend| b.status()["counters"]["doorbells"].as_u64();
        let rung = doorbells(&b).expect("doorbells");
        assert!(peer_connected(&b, id), "the guest is still a peer");
        assert_eq!(
            guest_ok(&mut g, "vshm read kept --offset 8 --len 15"),
            "BEFORE-TAKEOVER"
        );
        guest_ok(&mut g, "vshm create after --max 64K --persistent");
        assert!(
            doorbells(&b).expect("doorbells") > rung,
            "the guest's ring reached the new vshmd"
        );
        assert!(
            b.section("after").is_some(),
            "created through the new vshmd"
        );
        // A host peer that arrives after the takeover shares it with the guest.
        let h = b.connect();
        let s = h.open("after").expect("open");
        s.write_at(0, b"FROM-THE-HOST").expect("write");
        assert_eq!(
            guest_ok(&mut g, "vshm read after --offset 0 --len 13"),
            "FROM-THE-HOST"
        );
        s.close().expect("close");
        guest_ok(&mut g, "vshm delete after");
        assert!(wait_for(Duration::from_secs(5), || b
            .section("after")
            .is_none()));
    });
}

#[test]
fn a_guest_attached_before_vshmd_is_killed_reads_its_data_and_creates_through_the_restarted_one() {
    use vshm_tests::supervisor::Supervised;
    watchdog(Duration::from_secs(300), || {
        let _one = vshm_tests::serial();
        let mut s = Supervised::start(&["--size", "16M"]);
        let mut vms = vshm_tests::boot_guests_on(&s.socket, s.dir(), &["gk"]);
        let mut g = vms.pop().expect("gk");
        guest_ok(&mut g, "vshm create kept --max 64K --persistent");
        guest_ok(&mut g, "vshm write kept --offset 8 --data BEFORE-THE-CRASH");
        let id = guest_peer_id(&mut g);

        s.kill9();
        s.restart();

        let connected = s.status()["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["id"] == id && p["connected"] == true));
        assert!(connected, "the guest is still a peer: {}", s.status());
        assert_eq!(
            guest_ok(&mut g, "vshm read kept --offset 8 --len 16"),
            "BEFORE-THE-CRASH"
        );
        guest_ok(&mut g, "vshm create after --max 64K --persistent");
        // A host peer that arrives after the restart shares it with the guest.
        let h = s.connect();
        let sec = h
            .open("after")
            .expect("created through the restarted vshmd");
        sec.write_at(0, b"FROM-THE-HOST").expect("write");
        assert_eq!(
            guest_ok(&mut g, "vshm read after --offset 0 --len 13"),
            "FROM-THE-HOST"
        );
        sec.close().expect("close");
        guest_ok(&mut g, "vshm delete after");
        assert!(wait_for(Duration::from_secs(5), || h
            .open("after")
            .is_err()));
    });
}

/// A command that never returns holds the guest's agent (it runs one command at a time), so
/// a timeout alone cannot tell a stuck command from a stuck guest — the "60 s agent
/// timeout" flakes left nothing to read. The timeout's report now carries what the guest's
/// diagnostic port says: every process, its state and wait channel.
#[test]
fn a_command_that_never_returns_times_out_with_where_the_guests_processes_wait() {
    watchdog(Duration::from_secs(300), || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "4M"]);
        let mut vms = vshm_tests::boot_guests(&b, &["stuck"]);
        let g = vms.first_mut().expect("a guest");
        let e = g
            .run("sleep 1000", Duration::from_secs(2))
            .expect_err("`sleep 1000` cannot finish in 2 s");
        let report = e.to_string();
        assert!(
            matches!(e, vshm_images::VmError::Timeout { .. }),
            "not a timeout: {report}"
        );
        assert!(
            report.contains("] in ") && report.contains("sleep 1000"),
            "the timeout does not say where the stuck command waits:\n{report}"
        );
        assert!(
            report.contains("--- dmesg"),
            "the diagnostic port's answer is cut short:\n{report}"
        );
    });
}
