//! Configuration tests: the example parses, options override keys, and every kind of bad
//! file is refused with the file, key and line.

use std::path::{Path, PathBuf};

use super::*;
use crate::policy::Identity;

fn parse(text: &str) -> Result<Config, ConfigError> {
    resolve_text(&Options::default(), Path::new("t.toml"), text)
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
    let c = resolve_text(&Options::default(), &path, &text).expect("the example is valid");
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
    let c = resolve(&opts).expect("valid");
    assert_eq!(c.control, PathBuf::from("/tmp/s.ctl"));
    assert_eq!(
        (c.size, c.max_peers, c.max_objects, c.vectors),
        (64 << 20, 16, 1024, 2)
    );
    assert_eq!((c.control_mode, c.socket_mode), (0o600, 0o660));
    assert_eq!(c.quarantine, std::time::Duration::from_secs(2));
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
    let c = resolve_text(&opts, Path::new("t.toml"), text).expect("valid");
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
        ("[[region]]\nsocket = \"/s\"\n", "exactly one region"),
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
