//! A decoder that prints a raw PCI/PCIe configuration space the way `lspci -vvv` does.
//!
//! It works on a plain dump of configuration space (256 bytes of conventional space, or 4096
//! bytes including the PCIe extended space) and needs nothing else: no sysfs, no `pci.ids`.
//! Only a handful of vendors are named; every other device prints as `Device vvvv:dddd`.
//! Bytes past the end of the dump read as `0xff`, and malformed capability chains are reported
//! inline (`<chain looped>`, `<chain broken>`) rather than followed, so decoding never panics.

use std::fmt::Write as _;

/// Appends one formatted line to a `String` (writing into a `String` cannot fail).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Most standard capabilities followed before the chain is declared too long.
const MAX_CAPS: usize = 48;
/// Most extended capabilities followed before the chain is declared too long.
const MAX_EXT_CAPS: usize = 64;

/// Class names as spelled in `pci.ids`, `|`-separated. The key before the space is the base
/// class (`bb`), base and sub-class (`bbss`), or base, sub-class and programming interface
/// (`bbsspp`), in lowercase hex.
const CLASS_NAMES: &str = "\
    00 Unclassified device|0000 Non-VGA unclassified device|\
    0001 VGA compatible unclassified device|0005 Image coprocessor|\
    01 Mass storage controller|0100 SCSI storage controller|0101 IDE interface|\
    0102 Floppy disk controller|0103 IPI bus controller|0104 RAID bus controller|\
    0105 ATA controller|0106 SATA controller|010601 AHCI 1.0|010602 Serial Storage Bus|\
    0107 Serial Attached SCSI controller|0108 Non-Volatile memory controller|010801 NVMHCI|\
    010802 NVM Express|0109 Universal Flash Storage controller|0180 Mass storage controller|\
    02 Network controller|0200 Ethernet controller|0201 Token ring network controller|\
    0202 FDDI network controller|0203 ATM network controller|0204 ISDN controller|\
    0205 WorldFip controller|0206 PICMG controller|0207 Infiniband controller|\
    0208 Fabric controller|0280 Network controller|\
    03 Display controller|0300 VGA compatible controller|030000 VGA controller|\
    030001 8514 controller|0301 XGA compatible controller|0302 3D controller|\
    0380 Display controller|\
    04 Multimedia controller|0400 Multimedia video controller|\
    0401 Multimedia audio controller|0402 Computer telephony device|0403 Audio device|\
    0480 Multimedia controller|\
    05 Memory controller|0500 RAM memory|0501 FLASH memory|0502 CXL|0580 Memory controller|\
    06 Bridge|0600 Host bridge|0601 ISA bridge|0602 EISA bridge|0603 MicroChannel bridge|\
    0604 PCI bridge|060400 Normal decode|060401 Subtractive decode|0605 PCMCIA bridge|\
    0606 NuBus bridge|0607 CardBus bridge|0608 RACEway bridge|\
    0609 Semi-transparent PCI-to-PCI bridge|060a InfiniBand to PCI host bridge|0680 Bridge|\
    07 Communication controller|0700 Serial controller|070002 16550|\
    0701 Parallel controller|0702 Multiport serial controller|0703 Modem|\
    0704 GPIB controller|0705 Smard Card controller|0780 Communication controller|\
    08 Generic system peripheral|0800 PIC|080010 IO-APIC|0801 DMA controller|0802 Timer|\
    0803 RTC|0804 PCI Hot-plug controller|0805 SD Host controller|0806 IOMMU|\
    0880 System peripheral|0899 Timing Card|\
    09 Input device controller|0900 Keyboard controller|0901 Digitizer Pen|\
    0902 Mouse controller|0903 Scanner controller|0904 Gameport controller|\
    0980 Input device controller|\
    0a Docking station|0a00 Generic Docking Station|0a80 Docking Station|\
    0b Processor|0b00 386|0b01 486|0b02 Pentium|0b10 Alpha|0b20 Power PC|0b30 MIPS|\
    0b40 Co-processor|\
    0c Serial bus controller|0c00 FireWire (IEEE 1394)|0c01 ACCESS Bus|0c02 SSA|\
    0c03 USB controller|0c0300 UHCI|0c0310 OHCI|0c0320 EHCI|0c0330 XHCI|\
    0c0340 USB4 Host Interface|0c03fe USB Device|0c04 Fibre Channel|0c05 SMBus|\
    0c06 InfiniBand|0c07 IPMI Interface|0c08 SERCOS interface|0c09 CANBUS|\
    0c80 Serial bus controller|\
    0d Wireless controller|0d00 IRDA controller|0d01 Consumer IR controller|\
    0d10 RF controller|0d11 Bluetooth|0d12 Broadband|0d20 802.1a controller|\
    0d21 802.1b controller|0d80 Wireless controller|\
    0e Intelligent controller|0e00 I2O|\
    0f Satellite communications controller|0f01 Satellite TV controller|\
    0f02 Satellite audio communication controller|\
    0f03 Satellite voice communication controller|\
    0f04 Satellite data communication controller|\
    10 Encryption controller|1000 Network and computing encryption device|\
    1010 Entertainment encryption device|1080 Encryption controller|\
    11 Signal processing controller|1100 DPIO module|1101 Performance counters|\
    1110 Communication synchronizer|1120 Signal processing management|\
    1180 Signal processing controller|\
    12 Processing accelerators|1200 Processing accelerators|\
    1201 SNIA Smart Data Accelerator Interface (SDXI) controller|\
    13 Non-Essential Instrumentation|40 Coprocessor|ff Unassigned class";

