//! `mesh upgrade` and `mesh uninstall`: the install's life after `mesh install`.
//!
//! Both work from the same rendering as `mesh install` ([`super::install::render_with`]), so
//! what they touch is exactly what an install adds. `mesh upgrade` server-side applies a new
//! rendering under the field manager `mesh`, keeping the cluster's identity issuer (injected
//! proxies trust it) and the injector's certificate while it has more than
//! [`RENEW_BEFORE_DAYS`] days left; it issues a new injector certificate otherwise, and the
//! control plane's pods restart to serve it. PodDisruptionBudgets a previous `--ha` install left
//! are removed when the new rendering has none. `mesh uninstall` deletes the webhook first (so
//! no pod is sent to a control plane that is going away), then every other object, then the
//! namespace; with `--crds` also the mesh's CRDs (and so every Canary and policy). Injected
//! workloads are never touched: their proxies keep serving with their last configuration and
//! certificates, and are gone at the pods' next restart.

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use kube::{Api, Client};
use serde_json::Value;

use super::install::{
    INJECTOR_TLS_SECRET, ISSUER_SECRET, InstallArgs, NAMESPACE, Pki, WEBHOOK, render_with,
};

/// The field manager of `mesh upgrade`'s server-side applies.
pub const FIELD_MANAGER: &str = "mesh";
/// `mesh upgrade` issues a new injector certificate when the one in the cluster has fewer
/// days left than this.
pub const RENEW_BEFORE_DAYS: i64 = 30;

fn pem_field(secret: &Secret, key: &str) -> anyhow::Result<String> {
    let name = secret.metadata.name.as_deref().unwrap_or("?");
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("Secret {NAMESPACE}/{name} has no {key}"))?;
    String::from_utf8(bytes.0.clone())
        .with_context(|| format!("Secret {NAMESPACE}/{name} {key} is not PEM text"))
}

/// Seconds from now until a PEM certificate expires (negative when it has).
fn seconds_left(pem: &str, now: i64) -> anyhow::Result<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp() - now)
}

/// The cluster's keys: the identity issuer always; the injector's certificate unless it is
/// close to expiry or missing, in which case a new one (the `bool` says so).
async fn cluster_pki(client: &Client, now: i64) -> anyhow::Result<(Pki, bool)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let issuer = secrets.get_opt(ISSUER_SECRET).await?.with_context(|| {
        format!(
            "Secret {NAMESPACE}/{ISSUER_SECRET} not found: the mesh is not installed here \
             (run `mesh install | kubectl apply -f -`)"
        )
    })?;
    let (issuer_cert, issuer_key) = (
        pem_field(&issuer, "tls.crt")?,
        pem_field(&issuer, "tls.key")?,
    );
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = hooks.get_opt(WEBHOOK).await?.and_then(|h| {
        h.webhooks?
            .into_iter()
            .find_map(|w| w.client_config.ca_bundle)
            .and_then(|b| String::from_utf8(b.0).ok())
    });
    let serving = secrets.get_opt(INJECTOR_TLS_SECRET).await?;
    let kept = match (serving, bundle) {
        (Some(serving), Some(ca)) => {
            let cert = pem_field(&serving, "tls.crt")?;
            let key = pem_field(&serving, "tls.key")?;
            let fresh =
                |pem: &str| seconds_left(pem, now).is_ok_and(|s| s > RENEW_BEFORE_DAYS * 86_400);
            (fresh(&cert) && fresh(&ca)).then_some((ca, cert, key))
        }
        _ => None,
    };
    Ok(match kept {
        Some((webhook_ca, webhook_cert, webhook_key)) => (
            Pki {
                issuer_cert,
                issuer_key,
                webhook_ca,
                webhook_cert,
                webhook_key,
            },
            false,
        ),
        None => (
            Pki {
                issuer_cert,
                issuer_key,
                ..super::install::webhook_pki()?
            },
            true,
        ),
    })
}

