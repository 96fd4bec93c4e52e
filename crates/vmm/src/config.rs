//! What to run: the VM's configuration and the layout of the built-in guest's workload area.
//!
//! The bottom layer: nothing here touches KVM or memory; every other module may use it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cpl3;
use crate::guest::Workload;
use crate::memory::Backend;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The built-in guest's workload.
    pub workload: Workload,
    /// Bytes of the workload area used (split among vCPUs); `None`: all of it.
    pub workload_bytes: Option<u64>,
    /// Run time; `None`: until the workload ends (`dirty` and `read` never do).
    pub run_for: Option<Duration>,
    /// Seed of the `random` workload.
    pub seed: u64,
    /// What backs guest memory.
    pub backend: Backend,
    /// Boot this Linux kernel instead of the built-in guest (the workload fields are unused).
    pub linux: Option<crate::linux::LinuxBoot>,
    /// Where a Linux guest's serial console (COM1) goes: this file (appended), or stdout.
    /// Named where the VM runs: a restore or an incoming migration sets its own.
    #[serde(default)]
    pub console: Option<PathBuf>,
    /// vfio-user device sockets to attach to the PCI bus (guest memory becomes a memfd).
    #[serde(default)]
    pub vfio_user: Vec<PathBuf>,
    /// Give the built-in guest KVM's in-kernel irqchip (LAPIC, IOAPIC, PIC) and PIT where
    /// KVM offers them (Linux guests and VMs with devices always ask for it).
    #[serde(default)]
    pub irqchip: bool,
    /// virtio-mmio devices (`devices::virtio`), in bus order.
    #[serde(default)]
    pub virtio: Vec<VirtioSpec>,
    /// How the virtio devices interrupt: legacy lines, or MSI offered to the driver.
    #[serde(default)]
    pub virtio_irq: virtio::IrqMode,
    /// Poll mode of the virtio devices' threads: after each event, poll the queues for
    /// this many microseconds (notifies off meanwhile); 0: never poll.
    #[serde(default)]
    pub virtio_poll_us: u64,
    /// What the built-in guest's `virtio` workload does.
    #[serde(default)]
    pub virtio_job: VirtioJob,
}

/// The `virtio` workload's parameters (see `guest::abi::VIRTIO_PARAMS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioJob {
    /// `guest::abi::VIRTIO_JOB_*`.
    pub job: u64,
    /// Requests of a benchmark job.
    pub iterations: u64,
    /// The host vsock port the guest connects to.
    pub vsock_port: u32,
    /// The guest's IPv4 address for the net test's ARP request.
    pub guest_ip: [u8; 4],
    /// The host's IPv4 address on the tap, asked for.
    pub host_ip: [u8; 4],
    /// The privilege of the guest's interrupt handler: 0 (a kernel's, as a real driver's;
    /// emulated under PVM) or 3 (native under PVM).
    #[serde(default)]
    pub handler_cpl: u8,
    /// Benchmark jobs: the guest asks for no interrupts and polls the used ring.
    #[serde(default)]
    pub poll: bool,
}

impl Default for VirtioJob {
    fn default() -> Self {
        VirtioJob {
            job: 0,
            iterations: 0,
            vsock_port: 5000,
            guest_ip: [172, 30, 0, 2],
            host_ip: [172, 30, 0, 1],
            handler_cpl: 0,
            poll: false,
        }
    }
}

/// A device to attach, as the command line and the API name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VirtioSpec {
    /// A block device over a raw image file.
    Block {
        /// The image.
        path: PathBuf,
        /// Refuse writes.
        #[serde(default)]
        read_only: bool,
        /// Bypass the host's page cache (`O_DIRECT`, QEMU's `cache=none`).
        #[serde(default)]
        direct: bool,
    },
    /// A network device on a tap interface.
    Net {
        /// The tap's name.
        tap: String,
        /// MAC address; `None`: one derived from the tap's name.
        #[serde(default)]
        mac: Option<[u8; 6]>,
    },
    /// A vsock device; the host side is a Unix socket (Firecracker's hybrid convention).
    Vsock {
        /// The guest's CID.
        cid: u64,
        /// The Unix socket the device listens on (and `<path>_<port>` it connects to).
        uds: PathBuf,
    },
    /// An entropy device.
    Rng,
}

impl VirtioSpec {
    /// The device type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioSpec::Block { .. } => "block",
            VirtioSpec::Net { .. } => "net",
            VirtioSpec::Vsock { .. } => "vsock",
            VirtioSpec::Rng => "rng",
        }
    }

    /// This device with the backend of `named` (a device of the same kind named where a
    /// snapshot is restored or a migration lands): the backend (image and its options, tap,
    /// socket) is `named`'s; what the guest knows the device by stays this one's (a net
    /// device's MAC, a vsock device's CID).
    pub fn rebound(&self, named: &VirtioSpec) -> Option<VirtioSpec> {
        Some(match (self, named) {
            (VirtioSpec::Block { .. }, b @ VirtioSpec::Block { .. }) => b.clone(),
            (VirtioSpec::Net { tap, mac }, VirtioSpec::Net { tap: new, .. }) => VirtioSpec::Net {
                tap: new.clone(),
                mac: Some(mac.unwrap_or_else(|| derived_mac(tap))),
            },
            (VirtioSpec::Vsock { cid, .. }, VirtioSpec::Vsock { uds, .. }) => VirtioSpec::Vsock {
                cid: *cid,
                uds: uds.clone(),
            },
            (VirtioSpec::Rng, VirtioSpec::Rng) => VirtioSpec::Rng,
            _ => return None,
        })
    }
}

