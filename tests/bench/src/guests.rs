//! P6: two QEMU guests of the test image (`cargo xtask images`) on one vshmd, linked by a
//! virtio-net device each on a point-to-point link (`vshm_images::GuestNet`). Measured in
//! the guests, through their command agents: a bulk transfer guest → guest through a
//! section with the CLI against TCP between the same guests with large buffers (the hidden
//! `vshm net-send` / `vshm net-recv`), the copy rates of `vshm rtt` into and out of a
//! section against the guest's own memcpy, and the guest → host request round trip against
//! the guests' ping.

use std::time::{Duration, Instant};

use vshm::CreateOptions;
use vshm_images::{GuestNet, Image, Vm, VmConfig, VmError};

use crate::harness::{Context, Result, TempDir, Vshmd};

/// What P6 measured (times in ns, rates in MB/s as the guest tools print them).
#[derive(Clone, Debug)]
pub struct Guests {
    /// "TCG" or "KVM".
    pub accel: &'static str,
    /// MiB moved per bulk transfer.
    pub mib: u64,
    /// End-to-end times of the CLI transfers (write in A, then read in B).
    pub cli: Vec<f64>,
    /// End-to-end times of the TCP transfers (the sender's agent command, which returns once
    /// the receiver closed).
    pub tcp: Vec<f64>,
    /// The TCP sender's own time from connect to the receiver's close, per transfer.
    pub tcp_tool: Vec<f64>,
    /// The agent's own cost: `true` run in a guest, per sample.
    pub agent: Vec<f64>,
    /// A CLI invocation that moves no data (`vshm open p6/bulk`: start, attach, open,
    /// close), through the agent, per sample.
    pub cli_floor: Vec<f64>,
    /// `vshm --version` (the process alone, no device), through the agent, per sample.
    pub exec_floor: Vec<f64>,
    /// The guest copying the transfer's file to another tmpfs file (`cat`), through the
    /// agent, per sample.
    pub file_copy: Vec<f64>,
    /// The SPSC ring A → B (`vshm ring-send` / `ring-recv`): MB/s as the sender timed it
    /// (first write until the receiver took the last byte), per transfer.
    pub ring: Vec<f64>,
    /// MiB per ring transfer.
    pub ring_mib: u64,
    /// WAKE requests vshmd answered during the ring transfers.
    pub ring_wakes: u64,
    /// `vshm rtt`'s request round trip: (samples, min, median, p99) in ns.
    pub rtt: (usize, f64, f64, f64),
    /// Ping round trips A → B.
    pub ping: Vec<f64>,
    /// `vshm rtt --copy-mib`: MB/s into the section, out of it, and between local buffers.
    pub copy_in: f64,
    /// Out of the section.
    pub copy_out: f64,
    /// Between two local buffers in the guest.
    pub copy_local: f64,
    /// MiB copied each way by `vshm rtt`.
    pub copy_mib: u64,
}

/// P6 ran, or why not.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It ran.
    Ran(Box<Guests>),
    /// Not run, and why.
    NotRun(String),
}

const BOOT: Duration = Duration::from_secs(180);
const COMMAND: Duration = Duration::from_secs(300);
const PORT: u16 = 5201;

/// Runs `cmd` in `vm`; its output, or an error with the output if it failed.
fn ok(vm: &mut Vm, cmd: &str) -> Result<String> {
    let out = vm
        .run(cmd, COMMAND)
        .ctx(format!("{}: `{cmd}`", vm.name()))?;
    if out.success() {
        Ok(out.text)
    } else {
        Err(format!(
            "{}: `{cmd}` exited {}: {}",
            vm.name(),
            out.status,
            out.text
        ))
    }
}

/// [`ok`], timed by the harness (ns).
fn timed(vm: &mut Vm, cmd: &str) -> Result<(f64, String)> {
    let t = Instant::now();
    let text = ok(vm, cmd)?;
    Ok((t.elapsed().as_secs_f64() * 1e9, text))
}

/// The number after `key` in `text` (up to the next space or unit).
fn after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The line of `text` that starts with `prefix`.
fn line<'a>(text: &'a str, prefix: &str) -> Result<&'a str> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("no `{prefix}` line in:\n{text}"))
}

