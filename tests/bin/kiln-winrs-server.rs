//! `kiln-winrs-server`: the WinRS test server (tests/winrs_server.rs) as a program, for manual
//! checks with other WinRM clients and for test guests that speak WinRS.
//!
//! ```text
//! kiln-winrs-server --auth http-ntlm|https-basic [--listen ADDR] --user USER
//!                   [--password-env VAR]   (default KILN_WINRS_PASSWORD)
//!                   [--cert CERT.der --key KEY.pk8.der]
//! ```
//!
//! Prints one line on stdout once listening: `<endpoint>` and, for HTTPS, ` <certificate
//! fingerprint>`. Logs nothing else; runs until killed. The password is read from the
//! environment, never from the command line.

use anyhow::{bail, Context, Result};
use kiln_tests::winrs_server::{TestCert, WinrsAuth, WinrsServer, WinrsServerConfig};

fn usage() -> ! {
    eprintln!(
        "usage: kiln-winrs-server --auth http-ntlm|https-basic [--listen ADDR] --user USER \
         [--password-env VAR] [--cert CERT.der --key KEY.pk8.der]"
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
            "-h" | "--help" => usage(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let auth = auth.unwrap_or_else(|| usage());
    let user = user.unwrap_or_else(|| usage());
    let password = std::env::var(&password_env)
        .with_context(|| format!("the password is read from ${password_env}, which is unset"))?;
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
