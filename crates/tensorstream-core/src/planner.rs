//! The residency planner: which units stay resident within a byte budget, which are
//! evicted, and what to prefetch how far ahead.
//!
//! Inference repeats the same access order every forward pass. An LRU cache smaller than
//! that cycle misses on every access: the unit it evicts is always the one needed next.
//! `ADAPTIVE` learns the order during the first pass and from then on keeps a fixed subset
//! resident (what Belady's rule converges to on a cyclic order), streaming the rest through
//! a small window that is prefetched ahead, across pass boundaries too.
//!
//! The planner does no I/O. The caller reports accesses and releases, and carries out the
//! evictions and loads the planner returns. Its invariant: the bytes of resident and
//! in-flight units never exceed the budget, checked after every operation.

use crate::error::{Error, Result};

/// How units are prefetched (the seed README's `PrefetchStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// No prefetch; LRU eviction.
    None,
    /// Prefetch the next unit in registration order; LRU eviction.
    NextLayer,
    /// Learn the access order in the first pass; keep a fixed subset resident and
    /// prefetch the streamed units ahead, following the learned order.
    Adaptive,
}

/// How eagerly memory is used (the seed README's `MemoryPressureMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureMode {
    /// Streamed units are evicted as soon as they have run, so between passes only the
    /// kept set is resident; prefetch one unit ahead.
    Conservative,
    /// Streamed units are evicted lazily when room is needed; prefetch one unit ahead.
    Balanced,
    /// As Balanced, with a two-unit prefetch window: more latency hidden, one unit fewer kept.
    Aggressive,
}

impl PressureMode {
    /// Units streamed at once: the running one plus the prefetch depth.
    pub fn window_slots(self) -> u64 {
        match self {
            PressureMode::Conservative | PressureMode::Balanced => 2,
            PressureMode::Aggressive => 3,
        }
    }
}

/// Planner settings.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// Bytes available to units (resident plus in flight).
    pub budget: u64,
    /// Prefetch strategy.
    pub strategy: Strategy,
    /// Memory pressure mode.
    pub mode: PressureMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    /// Prefetched, not yet accessed.
    Loading,
    Resident,
}

/// What the caller must do for one access.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The unit was resident from an earlier access (no load needed).
    pub hit: bool,
    /// The unit was prefetched and not yet used (wait for its load).
    pub prefetched: bool,
    /// The unit must be loaded now, on demand.
    pub load: bool,
    /// Units to evict first (cancel their loads if still loading).
    pub evict: Vec<u32>,
    /// Units to start loading in the background, in this order.
    pub prefetch: Vec<u32>,
    /// Bytes evicted on the demand path to make room (budget pressure), 0 if none.
    pub pressure_evicted_bytes: u64,
}

/// Per-unit and total counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannerStats {
    /// Accesses that found the unit resident.
    pub hits: Vec<u64>,
    /// Accesses that found the unit prefetched (loaded or loading).
    pub prefetch_hits: Vec<u64>,
    /// Accesses that had to load the unit on demand.
    pub misses: Vec<u64>,
    /// Units evicted.
    pub evictions: u64,
    /// Prefetches issued.
    pub prefetches: u64,
    /// Demand accesses that had to evict to make room.
    pub pressure_events: u64,
    /// Bytes resident or in flight now.
    pub used: u64,
    /// Highest `used` seen.
    pub peak_used: u64,
    /// Completed passes.
    pub passes: u64,
}

/// Decides residency and prefetch for a set of units within a budget.
#[derive(Debug, Clone)]
pub struct ResidencyPlanner {
    sizes: Vec<u64>,
    cfg: PlannerConfig,
    state: Vec<State>,
    in_use: Vec<u32>,
    last_use: Vec<u64>,
    clock: u64,
    used: u64,
    stats: PlannerStats,
    current_pass: Vec<u32>,
    learned: Option<Learned>,
    keep: Vec<bool>,
}

#[derive(Debug, Clone)]
struct Learned {
    order: Vec<u32>,
    /// For each unit, the positions where it occurs in `order`.
    occurrences: Vec<Vec<usize>>,
}

impl Learned {
    fn new(order: Vec<u32>, n: usize) -> Self {
        let mut occurrences = vec![Vec::new(); n];
        for (i, &u) in order.iter().enumerate() {
            occurrences[u as usize].push(i);
        }
        Learned { order, occurrences }
    }

