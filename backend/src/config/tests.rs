//! Configuration tests: the example parses, options override keys, several regions share
//! the file's policies, and every kind of bad file is refused with the file, key and line.

use std::path::{Path, PathBuf};

use super::*;
use crate::policy::Identity;

fn parse(text: &str) -> Result<Vec<Config>, ConfigError> {
    resolve_text(&Options::default(), Path::new("t.toml"), text)
}

/// The only region of a resolved configuration.
fn one(regions: Vec<Config>) -> Config {
    assert_eq!(regions.len(), 1, "one region expected");
    regions.into_iter().next().expect("one region")
}

fn err(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

fn who(socket: &str, uid: u32, label: &str) -> Identity {
    Identity {
        socket: socket.into(),
        uid: Some(uid),
        gid: Some(uid),
        label: Some(label.into()),
    }
}

#[test]
fn the_example_configuration_parses_and_gives_each_vm_its_sockets_policy() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vshm.example.toml");
    let text = std::fs::read_to_string(&path).expect("docs/vshm.example.toml");
    let c = one(resolve_text(&Options::default(), &path, &text).expect("the example is valid"));
    assert_eq!(c.socket, PathBuf::from("/run/vshm/vshm.sock"));
    assert_eq!(c.control, PathBuf::from("/run/vshm/vshm.sock.ctl"));
    assert_eq!(c.size, 256 << 20);
    assert_eq!((c.socket_mode, c.control_mode), (0o660, 0o600));
    let names: Vec<(&str, u32, &str)> = c
        .listen
        .iter()
        .map(|l| (l.name.as_str(), l.mode, l.policy.as_str()))
        .collect();
    assert_eq!(names, [("web-1", 0o660, "web"), ("db-1", 0o660, "db")]);
    let web = c.policy.resolve(&who("web-1", 64055, "web-1"));
    assert_eq!(web.policy.name, "web");
    assert_eq!(web.policy.max_bytes, Some(64 << 20));
    assert!(!web.policy.delete_others.matches(Some("x")));
    let rate = web.policy.rate.expect("rate");
    assert_eq!((rate.per_sec, rate.burst), (1000.0, 2000.0));
    assert_eq!(
        c.policy.resolve(&who("main", 0, "vshm")).policy.name,
        "operator"
    );
    assert_eq!(
        c.policy.resolve(&who("main", 1000, "vshm")).policy.name,
        "host-tools"
    );
}

#[test]
fn without_a_file_the_options_and_defaults_are_what_vshmd_always_used() {
    let opts = Options {
        socket: Some("/tmp/s".into()),
        ..Options::default()
    };
    let c = one(resolve(&opts).expect("valid"));
    assert_eq!(c.name, DEFAULT_REGION_NAME);
    assert_eq!(c.control, PathBuf::from("/tmp/s.ctl"));
    assert_eq!(
        (c.size, c.max_peers, c.max_objects, c.vectors),
        (64 << 20, 16, 1024, 2)
    );
    assert_eq!((c.control_mode, c.socket_mode), (0o600, 0o660));
    assert_eq!(c.quarantine, std::time::Duration::from_secs(2));
    assert_eq!(c.linger, std::time::Duration::from_micros(50));
    assert!(c.listen.is_empty());
    assert_eq!(
        c.policy.resolve(&who("main", 1, "x")).policy.name,
        UNRESTRICTED
    );
    let none = resolve(&Options::default()).expect_err("no socket");
    assert!(none.to_string().contains("--socket is required"), "{none}");
}

#[test]
fn command_line_options_override_the_regions_keys_and_flags_only_turn_on() {
    let text = r#"
        [region]
        socket = "/tmp/file.sock"
        size = "4M"
        max_peers = 8
        lock = true
    "#;
    let opts = Options {
        socket: Some("/tmp/cli.sock".into()),
        size: Some(8 << 20),
        ..Options::default()
    };
    let c = one(resolve_text(&opts, Path::new("t.toml"), text).expect("valid"));
    assert_eq!(c.socket, PathBuf::from("/tmp/cli.sock"));
    // The control socket follows the socket actually used.
    assert_eq!(c.control, PathBuf::from("/tmp/cli.sock.ctl"));
    assert_eq!((c.size, c.max_peers), (8 << 20, 8));
    // max_objects' default follows the size actually used.
    assert_eq!(c.max_objects, default_max_objects(8 << 20));
    assert!(c.lock, "a flag not given leaves the key as it is");
}

