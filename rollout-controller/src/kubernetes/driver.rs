//! [`KubeDriver`]: the rollout controller's hands in a Kubernetes cluster, in Flagger's model.
//!
//! The Deployment named by `spec.targetRef` is the canary: users change its pod template as
//! they always have. The driver owns, through ownerReferences to the Canary:
//! - the `<target>-primary` Deployment, a copy of the target's pod template whose selector
//!   labels are rewritten to `<value>-primary`, so primary and canary pods never select each
//!   other;
//! - the Services `<svc>` (the apex, selecting the primary pods), `<svc>-primary` and
//!   `<svc>-canary` (the target's own pods);
//! - the HTTPRoute `<svc>`, with a parentRef to the Service `<svc>` (GAMMA) and backendRefs
//!   `<svc>-primary` / `<svc>-canary` carrying the weights.
//!
//! Every write is a server-side apply under the field manager [`FIELD_MANAGER`] carrying the
//! whole object the driver wants, so repeating an action is a no-op and a crash between an action
//! and the status write is harmless. Scaling the target goes through its `scale` subresource, so
//! the driver never takes ownership of the user's Deployment spec.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use mesh_crds::{Canary, HttpRoute, MetricTemplate};
use serde_json::{Value, json};

use crate::controller::{Driver, DriverError, TargetState};
use crate::machine::Action;

/// The field manager of every server-side apply the rollout controller makes.
pub const FIELD_MANAGER: &str = "mesh-rollout";
/// Annotation on the primary Deployment naming the revision its template came from.
pub const REVISION_ANNOTATION: &str = "rollouts.mesh.dev/revision";
/// Label on every object the driver creates.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "mesh");

/// The revision of a pod template: 16 hex digits of the 64-bit FNV-1a hash of the template's
/// JSON form with object keys sorted (serde_json's default map is ordered). The same template
/// always hashes the same, in any process and on any platform, so a restarted controller
/// recognises the revision it stored in `status.lastAppliedSpec`.
pub fn template_revision(template: &PodTemplateSpec) -> String {
    // Serializing a PodTemplateSpec to a Value cannot fail: it has no maps with non-string keys.
    let canonical = serde_json::to_value(template)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Whether a Deployment has rolled out its current spec: the Deployment controller (the kubelet
/// stand-in in tests) has observed the latest generation, every replica runs the current
/// template, none of the old ones is left, and all are available.
pub fn deployment_ready(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = d.status.as_ref() else {
        return false;
    };
    let generation = d.metadata.generation.unwrap_or(0);
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= want
        && status.available_replicas.unwrap_or(0) >= want
        && status.replicas.unwrap_or(0) <= want
}

/// The names a Canary's objects get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Namespace of everything.
    pub namespace: String,
    /// The target Deployment (the canary).
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
        Self {
            namespace: canary.metadata.namespace.clone().unwrap_or_default(),
            primary: format!("{target}-primary"),
            service_primary: format!("{service}-primary"),
            service_canary: format!("{service}-canary"),
            target,
            service,
        }
    }
}

fn owner(canary: &Canary) -> Result<OwnerReference, DriverError> {
    let mut r = canary.controller_owner_ref(&()).ok_or_else(|| {
        DriverError("the Canary has no name or uid yet; it must come from the apiserver".into())
    })?;
    r.block_owner_deletion = Some(true);
    Ok(r)
}

/// The target's selector labels, which the primary rewrites to `<value>-primary`.
fn selector_labels(
    target: &Deployment,
    name: &str,
) -> Result<BTreeMap<String, String>, DriverError> {
    target
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| {
            DriverError(format!(
                "Deployment {name:?}: spec.selector.matchLabels is required (matchExpressions \
                 cannot be rewritten for the primary)"
            ))
        })
}

fn primary_labels(selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    selector
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v}-primary")))
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
        .map_err(|e| DriverError(format!("Deployment {:?}: {e}", names.target)))?;
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

/// One of the three Services.
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

/// The HTTPRoute splitting `<svc>` between `<svc>-primary` and `<svc>-canary`.
pub fn route(canary: &Canary, primary: i32, canary_weight: i32) -> Result<Value, DriverError> {
    let names = Names::of(canary);
    let port = canary.spec.service.port;
    let mut rule = json!({"backendRefs": [
        {"group": "", "kind": "Service", "name": names.service_primary, "port": port, "weight": primary},
        {"group": "", "kind": "Service", "name": names.service_canary, "port": port, "weight": canary_weight},
    ]});
    if let Some(timeout) = &canary.spec.service.timeout {
        rule["timeouts"] = json!({"request": timeout});
    }
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": names.service,
            "namespace": names.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1},
            "ownerReferences": [owner(canary)?],
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": names.service, "port": port}],
            "rules": [rule],
        },
    }))
}

