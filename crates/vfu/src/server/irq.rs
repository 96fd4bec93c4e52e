//! Interrupts: delivery in the mode the guest enabled (MSI-X, MSI, INTx), masking and
//! pending bits, and the client's eventfds (`SET_IRQS`).

use std::sync::atomic::Ordering;

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceContext, DeviceError, lock};
use crate::proto::{IRQ_ERR, IRQ_INTX, IRQ_MSI, IRQ_MSIX, IRQ_REQ};

pub(super) struct IrqState {
    /// Per IRQ index, per vector: the client's eventfd and the session that set it.
    pub(super) fds: Vec<Vec<Option<(EventFd, u64)>>>,
    pub(super) intx_masked: bool,
    pub(super) intx_level: bool,
    pub(super) msi_pending: u32,
    /// Vectors triggered while the device was stopped.
    pub(super) deferred: Vec<u32>,
}

/// How an interrupt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// An eventfd was signalled.
    Signalled,
    /// Latched as pending (masked, no eventfd, device stopped).
    Pending,
    /// No interrupt mode is enabled (MSI-X, MSI and INTx all off); dropped.
    Dropped,
}

/// Which interrupt mode the guest enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Msix { function_masked: bool },
    Msi { vectors: u32, mask: u32 },
    Intx,
    None,
}

impl DeviceContext {
    fn mode(&self) -> Mode {
        let cfg = lock(&self.0.config);
        if let Some((true, fm)) = cfg.msix_control() {
            return Mode::Msix {
                function_masked: fm,
            };
        }
        if let Some(m) = cfg.msi_state().filter(|m| m.enabled) {
            return Mode::Msi {
                vectors: m.vectors,
                mask: m.mask,
            };
        }
        if self.0.irq_counts[0] > 0 && cfg.command() & pci::CMD_INTX_DISABLE == 0 {
            return Mode::Intx;
        }
        Mode::None
    }

