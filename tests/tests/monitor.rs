//! vshmctl against a real vshmd with several host-process peers: the status document,
//! the event stream, metrics (HTTP and CLI), and admin commands with their permissions.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vshm_tests::{bin, command, kill9, release, stderr, stdout, wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn status_describes_peers_and_sections_with_the_documented_fields() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        assert!(b
            .vshm(&[
                "create",
                "one",
                "--max",
                "1M",
                "--initial",
                "4K",
                "--persistent"
            ])
            .status
            .success());
        assert!(b
            .vshm(&["create", "two", "--max", "64K", "--persistent"])
            .status
            .success());
        let holder = b.vshm_holding(&["hold", "one", "two"]);
        let out = b.vshmctl(&["status", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
        for field in [
            "pid",
            "socket",
            "control",
            "vectors",
            "qemu_args",
            "started",
            "uptime_secs",
        ] {
            assert!(!doc["vshmd"][field].is_null(), "vshmd.{field}");
        }
        for field in [
            "size",
            "heap_size",
            "used",
            "free",
            "largest_free",
            "free_extents",
            "fragmentation",
            "resident",
            "max_peers",
            "max_objects",
            "epoch",
        ] {
            assert!(!doc["region"][field].is_null(), "region.{field}");
        }
        assert_eq!(doc["region"]["used"], (1 << 20) + (64 << 10));
        let me = doc["peers"]
            .as_array()
            .and_then(|p| {
                p.iter()
                    .find(|p| p["pid"].as_u64() == Some(u64::from(holder.id())))
            })
            .expect("the holder is listed with its pid");
        assert_eq!(me["connected"], true);
        assert_eq!(
            me["label"], "vshm",
            "label is the process name when there is no -name"
        );
        assert_eq!(me["handles"], 2);
        assert_eq!(me["bytes_held"], (1 << 20) + (64 << 10));
        assert!(me["connected_since"].as_u64().is_some() && me["slot"].as_u64().is_some());
        let one = b.section("one").expect("one");
        for field in [
            "name",
            "slot",
            "generation",
            "kind",
            "offset",
            "size",
            "max_size",
            "persistent",
            "deleted",
            "refs",
            "refs_by_peer",
            "creator",
            "created",
            "age_secs",
        ] {
            assert!(!one[field].is_null(), "sections[].{field}");
        }
        assert_eq!(one["kind"], "section");
        assert_eq!(one["size"], 4096);
        assert_eq!(one["refs_by_peer"], serde_json::json!([[me["id"], 1]]));
        let human = stdout(&b.vshmctl(&["status"]));
        assert!(
            human.contains("one") && human.contains("two") && human.contains("vshm"),
            "{human}"
        );
        release(holder);
    });
}

#[test]
fn watch_streams_what_happens_as_json_lines() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let mut watcher = command(&bin("vshmctl"))
            .arg("--control")
            .arg(&b.control)
            .args(["watch", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("vshmctl watch");
        let lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Give the subscription a moment to register before acting.
        assert!(wait_for(Duration::from_secs(5), || {
            b.status()["counters"]["events"].as_u64().is_some()
        }));
        std::thread::sleep(Duration::from_millis(200));
        assert!(b
            .vshm(&[
                "create",
                "w",
                "--max",
                "64K",
                "--initial",
                "4K",
                "--persistent"
            ])
            .status
            .success());
        let mut holder = b.vshm_holding(&["hold", "w"]);
        std::thread::sleep(Duration::from_millis(400)); // the timer notices the open
        assert!(b.vshm(&["grow", "w", "64K"]).status.success());
        kill9(&mut holder);
        assert!(b.vshm(&["delete", "w"]).status.success());
        let mut kinds = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !kinds.contains(&"destroyed".to_string()) && std::time::Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                let e: Value = serde_json::from_str(&l).expect("one JSON object per line");
                assert!(
                    e["ts_ms"].as_u64().is_some_and(|t| t > 1_700_000_000_000),
                    "timestamped: {l}"
                );
                kinds.push(e["kind"].as_str().unwrap_or("?").to_string());
            }
        }
        for k in [
            "peer_connected",
            "created",
            "opened",
            "grown",
            "peer_gone",
            "reclaimed",
            "deleted",
            "destroyed",
        ] {
            assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
        }
        kill9(&mut watcher);
    });
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

