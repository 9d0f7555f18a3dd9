//! The residency planner.

use crate::errors::IntoPyResult;
use crate::types::ACCESS;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tensorstream_core::{PlannerConfig, PressureMode, ResidencyPlanner, Strategy};

fn strategy(s: &str) -> PyResult<Strategy> {
    match s {
        "none" => Ok(Strategy::None),
        "next_layer" => Ok(Strategy::NextLayer),
        "adaptive" => Ok(Strategy::Adaptive),
        _ => Err(PyValueError::new_err(format!(
            "unknown strategy '{s}' (none, next_layer, adaptive)"
        ))),
    }
}

fn mode(s: &str) -> PyResult<PressureMode> {
    match s {
        "conservative" => Ok(PressureMode::Conservative),
        "balanced" => Ok(PressureMode::Balanced),
        "aggressive" => Ok(PressureMode::Aggressive),
        _ => Err(PyValueError::new_err(format!(
            "unknown mode '{s}' (conservative, balanced, aggressive)"
        ))),
    }
}

/// Decides which units stay resident within a byte budget and what to prefetch.
#[pyclass(name = "Planner", module = "tensorstream._core")]
pub struct PyPlanner {
    inner: ResidencyPlanner,
}

#[pymethods]
impl PyPlanner {
    #[new]
    fn new(sizes: Vec<u64>, budget: u64, strategy_name: &str, mode_name: &str) -> PyResult<Self> {
        let cfg = PlannerConfig {
            budget,
            strategy: strategy(strategy_name)?,
            mode: mode(mode_name)?,
        };
        Ok(PyPlanner {
            inner: ResidencyPlanner::new(sizes, cfg).py()?,
        })
    }

    /// Smallest budget that works for these sizes and settings.
    #[staticmethod]
    fn min_budget(sizes: Vec<u64>, strategy_name: &str, mode_name: &str) -> PyResult<u64> {
        Ok(ResidencyPlanner::min_budget(
            &sizes,
            strategy(strategy_name)?,
            mode(mode_name)?,
        ))
    }

    /// Bytes available to units now (the budget, or less while memory pressure shrinks it).
    #[getter]
    fn budget(&self) -> u64 {
        self.inner.budget()
    }

    /// (evicted units, budget set): make `budget` bytes the units' budget, evicting units not
    /// in use until the resident ones fit. Never below the largest unit or the units in use.
    fn set_budget(&mut self, budget: u64) -> (Vec<u32>, u64) {
        self.inner.set_budget(budget)
    }

    fn begin_pass(&mut self) {
        self.inner.begin_pass();
    }

    /// (evict, prefetch): the pass ended; prefetch the next one's first units into the room
    /// the budget has while nothing runs.
    fn end_pass(&mut self) -> (Vec<u32>, Vec<u32>) {
        self.inner.end_pass()
    }

    /// Access(hit, prefetched, load, evict, prefetch, pressure_evicted_bytes): what an
    /// access to `unit`, about to run, needs done.
    fn access<'py>(&mut self, py: Python<'py>, unit: u32) -> PyResult<Bound<'py, PyAny>> {
        let a = self.inner.access(unit).py()?;
        let answer = (
            a.hit,
            a.prefetched,
            a.load,
            a.evict,
            a.prefetch,
            a.pressure_evicted_bytes,
        );
        ACCESS.make(py, answer)
    }

    /// Units to evict now that `unit` has run.
    fn release(&mut self, unit: u32) -> PyResult<Vec<u32>> {
        self.inner.release(unit).py()
    }

    /// Evict everything; returns the units that were resident.
    fn reset(&mut self) -> Vec<u32> {
        self.inner.reset()
    }

    fn kept(&self) -> Vec<u32> {
        self.inner.kept()
    }

    fn resident(&self) -> Vec<u32> {
        self.inner.resident()
    }

    fn learned_order(&self) -> Option<Vec<u32>> {
        self.inner.learned_order().map(|o| o.to_vec())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits.clone())?;
        d.set_item("prefetch_hits", s.prefetch_hits.clone())?;
        d.set_item("misses", s.misses.clone())?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("prefetches", s.prefetches)?;
        d.set_item("pressure_events", s.pressure_events)?;
        d.set_item("used", s.used)?;
        d.set_item("peak_used", s.peak_used)?;
        d.set_item("passes", s.passes)?;
        Ok(d)
    }
}
