//! `vshm net-send` / `vshm net-recv` (hidden): a TCP bulk transfer between two guests with
//! large buffers, the anchor the benchmark suite (tests/bench, P6) measures a section
//! against. Benchmark helpers only: they need no vshm device and touch no section.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use crate::Failure;

/// Bytes per read and write, and what each socket asks the kernel to buffer.
const BUFFER: usize = 1 << 20;

/// Asks the kernel for `BUFFER`-byte send and receive buffers on `s` (it caps them at
/// net.core.wmem_max / rmem_max; a refusal only costs speed, so it is not an error).
fn big_buffers(s: &TcpStream) {
    let size = libc::c_int::try_from(BUFFER).unwrap_or(libc::c_int::MAX);
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket this process owns, with a pointer to a c_int that
        // lives across the call and its exact size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                len,
            );
        }
    }
}

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// `vshm net-send ADDR`: connects, sends the file's bytes (read into memory first) or `mib`
/// MiB of a pattern in 1 MiB writes, shuts its side down and waits until the receiver
/// closes (it has everything); prints the bytes and the time from connect to that close.
pub fn send(addr: &str, file: Option<&PathBuf>, mib: Option<u64>) -> Result<(), Failure> {
    let data = match (file, mib) {
        (Some(f), _) => {
            std::fs::read(f).map_err(|e| Failure(format!("cannot read {}: {e}", f.display())))?
        }
        (None, Some(m)) => {
            let len = usize::try_from(m.saturating_mul(1 << 20))
                .map_err(|_| Failure(format!("--mib {m} is too large")))?;
            (0..len)
                .map(|i| u8::try_from(i % 251).unwrap_or(0))
                .collect()
        }
        (None, None) => return Err(Failure("net-send needs --file or --mib".into())),
    };
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| Failure(format!("connect to {addr}: {e}")))?;
    big_buffers(&s);
    for chunk in data.chunks(BUFFER) {
        s.write_all(chunk)
            .map_err(|e| Failure(format!("send to {addr}: {e}")))?;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| Failure(format!("shutdown to {addr}: {e}")))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| Failure(format!("wait for {addr} to close: {e}")))?;
    let secs = started.elapsed().as_secs_f64();
    let n = data.len() as u64;
    say!(
        "sent {n} bytes in {secs:.6} s ({:.1} MB/s), until the receiver had them all",
        rate(n, secs)
    );
    Ok(())
}

/// `vshm net-recv PORT`: listens on every address, says `listening`, takes one connection,
/// reads it to its end in 1 MiB reads (into `out` if given), closes it and prints the bytes
/// and the time from accept to the end.
pub fn recv(port: u16, out: Option<&PathBuf>) -> Result<(), Failure> {
    let l = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| Failure(format!("listen on port {port}: {e}")))?;
    say!("listening on port {port}");
    let _ = std::io::stdout().flush();
    let (mut s, peer) = l
        .accept()
        .map_err(|e| Failure(format!("accept on port {port}: {e}")))?;
    big_buffers(&s);
    let started = Instant::now();
    let mut sink = match out {
        Some(p) => Some(
            std::fs::File::create(p)
                .map_err(|e| Failure(format!("cannot create {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut buf = vec![0u8; BUFFER];
    let mut n: u64 = 0;
    loop {
        let got = s
            .read(&mut buf)
            .map_err(|e| Failure(format!("receive from {peer}: {e}")))?;
        if got == 0 {
            break;
        }
        if let Some(f) = sink.as_mut() {
            f.write_all(&buf[..got])
                .map_err(|e| Failure(format!("write what {peer} sent: {e}")))?;
        }
        n += got as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    drop(s);
    say!(
        "received {n} bytes in {secs:.6} s ({:.1} MB/s) from {peer}",
        rate(n, secs)
    );
    Ok(())
}
