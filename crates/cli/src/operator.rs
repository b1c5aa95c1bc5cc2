//! `rekey operator ...`: operators and their roles (admin only, except the
//! list). `create` makes the key pair here and sends rekeyd only a CSR, as an
//! agent does at enrollment: the private key never leaves this machine.

use crate::table::Table;
use crate::{Client, Output, output};
use anyhow::{Context, Result, anyhow, bail};
use rekey_common::time::format_unix;
use rekey_proto::v1::{CreateOperatorRequest, ListOperatorsRequest, RevokeOperatorRequest};
use rekey_types::v1::OperatorView;
use std::path::Path;

#[derive(clap::Subcommand)]
pub enum OperatorCmd {
    /// Create an operator: a key pair made here (operator.key, 0600), a
    /// certificate from rekeyd, ca.pem and rekey.toml, all written to --out.
    Create {
        /// The operator's name (its certificate says rekey://operator/NAME).
        name: String,
        /// viewer: read-only; rotator: also rotations, incidents, scope; admin: everything.
        #[arg(long, value_parser = ["admin", "rotator", "viewer"])]
        role: String,
        /// Directory for the new credential (created 0700; must not hold one already).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Every operator: role, certificates, who created and who revoked it.
    List,
    /// Revoke an operator: every certificate it holds is refused from its next call on.
    Revoke { name: String },
}

pub async fn run(client: &Client, out: Output, cmd: &OperatorCmd) -> Result<()> {
    match cmd {
        OperatorCmd::Create { name, role, out: dir } => create(client, out, name, role, dir).await,
        OperatorCmd::List => {
            let v: Vec<OperatorView> =
                client.view(client.inner.clone().list_operators(client.request(ListOperatorsRequest {})).await)?;
            output(out, &v, |v| print_list(v));
            Ok(())
        }
        OperatorCmd::Revoke { name } => {
            let req = client.request(RevokeOperatorRequest { name: name.clone() });
            let v: OperatorView = client.view(client.inner.clone().revoke_operator(req).await)?;
            output(out, &v, |v| {
                println!("revoked operator {} ({}): its certificates are refused from now on", v.name, v.role)
            });
            Ok(())
        }
    }
}

async fn create(client: &Client, out: Output, name: &str, role: &str, dir: &Path) -> Result<()> {
    if dir.join("operator.key").exists() {
        bail!("{} already holds an operator credential (operator.key): choose another --out directory", dir.display());
    }
    let key = rcgen::KeyPair::generate().context("cannot generate the operator's key pair")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("cannot make the certificate signing request")?;
    let req = client.request(CreateOperatorRequest {
        name: name.to_string(),
        role: role.to_string(),
        csr_der: csr.der().to_vec(),
    });
    let r = client.inner.clone().create_operator(req).await.map_err(|s| client.explain(s))?.into_inner();
    let view: OperatorView = serde_json::from_str(&r.operator_json)
        .context("the coordinator sent a document this rekey cannot read (are the CLI and rekeyd the same version?)")?;
    write_credential(dir, &key.serialize_pem(), &r.cert_pem, &r.ca_pem, client.addresses()).with_context(|| {
        format!(
            "operator {name} was created but its credential could not be written to {}: revoke it with \
             `rekey operator revoke {name}` and create another",
            dir.display()
        )
    })?;
    output(out, &view, |v| {
        println!("created operator {} with role {} in {}", v.name, v.role, dir.display());
        println!(
            "use: rekey --operator-dir {} ...   (move the directory to the operator; the key is 0600)",
            dir.display()
        );
    });
    Ok(())
}

fn write_credential(dir: &Path, key_pem: &str, cert_pem: &str, ca_pem: &str, addresses: &[String]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |file: &str, bytes: &[u8], mode: u32| {
        let p = dir.join(file);
        rekey_common::fs::write_atomic(&p, bytes, mode).map_err(|e| anyhow!("cannot write {}: {e}", p.display()))
    };
    write("operator.key", key_pem.as_bytes(), 0o600)?;
    write("operator.pem", cert_pem.as_bytes(), 0o644)?;
    write("ca.pem", ca_pem.as_bytes(), 0o644)?;
    // One address as a string (as before), several replicas as a list.
    let coordinator = match addresses {
        [one] => format!("{one:?}"),
        many => format!("[{}]", many.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")),
    };
    let toml = format!(
        "# Written by `rekey operator create`. The rekey CLI reads this with --operator-dir.\ncoordinator = {coordinator}\n"
    );
    write("rekey.toml", toml.as_bytes(), 0o644)
}

fn print_list(v: &[OperatorView]) {
    let mut t = Table::new(["NAME", "ROLE", "STATUS", "CREATED", "CREATED BY", "SERIALS"]);
    for o in v {
        let status = match (&o.revoked_unix, &o.revoked_by) {
            (Some(at), by) => format!("revoked {} by {}", format_unix(*at), by.as_deref().unwrap_or("-")),
            (None, _) => "active".to_string(),
        };
        t.row([
            o.name.clone(),
            o.role.to_string(),
            status,
            if o.created_unix == 0 { "-".into() } else { format_unix(o.created_unix) },
            o.created_by.clone(),
            o.serials.join(","),
        ]);
    }
    print!("{t}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `operator create` writes, the CLI reads back: one address as a
    /// string (as before several replicas), several as a list.
    #[test]
    fn rekey_toml_holds_one_address_or_the_replicas_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        for addrs in [vec!["a:1"], vec!["a:1", "b:2", "[::1]:3"]] {
            let dir = tmp.path().join(addrs.len().to_string());
            let addrs: Vec<String> = addrs.into_iter().map(String::from).collect();
            write_credential(&dir, "KEY", "CERT", "CA", &addrs).unwrap();
            let text = std::fs::read_to_string(dir.join("rekey.toml")).unwrap();
            let want = if addrs.len() == 1 { "coordinator = \"a:1\"\n" } else { "coordinator = [\"a:1\", \"b:2\"" };
            assert!(text.contains(want), "{text}");
            assert_eq!(crate::operator_file_addresses(&dir.join("rekey.toml")).unwrap(), addrs);
        }
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "coordinator = [\"a:1\", \"nohost\"]\n").unwrap();
        let e = crate::operator_file_addresses(&bad).unwrap_err().to_string();
        assert_eq!(e, format!("{}: field `coordinator`: expected HOST:PORT, got \"nohost\"", bad.display()));
        std::fs::write(&bad, "coordinator = []\n").unwrap();
        let e = crate::operator_file_addresses(&bad).unwrap_err().to_string();
        assert!(e.ends_with("field `coordinator`: expected at least one HOST:PORT, got none"), "{e}");
    }
}
