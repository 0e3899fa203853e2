//! Several regions from one config file, end to end: a real vshmd serving two regions,
//! real host peers in each. Nothing of one region is visible in the other (namespace,
//! memfd, peers), a signal stops every region's loop and removes every socket, and a
//! region that cannot start takes the ones before it down again.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use vshm::host::HostTransport;
use vshm::{CreateOptions, Namespace};
use vshm_control::{request, ControlRequest};
use vshm_format::Status;
use vshm_tests::{
    bin, command, stderr, stdout, vshmd_output, wait_for, watchdog, write_config, Backend, TempDir,
};

const LIMIT: Duration = Duration::from_secs(120);

/// Region "a" on the harness's main socket (so `Backend` waits for it), region "b" beside
/// it; each with a further listening socket.
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
[[region.listen]]
name = "lb"
path = "{dir}/b-listen.sock"
"#;

/// A peer of the region on `socket`, and (a duplicate of) the memfd vshmd handed it.
fn peer(socket: &Path) -> (Namespace<HostTransport>, std::fs::File) {
    let t = HostTransport::connect(socket).expect("connect to vshmd");
    let memfd = t.memfd().try_clone().expect("dup the memfd");
    (Namespace::attach(t).expect("attach"), memfd)
}

/// The status document of the region whose control socket is `control`.
fn status(control: &Path) -> Value {
    request(control, &ControlRequest::Status).expect("status")
}