#[test]
fn an_unknown_key_is_refused_naming_the_file_the_line_and_the_key() {
    let e = err("[region]\nsocket = \"/tmp/s\"\nsizee = \"64M\"\n");
    assert!(
        e.starts_with("t.toml: ") && e.contains("line 3") && e.contains("sizee"),
        "{e}"
    );
    let e = err("[region]\nsocket = \"/tmp/s\"\n[policy.p]\ncreat = [\"*\"]\n");
    assert!(e.contains("line 4") && e.contains("creat"), "{e}");
}

#[test]
fn bad_values_are_refused_with_their_key_and_line() {
    let cases: &[(&str, &str)] = &[
        ("[region]\nsocket = \"/s\"\nsize = \"63M\"\n", "t.toml:3: region.size"),
        ("[region]\nsocket = \"/s\"\nsize = \"lots\"\n", "line 3"),
        ("[region]\nsocket = \"/s\"\nmax_peers = 99\n", "t.toml:3: region.max_peers"),
        ("[region]\nsocket = \"/s\"\nsocket_mode = \"1777\"\n", "invalid mode"),
        (
            "[region]\nsocket = \"/s\"\nmetrics = \"0.0.0.0:1\"\n",
            "t.toml:3: region.metrics",
        ),
        (
            "[region]\nsocket = \"/s\"\nquarantine_ms = 600001\n",
            "t.toml:3: region.quarantine_ms",
        ),
        (
            "[region]\nsocket = \"/s\"\nlinger_us = 1001\n",
            "t.toml:3: region.linger_us: 1001 µs is more than the limit of 1000 µs",
        ),
        (
            "[region]\nsocket = \"/s\"\npolicy = \"nope\"\n",
            "t.toml:3: region.policy: no policy \"nope\"",
        ),
        (
            "[region]\nsocket = \"/s\"\n[[region.rule]]\nsocket = \"vm-x\"\npolicy = \"unrestricted\"\n",
            "t.toml:4: region.rule[0].socket: no socket named \"vm-x\"",
        ),
        (
            "[region]\nsocket = \"/s\"\n[[region.rule]]\nuser = \"no-such-user-here\"\npolicy = \"unrestricted\"\n",
            "t.toml:4: region.rule[0].user: no user",
        ),
        (
            "[region]\nsocket = \"/s\"\n[[region.listen]]\nname = \"main\"\npath = \"/a\"\n",
            "t.toml:4: region.listen[0].name",
        ),
        (
            "[region]\nsocket = \"/s\"\n[policy.p]\ncreate = [\"\"]\n",
            "invalid pattern",
        ),
        (
            "[region]\nsocket = \"/s\"\n[policy.p]\nmax_request_rate = 0\n",
            "t.toml:4: policy.p.max_request_rate",
        ),
        (
            "[region]\nsocket = \"/s\"\n[policy.p]\nrequest_burst = 5\n",
            "t.toml:4: policy.p.request_burst: needs max_request_rate",
        ),
        (
            "[region]\nsocket = \"/s\"\n[policy.unrestricted]\n",
            "policy.unrestricted",
        ),
        ("[policy.p]\n", "t.toml: region: no [region] table"),
        ("[region]\nsize = \"4M\"\n", "t.toml: no socket"),
        ("[region\n", "t.toml: TOML parse error"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}\n  gave: {e}\n  want: {want}");
    }
}

#[test]
fn two_sockets_on_one_path_are_a_conflict_naming_both() {
    let text =
        "[region]\nsocket = \"/tmp/s\"\n[[region.listen]]\nname = \"a\"\npath = \"/tmp/a\"\n";
    let opts = Options {
        socket: Some("/tmp/a".into()),
        ..Options::default()
    };
    let e = resolve_text(&opts, Path::new("t.toml"), text)
        .expect_err("conflict")
        .to_string();
    assert!(
        e.contains("--socket /tmp/a") && e.contains("region.listen[0].path = /tmp/a (t.toml:5)"),
        "{e}"
    );
    let e = err("[region]\nsocket = \"/tmp/s\"\ncontrol = \"/tmp/s\"\n");
    assert!(
        e.contains("region.socket = /tmp/s (t.toml:2)") && e.contains("region.control"),
        "{e}"
    );
}

const TWO_REGIONS: &str = r#"
[[region]]
name = "web"
socket = "/tmp/web.sock"
size = "4M"
policy = "narrow"
[[region.listen]]
name = "vm-1"
path = "/tmp/web-vm1.sock"
policy = "unrestricted"

[[region]]
name = "db"
socket = "/tmp/db.sock"
size = "8M"
max_peers = 4
metrics = "127.0.0.1:9464"
[[region.rule]]
name = "vshm"
policy = "narrow"

