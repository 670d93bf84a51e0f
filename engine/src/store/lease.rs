//! Leases on stored image disks: a build holds a shared lock (`flock(LOCK_SH)`) on the managed
//! image or gallery replica it boots from for as long as its context lives; deleting an image or
//! version takes an exclusive lock without waiting and refuses while any build holds one. The
//! kernel drops the locks of a process that dies, so a crashed build never pins an image.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Takes a shared lease on a stored disk: waits while a delete holds it, then checks that the
/// path still names the same file (a delete that won the race removed it).
pub fn shared(disk: &Path) -> Result<File, std::io::Error> {
    let f = File::open(disk)?;
    f.lock_shared()?;
    let now = std::fs::metadata(disk)?;
    let held = f.metadata()?;
    if now.ino() != held.ino() || now.dev() != held.dev() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} was deleted while the build started", disk.display()),
        ));
    }
    Ok(f)
}

/// What an exclusive lease attempt found.
#[derive(Debug)]
pub enum Exclusive {
    /// Held: no build uses the disk while this lives.
    Held(File),
    /// The disk is gone already.
    Missing,
    /// A build holds a shared lease.
    InUse,
}

/// Tries to take the exclusive lease without waiting.
pub fn exclusive_now(disk: &Path) -> Result<Exclusive, std::io::Error> {
    let f = match File::open(disk) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Exclusive::Missing),
        Err(e) => return Err(e),
    };
    match f.try_lock() {
        Ok(()) => Ok(Exclusive::Held(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(Exclusive::InUse),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_lease_blocks_the_exclusive_one_until_dropped() {
        let dir = std::env::temp_dir().join(format!("kiln-lease-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.vhd");
        std::fs::write(&disk, b"x").unwrap();
        let a = shared(&disk).unwrap();
        let b = shared(&disk).unwrap();
        assert!(matches!(exclusive_now(&disk).unwrap(), Exclusive::InUse));
        drop(a);
        assert!(matches!(exclusive_now(&disk).unwrap(), Exclusive::InUse));
        drop(b);
        let held = exclusive_now(&disk).unwrap();
        assert!(matches!(held, Exclusive::Held(_)));
        // A file recreated at the path is another image and leasable; a removed one is NotFound.
        // (The inode check against a delete racing a waiting build is not exercised here.)
        std::fs::remove_file(&disk).unwrap();
        std::fs::write(&disk, b"y").unwrap();
        drop(held);
        assert!(
            shared(&disk).is_ok(),
            "a new file at the path is a new image"
        );
        std::fs::remove_file(&disk).unwrap();
        assert!(matches!(exclusive_now(&disk).unwrap(), Exclusive::Missing));
        assert_eq!(
            shared(&disk).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
