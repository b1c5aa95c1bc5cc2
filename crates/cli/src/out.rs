//! Standard output that survives a closed pipe. Rust ignores SIGPIPE, so a
//! write to a pipe whose reader is gone (`rekey rotate status ID | head`)
//! fails with `BrokenPipe`, and `std`'s `println!` panics on that. Every
//! module of the CLI is declared after this one, so its `println!`/`print!`
//! are these: a closed pipe ends the process quietly with [`EXIT_PIPE`], as
//! a tool killed by SIGPIPE would; any other write error is one line on
//! stderr and exit 1. [`install_panic_hook`] covers what other crates print.

use std::io::Write;

/// The exit code of a process ended by SIGPIPE in a shell (128 + 13).
pub(crate) const EXIT_PIPE: i32 = 141;

macro_rules! println {
    () => {
        $crate::out::emit(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::emit(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::out::emit(format_args!($($arg)*))
    };
}

/// Writes to standard output, or ends the process if it cannot.
pub(crate) fn emit(args: std::fmt::Arguments<'_>) {
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        failed(&e)
    }
}

fn failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(EXIT_PIPE);
    }
    eprintln!("rekey: error: cannot write to standard output: {e}");
    std::process::exit(1)
}

/// Whether a panic message is a failed write to a closed pipe.
fn is_broken_pipe(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("broken pipe") || m.contains("brokenpipe")
}

/// Ends the process with [`EXIT_PIPE`] instead of a panic report when a
/// crate the CLI uses (the demo's walkthrough, clap's completions) panics on
/// a closed standard output; every other panic is reported as usual.
pub(crate) fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if is_broken_pipe(message) {
            std::process::exit(EXIT_PIPE);
        }
        default(info)
    }));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_messages_of_a_closed_pipe_are_recognised() {
        let e = std::io::Error::from_raw_os_error(32);
        assert!(super::is_broken_pipe(&format!("failed printing to stdout: {e}")), "{e}");
        assert!(super::is_broken_pipe(&format!("failed to write completion file: {e:?}")), "{e:?}");
        assert!(!super::is_broken_pipe("index out of bounds"));
    }
}
