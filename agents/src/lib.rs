//! Guest communicators (SSH, WinRM). Filled by the linux-build and windows issues.
