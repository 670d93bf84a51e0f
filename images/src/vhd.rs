//! The VHD footer: parse, validate, and build it.
//!
//! A fixed VHD is the raw disk followed by a 512-byte footer (big-endian fields, layout in the
//! table below). [`Footer::parse`] checks what makes a footer a VHD footer at all (cookie,
//! checksum, version, features, disk type, data offset); [`Footer::check_azure_fixed`] adds what
//! Azure requires of an uploaded disk (fixed, whole-MiB size, file length = size + 512, sane
//! geometry). [`verify_fixed`] does both on a file. kiln runs these on every VHD it exports
//! instead of trusting qemu-img.
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 8 | cookie `conectix` |
//! | 8 | 4 | features (bit 0x2 always set) |
//! | 12 | 4 | file format version 0x00010000 |
//! | 16 | 8 | data offset (0xFFFFFFFFFFFFFFFF for fixed disks) |
//! | 24 | 4 | timestamp, seconds since 2000-01-01 UTC |
//! | 28 | 4 | creator application (`qem2`, `qemu`, `win `, ...) |
//! | 32 | 4 | creator version |
//! | 36 | 4 | creator host OS |
//! | 40 | 8 | original size |
//! | 48 | 8 | current size (the virtual size) |
//! | 56 | 4 | geometry: cylinders u16, heads u8, sectors per track u8 |
//! | 60 | 4 | disk type (2 fixed, 3 dynamic, 4 differencing) |
//! | 64 | 4 | checksum: one's complement of the byte sum, this field excluded |
//! | 68 | 16 | unique id |
//! | 84 | 1 | saved state |
//! | 85 | 427 | reserved, zero |

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::size::{Bytes, MIB};
use crate::time::VHD_EPOCH_UNIX;

/// Bytes in a footer.
pub const FOOTER_LEN: usize = 512;
/// The footer's first eight bytes.
pub const COOKIE: [u8; 8] = *b"conectix";
/// The only file format version there is.
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Features bit that the specification says is always set.
pub const FEATURE_RESERVED: u32 = 0x2;
/// The data offset of a fixed disk (there is no dynamic header).
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;

/// Cylinders/heads/sectors-per-track, as the footer stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// 65535/16/255: the largest geometry. qemu writes it with `force_size=on`, and qemu and
    /// Hyper-V then take the size from the footer's current size instead of from CHS.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The geometry the VHD specification's appendix computes for a disk of `size` bytes
    /// (what Hyper-V and Azure write).
    pub fn for_size(size: u64) -> Geometry {
        let max = 65535 * 16 * 255;
        let total = (size / 512).min(max);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024);
            if h < 4 {
                h = 4;
            }
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            // The clamp above keeps cth / heads within u16; heads <= 16 and spt <= 255.
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Sectors addressed by this geometry.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// Bytes addressed by this geometry (what CHS-reading tools think the disk holds).
    pub fn bytes(self) -> u64 {
        self.sectors() * 512
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.cylinders, self.heads, self.sectors_per_track
        )
    }
}

/// The footer's disk type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the raw data followed by the footer. The only type Azure accepts.
    Fixed,
    /// 3: sparse blocks behind a block allocation table.
    Dynamic,
    /// 4: a child of another VHD.
    Differencing,
}

impl DiskType {
    /// The number stored in the footer.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The type a footer number stands for.
    pub fn from_code(code: u32) -> Option<DiskType> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

impl fmt::Display for DiskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        };
        write!(f, "{name} ({})", self.code())
    }
}

/// A parsed VHD footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits (0x2 always set, 0x1 = temporary disk).
    pub features: u32,
    /// File format version, 0x00010000.
    pub file_format_version: u32,
    /// Offset of the dynamic header; [`FIXED_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC (see [`Footer::timestamp_unix`]).
    pub timestamp: u32,
    /// The application that created the disk, e.g. `qem2` (qemu with `force_size`), `win `.
    pub creator_app: [u8; 4],
    /// That application's version.
    pub creator_version: u32,
    /// The creating host's OS, e.g. `Wi2k`.
    pub creator_host_os: [u8; 4],
    /// The size at creation, in bytes.
    pub original_size: u64,
    /// The virtual size in bytes.
    pub current_size: u64,
    /// The CHS geometry.
    pub geometry: Geometry,
    /// The disk type.
    pub disk_type: DiskType,
    /// The stored checksum (verified by [`Footer::parse`]).
    pub checksum: u32,
    /// The disk's unique id.
    pub unique_id: [u8; 16],
    /// Whether the disk is in a saved (hibernated VM) state.
    pub saved_state: bool,
}

