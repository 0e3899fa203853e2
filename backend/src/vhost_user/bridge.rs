//! [`Arbitration`] by the region's event loop: the device's threads hand each call to the
//! loop (a channel and an eventfd it watches) and wait for the answer. The loop is the only
//! thread that touches the arbiter, as for every other peer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vshm_format::layout::{Request, Response};
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use super::{Arbitration, Listeners, Notices};
use crate::arbiter::{Arbiter, ProxyHold, ProxyListed};
use crate::region::Region;

/// How long a device waits for the loop before answering INSUFFICIENT_RESOURCES.
pub const LOOP_PATIENCE: Duration = Duration::from_secs(10);

/// What the loop lends a call: the arbiter and the peer ids of the region's server.
pub trait Host {
    /// The region's arbiter.
    fn arbiter(&mut self) -> &mut Arbiter<Region>;
    /// A peer id no ivshmem client has or will be given while the VM holds it.
    fn reserve_id(&mut self) -> Option<PeerId>;
    /// The VM that had `id` is gone.
    fn release_id(&mut self, id: PeerId);
    /// Gives vhost-user VM `id` its policy (the rules' socket is `vhost-user`).
    fn grant(&mut self, id: PeerId);
}

type Job = Box<dyn FnOnce(&mut dyn Host) + Send>;

/// The devices' side.
#[derive(Debug)]
pub struct Bridge {
    jobs: mpsc::Sender<Job>,
    bell: EventFd,
    patience: Duration,
    listeners: Listeners,
    stopped: Arc<AtomicBool>,
}

/// The loop's side: watch [`Jobs::bell`], then [`Jobs::run`].
#[derive(Debug)]
pub struct Jobs {
    jobs: mpsc::Receiver<Job>,
    bell: EventFd,
    listeners: Listeners,
    stopped: Arc<AtomicBool>,
}

