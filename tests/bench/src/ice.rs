//! The iceoryx2 anchors (P3, P4): the real iceoryx2 crate's event ping-pong and its
//! publish-subscribe ping-pong between two processes, each process a node.

use std::time::Duration;

use iceoryx2::prelude::*;

use crate::harness::{measure, spin_until, wait_eof, Counts, Result, Role};

fn ice<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> Result<T> {
    r.map_err(|e| format!("iceoryx2: {what}: {e:?}"))
}

fn node() -> Result<Node<ipc::Service>> {
    // Its warnings (no config file: defaults) would only clutter the suite's output.
    set_log_level(LogLevel::Error);
    ice(NodeBuilder::new().create::<ipc::Service>(), "create node")
}

fn service_name(prefix: &str, what: &str) -> Result<ServiceName> {
    ice(
        ServiceName::new(&format!("{prefix}/{what}")),
        "service name",
    )
}

/// How long a ping may take before the run fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// Event ping-pong: this process notifies `ping` and waits on `pong`; the child role
/// `ice-event-echo` does the opposite. ns per round trip.
pub fn event_ping_pong(counts: Counts) -> Result<Vec<f64>> {
    let prefix = format!("vshm-bench-{}-ev", std::process::id());
    let node = node()?;
    let ping = ice(
        node.service_builder(&service_name(&prefix, "ping")?)
            .event()
            .open_or_create(),
        "ping service",
    )?;
    let pong = ice(
        node.service_builder(&service_name(&prefix, "pong")?)
            .event()
            .open_or_create(),
        "pong service",
    )?;
    let listener = ice(pong.listener_builder().create(), "pong listener")?;
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn("ice-event-echo", &[prefix.clone(), rounds.to_string()])?;
    let notifier = ice(ping.notifier_builder().create(), "ping notifier")?;
    let samples = measure(counts, 1, || {
        ice(notifier.notify(), "notify ping")?;
        let n = ice(listener.timed_wait(|_| {}, PATIENCE), "wait pong")?;
        if n == 0 {
            return Err("iceoryx2: no pong within the patience".into());
        }
        Ok(())
    })?;
    child.finish()?;
    Ok(samples)
}

/// The child half of [`event_ping_pong`].
pub fn event_echo(prefix: &str, rounds: usize) -> Result<()> {
    let node = node()?;
    let ping = ice(
        node.service_builder(&service_name(prefix, "ping")?)
            .event()
            .open_or_create(),
        "ping service",
    )?;
    let pong = ice(
        node.service_builder(&service_name(prefix, "pong")?)
            .event()
            .open_or_create(),
        "pong service",
    )?;
    let listener = ice(ping.listener_builder().create(), "ping listener")?;
    let notifier = ice(pong.notifier_builder().create(), "pong notifier")?;
    println!("ready");
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| e.to_string())?;
    for _ in 0..rounds {
        let n = ice(listener.timed_wait(|_| {}, PATIENCE), "wait ping")?;
        if n == 0 {
            return Err("iceoryx2: no ping within the patience".into());
        }
        ice(notifier.notify(), "notify pong")?;
    }
    wait_eof()
}

/// Publish-subscribe ping-pong, busy polling on both sides: this process publishes a
/// sequence number on `ping` and polls `pong` for it; the child role `ice-pubsub-echo`
/// echoes it. ns per round trip.
pub fn pubsub_ping_pong(counts: Counts) -> Result<Vec<f64>> {
    let prefix = format!("vshm-bench-{}-ps", std::process::id());
    let node = node()?;
    let ping = ice(
        node.service_builder(&service_name(&prefix, "ping")?)
            .publish_subscribe::<u64>()
            .open_or_create(),
        "ping service",
    )?;
    let pong = ice(
        node.service_builder(&service_name(&prefix, "pong")?)
            .publish_subscribe::<u64>()
            .open_or_create(),
        "pong service",
    )?;
    let subscriber = ice(pong.subscriber_builder().create(), "pong subscriber")?;
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn("ice-pubsub-echo", &[prefix.clone(), rounds.to_string()])?;
    let publisher = ice(ping.publisher_builder().create(), "ping publisher")?;
    let mut seq: u64 = 0;
    let samples = measure(counts, 1, || {
        seq += 1;
        ice(publisher.send_copy(seq), "send ping")?;
        match receive_spinning(&subscriber, "pong")? {
            v if v == seq => Ok(()),
            other => Err(format!("iceoryx2: pong {other}, expected {seq}")),
        }
    })?;
    child.finish()?;
    Ok(samples)
}

/// Spins (up to the harness's patience) until `subscriber` receives a sample; `what` names
/// it in errors.
fn receive_spinning(
    subscriber: &iceoryx2::port::subscriber::Subscriber<ipc::Service, u64, ()>,
    what: &str,
) -> Result<u64> {
    let mut got = None;
    let mut err = None;
    spin_until(PATIENCE, || match subscriber.receive() {
        Ok(Some(s)) => {
            got = Some(*s);
            true
        }
        Ok(None) => false,
        Err(e) => {
            err = Some(format!("iceoryx2: receive {what}: {e:?}"));
            true
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    got.ok_or_else(|| format!("iceoryx2: no {what}"))
}

/// The child half of [`pubsub_ping_pong`].
pub fn pubsub_echo(prefix: &str, rounds: usize) -> Result<()> {
    let node = node()?;
    let ping = ice(
        node.service_builder(&service_name(prefix, "ping")?)
            .publish_subscribe::<u64>()
            .open_or_create(),
        "ping service",
    )?;
    let pong = ice(
        node.service_builder(&service_name(prefix, "pong")?)
            .publish_subscribe::<u64>()
            .open_or_create(),
        "pong service",
    )?;
    let subscriber = ice(ping.subscriber_builder().create(), "ping subscriber")?;
    let publisher = ice(pong.publisher_builder().create(), "pong publisher")?;
    println!("ready");
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| e.to_string())?;
    for _ in 0..rounds {
        let v = receive_spinning(&subscriber, "ping")?;
        ice(publisher.send_copy(v), "send pong")?;
    }
    wait_eof()
}