/// Something in a footer is wrong. Each field has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FooterError {
    /// The cookie is not `conectix`: not a VHD, or the footer is not the last 512 bytes.
    #[error("cookie is \"{found}\", expected \"conectix\": not a VHD footer")]
    BadCookie {
        /// The eight bytes found, escaped.
        found: String,
    },
    /// The checksum does not match the footer's bytes.
    #[error("checksum is {stored:#010x} but the footer's bytes sum to {computed:#010x}")]
    BadChecksum {
        /// Stored in the footer.
        stored: u32,
        /// Computed from the other bytes.
        computed: u32,
    },
    /// The file format version is not 0x00010000.
    #[error("file format version is {found:#010x}, expected 0x00010000")]
    BadVersion {
        /// The version found.
        found: u32,
    },
    /// The reserved features bit is clear.
    #[error("features are {found:#010x}: the reserved bit 0x00000002 must be set")]
    BadFeatures {
        /// The features found.
        found: u32,
    },
    /// The disk type is not fixed, dynamic or differencing.
    #[error("disk type {found} is not 2 (fixed), 3 (dynamic) or 4 (differencing)")]
    UnknownDiskType {
        /// The number found.
        found: u32,
    },
    /// A fixed disk whose data offset is not all ones.
    #[error("data offset is {found:#018x}; a fixed disk has 0xffffffffffffffff")]
    BadDataOffset {
        /// The offset found.
        found: u64,
    },
    /// Not a fixed disk; Azure takes only fixed VHDs.
    #[error("disk type is {found}; Azure needs a fixed (2) VHD")]
    NotFixed {
        /// The type found.
        found: DiskType,
    },
    /// The virtual size is not a whole number of MiB.
    #[error("current size {} is not a whole number of MiB, which Azure requires", Bytes(*current_size))]
    SizeNotMibMultiple {
        /// The footer's current size.
        current_size: u64,
    },
    /// The file is not exactly the disk plus the footer.
    #[error(
        "file is {} long; a fixed VHD of current size {} must be {} (data + 512-byte footer)",
        Bytes(*file_len), Bytes(*current_size), Bytes(current_size.saturating_add(512))
    )]
    FileLength {
        /// The file's length.
        file_len: u64,
        /// The footer's current size.
        current_size: u64,
    },
    /// The geometry is neither the specification's for this size nor the 65535/16/255 marker.
    #[error(
        "geometry {found} is neither {expected} (the VHD specification's for {}) nor 65535/16/255",
        Bytes(*current_size)
    )]
    BadGeometry {
        /// The geometry found.
        found: Geometry,
        /// The specification's geometry for the current size.
        expected: Geometry,
        /// The footer's current size.
        current_size: u64,
    },
    /// The creator is one whose readers size the disk by CHS, and CHS disagrees with the size.
    #[error(
        "creator \"{creator}\" makes readers size the disk by geometry {geometry} = {}, \
         but the current size is {}",
        Bytes(geometry.bytes()), Bytes(*current_size)
    )]
    ChsSizeMismatch {
        /// The creator application.
        creator: String,
        /// The geometry.
        geometry: Geometry,
        /// The footer's current size.
        current_size: u64,
    },
    /// The disk holds a saved VM state.
    #[error("saved-state flag is set; the disk belongs to a suspended VM")]
    SavedState,
    /// The unique id is all zeros.
    #[error("unique id is all zeros")]
    ZeroUniqueId,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn arr4(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

/// Bytes shown escaped, for messages.
fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// The footer checksum: one's complement of the sum of all bytes except the checksum field
/// (offsets 64..68).
pub fn checksum(bytes: &[u8; FOOTER_LEN]) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

impl Footer {
    /// Parse and validate a footer: cookie, checksum, version, features, disk type, and the
    /// data offset of a fixed disk.
    pub fn parse(bytes: &[u8; FOOTER_LEN]) -> Result<Footer, FooterError> {
        if bytes[..8] != COOKIE {
            return Err(FooterError::BadCookie {
                found: escaped(&bytes[..8]),
            });
        }
        let stored = be32(bytes, 64);
        let computed = checksum(bytes);
        if stored != computed {
            return Err(FooterError::BadChecksum { stored, computed });
        }
        let file_format_version = be32(bytes, 12);
        if file_format_version != FILE_FORMAT_VERSION {
            return Err(FooterError::BadVersion {
                found: file_format_version,
            });
        }
        let features = be32(bytes, 8);
        if features & FEATURE_RESERVED == 0 {
            return Err(FooterError::BadFeatures { found: features });
        }
        let code = be32(bytes, 60);
        let disk_type =
            DiskType::from_code(code).ok_or(FooterError::UnknownDiskType { found: code })?;
        let data_offset = be64(bytes, 16);
        if disk_type == DiskType::Fixed && data_offset != FIXED_DATA_OFFSET {
            return Err(FooterError::BadDataOffset { found: data_offset });
        }
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&bytes[68..84]);
        Ok(Footer {
            features,
            file_format_version,
            data_offset,
            timestamp: be32(bytes, 24),
            creator_app: arr4(bytes, 28),
            creator_version: be32(bytes, 32),
            creator_host_os: arr4(bytes, 36),
            original_size: be64(bytes, 40),
            current_size: be64(bytes, 48),
            geometry: Geometry {
                cylinders: u16::from_be_bytes([bytes[56], bytes[57]]),
                heads: bytes[58],
                sectors_per_track: bytes[59],
            },
            disk_type,
            checksum: stored,
            unique_id,
            saved_state: bytes[84] != 0,
        })
    }

    /// Check what Azure requires of an uploaded VHD, given the file's length: a fixed disk, not
    /// in a saved state, with a non-zero unique id, a whole-MiB current size, length = current
    /// size + 512, and a geometry that is either the specification's for the size or the
    /// 65535/16/255 marker (which qemu's `force_size` writes). For creators whose readers size a
    /// disk by CHS (`qemu`, `vpc `), the geometry must also cover exactly the current size.
    pub fn check_azure_fixed(&self, file_len: u64) -> Result<(), FooterError> {
        if self.disk_type != DiskType::Fixed {
            return Err(FooterError::NotFixed {
                found: self.disk_type,
            });
        }
        if self.saved_state {
            return Err(FooterError::SavedState);
        }
        if self.unique_id == [0u8; 16] {
            return Err(FooterError::ZeroUniqueId);
        }
        let current_size = self.current_size;
        if current_size % MIB != 0 {
            return Err(FooterError::SizeNotMibMultiple { current_size });
        }
        if current_size.checked_add(FOOTER_LEN as u64) != Some(file_len) {
            return Err(FooterError::FileLength {
                file_len,
                current_size,
            });
        }
        let expected = Geometry::for_size(current_size);
        if self.geometry != expected && self.geometry != Geometry::MAX {
            return Err(FooterError::BadGeometry {
                found: self.geometry,
                expected,
                current_size,
            });
        }
        let chs_reader = matches!(&self.creator_app, b"qemu" | b"vpc ");
        if chs_reader && self.geometry != Geometry::MAX && self.geometry.bytes() != current_size {
            return Err(FooterError::ChsSizeMismatch {
                creator: self.creator_app_str(),
                geometry: self.geometry,
                current_size,
            });
        }
        Ok(())
    }

    /// A footer for a fixed disk of `size` bytes, created now-ish (`timestamp_unix`) by `kiln`,
    /// with the specification's geometry. Used by the fake image tool and by tests.
    pub fn new_fixed(size: u64, unique_id: [u8; 16], timestamp_unix: u64) -> Footer {
        let since_2000 = timestamp_unix
            .saturating_sub(VHD_EPOCH_UNIX)
            .min(u64::from(u32::MAX));
        Footer {
            features: FEATURE_RESERVED,
            file_format_version: FILE_FORMAT_VERSION,
            data_offset: FIXED_DATA_OFFSET,
            timestamp: since_2000 as u32,
            creator_app: *b"kiln",
            creator_version: 0x0001_0000,
            creator_host_os: *b"Lnux",
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type: DiskType::Fixed,
            checksum: 0,
            unique_id,
            saved_state: false,
        }
    }

    /// The 512 footer bytes, with the checksum computed afresh (the `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(&COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.file_format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = u8::from(self.saved_state);
        let sum = checksum(&b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The creation time in Unix seconds.
    pub fn timestamp_unix(&self) -> u64 {
        VHD_EPOCH_UNIX + u64::from(self.timestamp)
    }

    /// The creator application as text, e.g. `qem2`.
    pub fn creator_app_str(&self) -> String {
        escaped(&self.creator_app)
    }
}

/// A VHD file could not be read or its footer is wrong. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file is shorter than a footer.
    #[error("{}: {len} bytes is too short to hold a 512-byte VHD footer", path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The footer is wrong.
    #[error("{}: bad VHD footer: {source}", path.display())]
    Footer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: FooterError,
    },
}

