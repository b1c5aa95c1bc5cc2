//! An error and its causes on one line.
//!
//! Library errors keep their cause as a `source` instead of repeating it in
//! their message, so printing only the top error (`{e}`, `error = %e`) drops
//! the part that says what went wrong (`cannot write /x: permission denied`
//! becomes `cannot write /x`). Every error that reaches an operator — a log
//! field, a report, a CLI's last line — goes through [`chain`] or [`Chain`].
//!
//! Messages stay bounded: a list that can grow with the fleet (hosts,
//! versions, problems) is named through [`named`] (the first
//! [`MAX_NAMED`], then "and N more"), and [`bounded`] cuts any message to
//! [`MAX_MESSAGE`] bytes. A gRPC error's message travels in HTTP/2 trailers,
//! where a message listing 10,000 hosts makes the client close the
//! connection (`GOAWAY too_many_continuations`) instead of showing it.

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

/// How many items of an unbounded list a message names.
pub const MAX_NAMED: usize = 20;
/// The longest message an error carries, in bytes. Percent-encoded in the
/// `grpc-message` trailer it stays within one 16 KiB HTTP/2 frame.
pub const MAX_MESSAGE: usize = 4096;

/// The first [`MAX_NAMED`] items joined with `sep`, then `" and N more"`.
pub fn named<T: fmt::Display>(items: impl IntoIterator<Item = T>, sep: &str) -> String {
    let mut out = String::new();
    let mut more = 0usize;
    for (i, item) in items.into_iter().enumerate() {
        if i >= MAX_NAMED {
            more += 1;
            continue;
        }
        if i > 0 {
            out.push_str(sep);
        }
        out.push_str(&item.to_string());
    }
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// `message` cut to at most [`MAX_MESSAGE`] bytes (at a character
/// boundary), saying how much was left out.
pub fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} … ({} more bytes left out)", &message[..end], message.len() - end)
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

    #[test]
    fn a_long_list_names_the_first_twenty_and_counts_the_rest() {
        let hosts: Vec<String> = (1..=10_000).map(|i| format!("h{i}")).collect();
        let line = named(&hosts, ", ");
        assert!(line.starts_with("h1, h2, "), "{line}");
        assert!(line.ends_with("h19, h20 and 9980 more"), "{line}");
        assert_eq!(named(&hosts[..3], "; "), "h1; h2; h3");
        assert_eq!(named(&hosts[..MAX_NAMED], ", ").matches(',').count(), MAX_NAMED - 1);
        assert_eq!(named(Vec::<String>::new(), ", "), "");
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let long = "é".repeat(10_000);
        let cut = bounded(long.clone());
        assert!(cut.len() <= MAX_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with(" more bytes left out)"), "{cut}");
        assert!(long.starts_with(cut.split(" …").next().unwrap()));
    }
}
