//! kiln's developer tasks, as a library so that the integration tests (`kiln-tests`)
//! get their guest images through the same code as `cargo xtask images`.

pub mod bench;
pub mod images;
pub mod windows_e2e;