#[test]
fn metrics_are_served_over_http_on_loopback_and_by_vshmctl() {
    watchdog(LIMIT, || {
        let port = 20000 + (std::process::id() % 20000);
        let addr = format!("127.0.0.1:{port}");
        let b = Backend::start(&["--size", "16M", "--metrics", &addr]);
        assert!(b
            .vshm(&["create", "m", "--max", "64K", "--persistent"])
            .status
            .success());
        assert!(!b.vshm(&["create", "m\\x", "--max", "64K"]).status.success());
        let http = http_get(&addr, "/metrics");
        assert!(http.starts_with("HTTP/1.1 200 OK"), "{http}");
        for needle in [
            "vshm_region_bytes 16777216",
            "vshm_heap_used_bytes 65536",
            "vshm_sections{state=\"live\"} 1",
            "vshm_requests_total{op=\"create\",status=\"STATUS_SUCCESS\"} 1",
            "vshm_request_duration_seconds_bucket{le=\"+Inf\"} 1",
            "vshm_request_duration_seconds_count 1",
            "# TYPE vshm_request_duration_seconds histogram",
            "vshm_doorbells_total",
            "vshm_reclaims_total",
        ] {
            assert!(http.contains(needle), "missing {needle:?} in\n{http}");
        }
        assert!(http_get(&addr, "/other").starts_with("HTTP/1.1 404"));
        let cli = b.vshmctl(&["metrics"]);
        assert!(cli.status.success(), "{}", stderr(&cli));
        assert!(
            stdout(&cli).contains("vshm_sections{state=\"live\"} 1"),
            "{}",
            stdout(&cli)
        );
    });
}

#[test]
fn metrics_refuse_a_non_loopback_address() {
    let out = command(&bin("vshmd"))
        .args([
            "--socket",
            "/tmp/vshm-never.sock",
            "--metrics",
            "0.0.0.0:9464",
        ])
        .output()
        .expect("vshmd");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    assert!(!std::path::Path::new("/tmp/vshm-never.sock").exists());
}

#[test]
fn disconnect_drops_a_peer_and_reclaims_what_it_held() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let holder = b.vshm_holding(&["create", "d", "--max", "64K", "--hold"]);
        let id = b
            .peer_of_pid(holder.id())
            .and_then(|p| p["id"].as_u64())
            .expect("holder id");
        let out = b.vshmctl(&["disconnect", &id.to_string()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            b.section("d").is_none(),
            "its only handle was reclaimed: destroyed"
        );
        let again = b.vshmctl(&["disconnect", &id.to_string()]);
        assert!(!again.status.success() && stderr(&again).contains("no connected peer"));
        drop(holder);
    });
}

#[test]
fn dump_has_the_header_and_the_authoritative_state() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        assert!(b
            .vshm(&["create", "x", "--max", "64K", "--persistent"])
            .status
            .success());
        let out = b.vshmctl(&["dump"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let d: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            d["superblock"]["magic"],
            format!("{:#018x}", u64::from_le_bytes(*b"VSHMAREA"))
        );
        assert_eq!(d["superblock"]["region_size"], 16 << 20);
        assert_eq!(d["objects"][0]["name"], "x");
        assert!(
            d["objects"][0]["lease"]
                .as_str()
                .is_some_and(|l| l.starts_with("0x4")),
            "KEEP set: {}",
            d["objects"][0]
        );
        assert!(d["heap"]["free_extents"]
            .as_array()
            .is_some_and(|e| !e.is_empty()));
        assert!(d["recent_events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "created")));
    });
}

