//! `mesh check [--pre]`: is this cluster ready for the mesh (`--pre`), and is the mesh healthy
//! on it? Each check prints one line; the exit code is 1 when any failed.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client};

use super::install::{
    CONTROLPLANE, INJECTOR_TLS_SECRET, ISSUER_SECRET, NAMESPACE, ROLLOUT_CONTROLLER, WEBHOOK,
};

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

/// A certificate's validity and names, from PEM.
struct CertInfo {
    subject: String,
    issuer: String,
    not_before: i64,
    not_after: i64,
}

fn cert_info(pem: &[u8]) -> Result<CertInfo, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn date(ts: i64) -> String {
    chrono::DateTime::from_timestamp(ts, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| ts.to_string())
}

/// Whether `what` (read from `source`) is valid now; `fix` says how to replace it.
fn valid_now(what: &str, source: &str, cert: &CertInfo, now: i64, fix: &str) -> Result<(), String> {
    if cert.not_after < now {
        Err(format!(
            "{what} ({source}) expired on {}; {fix}",
            date(cert.not_after)
        ))
    } else if cert.not_before > now {
        Err(format!(
            "{what} ({source}) is not valid before {}; check the clocks, or {fix}",
            date(cert.not_before)
        ))
    } else {
        Ok(())
    }
}

async fn secret_cert(client: &Client, name: &str) -> Result<CertInfo, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!("Secret {NAMESPACE}/{name} not found; run `mesh install | kubectl apply -f -`")
        })?;
    let crt = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .ok_or_else(|| format!("Secret {NAMESPACE}/{name} has no tls.crt"))?;
    cert_info(&crt.0).map_err(|e| format!("Secret {NAMESPACE}/{name} tls.crt: {e}"))
}

/// The webhook's Service exists with the port the webhook calls.
async fn webhook_service(
    client: &Client,
    hook: &MutatingWebhookConfiguration,
) -> Result<String, String> {
    let Some(svc) = hook
        .webhooks
        .iter()
        .flatten()
        .find_map(|w| w.client_config.service.clone())
    else {
        return Ok("called by URL, not through a Service".into());
    };
    let port = svc.port.unwrap_or(443);
    let name = format!("{}/{}", svc.namespace, svc.name);
    let api: Api<Service> = Api::namespaced(client.clone(), &svc.namespace);
    let found = api.get_opt(&svc.name).await.map_err(|e| e.to_string())?;
    let Some(found) = found else {
        return Err(format!(
            "Service {name}, which the API server calls the proxy injector through, is missing: \
             new pods start without the proxy (the webhook fails open); re-apply \
             `mesh install | kubectl apply -f -`"
        ));
    };
    let ports = found.spec.and_then(|s| s.ports).unwrap_or_default();
    if ports.iter().any(|p| p.port == port) {
        Ok(format!("{name}:{port}"))
    } else {
        Err(format!(
            "Service {name} has no port {port}, which the proxy injector webhook calls: new pods \
             start without the proxy; re-apply `mesh install | kubectl apply -f -`"
        ))
    }
}

/// The injector's serving certificate is valid now and issued by the CA the webhook trusts; the
/// identity issuer is valid now.
async fn certificates(
    client: &Client,
    hook: &MutatingWebhookConfiguration,
    now: i64,
) -> Result<String, String> {
    let renew = "run `mesh upgrade` to issue a new one";
    let serving = secret_cert(client, INJECTOR_TLS_SECRET).await?;
    valid_now(
        "the proxy injector's serving certificate",
        &format!("Secret {NAMESPACE}/{INJECTOR_TLS_SECRET}"),
        &serving,
        now,
        &format!(
            "until then the API server cannot call the injector and new pods start without the proxy; {renew}"
        ),
    )?;
    let bundle = hook
        .webhooks
        .iter()
        .flatten()
        .find_map(|w| w.client_config.ca_bundle.clone())
        .ok_or_else(|| format!("{WEBHOOK} has no caBundle; {renew}"))?;
    let ca = cert_info(&bundle.0).map_err(|e| format!("{WEBHOOK} caBundle: {e}"))?;
    valid_now(
        "the CA the API server checks the injector with",
        &format!("{WEBHOOK} caBundle"),
        &ca,
        now,
        renew,
    )?;
    if serving.issuer != ca.subject {
        return Err(format!(
            "the proxy injector's certificate is issued by {:?}, but {WEBHOOK} trusts {:?}: the \
             API server cannot call the injector; {renew}",
            serving.issuer, ca.subject
        ));
    }
    let issuer = secret_cert(client, ISSUER_SECRET).await?;
    valid_now(
        "the identity issuer",
        &format!("Secret {NAMESPACE}/{ISSUER_SECRET}"),
        &issuer,
        now,
        "proxies cannot get certificates; replace the issuer and restart the injected pods",
    )?;
    Ok(format!(
        "injector certificate valid until {}, identity issuer until {}",
        date(serving.not_after),
        date(issuer.not_after)
    ))
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
    let hook = hooks.get_opt(WEBHOOK).await.map_err(|e| e.to_string());
    out.push(check(
        "the proxy injector webhook is registered",
        match hook.clone() {
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
            Err(e) => Err(e),
        },
    ));
    if let Ok(Some(hook)) = hook {
        out.push(check(
            "the proxy injector's Service",
            webhook_service(client, &hook).await,
        ));
        let now = chrono::Utc::now().timestamp();
        out.push(check(
            "the mesh's certificates are valid",
            certificates(client, &hook, now).await,
        ));
    }
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