[policy.narrow]
create = ["ok/*"]
max_objects = 3
"#;

#[test]
fn two_regions_parse_each_with_its_own_sockets_settings_and_rules() {
    let regions = parse(TWO_REGIONS).expect("valid");
    let got: Vec<_> = regions
        .iter()
        .map(|c| (c.name.as_str(), c.socket.clone(), c.control.clone(), c.size))
        .collect();
    assert_eq!(
        got,
        [
            (
                "web",
                PathBuf::from("/tmp/web.sock"),
                PathBuf::from("/tmp/web.sock.ctl"),
                4 << 20
            ),
            (
                "db",
                PathBuf::from("/tmp/db.sock"),
                PathBuf::from("/tmp/db.sock.ctl"),
                8 << 20
            ),
        ]
    );
    let (web, db) = (&regions[0], &regions[1]);
    assert_eq!((web.max_peers, db.max_peers), (DEFAULT_MAX_PEERS, 4));
    assert_eq!(
        (web.metrics, db.metrics.map(|a| a.port())),
        (None, Some(9464))
    );
    assert_eq!(web.listen.len(), 1);
    assert!(
        db.listen.is_empty(),
        "a region's listen sockets are its own"
    );
    // Each region's default policy and rules are its own.
    assert_eq!(
        web.policy.resolve(&who("main", 1, "x")).policy.name,
        "narrow"
    );
    assert_eq!(
        web.policy.resolve(&who("vm-1", 1, "x")).policy.name,
        UNRESTRICTED
    );
    assert_eq!(
        db.policy.resolve(&who("main", 1, "x")).policy.name,
        UNRESTRICTED
    );
    assert_eq!(
        db.policy.resolve(&who("main", 1, "vshm")).policy.name,
        "narrow"
    );
}

#[test]
fn policies_are_defined_once_and_shared_by_every_region() {
    let regions = parse(TWO_REGIONS).expect("valid");
    let web = regions[0].policy.resolve(&who("main", 1, "x")).policy;
    let db = regions[1].policy.resolve(&who("main", 1, "vshm")).policy;
    assert!(
        Arc::ptr_eq(&web, &db),
        "one [policy.narrow] for both regions"
    );
    assert_eq!(web.max_objects, Some(3));
    // A policy one region names that the file does not define is refused with its place.
    let e = err(&TWO_REGIONS.replace(
        "policy = \"narrow\"\n[[region.listen]]",
        "policy = \"nope\"\n[[region.listen]]",
    ));
    assert!(
        e.contains("t.toml:6: region[0].policy: no policy \"nope\""),
        "{e}"
    );
}

#[test]
fn a_single_region_table_or_list_is_named_default_and_options_still_override_it() {
    let c = one(parse("[region]\nsocket = \"/tmp/s\"\n").expect("valid"));
    assert_eq!(c.name, DEFAULT_REGION_NAME);
    let opts = Options {
        size: Some(8 << 20),
        ..Options::default()
    };
    let c = one(resolve_text(
        &opts,
        Path::new("t.toml"),
        "[[region]]\nsocket = \"/tmp/s\"\n",
    )
    .expect("one [[region]] takes options like [region]"));
    assert_eq!((c.name.as_str(), c.size), (DEFAULT_REGION_NAME, 8 << 20));
}

#[test]
fn options_that_set_a_regions_key_are_refused_with_several_regions() {
    for (opts, flag) in [
        (
            Options {
                size: Some(8 << 20),
                ..Options::default()
            },
            "--size",
        ),
        (
            Options {
                socket: Some("/tmp/x".into()),
                ..Options::default()
            },
            "--socket",
        ),
        (
            Options {
                lock: true,
                ..Options::default()
            },
            "--lock",
        ),
    ] {
        let e = resolve_text(&opts, Path::new("t.toml"), TWO_REGIONS)
            .expect_err("ambiguous")
            .to_string();
        assert!(
            e.starts_with(flag) && e.contains("t.toml has 2 regions"),
            "{flag}: {e}"
        );
    }
}

