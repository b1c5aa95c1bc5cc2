//! An error and its causes on one line.
//!
//! Library errors keep their cause as a `source` instead of repeating it in
//! their message, so printing only the top error (`{e}`, `error = %e`) drops
//! the part that says what went wrong (`cannot write /x: permission denied`
//! becomes `cannot write /x`). Every error that reaches an operator — a log
//! field, a report, a CLI's last line — goes through [`chain`] or [`Chain`].

use std::error::Error;
use std::fmt;

/// `e` and its sources joined with `": "`. A source whose text the line
/// already holds is left out: many wrappers (tonic's `Status`, hyper, io
/// errors built from another error) repeat their cause in their message.
pub fn chain(e: &dyn Error) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cur = c.source();
    }
    line
}

/// Displays an error as [`chain`] does, for `tracing` fields and format
/// strings: `tracing::warn!(error = %Chain(&e), "...")`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0))
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}")]
    struct Write {
        path: &'static str,
        #[source]
        source: io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("apply failed")]
    struct Apply(#[source] Write);

    fn denied() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, "permission denied")
    }

    #[test]
    fn joins_every_cause() {
        let e = Apply(Write { path: "/etc/app.env", source: denied() });
        assert_eq!(chain(&e), "apply failed: cannot write /etc/app.env: permission denied");
        assert_eq!(Chain(&e).to_string(), chain(&e));
        assert_eq!(format!("{:?}", Chain(&e)), chain(&e));
    }

    #[test]
    fn an_error_without_source_is_its_message() {
        assert_eq!(chain(&denied()), "permission denied");
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed: {0}")]
        struct Quoting(#[source] io::Error);
        let e = Quoting(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"));
        assert_eq!(chain(&e), "connect failed: connection refused");
    }

    #[test]
    fn works_through_boxed_errors() {
        let boxed: Box<dyn Error + Send + Sync> = Box::new(Write { path: "/x", source: denied() });
        assert_eq!(chain(boxed.as_ref()), "cannot write /x: permission denied");
        assert_eq!(Chain(&*boxed).to_string(), "cannot write /x: permission denied");
    }
}
