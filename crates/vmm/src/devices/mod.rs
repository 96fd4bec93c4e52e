//! Devices on the port-I/O bus: a 16550 UART (`vm-superio`) for the console on ttyS0 and an
//! i8042 controller whose only job is the reset line. Emulation is `vm-superio`'s; this module
//! wires it to the bus and to KVM (interrupts through an irqfd).

pub mod pci;
pub mod virtio;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use vm_superio::serial::SerialState;
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

/// The VM's devices could not be stopped or their state taken (a snapshot, a migration's
/// switchover).
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A virtio-mmio device.
    #[error("virtio devices")]
    Virtio(#[source] virtio::VirtioError),
    /// A vfio-user device.
    #[error("vfio-user devices")]
    VfioUser(#[source] pci::PciStateError),
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

/// COM1's saved state: vm-superio's `SerialState` in a record of its own.
///
/// # Record (version 1)
/// Magic `b"FLSR"`, `u32` version, the nine registers (divisor low, divisor high, interrupt
/// enable, interrupt identification, line control, line status, modem control, modem
/// status, scratch: a byte each), `u32` n ≤ [`SERIAL_FIFO`] then the n bytes of the receive
/// FIFO, and a CRC-32 (IEEE) of everything before it. Little-endian.
pub struct SerialRecord;

/// The receive FIFO's size (vm-superio's).
pub const SERIAL_FIFO: usize = 64;
const SERIAL_MAGIC: &[u8; 4] = b"FLSR";
const SERIAL_VERSION: u32 = 1;

/// A serial record that cannot be taken back.
#[derive(Debug, thiserror::Error)]
pub enum SerialRecordError {
    /// Not a record of this format, or of another version, or damaged.
    #[error("COM1 record: {0}")]
    Malformed(String),
    /// COM1's interrupt eventfd could not be duplicated for the restored UART.
    #[error("COM1's interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

impl SerialRecord {
    /// Encode `s`.
    pub fn encode(s: &SerialState) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + s.in_buffer.len());
        v.extend_from_slice(SERIAL_MAGIC);
        v.extend_from_slice(&SERIAL_VERSION.to_le_bytes());
        v.extend_from_slice(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
        v.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
        v.extend_from_slice(&s.in_buffer);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decode a record, checking its magic, version, sizes and CRC.
    pub fn decode(b: &[u8]) -> Result<SerialState, SerialRecordError> {
        let bad = |m: String| SerialRecordError::Malformed(m);
        if b.len() < 4 + 4 + 9 + 4 + 4 || &b[..4] != SERIAL_MAGIC {
            return Err(bad(format!("{} bytes, no FLSR magic", b.len())));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32fast::hash(body) != crc {
            return Err(bad("CRC mismatch".into()));
        }
        let version = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
        if version != SERIAL_VERSION {
            return Err(bad(format!(
                "version {version}; this faultline reads {SERIAL_VERSION}"
            )));
        }
        let r = &body[8..17];
        let n = u32::from_le_bytes(body[17..21].try_into().expect("4 bytes")) as usize;
        if n > SERIAL_FIFO || body.len() != 21 + n {
            return Err(bad(format!(
                "a FIFO of {n} bytes in a record of {} (at most {SERIAL_FIFO})",
                b.len()
            )));
        }
        Ok(SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: body[21..].to_vec(),
        })
    }
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

    /// COM1's state as a [`SerialRecord`] (the i8042 has none).
    pub fn save(&self) -> Vec<u8> {
        SerialRecord::encode(
            &self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
        )
    }

    /// Take back a [`SerialRecord`] (before the vCPUs run): COM1 keeps its interrupt and its
    /// console.
    pub fn restore(&self, record: &[u8]) -> Result<(), SerialRecordError> {
        let state = SerialRecord::decode(record)?;
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let evt = serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialRecordError::EventFd)?;
        let placeholder = Serial::new(
            EventFdTrigger(evt.try_clone().map_err(SerialRecordError::EventFd)?),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut *serial, placeholder).into_writer();
        *serial = Serial::from_state(
            &state,
            EventFdTrigger(evt),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| SerialRecordError::Malformed(format!("{e:?}")))?;
        Ok(())
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

    #[test]
    fn serial_state_round_trips_and_bad_records_are_refused() {
        let sink = Sink::default();
        let d = LegacyDevices::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        d.pio_write(COM1 + 3, &[0x80]); // DLAB
        d.pio_write(COM1, &[0x0c]); // divisor 12
        d.pio_write(COM1 + 3, &[0x03]); // 8N1
        d.pio_write(COM1 + 1, &[0x02]); // THR empty interrupt
        d.pio_write(COM1 + 7, &[0x5a]); // scratch
        let rec = d.save();
        let e = LegacyDevices::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        e.restore(&rec).unwrap();
        let mut b = [0u8];
        e.pio_read(COM1 + 7, &mut b);
        assert_eq!(b[0], 0x5a);
        e.pio_read(COM1 + 3, &mut b);
        assert_eq!(b[0], 0x03);
        assert_eq!(e.save(), rec);
        // The console still goes to the same writer.
        e.pio_write(COM1, b"z");
        assert_eq!(sink.0.lock().unwrap().last(), Some(&b'z'));
        for cut in 0..rec.len() {
            assert!(e.restore(&rec[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..rec.len() {
            let mut v = rec.clone();
            v[i] ^= 0x40;
            assert!(e.restore(&v).is_err(), "flip at {i}");
        }
        let big = SerialState {
            in_buffer: vec![1; SERIAL_FIFO + 1],
            ..Default::default()
        };
        assert!(SerialRecord::decode(&SerialRecord::encode(&big)).is_err());
    }
}