#[test]
fn several_regions_need_a_valid_name_each_and_a_socket_each() {
    let cases: &[(&str, &str)] = &[
        (
            "[[region]]\nname = \"a\"\nsocket = \"/a\"\n[[region]]\nsocket = \"/b\"\n",
            "t.toml:4: region[1].name: missing",
        ),
        (
            "[[region]]\nname = \"a\"\nsocket = \"/a\"\n[[region]]\nname = \"b\"\n",
            "t.toml:4: region[1].socket: missing",
        ),
        (
            "[[region]]\nname = \"a b\"\nsocket = \"/a\"\n",
            "t.toml:2: region[0].name: \"a b\"",
        ),
        (
            "[[region]]\nname = \"a\"\nsocket = \"/a\"\n[[region]]\nname = \"b\"\nsocket = \"/b\"\nsizee = 1\n",
            "line 7",
        ),
        (
            "[[region]]\nname = \"a\"\nsocket = \"/a\"\n[[region]]\nname = \"b\"\nsocket = \"/b\"\nsize = \"3M\"\n",
            "t.toml:7: region[1].size: size 3145728",
        ),
        (
            "[[region]]\nname = \"a\"\nsocket = \"/a\"\n[[region]]\nname = \"b\"\nsocket = \"/b\"\n[[region.rule]]\nsocket = \"x\"\npolicy = \"unrestricted\"\n",
            "t.toml:8: region[1].rule[0].socket: no socket named \"x\"",
        ),
        // The two forms cannot be mixed: TOML itself refuses the second `region`.
        (
            "[region]\nsocket = \"/a\"\n[[region]]\nname = \"b\"\nsocket = \"/b\"\n",
            "t.toml: TOML parse error",
        ),
        ("region = []\n", "t.toml: region: no [region] table"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}\n  gave: {e}\n  want: {want}");
    }
}

#[test]
fn names_sockets_control_sockets_and_metrics_shared_between_regions_are_conflicts_naming_both() {
    let two = |a: &str, b: &str| {
        format!("[[region]]\nname = \"a\"\nsocket = \"/tmp/a\"\n{a}\n[[region]]\nname = \"b\"\nsocket = \"/tmp/b\"\n{b}\n")
    };
    let cases: &[(String, &[&str])] = &[
        (
            "[[region]]\nname = \"a\"\nsocket = \"/tmp/a\"\n[[region]]\nname = \"a\"\nsocket = \"/tmp/b\"\n"
                .into(),
            &[
                "region[0].name = \"a\" (t.toml:2) conflicts with region[1].name = \"a\" (t.toml:5)",
                "two regions cannot share a name",
            ],
        ),
        (
            "[[region]]\nname = \"a\"\nsocket = \"/tmp/x\"\n[[region]]\nname = \"b\"\nsocket = \"/tmp/x\"\n"
                .into(),
            &[
                "region[0].socket = /tmp/x (t.toml:3) conflicts with region[1].socket = /tmp/x (t.toml:6)",
                "two sockets cannot share a path",
            ],
        ),
        (
            two("", "control = \"/tmp/a.ctl\""),
            &["the default region[0].control /tmp/a.ctl conflicts with region[1].control = /tmp/a.ctl (t.toml:8)"],
        ),
        (
            two("", "[[region.listen]]\nname = \"l\"\npath = \"/tmp/a\""),
            &["region[0].socket = /tmp/a (t.toml:3) conflicts with region[1].listen[0].path = /tmp/a (t.toml:10)"],
        ),
        (
            two("metrics = \"127.0.0.1:9464\"", "metrics = \"127.0.0.1:9464\""),
            &[
                "region[0].metrics = 127.0.0.1:9464 (t.toml:4) conflicts with region[1].metrics = 127.0.0.1:9464 (t.toml:8)",
                "two metrics listeners cannot share an address",
            ],
        ),
    ];
    for (text, wants) in cases {
        let e = err(text);
        for want in *wants {
            assert!(e.contains(want), "{text}\n  gave: {e}\n  want: {want}");
        }
    }
    // Port 0 (any free port) twice is no conflict.
    parse(&two(
        "metrics = \"127.0.0.1:0\"",
        "metrics = \"127.0.0.1:0\"",
    ))
    .expect("port 0 twice");
}

#[test]
fn the_examples_commented_second_region_parses_once_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vshm.example.toml");
    let text = std::fs::read_to_string(&path).expect("docs/vshm.example.toml");
    // What its comments tell the operator to do.
    let (first, second) = text
        .split_once("# [[region]]\n")
        .expect("a commented [[region]]");
    let first = first.replacen("[region]\n", "[[region]]\nname = \"vms\"\n", 1);
    let second: Vec<&str> = std::iter::once("[[region]]")
        .chain(second.lines().map(|l| l.strip_prefix("# ").unwrap_or(l)))
        .collect();
    let text = format!("{first}\n{}\n", second.join("\n"));
    let regions = resolve_text(&Options::default(), &path, &text).expect("valid");
    let names: Vec<&str> = regions.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["vms", "batch"]);
    assert_eq!(regions[1].listen.len(), 1);
    assert_eq!(
        regions[0].listen.len(),
        2,
        "the first region keeps its sockets"
    );
}