/// The (primary, canary) weights of a route the driver wrote, if it has that shape.
pub fn route_weights(route: &HttpRoute) -> Option<(i32, i32)> {
    let refs = route.spec.rules.as_ref()?.first()?.backend_refs.as_ref()?;
    let weight = |suffix: &str| {
        refs.iter()
            .find(|b| b.name.ends_with(suffix))
            .map(|b| b.weight.unwrap_or(1))
    };
    Some((weight("-primary")?, weight("-canary")?))
}

/// The Kubernetes driver. Cheap to build: it is a client and nothing else, so a reconcile can
/// make one and every bit of state stays in the cluster.
#[derive(Clone)]
pub struct KubeDriver {
    client: Client,
}

impl std::fmt::Debug for KubeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDriver").finish_non_exhaustive()
    }
}

fn kube_err(what: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> DriverError {
    move |e| DriverError(format!("{what}: {e}"))
}

impl KubeDriver {
    /// A driver acting through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn deployments(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn target(&self, names: &Names) -> Result<Deployment, DriverError> {
        self.deployments(&names.namespace)
            .get_opt(&names.target)
            .await
            .map_err(kube_err(format!(
                "reading Deployment {}/{}",
                names.namespace, names.target
            )))?
            .ok_or_else(|| {
                DriverError(format!(
                    "targetRef: no Deployment {:?} in namespace {:?}",
                    names.target, names.namespace
                ))
            })
    }

    async fn primary(&self, names: &Names) -> Result<Option<Deployment>, DriverError> {
        self.deployments(&names.namespace)
            .get_opt(&names.primary)
            .await
            .map_err(kube_err(format!(
                "reading Deployment {}/{}",
                names.namespace, names.primary
            )))
    }

    async fn apply<K>(&self, ns: &str, name: &str, object: &Value) -> Result<(), DriverError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(kube_err(format!("applying {} {ns}/{name}", K::kind(&()))))?;
        Ok(())
    }

    async fn scale_target(&self, names: &Names, replicas: i32) -> Result<(), DriverError> {
        self.deployments(&names.namespace)
            .patch_scale(
                &names.target,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .map_err(kube_err(format!(
                "scaling Deployment {}/{} to {replicas}",
                names.namespace, names.target
            )))?;
        Ok(())
    }

    /// How many replicas the primary runs: what it runs now, else what the target asked for.
    fn primary_replicas(primary: Option<&Deployment>, target: &Deployment) -> i32 {
        let of = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
        primary
            .and_then(of)
            .or_else(|| of(target))
            .filter(|r| *r > 0)
            .unwrap_or(1)
    }

    /// Applies the primary Deployment with the target's current template, checking that it is
    /// still the revision the machine decided on.
    async fn copy_to_primary(&self, canary: &Canary, revision: &str) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let target = self.target(&names).await?;
        let current = template_revision(&target.spec.clone().unwrap_or_default().template);
        if current != revision {
            // The user changed the target again; the next reconcile sees the new revision.
            return Err(DriverError(format!(
                "Deployment {}/{} moved from revision {revision} to {current}; not copying",
                names.namespace, names.target
            )));
        }
        let primary = self.primary(&names).await?;
        let replicas = Self::primary_replicas(primary.as_ref(), &target);
        let object = primary_deployment(canary, &target, revision, replicas)?;
        self.apply::<Deployment>(&names.namespace, &names.primary, &object)
            .await
    }

    async fn ensure_services(&self, canary: &Canary) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let target = self.target(&names).await?;
        let selector = selector_labels(&target, &names.target)?;
        let primary = primary_labels(&selector);
        for (name, sel) in [
            (&names.service, &primary),
            (&names.service_primary, &primary),
            (&names.service_canary, &selector),
        ] {
            let object = service(canary, name, sel)?;
            self.apply::<k8s_openapi::api::core::v1::Service>(&names.namespace, name, &object)
                .await?;
        }
        Ok(())
    }

    /// Writes the route's weights.
    pub async fn set_weights(
        &self,
        canary: &Canary,
        primary: i32,
        canary_weight: i32,
    ) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let object = route(canary, primary, canary_weight)?;
        self.apply::<HttpRoute>(&names.namespace, &names.service, &object)
            .await
    }

    /// What a deleted Canary leaves behind: all traffic on the primary, or, with
    /// `revertOnDeletion`, the target scaled back up and all traffic on it.
    pub async fn release(&self, canary: &Canary) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let routes: Api<HttpRoute> = Api::namespaced(self.client.clone(), &names.namespace);
        let route = routes
            .get_opt(&names.service)
            .await
            .map_err(kube_err(format!(
                "reading HTTPRoute {}/{}",
                names.namespace, names.service
            )))?;
        if canary.spec.revert_on_deletion {
            let target = self.target(&names).await?;
            let primary = self.primary(&names).await?;
            self.scale_target(&names, Self::primary_replicas(primary.as_ref(), &target))
                .await?;
            if route.is_some() {
                self.set_weights(canary, 0, 100).await?;
            }
        } else if route.is_some() {
            self.set_weights(canary, 100, 0).await?;
        }
        Ok(())
    }
}

