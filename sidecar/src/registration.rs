//! Registration of the local workload with the control plane, which is how it becomes an
//! endpoint of its service: the proxy posts a `WorkloadRegistration` naming its inbound listener,
//! keeps the lease alive with heartbeats at a third of its TTL, registers again when the control
//! plane has forgotten the lease (a heartbeat answered 404, as after a control-plane restart),
//! and retries with backoff while the control plane is away. On shutdown it deletes the lease so
//! the endpoint leaves the route at once instead of after the TTL.
//!
//! The proxy is ready (`/ready`) once the first registration has succeeded: before that, peers
//! cannot find the workload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use mesh_core::proxy_api::{WORKLOADS_PATH, WorkloadLease, WorkloadRegistration};
use reqwest::StatusCode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::readiness::Readiness;

/// Bound on one registration or heartbeat call, so a hung control plane is retried rather than
/// waited on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on deregistration at shutdown: it is best effort, and the lease TTL is the fallback.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// Shortest heartbeat interval, whatever the TTL.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Why a call to the control plane failed. Every kind is retried; they differ in what the proxy
/// does next.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The control plane could not be reached or did not answer in time (mesh-internal,
    /// retried with backoff).
    #[error("control plane at {base} unreachable: {}", mesh_core::error::chain(.source))]
    Unreachable {
        /// The control plane's proxy API.
        base: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The control plane answered with an unexpected status (a 403 when the registration's
    /// identity is not the certificate's, or the lease is another identity's).
    #[error("control plane at {base} answered {status} to {call}: {message}")]
    Refused {
        /// The control plane's proxy API.
        base: String,
        /// Which call (`register`, `heartbeat`, `deregister`).
        call: &'static str,
        /// The status it answered.
        status: StatusCode,
        /// Its message (a Kubernetes `Status` object).
        message: String,
    },
    /// The control plane's answer to a registration is not a lease.
    #[error(
        "control plane at {base} answered a registration with something other than a lease: {source}"
    )]
    BadLease {
        /// The control plane's proxy API.
        base: String,
        /// The decoding error.
        source: reqwest::Error,
    },
    /// The control plane does not know the lease (it expired or the control plane restarted);
    /// the workload registers again.
    #[error("control plane at {base} does not know lease {id}")]
    UnknownLease {
        /// The control plane's proxy API.
        base: String,
        /// The lease.
        id: String,
    },
}

/// How often to heartbeat a lease of `ttl_seconds`: three chances before it expires.
pub fn heartbeat_interval(ttl_seconds: u64) -> Duration {
    (Duration::from_secs(ttl_seconds) / 3).max(MIN_HEARTBEAT)
}

/// The address peers should use for a listener bound at `bound`: a wildcard bind is reached on
/// loopback, which is where the embedded mesh's peers are.
pub fn advertised_addr(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound.port())
        }
        _ => bound,
    }
}

/// Keeps the workload registered.
#[derive(Debug)]
pub struct Registrar {
    base: String,
    client: reqwest::Client,
    registration: WorkloadRegistration,
    lease: watch::Sender<Option<WorkloadLease>>,
    readiness: watch::Sender<Readiness>,
}

impl Registrar {
    /// Registers `registration` with the control plane's proxy API at `base`
    /// (`https://host:port`), moving `readiness` from [`Readiness::Registering`] to
    /// [`Readiness::Ready`] on success. It waits for the proxy's first certificate, which
    /// `client` presents and the control plane requires.
    pub fn new(
        base: &str,
        client: reqwest::Client,
        registration: WorkloadRegistration,
        readiness: watch::Sender<Readiness>,
    ) -> Self {
        Self {
            base: base.to_string(),
            client,
            registration,
            lease: watch::channel(None).0,
            readiness,
        }
    }

    /// Runs the registration in a task; the handle deregisters.
    pub fn spawn(self) -> Registration {
        let lease = self.lease.subscribe();
        let base = self.base.clone();
        let client = self.client.clone();
        Registration {
            task: tokio::spawn(self.run()),
            lease,
            base,
            client,
        }
    }