/// A locally administered MAC from a tap's name (stable across runs): a net device's MAC
/// when none is given.
pub fn derived_mac(name: &str) -> [u8; 6] {
    let h = crc32fast::hash(name.as_bytes()).to_be_bytes();
    [0x06, 0xfa, h[0], h[1], h[2], h[3]]
}

/// The devices of a VM that lands here (a restore, an incoming migration) with the backends
/// named here: `named` must list the same kinds in the same order as `saved`; anything
/// else is refused before the VM exists, naming what is missing or different.
pub fn rebind_virtio(
    saved: &[VirtioSpec],
    named: &[VirtioSpec],
) -> Result<Vec<VirtioSpec>, ConfigError> {
    let kinds = |v: &[VirtioSpec]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(VirtioSpec::kind)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mismatch = || ConfigError::Backends {
        saved: kinds(saved),
        named: kinds(named),
    };
    if saved.len() != named.len() {
        return Err(mismatch());
    }
    saved
        .iter()
        .zip(named)
        .map(|(s, n)| s.rebound(n).ok_or_else(mismatch))
        .collect()
}

/// The vfio-user device servers named where a VM lands (a restore, a migration's
/// destination) in place of the ones it had: one for each, in the same order (each is
/// checked against its record when its state is given back: slot, IDs, vectors).
pub fn rebind_vfio_user(saved: &[PathBuf], named: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigError> {
    if saved.len() != named.len() {
        return Err(ConfigError::VfioUserServers {
            saved: saved.len(),
            named: named.len(),
        });
    }
    Ok(named.to_vec())
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            vcpus: 1,
            workload: Workload::Fill,
            workload_bytes: None,
            run_for: None,
            seed: 1,
            backend: Backend::Anonymous,
            linux: None,
            console: None,
            vfio_user: Vec::new(),
            irqchip: false,
            virtio: Vec::new(),
            virtio_irq: virtio::IrqMode::Legacy,
            virtio_job: VirtioJob::default(),
            virtio_poll_us: 0,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The backends named where a VM lands are not those of its devices.
    #[error(
        "the VM's virtio devices are [{saved}], the backends named here are [{named}]: name one for each, in the same order (--disk, --net, --vsock, --rng, as for run; a disk is shared storage, not carried)"
    )]
    Backends {
        /// The saved devices' kinds.
        saved: String,
        /// The named backends' kinds.
        named: String,
    },
    /// Not as many vfio-user servers named as the VM has devices.
    #[error(
        "the VM has {saved} vfio-user device(s), {named} server(s) are named here: name one for \
         each, in the same order (--vfio-user SOCKET: a server of the same device, started \
         where the VM lands; its state is carried)"
    )]
    VfioUserServers {
        /// Devices the VM had.
        saved: usize,
        /// Servers named.
        named: usize,
    },
    /// Too few or too many vCPUs.
    #[error("vcpus must be 1..={max}")]
    Vcpus {
        /// The largest number supported.
        max: u64,
    },
    /// Too few or too many vCPUs for a Linux guest (its MP table).
    #[error("Linux boot supports 1..={max} vCPUs (MP table)")]
    LinuxVcpus {
        /// The largest number supported.
        max: u32,
    },
    /// More memory than the built-in guest's page tables map.
    #[error("memory above {} GiB is not supported by the built-in guest", max >> 30)]
    MemTooLarge {
        /// The limit in bytes.
        max: u64,
    },
    /// Not more memory than the built-in guest's fixed layout.
    #[error("memory must be more than {} MiB (the built-in guest's fixed layout)", min >> 20)]
    MemTooSmall {
        /// The fixed layout's size in bytes.
        min: u64,
    },
    /// Memory is not a whole number of 2 MiB pages.
    #[error("memory must be a non-zero multiple of 2 MiB (got {0} bytes)")]
    MemAlignment(u64),
    /// The workload area does not fit.
    #[error("workload area of {} MiB does not fit in {} MiB of memory", area >> 20, mem >> 20)]
    WorkloadArea {
        /// Bytes asked for.
        area: u64,
        /// Guest memory.
        mem: u64,
    },
    /// A vCPU's share of the workload area is below 1 MiB.
    #[error("each vCPU needs at least 1 MiB of workload memory")]
    SliceTooSmall,
    /// With virtio devices, memory must end below their windows.
    #[error("with virtio devices guest memory must end below their windows at {limit:#x}")]
    VirtioWindow {
        /// Where the windows start.
        limit: u64,
    },
    /// With devices, memory must end below the PCI window.
    #[error("with vfio-user devices guest memory must end below the PCI window at {limit:#x}")]
    PciWindow {
        /// Where the window starts.
        limit: u64,
    },
}

