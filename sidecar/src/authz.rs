//! Inbound authorization: the port's [`InboundPolicy`], from the control plane's policy watch
//! (or the configured default until the first answer arrives, and whenever there is no control
//! plane), checked for every inbound HTTP request and every opaque TCP connection.
//!
//! An HTTP request the policy refuses gets `403 Forbidden` from the proxy, and the app never
//! sees it; an opaque connection it refuses is closed. The client is judged by the address of its
//! connection and the SPIFFE ID it proved with mTLS (plaintext clients have none), so a
//! policy that requires an identity is also a policy that requires mTLS. Decisions are counted
//! in `inbound_http_authz_allow_total`, `inbound_http_authz_deny_total` and
//! `inbound_tcp_authz_deny_total`.

use std::net::IpAddr;
use std::sync::Arc;

use mesh_policies::{Client, Denied, InboundPolicy, ProxyProtocol};
use tokio::sync::watch;

use crate::metrics::{AuthzLabels, Metrics};

/// The policy of the inbound port, kept current.
#[derive(Clone, Debug)]
pub struct Authz {
    policy: watch::Receiver<Arc<InboundPolicy>>,
    metrics: Metrics,
}

impl Authz {
    /// Authorization by the policy `policy` holds, counted in `metrics`.
    pub fn new(policy: watch::Receiver<Arc<InboundPolicy>>, metrics: Metrics) -> Self {
        Self { policy, metrics }
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<InboundPolicy> {
        Arc::clone(&self.policy.borrow())
    }

    /// Whether the Server declares the port opaque, so plaintext is never parsed as HTTP.
    pub fn opaque(&self) -> bool {
        self.policy.borrow().protocol == ProxyProtocol::Opaque
    }

    /// Checks an HTTP request from `ip`, proven as `identity`.
    pub fn check_http(&self, ip: IpAddr, identity: Option<&str>) -> Result<(), Denied> {
        let policy = self.policy();
        match policy.authorize(&Client { ip, identity }) {
            Ok(authorization) => {
                self.metrics
                    .http_authz_allow
                    .get_or_create(&AuthzLabels {
                        server: policy.server.clone(),
                        authorization: authorization.name.clone(),
                    })
                    .inc();
                Ok(())
            }
            Err(denied) => {
                self.metrics
                    .http_authz_deny
                    .get_or_create(&AuthzLabels {
                        server: policy.server.clone(),
                        authorization: String::new(),
                    })
                    .inc();
                Err(denied)
            }
        }
    }

    /// Checks an opaque TCP connection from `ip`, proven as `identity` when it came from a
    /// peer proxy over mTLS (plaintext connections have none).
    pub fn check_tcp(&self, ip: IpAddr, identity: Option<&str>) -> Result<(), Denied> {
        let policy = self.policy();
        policy
            .authorize(&Client { ip, identity })
            .map(|_| ())
            .inspect_err(|_| {
                self.metrics
                    .tcp_authz_deny
                    .get_or_create(&AuthzLabels {
                        server: policy.server.clone(),
                        authorization: String::new(),
                    })
                    .inc();
            })
    }
}
