//! Jobs: the pieces of submitted requests, each with its ticket; the priorities requests
//! are submitted with; and the two priority queues workers take jobs from.

use super::pieces::Piece;
use super::tickets::TicketInner;
use std::collections::VecDeque;
use std::sync::Arc;

/// Who is waiting for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Compute is (or soon will be) blocked on it.
    Demand,
    /// Read ahead of need; may be cancelled.
    Prefetch,
}

/// A piece of a submitted request, queued for a worker.
pub(super) struct Job {
    pub ticket: Arc<TicketInner>,
    pub piece: Piece,
}

/// The queued jobs of all requests, demand ahead of prefetch.
#[derive(Default)]
pub(super) struct Queues {
    demand: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    /// Set when the engine is dropped: workers exit once they find no job.
    pub shutdown: bool,
}

impl Queues {
    /// Queue `jobs` behind those of the same priority.
    pub fn push(&mut self, priority: Priority, jobs: impl IntoIterator<Item = Job>) {
        match priority {
            Priority::Demand => self.demand.extend(jobs),
            Priority::Prefetch => self.prefetch.extend(jobs),
        }
    }

    /// The next job for a worker: the first queued, demand before prefetch; for a decode
    /// worker (`coded_only`), the first coded chunk.
    pub fn take(&mut self, coded_only: bool) -> Option<Job> {
        if !coded_only {
            return self
                .demand
                .pop_front()
                .or_else(|| self.prefetch.pop_front());
        }
        for queue in [&mut self.demand, &mut self.prefetch] {
            if let Some(i) = queue.iter().position(|j| j.piece.kind.is_decode()) {
                return queue.remove(i);
            }
        }
        None
    }

    /// Move the queued prefetch jobs of `ticket` behind the demand jobs; returns whether
    /// there were any.
    pub fn promote(&mut self, ticket: &Arc<TicketInner>) -> bool {
        let before = self.prefetch.len();
        let (mine, rest): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut self.prefetch)
            .into_iter()
            .partition(|j| Arc::ptr_eq(&j.ticket, ticket));
        self.prefetch = rest;
        let promoted = self.prefetch.len() != before;
        self.demand.extend(mine);
        promoted
    }

    /// Drop the queued jobs of `ticket`; returns how many there were.
    pub fn remove(&mut self, ticket: &Arc<TicketInner>) -> usize {
        let mut removed = 0;
        for queue in [&mut self.demand, &mut self.prefetch] {
            let before = queue.len();
            queue.retain(|j| !Arc::ptr_eq(&j.ticket, ticket));
            removed += before - queue.len();
        }
        removed
    }

    /// Take every queued job, demand first.
    pub fn drain(&mut self) -> Vec<Job> {
        self.demand
            .drain(..)
            .chain(self.prefetch.drain(..))
            .collect()
    }
}
