//! `vshm ring-send` / `vshm ring-recv` (hidden): a stream through the SPSC ring of a section
//! between two peers (two guests), timed by the peers themselves; the benchmark suite's P6
//! (tests/bench) runs them. Benchmark helpers only.

use std::time::{Duration, Instant};

use vshm::{Error, Namespace, Ring, RingError, Transport};

use crate::Failure;

/// Bytes per write or read call on each side.
const CHUNK: usize = 64 << 10;
/// The sender's source and the receiver's destination: the stream cycles through them.
const BUFFER: usize = 1 << 20;
/// How long either side waits for the other before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

/// The stream's bytes at buffer index `i` (a period prime to every power of two).
fn pattern() -> Vec<u8> {
    (0..BUFFER)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect()
}

fn total(mib: u64) -> Result<usize, Failure> {
    usize::try_from(mib.saturating_mul(1 << 20))
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| Failure(format!("--mib {mib}: not a size to stream")))
}

fn rate(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// `vshm ring-recv NAME --mib N --capacity C`: creates a ring of `capacity` bytes at offset
/// 0 of section NAME (whose first bytes must be zero), says `ready`, takes `mib` MiB in
/// 64 KiB reads into a 1 MiB buffer, checks the last MiB and prints bytes and time (from
/// the first byte to the last).
pub fn recv<T: Transport>(
    ns: &Namespace<T>,
    name: &str,
    mib: u64,
    capacity: u64,
) -> Result<(), Failure> {
    let total = total(mib)?;
    let section = ns
        .open(name)
        .map_err(|e| Failure(format!("{e}: open {name:?}")))?;
    let ring = Ring::create_in(&section, 0, capacity).map_err(|e| {
        Failure(format!(
            "{e}: create a ring of {capacity} bytes in {name:?}"
        ))
    })?;
    let mut consumer = ring.consumer()?;
    say!("ready: a ring of {capacity} bytes in {name:?}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut buf = vec![0u8; BUFFER];
    let mut got = 0;
    let mut started = None;
    while got < total {
        let at = got % BUFFER;
        let n = CHUNK.min(BUFFER - at).min(total - got);
        got += consumer
            .read_blocking(&mut buf[at..at + n], Some(PATIENCE))
            .map_err(|e| Failure(format!("{e}: read from the ring after {got} bytes")))?;
        started.get_or_insert_with(Instant::now);
    }
    let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let whole = total % BUFFER == 0;
    if whole && buf != pattern() {
        return Err(Failure(format!(
            "the last MiB from the ring in {name:?} is not what was sent"
        )));
    }
    say!(
        "received {total} bytes in {secs:.6} s ({:.1} MB/s){}",
        rate(total, secs),
        if whole { ", last MiB checked" } else { "" }
    );
    drop(consumer);
    section.close()?;
    Ok(())
}

/// `vshm ring-send NAME --mib N`: attaches to the ring at offset 0 of section NAME (waiting
/// for its creator), sends `mib` MiB in 64 KiB writes and prints bytes and time, from the
/// first write until the receiver has taken the last byte.
pub fn send<T: Transport>(ns: &Namespace<T>, name: &str, mib: u64) -> Result<(), Failure> {
    let total = total(mib)?;
    let section = ns
        .open(name)
        .map_err(|e| Failure(format!("{e}: open {name:?}")))?;
    let waited = Instant::now();
    let ring = loop {
        match Ring::attach(&section, 0) {
            Ok(r) => break r,
            Err(Error::Ring(RingError::NotARing { .. })) if waited.elapsed() < PATIENCE => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Failure(format!("{e}: attach to the ring in {name:?}"))),
        }
    };
    let capacity = ring.capacity();
    let mut producer = ring.producer()?;
    let src = pattern();
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let at = sent % BUFFER;
        let n = CHUNK.min(BUFFER - at).min(total - sent);
        producer
            .write_all(&src[at..at + n], Some(PATIENCE))
            .map_err(|e| Failure(format!("{e}: write into the ring after {sent} bytes")))?;
        sent += n;
    }
    while producer.free()? < capacity {
        if started.elapsed() > PATIENCE {
            return Err(Failure("the receiver stopped taking".into()));
        }
        std::thread::yield_now();
    }
    let secs = started.elapsed().as_secs_f64();
    say!(
        "sent {total} bytes in {secs:.6} s ({:.1} MB/s) through a ring of {capacity} bytes, \
         until the receiver had them all",
        rate(total, secs)
    );
    drop(producer);
    section.close()?;
    Ok(())
}
