//! Disk images: qemu-img, overlays, VHD export, catalog. Never starts a VM.
