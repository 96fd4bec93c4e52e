//! Devices on the port-I/O bus: a 16550 UART (`vm-superio`) for the console on ttyS0 and an
//! i8042 controller whose only job is the reset line. Emulation is `vm-superio`'s; this module
//! wires it to the bus and to KVM (interrupts through an irqfd).

pub mod pci;
pub mod virtio;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's base port.
pub const COM1: u16 = 0x3f8;
/// COM1's interrupt line (GSI).
pub const COM1_GSI: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;

/// Raises an interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Records that the guest asked for a reset (i8042 command 0xfe).
#[derive(Clone, Default)]
pub struct ResetFlag(pub Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What the port-I/O bus decided about an access.
#[derive(Debug, PartialEq, Eq)]
pub enum PioResult {
    /// A device handled it.
    Handled,
    /// The guest asked for a reset.
    Reset,
    /// No device there.
    Unclaimed,
}

/// The legacy devices of a Linux guest.
pub struct LegacyDevices {
    serial: Mutex<Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>>,
    i8042: Mutex<I8042Device<ResetFlag>>,
    reset: ResetFlag,
}

impl LegacyDevices {
    /// A UART writing the guest's console to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let reset = ResetFlag::default();
        Self {
            serial: Mutex::new(Serial::new(EventFdTrigger(irq), out)),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        }
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioResult {
        let Some(&v) = data.first() else {
            return PioResult::Unclaimed;
        };
        match port {
            COM1..=0x3ff => {
                // A failed interrupt or console write is not the guest's fault; drop it.
                let _ = self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write((port - COM1) as u8, v);
                PioResult::Handled
            }
            I8042_DATA | I8042_CMD => {
                let _ = self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write((port - I8042_DATA) as u8, v);
                if self.reset.0.load(Ordering::SeqCst) {
                    PioResult::Reset
                } else {
                    PioResult::Handled
                }
            }
            _ => PioResult::Unclaimed,
        }
    }

    /// A guest `in` from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> PioResult {
        let v = match port {
            COM1..=0x3ff => self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((port - COM1) as u8),
            I8042_DATA | I8042_CMD => self
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((port - I8042_DATA) as u8),
            _ => return PioResult::Unclaimed,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        PioResult::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<StdMutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_reach_the_console_and_reset_is_seen() {
        let sink = Sink::default();
        let d = LegacyDevices::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"Linux version" {
            assert_eq!(d.pio_write(COM1, &[*b]), PioResult::Handled);
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"Linux version");
        let mut lsr = [0u8];
        d.pio_read(COM1 + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        assert_eq!(d.pio_write(0x80, &[1]), PioResult::Unclaimed);
        assert_eq!(d.pio_write(I8042_CMD, &[0xfe]), PioResult::Reset);
    }
}
