//! What can go wrong on the outbound path, as values rather than responses, so each layer
//! above the failure can act on its kind: the retry layer retries a connect failure (nothing
//! was sent), the balance layer counts endpoint failures for failure accrual, the metrics layer
//! records them as mesh errors, and only the listener at the top turns an error into the
//! response the app gets, with the reason in [`PROXY_ERROR_HEADER`](crate::http::PROXY_ERROR_HEADER).
//! It imports no other layer, so every layer can use it.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Response, StatusCode};
use mesh_core::proxy_api::{ServiceRef, WeightedBackend};

use crate::http::Body;
use crate::tables::Tables;

/// A boxed error from a client, with its causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the outbound path answered a request itself instead of with the app's response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request names no destination (the app's mistake: 400).
    #[error("request has no Host or authority")]
    NoAuthority,
    /// The request's authority is not a service name (400).
    #[error("authority {0:?} is not a service name")]
    NotAService(String),
    /// No rule of the service's routes matches the request (404).
    #[error("no route for {service} matches {method} {path}")]
    NoRoute {
        /// The service the request was for.
        service: ServiceRef,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// A fault filter aborted the request with this status, on purpose.
    #[error("fault injected by route filter")]
    Fault(StatusCode),
    /// The route's timeout passed before a response came (504); never retried.
    #[error("{to} did not answer within {}ms (route {route})", .timeout.as_millis())]
    Timeout {
        /// The backend of the attempt in flight (`name.namespace`), or the service.
        to: String,
        /// The route's timeout.
        timeout: Duration,
        /// The route.
        route: String,
    },
    /// No endpoint could be picked (503).
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The attempt to an endpoint got no response (mesh-internal: 502).
    #[error("{backend} at {addr}: {error}")]
    Endpoint {
        /// The backend the endpoint belongs to.
        backend: ServiceRef,
        /// The endpoint.
        addr: SocketAddr,
        /// What failed.
        error: AttemptError,
    },
    /// A retry found the request body already sent and not kept (500; retries check first).
    #[error("request body already sent")]
    BodySent,
    /// The request's path does not make a URI towards the endpoint (400).
    #[error("bad request target: {0}")]
    BadTarget(http::Error),
}

impl Error {
    /// The status of the response the proxy answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoAuthority | Self::NotAService(_) | Self::BadTarget(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::Fault(status) => *status,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Endpoint { .. } => StatusCode::BAD_GATEWAY,
            Self::BodySent => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the request may be sent again: only when nothing of it reached an endpoint (a
    /// connect failure). After the request went out, the app may have acted on it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Endpoint { error, .. } if error.is_connect())
    }

    /// The response the app gets.
    pub fn into_response(self) -> Response<Body> {
        crate::http::error(self.status(), &self.to_string())
    }
}

/// Why an attempt to an endpoint got no response.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The client failed: connecting (TCP, or the mTLS handshake), or the connection broke.
    #[error("{}", mesh_core::error::chain(&**.error))]
    Client {
        /// Whether it failed while connecting, so nothing was sent.
        connect: bool,
        /// The client's error.
        error: BoxError,
    },
    /// The endpoint is meshed and this proxy has no identity (or TLS client) to reach it with.
    #[error("{0}")]
    NoIdentity(String),
}

impl AttemptError {
    /// Whether nothing was sent (safe to retry).
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Client { connect, .. } => *connect,
            Self::NoIdentity(_) => true,
        }
    }
}

impl From<crate::pool::Error> for AttemptError {
    fn from(e: crate::pool::Error) -> Self {
        Self::Client {
            connect: e.is_connect(),
            error: Box::new(e),
        }
    }
}

/// Why no endpoint could be picked for a request: the proxy answers 503.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Discovery knows no endpoints for any backend with weight.
    #[error("no backend of {0} has ready endpoints")]
    NoEndpoints(ServiceRef),
    /// There are endpoints, but failure accrual has taken all of them out for now.
    #[error("every endpoint of the backends of {0} is failing; they are probed with backoff")]
    AllFailing(ServiceRef),
}

impl Unavailable {
    /// Why a request to `service` found no endpoint among `backends`.
    pub fn of(service: &ServiceRef, backends: &[WeightedBackend], tables: &Tables) -> Self {
        if backends.iter().any(|b| tables.available(&b.service)) {
            Self::AllFailing(service.clone())
        } else {
            Self::NoEndpoints(service.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(connect: bool) -> Error {
        Error::Endpoint {
            backend: ServiceRef::new("web", "default", 80),
            addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
            error: AttemptError::Client {
                connect,
                error: "connection refused".into(),
            },
        }
    }

    #[test]
    fn only_failures_before_anything_was_sent_are_retryable() {
        assert!(connect_error(true).is_retryable());
        assert!(!connect_error(false).is_retryable());
        assert!(
            !Error::Unavailable(Unavailable::NoEndpoints(ServiceRef::new(
                "web", "default", 80
            )))
            .is_retryable()
        );
        assert!(
            !Error::Timeout {
                to: "web.default".into(),
                timeout: Duration::from_millis(10),
                route: "main".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn an_endpoint_failure_answers_502_naming_the_endpoint() {
        let rsp = connect_error(true).into_response();
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        let why = rsp.headers()[crate::http::PROXY_ERROR_HEADER]
            .to_str()
            .unwrap();
        assert_eq!(why, "web.default:80 at 127.0.0.1:9000: connection refused");
    }
}