impl Drop for Jobs {
    fn drop(&mut self) {
        // The loop is gone: the accept loop takes no more VMs.
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// A connected pair.
pub fn bridge() -> std::io::Result<(Arc<Bridge>, Jobs)> {
    bridge_with_patience(LOOP_PATIENCE)
}

/// [`bridge`] whose calls wait `patience` for the loop (tests).
pub fn bridge_with_patience(patience: Duration) -> std::io::Result<(Arc<Bridge>, Jobs)> {
    let (tx, rx) = mpsc::channel();
    let bell = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
    let listeners = Listeners::default();
    let stopped = Arc::new(AtomicBool::new(false));
    Ok((
        Arc::new(Bridge {
            jobs: tx,
            bell: bell.try_clone()?,
            patience,
            listeners: listeners.clone(),
            stopped: Arc::clone(&stopped),
        }),
        Jobs {
            jobs: rx,
            bell,
            listeners,
            stopped,
        },
    ))
}

impl Jobs {
    /// Readable when calls wait.
    pub fn bell(&self) -> &EventFd {
        &self.bell
    }

    /// Runs every waiting call against `host`.
    pub fn run(&self, host: &mut dyn Host) {
        let _ = self.bell.read();
        while let Ok(job) = self.jobs.try_recv() {
            job(host);
        }
    }

    /// Tells the VMs what is new for them, if anything happened since the last look (call
    /// after every event the loop handled).
    pub fn deliver(&self, host: &mut dyn Host) {
        self.listeners.deliver(host.arbiter());
    }

    /// The loop is stopping: the accept loop takes no more VMs.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// Where a call's answer meets its caller. Decided under one lock: an answer is either
/// taken by the caller or undone by the loop, never lost between the two (a channel left a
/// window in which a late answer went into a receiver nobody read again).
enum Handoff<R> {
    Waiting,
    Answered(R),
    /// The caller stopped waiting: the loop undoes what it answers.
    GaveUp,
}

struct Rendezvous<R> {
    state: Mutex<Handoff<R>>,
    answered: Condvar,
}

impl Bridge {
    /// Runs `f` on the loop and returns its result; if the caller stopped waiting before the
    /// loop got to it (the loop was busy past the patience), `undo` runs on the loop with
    /// the result instead, so nothing the caller never learnt of (an id, a hold) stays.
    fn call_or_undo<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Host) -> R + Send + 'static,
        undo: impl FnOnce(&mut dyn Host, R) + Send + 'static,
    ) -> Option<R> {
        let meet = Arc::new(Rendezvous {
            state: Mutex::new(Handoff::Waiting),
            answered: Condvar::new(),
        });
        let theirs = Arc::clone(&meet);
        let job: Job = Box::new(move |host| {
            let result = f(host);
            let mut state = theirs.state.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(*state, Handoff::GaveUp) {
                drop(state);
                undo(host, result);
            } else {
                *state = Handoff::Answered(result);
                theirs.answered.notify_one();
            }
        });
        self.jobs.send(job).ok()?;
        self.bell.write(1).ok()?;
        let deadline = Instant::now() + self.patience;
        let mut state = meet.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Handoff::Answered(_) = *state {
                if let Handoff::Answered(r) = std::mem::replace(&mut *state, Handoff::GaveUp) {
                    return Some(r);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *state = Handoff::GaveUp;
                return None;
            }
            state = meet
                .answered
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Host) -> R + Send + 'static,
    ) -> Option<R> {
        self.call_or_undo(f, |_, _| {})
    }
}

fn unanswered() -> Box<Response> {
    Box::new(vshm_format::mailbox::status_response(
        Status::InsufficientResources,
    ))
}

impl Arbitration for Bridge {
    fn connect(&self, notices: Arc<Notices>) -> Result<PeerId, Status> {
        // A loop that is gone answers nothing: the region stopped.
        let listeners = self.listeners.clone();
        let undo_listeners = self.listeners.clone();
        self.call_or_undo(
            move |h| {
                let id = h.reserve_id().ok_or(Status::InsufficientResources)?;
                match h.arbiter().proxy_connected(id) {
                    Ok(_) => {
                        h.grant(id);
                        listeners.add(id, notices);
                        Ok(id)
                    }
                    Err(_) => {
                        h.release_id(id);
                        Err(Status::InsufficientResources)
                    }
                }
            },
            move |h, late| {
                if let Ok(id) = late {
                    undo_listeners.remove(id);
                    h.arbiter().peer_gone(id);
                    h.release_id(id);
                }
            },
        )
        .unwrap_or(Err(Status::InvalidHandle))
    }
    fn create(&self, vm: PeerId, req: &Request) -> Result<ProxyHold, Box<Response>> {
        let req = *req;
        self.call_or_undo(
            move |h| {
                let a = h.arbiter();
                match vshm_format::mailbox::decode(&req, a.layout()) {
                    Ok(cmd) => a.proxy_create(vm, cmd),
                    Err(status) => Err(Box::new(vshm_format::mailbox::status_response(status))),
                }
            },
            move |h, late| {
                if let Ok(hold) = late {
                    let _ = h.arbiter().proxy_close(vm, hold.slot, hold.generation);
                }
            },
        )
        .unwrap_or_else(|| Err(unanswered()))
    }
    fn open(&self, vm: PeerId, name: &str) -> Result<ProxyHold, Status> {
        let name = name.to_owned();
        self.call_or_undo(
            move |h| h.arbiter().proxy_open(vm, &name),
            move |h, late| {
                if let Ok(hold) = late {
                    let _ = h.arbiter().proxy_close(vm, hold.slot, hold.generation);
                }
            },
        )
        .unwrap_or(Err(Status::InsufficientResources))
    }
    fn close(&self, vm: PeerId, slot: ObjectSlot, generation: Generation) -> Result<(), Status> {
        self.call(move |h| h.arbiter().proxy_close(vm, slot, generation))
            .unwrap_or(Err(Status::InsufficientResources))
    }
    fn request(&self, vm: PeerId, req: &Request) -> Response {
        let req = *req;
        self.call(move |h| h.arbiter().proxy_request(vm, &req))
            .unwrap_or_else(|| *unanswered())
    }
    fn signal(&self, vm: PeerId, slot: ObjectSlot, generation: Generation, reset: bool) -> Status {
        self.call(move |h| {
            let a = h.arbiter();
            if reset {
                a.proxy_reset(vm, slot, generation)
            } else {
                a.proxy_signal(vm, slot, generation)
            }
        })
        .unwrap_or(Status::InsufficientResources)
    }
    fn wait(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        seen: Option<u64>,
    ) -> Option<(Status, u64)> {
        self.call_or_undo(
            move |h| h.arbiter().proxy_wait(vm, id, slot, generation, seen),
            move |h, late| match late {
                // Nobody will hear of it: take it back, and an event it took is set again.
                None => {
                    h.arbiter().proxy_cancel_wait(vm, id);
                }
                Some((Status::Success, _)) => {
                    h.arbiter().proxy_give_back_signal(slot, generation);
                }
                Some(_) => {}
            },
        )
        .unwrap_or(Some((Status::InsufficientResources, 0)))
    }
    fn lock(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        queue: bool,
    ) -> Option<(Status, u64)> {
        self.call_or_undo(
            move |h| {
                h.arbiter()
                    .proxy_lock(vm, id, slot, generation, token, queue)
            },
            move |h, late| match late {
                // Nobody will hear of it: out of the queue, and a grant is given back.
                None => {
                    h.arbiter().proxy_cancel_wait(vm, id);
                }
                Some((granted @ (Status::Success | Status::Abandoned), _)) => {
                    h.arbiter()
                        .proxy_give_back(vm, slot, generation, token, granted);
                }
                Some(_) => {}
            },
        )
        .unwrap_or(Some((Status::InsufficientResources, 0)))
    }
    fn give_back(
        &self,
        vm: PeerId,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        granted: Status,
    ) {
        let _ = self.call(move |h| {
            h.arbiter()
                .proxy_give_back(vm, slot, generation, token, granted)
        });
    }
    fn give_back_signal(&self, slot: ObjectSlot, generation: Generation) {
        let _ = self.call(move |h| {
            h.arbiter().proxy_give_back_signal(slot, generation);
        });
    }
    fn cancel_wait(&self, vm: PeerId, id: u64) -> bool {
        // Unanswered: the loop is stuck or gone; the VM's departure drops the WAIT.
        self.call(move |h| h.arbiter().proxy_cancel_wait(vm, id))
            .unwrap_or(true)
    }
    fn list(&self, vm: PeerId) -> Result<Vec<ProxyListed>, Status> {
        self.call(move |h| h.arbiter().proxy_list(vm))
            .unwrap_or(Err(Status::InsufficientResources))
    }
    fn peers(&self, vm: PeerId) -> Result<vshm_format::virtio::PeersReply, Status> {
        self.call(move |h| h.arbiter().proxy_peers(vm))
            .unwrap_or(Err(Status::InsufficientResources))
    }
    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
    fn gone(&self, vm: PeerId) {
        self.listeners.remove(vm);
        let _ = self.call(move |h| {
            h.arbiter().peer_gone(vm);
            h.release_id(vm);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Grant;
    use vshm_format::layout::Layout;

    /// The loop's side for a test: an arbiter and the ids it handed out and got back.
    struct Loop {
        arbiter: Arbiter<Region>,
        next: u16,
        released: Vec<PeerId>,
    }

    impl Host for Loop {
        fn arbiter(&mut self) -> &mut Arbiter<Region> {
            &mut self.arbiter
        }
        fn reserve_id(&mut self) -> Option<PeerId> {
            self.next += 1;
            Some(PeerId(self.next))
        }
        fn release_id(&mut self, id: PeerId) {
            self.released.push(id);
        }
        fn grant(&mut self, id: PeerId) {
            self.arbiter
                .set_peer_grant(id, Grant::unrestricted("vhost-user"));
        }
    }

    #[test]
    fn a_call_the_loop_answers_after_its_caller_gave_up_leaves_nothing_behind() {
        let region = Region::create(1 << 20, false, false).expect("region");
        let layout = Layout::compute(1 << 20, 4, 8, 1, 4096).expect("layout");
        let mut host = Loop {
            arbiter: Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter"),
            next: 0,
            released: Vec::new(),
        };
        let (bridge, jobs) = bridge_with_patience(Duration::from_millis(20)).expect("bridge");
        let caller = std::thread::spawn(move || {
            bridge.connect(crate::vhost_user::Notices::new().expect("notices"))
        });
        // The loop is busy past the caller's patience.
        assert_eq!(caller.join().expect("caller"), Err(Status::InvalidHandle));
        jobs.run(&mut host);
        assert_eq!(host.released, vec![PeerId(1)], "the id went back");
        let connected = host
            .arbiter
            .status()
            .peers
            .iter()
            .filter(|p| p.connected)
            .count();
        assert_eq!(
            connected, 0,
            "no peer slot kept for a VM that never learnt of it"
        );
    }

    #[test]
    fn every_id_the_loop_hands_out_reaches_its_caller_or_goes_back_however_the_patience_races() {
        let region = Region::create(1 << 20, false, false).expect("region");
        let layout = Layout::compute(1 << 20, 4, 8, 1, 4096).expect("layout");
        let host = Arc::new(std::sync::Mutex::new(Loop {
            arbiter: Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter"),
            next: 0,
            released: Vec::new(),
        }));
        // A patience about as long as the loop takes: answers land on both sides of it.
        let (bridge, jobs) = bridge_with_patience(Duration::from_micros(300)).expect("bridge");
        let stop = Arc::new(AtomicBool::new(false));
        let looper = {
            let (host, stop) = (Arc::clone(&host), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut turn = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    turn += 1;
                    std::thread::sleep(Duration::from_micros(50 + (turn * 37) % 400));
                    let mut h = host.lock().expect("host");
                    jobs.run(&mut *h);
                }
                let mut h = host.lock().expect("host");
                jobs.run(&mut *h);
            })
        };
        let mut told = 0usize;
        for _ in 0..300 {
            if let Ok(id) = bridge.connect(crate::vhost_user::Notices::new().expect("notices")) {
                told += 1;
                bridge.gone(id);
            }
        }
        stop.store(true, Ordering::SeqCst);
        looper.join().expect("loop");
        let h = host.lock().expect("host");
        assert!(told > 0, "some calls were answered in time");
        assert_eq!(
            h.released.len(),
            usize::from(h.next),
            "every id handed out went back exactly once ({told} reached their callers)"
        );
    }
}
