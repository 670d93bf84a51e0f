//! Host ports for the SSH forward.
//!
//! A port is picked by binding 127.0.0.1:0 and closing the socket. That leaves a window
//! in which another program could take the port before QEMU binds it; kiln closes it
//! from both sides:
//! - within one kiln process, ports handed to running VMs are reserved until the VM is
//!   dropped, so two builds in one process never get the same port;
//! - across processes, QEMU fails at once with "Could not set up host forwarding rule"
//!   when it loses the race, and [`super::Vm::start`] retries with a new port.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock, PoisonError};

fn reserved() -> &'static Mutex<HashSet<u16>> {
    static SET: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    SET.get_or_init(Default::default)
}

/// A port reserved in this process until dropped.
#[derive(Debug)]
pub(crate) struct PortReservation {
    port: u16,
    owned: bool,
}

impl PortReservation {
    /// A free port on 127.0.0.1 that no other VM of this process holds.
    pub(crate) fn pick() -> std::io::Result<PortReservation> {
        for _ in 0..64 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            if reserved()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(port)
            {
                return Ok(PortReservation { port, owned: true });
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port on 127.0.0.1 after 64 tries",
        ))
    }

    /// A port the caller chose (not reserved: the caller owns that decision).
    pub(crate) fn fixed(port: u16) -> PortReservation {
        PortReservation { port, owned: false }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        if self.owned {
            reserved()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_unique_until_dropped() {
        let held: Vec<PortReservation> =
            (0..50).map(|_| PortReservation::pick().unwrap()).collect();
        let ports: HashSet<u16> = held.iter().map(|r| r.port()).collect();
        assert_eq!(ports.len(), 50);
        let p = held[0].port();
        drop(held);
        assert!(!reserved().lock().unwrap().contains(&p));
    }
}
