//! `vshmctl top` in a real terminal: tmux runs it in a detached pane, the test reads the
//! pane with `capture-pane` and types into it with `send-keys`.
//!
//! tmux is required (`apt-get install tmux`; CI installs it): without it this test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vshm_tests::{bin, release, stdout, wait_for, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

/// A private tmux server (its own socket and config), killed on drop.
struct Tmux {
    socket: PathBuf,
    config: PathBuf,
    session: String,
}

impl Tmux {
    /// Checks that tmux is there, loudly.
    fn require() {
        match Command::new("tmux").arg("-V").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`tmux -V` failed ({}): this test needs a working tmux",
                o.status
            ),
            Err(e) => panic!(
                "tmux is missing ({e}): this test drives `vshmctl top` in a tmux pane; \
                 install it with `apt-get install tmux` (cargo xtask test and .ci/run do)"
            ),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-f").arg(&self.config).arg("-S").arg(&self.socket);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run tmux")
    }

    /// Starts a detached `width`×`height` session running `shell_command`.
    fn start(dir: &Path, width: u16, height: u16, shell_command: &str) -> Tmux {
        Tmux::require();
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
            config: dir.join("tmux.conf"),
            session: format!("vshm-top-{}", std::process::id()),
        };
        // The pane's command is POSIX sh, whatever the user's $SHELL.
        std::fs::write(&tmux.config, "set -g default-shell /bin/sh\n").expect("tmux.conf");
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            shell_command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    /// The pane's visible text, or `None` once the session is gone.
    fn capture(&self) -> Option<String> {
        let out = self.run(&["capture-pane", "-p", "-t", &self.session]);
        out.status.success().then(|| stdout(&out))
    }

    fn send_keys(&self, keys: &str) {
        let out = self.run(&["send-keys", "-t", &self.session, keys]);
        assert!(
            out.status.success(),
            "tmux send-keys {keys}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", &self.session])
            .status
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Single-quotes a path for the shell tmux runs the pane's command with.
fn quoted(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The line number of the first pane line that mentions `needle`.
fn line_of(screen: &str, needle: &str) -> Option<usize> {
    screen.lines().position(|l| l.contains(needle))
}

#[test]
fn top_shows_sections_and_refs_live_sorts_on_r_and_quits_on_q() {
    Tmux::require();
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        // Bigger but unheld vs smaller but held: the two sort orders disagree.
        for (name, max) in [("top-big", "1M"), ("top-held", "64K")] {
            let out = b.vshm(&["create", name, "--max", max, "--persistent"]);
            assert!(out.status.success(), "create {name}: {out:?}");
        }
        let holder = b.vshm_holding(&["hold", "top-held"]);

        let dir = TempDir::new("top-tmux");
        let rc = dir.path().join("rc");
        let err = dir.path().join("stderr");
        // `timeout --foreground` bounds a leaked pane without leaving the tty's foreground
        // process group (raw mode needs it).
        let shell_command = format!(
            "timeout --foreground 120 {} --control {} top --interval-ms 100 2>{}; echo $? >{}",
            quoted(&bin("vshmctl")),
            quoted(&b.control),
            quoted(&err),
            quoted(&rc),
        );
        let tmux = Tmux::start(dir.path(), 160, 45, &shell_command);
        let diagnostics = |screen: &str| {
            format!(
                "pane:\n{screen}\nvshmctl stderr: {}\nexit status: {}",
                std::fs::read_to_string(&err).unwrap_or_default(),
                std::fs::read_to_string(&rc).unwrap_or_else(|_| "(still running)".into()),
            )
        };

        // Both sections, top-held with one handle (by the holder's peer id), sorted by size.
        let mut screen = String::new();
        let shown = wait_for(Duration::from_secs(10), || {
            screen = tmux.capture().unwrap_or_default();
            screen.contains("top-big")
                && screen
                    .lines()
                    .any(|l| l.contains("top-held") && l.contains(":1 "))
                && screen.contains("sorted by size")
        });
        assert!(
            shown,
            "top did not show both sections with refs within 10 s\n{}",
            diagnostics(&screen)
        );
        let held_row = screen
            .lines()
            .find(|l| l.contains("top-held"))
            .unwrap_or_default();
        let cols: Vec<&str> = held_row
            .split(|c: char| c == '│' || c.is_whitespace())
            .filter(|c| !c.is_empty())
            .collect();
        // NAME SIZE(2) MAX(2) REFS PERSISTENT BY-PEER AGE...
        assert_eq!(cols.get(5), Some(&"1"), "refs of top-held in {held_row:?}");
        assert_eq!(cols.get(6), Some(&"yes"), "persistent in {held_row:?}");
        assert!(
            line_of(&screen, "top-big") < line_of(&screen, "top-held"),
            "by size, top-big comes first\n{}",
            diagnostics(&screen)
        );

        // `r`: by refs, the held one comes first.
        tmux.send_keys("r");
        let resorted = wait_for(Duration::from_secs(5), || {
            screen = tmux.capture().unwrap_or_default();
            screen.contains("sorted by refs")
                && line_of(&screen, "top-held") < line_of(&screen, "top-big")
                && line_of(&screen, "top-big").is_some()
        });
        assert!(
            resorted,
            "`r` did not sort by refs\n{}",
            diagnostics(&screen)
        );

        // `q`: vshmctl exits 0 and the pane (the whole session) goes.
        tmux.send_keys("q");
        let gone = wait_for(Duration::from_secs(5), || !tmux.alive());
        assert!(gone, "`q` did not end top\n{}", diagnostics(&screen));
        assert_eq!(
            std::fs::read_to_string(&rc).unwrap_or_default().trim(),
            "0",
            "vshmctl top's exit status\n{}",
            diagnostics(&screen)
        );
        release(holder);
    });
}

#[test]
fn top_keeps_running_and_shows_the_error_while_vshmd_is_gone() {
    Tmux::require();
    watchdog(LIMIT, || {
        let dir = TempDir::new("top-tmux-gone");
        let rc = dir.path().join("rc");
        let control = dir.path().join("nobody.ctl");
        let shell_command = format!(
            "timeout --foreground 120 {} --control {} top --interval-ms 100; echo $? >{}",
            quoted(&bin("vshmctl")),
            quoted(&control),
            quoted(&rc),
        );
        let tmux = Tmux::start(dir.path(), 120, 30, &shell_command);
        let mut screen = String::new();
        let shown = wait_for(Duration::from_secs(10), || {
            screen = tmux.capture().unwrap_or_default();
            screen.contains("refresh failed") && screen.contains("nobody.ctl")
        });
        assert!(shown, "no refresh error shown:\n{screen}");
        // Still there a few refreshes later.
        std::thread::sleep(Duration::from_millis(500));
        assert!(tmux.alive(), "top exited when vshmd was unreachable");
        tmux.send_keys("Escape");
        assert!(
            wait_for(Duration::from_secs(5), || !tmux.alive()),
            "Esc did not end top"
        );
        assert_eq!(std::fs::read_to_string(&rc).unwrap_or_default().trim(), "0");
    });
}