/// Looks `key` (`bb`, `bbss` or `bbsspp`) up in [`CLASS_NAMES`].
fn lookup_class(key: &str) -> Option<&'static str> {
    CLASS_NAMES
        .split('|')
        .find_map(|e| e.strip_prefix(key)?.strip_prefix(' '))
}

/// Little-endian reads from a config-space dump; out-of-range bytes read as `0xff`.
struct Cfg<'a>(&'a [u8]);

impl Cfg<'_> {
    fn b(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0xff)
    }

    fn w(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.b(off), self.b(off + 1)])
    }

    fn d(&self, off: usize) -> u32 {
        u32::from(self.w(off)) | (u32::from(self.w(off + 2)) << 16)
    }
}

/// `+` when any bit of `mask` is set in `v`, `-` otherwise.
fn flag(v: u32, mask: u32) -> char {
    if v & mask != 0 { '+' } else { '-' }
}

/// `Name+`/`Name-` for each space-separated name in `names`, the i-th one being bit i of `v`.
fn flags(v: u32, names: &str) -> String {
    let parts: Vec<String> = (names.split(' ').enumerate())
        .map(|(i, name)| format!("{name}{}", flag(v >> i, 1)))
        .collect();
    parts.join(" ")
}

/// `"<Vendor> Device dddd"` for the few known vendors, `"Device vvvv:dddd"` otherwise.
fn device_str(vendor: u16, device: u16) -> String {
    let name = match vendor {
        0x8086 => "Intel Corporation",
        0x1af4 => "Red Hat, Inc.",
        0x494f => "ACCES I/O Products Inc",
        0x4e58 => "Nutanix Inc.",
        _ => return format!("Device {vendor:04x}:{device:04x}"),
    };
    format!("{name} Device {device:04x}")
}

/// Formats a size like lspci: divide by 1024 while it divides evenly (`4096` -> `4K`).
fn fmt_size(mut x: u64) -> String {
    const SUFFIX: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut i = 0;
    while i < SUFFIX.len() - 1 && x != 0 && x & 0x3ff == 0 {
        x >>= 10;
        i += 1;
    }
    format!("{x}{}", SUFFIX[i])
}

/// A human name for a class code, as lspci prints it, e.g. `(0x02, 0x00, 0)` ->
/// `"Ethernet controller"`, `(0x08, 0x80, 0)` -> `"System peripheral"`.
///
/// The sub-class name is used when known, else the base-class name, else `"Class bbss"`.
/// Base class `0xff` is always `"Unassigned class"`. `prog_if` does not change the name (lspci
/// shows the programming interface separately, as `(prog-if xx [...])` on the first line).
pub fn class_name(base: u8, sub: u8, prog_if: u8) -> String {
    let _ = prog_if;
    if base == 0xff {
        return "Unassigned class".to_string();
    }
    match lookup_class(&format!("{base:02x}{sub:02x}"))
        .or_else(|| lookup_class(&format!("{base:02x}")))
    {
        Some(name) => name.to_string(),
        None => format!("Class {base:02x}{sub:02x}"),
    }
}

/// Decode `cfg` (256 bytes of conventional config space, or 4096 with the PCIe extended space;
/// any shorter slice is decoded as far as it goes, missing bytes read as `0xff`) into
/// `lspci -vvv`-like text: one line per `\n`, detail lines indented with tabs.
///
/// `bdf` is printed at the start, e.g. `"00:03.0"`. Never panics, whatever the bytes (looping
/// or out-of-range capability pointers are reported, not followed forever). BAR sizes cannot be
/// known from a dump, so none are printed; see [`describe_with_sizes`].
pub fn describe(bdf: &str, cfg: &[u8]) -> String {
    describe_with_sizes(bdf, cfg, &[0; 6])
}

