//! One peer of the sync-objects stress test (`tests/tests/stress_sync.rs`): a separate
//! process, so the test can kill it with SIGKILL at any instruction. For a bounded time it
//! allocates and frees owner-tagged blocks in the section `pool` (writing its own pattern
//! into each and checking it before the free), signals and waits on the event `tick`, and
//! increments the counter in section `counter` under the mutex `lock`.
//!
//! Usage: `vshm-stress-peer SOCKET SEED MILLIS`. Exit 0 when done; 3 if a block's pattern
//! was overwritten (two peers got overlapping blocks); 1 on any unexpected error. Prints
//! `done ops=N abandoned=M` last.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vshm::blocks::{AllocOptions, Block};
use vshm::host::HostTransport;
use vshm::{Acquired, Error, Namespace, Status};
use vshm_tests::XorShift;

/// Statuses a racing peer may legitimately see: a full pool, a lock or wait that timed out.
fn tolerated(e: &Error) -> bool {
    matches!(
        e,
        Error::Status(Status::NoMemory | Status::Timeout | Status::InsufficientResources)
            | Error::Refused {
                status: Status::InsufficientResources,
                ..
            }
    )
}

fn run(socket: &Path, seed: u64, millis: u64) -> Result<ExitCode, String> {
    let t = HostTransport::connect(socket).map_err(|e| e.to_string())?;
    let ns = Namespace::attach(t).map_err(|e| e.to_string())?;
    let pool = ns.open("pool").map_err(|e| format!("open pool: {e}"))?;
    let counter = ns
        .open("counter")
        .map_err(|e| format!("open counter: {e}"))?;
    let tick = ns
        .open_event("tick")
        .map_err(|e| format!("open tick: {e}"))?;
    let lock = ns
        .open_mutex("lock")
        .map_err(|e| format!("open lock: {e}"))?;
    let mut rng = XorShift(seed | 1);
    let pattern = (seed & 0xFF) as u8 | 1;
    let mut held: Vec<Block> = Vec::new();
    let (mut ops, mut abandoned) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_millis(millis);
    let check = |b: &Block| -> Result<bool, String> {
        let mut buf = vec![0u8; usize::try_from(b.size.min(256)).unwrap_or(256)];
        pool.read_at(b.offset, &mut buf)
            .map_err(|e| format!("read block at {}: {e}", b.offset))?;
        Ok(buf.iter().all(|&x| x == pattern))
    };
    while Instant::now() < end {
        ops += 1;
        let outcome: Result<(), Error> = match rng.below(10) {
            0..=3 => {
                let size = 16 + rng.below(2000);
                pool.allocate_with(size, 16, AllocOptions { owned: true })
                    .and_then(|b| {
                        let fill = vec![pattern; usize::try_from(b.size.min(256)).unwrap_or(0)];
                        pool.write_at(b.offset, &fill)?;
                        held.push(b);
                        Ok(())
                    })
            }
            4..=6 if !held.is_empty() => {
                let i = usize::try_from(rng.below(held.len() as u64)).unwrap_or(0);
                let b = held.swap_remove(i);
                if !check(&b)? {
                    eprintln!("block at {} size {} was overwritten", b.offset, b.size);
                    return Ok(ExitCode::from(3));
                }
                pool.free(b)
            }
            7 => tick.signal(),
            8 => match tick.wait(Some(Duration::from_millis(20))) {
                Err(Error::Status(Status::Timeout)) => Ok(()),
                other => other,
            },
            _ => lock.lock(Some(Duration::from_secs(5))).and_then(|got| {
                if got == Acquired::Abandoned {
                    abandoned += 1;
                }
                let mut v = [0u8; 8];
                counter.read_at(0, &mut v)?;
                let next = u64::from_le_bytes(v).wrapping_add(1);
                counter.write_at(0, &next.to_le_bytes())?;
                lock.unlock()
            }),
        };
        if let Err(e) = outcome {
            if !tolerated(&e) {
                return Err(format!("op {ops}: {e}"));
            }
        }
    }
    for b in held.drain(..) {
        if !check(&b)? {
            eprintln!("block at {} size {} was overwritten", b.offset, b.size);
            return Ok(ExitCode::from(3));
        }
        pool.free(b).map_err(|e| format!("final free: {e}"))?;
    }
    println!("done ops={ops} abandoned={abandoned}");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(seed), Some(millis)) = (
        args.get(1),
        args.get(2).and_then(|s| s.parse().ok()),
        args.get(3).and_then(|s| s.parse().ok()),
    ) else {
        eprintln!("usage: vshm-stress-peer SOCKET SEED MILLIS");
        return ExitCode::from(2);
    };
    match run(Path::new(socket), seed, millis) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vshm-stress-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
