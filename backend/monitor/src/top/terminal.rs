//! The thin shell of `vshmctl top`: terminal setup and restore (also on panic), the event
//! loop, and the status requests that feed the model.

use std::io::{self, IsTerminal, Stdout};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::Terminal;

use super::*;
use vshm_control::{request, ControlRequest};

/// Whether the terminal is in raw mode on the alternate screen (so the panic hook and the
/// guard restore it exactly once).
static ACTIVE: AtomicBool = AtomicBool::new(false);

fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Restores the terminal when dropped: on return, on error and while unwinding a panic.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            // Leave the alternate screen before the panic message is printed.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let restore_on_error = |e: io::Error| {
            restore_terminal();
            e
        };
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide).map_err(restore_on_error)?;
        let terminal =
            Terminal::new(CrosstermBackend::new(io::stdout())).map_err(restore_on_error)?;
        Ok(Screen { terminal })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Runs the live view against vshmd's control socket `control`, refreshing every `interval`,
/// until `q`, Esc or Ctrl-C. A failed refresh is shown and retried, never fatal; only a
/// terminal that cannot be set up or drawn on is.
pub fn run(control: &Path, interval: Duration) -> Result<(), String> {
    // Keys come from stdin, else /dev/tty (crossterm's choice); the screen must be stdout.
    if !io::stdout().is_terminal() {
        return Err("top needs a terminal (use `vshmctl status` or `watch` otherwise)".into());
    }
    let interval = interval.max(Duration::from_millis(10));
    let mut screen = Screen::enter().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let mut app = App::new(control);
    let mut next_refresh = Instant::now();
    let mut dirty = true;
    while !app.should_quit() {
        if Instant::now() >= next_refresh {
            match request(control, &ControlRequest::Status) {
                Ok(doc) => app.update(doc, Instant::now()),
                Err(e) => app.fail(e.to_string()),
            }
            next_refresh = Instant::now() + interval;
            dirty = true;
        }
        if dirty {
            screen
                .terminal
                .draw(|frame| render(frame, &app))
                .map_err(|e| format!("cannot draw: {e}"))?;
            dirty = false;
        }
        let timeout = next_refresh.saturating_duration_since(Instant::now());
        if event::poll(timeout).map_err(|e| format!("reading the terminal: {e}"))? {
            match event::read().map_err(|e| format!("reading the terminal: {e}"))? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    app.on_key(key);
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    drop(screen);
    Ok(())
}