/// Like [`describe`], but BAR `i` with a non-zero `bar_sizes[i]` gets an lspci-style
/// `[size=4K]` suffix (units K/M/G/T), and a BAR whose address is 0 but whose size is known
/// prints as `<unassigned>`. For a 64-bit BAR pair the size is taken from the lower slot.
pub fn describe_with_sizes(bdf: &str, cfg: &[u8], bar_sizes: &[u64; 6]) -> String {
    let c = Cfg(cfg);
    let mut out = String::new();
    let (base, sub, prog_if, rev) = (c.b(0x0b), c.b(0x0a), c.b(0x09), c.b(0x08));
    let class = class_name(base, sub, prog_if);
    let device = device_str(c.w(0), c.w(2));
    let _ = write!(out, "{bdf} {class} [{base:02x}{sub:02x}]: {device}");
    if rev != 0 {
        let _ = write!(out, " (rev {rev:02x})");
    }
    match lookup_class(&format!("{base:02x}{sub:02x}{prog_if:02x}")) {
        Some(name) => emit!(out, " (prog-if {prog_if:02x} [{name}])"),
        None if prog_if != 0 => emit!(out, " (prog-if {prog_if:02x})"),
        None => out.push('\n'),
    }
    let header = c.b(0x0e) & 0x7f;
    if header != 0 {
        let [pri, sec, subo, lat] = [0x18, 0x19, 0x1a, 0x1b].map(|o| c.b(o));
        match header {
            1 => {
                let _ = write!(out, "\tBus: primary={pri:02x}, secondary={sec:02x}, ");
                emit!(out, "subordinate={subo:02x}, sec-latency={lat}");
            }
            2 => emit!(out, "\tCardBus bridge header not decoded"),
            t => emit!(out, "\t!!! Unknown header type {t:02x}"),
        }
        return out;
    }

    let (ss_vendor, ss_device) = (c.w(0x2c), c.w(0x2e));
    if ss_vendor != 0 && ss_vendor != 0xffff {
        emit!(out, "\tSubsystem: {}", device_str(ss_vendor, ss_device));
    }
    let cmd = u32::from(c.w(0x04));
    let control =
        "I/O Mem BusMaster SpecCycle MemWINV VGASnoop ParErr Stepping SERR FastB2B DisINTx";
    emit!(out, "\tControl: {}", flags(cmd, control));
    let st = u32::from(c.w(0x06));
    let devsel = ["fast", "medium", "slow", "??"][((st >> 9) & 3) as usize];
    let before = flags(st >> 4, "Cap 66MHz UDF FastB2B ParErr");
    let after = flags(st >> 11, ">TAbort <TAbort <MAbort >SERR <PERR");
    let intx = flag(st, 0x8);
    emit!(out, "\tStatus: {before} DEVSEL={devsel} {after} INTx{intx}");
    let pin = c.b(0x3d);
    if pin != 0 {
        let letter = if pin <= 4 {
            char::from(b'A' + pin - 1)
        } else {
            '?'
        };
        emit!(out, "\tInterrupt: pin {letter} routed to IRQ {}", c.b(0x3c));
    }
    bars(&c, bar_sizes, &mut out);
    let rom = c.d(0x30);
    if rom != 0 && rom != 0xffff_ffff {
        let disabled = if rom & 1 == 0 { " [disabled]" } else { "" };
        emit!(out, "\tExpansion ROM at {:08x}{disabled}", rom & !0x7ff);
    }
    if st & 0x10 != 0 {
        capabilities(&c, &mut out);
    }
    if cfg.len() > 256 {
        ext_capabilities(&c, &mut out);
    }
    out
}

/// Prints the six type-0 BARs (`Region n: ...`), pairing 64-bit memory BARs.
fn bars(c: &Cfg, sizes: &[u64; 6], out: &mut String) {
    let mut i = 0;
    while i < 6 {
        let (region, size) = (i, sizes[i]);
        let flg = match c.d(0x10 + 4 * i) {
            0xffff_ffff => 0,
            v => v,
        };
        i += 1;
        if flg == 0 && size == 0 {
            continue;
        }
        let _ = write!(out, "\tRegion {region}: ");
        if flg & 1 != 0 {
            match flg & !3 {
                0 => out.push_str("I/O ports at <unassigned>"),
                a => {
                    let _ = write!(out, "I/O ports at {a:04x}");
                }
            }
        } else {
            let ty = (flg >> 1) & 3;
            let mut addr = u64::from(flg & !0xf);
            if ty == 2 && i < 6 {
                addr |= u64::from(c.d(0x10 + 4 * i)) << 32;
                i += 1;
            }
            if ty == 2 && region == 5 {
                out.push_str("Memory at <invalid-64bit-slot>");
            } else if addr == 0 {
                out.push_str("Memory at <unassigned>");
            } else {
                let _ = write!(out, "Memory at {addr:08x}");
            }
            let width = ["32-bit", "low-1M", "64-bit", "type 3"][ty as usize];
            let pref = if flg & 8 != 0 { "" } else { "non-" };
            let _ = write!(out, " ({width}, {pref}prefetchable)");
        }
        if size != 0 {
            let _ = write!(out, " [size={}]", fmt_size(size));
        }
        out.push('\n');
    }
}

/// Walks and decodes the standard capability list starting at `cfg[0x34]`.
fn capabilities(c: &Cfg, out: &mut String) {
    let mut seen = [false; 64];
    let mut at = usize::from(c.b(0x34) & 0xfc);
    let mut count = 0;
    while at != 0 {
        let _ = write!(out, "\tCapabilities: [{at:02x}] ");
        let id = c.b(at);
        if at < 0x40 || id == 0xff {
            emit!(out, "<chain broken>");
            return;
        }
        if std::mem::replace(&mut seen[at / 4], true) {
            emit!(out, "<chain looped>");
            return;
        }
        if count == MAX_CAPS {
            emit!(out, "<chain too long>");
            return;
        }
        count += 1;
        match id {
            0x01 => cap_pm(c, at, out),
            0x05 => cap_msi(c, at, out),
            0x09 => emit!(out, "Vendor Specific Information: Len={:02x}", c.b(at + 2)),
            0x0d => emit!(out, "Subsystem: {}", device_str(c.w(at + 4), c.w(at + 6))),
            0x10 => cap_express(c, at, out),
            0x11 => cap_msix(c, at, out),
            id => emit!(out, "#{id:02x}"),
        }
        at = usize::from(c.b(at + 1) & 0xfc);
    }
}

