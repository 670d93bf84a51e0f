//! Byte sizes and how kiln prints them.

use std::fmt;

/// One disk sector as qemu-img counts it: sizes it accepts are multiples of this.
pub const SECTOR: u64 = 512;
/// One mebibyte. Azure requires a VHD's virtual size to be a whole number of these.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// `size` rounded up to a whole MiB, or `None` when that overflows `u64`.
pub fn round_up_to_mib(size: u64) -> Option<u64> {
    size.checked_add(MIB - 1).map(|n| n / MIB * MIB)
}

/// A byte count that prints as both bytes and GiB, e.g. `10485760 bytes (0.010 GiB)` or
/// `32212254720 bytes (30 GiB)`, so an error names a size unambiguously and readably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n % GIB == 0 {
            write!(f, "{n} bytes ({} GiB)", n / GIB)
        } else {
            write!(f, "{n} bytes ({:.3} GiB)", n as f64 / GIB as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_whole_mib() {
        assert_eq!(round_up_to_mib(0), Some(0));
        assert_eq!(round_up_to_mib(1), Some(MIB));
        assert_eq!(round_up_to_mib(MIB), Some(MIB));
        assert_eq!(round_up_to_mib(10 * MIB + 7), Some(11 * MIB));
        assert_eq!(round_up_to_mib(u64::MAX), None);
    }

    #[test]
    fn prints_bytes_and_gib() {
        assert_eq!(Bytes(30 * GIB).to_string(), "32212254720 bytes (30 GiB)");
        assert_eq!(Bytes(10 * MIB).to_string(), "10485760 bytes (0.010 GiB)");
        assert_eq!(Bytes(0).to_string(), "0 bytes (0 GiB)");
    }
}
