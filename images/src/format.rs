//! Disk image formats kiln handles.

use std::fmt;
use std::str::FromStr;

/// A disk image format, named as qemu-img names it (`-f`/`-O`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// A plain byte-for-byte disk (`raw`).
    Raw,
    /// QEMU copy-on-write v2 (`qcow2`): kiln's working and stored format.
    Qcow2,
    /// Microsoft VHD (`vpc` to qemu), fixed or dynamic. Azure takes fixed VHDs only.
    Vpc,
    /// Microsoft VHDX (`vhdx`), e.g. Hyper-V exports. Azure does not take it directly.
    Vhdx,
}

impl DiskFormat {
    /// Every format, in a stable order.
    pub const ALL: [DiskFormat; 4] = [
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vpc,
        DiskFormat::Vhdx,
    ];

    /// The name qemu-img uses (`raw`, `qcow2`, `vpc`, `vhdx`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vpc => "vpc",
            DiskFormat::Vhdx => "vhdx",
        }
    }

    /// The format qemu-img calls `name`, if kiln handles it.
    pub fn from_qemu_name(name: &str) -> Option<DiskFormat> {
        DiskFormat::ALL.into_iter().find(|f| f.qemu_name() == name)
    }

    /// The usual file extension, without the dot (`raw`, `qcow2`, `vhd`, `vhdx`).
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Vpc => "vhd",
            other => other.qemu_name(),
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The text was not a format kiln knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown disk format `{0}` (expected one of raw, qcow2, vhd/vpc, vhdx)")]
pub struct UnknownFormat(pub String);

impl FromStr for DiskFormat {
    type Err = UnknownFormat;

    /// Accepts the qemu names, `vhd` for `vpc` and `img` for `raw`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<DiskFormat, UnknownFormat> {
        match s.to_ascii_lowercase().as_str() {
            "vhd" => Ok(DiskFormat::Vpc),
            "img" => Ok(DiskFormat::Raw),
            lower => DiskFormat::from_qemu_name(lower).ok_or_else(|| UnknownFormat(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in DiskFormat::ALL {
            assert_eq!(DiskFormat::from_qemu_name(f.qemu_name()), Some(f));
            assert_eq!(f.to_string().parse::<DiskFormat>(), Ok(f));
        }
        assert_eq!("VHD".parse::<DiskFormat>(), Ok(DiskFormat::Vpc));
        assert_eq!(DiskFormat::Vpc.extension(), "vhd");
        assert!("vmdk".parse::<DiskFormat>().is_err());
    }
}
