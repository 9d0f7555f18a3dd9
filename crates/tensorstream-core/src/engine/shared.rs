//! The state the engine shares with its workers: the backend, the job queues and the
//! condition workers wait on, the counters, and the span of time some worker has a job
//! (what `active_ns` measures).

use super::counters::Counters;
use super::jobs::Queues;
use crate::io::ReadBackend;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Workers with a job now, and since when at least one has had one: what `active_ns`
/// is measured from.
#[derive(Default)]
struct Activity {
    working: usize,
    since: Option<Instant>,
}

pub(super) struct Shared {
    pub backend: Arc<dyn ReadBackend>,
    pub queues: Mutex<Queues>,
    pub work: Condvar,
    pub counters: Counters,
    activity: Mutex<Activity>,
}

impl Shared {
    /// The state of an engine reading through `backend`: no job queued, counters at zero.
    pub fn new(backend: Arc<dyn ReadBackend>) -> Self {
        Shared {
            backend,
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            counters: Counters::default(),
            activity: Mutex::new(Activity::default()),
        }
    }

    /// A worker starts a job.
    pub fn job_started(&self) {
        let mut a = self.activity.lock().expect("activity poisoned");
        a.working += 1;
        if a.working == 1 {
            a.since = Some(Instant::now());
        }
    }

    /// `active_ns` now: the spans ended, and the one in progress (read under the lock
    /// the spans end under, so none is missed or counted twice).
    pub fn active_ns(&self) -> u64 {
        let a = self.activity.lock().expect("activity poisoned");
        let now = a.since.map_or(0, |t0| t0.elapsed().as_nanos() as u64);
        self.counters.active_ns.load(Ordering::Relaxed) + now
    }

    /// A worker ends a job: the last one to end adds the span since the first started.
    pub fn job_ended(&self) {
        let mut a = self.activity.lock().expect("activity poisoned");
        a.working -= 1;
        if a.working == 0 {
            if let Some(t0) = a.since.take() {
                let ns = t0.elapsed().as_nanos() as u64;
                self.counters.active_ns.fetch_add(ns, Ordering::Relaxed);
            }
        }
    }
}
