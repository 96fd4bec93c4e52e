//! Shell completions (`clap_complete`) and man pages (`clap_mangen`), generated from the
//! command line's own definition, so they never drift from it.

use std::io::Write;
use std::path::Path;

use clap_complete::Shell;

use crate::error::{CliResult, failed};

/// Print the completion script for `shell` (`faultline completions bash > /etc/bash_completion.d/faultline`).
pub fn completions(shell: Shell, mut cmd: clap::Command) -> CliResult {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "faultline", &mut out);
    out.flush().map_err(failed("writing the completion script"))
}

/// Print `faultline(1)`, or with `dir`, write it and a page per subcommand
/// (`faultline-migrate.1`, `faultline-bench-irq.1`, ...) there.
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> CliResult {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(failed(format!("creating {}", d.display())))?;
            clap_mangen::generate_to(cmd, d)
                .map_err(failed(format!("writing man pages into {}", d.display())))
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(failed("rendering the man page"))?;
            std::io::stdout()
                .write_all(&out)
                .map_err(failed("writing the man page"))
        }
    }
}
