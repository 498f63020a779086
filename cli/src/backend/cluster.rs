//! A Kubernetes cluster through kube: mesh resources as dynamic objects, addressed by
//! [`ResourceKind`]'s group, version and plural, as kubectl addresses them.
//!
//! An apply validates every document here first, with the same field-level rules the embedded
//! control plane applies (`mesh_crds::validate`), so a malformed batch is refused with the same
//! error before anything is written; then each object is server-side applied under one field
//! manager, leaving `status` to the controllers. `Workload` exists only in the embedded mesh and
//! is refused by name.

use anyhow::{Context, anyhow};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind, Status},
};
use mesh_crds::validate::{self, ResourceKind, ValidationError};
use serde_json::{Value, json};

use super::common::{Applied, ApplyError, Refused};

/// The field manager of `mesh apply`'s server-side applies.
const FIELD_MANAGER: &str = "mesh";

/// What the apiserver says when it serves the group but no such resource. For a group it does
/// not serve at all it answers a plain-text `404 page not found`, which is no `NotFound` Status.
const NOT_SERVED: &str = "the server could not find the requested resource";

/// Why `Workload` is refused in a cluster.
const NO_WORKLOADS: &str =
    "Workload exists only in the embedded mesh; in a cluster, a Canary targets a Deployment";

/// A cluster, in one namespace.
pub struct Cluster {
    client: Client,
    url: String,
    namespace: String,
}

fn api_resource(kind: ResourceKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

/// The object as the embedded API shows it: with its type, without the apiserver's
/// bookkeeping of field managers (which kubectl hides too).
fn to_value(kind: ResourceKind, object: &DynamicObject) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(object).context("reading the cluster's answer")?;
    value["apiVersion"] = kind.api_version().into();
    value["kind"] = kind.kind().into();
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Ok(value)
}

impl Cluster {
    /// A client of the cluster `config` describes.
    pub fn new(config: kube::Config, namespace: &str) -> anyhow::Result<Self> {
        let url = config.cluster_url.to_string();
        let client = Client::try_from(config)
            .with_context(|| format!("building a client of the Kubernetes API at {url}"))?;
        Ok(Self {
            client,
            url,
            namespace: namespace.to_string(),
        })
    }

