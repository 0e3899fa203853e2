//! Man pages and shell completions generated from a binary's own clap definition. Each of
//! vshmd, vshmctl and vshm calls [`generate_if_asked`] first thing in `main`: given the
//! hidden arguments `--generate-docs DIR` it writes
//! `DIR/man/NAME.SECTION`, `DIR/completions/bash/NAME`, `DIR/completions/zsh/_NAME` and
//! `DIR/completions/fish/NAME.fish`, then exits. `cargo xtask dist` runs the release
//! binaries this way, so the pages describe exactly the options that were built — and
//! xtask itself stays free of the binaries' dependencies.
#![warn(missing_docs)]

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

/// The hidden first argument that asks for the documents.
pub const FLAG: &str = "--generate-docs";

/// Why the documents could not be written.
#[derive(Debug)]
pub enum DocError {
    /// `--generate-docs` without a directory, or with more arguments.
    Usage(Vec<OsString>),
    /// Writing `path` failed.
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DocError::Usage(args) => write!(f, "usage: {FLAG} DIR (got {args:?})"),
            DocError::Write { path, source } => write!(f, "writing {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for DocError {}

/// If the process was started as `PROGRAM --generate-docs DIR`, writes the man page (in
/// `section`: "1" for commands, "8" for daemons) and the completions of `command()` under
/// DIR and returns the exit code; otherwise returns `None` and `main` goes on as usual.
pub fn generate_if_asked(
    command: impl FnOnce() -> clap::Command,
    section: &str,
) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(FLAG.as_ref()) {
        return None;
    }
    let rest: Vec<OsString> = args.collect();
    let result = match rest.as_slice() {
        [dir] => generate(command(), section, Path::new(dir)),
        _ => Err(DocError::Usage(rest.clone())),
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    })
}

/// Writes the man page and the bash, zsh and fish completions of `command` under `dir`.
pub fn generate(command: clap::Command, section: &str, dir: &Path) -> Result<(), DocError> {
    let mut command = command;
    command.build();
    let name = command.get_name().to_owned();
    let write = |path: PathBuf, bytes: &[u8]| -> Result<(), DocError> {
        let failed = |source| DocError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(failed)?;
        }
        fs::write(&path, bytes).map_err(failed)
    };

    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section(section)
        .render(&mut page)
        .map_err(|source| DocError::Write {
            path: dir.join("man"),
            source,
        })?;
    write(dir.join(format!("man/{name}.{section}")), &page)?;

    for (shell, file) in [
        (Shell::Bash, format!("bash/{name}")),
        (Shell::Zsh, format!("zsh/_{name}")),
        (Shell::Fish, format!("fish/{name}.fish")),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, name.clone(), &mut script);
        write(dir.join("completions").join(file), &script)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_man_page_and_three_completions() {
        let dir = std::env::temp_dir().join(format!("vshm-clidoc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cmd = clap::Command::new("demo")
            .about("A demo")
            .arg(clap::Arg::new("size").long("size").help("How big"));
        generate(cmd, "8", &dir).expect("generate");
        let page = fs::read_to_string(dir.join("man/demo.8")).expect("man page");
        assert!(
            page.contains(".TH demo 8") && page.contains("size"),
            "{page}"
        );
        for f in ["bash/demo", "zsh/_demo", "fish/demo.fish"] {
            let text = fs::read_to_string(dir.join("completions").join(f)).expect(f);
            assert!(text.contains("size"), "{f}: {text}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