    /// Steps from position `pos` until unit `u` is next used (cyclically), or None.
    fn distance(&self, pos: usize, u: u32) -> Option<usize> {
        let occ = &self.occurrences[u as usize];
        let n = self.order.len();
        let first_after = occ.iter().find(|&&p| p > pos).copied();
        match first_after {
            Some(p) => Some(p - pos),
            None => occ.first().map(|&p| p + n - pos),
        }
    }
}

impl ResidencyPlanner {
    /// A planner for units of the given sizes. Fails if the budget cannot hold the
    /// largest unit plus the prefetch window.
    pub fn new(sizes: Vec<u64>, cfg: PlannerConfig) -> Result<Self> {
        let n = sizes.len();
        if n > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{n} units, more than a planner handles"
            )));
        }
        let need = Self::min_budget(&sizes, cfg.strategy, cfg.mode);
        if n > 0 && cfg.budget < need {
            let largest = sizes.iter().copied().max().unwrap_or(0);
            return Err(Error::Budget {
                budget: cfg.budget,
                reason: format!(
                    "the largest unit takes {largest} bytes and the {:?} prefetch window holds up to {} units, {need} bytes",
                    cfg.strategy,
                    Self::slots_for(&cfg).min(n as u64)
                ),
            });
        }
        Ok(ResidencyPlanner {
            state: vec![State::Absent; n],
            in_use: vec![0; n],
            last_use: vec![0; n],
            keep: vec![false; n],
            clock: 0,
            used: 0,
            stats: PlannerStats {
                hits: vec![0; n],
                prefetch_hits: vec![0; n],
                misses: vec![0; n],
                ..Default::default()
            },
            current_pass: Vec::new(),
            learned: None,
            sizes,
            cfg,
        })
    }

    fn slots_for(cfg: &PlannerConfig) -> u64 {
        match cfg.strategy {
            Strategy::None => 1,
            Strategy::NextLayer => 2,
            Strategy::Adaptive => cfg.mode.window_slots(),
        }
    }

    /// The smallest budget that works for these sizes and settings: what the streaming
    /// window can hold at once, the running unit plus its prefetches, that is the sum of the
    /// `slots` largest units (all of them when there are fewer distinct units than slots, so
    /// one shared block needs only its own size).
    pub fn min_budget(sizes: &[u64], strategy: Strategy, mode: PressureMode) -> u64 {
        let cfg = PlannerConfig {
            budget: 0,
            strategy,
            mode,
        };
        let mut sorted = sizes.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted
            .iter()
            .take(Self::slots_for(&cfg) as usize)
            .fold(0u64, |acc, &s| acc.saturating_add(s))
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// True when there are no units.
    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// The counters.
    pub fn stats(&self) -> &PlannerStats {
        &self.stats
    }

    /// Units the planner keeps resident across passes (empty until ADAPTIVE has learned).
    pub fn kept(&self) -> Vec<u32> {
        (0..self.sizes.len() as u32)
            .filter(|&u| self.keep[u as usize])
            .collect()
    }

    /// Units resident or loading now.
    pub fn resident(&self) -> Vec<u32> {
        (0..self.sizes.len() as u32)
            .filter(|&u| self.state[u as usize] != State::Absent)
            .collect()
    }

    /// The learned order of one pass, once learned.
    pub fn learned_order(&self) -> Option<&[u32]> {
        self.learned.as_ref().map(|l| l.order.as_slice())
    }

    /// Mark the start of a forward pass. The first complete pass teaches ADAPTIVE the order.
    pub fn begin_pass(&mut self) {
        if !self.current_pass.is_empty() {
            self.stats.passes += 1;
            if self.cfg.strategy == Strategy::Adaptive && self.learned.is_none() {
                let order = std::mem::take(&mut self.current_pass);
                self.learned = Some(Learned::new(order, self.sizes.len()));
                self.choose_kept();
            }
        }
        self.current_pass.clear();
        // A pass starts with no unit running; an exception in the previous pass may have
        // skipped some releases.
        self.in_use.iter_mut().for_each(|c| *c = 0);
    }

    /// The forward pass ended, and nothing runs until the next one begins (a draft drafts,
    /// the caller samples). With a learned order, and unless CONSERVATIVE (which keeps only
    /// the kept set between passes), prefetch the next pass's first units into all the room
    /// the budget has, not just the window: each may evict only units needed later than
    /// itself (the tail of the pass that just ran), so the disk works while the model waits.
    /// Returns the units to evict, then those to start loading, in order.
    pub fn end_pass(&mut self) -> (Vec<u32>, Vec<u32>) {
        let (mut evict, mut prefetch) = (Vec::new(), Vec::new());
        let idle = self.in_use.iter().all(|&c| c == 0);
        if self.cfg.strategy != Strategy::Adaptive
            || self.cfg.mode == PressureMode::Conservative
            || self.learned.is_none()
            || !idle
        {
            return (evict, prefetch);
        }
        let Some(&last) = self.current_pass.last() else {
            return (evict, prefetch);
        };
        let mut seen = vec![false; self.sizes.len()];
        for v in self.upcoming(last) {
            let vi = v as usize;
            if std::mem::replace(&mut seen[vi], true) || self.state[vi] != State::Absent {
                continue;
            }
            if self
                .make_room(self.sizes[vi], v, false, &mut evict)
                .is_none()
            {
                break;
            }
            self.state[vi] = State::Loading;
            self.add_used(self.sizes[vi]);
            self.stats.prefetches += 1;
            prefetch.push(v);
        }
        (evict, prefetch)
    }

    /// Fill the budget, minus the streaming window, with the most-used units.
    fn choose_kept(&mut self) {
        let Some(l) = &self.learned else { return };
        let mut counts = vec![0usize; self.sizes.len()];
        for &u in &l.order {
            counts[u as usize] += 1;
        }
        let mut candidates: Vec<u32> = (0..self.sizes.len() as u32)
            .filter(|&u| counts[u as usize] > 0)
            .collect();
        // Most accesses first; then order of first use.
        candidates.sort_by_key(|&u| {
            (
                std::cmp::Reverse(counts[u as usize]),
                l.occurrences[u as usize][0],
            )
        });
        let streamed_max = |keep: &[bool]| {
            candidates
                .iter()
                .filter(|&&u| !keep[u as usize])
                .map(|&u| self.sizes[u as usize])
                .max()
                .unwrap_or(0)
        };
        let slots = self.cfg.mode.window_slots();
        let mut keep = vec![false; self.sizes.len()];
        let mut kept_bytes = 0u64;
        for &u in &candidates {
            let size = self.sizes[u as usize];
            keep[u as usize] = true;
            let window = streamed_max(&keep) * slots;
            if kept_bytes + size + window > self.cfg.budget {
                keep[u as usize] = false;
                continue;
            }
            kept_bytes += size;
        }
        self.keep = keep;
    }

    fn position(&self) -> Option<usize> {
        let l = self.learned.as_ref()?;
        let pos = self.current_pass.len().checked_sub(1)?;
        let u = *self.current_pass.last()?;
        if l.order.get(pos) == Some(&u) {
            return Some(pos);
        }
        // The order diverged: continue from the unit's nearest occurrence.
        l.occurrences[u as usize]
            .iter()
            .copied()
            .min_by_key(|&p| p.abs_diff(pos))
    }

    /// Record an access to unit `u`, which is about to run.
    pub fn access(&mut self, u: u32) -> Result<Access> {
        let ui = self.check(u)?;
        self.clock += 1;
        self.current_pass.push(u);
        let mut acc = Access::default();
        match self.state[ui] {
            State::Resident => {
                acc.hit = true;
                self.stats.hits[ui] += 1;
            }
            State::Loading => {
                acc.prefetched = true;
                self.stats.prefetch_hits[ui] += 1;
                self.state[ui] = State::Resident;
            }
            State::Absent => {
                acc.load = true;
                self.stats.misses[ui] += 1;
                let before = acc.evict.len();
                self.make_room(self.sizes[ui], u, true, &mut acc.evict).ok_or_else(|| Error::Budget {
                    budget: self.cfg.budget,
                    reason: format!(
                        "unit {u} needs {} bytes but only {} are free and everything else resident is in use",
                        self.sizes[ui],
                        self.cfg.budget - self.used
                    ),
                })?;
                if acc.evict.len() > before {
                    acc.pressure_evicted_bytes = acc.evict[before..]
                        .iter()
                        .map(|&v| self.sizes[v as usize])
                        .sum();
                    self.stats.pressure_events += 1;
                }
                self.state[ui] = State::Resident;
                self.add_used(self.sizes[ui]);
            }
        }
        self.in_use[ui] += 1;
        self.last_use[ui] = self.clock;
        self.plan_prefetch(u, &mut acc);
        Ok(acc)
    }

    /// Unit `u` has finished running. Returns units to evict now (CONSERVATIVE mode).
    pub fn release(&mut self, u: u32) -> Result<Vec<u32>> {
        let ui = self.check(u)?;
        if self.in_use[ui] == 0 {
            return Err(Error::InvalidArgument(format!(
                "unit {u} released more often than accessed"
            )));
        }
        self.in_use[ui] -= 1;
        let mut evict = Vec::new();
        if self.cfg.mode == PressureMode::Conservative && self.in_use[ui] == 0 && !self.keep[ui] {
            self.evict(u, &mut evict);
        }
        Ok(evict)
    }

    /// Forget a unit's residency after its load failed, so the next access loads it again.
    pub fn forget(&mut self, u: u32) -> Result<()> {
        let ui = self.check(u)?;
        if self.state[ui] != State::Absent {
            self.state[ui] = State::Absent;
            self.used -= self.sizes[ui];
            self.stats.used = self.used;
        }
        self.in_use[ui] = 0;
        Ok(())
    }

    /// The bytes available to units now: the configured budget, or less while memory
    /// pressure made it yield ([`ResidencyPlanner::set_budget`]).
    pub fn budget(&self) -> u64 {
        self.cfg.budget
    }

    /// Change the bytes available to units (memory pressure shrinks it, recovery grows it
    /// back). The kept set is chosen again for the new budget, then units not in use are
    /// evicted, needed furthest ahead first and kept units last, until what is resident fits.
    /// The budget never goes below the largest unit (one unit must always fit) nor below
    /// the units in use now (they are running). Returns the evicted units and the budget set.
    pub fn set_budget(&mut self, budget: u64) -> (Vec<u32>, u64) {
        let largest = self.sizes.iter().copied().max().unwrap_or(0);
        self.cfg.budget = budget.max(largest);
        self.choose_kept();
        let mut evicted = Vec::new();
        if self.used > self.cfg.budget {
            let pos = self.position();
            let mut victims: Vec<(u32, (bool, u64))> = (0..self.sizes.len() as u32)
                .filter(|&v| {
                    self.state[v as usize] != State::Absent && self.in_use[v as usize] == 0
                })
                .map(|v| {
                    let later = match (&self.learned, pos) {
                        (Some(l), Some(p)) => l.distance(p, v).map_or(u64::MAX, |d| d as u64),
                        _ => u64::MAX - self.last_use[v as usize],
                    };
                    (v, (self.keep[v as usize], u64::MAX - later))
                })
                .collect();
            victims.sort_by_key(|&(_, k)| k);
            for (v, _) in victims {
                if self.used <= self.cfg.budget {
                    break;
                }
                self.evict(v, &mut evicted);
            }
        }
        self.cfg.budget = self.cfg.budget.max(self.used);
        (evicted, self.cfg.budget)
    }

    /// Evict everything (the device changed, or the model is being torn down).
    pub fn reset(&mut self) -> Vec<u32> {
        let all = self.resident();
        for &u in &all {
            self.state[u as usize] = State::Absent;
            self.in_use[u as usize] = 0;
        }
        self.used = 0;
        self.stats.used = 0;
        all
    }

    fn check(&self, u: u32) -> Result<usize> {
        let ui = u as usize;
        if ui >= self.sizes.len() {
            return Err(Error::InvalidArgument(format!(
                "unit {u} out of range ({} units)",
                self.sizes.len()
            )));
        }
        Ok(ui)
    }

    fn add_used(&mut self, bytes: u64) {
        self.used += bytes;
        assert!(
            self.used <= self.cfg.budget,
            "planner exceeded its budget: {} > {}",
            self.used,
            self.cfg.budget
        );
        self.stats.used = self.used;
        self.stats.peak_used = self.stats.peak_used.max(self.used);
    }

    fn evict(&mut self, v: u32, out: &mut Vec<u32>) {
        let vi = v as usize;
        debug_assert_ne!(self.state[vi], State::Absent);
        self.state[vi] = State::Absent;
        self.used -= self.sizes[vi];
        self.stats.used = self.used;
        self.stats.evictions += 1;
        out.push(v);
    }

    /// Evict until `need` bytes are free. On the demand path anything not in use may go,
    /// kept units last; a prefetch may only evict units needed later than `for_unit`.
    /// Returns None (evicting nothing) if it cannot make room.
    fn make_room(
        &mut self,
        need: u64,
        for_unit: u32,
        demand: bool,
        out: &mut Vec<u32>,
    ) -> Option<()> {
        if self.cfg.budget - self.used >= need {
            return Some(());
        }
        let pos = self.position();
        let for_distance = match (&self.learned, pos) {
            (Some(l), Some(p)) => l.distance(p, for_unit),
            _ => None,
        };
        // Rank victims: best victim first.
        let mut victims: Vec<(u32, (bool, bool, u64))> = Vec::new();
        for v in 0..self.sizes.len() as u32 {
            let vi = v as usize;
            if v == for_unit || self.state[vi] == State::Absent || self.in_use[vi] > 0 {
                continue;
            }
            let kept = self.keep[vi];
            let loading = self.state[vi] == State::Loading;
            // Larger "later" = better victim.
            let later = match (&self.learned, pos) {
                (Some(l), Some(p)) if self.cfg.strategy == Strategy::Adaptive => {
                    l.distance(p, v).map_or(u64::MAX, |d| d as u64)
                }
                _ => u64::MAX - self.last_use[vi], // LRU
            };
            if !demand {
                if kept {
                    continue;
                }
                match (for_distance, &self.learned) {
                    (Some(fd), Some(l)) => {
                        let vd = pos.and_then(|p| l.distance(p, v)).unwrap_or(usize::MAX);
                        if vd <= fd {
                            continue;
                        }
                    }
                    _ => {
                        if loading {
                            continue;
                        }
                    }
                }
            }
            victims.push((v, (kept, loading, u64::MAX - later)));
        }
        victims.sort_by_key(|&(_, k)| k);
        let mut free = self.cfg.budget - self.used;
        let mut chosen = Vec::new();
        for (v, _) in victims {
            if free >= need {
                break;
            }
            free += self.sizes[v as usize];
            chosen.push(v);
        }
        if free < need {
            return None;
        }
        for v in chosen {
            self.evict(v, out);
        }
        Some(())
    }

    /// The units expected after the current one, in order, for at most one cycle.
    fn upcoming(&self, u: u32) -> Vec<u32> {
        let n = self.sizes.len();
        match (self.cfg.strategy, &self.learned, self.position()) {
            (Strategy::Adaptive, Some(l), Some(p)) => {
                let len = l.order.len();
                (1..len).map(|k| l.order[(p + k) % len]).collect()
            }
            _ => ((u as usize + 1)..n).map(|v| v as u32).collect(),
        }
    }

    fn plan_prefetch(&mut self, u: u32, acc: &mut Access) {
        let depth = match self.cfg.strategy {
            Strategy::None => return,
            Strategy::NextLayer => 1,
            Strategy::Adaptive => self.cfg.mode.window_slots() - 1,
        } as usize;
        let mut issued = 0usize;
        let mut seen = vec![false; self.sizes.len()];
        for v in self.upcoming(u) {
            let vi = v as usize;
            if std::mem::replace(&mut seen[vi], true) {
                continue;
            }
            if self.state[vi] != State::Absent {
                if !self.keep[vi] {
                    // A streamed unit already on its way counts against the depth.
                    issued += 1;
                }
                if issued >= depth {
                    break;
                }
                continue;
            }
            if issued >= depth {
                break;
            }
            let mut evicted = Vec::new();
            if self
                .make_room(self.sizes[vi], v, false, &mut evicted)
                .is_none()
            {
                break;
            }
            acc.evict.extend(evicted);
            self.state[vi] = State::Loading;
            self.add_used(self.sizes[vi]);
            self.stats.prefetches += 1;
            acc.prefetch.push(v);
            issued += 1;
        }
    }
}
