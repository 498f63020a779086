//! The names and objects a Canary owns, built in one place for both drivers, the CLI and the
//! simulator: `<target>-primary`, the Services `<svc>`, `<svc>-primary` and `<svc>-canary`, and
//! the HTTPRoute `<svc>` whose weights split traffic between the two arms (with the Canary's
//! request timeout). Everything here is pure: objects are returned as JSON for a server-side
//! apply (Kubernetes) or a store apply (embedded), never sent.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_crds::{Canary, HttpRoute};
use serde_json::{Value, json};

use crate::error::DriverError;

/// Label on every object the rollout controller creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "mesh");
/// Annotation on the primary Deployment naming the revision its template came from.
pub const REVISION_ANNOTATION: &str = "rollouts.mesh.dev/revision";

/// One of the two arms a rollout splits traffic between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arm {
    /// The stable version, which serves traffic outside a rollout.
    Primary,
    /// The new version under analysis.
    Canary,
}

impl Arm {
    /// The suffix of the arm's backend service (`<svc>-primary`, `<svc>-canary`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Canary => "canary",
        }
    }

    /// The arm's backend service of `service`.
    pub fn service(self, service: &str) -> String {
        format!("{service}-{}", self.suffix())
    }
}

/// The names a Canary's objects get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Namespace of everything.
    pub namespace: String,
    /// The target (a Deployment in a cluster, a Workload in the embedded mesh): the canary.
    pub target: String,
    /// The primary Deployment, `<target>-primary`.
    pub primary: String,
    /// The apex Service and the HTTPRoute, `spec.service.name` or the target's name.
    pub service: String,
    /// `<svc>-primary`.
    pub service_primary: String,
    /// `<svc>-canary`.
    pub service_canary: String,
}

impl Names {
    /// The names for `canary`.
    pub fn of(canary: &Canary) -> Self {
        let target = canary.spec.target_ref.name.clone();
        let service = canary
            .spec
            .service
            .name
            .clone()
            .unwrap_or_else(|| target.clone());
        Self::new(
            canary.metadata.namespace.as_deref().unwrap_or_default(),
            &target,
            &service,
        )
    }

    /// The names for a target serving as `service` in `namespace`.
    pub fn new(namespace: &str, target: &str, service: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            target: target.to_string(),
            primary: format!("{target}-primary"),
            service: service.to_string(),
            service_primary: Arm::Primary.service(service),
            service_canary: Arm::Canary.service(service),
        }
    }
}

/// The HTTPRoute `<svc>` that splits traffic between `<svc>-primary` and `<svc>-canary`, with
/// a parentRef to the Service `<svc>` (GAMMA) and, when set, the Canary's request timeout
/// (`spec.service.timeout`) on its rule.
pub fn route(names: &Names, port: i32, timeout: Option<&str>, primary: i32, canary: i32) -> Value {
    let mut rule = json!({"backendRefs": [
        {"group": "", "kind": "Service", "name": names.service_primary, "port": port, "weight": primary},
        {"group": "", "kind": "Service", "name": names.service_canary, "port": port, "weight": canary},
    ]});
    if let Some(timeout) = timeout {
        rule["timeouts"] = json!({"request": timeout});
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": names.service,
            "namespace": names.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": names.service, "port": port}],
            "rules": [rule],
        },
    })
}

/// The route of `canary` at the given weights, on its service port.
pub fn canary_route(canary: &Canary, port: i32, primary: i32, canary_weight: i32) -> Value {
    route(
        &Names::of(canary),
        port,
        canary.spec.service.timeout.as_deref(),
        primary,
        canary_weight,
    )
}

/// The (primary, canary) weights of a route built by [`route`], if it has that shape.
pub fn route_weights(route: &HttpRoute) -> Option<(i32, i32)> {
    let refs = route.spec.rules.as_ref()?.first()?.backend_refs.as_ref()?;
    let weight = |arm: Arm| {
        let suffix = format!("-{}", arm.suffix());
        refs.iter()
            .find(|b| b.name.ends_with(&suffix))
            .map(|b| b.weight.unwrap_or(1))
    };
    Some((weight(Arm::Primary)?, weight(Arm::Canary)?))
}

/// Sets `object`'s owner to `owner`, so Kubernetes deletes it with the Canary.
pub fn owned_by(mut object: Value, owner: &OwnerReference) -> Value {
    object["metadata"]["ownerReferences"] = json!([owner]);
    object
}

