//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+): a file of a header, descriptors
//! (name, offset, size) and u64 data, read with `pread` at any time. Probed, never assumed:
//! a KVM without it answers the ioctl with an error and [`KvmStats::of_vcpu`] returns `None`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use thiserror::Error;

use super::kvm::KvmError;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
/// The header: flags, name_size, num_desc, id_offset, desc_offset, data_offset (u32 each).
const HEADER: usize = 24;
/// A descriptor before its name: flags u32, exponent i16, size u16, offset u32, bucket u32.
const DESC: usize = 16;

/// Reading KVM's statistics failed.
#[derive(Debug, Error)]
pub enum StatsError {
    /// There is no such vCPU.
    #[error("no vCPU {0}")]
    NoVcpu(usize),
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(KvmError),
    /// Reading the stats file failed.
    #[error("reading KVM's binary stats")]
    Read(#[source] io::Error),
    /// The file's layout is not what the kernel documents.
    #[error("KVM's binary stats are malformed: {0}")]
    Malformed(&'static str),
    /// No statistic of that name.
    #[error("KVM has no statistic '{0}'")]
    NoStat(String),
}

/// One statistic's place in the data block.
#[derive(Debug, Clone)]
struct Desc {
    name: String,
    offset: u64,
}

/// A vCPU's statistics file.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    data: u64,
    descs: Vec<Desc>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, StatsError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(StatsError::Malformed("short header or descriptor"))
}

impl KvmStats {
    /// Open `vcpu`'s statistics; `None` if this KVM has none.
    pub fn of_vcpu(vcpu: &VcpuFd) -> Result<Option<KvmStats>, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: a new descriptor only we own.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::parse(file).map(Some)
    }

    fn parse(file: File) -> Result<KvmStats, StatsError> {
        let mut h = [0u8; HEADER];
        file.read_exact_at(&mut h, 0).map_err(StatsError::Read)?;
        let name_size = u32_at(&h, 4)? as usize;
        let n = u32_at(&h, 8)? as usize;
        let desc_off = u64::from(u32_at(&h, 16)?);
        let data = u64::from(u32_at(&h, 20)?);
        if name_size > 4096 || n > 65_536 {
            return Err(StatsError::Malformed("implausible header"));
        }
        let mut raw = vec![0u8; n * (DESC + name_size)];
        file.read_exact_at(&mut raw, desc_off)
            .map_err(StatsError::Read)?;
        let mut descs = Vec::with_capacity(n);
        for d in raw.chunks_exact(DESC + name_size) {
            let offset = u64::from(u32_at(d, 8)?);
            let name = &d[DESC..];
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            descs.push(Desc {
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
                offset,
            });
        }
        Ok(KvmStats { file, data, descs })
    }

    /// The names of every statistic.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.descs.iter().map(|d| d.name.as_str())
    }

    /// The current value of statistic `name` (its first u64).
    pub fn read(&self, name: &str) -> Result<u64, StatsError> {
        let d = self
            .descs
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| StatsError::NoStat(name.to_string()))?;
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, self.data + d.offset)
            .map_err(StatsError::Read)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_exits_are_counted_where_kvm_has_binary_stats() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        match KvmStats::of_vcpu(&vcpu).unwrap() {
            Some(s) => {
                assert!(
                    s.names().any(|n| n == "exits"),
                    "{:?}",
                    s.names().collect::<Vec<_>>()
                );
                assert_eq!(s.read("exits").unwrap(), 0);
                assert!(matches!(s.read("no-such-stat"), Err(StatsError::NoStat(_))));
            }
            None => panic!(
                "this KVM has no KVM_GET_STATS_FD (Linux 5.14 or later has it): the stats cannot be checked"
            ),
        }
    }
}