/// Read and parse the footer of `path` (its last 512 bytes); also returns the file's length.
pub fn read_footer(path: &Path) -> Result<(Footer, u64), VhdError> {
    let io_err = |source| VhdError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < FOOTER_LEN as u64 {
        return Err(VhdError::TooShort {
            path: path.to_path_buf(),
            len,
        });
    }
    let mut bytes = [0u8; FOOTER_LEN];
    file.seek(SeekFrom::Start(len - FOOTER_LEN as u64))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(io_err)?;
    let footer = Footer::parse(&bytes).map_err(|source| VhdError::Footer {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((footer, len))
}

/// Read `path`'s footer and check it is a VHD Azure accepts ([`Footer::check_azure_fixed`]).
pub fn verify_fixed(path: &Path) -> Result<Footer, VhdError> {
    let (footer, len) = read_footer(path)?;
    footer
        .check_azure_fixed(len)
        .map_err(|source| VhdError::Footer {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(footer)
}

/// Whether `path` ends with a VHD footer cookie (or starts with one, as dynamic VHDs do). qemu-img
/// probes fixed VHDs as `raw`; this tells them apart.
pub fn has_vhd_cookie(path: &Path) -> io::Result<bool> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < FOOTER_LEN as u64 {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    file.read_exact(&mut cookie)?;
    if cookie == COOKIE {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(len - FOOTER_LEN as u64))?;
    file.read_exact(&mut cookie)?;
    Ok(cookie == COOKIE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The footer qemu-img 10.0.2 wrote for a 10 MiB + 512 B disk
    /// (`convert -O vpc -o subformat=fixed,force_size=on`).
    fn qemu_footer() -> [u8; FOOTER_LEN] {
        let head: [u8; 84] = [
            0x63, 0x6f, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x78, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01,
            0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x32, 0x9d, 0x4d, 0x7a,
            0x71, 0x65, 0x6d, 0x32, 0x00, 0x05, 0x00, 0x03, 0x57, 0x69, 0x32, 0x6b, 0x00, 0x00,
            0x00, 0x00, 0x00, 0xa0, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0x00,
            0xff, 0xff, 0x10, 0xff, 0x00, 0x00, 0x00, 0x02, 0xff, 0xff, 0xe4, 0x7b, 0x51, 0xc7,
            0x0d, 0xc8, 0x88, 0x01, 0x43, 0x39, 0x8d, 0x92, 0xfe, 0xa5, 0x95, 0x2e, 0x01, 0xf1,
        ];
        let mut b = [0u8; FOOTER_LEN];
        b[..84].copy_from_slice(&head);
        b
    }

    #[test]
    fn parses_a_real_qemu_footer() {
        let f = Footer::parse(&qemu_footer()).expect("valid");
        assert_eq!(f.creator_app_str(), "qem2");
        assert_eq!(&f.creator_host_os, b"Wi2k");
        assert_eq!(f.creator_version, 0x0005_0003);
        assert_eq!(f.current_size, 10 * MIB + 512);
        assert_eq!(f.original_size, 10 * MIB + 512);
        assert_eq!(f.geometry, Geometry::MAX);
        assert_eq!(f.disk_type, DiskType::Fixed);
        assert_eq!(f.checksum, 0xffff_e47b);
        assert_eq!(f.timestamp_unix(), VHD_EPOCH_UNIX + 0x329d_4d7a);
        // Not a whole MiB: exactly why kiln pads before converting.
        assert_eq!(
            f.check_azure_fixed(10 * MIB + 1024),
            Err(FooterError::SizeNotMibMultiple {
                current_size: 10 * MIB + 512
            })
        );
    }

    #[test]
    fn geometry_follows_the_spec_appendix() {
        // 127 GiB and beyond clamp to the maximum.
        assert_eq!(Geometry::for_size(2040 << 30), Geometry::MAX);
        // 30 GiB, the common Azure OS disk: 63 sectors per track.
        let g = Geometry::for_size(30 << 30);
        assert_eq!((g.heads, g.sectors_per_track), (16, 63));
        assert_eq!(g.cylinders, (30u64 * 2048 * 1024 / 63 / 16) as u16);
        // Small disks: 17 sectors per track, at least 4 heads.
        assert_eq!(
            Geometry::for_size(10 << 20),
            Geometry {
                cylinders: 301,
                heads: 4,
                sectors_per_track: 17
            }
        );
        // 100 MiB: the spec says 1003/12/17. qemu without force_size instead searches for the
        // first geometry covering the disk (1004/12/17) and grows the disk to match.
        let g = Geometry::for_size(100 << 20);
        assert_eq!(g.to_string(), "1003/12/17");
        // The spec geometry never covers more than the disk.
        for mib in [1u64, 3, 11, 100, 1000, 4096, 40_000] {
            assert!(
                Geometry::for_size(mib << 20).bytes() <= mib << 20,
                "{mib} MiB"
            );
        }
    }

    #[test]
    fn new_fixed_round_trips_and_passes_azure_checks() {
        let f = Footer::new_fixed(11 * MIB, [7; 16], VHD_EPOCH_UNIX + 1000);
        let bytes = f.to_bytes();
        let back = Footer::parse(&bytes).expect("valid");
        assert_eq!(back.checksum, checksum(&bytes));
        assert_eq!(
            Footer {
                checksum: back.checksum,
                ..f
            },
            back
        );
        back.check_azure_fixed(11 * MIB + 512).expect("azure-valid");
    }

    fn fixed() -> [u8; FOOTER_LEN] {
        Footer::new_fixed(4 * MIB, [1; 16], VHD_EPOCH_UNIX).to_bytes()
    }

    fn reseal(mut b: [u8; FOOTER_LEN]) -> [u8; FOOTER_LEN] {
        let sum = checksum(&b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    #[test]
    fn each_wrong_field_has_its_error() {
        let mut b = fixed();
        b[..8].copy_from_slice(b"conectiy");
        assert!(
            matches!(Footer::parse(&b), Err(FooterError::BadCookie { found }) if found == "conectiy")
        );

        let mut b = fixed();
        b[100] = 1; // reserved byte changed, checksum not updated
        assert!(matches!(
            Footer::parse(&b),
            Err(FooterError::BadChecksum { .. })
        ));

        let mut b = fixed();
        b[12..16].copy_from_slice(&0x0002_0000u32.to_be_bytes());
        assert_eq!(
            Footer::parse(&reseal(b)),
            Err(FooterError::BadVersion { found: 0x0002_0000 })
        );

        let mut b = fixed();
        b[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            Footer::parse(&reseal(b)),
            Err(FooterError::BadFeatures { found: 0 })
        );

        let mut b = fixed();
        b[60..64].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(
            Footer::parse(&reseal(b)),
            Err(FooterError::UnknownDiskType { found: 5 })
        );

        let mut b = fixed();
        b[16..24].copy_from_slice(&512u64.to_be_bytes());
        assert_eq!(
            Footer::parse(&reseal(b)),
            Err(FooterError::BadDataOffset { found: 512 })
        );
    }

    #[test]
    fn azure_rules_each_have_their_error() {
        let base = Footer::new_fixed(4 * MIB, [1; 16], VHD_EPOCH_UNIX);
        let len = 4 * MIB + 512;
        let dynamic = Footer {
            disk_type: DiskType::Dynamic,
            data_offset: 512,
            ..base.clone()
        };
        assert_eq!(
            dynamic.check_azure_fixed(len),
            Err(FooterError::NotFixed {
                found: DiskType::Dynamic
            })
        );
        assert_eq!(
            base.check_azure_fixed(len + 1),
            Err(FooterError::FileLength {
                file_len: len + 1,
                current_size: 4 * MIB
            })
        );
        let odd = Footer {
            current_size: 4 * MIB + 512,
            ..base.clone()
        };
        assert!(matches!(
            odd.check_azure_fixed(len + 512),
            Err(FooterError::SizeNotMibMultiple { .. })
        ));
        let bad_geo = Footer {
            geometry: Geometry {
                cylinders: 1,
                heads: 1,
                sectors_per_track: 1,
            },
            ..base.clone()
        };
        assert!(matches!(
            bad_geo.check_azure_fixed(len),
            Err(FooterError::BadGeometry { .. })
        ));
        let max_geo = Footer {
            geometry: Geometry::MAX,
            ..base.clone()
        };
        max_geo
            .check_azure_fixed(len)
            .expect("qemu's force_size marker is fine");
        let chs = Footer {
            creator_app: *b"qemu",
            ..base.clone()
        };
        assert!(matches!(
            chs.check_azure_fixed(len),
            Err(FooterError::ChsSizeMismatch { .. })
        ));
        let saved = Footer {
            saved_state: true,
            ..base.clone()
        };
        assert_eq!(saved.check_azure_fixed(len), Err(FooterError::SavedState));
        let zero = Footer {
            unique_id: [0; 16],
            ..base
        };
        assert_eq!(zero.check_azure_fixed(len), Err(FooterError::ZeroUniqueId));
    }

    #[test]
    fn messages_name_the_numbers() {
        let e = FooterError::FileLength {
            file_len: 1000,
            current_size: 2 * MIB,
        };
        assert!(e.to_string().contains("2097664 bytes"), "{e}");
        let e = FooterError::BadChecksum {
            stored: 1,
            computed: 2,
        };
        assert_eq!(
            e.to_string(),
            "checksum is 0x00000001 but the footer's bytes sum to 0x00000002"
        );
    }
}