    /// The namespace the commands work in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn api(&self, kind: ResourceKind, namespace: &str) -> anyhow::Result<Api<DynamicObject>> {
        if kind == ResourceKind::Workload {
            anyhow::bail!("{NO_WORKLOADS}");
        }
        Ok(Api::namespaced_with(
            self.client.clone(),
            namespace,
            &api_resource(kind),
        ))
    }

    /// `e` as the commands report it: the apiserver's `Status` as a [`Refused`], a resource it
    /// does not serve by name, anything else as the cluster being out of reach.
    fn error(&self, kind: ResourceKind, e: kube::Error) -> anyhow::Error {
        match e {
            kube::Error::Api(status)
                if status.code == 404
                    && (status.message == NOT_SERVED || status.reason != "NotFound") =>
            {
                anyhow!(
                    "the cluster does not serve {}.{}: install the mesh's CRDs first (`mesh \
                     install --crds | kubectl apply -f -`)",
                    kind.plural(),
                    kind.group()
                )
            }
            kube::Error::Api(status) => refused(&status).into(),
            e => anyhow::Error::new(e)
                .context(format!("cannot reach the Kubernetes API at {}", self.url)),
        }
    }

    /// One object; a [`Refused`] with code 404 when there is none.
    pub async fn get(&self, kind: ResourceKind, name: &str) -> anyhow::Result<Value> {
        let object = self
            .api(kind, &self.namespace)?
            .get(name)
            .await
            .map_err(|e| self.error(kind, e))?;
        to_value(kind, &object)
    }

    /// Every object of `kind` in the namespace, as a `<Kind>List`.
    pub async fn list(&self, kind: ResourceKind) -> anyhow::Result<Value> {
        let list = self
            .api(kind, &self.namespace)?
            .list(&ListParams::default())
            .await
            .map_err(|e| self.error(kind, e))?;
        let items = list
            .items
            .iter()
            .map(|o| to_value(kind, o))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": {"resourceVersion": list.metadata.resource_version.unwrap_or_default()},
            "items": items,
        }))
    }

    /// Deletes one object.
    pub async fn delete(&self, kind: ResourceKind, name: &str) -> anyhow::Result<()> {
        self.api(kind, &self.namespace)?
            .delete(name, &DeleteParams::default())
            .await
            .map(drop)
            .map_err(|e| self.error(kind, e))
    }

    /// Validates every document, then server-side applies them one by one.
    pub async fn apply(&self, documents: Vec<Value>) -> Result<Vec<Applied>, ApplyError> {
        let mut checked = Vec::with_capacity(documents.len());
        for (index, mut object) in documents.into_iter().enumerate() {
            fill_namespace(&mut object, &self.namespace);
            let invalid = |e: ValidationError| ApplyError::Document {
                index,
                field: e.field().map(str::to_string),
                message: e.to_string(),
                applied: Vec::new(),
            };
            let kind = validate::kind_of(&object).map_err(invalid)?;
            if kind == ResourceKind::Workload {
                return Err(ApplyError::Document {
                    index,
                    field: Some("kind".into()),
                    message: NO_WORKLOADS.into(),
                    applied: Vec::new(),
                });
            }
            validate::validate(&object).map_err(invalid)?;
            // Status belongs to the controllers (the status subresource).
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
            checked.push((kind, object));
        }
        let mut applied = Vec::with_capacity(checked.len());
        for (index, (kind, object)) in checked.into_iter().enumerate() {
            match self.apply_one(kind, &object).await {
                Ok(a) => applied.push(a),
                Err((field, e)) => {
                    return Err(ApplyError::Document {
                        index,
                        field,
                        message: match e.downcast::<Refused>() {
                            Ok(r) => r.message,
                            Err(e) => format!("{e:#}"),
                        },
                        applied,
                    });
                }
            }
        }
        Ok(applied)
    }

    /// One server-side apply; on failure, the field the apiserver named, if any.
    async fn apply_one(
        &self,
        kind: ResourceKind,
        object: &Value,
    ) -> Result<Applied, (Option<String>, anyhow::Error)> {
        let field = |f: &str| {
            object
                .pointer(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let (namespace, name) = (field("/metadata/namespace"), field("/metadata/name"));
        let api = self.api(kind, namespace).map_err(|e| (None, e))?;
        let before = api
            .get_opt(name)
            .await
            .map_err(|e| (None, self.error(kind, e)))?;
        let stored = api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(|e| {
                let field = match &e {
                    kube::Error::Api(status) => status
                        .details
                        .as_ref()
                        .and_then(|d| d.causes.first())
                        .map(|c| c.field.clone())
                        .filter(|f| !f.is_empty()),
                    _ => None,
                };
                (field, self.error(kind, e))
            })?;
        let action = match before {
            None => "created",
            Some(old) if old.metadata.resource_version == stored.metadata.resource_version => {
                "unchanged"
            }
            Some(_) => "configured",
        };
        Ok(Applied {
            action: action.into(),
            object: to_value(kind, &stored).map_err(|e| (None, e))?,
        })
    }

    /// A JSON merge patch of the object; the apiserver leaves status alone, which only the
    /// status subresource changes.
    pub async fn merge_patch(
        &self,
        kind: ResourceKind,
        name: &str,
        patch: &Value,
    ) -> anyhow::Result<Value> {
        let object = self
            .api(kind, &self.namespace)?
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| self.error(kind, e))?;
        to_value(kind, &object)
    }

    /// The revision the target Deployment's pod template asks for, as the Kubernetes driver
    /// computes it.
    pub async fn deployment_revision(&self, name: &str) -> Option<String> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let template = deployments.get_opt(name).await.ok()??.spec?.template;
        Some(mesh_rollout_controller::kubernetes::driver::template_revision(&template))
    }
}

/// A document without a namespace goes to the one the command works in, as with kubectl.
fn fill_namespace(object: &mut Value, namespace: &str) {
    if let Some(Value::Object(meta)) = object.get_mut("metadata")
        && meta.get("namespace").is_none_or(|n| n.is_null() || n == "")
    {
        meta.insert("namespace".into(), namespace.into());
    }
}

fn refused(status: &Status) -> Refused {
    Refused {
        code: status.code,
        reason: if status.reason.is_empty() {
            "Error".into()
        } else {
            status.reason.clone()
        },
        message: status.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_read_as_the_embedded_api_shows_them() {
        let object: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "managedFields": [{"manager": "mesh", "operation": "Apply"}]},
            "spec": {"service": {"port": 80}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let value = to_value(ResourceKind::Canary, &object).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value["apiVersion"], "rollouts.mesh.dev/v1alpha1");
        assert_eq!(value["kind"], "Canary");
        assert_eq!(value["metadata"]["name"], "web");
        assert!(value["metadata"]["managedFields"].is_null(), "{value}");
        assert_eq!(value["spec"]["service"]["port"], 80);
    }

    #[test]
    fn documents_without_a_namespace_go_to_the_commands_one() {
        let mut bare = json!({"metadata": {"name": "a"}});
        let mut empty = json!({"metadata": {"name": "b", "namespace": ""}});
        let mut own = json!({"metadata": {"name": "c", "namespace": "prod"}});
        for doc in [&mut bare, &mut empty, &mut own] {
            fill_namespace(doc, "shop");
        }
        assert_eq!(bare["metadata"]["namespace"], "shop");
        assert_eq!(empty["metadata"]["namespace"], "shop");
        assert_eq!(own["metadata"]["namespace"], "prod");
    }
}
