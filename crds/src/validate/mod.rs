//! Admission checks shared by every store that accepts mesh resources.
//!
//! The Kubernetes apiserver enforces the CRDs' OpenAPI schema and CEL rules; the embedded control
//! plane has no apiserver, so it runs these functions instead, and the Kubernetes path can run
//! them too (for HTTPRoutes, whose upstream schema is looser than what the mesh can route).
//! [`validate`] first parses a document into its typed struct through `serde_path_to_error`, so a
//! wrong type or a missing field is reported with its path (`spec.rules[0].backendRefs[1].weight`),
//! then applies the semantic rules the schema states in CEL (`stepWeight <= maxWeight`, ranges,
//! duration syntax). Every error names the field at fault.

mod authorization_policy;
mod canary;
mod checks;
mod error;
mod http_route;
mod mesh_tls_authentication;
mod metric_template;
mod network_authentication;
mod server;
mod workload;

use gateway_api::apis::standard::httproutes::HttpRoute;
use serde::de::DeserializeOwned;
use serde_json::Value;

use self::checks::check_dns_name;
pub use self::{
    authorization_policy::validate_authorization_policy,
    canary::validate_canary,
    checks::parse_duration_ms,
    error::{FieldError, ValidationError},
    http_route::validate_http_route,
    mesh_tls_authentication::validate_mesh_tls_authentication,
    metric_template::validate_metric_template,
    network_authentication::validate_network_authentication,
    server::validate_server,
    workload::validate_workload,
};
/// The kinds validation knows; their registry lives in [`crate::kind`].
pub use crate::kind::ResourceKind;
use crate::{
    canary::Canary,
    metric_template::MetricTemplate,
    policy::{AuthorizationPolicy, MeshTlsAuthentication, NetworkAuthentication, Server},
    workload::Workload,
};

/// A document that passed validation, typed.
#[derive(Clone, Debug)]
pub enum Validated {
    /// A Canary.
    Canary(Box<Canary>),
    /// A MetricTemplate.
    MetricTemplate(Box<MetricTemplate>),
    /// An HTTPRoute.
    HttpRoute(Box<HttpRoute>),
    /// A GRPCRoute.
    GrpcRoute(Box<crate::GrpcRoute>),
    /// A Workload.
    Workload(Box<Workload>),
    /// A Server.
    Server(Box<Server>),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    /// A MeshTLSAuthentication.
    MeshTlsAuthentication(Box<MeshTlsAuthentication>),
    /// A NetworkAuthentication.
    NetworkAuthentication(Box<NetworkAuthentication>),
}

/// The kind a document declares, without validating the rest.
pub fn kind_of(object: &Value) -> Result<ResourceKind, ValidationError> {
    let map = object.as_object().ok_or(ValidationError::NotAnObject)?;
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or(ValidationError::MissingType("apiVersion"))?;
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or(ValidationError::MissingType("kind"))?;
    ResourceKind::from_type(api_version, kind).ok_or_else(|| ValidationError::UnknownKind {
        api_version: api_version.into(),
        kind: kind.into(),
    })
}

/// Checks a whole document (as a Kubernetes object in JSON form): its type, its metadata, that it
/// parses into the typed struct, and the semantic rules of its kind.
pub fn validate(object: &Value) -> Result<Validated, ValidationError> {
    let kind = kind_of(object)?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let fail = |error: FieldError| ValidationError::Field {
        kind,
        name: name.clone(),
        error,
    };
    validate_metadata(object).map_err(fail)?;
    Ok(match kind {
        ResourceKind::Canary => {
            let c: Canary = parse(object).map_err(fail)?;
            validate_canary(&c).map_err(fail)?;
            Validated::Canary(Box::new(c))
        }
        ResourceKind::MetricTemplate => {
            let m: MetricTemplate = parse(object).map_err(fail)?;
            validate_metric_template(&m).map_err(fail)?;
            Validated::MetricTemplate(Box::new(m))
        }
        ResourceKind::HttpRoute => {
            let r: HttpRoute = parse(object).map_err(fail)?;
            validate_http_route(&r).map_err(fail)?;
            Validated::HttpRoute(Box::new(r))
        }
        ResourceKind::GrpcRoute => {
            let r: crate::GrpcRoute = parse(object).map_err(fail)?;
            Validated::GrpcRoute(Box::new(r))
        }
        ResourceKind::Workload => {
            let w: Workload = parse(object).map_err(fail)?;
            validate_workload(&w).map_err(fail)?;
            Validated::Workload(Box::new(w))
        }
        ResourceKind::Server => {
            let srv: Server = parse(object).map_err(fail)?;
            validate_server(&srv).map_err(fail)?;
            Validated::Server(Box::new(srv))
        }
        ResourceKind::AuthorizationPolicy => {
            let p: AuthorizationPolicy = parse(object).map_err(fail)?;
            validate_authorization_policy(&p).map_err(fail)?;
            Validated::AuthorizationPolicy(Box::new(p))
        }
        ResourceKind::MeshTlsAuthentication => {
            let m: MeshTlsAuthentication = parse(object).map_err(fail)?;
            validate_mesh_tls_authentication(&m).map_err(fail)?;
            Validated::MeshTlsAuthentication(Box::new(m))
        }
        ResourceKind::NetworkAuthentication => {
            let n: NetworkAuthentication = parse(object).map_err(fail)?;
            validate_network_authentication(&n).map_err(fail)?;
            Validated::NetworkAuthentication(Box::new(n))
        }
    })
}