/// P6 with `mib` MiB per bulk transfer, `reps` transfers of each kind, `count` samples of
/// the request round trip (and at most 50 pings) and `copy_mib` MiB for `vshm rtt`'s
/// copies.
pub fn p6(mib: u64, reps: usize, count: u32, copy_mib: u64) -> Result<Outcome> {
    let dir = vshm_images::out_dir();
    let Some(image) = Image::existing(&dir) else {
        return Ok(Outcome::NotRun(format!(
            "not run: no guest image in {} (run `cargo xtask images`)",
            dir.display()
        )));
    };
    let d = Vshmd::start(&[])?;
    let work = TempDir::new("p6")?;
    let (net_a, net_b) = GuestNet::pair(work.path());
    let peer_ip = net_b.ip().to_owned();
    let config = |name: &str, net: GuestNet| {
        let mut c = VmConfig::new(name, &image, &d.socket, work.path());
        c.net = Some(net);
        c
    };
    let (ca, cb) = (config("p6-a", net_a), config("p6-b", net_b));
    let accel = match ca.accel {
        vshm_images::Accel::Kvm => "KVM",
        vshm_images::Accel::Tcg => "TCG",
    };
    let start = |c: &VmConfig| match Vm::start(c) {
        Err(e @ VmError::Spawn { .. }) => Err(Ok(Outcome::NotRun(format!("not run: {e}")))),
        other => other.map_err(|e| Err(e.to_string())),
    };
    let (sa, sb) = match (start(&ca), start(&cb)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let mut a = sa.wait_ready(BOOT).ctx("boot guest A")?;
    let mut b = sb.wait_ready(BOOT).ctx("boot guest B")?;
    for vm in [&mut a, &mut b] {
        let net = ok(
            vm,
            "cat /run/vshm-net 2>&1; vshm help net-recv >/dev/null 2>&1 || echo no-net-recv",
        )?;
        if !net.starts_with("up ") || net.contains("no-net-recv") {
            return Ok(Outcome::NotRun(format!(
                "not run: the guest image in {} has no network ({}: {net:?}); rebuild it with \
                 `cargo xtask images`",
                dir.display(),
                vm.name()
            )));
        }
    }

    // The sections, held by this host peer for the whole run.
    let ns = d.attach()?;
    let bytes = mib << 20;
    let (bulk, _) = ns
        .create(Some("p6/bulk"), &CreateOptions::new(bytes))
        .ctx("create p6/bulk")?;
    let (rtt_section, _) = ns
        .create(Some("p6/rtt"), &CreateOptions::new(1 << 20))
        .ctx("create p6/rtt")?;

    // Round trips: ping (after one for ARP), then vshm rtt with its copies.
    ok(&mut a, &format!("ping -c 1 -W 5 {peer_ip}"))?;
    // At most 50 pings (0.2 s apart: 10 s).
    let pings = ok(
        &mut a,
        &format!("ping -c {} -i 0.2 {peer_ip}", count.min(50)),
    )?;
    let ping: Vec<f64> = pings
        .lines()
        .filter_map(|l| after(l, "time="))
        .map(|ms| ms * 1e6)
        .collect();
    let rtt_out = ok(
        &mut a,
        &format!("vshm rtt p6/rtt --count {count} --copy-mib {copy_mib}"),
    )?;
    let r = line(&rtt_out, "request round trip")?;
    let us = |k: &str| {
        after(r, k)
            .map(|v| v * 1e3)
            .ok_or(format!("no {k} in {r:?}"))
    };
    let rtt = (
        r.split_whitespace()
            .find_map(|w| w.strip_prefix("n=")?.parse().ok())
            .unwrap_or(0),
        us("min=")?,
        us("median=")?,
        us("p99=")?,
    );
    let rate = |prefix: &str| -> Result<f64> {
        let l = line(&rtt_out, prefix)?;
        l[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(format!("no rate in {l:?}"))
    };
    let (copy_in, copy_out, copy_local) = (
        rate("copy into section")?,
        rate("copy out of section")?,
        rate("copy in local memory")?,
    );

    // The agent's own cost, for reading the end-to-end times.
    let mut agent = Vec::new();
    for _ in 0..5 {
        agent.push(timed(&mut a, "true")?.0);
    }

    // The bytes to move, in a file in A (tmpfs).
    let sum_a = ok(
        &mut a,
        &format!("dd if=/dev/urandom of=/tmp/p6.bin bs=1M count={mib} 2>/dev/null && md5sum < /tmp/p6.bin"),
    )?;

    // Through the section with the CLI: write in A, then read in B; checked once.
    let mut cli = Vec::new();
    for _ in 0..reps {
        let (w, _) = timed(&mut a, "vshm write p6/bulk --file /tmp/p6.bin")?;
        let (r, _) = timed(
            &mut b,
            &format!("vshm read p6/bulk --len {bytes} > /tmp/p6.out"),
        )?;
        cli.push(w + r);
    }
    // What the CLI's end-to-end time is made of, besides the copies: a command that moves
    // no data, and the file I/O alone.
    let mut cli_floor = Vec::new();
    let mut file_copy = Vec::new();
    let mut exec_floor = Vec::new();
    for _ in 0..reps.max(3) {
        exec_floor.push(timed(&mut b, "vshm --version")?.0);
        cli_floor.push(timed(&mut b, "vshm open p6/bulk")?.0);
        file_copy.push(timed(&mut a, "cat /tmp/p6.bin > /tmp/p6.copy")?.0);
    }
    ok(&mut a, "rm -f /tmp/p6.copy")?;
    let sum_b = ok(&mut b, "md5sum < /tmp/p6.out")?;
    if sum_b != sum_a {
        return Err(format!(
            "P6: guest B read {sum_b:?} out of the section, guest A wrote {sum_a:?}"
        ));
    }

    // TCP between the same guests: net-recv in B (background), net-send in A.
    let mut tcp = Vec::new();
    let mut tcp_tool = Vec::new();
    for _ in 0..reps {
        ok(
            &mut b,
            &format!(
                "rm -f /tmp/p6.net; vshm net-recv {PORT} --out /tmp/p6.net > /tmp/p6-recv.log 2>&1 & \
                 echo $! > /tmp/p6-recv.pid; i=0; while ! grep -q listening /tmp/p6-recv.log; do \
                 i=$((i+1)); if [ $i -gt 400 ]; then cat /tmp/p6-recv.log; exit 1; fi; sleep 0.05; done"
            ),
        )?;
        let (t, sent) = timed(
            &mut a,
            &format!("vshm net-send {peer_ip}:{PORT} --file /tmp/p6.bin"),
        )?;
        tcp.push(t);
        tcp_tool.push(after(&sent, " in ").map_or(f64::NAN, |s| s * 1e9));
        let got = ok(
            &mut b,
            "p=$(cat /tmp/p6-recv.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; \
             cat /tmp/p6-recv.log; md5sum < /tmp/p6.net",
        )?;
        if !got.ends_with(&sum_a) {
            return Err(format!(
                "P6: TCP delivered something else: {got:?}, sent {sum_a:?}"
            ));
        }
    }
    // The SPSC ring between the guests: a fresh section each time (the ring is created in
    // zeroed memory), the receiver in B creating the ring, the sender in A timing.
    let mut ring = Vec::new();
    let ring_mib = mib;
    let wakes = d.wake_requests()?;
    for i in 0..reps {
        let name = format!("p6/ring{i}");
        let (s, _) = ns
            .create(
                Some(&name),
                &CreateOptions::new(crate::bench::P5_CAPACITY + vshm::format::ring::HEADER_SIZE),
            )
            .ctx(format!("create {name}"))?;
        ok(
            &mut b,
            &format!(
                "vshm ring-recv {name} --mib {ring_mib} --capacity {} > /tmp/p6-ring.log 2>&1 & \
                 echo $! > /tmp/p6-ring.pid; i=0; while ! grep -q ready /tmp/p6-ring.log; do \
                 i=$((i+1)); if [ $i -gt 400 ]; then cat /tmp/p6-ring.log; exit 1; fi; sleep 0.05; done",
                crate::bench::P5_CAPACITY
            ),
        )?;
        let sent = ok(&mut a, &format!("vshm ring-send {name} --mib {ring_mib}"))?;
        let got = ok(
            &mut b,
            "p=$(cat /tmp/p6-ring.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; \
             cat /tmp/p6-ring.log",
        )?;
        if !got.contains("last MiB checked") {
            return Err(format!("P6 ring: the receiver said {got:?}"));
        }
        ring.push(after(&sent, "(").ok_or(format!("P6 ring: no rate in {sent:?}"))?);
        s.close().ctx(format!("close {name}"))?;
    }
    let ring_wakes = d.wake_requests()?.saturating_sub(wakes);
    bulk.close().ctx("close p6/bulk")?;
    rtt_section.close().ctx("close p6/rtt")?;
    drop(ns);
    drop((a, b));
    drop(d);
    Ok(Outcome::Ran(Box::new(Guests {
        accel,
        mib,
        cli,
        tcp,
        tcp_tool,
        agent,
        cli_floor,
        exec_floor,
        ring,
        ring_mib,
        ring_wakes,
        file_copy,
        rtt,
        ping,
        copy_in,
        copy_out,
        copy_local,
        copy_mib,
    })))
}
