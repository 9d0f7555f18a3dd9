//! TensorStream's core: everything between a file on disk and a buffer in memory.
//!
//! - [`codec`]: lossless coding of stored units (byte grouping and zstd, per chunk);
//! - [`store`]: the aligned store format (writer, validating reader, checksums) and a
//!   read-only view of safetensors checkpoints;
//! - [`io`]: the backends that read byte ranges into caller memory (mmap, pread with O_DIRECT);
//! - [`engine`]: the worker pool that serves read requests with priorities and cancellation;
//! - [`planner`]: the residency planner that decides what stays resident within a budget.
//!
//! The core knows nothing of Python, torch or CUDA: it reads into memory the caller hands it,
//! as a pointer and a length.
#![deny(missing_docs)]

pub mod codec;
pub mod engine;
pub mod error;
pub mod io;
pub mod planner;
pub mod store;

pub use engine::{Engine, EngineConfig, EngineStats, Priority, Ticket};
pub use error::{Error, Result};
pub use planner::{Access, PlannerConfig, PlannerStats, PressureMode, ResidencyPlanner, Strategy};
