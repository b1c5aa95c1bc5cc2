//! `rekey completions SHELL` and the hidden `rekey man --out DIR`: generated
//! from the clap definition ([`rekey_common::clidoc`]), so they list exactly
//! the verbs and flags this build accepts. The Debian package ships both.

use anyhow::Result;
use clap::CommandFactory;
use rekey_common::clidoc::{self, Shell};
use std::path::Path;

/// Prints the completion script for `shell` on stdout.
pub fn completions(shell: Shell) -> Result<()> {
    Ok(clidoc::print_completions(crate::Cli::command(), shell)?)
}

/// Writes `rekey.1` and a page per subcommand into `dir`.
pub fn man(dir: &Path) -> Result<()> {
    let pages = clidoc::write_man_pages(crate::Cli::command(), dir)?;
    println!("wrote {} man pages into {}", pages.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_offer_the_verbs() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(clidoc::completions(crate::Cli::command(), shell)).unwrap();
            for verb in ["rotate", "scope", "alerts", "incident", "completions", "fail-on-found"] {
                assert!(text.contains(verb), "{shell} completions lack {verb}");
            }
        }
    }

    #[test]
    fn man_pages_cover_the_nested_verbs() {
        let dir = tempfile::tempdir().unwrap();
        man(dir.path()).unwrap();
        for page in ["rekey.1", "rekey-rotate.1", "rekey-rotate-start.1", "rekey-scope.1", "rekey-completions.1"] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page");
        }
        let scope = std::fs::read_to_string(dir.path().join("rekey-scope.1")).unwrap();
        assert!(scope.contains("fail\\-on\\-found"), "the scope page documents --fail-on-found");
        assert!(!dir.path().join("rekey-man.1").exists(), "the packaging verb stays hidden");
    }
}
