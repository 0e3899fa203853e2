//! Whole lines from a guest's serial port (the command agent's and the diagnostic port's
//! sockets), read with a timeout.
//!
//! A line can arrive in pieces far apart: a TCG guest's UART hands QEMU a byte at a time,
//! and its vCPU may not run for a while when the host is loaded. A piece is kept until its
//! newline arrives, so an `@@END` marker cut in two is still one line (before this, a marker
//! split across two read timeouts was lost and its command "timed out" in CI).

use std::io::{BufRead, BufReader, ErrorKind, Read};

/// Lines from a stream whose reads time out (e.g. a `UnixStream` with a read timeout).
#[derive(Debug)]
pub struct Lines<S> {
    stream: BufReader<S>,
    /// Bytes of a line whose newline has not arrived yet.
    partial: Vec<u8>,
}

/// What one read gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its `\n` (and `\r`). Bytes that are not UTF-8 are replaced.
    Whole(String),
    /// No newline arrived within the stream's timeout; what did arrive is kept.
    Nothing,
    /// The other end closed (a piece it sent without a newline stays in [`Lines::partial`]).
    Closed,
}

impl<S: Read> Lines<S> {
    /// Lines from `stream`.
    pub fn new(stream: S) -> Self {
        Lines {
            stream: BufReader::new(stream),
            partial: Vec::new(),
        }
    }

    /// The stream (e.g. to write to it).
    pub fn get_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// The next whole line, or [`Line::Nothing`] when the stream's timeout passed first.
    pub fn next_line(&mut self) -> std::io::Result<Line> {
        // read_until retries an interrupted read itself, and appends what it consumed to
        // `partial` even when it then fails.
        match self.stream.read_until(b'\n', &mut self.partial) {
            Ok(0) => Ok(Line::Closed),
            Ok(_) if self.partial.last() == Some(&b'\n') => {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                self.partial.clear();
                Ok(Line::Whole(line))
            }
            // End of stream after a piece without its newline.
            Ok(_) => Ok(Line::Closed),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Ok(Line::Nothing)
            }
            Err(e) => Err(e),
        }
    }

    /// The piece of a line received so far (for a report when a wait gives up).
    pub fn partial(&self) -> String {
        String::from_utf8_lossy(&self.partial).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Sends `pieces` with `gap` between them from another thread; returns the reader's
    /// whole lines (and the pieces left over) once the writer has closed.
    fn read_pieces(pieces: &'static [&'static [u8]], gap: Duration) -> (Vec<String>, String) {
        let (reader, mut writer) = UnixStream::pair().expect("socketpair");
        reader
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let sender = std::thread::spawn(move || {
            for p in pieces {
                writer.write_all(p).expect("write");
                std::thread::sleep(gap);
            }
        });
        let mut lines = Lines::new(reader);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lines.next_line().expect("read") {
                Line::Whole(l) => got.push(l),
                Line::Nothing => assert!(Instant::now() < deadline, "no end: {got:?}"),
                Line::Closed => break,
            }
        }
        sender.join().expect("sender");
        (got, lines.partial())
    }

    #[test]
    fn a_line_that_arrives_in_pieces_across_several_timeouts_is_one_line() {
        // Each gap is several of the reader's timeouts.
        let (got, _) = read_pieces(
            &[b"out\n@@EN", b"D 7", b" 0\r\n"],
            Duration::from_millis(90),
        );
        assert_eq!(got, ["out", "@@END 7 0"]);
    }

    #[test]
    fn a_character_cut_between_two_pieces_survives() {
        let (got, _) = read_pieces(&[b"\xc2", b"\xb5s\n"], Duration::from_millis(60));
        assert_eq!(got, ["µs"]);
    }

    #[test]
    fn a_piece_without_its_newline_is_not_a_line_when_the_stream_closes() {
        let (got, left) = read_pieces(&[b"one\ntw"], Duration::from_millis(1));
        assert_eq!(got, ["one"]);
        assert_eq!(left, "tw");
    }
}