/// Power Management capability (id 0x01).
fn cap_pm(c: &Cfg, at: usize, out: &mut String) {
    const AUX_MA: [u32; 8] = [0, 55, 100, 160, 220, 270, 320, 375];
    let cap = u32::from(c.w(at + 2));
    emit!(out, "Power Management version {}", cap & 7);
    let f = |mask| flag(cap, mask);
    let (clk, dsi, d1, d2) = (f(0x8), f(0x20), f(0x200), f(0x400));
    let aux = AUX_MA[((cap >> 6) & 7) as usize];
    let pme = flags(cap >> 11, "D0 D1 D2 D3hot D3cold").replace(' ', ",");
    emit!(
        out,
        "\t\tFlags: PMEClk{clk} DSI{dsi} D1{d1} D2{d2} AuxCurrent={aux}mA PME({pme})"
    );
    let ctl = u32::from(c.w(at + 4));
    let (state, nsr, pme_en) = (ctl & 3, flag(ctl, 0x8), flag(ctl, 0x100));
    let _ = write!(
        out,
        "\t\tStatus: D{state} NoSoftRst{nsr} PME-Enable{pme_en} "
    );
    let (dsel, dscale, pme) = ((ctl >> 9) & 0xf, (ctl >> 13) & 3, flag(ctl, 0x8000));
    emit!(out, "DSel={dsel} DScale={dscale} PME{pme}");
}

/// MSI capability (id 0x05), 32- or 64-bit, with per-vector masking when present.
fn cap_msi(c: &Cfg, at: usize, out: &mut String) {
    let ctl = u32::from(c.w(at + 2));
    let (en, mask, is64) = (flag(ctl, 0x1), flag(ctl, 0x100), flag(ctl, 0x80));
    let (enabled, capable) = (1u32 << ((ctl >> 4) & 7), 1u32 << ((ctl >> 1) & 7));
    emit!(
        out,
        "MSI: Enable{en} Count={enabled}/{capable} Maskable{mask} 64bit{is64}"
    );
    let lo = c.d(at + 4);
    let mask_at = if ctl & 0x80 != 0 {
        let (hi, data) = (c.d(at + 8), c.w(at + 0xc));
        emit!(out, "\t\tAddress: {hi:08x}{lo:08x}  Data: {data:04x}");
        at + 0x10
    } else {
        emit!(out, "\t\tAddress: {lo:08x}  Data: {:04x}", c.w(at + 8));
        at + 0xc
    };
    if ctl & 0x100 != 0 {
        let (masking, pending) = (c.d(mask_at), c.d(mask_at + 4));
        emit!(out, "\t\tMasking: {masking:08x}  Pending: {pending:08x}");
    }
}

/// MSI-X capability (id 0x11).
fn cap_msix(c: &Cfg, at: usize, out: &mut String) {
    let ctl = u32::from(c.w(at + 2));
    let (en, count, masked) = (flag(ctl, 0x8000), (ctl & 0x7ff) + 1, flag(ctl, 0x4000));
    emit!(out, "MSI-X: Enable{en} Count={count} Masked{masked}");
    let (table, pba) = (c.d(at + 4), c.d(at + 8));
    let ((tbir, toff), (pbir, poff)) = ((table & 7, table & !7), (pba & 7, pba & !7));
    emit!(out, "\t\tVector table: BAR={tbir} offset={toff:08x}");
    emit!(out, "\t\tPBA: BAR={pbir} offset={poff:08x}");
}

/// Link speed encoding shared by LnkCap and LnkSta.
fn link_speed(code: u32) -> &'static str {
    const SPEEDS: [&str; 7] = [
        "unknown", "2.5GT/s", "5GT/s", "8GT/s", "16GT/s", "32GT/s", "64GT/s",
    ];
    SPEEDS.get(code as usize).copied().unwrap_or("unknown")
}