    /// Registers, heartbeats and registers again, forever.
    pub async fn run(self) {
        // A workload is announced only once its proxy can serve peers over mTLS.
        let mut readiness = self.readiness.subscribe();
        let _ = readiness.wait_for(|r| *r != Readiness::Certifying).await;
        drop(readiness);
        if *self.readiness.borrow() == Readiness::Draining {
            return;
        }
        let mut backoff = Backoff::default();
        loop {
            let lease = match self.register().await {
                Ok(lease) => lease,
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(%error, ?wait, "registering the workload failed; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(
                lease = %lease.id,
                ttl_seconds = lease.ttl_seconds,
                service = %self.registration.service,
                addr = %self.registration.addr,
                "workload registered"
            );
            self.lease.send_replace(Some(lease.clone()));
            // A proxy already draining stays draining.
            self.readiness.send_if_modified(|r| {
                let registering = *r == Readiness::Registering;
                if registering {
                    *r = Readiness::Ready;
                }
                registering
            });
            self.keep_alive(&lease).await;
            self.lease.send_replace(None);
        }
    }

    /// Heartbeats `lease` until the control plane no longer knows it.
    async fn keep_alive(&self, lease: &WorkloadLease) {
        let interval = heartbeat_interval(lease.ttl_seconds);
        let mut backoff = Backoff::default();
        let mut wait = interval;
        loop {
            tokio::time::sleep(wait).await;
            match self.heartbeat(&lease.id).await {
                Ok(()) => {
                    backoff.reset();
                    wait = interval;
                }
                Err(error @ RegistrationError::UnknownLease { .. }) => {
                    tracing::warn!(%error, "lease lost; registering again");
                    return;
                }
                // Retried sooner than the next regular beat, but never later: the lease is
                // still running out.
                Err(error) => {
                    wait = backoff.next_wait().min(interval);
                    tracing::warn!(%error, ?wait, "heartbeat failed; retrying");
                }
            }
        }
    }

    async fn register(&self) -> Result<WorkloadLease, RegistrationError> {
        let rsp = self
            .client
            .post(format!("{}{WORKLOADS_PATH}", self.base))
            .json(&self.registration)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        if !rsp.status().is_success() {
            return Err(RegistrationError::Refused {
                base: self.base.clone(),
                call: "register",
                status: rsp.status(),
                message: rsp.text().await.unwrap_or_default(),
            });
        }
        rsp.json()
            .await
            .map_err(|source| RegistrationError::BadLease {
                base: self.base.clone(),
                source,
            })
    }

    async fn heartbeat(&self, id: &str) -> Result<(), RegistrationError> {
        let rsp = self
            .client
            .post(format!("{}{WORKLOADS_PATH}/{id}/heartbeat", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|source| self.unreachable(source))?;
        match rsp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(RegistrationError::UnknownLease {
                base: self.base.clone(),
                id: id.to_string(),
            }),
            status => Err(RegistrationError::Refused {
                base: self.base.clone(),
                call: "heartbeat",
                status,
                message: rsp.text().await.unwrap_or_default(),
            }),
        }
    }

    fn unreachable(&self, source: reqwest::Error) -> RegistrationError {
        RegistrationError::Unreachable {
            base: self.base.clone(),
            source,
        }
    }
}

/// A running registration.
#[derive(Debug)]
pub struct Registration {
    task: JoinHandle<()>,
    lease: watch::Receiver<Option<WorkloadLease>>,
    base: String,
    client: reqwest::Client,
}

impl Registration {
    /// The current lease, if registered.
    pub fn lease(&self) -> Option<WorkloadLease> {
        self.lease.borrow().clone()
    }

    /// Stops registering and deletes the lease, within [`DEREGISTER_TIMEOUT`]. Returns the
    /// deleted lease's id; `Ok(None)` when there was none to delete.
    pub async fn deregister(self) -> Result<Option<String>, RegistrationError> {
        // Stopped first, so a heartbeat answered 404 cannot register the workload again.
        self.task.abort();
        let Some(lease) = self.lease() else {
            return Ok(None);
        };
        let rsp = self
            .client
            .delete(format!("{}{WORKLOADS_PATH}/{}", self.base, lease.id))
            .timeout(DEREGISTER_TIMEOUT)
            .send()
            .await
            .map_err(|source| RegistrationError::Unreachable {
                base: self.base.clone(),
                source,
            })?;
        match rsp.status() {
            // Gone already (expired) is as good as deleted.
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(Some(lease.id)),
            status => Err(RegistrationError::Refused {
                base: self.base,
                call: "deregister",
                status,
                message: rsp.text().await.unwrap_or_default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_three_times_per_ttl() {
        assert_eq!(heartbeat_interval(30), Duration::from_secs(10));
        assert_eq!(heartbeat_interval(1), Duration::from_secs(1) / 3);
        assert_eq!(heartbeat_interval(0), MIN_HEARTBEAT);
    }

    #[test]
    fn wildcard_binds_are_advertised_on_loopback() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            advertised_addr(addr("0.0.0.0:4143")),
            addr("127.0.0.1:4143")
        );
        assert_eq!(advertised_addr(addr("[::]:4143")), addr("[::1]:4143"));
        assert_eq!(
            advertised_addr(addr("10.0.0.7:4143")),
            addr("10.0.0.7:4143")
        );
    }
}
