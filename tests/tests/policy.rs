//! Access control and quotas end to end: a real vshmd started with `--config`, real peers
//! connecting through its sockets, and the configurations it must refuse.

use std::ffi::OsStr;
use std::time::Duration;

use vshm::CreateOptions;
use vshm_format::Status;
use vshm_tests::{stderr, stdout, vshmd_output, watchdog, write_config, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

fn status_of<T>(r: Result<T, vshm::Error>) -> Status {
    match r {
        Ok(_) => Status::Success,
        Err(e) => e.status(),
    }
}

/// The status document's entry of the peer with id `id`.
fn peer(b: &Backend, id: u16) -> serde_json::Value {
    b.status()["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == id && p["connected"] == true))
        .cloned()
        .unwrap_or_else(|| panic!("peer {id} is not in the status document"))
}

const TWO_SOCKETS: &str = r#"
[region]
socket = "{dir}/vshm.sock"
size = "4M"
policy = "narrow"

[[region.listen]]
name = "wide"
path = "{dir}/wide.sock"
mode = "600"
group = {gid}
policy = "unrestricted"

[policy.narrow]
create = ["ok/*"]
"#;

#[test]
fn a_peer_denied_create_by_pattern_gets_access_denied_and_a_peer_on_another_socket_is_unaffected() {
    watchdog(LIMIT, || {
        // SAFETY: getgid cannot fail and touches no memory.
        let gid = unsafe { libc::getgid() };
        let toml = TWO_SOCKETS.replace("{gid}", &gid.to_string());
        let b = Backend::start_with_config(&toml, &[]);
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(b.dir().join("wide.sock")).expect("the second socket");
        assert_eq!(
            (meta.permissions().mode() & 0o777, meta.gid()),
            (0o600, gid)
        );
        let narrow = b.connect();
        let wide = b.connect_to(&b.dir().join("wide.sock"));
        let opts = CreateOptions::new(4096);
        assert_eq!(
            status_of(narrow.create(Some("bad/x"), &opts)),
            Status::AccessDenied
        );
        let _ok = narrow.create(Some("ok/x"), &opts).expect("allowed name");
        let _theirs = wide
            .create(Some("bad/x"), &opts)
            .expect("the other socket's policy allows it");
        let n = peer(&b, narrow.peer_id().raw());
        assert_eq!(
            (n["policy"].as_str(), n["denials"].as_u64()),
            (Some("narrow"), Some(1))
        );
        let w = peer(&b, wide.peer_id().raw());
        assert_eq!(
            (w["policy"].as_str(), w["denials"].as_u64()),
            (Some("unrestricted"), Some(0))
        );
        let st = b.status();
        assert_eq!(st["counters"]["access_denied"], 1);
        assert_eq!(st["vshmd"]["listen"][0]["name"], "wide");
        // The operator's view shows who got which policy and was refused how often.
        let text = stdout(&b.vshmctl(&["status"]));
        assert!(text.contains("narrow") && text.contains("POLICY"), "{text}");
        let metrics = stdout(&b.vshmctl(&["metrics"]));
        assert!(
            metrics.contains("vshm_policy_denials_total{status=\"STATUS_ACCESS_DENIED\"} 1"),
            "{metrics}"
        );
    });
}

#[test]
fn a_byte_quota_answers_quota_exceeded_and_frees_up_after_delete() {
    watchdog(LIMIT, || {
        let b = Backend::start_with_config(
            r#"
            [region]
            socket = "{dir}/vshm.sock"
            size = "4M"
            policy = "small"
            [policy.small]
            max_bytes = "64K"
            max_objects = 3
            "#,
            &[],
        );
        let ns = b.connect();
        let (k32, k16, k4) = (
            CreateOptions::new(32 << 10),
            CreateOptions::new(16 << 10),
            CreateOptions::new(4 << 10),
        );
        // Persistent: it lives until deleted, not just until closed.
        let keep = CreateOptions {
            persistent: true,
            ..k32
        };
        let a = ns.create(Some("a"), &keep).expect("32K of 64K").0;
        let _b = ns.create(Some("b"), &k16).expect("48K of 64K");
        assert_eq!(status_of(ns.create(Some("c"), &k32)), Status::QuotaExceeded);
        let _d = ns.create(Some("d"), &k4).expect("52K, object 3 of 3");
        // The object quota: bytes would fit, the count does not.
        assert_eq!(status_of(ns.create(Some("e"), &k4)), Status::QuotaExceeded);
        // Closed, it still counts; deleted, it is destroyed and counts no more.
        drop(a);
        assert_eq!(status_of(ns.create(Some("c"), &k32)), Status::QuotaExceeded);
        ns.delete("a").expect("delete a");
        let freed = vshm_tests::wait_for(Duration::from_secs(10), || {
            b.status()["sections"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["name"] != "a"))
        });
        assert!(freed, "a was destroyed");
        let _c = ns
            .create(Some("c"), &k32)
            .expect("room again after the delete");
        assert_eq!(b.status()["counters"]["quota_exceeded"], 3);
    });
}

#[test]
fn a_request_rate_limit_refuses_past_the_burst_and_another_vm_keeps_its_own_budget() {
    watchdog(LIMIT, || {
        // 0.001/s: no token comes back within the test, so the count is exact.
        let b = Backend::start_with_config(
            r#"
            [region]
            socket = "{dir}/vshm.sock"
            size = "4M"
            policy = "slow"
            [[region.listen]]
            name = "other"
            path = "{dir}/other.sock"
            [policy.slow]
            max_request_rate = 0.001
            request_burst = 3
            "#,
            &[],
        );
        let ns = b.connect();
        let opts = CreateOptions::new(4096);
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(
                ns.create(Some(&format!("s{i}")), &opts)
                    .expect("within the burst"),
            );
        }
        assert_eq!(
            status_of(ns.create(Some("s3"), &opts)),
            Status::QuotaExceeded
        );
        // Same policy, another socket: another VM, another bucket.
        let other = b.connect_to(&b.dir().join("other.sock"));
        let _o = other.create(Some("o"), &opts).expect("its own budget");
        assert_eq!(peer(&b, ns.peer_id().raw())["denials"], 1);
        assert_eq!(peer(&b, other.peer_id().raw())["denials"], 0);
    });
}

