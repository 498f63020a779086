//! What the app meant a request for, worked out once, by the listener, before any routing:
//! the [`Target`]. Everything below routes by this typed value and never reads Host again.
//!
//! A target is either the service the request's authority names (the absolute-form URI of an
//! app using `HTTP_PROXY`, or Host, on a connection that was not redirected), or, on a
//! redirected connection, the meshed service its original destination address belongs to
//! (`SO_ORIGINAL_DST`, decided per connection beside protocol detection; see
//! [`crate::outbound::connection`]). A redirected connection to an address outside the mesh has
//! no target: its requests are passed through to that address below the routing layers.

use std::net::SocketAddr;

use http::Request;
use http::header::HOST;
use mesh_core::proxy_api::ServiceRef;

use crate::outbound::error::Error;
use crate::tables::parse_authority;

/// Where a request is going, as the app named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A service named by the request's authority.
    Authority(ServiceRef),
    /// A redirected connection's original destination, an address of a meshed service.
    OrigDst {
        /// The address the app dialled.
        addr: SocketAddr,
        /// The service it belongs to.
        service: ServiceRef,
    },
}

impl Target {
    /// The target of an HTTP request: its URI's authority (absolute form, and HTTP/2), else its
    /// Host header.
    pub fn from_request<B>(req: &Request<B>) -> Result<Self, Error> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
        let Some(authority) = authority else {
            return Err(Error::NoAuthority);
        };
        parse_authority(authority)
            .map(Self::Authority)
            .ok_or_else(|| Error::NotAService(authority.to_string()))
    }

    /// The service the request is for; discovery watches it.
    pub fn service(&self) -> &ServiceRef {
        match self {
            Self::Authority(service) | Self::OrigDst { service, .. } => service,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(port: u16) -> Target {
        Target::Authority(ServiceRef::new("web", "shop", port))
    }

    #[test]
    fn the_uri_authority_wins_over_host() {
        let req = Request::get("http://web.shop:8080/")
            .header(HOST, "other:80")
            .body(())
            .unwrap();
        assert_eq!(Target::from_request(&req).unwrap(), web(8080));
    }

    #[test]
    fn origin_form_requests_are_routed_by_host() {
        let req = Request::get("/a")
            .header(HOST, "web.shop")
            .body(())
            .unwrap();
        assert_eq!(Target::from_request(&req).unwrap(), web(80));
    }

    #[test]
    fn requests_naming_no_service_are_the_apps_mistake() {
        let none = Request::get("/a").body(()).unwrap();
        let err = Target::from_request(&none).unwrap_err();
        assert!(matches!(err, Error::NoAuthority), "{err}");
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
        let odd = Request::get("/a")
            .header(HOST, "example.com.evil.org")
            .body(())
            .unwrap();
        let err = Target::from_request(&odd).unwrap_err();
        assert!(matches!(err, Error::NotAService(_)), "{err}");
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    }
}
