//! `kiln-winrs-server`: the WinRS test server (tests/winrs_server.rs) as a program, for manual
//! checks with other WinRM clients and for test guests that speak WinRS.
//!
//! ```text
//! kiln-winrs-server --auth http-ntlm|https-basic [--listen ADDR] --user USER
//!                   [--password-env VAR]   (default KILN_WINRS_PASSWORD)
//!                   [--cert CERT.der --key KEY.pk8.der]
//! kiln-winrs-server --auth http-ntlm [--listen ADDR] --unattend Unattend.xml
//! ```
//!
//! `--unattend` (the `winrs` test guest, scripts/guest/winrs/rcS) takes the account from a
//! Windows answer file as kiln writes it: the first `LocalAccount`'s `Name` and its `Password`
//! (unattend's `PlainText=false` form, base64 of the UTF-16LE of password + `Password`, decoded
//! here; plain text when `PlainText` is `true`). The `AdministratorPassword` must decode to the
//! same password (kiln sets both); the server has one account, the build user.
//!
//! Prints one line on stdout once listening: `<endpoint>` and, for HTTPS, ` <certificate
//! fingerprint>`. Logs nothing else (with `--unattend`, one line on stderr naming the account, never
//! the password); runs until killed. The password is read from the
//! environment, never from the command line.

use anyhow::{bail, Context, Result};
use kiln_tests::winrs_server::{TestCert, WinrsAuth, WinrsServer, WinrsServerConfig};

fn usage() -> ! {
    eprintln!(
        "usage: kiln-winrs-server --auth http-ntlm|https-basic [--listen ADDR] --user USER \
         [--password-env VAR] [--cert CERT.der --key KEY.pk8.der]\n\
         \x20      kiln-winrs-server --auth http-ntlm [--listen ADDR] --unattend Unattend.xml"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut auth = None;
    let mut listen = None;
    let mut user = None;
    let mut password_env = "KILN_WINRS_PASSWORD".to_string();
    let (mut cert, mut key) = (None, None);
    let mut unattend = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--auth" => {
                auth = Some(match val().as_str() {
                    "http-ntlm" => WinrsAuth::HttpNtlm,
                    "https-basic" => WinrsAuth::HttpsBasic,
                    _ => usage(),
                })
            }
            "--listen" => listen = Some(val()),
            "--user" => user = Some(val()),
            "--password-env" => password_env = val(),
            "--cert" => cert = Some(val()),
            "--key" => key = Some(val()),
            "--unattend" => unattend = Some(val()),
            "-h" | "--help" => usage(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let auth = auth.unwrap_or_else(|| usage());
    let (user, password) = match unattend {
        Some(path) => {
            let xml = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
            let a = answer_file_account(&xml)
                .with_context(|| format!("reading the account from {path}"))?;
            eprintln!(
                "kiln-winrs-server: account {} of the answer file {path} (computer name {})",
                a.user,
                a.computer_name.as_deref().unwrap_or("not set")
            );
            (a.user, a.password)
        }
        None => {
            let user = user.unwrap_or_else(|| usage());
            let password = std::env::var(&password_env).with_context(|| {
                format!("the password is read from ${password_env}, which is unset")
            })?;
            (user, password)
        }
    };
    let mut config = WinrsServerConfig::new(auth.clone(), &user, &password);
    config.bind = listen
        .unwrap_or_else(|| match auth {
            WinrsAuth::HttpNtlm => "0.0.0.0:5985".into(),
            WinrsAuth::HttpsBasic => "0.0.0.0:5986".into(),
        })
        .parse()
        .context("--listen takes ADDR:PORT")?;
    config.cert = match (cert, key) {
        (Some(c), Some(k)) => Some(TestCert {
            cert: std::fs::read(&c).with_context(|| format!("reading {c}"))?,
            key: std::fs::read(&k).with_context(|| format!("reading {k}"))?,
        }),
        (None, None) => None,
        _ => bail!("--cert and --key go together"),
    };
    let server = WinrsServer::start(config).await?;
    match server.cert() {
        Some(c) => println!("{} {}", server.endpoint(), c.fingerprint()),
        None => println!("{}", server.endpoint()),
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// The build account of a Windows answer file.
#[derive(Debug, PartialEq, Eq)]
struct Account {
    user: String,
    password: String,
    computer_name: Option<String>,
}

const UNATTEND_NS: &str = "urn:schemas-microsoft-com:unattend";

/// A `Password`/`AdministratorPassword` element's value: `PlainText=false` is the base64 of the
/// UTF-16LE of the password followed by the element's name.
fn unattend_password(el: &kiln_agents::winrm::xml::Element) -> Result<String> {
    let value = el
        .child(UNATTEND_NS, "Value")
        .map(|v| v.text_trim().to_string())
        .context("no <Value>")?;
    let plain = el
        .child(UNATTEND_NS, "PlainText")
        .is_some_and(|p| p.text_trim().eq_ignore_ascii_case("true"));
    if plain {
        return Ok(value);
    }
    let decoded = kiln_agents::winrm::powershell::decode_command(&value)
        .context("the PlainText=false value is not base64 of UTF-16LE")?;
    decoded
        .strip_suffix(el.name.as_str())
        .map(str::to_string)
        .with_context(|| format!("the decoded value does not end with `{}`", el.name))
}

/// Reads the first LocalAccount (name, password) and checks the AdministratorPassword agrees.
fn answer_file_account(xml: &[u8]) -> Result<Account> {
    let root = kiln_agents::winrm::xml::parse(xml).map_err(anyhow::Error::msg)?;
    let account = root
        .find(UNATTEND_NS, "LocalAccount")
        .context("no LocalAccounts/LocalAccount")?;
    let user = account
        .child(UNATTEND_NS, "Name")
        .map(|n| n.text_trim().to_string())
        .filter(|n| !n.is_empty())
        .context("the LocalAccount has no Name")?;
    let password = unattend_password(
        account
            .child(UNATTEND_NS, "Password")
            .context("the LocalAccount has no Password")?,
    )
    .context("LocalAccount/Password")?;
    if let Some(admin) = root.find(UNATTEND_NS, "AdministratorPassword") {
        let a = unattend_password(admin).context("AdministratorPassword")?;
        if a != password {
            bail!("AdministratorPassword differs from the build account's password");
        }
    }
    let computer_name = root
        .find(UNATTEND_NS, "ComputerName")
        .map(|c| c.text_trim().to_string());
    Ok(Account {
        user,
        password,
        computer_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_engine::build::steps_windows::unattend_xml;

    #[test]
    fn reads_the_account_kiln_writes() {
        let pw = "Ab3-_.!+=xyz<&>'\"";
        let xml = unattend_xml("kiln-abc123", "packer", pw);
        let a = answer_file_account(xml.as_bytes()).unwrap();
        assert_eq!(
            a,
            Account {
                user: "packer".into(),
                password: pw.into(),
                computer_name: Some("kiln-abc123".into())
            }
        );
        // A tampered administrator password is refused, not ignored.
        let other =
            kiln_engine::build::steps_windows::unattend_password("other", "AdministratorPassword");
        let mine =
            kiln_engine::build::steps_windows::unattend_password(pw, "AdministratorPassword");
        let e = answer_file_account(xml.replace(&mine, &other).as_bytes()).unwrap_err();
        assert!(
            format!("{e:#}").contains("AdministratorPassword differs"),
            "{e:#}"
        );
        assert!(answer_file_account(b"<unattend/>").is_err());
    }
}