/// PCI Express capability (id 0x10): type, DevCap, DevCtl, LnkCap, LnkSta.
fn cap_express(c: &Cfg, at: usize, out: &mut String) {
    const L0S: &str = "<64ns <128ns <256ns <512ns <1us <2us <4us unlimited";
    const L1: &str = "<1us <2us <4us <8us <16us <32us <64us unlimited";
    let latency =
        |table: &'static str, code: u32| table.split(' ').nth((code & 7) as usize).unwrap_or("?");
    let fl = u32::from(c.w(at + 2));
    let ty = (fl >> 4) & 0xf;
    let kind = match ty {
        0 => "Endpoint".to_string(),
        1 => "Legacy Endpoint".to_string(),
        4 => format!("Root Port (Slot{})", flag(fl, 0x100)),
        5 => "Upstream Port".to_string(),
        6 => format!("Downstream Port (Slot{})", flag(fl, 0x100)),
        7 => "PCI-Express to PCI/PCI-X Bridge".to_string(),
        8 => "PCI/PCI-X to PCI-Express Bridge".to_string(),
        9 => "Root Complex Integrated Endpoint".to_string(),
        10 => "Root Complex Event Collector".to_string(),
        t => format!("Unknown type {t}"),
    };
    let (version, msi) = (fl & 0xf, (fl >> 9) & 0x1f);
    emit!(out, "Express (v{version}) {kind}, MSI {msi:02x}");
    let devcap = c.d(at + 4);
    let (payload, phantom) = (128u32 << (devcap & 7), (1u32 << ((devcap >> 3) & 3)) - 1);
    let _ = write!(
        out,
        "\t\tDevCap:\tMaxPayload {payload} bytes, PhantFunc {phantom}"
    );
    if ty <= 1 {
        let (l0s, l1) = (latency(L0S, devcap >> 6), latency(L1, devcap >> 9));
        let _ = write!(out, ", Latency L0s {l0s}, L1 {l1}");
    }
    out.push('\n');
    let devctl = u32::from(c.w(at + 8));
    let devctl = flags(devctl, "CorrErr NonFatalErr FatalErr UnsupReq");
    emit!(out, "\t\tDevCtl:\t{devctl}");
    if ty == 9 || ty == 10 {
        return; // Root-complex integrated functions have no link.
    }
    let lnkcap = c.d(at + 0xc);
    let (port, speed, width) = (lnkcap >> 24, link_speed(lnkcap & 0xf), (lnkcap >> 4) & 0x3f);
    emit!(
        out,
        "\t\tLnkCap:\tPort #{port}, Speed {speed}, Width x{width}"
    );
    let lnksta = u32::from(c.w(at + 0x12));
    let (speed, width) = (link_speed(lnksta & 0xf), (lnksta >> 4) & 0x3f);
    emit!(out, "\t\tLnkSta:\tSpeed {speed}, Width x{width}");
}

