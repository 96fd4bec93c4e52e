//! How the transport raises interrupts: the VMM implements [`Interrupt`] with KVM irqfds.

/// An MSI message the driver programmed for one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (the LAPIC window and destination).
    pub address: u64,
    /// Data (vector and delivery mode).
    pub data: u32,
}

/// A device's interrupt lines.
pub trait Interrupt: Send + Sync {
    /// Pulse the device's legacy line (an edge on its IOAPIC pin).
    fn legacy(&self) -> std::io::Result<()>;
    /// Fire MSI vector `vector` (0 = configuration change, 1 + q = queue q).
    fn msi(&self, vector: u16) -> std::io::Result<()>;
    /// The driver programmed (`Some`) or masked (`None`) `vector`.
    fn msi_route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()>;
}

/// Interrupts that go nowhere but are counted (unit tests, and a device with its interrupts
/// not wired yet).
#[derive(Debug, Default)]
pub struct Counted {
    /// Legacy pulses.
    pub legacy: std::sync::atomic::AtomicU64,
    /// MSIs fired.
    pub msi: std::sync::atomic::AtomicU64,
    /// Routes set.
    pub routes: std::sync::Mutex<Vec<(u16, Option<MsiMessage>)>>,
}

impl Interrupt for Counted {
    fn legacy(&self) -> std::io::Result<()> {
        self.legacy
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn msi(&self, _vector: u16) -> std::io::Result<()> {
        self.msi.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn msi_route(&self, vector: u16, message: Option<MsiMessage>) -> std::io::Result<()> {
        if let Ok(mut r) = self.routes.lock() {
            r.push((vector, message));
        }
        Ok(())
    }
}
