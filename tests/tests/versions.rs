//! `--version` of every binary names the shared-format version it speaks; vshmd reports it
//! in its status document; vshmctl warns, once, when the vshmd it talks to speaks another.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use serde_json::{json, Value};
use vshm_format::layout::FORMAT_VERSION;
use vshm_tests::{bin, command, stderr, stdout, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn every_binary_prints_its_version_and_the_format_it_speaks() {
    for name in ["vshmd", "vshmctl", "vshm"] {
        let out = command(&bin(name))
            .arg("--version")
            .output()
            .expect("run --version");
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            format!(
                "{name} {} (vshm format {FORMAT_VERSION})",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}

#[test]
fn vshmd_reports_its_format_and_vshmctl_is_quiet_when_they_agree() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let doc = b.status();
        assert_eq!(doc["vshmd"]["format_version"], json!(FORMAT_VERSION));
        assert_eq!(doc["vshmd"]["version"], json!(env!("CARGO_PKG_VERSION")));
        for args in [&["status"][..], &["metrics"][..]] {
            let out = b.vshmctl(args);
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
        }
    });
}

/// A stand-in for a vshmd of another format version: answers every control request with
/// a status document claiming `format_version`, or the metrics text.
fn fake_vshmd(listener: UnixListener, format_version: u32) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let request: Value = serde_json::from_str(&line).unwrap_or_default();
        let result = match request["cmd"].as_str() {
            Some("metrics") => json!("# no metrics here\n"),
            _ => json!({"vshmd": {"pid": 1, "version": "9.9.9", "format_version": format_version}}),
        };
        let mut stream = reader.into_inner();
        let _ = writeln!(stream, "{}", json!({"ok": true, "result": result}));
    }
}

#[test]
fn vshmctl_warns_once_when_vshmd_speaks_another_format() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("versions");
        let control = dir.path().join("fake.ctl");
        let listener = UnixListener::bind(&control).expect("bind");
        let other = FORMAT_VERSION + 1;
        std::thread::spawn(move || fake_vshmd(listener, other));
        let expected = format!(
            "vshmctl: warning: vshmd 9.9.9 serves vshm format {other}, this vshmctl speaks \
             format {FORMAT_VERSION}"
        );
        // `status` checks the document it prints; `metrics` asks for one first.
        for args in [&["status", "--json"][..], &["metrics"][..]] {
            let out = command(&bin("vshmctl"))
                .arg("--control")
                .arg(&control)
                .args(args)
                .output()
                .expect("run vshmctl");
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.matches(&expected).count(), 1, "{args:?}: {err}");
        }
    });
}
