//! A 16-in / 16-out isolated digital I/O card with the register layout Linux's
//! `gpio-pci-idio-16` driver programs (ACCES PCI-IDIO-16, vendor 0x494f, device 0x0dc8).
//!
//! BAR 2 (256 bytes of memory space; the driver maps BAR 2):
//!
//! | offset | read | write |
//! |---|---|---|
//! | 0 | outputs 0-7 | outputs 0-7 |
//! | 1 | inputs 0-7 | clear the change interrupt |
//! | 2 | disable the change interrupt | enable the change interrupt |
//! | 3 | 0 | deactivate input filters |
//! | 4 | outputs 8-15 | outputs 8-15 |
//! | 5 | inputs 8-15 | — |
//! | 6 | interrupt status (bit 0: inputs changed) | — |
//!
//! Inputs are what the outside world drives ([`Gpio::set_inputs`]); with loopback wiring
//! (the default of `faultline device serve gpio`) outputs drive inputs, so a guest that
//! writes its outputs reads them back on its inputs. A change of inputs with the interrupt
//! enabled raises INTx.

use std::sync::{Arc, Mutex};

use pci::{Bar, Ids};

use crate::server::{DeviceContext, DeviceDescription, DeviceError, DeviceOps};

/// PCI vendor ID (ACCES I/O Products).
pub const VENDOR: u16 = 0x494f;
/// PCI device ID (PCI-IDIO-16).
pub const DEVICE: u16 = 0x0dc8;
/// The register BAR.
pub const BAR: u32 = 2;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Regs {
    out: u16,
    external: u16,
    irq_enabled: bool,
    irq_status: bool,
    filters_off: bool,
}

/// The card.
pub struct Gpio {
    regs: Mutex<Regs>,
    loopback: bool,
    ctx: Mutex<Option<DeviceContext>>,
}

impl Gpio {
    /// A card; `loopback`: outputs are wired to inputs.
    pub fn new(loopback: bool) -> Arc<Gpio> {
        Arc::new(Gpio {
            regs: Mutex::new(Regs::default()),
            loopback,
            ctx: Mutex::new(None),
        })
    }

    /// The device description.
    pub fn description() -> DeviceDescription {
        DeviceDescription::new(
            "gpio-idio-16",
            Ids {
                vendor: VENDOR,
                device: DEVICE,
                subsystem_vendor: VENDOR,
                subsystem: DEVICE,
                class: 0x118000, // signal processing controller
                revision: 0,
            },
        )
        .bar(BAR as usize, Bar::mem32(256), &[])
        .intx()
        .pm()
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inputs(&self, r: &Regs) -> u16 {
        if self.loopback {
            r.out ^ r.external
        } else {
            r.external
        }
    }

    /// Drive the external input pins (raises INTx if they change with the interrupt on).
    pub fn set_inputs(&self, v: u16) {
        let changed = {
            let mut r = self.regs();
            let before = self.inputs(&r);
            r.external = v;
            self.note_change(&mut r, before)
        };
        self.raise(changed);
    }

    /// Outputs as last written.
    pub fn outputs(&self) -> u16 {
        self.regs().out
    }

    fn note_change(&self, r: &mut Regs, before: u16) -> bool {
        if self.inputs(r) != before && r.irq_enabled {
            r.irq_status = true;
            return true;
        }
        false
    }

    fn raise(&self, changed: bool) {
        if changed && let Some(ctx) = self.ctx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            ctx.set_intx(true);
        }
    }
}

impl DeviceOps for Gpio {
    fn region_read(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        if bar != BAR {
            return Err(DeviceError::invalid(format!("BAR {bar} does not exist")));
        }
        let mut deassert = false;
        for (i, b) in data.iter_mut().enumerate() {
            let mut r = self.regs();
            let ins = self.inputs(&r);
            *b = match offset + i as u64 {
                0 => r.out as u8,
                1 => ins as u8,
                2 => {
                    r.irq_enabled = false;
                    0
                }
                4 => (r.out >> 8) as u8,
                5 => (ins >> 8) as u8,
                6 => u8::from(r.irq_status),
                _ => 0,
            };
            deassert |= offset + i as u64 == 2;
        }
        if deassert {
            dev.set_intx(false);
        }
        Ok(())
    }

    fn region_write(
        &self,
        dev: &DeviceContext,
        bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        if bar != BAR {
            return Err(DeviceError::invalid(format!("BAR {bar} does not exist")));
        }
        let mut raise = false;
        for (i, &b) in data.iter().enumerate() {
            let mut r = self.regs();
            let before = self.inputs(&r);
            match offset + i as u64 {
                0 => r.out = (r.out & 0xff00) | u16::from(b),
                1 => {
                    r.irq_status = false;
                    drop(r);
                    dev.set_intx(false);
                    continue;
                }
                2 => r.irq_enabled = true,
                3 => r.filters_off = true,
                4 => r.out = (r.out & 0x00ff) | (u16::from(b) << 8),
                _ => {}
            }
            raise |= self.note_change(&mut r, before);
        }
        *self.ctx.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev.clone());
        self.raise(raise);
        Ok(())
    }

    fn reset(&self, _dev: &DeviceContext) -> Result<(), DeviceError> {
        let mut r = self.regs();
        let ext = r.external;
        *r = Regs {
            external: ext,
            ..Regs::default()
        };
        Ok(())
    }

    fn save(&self, _dev: &DeviceContext) -> Result<Vec<u8>, DeviceError> {
        let r = self.regs();
        let mut v = vec![1u8]; // format version
        v.extend(r.out.to_le_bytes());
        v.extend(r.external.to_le_bytes());
        v.push(
            u8::from(r.irq_enabled) | u8::from(r.irq_status) << 1 | u8::from(r.filters_off) << 2,
        );
        Ok(v)
    }

    fn load(&self, _dev: &DeviceContext, s: &[u8]) -> Result<(), DeviceError> {
        if s.len() != 6 || s[0] != 1 {
            return Err(DeviceError::invalid(format!(
                "GPIO state: {} bytes, version {:?} (want 6 bytes, version 1)",
                s.len(),
                s.first()
            )));
        }
        let mut r = self.regs();
        r.out = u16::from_le_bytes([s[1], s[2]]);
        r.external = u16::from_le_bytes([s[3], s[4]]);
        r.irq_enabled = s[5] & 1 != 0;
        r.irq_status = s[5] & 2 != 0;
        r.filters_off = s[5] & 4 != 0;
        Ok(())
    }
}
