//! Where kiln keeps its state: `KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else
//! `~/.local/share/kiln`.

use std::path::PathBuf;

/// The kiln home directory (not created here).
pub fn kiln_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/kiln")
}
