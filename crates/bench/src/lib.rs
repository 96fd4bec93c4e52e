//! faultline's benchmarks. Each one measures our implementation and its anchor (the floor or
//! the competitor) in the same run, on the same machine, and reports one JSON object per line.
//! They are not tests: they assert nothing about speed; `faultline bench ...` runs them.

pub mod irq_bench;
pub mod local_fault;
pub mod migrate_bench;
pub mod report;
pub mod restore_bench;
pub mod uffd_bench;
pub mod vfu_bench;
pub mod virtio_bench;
pub mod vm_bench;

use thiserror::Error;

/// Running a benchmark.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Setting up memory.
    #[error("cannot set up benchmark memory")]
    Map(#[source] memx::MapError),
    /// Creating or registering a userfaultfd.
    #[error("userfaultfd setup failed: {0}")]
    Uffd(String),
    /// The fault loop failed.
    #[error("fault loop failed")]
    Loop(#[source] memx::LoopError),
    /// A thread failed or data was wrong.
    #[error("benchmark run failed: {0}")]
    Run(String),
}