#[test]
fn admin_commands_need_vshmds_own_user_while_status_does_not() {
    watchdog(LIMIT, || {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            // Switching users needs root; CI runs as root.
            return;
        }
        let b = Backend::start(&["--size", "16M", "--control-mode", "666"]);
        assert!(b
            .vshm(&["create", "keep", "--max", "64K", "--persistent"])
            .status
            .success());
        let as_nobody = |args: &[&str]| {
            Command::new("setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(bin("vshmctl"))
                .arg("--control")
                .arg(&b.control)
                .args(args)
                .output()
                .expect("setpriv (util-linux)")
        };
        let status = as_nobody(&["status", "--json"]);
        assert!(
            status.status.success(),
            "monitoring is allowed: {}",
            stderr(&status)
        );
        let del = as_nobody(&["delete", "keep"]);
        assert!(!del.status.success());
        assert!(
            stderr(&del).contains("STATUS_ACCESS_DENIED"),
            "{}",
            stderr(&del)
        );
        assert!(b.section("keep").is_some(), "nothing was deleted");
        assert_eq!(b.status()["counters"]["denials"], 1);
        for admin in [&["dump"][..], &["disconnect", "1"][..]] {
            assert!(
                stderr(&as_nobody(admin)).contains("STATUS_ACCESS_DENIED"),
                "{admin:?}"
            );
        }
        let ok = b.vshmctl(&["delete", "keep"]);
        assert!(ok.status.success(), "vshmd's own user may: {}", stderr(&ok));
    });
}

#[test]
fn the_control_socket_is_private_by_default() {
    use std::os::unix::fs::PermissionsExt;
    let b = Backend::start(&["--size", "16M"]);
    let mode = std::fs::metadata(&b.control)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn clients_that_trickle_or_stall_on_the_monitor_sockets_never_block_the_request_path() {
    // Before monitor connections were served without blocking, one metrics client sending
    // a byte every few hundred ms held vshmd for an hour; the watchdog catches a regression.
    watchdog(LIMIT, || {
        let port = 40000 + (std::process::id() % 20000);
        let addr = format!("127.0.0.1:{port}");
        let b = Backend::start(&["--size", "16M", "--metrics", &addr]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tricklers = Vec::new();
        for i in 0..4 {
            let stop = std::sync::Arc::clone(&stop);
            let (addr, ctl) = (addr.clone(), b.control.clone());
            tricklers.push(std::thread::spawn(move || {
                let mut tcp = TcpStream::connect(&addr).expect("metrics");
                let mut unix = std::os::unix::net::UnixStream::connect(&ctl).expect("control");
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 100 {
                    let _ = tcp.write_all(b"G");
                    let _ = unix.write_all(if i % 2 == 0 { b"{" } else { b" " });
                    std::thread::sleep(Duration::from_millis(300));
                    n += 1;
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(500));
        for round in 0..10 {
            let name = format!("r{round}");
            let out = b.vshm(&["create", &name, "--max", "4K", "--persistent"]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(
                b.section(&name).is_some(),
                "status answers while tricklers hang on"
            );
        }
        let http = http_get(&addr, "/metrics");
        assert!(http.contains("vshm_sections{state=\"live\"} 10"), "{http}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tricklers {
            t.join().expect("trickler");
        }
    });
}

#[test]
fn a_request_arriving_in_pieces_is_still_answered() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let mut s = std::os::unix::net::UnixStream::connect(&b.control).expect("control");
        for piece in [&b"{\"cmd\""[..], b":\"sta", b"tus\"}\n"] {
            s.write_all(piece).expect("write");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("answer");
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["ok"], true);
        assert_eq!(v["result"]["region"]["size"], 16 << 20);
    });
}

#[test]
fn refused_connections_are_counted_reported_and_exported() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M", "--max-peers", "1"]);
        let holder = b.vshm_holding(&["create", "only", "--max", "4K", "--hold"]);
        for _ in 0..3 {
            assert!(
                !b.vshm(&["list"]).status.success(),
                "no slot left for a second peer"
            );
        }
        let st = b.status();
        assert_eq!(st["counters"]["refused"], 3);
        let dump: Value = serde_json::from_slice(&b.vshmctl(&["dump"]).stdout).expect("json");
        let refusals = dump["recent_events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| {
                e["kind"] == "error" && e["detail"].as_str().is_some_and(|d| d.contains("refused"))
            })
            .count();
        assert!(
            refusals >= 1,
            "reported (at most once a second): {}",
            dump["recent_events"]
        );
        assert!(stdout(&b.vshmctl(&["metrics"])).contains("vshm_refused_connections_total 3"));
        release(holder);
    });
}