/// Walks and decodes the PCIe extended capability list starting at 0x100.
fn ext_capabilities(c: &Cfg, out: &mut String) {
    let mut seen = [false; 0x1000 / 4];
    let mut at = 0x100usize;
    for _ in 0..MAX_EXT_CAPS {
        let hdr = c.d(at);
        if hdr == 0 || hdr == 0xffff_ffff {
            return;
        }
        let _ = write!(out, "\tCapabilities: [{at:03x} v{}] ", (hdr >> 16) & 0xf);
        if std::mem::replace(&mut seen[at / 4], true) {
            emit!(out, "<chain looped>");
            return;
        }
        match hdr & 0xffff {
            0x0001 => emit!(out, "Advanced Error Reporting"),
            0x0003 => {
                let serial = (u64::from(c.d(at + 8)) << 32) | u64::from(c.d(at + 4));
                let bytes = serial.to_be_bytes().map(|b| format!("{b:02x}"));
                emit!(out, "Device Serial Number {}", bytes.join("-"));
            }
            0x000b => {
                let v = c.d(at + 4);
                let (id, rev, len) = (v & 0xffff, (v >> 16) & 0xf, v >> 20);
                emit!(
                    out,
                    "Vendor Specific Information: ID={id:04x} Rev={rev} Len={len:03x}"
                );
            }
            id => emit!(out, "Extended Capability ID 0x{id:02x}"),
        }
        let next = ((hdr >> 20) & 0xffc) as usize;
        if next == 0 {
            return;
        }
        if next < 0x100 {
            emit!(out, "\tCapabilities: [{next:03x}] <chain broken>");
            return;
        }
        at = next;
    }
    emit!(out, "\tCapabilities: [{at:03x}] <chain too long>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put16(c: &mut [u8], off: usize, v: u16) {
        c[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(c: &mut [u8], off: usize, v: u32) {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    /// Parses `lspci -xxx`-style rows (`40: 01 50 03 00`) into a zero-filled 256-byte buffer.
    fn from_hex(dump: &str) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        for row in dump.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (off, bytes) = row.split_once(": ").unwrap();
            let off = usize::from_str_radix(off, 16).unwrap();
            for (i, b) in bytes.split_whitespace().enumerate() {
                c[off + i] = u8::from_str_radix(b, 16).unwrap();
            }
        }
        c
    }

    /// Type-0 header: Mem+, Cap+, BAR0 memory, BAR2 I/O, INTA -> IRQ 10; capabilities PM v3
    /// at 0x40, MSI (64-bit, maskable, 4 vectors) at 0x50, MSI-X (enabled, 2 entries) at 0x70
    /// and PCIe v2 endpoint (2.5GT/s x1) at 0x80.
    fn sample() -> Vec<u8> {
        from_hex(
            "00: 4f 49 c8 0d 02 00 10 00 01 00 80 11 00 00 00 00
             10: 00 00 00 e0 00 00 00 00 01 c0 00 00 00 00 00 00
             20: 00 00 00 00 00 00 00 00 00 00 00 00 4f 49 c8 0d
             30: 00 00 00 00 40 00 00 00 00 00 00 00 0a 01 00 00
             40: 01 50 03 00 08 00 00 00
             50: 05 70 84 01 00 00 e0 fe 01 00 00 00 21 40 00 00
             60: 03 00 00 00 01 00 00 00
             70: 11 80 01 80 00 10 00 00 00 18 00 00
             80: 10 00 02 00 00 00 00 00 00 00 00 00 11 00 00 00
             90: 00 00 11 00",
        )
    }

    const PM_LINES: &str = "\tCapabilities: [40] Power Management version 3
\t\tFlags: PMEClk- DSI- D1- D2- AuxCurrent=0mA PME(D0-,D1-,D2-,D3hot-,D3cold-)
\t\tStatus: D0 NoSoftRst+ PME-Enable- DSel=0 DScale=0 PME-\n";

    #[test]
    fn full_type0_decode() {
        let got = describe_with_sizes("00:03.0", &sample(), &[4096, 0, 256, 0, 0, 0]);
        let want = "\
00:03.0 Signal processing controller [1180]: ACCES I/O Products Inc Device 0dc8 (rev 01)
\tSubsystem: ACCES I/O Products Inc Device 0dc8
\tControl: I/O- Mem+ BusMaster- SpecCycle- MemWINV- VGASnoop- ParErr- Stepping- SERR- FastB2B- DisINTx-
\tStatus: Cap+ 66MHz- UDF- FastB2B- ParErr- DEVSEL=fast >TAbort- <TAbort- <MAbort- >SERR- <PERR- INTx-
\tInterrupt: pin A routed to IRQ 10
\tRegion 0: Memory at e0000000 (32-bit, non-prefetchable) [size=4K]
\tRegion 2: I/O ports at c000 [size=256]
"
        .to_string()
            + PM_LINES
            + "\
\tCapabilities: [50] MSI: Enable- Count=1/4 Maskable+ 64bit+
\t\tAddress: 00000001fee00000  Data: 4021
\t\tMasking: 00000003  Pending: 00000001
\tCapabilities: [70] MSI-X: Enable+ Count=2 Masked-
\t\tVector table: BAR=0 offset=00001000
\t\tPBA: BAR=0 offset=00001800
\tCapabilities: [80] Express (v2) Endpoint, MSI 00
\t\tDevCap:\tMaxPayload 128 bytes, PhantFunc 0, Latency L0s <64ns, L1 <1us
\t\tDevCtl:\tCorrErr- NonFatalErr- FatalErr- UnsupReq-
\t\tLnkCap:\tPort #0, Speed 2.5GT/s, Width x1
\t\tLnkSta:\tSpeed 2.5GT/s, Width x1
";
        assert_eq!(got, want);
        // Without sizes, no [size=...] suffixes; a 256-byte space never shows extended caps.
        let plain = describe("00:03.0", &sample());
        assert!(plain.contains("\tRegion 0: Memory at e0000000 (32-bit, non-prefetchable)\n"));
        assert!(!plain.contains("size="));
    }

    #[test]
    fn msi_32bit_and_other_caps() {
        let mut c = sample();
        put16(&mut c, 0x52, 0x0031); // enabled, 8 of 1 (nonsense but decodable), 32-bit, no mask
        put16(&mut c, 0x5c, 0xffff); // not part of a 32-bit MSI cap
        put16(&mut c, 0x72, 0x403f); // masked, 64 entries, disabled
        put32(&mut c, 0x74, 0x0000_2002);
        put32(&mut c, 0x78, 0x0000_3003);
        put16(&mut c, 0x82, 0x0042); // v2 root port, no slot
        put32(&mut c, 0x84, 0x0000_0002); // MaxPayload 512
        put16(&mut c, 0x88, 0x000f);
        put32(&mut c, 0x8c, 0x0700_0083); // port 7, 8GT/s x8
        put16(&mut c, 0x92, 0x0042);
        c[0x81] = 0xc0; // -> vendor specific (len 0x14) -> bridge subsystem -> unknown id 0x13
        c[0xc0..0xc3].copy_from_slice(&[0x09, 0xd0, 0x14]);
        c[0xd0..0xd8].copy_from_slice(&[0x0d, 0xe0, 0, 0, 0xf4, 0x1a, 0x00, 0x11]);
        c[0xe0..0xe2].copy_from_slice(&[0x13, 0x00]);
        let got = describe("00:04.0", &c);
        let l = lines(&got);
        let msi = l.iter().position(|x| x.starts_with("\tCapabilities: [50]"));
        let msi = msi.unwrap();
        let want = [
            "\tCapabilities: [50] MSI: Enable+ Count=8/1 Maskable- 64bit-",
            "\t\tAddress: fee00000  Data: 0001",
            "\tCapabilities: [70] MSI-X: Enable- Count=64 Masked+",
            "\t\tVector table: BAR=2 offset=00002000",
            "\t\tPBA: BAR=3 offset=00003000",
            "\tCapabilities: [80] Express (v2) Root Port (Slot-), MSI 00",
            "\t\tDevCap:\tMaxPayload 512 bytes, PhantFunc 0",
            "\t\tDevCtl:\tCorrErr+ NonFatalErr+ FatalErr+ UnsupReq+",
            "\t\tLnkCap:\tPort #7, Speed 8GT/s, Width x8",
            "\t\tLnkSta:\tSpeed 5GT/s, Width x4",
            "\tCapabilities: [c0] Vendor Specific Information: Len=14",
            "\tCapabilities: [d0] Subsystem: Red Hat, Inc. Device 1100",
            "\tCapabilities: [e0] #13",
        ];
        assert_eq!(l[msi..], want);
        // Root-complex integrated endpoints have no link registers.
        put16(&mut c, 0x82, 0x0092);
        let got = describe("00:04.0", &c);
        assert!(got.contains("Express (v2) Root Complex Integrated Endpoint, MSI 00\n"));
        assert!(!got.contains("LnkCap"));
    }

    #[test]
    fn extended_capabilities() {
        let mut c = vec![0u8; 4096];
        c[..256].copy_from_slice(&sample());
        put32(&mut c, 0x100, 0x0003 | (1 << 16) | (0x110 << 20));
        c[0x104..0x10c].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        put32(&mut c, 0x110, 0x000b | (1 << 16) | (0x120 << 20));
        put32(&mut c, 0x114, 0x0001 | (1 << 16) | (0x010 << 20));
        put32(&mut c, 0x120, 0x0001 | (2 << 16) | (0x130 << 20));
        put32(&mut c, 0x130, 0x001e | (1 << 16));
        let tail = "\tLnkSta:\tSpeed 2.5GT/s, Width x1
\tCapabilities: [100 v1] Device Serial Number 01-02-03-04-05-06-07-08
\tCapabilities: [110 v1] Vendor Specific Information: ID=0001 Rev=1 Len=010
\tCapabilities: [120 v2] Advanced Error Reporting
\tCapabilities: [130 v1] Extended Capability ID 0x1e\n";
        assert!(describe("00:03.0", &c).ends_with(tail));
        // An extended chain that loops, and one whose pointer goes below 0x100.
        put32(&mut c, 0x130, 0x001e | (1 << 16) | (0x100 << 20));
        let looped = "ID 0x1e\n\tCapabilities: [100 v1] <chain looped>\n";
        assert!(describe("00:03.0", &c).ends_with(looped));
        put32(&mut c, 0x130, 0x001e | (1 << 16) | (0x040 << 20));
        assert!(describe("x", &c).ends_with("ID 0x1e\n\tCapabilities: [040] <chain broken>\n"));
        // An empty extended space prints nothing beyond the standard caps.
        c[0x100..].fill(0);
        assert_eq!(describe("x", &c), describe("x", &sample()));
    }

    #[test]
    fn bar_64bit_pairs() {
        let mut c = sample();
        put32(&mut c, 0x10, 0x0000_000c); // 64-bit prefetchable, high dword in BAR1
        put32(&mut c, 0x14, 0x0000_0008);
        put32(&mut c, 0x18, 0xfebf_0000); // 32-bit
        put32(&mut c, 0x20, 0xfe00_0004); // 64-bit non-prefetchable, BAR5 = 0
        let sizes = [16 << 30, 0, 1 << 20, 0, 16384, 0];
        let got = describe_with_sizes("00:05.0", &c, &sizes);
        let regions: Vec<&str> = got.lines().filter(|x| x.starts_with("\tRegion")).collect();
        let want = [
            "\tRegion 0: Memory at 800000000 (64-bit, prefetchable) [size=16G]",
            "\tRegion 2: Memory at febf0000 (32-bit, non-prefetchable) [size=1M]",
            "\tRegion 4: Memory at fe000000 (64-bit, non-prefetchable) [size=16K]",
        ];
        assert_eq!(regions, want);
        // A 64-bit BAR in the last slot has no partner.
        put32(&mut c, 0x20, 0);
        put32(&mut c, 0x24, 0xfd00_0004);
        let want = "\tRegion 5: Memory at <invalid-64bit-slot> (64-bit, non-prefetchable)\n";
        assert!(describe("00:05.0", &c).contains(want));
    }

    #[test]
    fn io_bars_and_unassigned() {
        let mut c = sample();
        put32(&mut c, 0x10, 0);
        put32(&mut c, 0x14, 0x0000_0101); // I/O at 0x100
        put32(&mut c, 0x18, 0xffff_ffff); // reads as absent
        put32(&mut c, 0x1c, 0x0000_0001); // I/O, no address
        put32(&mut c, 0x20, 0x0000_0002); // low-1M type
        let got = describe_with_sizes("00:06.0", &c, &[4096, 8, 0, 32, 0, 1 << 12]);
        let regions: Vec<&str> = got.lines().filter(|x| x.starts_with("\tRegion")).collect();
        let want = [
            "\tRegion 0: Memory at <unassigned> (32-bit, non-prefetchable) [size=4K]",
            "\tRegion 1: I/O ports at 0100 [size=8]",
            "\tRegion 3: I/O ports at <unassigned> [size=32]",
            "\tRegion 4: Memory at <unassigned> (low-1M, non-prefetchable)",
            "\tRegion 5: Memory at <unassigned> (32-bit, non-prefetchable) [size=4K]",
        ];
        assert_eq!(regions, want);
    }

    #[test]
    fn size_formatting() {
        let sizes: [u64; 9] = [
            1,
            256,
            1536,
            4096,
            3 << 10,
            1 << 20,
            1 << 30,
            1 << 40,
            1 << 50,
        ];
        let got = sizes.map(fmt_size).join(" ");
        assert_eq!(got, "1 256 1536 4K 3K 1M 1G 1T 1024T");
    }

    #[test]
    fn looping_and_broken_cap_chains() {
        let mut c = sample();
        c[0x81] = 0x50; // PCIe -> MSI again
        let got = describe("00:03.0", &c);
        assert!(got.ends_with("Width x1\n\tCapabilities: [50] <chain looped>\n"));
        c[0x41] = 0x40; // PM points at itself
        let want = PM_LINES.to_string() + "\tCapabilities: [40] <chain looped>\n";
        assert!(describe("x", &c).ends_with(&want));
        c[0x41] = 0x10; // pointer into the header
        assert!(describe("x", &c).ends_with("\tCapabilities: [10] <chain broken>\n"));
        c[0x06] = 0; // Cap- hides the list
        assert!(!describe("x", &c).contains("Capabilities"));
    }

    #[test]
    fn short_and_empty_dumps() {
        let want = "00:00.0 Unassigned class [ffff]: Device ffff:ffff (rev ff) (prog-if ff)
\t!!! Unknown header type 7f\n";
        assert_eq!(describe("00:00.0", &[]), want);
        let mut c = sample();
        c.truncate(0x48); // the PM cap's successor lies beyond the end
        let want = PM_LINES.to_string() + "\tCapabilities: [50] <chain broken>\n";
        assert!(describe("00:03.0", &c).ends_with(&want));
    }

    #[test]
    fn bridge_and_vendor_names() {
        let mut c = from_hex(
            "00: 86 80 34 12 00 00 00 00 00 00 04 06 00 00 81 00
             10: 00 00 00 00 00 00 00 00 00 01 03 00",
        );
        let want =
            "00:1c.0 PCI bridge [0604]: Intel Corporation Device 1234 (prog-if 00 [Normal decode])
\tBus: primary=00, secondary=01, subordinate=03, sec-latency=0\n";
        assert_eq!(describe("00:1c.0", &c), want);
        c[0x0e] = 0;
        put16(&mut c, 0, 0x4e58);
        put16(&mut c, 0x06, 0x0400); // DEVSEL=slow
        let got = describe("x", &c);
        assert!(got.starts_with("x PCI bridge [0604]: Nutanix Inc. Device 1234"));
        assert!(got.contains(" DEVSEL=slow "));
        put16(&mut c, 0, 0x1b36);
        c[0x09..0x0c].copy_from_slice(&[0x02, 0x08, 0x01]);
        let want = "x Non-Volatile memory controller [0108]: Device 1b36:1234 (prog-if 02 [NVM Express])\n";
        assert!(describe("x", &c).starts_with(want));
        c[0x09] = 0x05;
        assert!(describe("x", &c).starts_with(
            "x Non-Volatile memory controller [0108]: Device 1b36:1234 (prog-if 05)\n"
        ));
    }

    #[test]
    fn class_names() {
        assert_eq!(class_name(0x05, 0x80, 0), "Memory controller");
        assert_eq!(class_name(0x08, 0x80, 0), "System peripheral");
        assert_eq!(class_name(0x11, 0x80, 0), "Signal processing controller");
        assert_eq!(
            class_name(0x01, 0x08, 0x02),
            "Non-Volatile memory controller"
        );
        assert_eq!(class_name(0x02, 0x00, 0), "Ethernet controller");
        assert_eq!(class_name(0x03, 0x00, 0), "VGA compatible controller");
        assert_eq!(class_name(0x06, 0x04, 0x01), "PCI bridge");
        assert_eq!(class_name(0x0c, 0x03, 0x30), "USB controller");
        assert_eq!(class_name(0x13, 0x00, 0), "Non-Essential Instrumentation");
        assert_eq!(class_name(0x02, 0x42, 0), "Network controller"); // unknown sub -> base
        assert_eq!(class_name(0xff, 0x12, 0x34), "Unassigned class");
        assert_eq!(class_name(0x77, 0x01, 0), "Class 7701");
        for base in (0x00..=0x13).chain([0xff]) {
            assert!(
                !class_name(base, 0xee, 0).starts_with("Class "),
                "base {base:02x}"
            );
        }
        // Every table entry is `<2, 4 or 6 lowercase hex digits> <name>`, keys unique.
        let mut keys = std::collections::HashSet::new();
        for entry in CLASS_NAMES.split('|') {
            let (key, name) = entry.split_once(' ').unwrap();
            assert!(
                matches!(key.len(), 2 | 4 | 6) && !name.is_empty(),
                "{entry:?}"
            );
            assert!(
                key.chars().all(|ch| matches!(ch, '0'..='9' | 'a'..='f')),
                "{entry:?}"
            );
            assert!(keys.insert(key), "duplicate {key}");
        }
    }

    #[test]
    fn random_buffers_never_panic() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for i in 0..10_000 {
            let len = if i % 2 == 0 { 256 } else { 4096 };
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 4 != 0 {
                buf[0x0e] &= 0x80; // mostly type 0 with a capability list, to reach the decoders
                buf[0x06] |= 0x10;
            }
            let mut sizes = [0u64; 6];
            sizes
                .iter_mut()
                .for_each(|size| *size = next() >> (next() % 64));
            let out = describe_with_sizes("ff:1f.7", &buf, &sizes);
            assert!(out.starts_with("ff:1f.7 ") && out.ends_with('\n'));
            let cut = (next() % 300) as usize;
            assert!(describe("ff:1f.7", &buf[..cut.min(len)]).ends_with('\n'));
        }
    }
}