/// The Canary as the controlling owner of what it creates; it must come from the apiserver
/// (it needs a uid).
pub fn owner(canary: &Canary) -> Result<OwnerReference, DriverError> {
    use kube::Resource;
    let mut r = canary.controller_owner_ref(&()).ok_or_else(|| {
        DriverError::invalid("the Canary has no name or uid yet; it must come from the apiserver")
    })?;
    r.block_owner_deletion = Some(true);
    Ok(r)
}

/// The target's selector labels, which the primary rewrites to `<value>-primary`.
pub fn selector_labels(
    target: &Deployment,
    name: &str,
) -> Result<BTreeMap<String, String>, DriverError> {
    target
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| {
            DriverError::invalid(format!(
                "Deployment {name:?}: spec.selector.matchLabels is required (matchExpressions \
                 cannot be rewritten for the primary)"
            ))
        })
}

/// The primary's selector: each of the target's selector values with `-primary` appended, so
/// primary and canary pods never select each other.
pub fn primary_labels(selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    selector
        .iter()
        .map(|(k, v)| (k.clone(), Arm::Primary.service(v)))
        .collect()
}

/// The primary Deployment: the target's pod template with its selector labels rewritten.
pub fn primary_deployment(
    canary: &Canary,
    target: &Deployment,
    revision: &str,
    replicas: i32,
) -> Result<Value, DriverError> {
    let names = Names::of(canary);
    let selector = selector_labels(target, &names.target)?;
    let primary_selector = primary_labels(&selector);
    let template = target
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut template = serde_json::to_value(&template)
        .map_err(|e| DriverError::invalid(format!("Deployment {:?}: {e}", names.target)))?;
    let mut labels = template
        .pointer("/metadata/labels")
        .and_then(|l| serde_json::from_value::<BTreeMap<String, String>>(l.clone()).ok())
        .unwrap_or_default();
    labels.extend(primary_selector.clone());
    template["metadata"]["labels"] = json!(labels);
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": names.primary,
            "namespace": names.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
            "annotations": {REVISION_ANNOTATION: revision},
            "ownerReferences": [owner(canary)?],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": primary_selector},
            "template": template,
        },
    }))
}

/// One of the three Services, selecting `selector`.
pub fn service(
    canary: &Canary,
    name: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Value, DriverError> {
    let s = &canary.spec.service;
    let target_port = s.target_port.clone().unwrap_or(IntOrString::Int(s.port));
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": canary.metadata.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
            "ownerReferences": [owner(canary)?],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{
                "name": s.port_name.clone().unwrap_or_else(|| "http".into()),
                "port": s.port,
                "targetPort": target_port,
                "protocol": "TCP",
            }],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_canary(service: Option<&str>, timeout: Option<&str>) -> Canary {
        serde_json::from_value(json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "service": {"port": 8080, "name": service, "timeout": timeout},
                "analysis": {"interval": "1m", "threshold": 2, "stepWeight": 10},
            },
        }))
        .unwrap()
    }

    #[test]
    fn names_follow_the_service_or_the_target() {
        let n = Names::of(&mk_canary(None, None));
        assert_eq!(
            (n.primary.as_str(), n.service.as_str()),
            ("web-primary", "web")
        );
        assert_eq!(
            (n.service_primary.as_str(), n.service_canary.as_str()),
            ("web-primary", "web-canary")
        );
        let n = Names::of(&mk_canary(Some("frontend"), None));
        assert_eq!(n.primary, "web-primary", "the primary follows the target");
        assert_eq!(n.service_canary, "frontend-canary");
        assert_eq!(n.namespace, "shop");
    }

    #[test]
    fn the_route_carries_weights_and_the_canary_timeout() {
        let c = mk_canary(None, Some("2s"));
        let r = canary_route(&c, 8080, 90, 10);
        assert_eq!(r["metadata"]["name"], "web");
        assert_eq!(r["spec"]["rules"][0]["timeouts"]["request"], "2s");
        let typed: HttpRoute = serde_json::from_value(r).unwrap();
        assert_eq!(route_weights(&typed), Some((90, 10)));
        let r = canary_route(&mk_canary(None, None), 8080, 100, 0);
        assert!(r["spec"]["rules"][0].get("timeouts").is_none());
    }
}
