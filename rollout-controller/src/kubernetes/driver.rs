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

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use mesh_crds::{Canary, CanaryStatus, HttpRoute, MetricTemplate};
use serde_json::{Value, json};

use crate::controller::{Driver, TargetState};
use crate::error::DriverError;
use crate::machine::Action;
use crate::owned::{self, Names};

/// The field manager of every server-side apply the rollout controller makes.
pub const FIELD_MANAGER: &str = "mesh-rollout";

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

/// The Kubernetes driver. Cheap to build: it is a client (and the Event recorder) and nothing
/// else, so a reconcile can make one and every bit of state stays in the cluster.
#[derive(Clone)]
pub struct KubeDriver {
    client: Client,
    recorder: Option<Recorder>,
}

impl std::fmt::Debug for KubeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDriver").finish_non_exhaustive()
    }
}

fn kube_err(what: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> DriverError {
    move |e| DriverError::kube(what, &e)
}

impl KubeDriver {
    /// A driver acting through `client`; it publishes no Events.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            recorder: None,
        }
    }

    /// A driver that also publishes each history entry as a Kubernetes Event through
    /// `recorder`.
    pub fn with_recorder(client: Client, recorder: Recorder) -> Self {
        Self {
            client,
            recorder: Some(recorder),
        }
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
                DriverError::not_found(format!(
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
            return Err(DriverError::new(
                crate::error::ErrorKind::Conflict,
                format!(
                    "Deployment {}/{} moved from revision {revision} to {current}; not copying",
                    names.namespace, names.target
                ),
            ));
        }
        let primary = self.primary(&names).await?;
        let replicas = Self::primary_replicas(primary.as_ref(), &target);
        let object = owned::primary_deployment(canary, &target, revision, replicas)?;
        self.apply::<Deployment>(&names.namespace, &names.primary, &object)
            .await
    }

    async fn ensure_services(&self, canary: &Canary) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let target = self.target(&names).await?;
        let selector = owned::selector_labels(&target, &names.target)?;
        let primary = owned::primary_labels(&selector);
        for (name, sel) in [
            (&names.service, &primary),
            (&names.service_primary, &primary),
            (&names.service_canary, &selector),
        ] {
            let object = owned::service(canary, name, sel)?;
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
        let route = owned::canary_route(canary, canary.spec.service.port, primary, canary_weight);
        let object = owned::owned_by(route, &owned::owner(canary)?);
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
            // The controller loop turns these into webhook calls and history entries, and
            // `publish` into Kubernetes Events.
            Action::Notify(_) | Action::Event { .. } => Ok(()),
        }
    }

    async fn write_status(
        &mut self,
        canary: &Canary,
        status: &CanaryStatus,
    ) -> Result<(), DriverError> {
        let names = Names::of(canary);
        let status = serde_json::to_value(status).map_err(|e| {
            DriverError::invalid(format!(
                "serializing the status of Canary {}/{}: {e}",
                names.namespace,
                canary.name_any()
            ))
        })?;
        // The whole status, every time, under one field manager: fields the machine cleared
        // disappear instead of lingering from an older apply.
        let patch = json!({
            "apiVersion": Canary::api_version(&()),
            "kind": Canary::kind(&()),
            "metadata": {"name": canary.name_any()},
            "status": status,
        });
        Api::<Canary>::namespaced(self.client.clone(), &names.namespace)
            .patch_status(
                &canary.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(kube_err(format!(
                "writing the status of Canary {}/{}",
                names.namespace,
                canary.name_any()
            )))?;
        Ok(())
    }

    async fn publish(&mut self, canary: &Canary, events: &[&Action]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let reference = canary.object_ref(&());
        for action in events {
            let Action::Event {
                reason,
                message,
                warning,
            } = action
            else {
                continue;
            };
            let event = Event {
                type_: if *warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: (*reason).to_string(),
                note: Some(message.chars().take(1000).collect()),
                action: "Rollout".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(
                    canary = %format!("{}/{}", canary.namespace().unwrap_or_default(), canary.name_any()),
                    error = %e,
                    "publishing an Event failed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
