//! The Linux guest of the end-to-end tests: Debian's cloud kernel and a busybox initramfs.

use std::path::PathBuf;
use std::process::Command;

/// The kernel and initramfs, fetched once per test process by `scripts/linux-guest.sh` if
/// they are not cached yet (so `cargo test` works on a fresh clone).
pub fn guest_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let d = top.join(".cache/linux");
        let have = |d: &PathBuf| {
            ["vmlinux", "initramfs.cpio.gz"]
                .iter()
                .all(|f| d.join(f).exists())
        };
        if !have(&d) {
            let st = Command::new("bash")
                .arg(top.join("scripts/linux-guest.sh"))
                .status()
                .expect("run scripts/linux-guest.sh");
            assert!(
                st.success() && have(&d),
                "scripts/linux-guest.sh could not fetch Debian's kernel and build the initramfs \
                 (needs Debian's package mirror and root for apt-get)"
            );
        }
        d
    })
    .clone()
}
