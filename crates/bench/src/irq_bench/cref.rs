//! The C reference: `c/irq_pingpong.c`, compiled at run time with the system `cc` into a
//! temporary directory, run once per method and placement.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{IrqBenchError, Line};

/// The reference's source, shipped in the binary.
pub const SOURCE: &str = include_str!("../../c/irq_pingpong.c");

/// The compiled reference in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct CRef {
    dir: PathBuf,
    bin: PathBuf,
}

impl CRef {
    /// Compile the reference with `cc -O2 -pthread` (`$CC` if set).
    pub fn build() -> Result<CRef, IrqBenchError> {
        let dir = std::env::temp_dir().join(format!("faultline-irq-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| IrqBenchError::Sys {
            what: "creating the C reference's directory",
            source,
        })?;
        let src = dir.join("irq_pingpong.c");
        let bin = dir.join("irq_pingpong");
        std::fs::write(&src, SOURCE).map_err(|source| IrqBenchError::Sys {
            what: "writing the C reference's source",
            source,
        })?;
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-O2", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .map_err(|source| IrqBenchError::CcMissing {
                cc: cc.clone(),
                source,
            })?;
        let me = CRef { dir, bin };
        if !out.status.success() {
            return Err(IrqBenchError::CcFailed {
                cc,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(me)
    }

    /// The compiled program.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// Run `method` with the device on `device_cpu` and the handler on `handler_cpu`.
    pub fn run(
        &self,
        method: &str,
        placement: &'static str,
        device_cpu: usize,
        handler_cpu: usize,
        round_trips: usize,
    ) -> Result<Line, IrqBenchError> {
        let out = Command::new(&self.bin)
            .args([
                method,
                placement,
                &device_cpu.to_string(),
                &handler_cpu.to_string(),
                &round_trips.to_string(),
            ])
            .output()
            .map_err(|source| IrqBenchError::Sys {
                what: "running the C reference",
                source,
            })?;
        if !out.status.success() {
            return Err(IrqBenchError::CFailed {
                method: method.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line: Line =
            serde_json::from_str(text.trim()).map_err(|source| IrqBenchError::CParse {
                method: method.to_string(),
                source,
            })?;
        Ok(line)
    }
}

impl Drop for CRef {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
