//! The sidecar proxy, `mesh-proxy`: it sits beside every workload and carries all of its
//! service-to-service traffic. Outbound requests are routed by the control plane's HTTPRoute
//! tables to weighted backends and load-balanced endpoints over mTLS; inbound connections are
//! authorized and handed to the local app; both directions record golden metrics that the
//! rollout controller judges canaries by. Today: the outbound listener (HTTP/1.1 and h2c,
//! HTTPRoute matching, weighted backends, P2C/peak-EWMA endpoint selection with failure accrual,
//! pooled connections with connect timeouts, route timeouts, retries under a retry budget,
//! filters, golden metrics) driven by a static config file or the control plane's watch streams,
//! which also serves connections iptables redirected to it by their original destination
//! ([`orig_dst`]): meshed services are routed, anything else and anything not HTTP is forwarded
//! untouched ([`outbound::connection`], [`opaque`]), over mTLS between meshed proxies;
//! the inbound listener, which hands peers' requests to the local app (mTLS from peer proxies,
//! or plaintext) once the port's policy authorizes them ([`authz`]); the workload's identity, a
//! certificate from the control plane's CA renewed at 70 % of its lifetime, with mTLS and
//! HTTP/2 between proxies; registration of the local workload with the control plane, which
//! makes it an endpoint of its service; protocol fidelity through both listeners (h2 stays h2 to
//! plaintext endpoints, HEAD over HTTP/2, `Upgrade` and `CONNECT` tunnelled, see [`tunnel`]);
//! graceful drain on shutdown; and the admin server (`/live`, `/ready`,
//! `/metrics`, `/config`, and `/tap` for an authorized caller, see [`tap`]); and, when a
//! collector is configured, W3C and B3 trace propagation with a span per request on each side,
//! exported over OTLP ([`trace`]). [`proxy::Proxy`] assembles all of it from a [`config::Config`] and
//! starts it in-process: `mesh-proxy` is that plus signals, and tests start proxies the same way.

pub mod admin;
pub mod authz;
pub mod backoff;
pub mod balance;
pub mod config;
pub mod crypto;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod opaque;
pub mod orig_dst;
pub mod outbound;
pub mod pool;
pub mod proxy;
pub mod readiness;
pub mod registration;
pub mod retry;
pub mod runtime;
pub mod tables;
pub mod tap;
pub mod tee;
pub mod tls;
pub mod trace;
pub mod tunnel;