impl Driver for KubeDriver {
    async fn metric_template(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<MetricTemplate>, DriverError> {
        Api::<MetricTemplate>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(kube_err(format!(
                "reading MetricTemplate {namespace}/{name}"
            )))
    }

    async fn observe(&mut self, canary: &Canary) -> Result<TargetState, DriverError> {
        let names = Names::of(canary);
        let target = self.target(&names).await?;
        let spec = target.spec.clone().unwrap_or_default();
        let primary = self.primary(&names).await?;
        Ok(TargetState {
            revision: template_revision(&spec.template),
            primary_ready: primary.as_ref().is_some_and(deployment_ready),
            canary_ready: spec.replicas.unwrap_or(1) > 0 && deployment_ready(&target),
        })
    }

    async fn act(
        &mut self,
        canary: &Canary,
        revision: &str,
        action: &Action,
    ) -> Result<(), DriverError> {
        let names = Names::of(canary);
        match action {
            Action::InitializePrimary => {
                // Only the Initializing phase asks for this, when the primary should run what
                // the target runs; an existing primary keeps its replica count.
                self.copy_to_primary(canary, revision).await?;
                self.ensure_services(canary).await
            }
            Action::Promote => self.copy_to_primary(canary, revision).await,
            Action::SetWeights { primary, canary: c } => {
                // Services first: a route to a missing backend would drop traffic.
                self.ensure_services(canary).await?;
                self.set_weights(canary, *primary, *c).await
            }
            Action::ScaleCanaryUp => {
                let target = self.target(&names).await?;
                let primary = self.primary(&names).await?;
                self.scale_target(&names, Self::primary_replicas(primary.as_ref(), &target))
                    .await
            }
            Action::ScaleCanaryDown => self.scale_target(&names, 0).await,
            // The controller loop turns these into Kubernetes Events and webhook calls.
            Action::Notify(_) | Action::Event { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn mk_template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".into(), "podinfo".into())])),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        }
    }

    #[test]
    fn revision_is_stable_and_follows_the_template() {
        let a = template_revision(&mk_template("podinfo:1"));
        assert_eq!(a, template_revision(&mk_template("podinfo:1")));
        assert_eq!(a.len(), 16);
        assert_ne!(a, template_revision(&mk_template("podinfo:2")));
        // Pinned: a change of hash function or serialization would make every controller
        // upgrade look like a new revision of every Canary.
        assert_eq!(
            template_revision(&PodTemplateSpec::default()),
            "08f44b07b5901a25",
            "the revision of an empty template changed"
        );
    }

    #[test]
    fn readiness_needs_the_latest_generation_fully_available() {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "x", "generation": 2},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2},
        }))
        .unwrap();
        assert!(!deployment_ready(&d), "old generation");
        d.status.as_mut().unwrap().observed_generation = Some(2);
        assert!(deployment_ready(&d));
        d.status.as_mut().unwrap().available_replicas = Some(1);
        assert!(!deployment_ready(&d), "one replica unavailable");
        d.status.as_mut().unwrap().available_replicas = Some(2);
        d.status.as_mut().unwrap().replicas = Some(3);
        assert!(!deployment_ready(&d), "an old pod is still there");
    }
}
