//! Free loopback ports for programs that cannot report the port they bound.
//!
//! Our own binaries take port 0 and announce what they got (see `mesh_core::announce`); etcd,
//! kube-apiserver and Prometheus need a number up front. We check that a port is free, close
//! the listener, and the program binds it a moment later.
//!
//! The port comes from *below* the kernel's ephemeral range. Ports in that range are also
//! handed to outgoing connections (an apiserver talking to its etcd, a load generator), so a
//! port that was free when we looked could be the source port of someone's connection by the
//! time the program binds it; CI saw exactly that. Below the range only another explicit bind
//! can take it, and a random start keeps parallel test processes from walking the same ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use crate::{HarnessError, Result};

/// Lowest port we hand out; well above the registered services people run on a dev machine.
const LOWEST: u16 = 20_000;
/// Used when the kernel's range cannot be read.
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// Ports this process already handed out, so two harnesses in one test binary never collide.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port, outside the ephemeral range, that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let top = ephemeral_start().max(LOWEST + 1_000);
    let span = top - LOWEST;
    let mut handed = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let handed = handed.get_or_insert_with(HashSet::new);
    let start = fastrand::u16(..span);
    for i in 0..span {
        let port = LOWEST + (start + i) % span;
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed.insert(port);
            return Ok(port);
        }
    }
    Err(HarnessError::Io {
        context: format!("finding a free port in 127.0.0.1:{LOWEST}..{top}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// First port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_bindable_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for port in ports {
            assert!((LOWEST..ephemeral_start().max(LOWEST + 1_000)).contains(&port));
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free");
        }
    }
}