    fn signal(&self, irq: &IrqState, index: u32, vector: u32) -> bool {
        match irq
            .fds
            .get(index as usize)
            .and_then(|v| v.get(vector as usize))
        {
            Some(Some((fd, _))) => {
                let _ = fd.write(1);
                self.0.stats.signalled.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Raise interrupt `vector` in whichever mode the guest enabled (MSI-X, else MSI, else
    /// INTx, where vector is ignored). Thread-safe; never blocks on I/O.
    pub fn trigger(&self, vector: u32) -> Delivery {
        let st = &self.0.stats;
        st.triggered.fetch_add(1, Ordering::Relaxed);
        let mode = self.mode();
        if !self.0.running.load(Ordering::Acquire) {
            if mode != Mode::None {
                lock(&self.0.irq).deferred.push(vector);
                st.latched.fetch_add(1, Ordering::Relaxed);
                return Delivery::Pending;
            }
            return Delivery::Dropped;
        }
        match mode {
            Mode::Msix { function_masked } => {
                let mut t = lock(&self.0.msix);
                let Some(e) = t.entry(vector).filter(|_| vector < self.0.irq_counts[2]) else {
                    return Delivery::Dropped;
                };
                let irq = lock(&self.0.irq);
                if function_masked || e.masked || !self.signal(&irq, IRQ_MSIX, vector) {
                    t.set_pending(vector, true);
                    st.latched.fetch_add(1, Ordering::Relaxed);
                    return Delivery::Pending;
                }
                Delivery::Signalled
            }
            Mode::Msi { vectors, mask } => {
                if vector >= vectors {
                    return Delivery::Dropped;
                }
                let mut irq = lock(&self.0.irq);
                if mask & (1 << vector) != 0 || !self.signal(&irq, IRQ_MSI, vector) {
                    irq.msi_pending |= 1 << vector;
                    let p = irq.msi_pending;
                    drop(irq);
                    lock(&self.0.config).set_msi_pending(p);
                    st.latched.fetch_add(1, Ordering::Relaxed);
                    return Delivery::Pending;
                }
                Delivery::Signalled
            }
            Mode::Intx => self.set_intx(true),
            Mode::None => Delivery::Dropped,
        }
    }

    /// Assert or deassert INTx (level-triggered). Asserting signals the INTx eventfd unless
    /// the line is masked (it automasks until the client unmasks).
    pub fn set_intx(&self, level: bool) -> Delivery {
        if self.0.irq_counts[0] == 0 {
            return Delivery::Dropped;
        }
        // The status bit follows the line; the command register's INTx Disable keeps the
        // function from signalling it (clearing that bit re-asserts, see `config_access`).
        let disabled = {
            let mut cfg = lock(&self.0.config);
            cfg.set_intx_status(level);
            cfg.command() & pci::CMD_INTX_DISABLE != 0
        };
        let mut irq = lock(&self.0.irq);
        irq.intx_level = level;
        if !level {
            return Delivery::Dropped;
        }
        if irq.intx_masked || disabled || !self.signal(&irq, IRQ_INTX, 0) {
            self.0.stats.latched.fetch_add(1, Ordering::Relaxed);
            return Delivery::Pending;
        }
        irq.intx_masked = true;
        Delivery::Signalled
    }

    /// Deliver MSI-X vectors that are pending and now unmasked.
    pub(super) fn release_msix(&self) {
        let Some((true, false)) = lock(&self.0.config).msix_control() else {
            return;
        };
        let mut t = lock(&self.0.msix);
        let irq = lock(&self.0.irq);
        for v in 0..self.0.irq_counts[2] {
            if t.is_pending(v)
                && t.entry(v).is_some_and(|e| !e.masked)
                && self.signal(&irq, IRQ_MSIX, v)
            {
                t.set_pending(v, false);
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn release_msi(&self) {
        let Some(m) = lock(&self.0.config).msi_state().filter(|m| m.enabled) else {
            return;
        };
        let mut irq = lock(&self.0.irq);
        for v in 0..m.vectors {
            if irq.msi_pending & (1 << v) != 0
                && m.mask & (1 << v) == 0
                && self.signal(&irq, IRQ_MSI, v)
            {
                irq.msi_pending &= !(1 << v);
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
        let p = irq.msi_pending;
        drop(irq);
        lock(&self.0.config).set_msi_pending(p);
    }

    pub(super) fn release_deferred(&self) {
        let d = std::mem::take(&mut lock(&self.0.irq).deferred);
        for v in d {
            if self.trigger(v) == Delivery::Signalled {
                self.0.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn irq_count(&self, index: u32) -> Option<u32> {
        self.0.irq_counts.get(index as usize).copied()
    }

    /// SET_IRQS with eventfds: install (`Some`) or remove (`None`, fd -1) per vector.
    pub(crate) fn set_irq_fds(
        &self,
        index: u32,
        start: u32,
        fds: Vec<Option<EventFd>>,
        owner: u64,
    ) -> Result<(), DeviceError> {
        let mut irq = lock(&self.0.irq);
        let slots = irq
            .fds
            .get_mut(index as usize)
            .ok_or_else(|| DeviceError::invalid(format!("IRQ index {index}")))?;
        if start as usize + fds.len() > slots.len() {
            return Err(DeviceError::invalid(format!(
                "vectors {start}+{} beyond the {} of IRQ index {index}",
                fds.len(),
                slots.len()
            )));
        }
        for (i, fd) in fds.into_iter().enumerate() {
            slots[start as usize + i] = fd.map(|f| (f, owner));
        }
        drop(irq);
        match index {
            IRQ_MSIX => self.release_msix(),
            IRQ_MSI => self.release_msi(),
            _ => {}
        }
        Ok(())
    }

    /// SET_IRQS with DATA_NONE and count 0: disable the index.
    pub(crate) fn clear_irq_fds(&self, index: u32) {
        if let Some(v) = lock(&self.0.irq).fds.get_mut(index as usize) {
            v.iter_mut().for_each(|s| *s = None);
        }
    }

    /// SET_IRQS mask/unmask/trigger on `start..start+count`.
    pub(crate) fn irq_action(
        &self,
        index: u32,
        start: u32,
        count: u32,
        action: u32,
        bools: Option<&[u8]>,
    ) -> Result<(), DeviceError> {
        use crate::proto::{IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK};
        let n = self.irq_count(index).unwrap_or(0);
        if u64::from(start) + u64::from(count) > u64::from(n) {
            return Err(DeviceError::invalid(format!(
                "vectors {start}+{count} beyond the {n} of IRQ index {index}"
            )));
        }
        let on = |i: u32| bools.is_none_or(|b| b.get(i as usize).copied().unwrap_or(0) != 0);
        for i in 0..count {
            if !on(i) {
                continue;
            }
            let v = start + i;
            match (action, index) {
                (IRQ_SET_ACTION_MASK, IRQ_INTX) => lock(&self.0.irq).intx_masked = true,
                (IRQ_SET_ACTION_UNMASK, IRQ_INTX) => {
                    let level = {
                        let mut irq = lock(&self.0.irq);
                        irq.intx_masked = false;
                        irq.intx_level
                    };
                    if level {
                        self.set_intx(true);
                    }
                }
                (IRQ_SET_ACTION_MASK, IRQ_MSIX) => {
                    lock(&self.0.msix).set_masked(v, true);
                }
                (IRQ_SET_ACTION_UNMASK, IRQ_MSIX) => {
                    lock(&self.0.msix).set_masked(v, false);
                    self.release_msix();
                }
                (IRQ_SET_ACTION_TRIGGER, IRQ_INTX) => {
                    self.set_intx(true);
                }
                (IRQ_SET_ACTION_TRIGGER, _) => {
                    let irq = lock(&self.0.irq);
                    self.signal(&irq, index, v);
                }
                _ => {
                    return Err(DeviceError {
                        errno: libc::ENOTSUP,
                        msg: format!("action {action:#x} on IRQ index {index}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// IRQ info flags for `index`.
    pub(crate) fn irq_flags(index: u32) -> u32 {
        use crate::proto::{
            IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
        };
        match index {
            IRQ_INTX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            IRQ_MSI => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            IRQ_MSIX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
            IRQ_ERR | IRQ_REQ => IRQ_INFO_EVENTFD,
            _ => 0,
        }
    }
}