/// One vCPU's slice of the workload area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of its first page within the workload area.
    pub first_page: u64,
}

impl VmConfig {
    /// Check the memory and vCPU limits of the built-in guest.
    pub fn check_builtin(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || u64::from(self.vcpus) > cpl3::MAX_VCPUS {
            return Err(ConfigError::Vcpus {
                max: cpl3::MAX_VCPUS,
            });
        }
        if self.mem_bytes > cpl3::MAX_MEM {
            return Err(ConfigError::MemTooLarge { max: cpl3::MAX_MEM });
        }
        if self.mem_bytes <= cpl3::WORKLOAD {
            return Err(ConfigError::MemTooSmall {
                min: cpl3::WORKLOAD,
            });
        }
        Ok(())
    }

    /// The built-in guest's workload slices, one per vCPU.
    pub fn slices(&self) -> Result<Vec<Slice>, ConfigError> {
        let area = self
            .workload_bytes
            .unwrap_or(self.mem_bytes.saturating_sub(cpl3::WORKLOAD));
        if self.mem_bytes <= cpl3::WORKLOAD || area > self.mem_bytes - cpl3::WORKLOAD {
            return Err(ConfigError::WorkloadArea {
                area,
                mem: self.mem_bytes,
            });
        }
        let per = (area / u64::from(self.vcpus.max(1))) & !((1 << 20) - 1);
        if per < (1 << 20) {
            return Err(ConfigError::SliceTooSmall);
        }
        Ok((0..u64::from(self.vcpus))
            .map(|i| Slice {
                start: cpl3::WORKLOAD + i * per,
                len: per,
                first_page: i * per / 4096,
            })
            .collect())
    }
}

#[cfg(test)]
mod rebind_tests {
    use super::*;

    #[test]
    fn backends_named_here_replace_the_saved_ones_kind_by_kind() {
        let saved = vec![
            VirtioSpec::Block {
                path: "/src/disk.img".into(),
                read_only: false,
                direct: false,
            },
            VirtioSpec::Net {
                tap: "tap-src".into(),
                mac: None,
            },
            VirtioSpec::Vsock {
                cid: 7,
                uds: "/src/v.sock".into(),
            },
            VirtioSpec::Rng,
        ];
        let named = vec![
            VirtioSpec::Block {
                path: "/dst/disk.img".into(),
                read_only: false,
                direct: true,
            },
            VirtioSpec::Net {
                tap: "tap-dst".into(),
                mac: None,
            },
            VirtioSpec::Vsock {
                cid: 3,
                uds: "/dst/v.sock".into(),
            },
            VirtioSpec::Rng,
        ];
        let got = rebind_virtio(&saved, &named).unwrap();
        assert_eq!(got[0], named[0]);
        // The guest keeps its MAC and CID; the backends are the ones named here.
        assert_eq!(
            got[1],
            VirtioSpec::Net {
                tap: "tap-dst".into(),
                mac: Some(derived_mac("tap-src")),
            }
        );
        assert_eq!(
            got[2],
            VirtioSpec::Vsock {
                cid: 7,
                uds: "/dst/v.sock".into(),
            }
        );
        // Missing, extra, or another order: refused, naming both lists.
        let e = rebind_virtio(&saved, &[]).unwrap_err().to_string();
        assert!(
            e.contains("[block, net, vsock, rng]") && e.contains("[none]"),
            "{e}"
        );
        assert!(rebind_virtio(&saved, &named[..3]).is_err());
        let mut swapped = named.clone();
        swapped.swap(0, 3);
        assert!(rebind_virtio(&saved, &swapped).is_err());
        assert_eq!(rebind_virtio(&[], &[]).unwrap(), vec![]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_split_the_area_per_vcpu() {
        let cfg = VmConfig {
            mem_bytes: 64 << 20,
            vcpus: 2,
            ..Default::default()
        };
        let s = cfg.slices().unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].start, cpl3::WORKLOAD);
        assert_eq!(s[1].start, s[0].start + s[0].len);
        assert_eq!(s[1].first_page, s[0].len / 4096);
        let small = VmConfig {
            mem_bytes: cpl3::WORKLOAD,
            ..Default::default()
        };
        assert!(matches!(
            small.check_builtin(),
            Err(ConfigError::MemTooSmall { .. })
        ));
        let huge = VmConfig {
            workload_bytes: Some(1 << 40),
            ..Default::default()
        };
        assert!(matches!(
            huge.slices(),
            Err(ConfigError::WorkloadArea { .. })
        ));
    }

    #[test]
    fn old_configs_parse_without_the_new_fields() {
        let mut v = serde_json::to_value(VmConfig::default()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("irqchip");
        o.remove("vfio_user");
        let cfg: VmConfig = serde_json::from_value(v).unwrap();
        assert!(!cfg.irqchip);
    }
}
