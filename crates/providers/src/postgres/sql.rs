//! The SQL the provider sends, built from validated role names: identifier
//! quoting, the version markers kept in role comments, and the bootstrap
//! statements of the alternating strategy.
//!
//! A version is a role and the rotation that set its password:
//! `app_green@rot-…`. Which version a role holds is written in the role's
//! comment (`COMMENT ON ROLE`), so the database itself says which version is
//! live after any crash: `rekey version <id> created <unix>`, or
//! `rekey version <id> deleted` once revoked. A bare role name (`app`) is the
//! password a role had before rekey managed it.

/// Whether `name` is a role name rekey accepts: lowercase letters, digits
/// and `_`, starting with a letter or `_`, at most `max` bytes (so no
/// quoting surprises and room for the `_blue`/`_green` suffixes).
pub fn valid_role(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `"name"`, with `"` doubled (names are validated; this is belt and braces).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with `'` doubled.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

const MARKER: &str = "rekey version ";

/// What a role's comment says about the version it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub version: String,
    pub created_unix: Option<i64>,
    pub deleted: bool,
}

impl Marker {
    /// Reads a role comment; `None` when it is not rekey's.
    pub fn parse(comment: Option<&str>) -> Option<Marker> {
        let rest = comment?.strip_prefix(MARKER)?;
        let mut words = rest.split_whitespace();
        let version = words.next()?.to_string();
        let (mut created_unix, mut deleted) = (None, false);
        while let Some(w) = words.next() {
            match w {
                "created" => created_unix = words.next().and_then(|t| t.parse().ok()),
                "deleted" => deleted = true,
                _ => {}
            }
        }
        Some(Marker { version, created_unix, deleted })
    }

    pub fn text(&self) -> String {
        let mut s = format!("{MARKER}{}", self.version);
        if let Some(t) = self.created_unix {
            s.push_str(&format!(" created {t}"));
        }
        if self.deleted {
            s.push_str(" deleted");
        }
        s
    }

    /// `COMMENT ON ROLE role IS '…'`.
    pub fn comment_on(&self, role: &str) -> String {
        format!("COMMENT ON ROLE {} IS {}", ident(role), literal(&self.text()))
    }
}

/// The role a version id names (`app_green@rot-1` → `app_green`, `app` → `app`).
pub fn role_of(version: &str) -> &str {
    version.split_once('@').map(|(r, _)| r).unwrap_or(version)
}

/// The idempotent statements that create the login pair of the alternating
/// strategy from `base`, the existing role that holds the grants.
///
/// Membership, not copied privileges: a copy misses what is granted to the
/// base role later, its default privileges and what it owns; a member with
/// INHERIT has exactly the base role's rights, now and after every future
/// GRANT. `SET role` at login makes each session act as the base role, so
/// what either login creates (a migration's table) is owned by the base role
/// and the other login keeps access to it. The pair starts NOLOGIN with no
/// password: rekey's first rotation gives one of them both.
pub fn bootstrap(base: &str, pair: [&str; 2]) -> Vec<String> {
    let mut out = Vec::new();
    for r in pair {
        out.push(format!(
            "DO $rekey$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {}) THEN \
             CREATE ROLE {} NOLOGIN INHERIT; END IF; END $rekey$",
            literal(r),
            ident(r)
        ));
    }
    for r in pair {
        out.push(format!("ALTER ROLE {} INHERIT", ident(r)));
        out.push(format!("GRANT {} TO {}", ident(base), ident(r)));
        out.push(format!("ALTER ROLE {} SET role = {}", ident(r), literal(base)));
    }
    out
}

/// [`bootstrap`] as one script to print (`;` terminated lines).
pub fn bootstrap_script(base: &str, pair: [&str; 2]) -> String {
    bootstrap(base, pair).into_iter().map(|s| format!("{s};\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_foreign_comments_are_not_markers() {
        let m = Marker { version: "app_blue@rot-1".into(), created_unix: Some(1700000000), deleted: false };
        assert_eq!(m.text(), "rekey version app_blue@rot-1 created 1700000000");
        assert_eq!(Marker::parse(Some(&m.text())), Some(m.clone()));
        let d = Marker { deleted: true, created_unix: None, ..m };
        assert_eq!(Marker::parse(Some(&d.text())).unwrap(), d);
        assert_eq!(Marker::parse(Some("the app's login")), None);
        assert_eq!(Marker::parse(None), None);
        assert_eq!(role_of("app_blue@rot-1"), "app_blue");
        assert_eq!(role_of("app"), "app");
    }

    #[test]
    fn role_names_are_strict_and_quoting_doubles_quotes() {
        assert!(valid_role("app_1", 57));
        for bad in ["", "App", "1app", "app-x", "app\"x", "a b"] {
            assert!(!valid_role(bad, 57), "{bad:?}");
        }
        assert!(!valid_role(&"a".repeat(58), 57));
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn the_bootstrap_grants_membership_and_sets_the_role() {
        let s = bootstrap_script("app", ["app_blue", "app_green"]);
        assert!(s.contains("CREATE ROLE \"app_green\" NOLOGIN INHERIT"), "{s}");
        assert!(s.contains("GRANT \"app\" TO \"app_blue\";"), "{s}");
        assert!(s.contains("ALTER ROLE \"app_green\" SET role = 'app';"), "{s}");
        assert!(!s.to_lowercase().contains("drop"), "{s}");
    }
}