#[test]
fn deleting_a_section_another_vm_created_is_denied_without_delete_others() {
    watchdog(LIMIT, || {
        let b = Backend::start_with_config(
            r#"
            [region]
            socket = "{dir}/vshm.sock"
            size = "4M"
            policy = "member"
            [[region.listen]]
            name = "b"
            path = "{dir}/b.sock"
            [[region.listen]]
            name = "admin"
            path = "{dir}/admin.sock"
            policy = "admin"
            [policy.member]
            create = ["shared/*"]
            delete = ["shared/*"]
            [policy.admin]
            delete_others = ["shared/*"]
            "#,
            &[],
        );
        let a = b.connect();
        let other = b.connect_to(&b.dir().join("b.sock"));
        let opts = CreateOptions {
            persistent: true,
            ..CreateOptions::new(4096)
        };
        drop(a.create(Some("shared/one"), &opts).expect("create"));
        drop(a.create(Some("shared/two"), &opts).expect("create"));
        assert_eq!(status_of(other.delete("shared/one")), Status::AccessDenied);
        assert!(b.section("shared/one").is_some(), "still there");
        // Its creator may; an admin policy may delete anyone's.
        a.delete("shared/one").expect("own section");
        let admin = b.connect_to(&b.dir().join("admin.sock"));
        admin.delete("shared/two").expect("delete_others");
        assert_eq!(peer(&b, other.peer_id().raw())["denials"], 1);
    });
}

#[test]
fn a_rule_on_the_process_name_gives_the_vshm_tool_its_own_policy() {
    watchdog(LIMIT, || {
        let b = Backend::start_with_config(
            r#"
            [region]
            socket = "{dir}/vshm.sock"
            size = "4M"
            [[region.rule]]
            name = "vshm"
            policy = "readonly"
            [policy.readonly]
            create = []
            "#,
            &[],
        );
        let out = b.vshm(&["create", "x", "--max", "4K"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("STATUS_ACCESS_DENIED")
                || stdout(&out).contains("STATUS_ACCESS_DENIED"),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        // This test process is not called vshm: the main socket's default applies.
        let ns = b.connect();
        ns.create(Some("x"), &CreateOptions::new(4096))
            .expect("unrestricted");
    });
}

#[test]
fn bad_config_files_exit_non_zero_naming_the_key_and_leave_no_socket_behind() {
    watchdog(LIMIT, || {
        let cases: &[(&str, &str)] = &[
            (
                "[region]\nsocket = \"{dir}/vshm.sock\"\nsizee = \"4M\"\n",
                "sizee",
            ),
            (
                "[region]\nsocket = \"{dir}/vshm.sock\"\npolicy = \"nope\"\n",
                "vshm.toml:3: region.policy: no policy \"nope\"",
            ),
            (
                "[region]\nsocket = \"{dir}/vshm.sock\"\nsize = \"3M\"\n",
                "vshm.toml:3: region.size",
            ),
            (
                "[region]\nsocket = \"{dir}/vshm.sock\"\n[policy.p]\nmax_objects = -1\n",
                "max_objects",
            ),
            // Valid, but the second socket cannot be bound (a directory is in the way):
            // the first one, already bound, must be gone again.
            (
                "[region]\nsocket = \"{dir}/vshm.sock\"\nsize = \"4M\"\n[[region.listen]]\nname = \"x\"\npath = \"{dir}/in-the-way\"\n",
                "in-the-way",
            ),
        ];
        for (toml, want) in cases {
            let dir = TempDir::new("badconf");
            std::fs::create_dir(dir.path().join("in-the-way")).expect("mkdir");
            let file = write_config(&dir, toml);
            let out = vshmd_output(&[OsStr::new("--config"), file.as_os_str()]);
            let err = stderr(&out);
            assert!(!out.status.success(), "{toml}: vshmd accepted it");
            assert!(err.contains(want), "{toml}\n  said: {err}\n  want: {want}");
            assert!(
                !dir.path().join("vshm.sock").exists()
                    && !dir.path().join("vshm.sock.ctl").exists(),
                "{toml}: sockets left behind"
            );
        }
    });
}

#[test]
fn command_line_options_override_the_config_and_conflicting_paths_are_refused() {
    watchdog(LIMIT, || {
        let toml = r#"
            [region]
            socket = "{dir}/vshm.sock"
            size = "4M"
            max_peers = 4
            [[region.listen]]
            name = "x"
            path = "{dir}/x.sock"
            "#;
        let b = Backend::start_with_config(toml, &["--size", "8M", "--max-peers", "3"]);
        let st = b.status();
        assert_eq!(st["region"]["size"], 8 << 20);
        assert_eq!(st["region"]["max_peers"], 3);
        drop(b);
        // --socket onto the path of one of the file's sockets: an error naming both.
        let dir = TempDir::new("conflict");
        let file = write_config(&dir, toml);
        let x = dir.path().join("x.sock");
        let out = vshmd_output(&[
            OsStr::new("--config"),
            file.as_os_str(),
            OsStr::new("--socket"),
            x.as_os_str(),
        ]);
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(
            err.contains("--socket") && err.contains("region.listen[0].path"),
            "{err}"
        );
        assert!(!x.exists());
    });
}
