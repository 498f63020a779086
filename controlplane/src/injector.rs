//! The proxy-injector webhook: a mutating admission webhook, served over HTTPS, that injects the
//! proxy into new pods (see [`crate::inject`] for what and when).
//!
//! The API server POSTs an `admission.k8s.io/v1` AdmissionReview to `/inject` for every pod
//! created in a namespace the webhook configuration selects; the answer allows the pod and, when
//! it is to be injected, carries a JSON patch that replaces its metadata and spec. Namespace
//! annotations are read from the API, since the review only holds the pod. The webhook never
//! blocks a pod: when it cannot decide (the namespace cannot be read, a malformed annotation) it
//! allows the pod unchanged, and says why in the response's warnings, which kubectl prints.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    http::{Body, json_response, read_body},
    inject::{self, Decision, InjectConfig, ProxyLayout},
};

/// The path the webhook configuration points at.
pub const INJECT_PATH: &str = "/inject";

/// Where namespace annotations come from.
pub trait Namespaces: Send + Sync + 'static {
    /// The annotations of namespace `name`.
    fn annotations(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, String>> + Send;
}

impl Namespaces for kube::Client {
    async fn annotations(&self, name: &str) -> Result<BTreeMap<String, String>, String> {
        let api: kube::Api<Namespace> = kube::Api::all(self.clone());
        let ns = api.get(name).await.map_err(|e| e.to_string())?;
        Ok(ns.metadata.annotations.unwrap_or_default())
    }
}

/// Where this cluster's pods get the proxy: as a native sidecar when the API server's version
/// has them ([`ProxyLayout::for_server`]), else as a plain container. The version is read once,
/// when the injector starts: an upgraded cluster gets native sidecars once the control plane
/// restarts (as `mesh upgrade` does).
pub async fn proxy_layout(client: &kube::Client) -> Result<ProxyLayout, kube::Error> {
    let info = client.apiserver_version().await?;
    Ok(ProxyLayout::for_server(&info.major, &info.minor))
}

/// A TLS server configuration from a PEM certificate chain and PEM private key.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading the webhook certificate: {e}"))?;
    if certs.is_empty() {
        return Err("the webhook certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("reading the webhook key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("the webhook certificate and key do not match: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the webhook on `listener` with `tls` until the task is dropped.
pub async fn serve<N: Namespaces>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: InjectConfig,
    namespaces: N,
) {
    let acceptor = TlsAcceptor::from(tls);
    let state = Arc::new((config, namespaces));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state.0, &state.1, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn handle<N: Namespaces>(
    config: &InjectConfig,
    namespaces: &N,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::POST, INJECT_PATH) => {
            let body = match read_body(req.into_body()).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match serde_json::from_slice::<Value>(&body) {
                Ok(review) => json_response(
                    StatusCode::OK,
                    &review_response(config, namespaces, &review).await,
                ),
                Err(e) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"message": format!("not an AdmissionReview: {e}")}),
                ),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"message": "not found"})),
    }
}

/// Answers one AdmissionReview.
pub async fn review_response<N: Namespaces>(
    config: &InjectConfig,
    namespaces: &N,
    review: &Value,
) -> Value {
    let request = &review["request"];
    let uid = request["uid"].clone();
    let mut response = json!({"uid": uid, "allowed": true});
    match mutate(config, namespaces, request).await {
        Ok(Some((patch, name))) => {
            tracing::info!(pod = %name, "injected the proxy");
            response["patchType"] = "JSONPatch".into();
            response["patch"] = base64::engine::general_purpose::STANDARD
                .encode(patch.to_string())
                .into();
        }
        Ok(None) => {}
        Err(why) => {
            tracing::warn!("not injecting: {why}");
            response["warnings"] = json!([format!("mesh proxy injector: {why}")]);
        }
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// The JSON patch for a pod that is to be injected (and a name for the log).
async fn mutate<N: Namespaces>(
    config: &InjectConfig,
    namespaces: &N,
    request: &Value,
) -> Result<Option<(Value, String)>, String> {
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Ok(None);
    }
    let pod: Pod = serde_json::from_value(request["object"].clone())
        .map_err(|e| format!("the pod does not parse: {e}"))?;
    let namespace = request["namespace"]
        .as_str()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or("default")
        .to_string();
    let ns_annotations = namespaces
        .annotations(&namespace)
        .await
        .map_err(|e| format!("reading namespace {namespace}: {e}"))?;
    let Some(mut spec) = pod.spec.clone() else {
        return Ok(None);
    };
    let mut meta = pod.metadata.clone();
    if let Decision::Skip(why) = inject::decide(&ns_annotations, &meta, &spec) {
        tracing::debug!(namespace, "not injecting: {why}");
        return Ok(None);
    }
    inject::inject(&mut meta, &mut spec, config).map_err(|e| e.to_string())?;
    let name = meta
        .name
        .clone()
        .or_else(|| meta.generate_name.clone())
        .unwrap_or_default();
    let patch = json!([
        {"op": "replace", "path": "/spec", "value": spec},
        {"op": if pod.metadata.annotations.is_some() { "replace" } else { "add" },
         "path": "/metadata/annotations", "value": meta.annotations},
    ]);
    Ok(Some((patch, format!("{namespace}/{name}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(BTreeMap<String, String>);

    impl Namespaces for Fixed {
        async fn annotations(&self, _: &str) -> Result<BTreeMap<String, String>, String> {
            Ok(self.0.clone())
        }
    }

    struct Broken;

    impl Namespaces for Broken {
        async fn annotations(&self, _: &str) -> Result<BTreeMap<String, String>, String> {
            Err("forbidden".into())
        }
    }

    fn review() -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "abc", "operation": "CREATE", "namespace": "shop",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                           "spec": {"containers": [{"name": "app", "image": "podinfo"}]}},
            },
        })
    }

    #[tokio::test]
    async fn patches_pods_in_enabled_namespaces_and_fails_open() {
        let config = InjectConfig::default();
        let enabled = Fixed(BTreeMap::from([(
            inject::INJECT_ANNOTATION.to_string(),
            "enabled".to_string(),
        )]));
        let r = review_response(&config, &enabled, &review()).await;
        assert_eq!(r["response"]["uid"], "abc");
        assert_eq!(r["response"]["allowed"], true);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert_eq!(
            patch[0]["value"]["initContainers"][1]["name"],
            inject::PROXY_CONTAINER
        );
        assert_eq!(
            patch[0]["value"]["initContainers"][1]["restartPolicy"],
            "Always"
        );
        assert_eq!(patch[1]["op"], "add");

        let off = review_response(&config, &Fixed(BTreeMap::new()), &review()).await;
        assert!(off["response"].get("patch").is_none(), "{off}");
        let broken = review_response(&config, &Broken, &review()).await;
        assert_eq!(broken["response"]["allowed"], true);
        assert!(
            broken["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("forbidden")
        );
    }
}