/// The API for a document's kind, found through discovery.
fn api_for(
    client: &Client,
    discovery: &Discovery,
    doc: &Value,
) -> anyhow::Result<Api<DynamicObject>> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = doc["kind"].as_str().unwrap_or_default();
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
    Ok(match doc["metadata"]["namespace"].as_str() {
        Some(ns) if caps.scope == Scope::Namespaced => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    })
}

fn label(doc: &Value) -> String {
    let kind = doc["kind"].as_str().unwrap_or("?");
    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// `mesh upgrade`: applies the rendering for these flags with the cluster's keys; returns what
/// it did, a line each.
pub async fn upgrade(client: &Client, args: &InstallArgs) -> anyhow::Result<Vec<String>> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(NAMESPACE).await?.is_none() {
        bail!(
            "namespace {NAMESPACE} not found: the mesh is not installed here \
             (run `mesh install --crds | kubectl apply -f -`, then `mesh install | kubectl apply -f -`)"
        );
    }
    let now = chrono::Utc::now().timestamp();
    let mut report = Vec::new();
    let docs = if args.crds {
        super::install::crds(args.skip_gateway_api_crds)
    } else {
        let (pki, renewed) = cluster_pki(client, now).await?;
        report.push(if renewed {
            "issued a new injector certificate (the old one was missing or close to expiry)".into()
        } else {
            "kept the identity issuer and the injector certificate".into()
        });
        render_with(args, &pki)?
    };
    let discovery = Discovery::new(client.clone()).run().await?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for doc in &docs {
        let api = api_for(client, &discovery, doc)?;
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        api.patch(name, &params, &Patch::Apply(doc))
            .await
            .with_context(|| format!("applying {}", label(doc)))?;
        report.push(format!("applied {}", label(doc)));
    }
    if !args.crds {
        // Budgets from an earlier --ha install that this rendering no longer has.
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NAMESPACE);
        let ours = ListParams::default().labels("app.kubernetes.io/part-of=mesh");
        for pdb in pdbs.list(&ours).await? {
            let name = pdb.metadata.name.unwrap_or_default();
            let rendered = docs
                .iter()
                .any(|d| d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == name);
            if !rendered {
                pdbs.delete(&name, &DeleteParams::default()).await?;
                report.push(format!("deleted PodDisruptionBudget {NAMESPACE}/{name}"));
            }
        }
    }
    Ok(report)
}

/// `mesh uninstall`: deletes what `mesh install` adds; returns what it did, a line each.
pub async fn uninstall(client: &Client, crds: bool) -> anyhow::Result<Vec<String>> {
    // Every object an install can hold: the HA rendering is a superset of the plain one. The
    // keys do not matter for deleting.
    let args = InstallArgs {
        crds: false,
        skip_gateway_api_crds: true,
        controlplane_image: None,
        rollout_controller_image: None,
        ha: true,
        helm_chart: None,
        prometheus_url: String::new(),
        prometheus: false,
        proxy: super::install::ProxyArgs {
            image_registry: super::install::DEFAULT_REGISTRY.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            proxy_image: None,
            init_image: None,
            trust_domain: "cluster.local".into(),
            trace_collector: None,
            trace_sampling: None,
        },
    };
    let placeholder = super::install::pki()?;
    let docs = render_with(&args, &placeholder)?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let (mut first, mut rest): (Vec<&Value>, Vec<&Value>) = docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition" && d["kind"] != "Namespace")
        .partition(|d| d["kind"] == "MutatingWebhookConfiguration");
    first.append(&mut rest);
    if crds {
        first.extend(
            docs.iter()
                .filter(|d| d["kind"] == "CustomResourceDefinition"),
        );
    }
    let mut report = Vec::new();
    for doc in first {
        let api = api_for(client, &discovery, doc)?;
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => report.push(format!("deleted {}", label(doc))),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {}", label(doc))),
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces
        .delete(NAMESPACE, &DeleteParams::background())
        .await
    {
        Ok(_) => report.push(format!("deleted Namespace {NAMESPACE}")),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).context(format!("deleting Namespace {NAMESPACE}")),
    }
    Ok(report)
}