#[test]
fn the_name_area_defaults_to_64_bytes_per_object_and_is_set_by_option_or_key() {
    let opts = Options {
        socket: Some("/tmp/s".into()),
        ..Options::default()
    };
    let c = one(resolve(&opts).expect("valid"));
    assert_eq!(c.name_bytes, None);
    assert_eq!(c.name_area_size(), 1024 * 64);
    assert_eq!(c.layout(4096).expect("layout").name_area_size, 1024 * 64);
    let opts = Options {
        socket: Some("/tmp/s".into()),
        name_bytes: Some(1 << 20),
        ..Options::default()
    };
    let c = one(resolve(&opts).expect("valid"));
    assert_eq!(c.layout(4096).expect("layout").name_area_size, 1 << 20);
    let text = "[region]\nsocket = \"/tmp/s\"\nname_bytes = \"256K\"\n";
    let c = one(resolve_text(&Options::default(), Path::new("t.toml"), text).expect("valid"));
    assert_eq!(c.name_bytes, Some(256 << 10));
}

#[test]
fn a_name_area_size_that_is_not_a_multiple_of_8_or_too_large_is_refused_naming_the_value() {
    let opts = Options {
        socket: Some("/tmp/s".into()),
        name_bytes: Some(1001),
        ..Options::default()
    };
    let e = resolve(&opts).expect_err("refused").to_string();
    assert!(
        e.starts_with("--name-bytes 1001: must be a multiple of 8"),
        "{e}"
    );
    let e = err("[region]\nsocket = \"/tmp/s\"\nname_bytes = 68157448\n");
    assert!(
        e.contains("t.toml:3") && e.contains("region.name_bytes") && e.contains("68157448"),
        "{e}"
    );
    // Large enough to leave no heap: the size is at fault, and the message says so.
    let opts = Options {
        socket: Some("/tmp/s".into()),
        size: Some(1 << 20),
        name_bytes: Some(1 << 20),
        ..Options::default()
    };
    let e = resolve(&opts).expect_err("refused").to_string();
    assert!(e.contains("--name-bytes") && e.contains("needs"), "{e}");
}

#[test]
fn sixty_five_thousand_objects_are_configurable_and_fit_a_64m_region() {
    let opts = Options {
        socket: Some("/tmp/s".into()),
        max_objects: Some(65_536),
        ..Options::default()
    };
    let c = one(resolve(&opts).expect("valid"));
    let l = c.layout(4096).expect("layout");
    assert_eq!((l.max_objects, l.name_area_size), (65_536, 65_536 * 64));
    assert!(l.heap_size >= 32 << 20, "{l:?}");
}

#[test]
fn small_regions_get_fewer_objects_so_their_header_stays_small() {
    assert_eq!(default_max_objects(64 << 20), 1024);
    assert_eq!(default_max_objects(8 << 20), 1024);
    assert_eq!(default_max_objects(4 << 20), 963);
    assert_eq!(default_max_objects(1 << 20), 240);
    for size in [1u64 << 20, 2 << 20, 4 << 20, 8 << 20] {
        let l = vshm_format::layout::Layout::compute(
            size,
            DEFAULT_MAX_PEERS,
            default_max_objects(size),
            DEFAULT_VECTORS,
            4096,
        )
        .expect("fits");
        // The per-object part within a sixteenth; the mailboxes (2 KiB a peer) on top.
        assert!(
            l.heap_offset <= size / 16 + u64::from(DEFAULT_MAX_PEERS) * 2048 + 8192,
            "{size}: header {:#x}",
            l.heap_offset
        );
    }
}

#[test]
fn the_linger_is_set_by_option_or_key_zero_turns_it_off_and_too_long_is_refused_naming_it() {
    let c = one(parse("[region]\nsocket = \"/tmp/s\"\nlinger_us = 0\n").expect("valid"));
    assert!(c.linger.is_zero());
    let opts = Options {
        socket: Some("/tmp/s".into()),
        linger_us: Some(200),
        ..Options::default()
    };
    let c = one(resolve(&opts).expect("valid"));
    assert_eq!(c.linger, std::time::Duration::from_micros(200));
    let opts = Options {
        socket: Some("/tmp/s".into()),
        linger_us: Some(5000),
        ..Options::default()
    };
    let e = resolve(&opts).expect_err("too long").to_string();
    assert!(
        e.contains("--linger-us") && e.contains("5000: 5000 µs is more than the limit of 1000 µs"),
        "{e}"
    );
}
