//! `mesh check [--pre]`: is this cluster ready for the mesh (`--pre`), and is the mesh healthy
//! on it? Each check prints one line; the exit code is 1 when any failed.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client};

use super::install::{CONTROLPLANE, NAMESPACE, ROLLOUT_CONTROLLER, WEBHOOK};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// `Ok(detail)` or `Err(what is wrong and what to do)`.
    pub result: Result<String, String>,
}

fn check(name: &str, result: Result<String, String>) -> Check {
    Check {
        name: name.to_string(),
        result,
    }
}

/// The minimum Kubernetes minor version (1.x) we support.
pub const MIN_MINOR: u32 = 29;

async fn can(client: &Client, verb: &str, group: &str, resource: &str) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.status.is_some_and(|s| s.allowed))
}

async fn crd_established(client: &Client, name: &str) -> Result<String, String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = api
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!("{name} is not installed; run `mesh install --crds | kubectl apply -f -`")
        })?;
    let established = crd
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    if established {
        Ok("established".into())
    } else {
        Err(format!("{name} exists but is not Established yet"))
    }
}

async fn deployment_available(client: &Client, name: &str) -> Result<String, String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let d = api
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "Deployment {NAMESPACE}/{name} not found; run `mesh install | kubectl apply -f -`"
            )
        })?;
    let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.unwrap_or_default();
    let available = status.available_replicas.unwrap_or(0);
    if available >= want && want > 0 {
        Ok(format!("{available}/{want} available"))
    } else {
        Err(format!(
            "{available}/{want} replicas available; see `kubectl -n {NAMESPACE} describe deployment {name}`"
        ))
    }
}

/// Runs the checks.
pub async fn run(client: &Client, pre: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let version = client.apiserver_version().await;
    let reachable = version
        .as_ref()
        .map_err(|e| format!("cannot reach the API server: {e}"));
    out.push(check(
        "the API server is reachable",
        reachable.map(|v| v.git_version.clone()),
    ));
    let Ok(v) = version else {
        return out;
    };
    let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
    out.push(check(
        &format!("Kubernetes is at least 1.{MIN_MINOR}"),
        if v.major == "1" && minor >= MIN_MINOR {
            Ok(v.git_version.clone())
        } else {
            Err(format!(
                "the cluster runs {}; the mesh needs 1.{MIN_MINOR} or later",
                v.git_version
            ))
        },
    ));
    if pre {
        for (verb, group, resource) in [
            (
                "create",
                "apiextensions.k8s.io",
                "customresourcedefinitions",
            ),
            ("create", "", "namespaces"),
            ("create", "rbac.authorization.k8s.io", "clusterroles"),
            (
                "create",
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
            ),
        ] {
            let r = match can(client, verb, group, resource).await {
                Ok(true) => Ok("allowed".into()),
                Ok(false) => Err(format!(
                    "you may not {verb} {resource}; install needs cluster-admin"
                )),
                Err(e) => Err(e),
            };
            out.push(check(&format!("can {verb} {resource}"), r));
        }
        let ns: Api<Namespace> = Api::all(client.clone());
        let free = match ns.get_opt(NAMESPACE).await {
            Ok(None) => Ok(format!("{NAMESPACE} does not exist yet")),
            Ok(Some(_)) => Err(format!(
                "namespace {NAMESPACE} already exists: the mesh is installed (run `mesh check`)"
            )),
            Err(e) => Err(e.to_string()),
        };
        out.push(check("the mesh is not installed yet", free));
        return out;
    }
    for crd in [
        "canaries.rollouts.mesh.dev",
        "metrictemplates.rollouts.mesh.dev",
        "httproutes.gateway.networking.k8s.io",
    ] {
        out.push(check(
            &format!("CRD {crd}"),
            crd_established(client, crd).await,
        ));
    }
    let ns: Api<Namespace> = Api::all(client.clone());
    out.push(check(
        &format!("namespace {NAMESPACE}"),
        match ns.get_opt(NAMESPACE).await {
            Ok(Some(_)) => Ok("exists".into()),
            Ok(None) => Err(format!(
                "{NAMESPACE} not found; run `mesh install | kubectl apply -f -`"
            )),
            Err(e) => Err(e.to_string()),
        },
    ));
    for d in [CONTROLPLANE, ROLLOUT_CONTROLLER] {
        out.push(check(
            &format!("{d} is available"),
            deployment_available(client, d).await,
        ));
    }
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    out.push(check(
        "the proxy injector webhook is registered",
        match hooks.get_opt(WEBHOOK).await {
            Ok(Some(h)) => {
                let with_ca = h.webhooks.unwrap_or_default().iter().all(|w| {
                    w.client_config
                        .ca_bundle
                        .as_ref()
                        .is_some_and(|b| !b.0.is_empty())
                });
                if with_ca {
                    Ok("registered with a CA bundle".into())
                } else {
                    Err(format!("{WEBHOOK} has no caBundle; re-run `mesh install`"))
                }
            }
            Ok(None) => Err(format!(
                "{WEBHOOK} not found; run `mesh install | kubectl apply -f -`"
            )),
            Err(e) => Err(e.to_string()),
        },
    ));
    out
}

/// Prints the checks; `true` when all passed.
#[allow(clippy::print_stdout, reason = "the report is the output")]
pub fn print(checks: &[Check]) -> bool {
    for c in checks {
        match &c.result {
            Ok(detail) => println!("√ {} ({detail})", c.name),
            Err(why) => println!("× {}: {why}", c.name),
        }
    }
    let failed = checks.iter().filter(|c| c.result.is_err()).count();
    if failed == 0 {
        println!("Status check results are √");
    } else {
        println!("{failed} of {} checks failed", checks.len());
    }
    failed == 0
}