/// Parses a document into `T`, naming the field path when it does not fit.
pub fn parse<T: DeserializeOwned>(object: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let field = match missing_field(&message) {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None if path == "." => "(root)".to_string(),
            None => path,
        };
        FieldError::new(field, message)
    })
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

/// `metadata.name` and `metadata.namespace` are DNS-style names, as Kubernetes requires; the
/// embedded store uses them in keys, so a `/` must never get through.
pub fn validate_metadata(object: &Value) -> Result<(), FieldError> {
    let name = object.pointer("/metadata/name");
    match name {
        None | Some(Value::Null) => return Err(FieldError::new("metadata.name", "required")),
        Some(Value::String(n)) => check_dns_name("metadata.name", n, 253)?,
        Some(_) => return Err(FieldError::new("metadata.name", "must be a string")),
    }
    match object.pointer("/metadata/namespace") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(ns)) => check_dns_name("metadata.namespace", ns, 63),
        Some(_) => Err(FieldError::new("metadata.namespace", "must be a string")),
    }
}

#[cfg(test)]
#[allow(
    clippy::needless_pass_by_value,
    reason = "builders read better taking json! values"
)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mk_route(weights: Value) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "web", "kind": "Service", "port": 80}],
                "rules": [{"backendRefs": [
                    {"name": "web-primary", "port": 80, "weight": weights[0]},
                    {"name": "web-canary", "port": 80, "weight": weights[1]},
                ]}]
            }
        })
    }

    fn mk_canary(analysis: Value) -> Value {
        json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "web"},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "service": {"port": 80},
                "analysis": analysis
            }
        })
    }

    fn field(v: &Value) -> String {
        validate(v)
            .unwrap_err()
            .field()
            .unwrap_or_default()
            .to_string()
    }

    fn policy(kind: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "policy.mesh.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec,
        })
    }

    #[test]
    fn policy_resources_name_the_field_at_fault() {
        let server = |spec| policy("Server", spec);
        assert!(matches!(
            validate(&server(
                json!({"podSelector": {"matchLabels": {"app": "b"}}, "port": 8080, "proxyProtocol": "HTTP/2"})
            )),
            Ok(Validated::Server(_))
        ));
        assert_eq!(field(&server(json!({"port": 8080}))), "spec.podSelector");
        assert_eq!(
            field(&server(json!({"podSelector": {}, "port": 70000}))),
            "spec.port"
        );
        assert_eq!(
            field(&server(json!({"podSelector": {}, "port": "http"}))),
            "spec.port"
        );
        assert_eq!(
            field(&server(
                json!({"podSelector": {}, "port": 80, "proxyProtocol": "SMTP"})
            )),
            "spec.proxyProtocol"
        );
        assert_eq!(
            field(&server(
                json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}, "port": 80})
            )),
            "spec.podSelector.matchExpressions[0].values"
        );

        let authz = |spec| policy("AuthorizationPolicy", spec);
        assert!(
            validate(&authz(json!({
                "targetRef": {"group": "policy.mesh.dev", "kind": "Server", "name": "b"},
                "requiredAuthenticationRefs": [
                    {"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "web"},
                    {"kind": "ServiceAccount", "name": "web", "namespace": "prod"},
                ],
            })))
            .is_ok()
        );
        assert_eq!(
            field(&authz(
                json!({"targetRef": {"kind": "Deployment", "name": "b"}})
            )),
            "spec.targetRef"
        );
        assert_eq!(
            field(&authz(json!({
                "targetRef": {"kind": "Namespace", "name": "default"},
                "requiredAuthenticationRefs": [{"kind": "Secret", "name": "x"}],
            }))),
            "spec.requiredAuthenticationRefs[0].kind"
        );

        let mtls = |spec| policy("MeshTLSAuthentication", spec);
        assert!(
            validate(&mtls(
                json!({"identities": ["*", "spiffe://cluster.local/ns/a/*"]})
            ))
            .is_ok()
        );
        assert_eq!(field(&mtls(json!({}))), "spec.identities");
        assert_eq!(
            field(&mtls(json!({"identities": ["web"]}))),
            "spec.identities[0]"
        );
        assert_eq!(
            field(&mtls(
                json!({"identityRefs": [{"kind": "User", "name": "x"}]})
            )),
            "spec.identityRefs[0].kind"
        );

        let net = |spec| policy("NetworkAuthentication", spec);
        assert!(validate(&net(json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}, {"cidr": "::1"}]}))).is_ok());
        assert_eq!(field(&net(json!({"networks": []}))), "spec.networks");
        assert_eq!(
            field(&net(json!({"networks": [{"cidr": "10.0.0.0/33"}]}))),
            "spec.networks[0].cidr"
        );
        let e = validate(&net(
            json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]}),
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("spec.networks[0].except[0]"));
        assert!(
            e.to_string()
                .contains("192.168.0.0/16 is not inside 10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn good_documents_pass() {
        assert!(matches!(
            validate(&mk_route(json!([90, 10]))),
            Ok(Validated::HttpRoute(_))
        ));
        let c =
            mk_canary(json!({"interval": "1m", "threshold": 5, "maxWeight": 50, "stepWeight": 10}));
        assert!(matches!(validate(&c), Ok(Validated::Canary(_))));
    }

    #[test]
    fn weights_must_be_non_negative_integers() {
        assert_eq!(
            field(&mk_route(json!([90, -1]))),
            "spec.rules[0].backendRefs[1].weight"
        );
        assert_eq!(
            field(&mk_route(json!([90, "ten"]))),
            "spec.rules[0].backendRefs[1].weight"
        );
        assert_eq!(
            field(&mk_route(json!([1.5, 10]))),
            "spec.rules[0].backendRefs[0].weight"
        );
    }

    #[test]
    fn routes_need_a_parent() {
        let mut r = mk_route(json!([1, 1]));
        r["spec"].as_object_mut().unwrap().remove("parentRefs");
        assert_eq!(field(&r), "spec.parentRefs");
    }

    #[test]
    fn missing_fields_are_named() {
        let mut c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 10}));
        c["spec"].as_object_mut().unwrap().remove("targetRef");
        assert_eq!(field(&c), "spec.targetRef");
        let c = mk_canary(json!({"threshold": 5, "stepWeight": 10}));
        assert_eq!(field(&c), "spec.analysis.interval");
        let mut c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 10}));
        c["metadata"].as_object_mut().unwrap().remove("name");
        assert_eq!(field(&c), "metadata.name");
    }

    #[test]
    fn cel_rules_are_enforced() {
        let c =
            mk_canary(json!({"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeight": 30}));
        let err = validate(&c).unwrap_err();
        assert_eq!(err.field(), Some("spec.analysis.stepWeight"));
        assert!(err.to_string().contains("maxWeight"), "{err}");
        let c = mk_canary(
            json!({"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeights": [10, 30]}),
        );
        assert_eq!(field(&c), "spec.analysis.stepWeights[1]");
        let c = mk_canary(json!({"interval": "1m", "threshold": 5}));
        assert_eq!(field(&c), "spec.analysis");
        let c = mk_canary(json!({"interval": "soon", "threshold": 5, "stepWeight": 5}));
        assert_eq!(field(&c), "spec.analysis.interval");
        let c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 5,
            "metrics": [{"name": "error-budget"}]}));
        assert_eq!(field(&c), "spec.analysis.metrics[0].templateRef");
    }

    #[test]
    fn only_confirm_hooks_may_leave_out_the_url() {
        let with_hooks = |hooks: Value| {
            mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 5,
                "webhooks": hooks}))
        };
        for kind in [
            "confirm-rollout",
            "confirm-traffic-increase",
            "confirm-promotion",
        ] {
            let c = with_hooks(json!([{"name": "approval", "type": kind}]));
            assert!(validate(&c).is_ok(), "{kind}: {:?}", validate(&c).err());
        }
        let c = with_hooks(json!([
            {"name": "approval", "type": "confirm-promotion"},
            {"name": "smoke", "type": "pre-rollout"}
        ]));
        let err = validate(&c).unwrap_err();
        assert_eq!(err.field(), Some("spec.analysis.webhooks[1].url"));
        let text = err.to_string();
        assert!(
            text.contains("url is required") && text.contains("\"smoke\" is of type pre-rollout"),
            "{text}"
        );
        // No type is Flagger's `rollout`, which needs somewhere to call.
        let c = with_hooks(json!([{"name": "load"}]));
        assert_eq!(field(&c), "spec.analysis.webhooks[0].url");
        assert!(
            validate(&c)
                .unwrap_err()
                .to_string()
                .contains("of type rollout")
        );
        // A url, when given, is still checked.
        let c = with_hooks(json!([{"name": "approval", "type": "confirm-promotion",
            "url": "loadtester/gate"}]));
        assert_eq!(field(&c), "spec.analysis.webhooks[0].url");
    }

    #[test]
    fn unknown_kinds_and_bad_names_are_rejected() {
        let err = validate(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}))
            .unwrap_err();
        assert!(matches!(err, ValidationError::UnknownKind { .. }), "{err}");
        let mut r = mk_route(json!([1, 1]));
        r["metadata"]["name"] = json!("a/b");
        assert_eq!(field(&r), "metadata.name");
        assert_eq!(
            validate(&json!({"kind": "Canary"})).unwrap_err(),
            ValidationError::MissingType("apiVersion")
        );
    }
}