/// The ids of the connected peers in a status document.
fn connected(doc: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = doc["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["connected"] == true)
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

/// Whether `needle` occurs anywhere in the region behind `memfd` (read as a file).
fn region_contains(memfd: &std::fs::File, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let len = memfd.metadata().expect("stat the memfd").len();
    let mut buf = vec![0u8; usize::try_from(len).expect("size")];
    memfd.read_exact_at(&mut buf, 0).expect("read the region");
    buf.windows(needle.len()).any(|w| w == needle)
}

/// The socket files left in `dir`.
fn sockets_in(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_section_created_in_one_region_is_not_found_by_a_peer_of_the_other_and_lives_in_another_memfd()
{
    watchdog(LIMIT, || {
        let b = Backend::start_with_config(TWO_REGIONS, &[]);
        let (in_a, memfd_a) = peer(&b.socket);
        let (in_b, memfd_b) = peer(&b.dir().join("b.sock"));
        let marker = b"only-in-region-a:7f3c9e1d";
        let (section, _) = in_a
            .create(Some("shared/x"), &CreateOptions::new(4096))
            .expect("create in a");
        section.write_at(0, marker).expect("write in a");
        // Region b's namespace has no such name; a create there is a new, separate object.
        assert_eq!(
            in_b.open("shared/x").err().map(|e| e.status()),
            Some(Status::ObjectNameNotFound)
        );
        // Two different files, and the bytes written in a are nowhere in b's.
        let (ma, mb) = (
            memfd_a.metadata().expect("stat a"),
            memfd_b.metadata().expect("stat b"),
        );
        assert_ne!((ma.dev(), ma.ino()), (mb.dev(), mb.ino()));
        assert!(region_contains(&memfd_a, marker), "the marker is in a");
        assert!(
            !region_contains(&memfd_b, marker),
            "the marker leaked into b"
        );
        // A peer on a's further socket sees a's section; one on b's does not.
        let (in_la, _) = peer(&b.dir().join("a-listen.sock"));
        let mut got = [0u8; 25];
        in_la
            .open("shared/x")
            .expect("a's other socket serves a")
            .read_at(0, &mut got)
            .expect("read");
        assert_eq!(&got, marker);
        let (in_lb, _) = peer(&b.dir().join("b-listen.sock"));
        assert!(in_lb.open("shared/x").is_err(), "b's other socket serves b");
        // Each region's own document lists only its own sections.
        let has = |doc: &Value| {
            doc["sections"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "shared/x"))
        };
        assert!(has(&b.status()));
        assert!(!has(&status(&b.dir().join("b.sock.ctl"))));
    });
}

#[test]
fn each_regions_status_shows_its_name_and_only_its_own_peers() {
    watchdog(LIMIT, || {
        let b = Backend::start_with_config(TWO_REGIONS, &[]);
        let b_ctl = b.dir().join("b.sock.ctl");
        let (a1, _) = peer(&b.socket);
        let (a2, _) = peer(&b.dir().join("a-listen.sock"));
        let (b1, _) = peer(&b.dir().join("b.sock"));
        let mut want_a = vec![u64::from(a1.peer_id().raw()), u64::from(a2.peer_id().raw())];
        want_a.sort_unstable();
        let (doc_a, doc_b) = (b.status(), status(&b_ctl));
        assert_eq!(connected(&doc_a), want_a);
        assert_eq!(connected(&doc_b), [u64::from(b1.peer_id().raw())]);
        assert_eq!(
            (&doc_a["region"]["name"], &doc_b["region"]["name"]),
            (&Value::from("a"), &Value::from("b"))
        );
        // The same process, one vshmd: two regions with their own identity.
        assert_eq!(doc_a["vshmd"]["pid"], doc_b["vshmd"]["pid"]);
        assert_ne!(doc_a["vshmd"]["socket"], doc_b["vshmd"]["socket"]);
        // vshmctl's text view names the region it talks to.
        let out = command(&bin("vshmctl"))
            .arg("--control")
            .arg(&b_ctl)
            .arg("status")
            .output()
            .expect("run vshmctl");
        let text = stdout(&out);
        assert!(out.status.success() && text.contains("region b,"), "{text}");
    });
}

#[test]
fn sigterm_stops_every_regions_loop_and_removes_every_socket() {
    watchdog(LIMIT, || {
        // Started by hand, not through `Backend`: its directory must outlive the process.
        let dir = TempDir::new("sigterm");
        let file = write_config(&dir, TWO_REGIONS);
        let mut vshmd = command(&bin("vshmd"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn vshmd");
        let controls = [
            dir.path().join("vshm.sock.ctl"),
            dir.path().join("b.sock.ctl"),
        ];
        let up = wait_for(Duration::from_secs(10), || {
            controls
                .iter()
                .all(|c| request(c, &ControlRequest::Status).is_ok())
        });
        assert!(up, "both regions answer");
        let mut found = sockets_in(dir.path());
        found.sort();
        assert_eq!(
            found,
            [
                "a-listen.sock",
                "b-listen.sock",
                "b.sock",
                "b.sock.ctl",
                "b.sock.ctl.handoff",
                "vshm.sock",
                "vshm.sock.ctl",
                "vshm.sock.ctl.handoff"
            ]
        );
        // A peer in each region: both loops are serving when the signal comes.
        let (_a, _) = peer(&dir.path().join("vshm.sock"));
        let (_b, _) = peer(&dir.path().join("b.sock"));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(vshmd.id() as libc::pid_t, libc::SIGTERM) };
        let status = vshmd.wait().expect("wait vshmd");
        assert!(status.success(), "vshmd exited with {status}");
        assert_eq!(sockets_in(dir.path()), Vec::<String>::new());
    });
}

#[test]
fn a_second_region_that_cannot_start_leaves_no_socket_of_the_first_and_exits_non_zero_naming_it() {
    watchdog(LIMIT, || {
        let cases: &[(&str, &[&str], &[&str])] = &[
            // Valid on paper; region b's socket path is taken by a directory.
            (
                "[[region]]\nname = \"a\"\nsocket = \"{dir}/vshm.sock\"\nsize = \"4M\"\n\
                 [[region.listen]]\nname = \"l\"\npath = \"{dir}/a-listen.sock\"\n\
                 [[region]]\nname = \"b\"\nsocket = \"{dir}/in-the-way\"\nsize = \"4M\"\n",
                &[],
                &["region b:", "in-the-way"],
            ),
            // Checked before anything is created: both places named.
            (
                "[[region]]\nname = \"a\"\nsocket = \"{dir}/vshm.sock\"\n\
                 [[region]]\nname = \"b\"\nsocket = \"{dir}/vshm.sock\"\n",
                &[],
                &["region[0].socket", "region[1].socket", "vshm.toml:6"],
            ),
            // An option would be ambiguous between the regions.
            (
                "[[region]]\nname = \"a\"\nsocket = \"{dir}/vshm.sock\"\n\
                 [[region]]\nname = \"b\"\nsocket = \"{dir}/b.sock\"\n",
                &["--size", "8M"],
                &["--size", "2 regions"],
            ),
        ];
        for (toml, extra, wants) in cases {
            let dir = TempDir::new("badregions");
            std::fs::create_dir(dir.path().join("in-the-way")).expect("mkdir");
            let file = write_config(&dir, toml);
            let mut args: Vec<&OsStr> = vec![OsStr::new("--config"), file.as_os_str()];
            args.extend(extra.iter().map(OsStr::new));
            let out = vshmd_output(&args);
            let err = stderr(&out);
            assert!(!out.status.success(), "{toml}: vshmd accepted it");
            for want in *wants {
                assert!(err.contains(want), "{toml}\n  said: {err}\n  want: {want}");
            }
            assert_eq!(
                sockets_in(dir.path()),
                Vec::<String>::new(),
                "{toml}: sockets left behind"
            );
        }
    });
}
