//! What the lower layers report upward (vCPU threads, the page-fault handler's watcher, a
//! migration): a small type of their own, so none of them knows the controller.

use std::sync::Arc;

use crate::guest::Event;

use super::error::VmError;

/// A boxed error that keeps its chain (and so its errno).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Something happened that the VM's controller must know.
#[derive(Debug)]
pub enum Notice {
    /// The built-in guest did something.
    Event(Event),
    /// A part of the running VM failed: the VM stops.
    Failed(Failure),
    /// vCPU thread `n` has returned from its loop.
    Exited(u32),
    /// An outgoing migration switched over: the guest runs elsewhere; stop the vCPUs here.
    Migrated,
}

/// What failed in a running VM.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VmError),
    /// The page-fault handler (in-process fault loop or external process).
    #[error("page-fault handler")]
    Pager(#[source] BoxError),
    /// An incoming migration, after the guest started here.
    #[error("migration")]
    Migration(#[source] BoxError),
}

/// Delivers [`Notice`]s to whoever runs the VM (cheap to clone, any thread).
#[derive(Clone)]
pub struct Notifier(Arc<dyn Fn(Notice) + Send + Sync>);

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

impl Notifier {
    /// A notifier calling `f` for each notice.
    pub fn new(f: impl Fn(Notice) + Send + Sync + 'static) -> Notifier {
        Notifier(Arc::new(f))
    }

    /// Report `n`.
    pub fn send(&self, n: Notice) {
        (self.0)(n)
    }

    /// Report a failure.
    pub fn fail(&self, f: impl Into<Failure>) {
        self.send(Notice::Failed(f.into()))
    }
}
