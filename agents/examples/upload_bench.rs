//! Measure upload throughput against a running sshd.
//!
//! ```text
//! cargo run -p kiln-agents --release --example upload_bench -- ADDR USER KEYFILE LOCALFILE DEST [ROUNDS]
//! ```
//!
//! Compare with `time ssh -i KEYFILE -p PORT USER@HOST 'cat > DEST' < LOCALFILE`.

use std::path::PathBuf;
use std::time::Instant;

use kiln_agents::{Communicator, ConnectConfig, SshCommunicator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, user, key, local, dest, rest @ ..] = args.as_slice() else {
        return Err("usage: upload_bench ADDR USER KEYFILE LOCALFILE DEST [ROUNDS]".into());
    };
    let rounds: u32 = rest.first().map(|r| r.parse()).transpose()?.unwrap_or(3);
    let key = kiln_agents::load_private_key(&PathBuf::from(key))?;
    let config = ConnectConfig::new(addr.parse()?, user.clone(), key);
    let guest = SshCommunicator::connect(config, std::future::pending()).await?;
    for _ in 0..rounds {
        let t = Instant::now();
        let up = guest
            .upload_file(&PathBuf::from(local), dest, 0o644)
            .await?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{} bytes in {secs:.3} s = {:.1} MiB/s",
            up.bytes,
            up.bytes as f64 / 1048576.0 / secs
        );
    }
    guest.close().await?;
    Ok(())
}
