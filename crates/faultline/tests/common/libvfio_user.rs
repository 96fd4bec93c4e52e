//! libvfio-user's samples, built from the genuine upstream sources in `../shared/peers`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// libvfio-user's samples, built once per test process by `scripts/libvfio-user.sh` (which
/// does nothing when its stamp matches the sources).
pub fn samples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = top.join(".cache/libvfio-user");
        let o = Command::new("bash")
            .arg(top.join("scripts/libvfio-user.sh"))
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run bash scripts/libvfio-user.sh");
        assert!(
            o.status.success(),
            "scripts/libvfio-user.sh failed to build libvfio-user from the upstream sources in \
             ../shared/peers/libvfio-user (or $FAULTLINE_LIBVFIO_USER_SRC) ({}); it needs \
             those sources, gcc, pkg-config, meson, ninja, libjson-c-dev and libcmocka-dev \
             (installed with apt-get when missing, which needs root):\n--- stdout\n{}\n--- stderr\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let dir = out.join("samples");
        assert!(
            dir.join("client").is_file(),
            "scripts/libvfio-user.sh succeeded but {} is missing",
            dir.join("client").display()
        );
        dir
    })
}
