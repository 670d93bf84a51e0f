//! kiln's disk images: the qemu-img wrapper, overlays, fixed-VHD export with footer
//! verification, and the local PlatformImage catalog.
//!
//! **Invariant:** this crate never starts a VM. It runs `qemu-img` (argv vectors, never a
//! shell) behind the [`ImageTool`] trait, reads and writes files, and is synchronous: async
//! callers use `spawn_blocking`.
//!
//! - [`ImageTool`], [`QemuImg`], [`fake::FakeImageTool`]: info, overlays, grow-only resize,
//!   conversion with progress, check.
//! - [`export::export_fixed_vhd`]: the Azure-ready fixed VHD (whole-MiB size, footer verified
//!   by kiln, atomic publish).
//! - [`vhd`]: the VHD footer parser and validator, usable on any file.
//! - [`catalog::Catalog`]: `publisher:offer:sku:version` images with `latest` resolution.
#![warn(missing_docs)]

pub mod catalog;
mod error;
pub mod export;
pub mod fake;
mod format;
mod fsutil;
mod qemu_img;
pub mod size;
mod time;
mod tool;
pub mod vhd;

pub use error::ImageError;
pub use format::{DiskFormat, UnknownFormat};
pub use qemu_img::QemuImg;
pub use tool::{CheckReport, ConvertRequest, ConvertTarget, ImageInfo, ImageTool};
