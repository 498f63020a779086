//! Free loopback ports for programs that cannot report the port they bound.
//!
//! Our own binaries take port 0 and announce what they got (see `mesh_core::announce`); etcd,
//! kube-apiserver and Prometheus need a number up front. The kernel hands out a free one, the
//! listener is closed, and the program binds it a moment later. Another process could take it
//! in between; the kernel cycles through the ephemeral range, so in practice it does not.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use crate::{HarnessError, Result};

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(HarnessError::io("binding 127.0.0.1:0 to find a free port"))?;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(HarnessError::io("reading a listener's address"))?;
    Ok(addr.port())
}
