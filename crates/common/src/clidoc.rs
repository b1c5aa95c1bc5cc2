//! Shell completions and man pages generated from a binary's clap
//! definition, so they can never drift from the flags the binary accepts.
//! Each binary exposes them as `completions SHELL` and a hidden `man --out DIR`
//! (the Debian packages are built from their output).

use clap::Command;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum ClidocError {
    #[error("cannot create the man page directory {}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot write man pages into {}", dir.display())]
    Write { dir: PathBuf, source: std::io::Error },
    #[error("cannot write the completion script to stdout")]
    Stdout(#[source] std::io::Error),
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// Prints the completion script on stdout; a reader that stops early
/// (`| head`) is not an error.
pub fn print_completions(cmd: Command, shell: Shell) -> Result<(), ClidocError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&completions(cmd, shell)).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ClidocError::Stdout(e)),
        _ => Ok(()),
    }
}

/// The man section of a binary: 1 for the operator CLI, 8 for the daemons
/// (`rekeyd`, `rekey-agent`), which also keeps `rekey-agent.8` apart from
/// the page of `rekey agent` (`rekey-agent.1`).
pub fn man_section(binary: &str) -> &'static str {
    if binary == "rekey" { "1" } else { "8" }
}

/// Writes `NAME.S` and one page per visible subcommand (`NAME-SUB.S`,
/// `NAME-SUB-SUBSUB.S`, …) into `dir`, creating it, where S is the binary's
/// [`man_section`]. Returns the pages written, sorted.
pub fn write_man_pages(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>, ClidocError> {
    fn generate(cmd: Command, section: &str, dir: &Path, pages: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            generate(sub, section, dir, pages)?;
        }
        pages.push(clap_mangen::Man::new(cmd).section(section).generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir).map_err(|source| ClidocError::CreateDir { dir: dir.to_path_buf(), source })?;
    let section = man_section(cmd.get_name());
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    generate(cmd, section, dir, &mut pages).map_err(|source| ClidocError::Write { dir: dir.to_path_buf(), source })?;
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool() -> Command {
        Command::new("tool")
            .about("a tool")
            .subcommand(Command::new("start").about("start it").arg(clap::Arg::new("secret").required(true)))
            .subcommand(Command::new("hidden-one").hide(true))
    }

    #[test]
    fn completions_name_every_visible_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(tool(), shell)).unwrap();
            assert!(text.contains("start"), "{shell}: {text}");
        }
    }

    #[test]
    fn man_pages_cover_subcommands_and_skip_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        let pages = write_man_pages(tool(), &out).unwrap();
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["tool-start.8", "tool.8"], "a daemon's pages are in section 8");
        let top = std::fs::read_to_string(out.join("tool.8")).unwrap();
        assert!(top.contains(".TH tool 8") && top.contains("start"), "{top}");
        let cli = write_man_pages(tool().name("rekey"), &dir.path().join("cli")).unwrap();
        assert!(cli.iter().all(|p| p.extension().unwrap() == "1"), "the CLI's pages are in section 1: {cli:?}");
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let e = write_man_pages(tool(), &file.join("man1")).unwrap_err();
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }
}
