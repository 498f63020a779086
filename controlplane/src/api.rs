//! The resource API: kubectl-style paths over any [`ResourceStore`].
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/apis/<group>/<version>/namespaces/<ns>/<plural>` | list (`?watch=true[&resourceVersion=N]` watches) |
//! | GET | `/apis/<group>/<version>/<plural>` | list or watch across namespaces |
//! | POST | `/apis/<group>/<version>/namespaces/<ns>/<plural>` | apply one object |
//! | GET, PUT, DELETE | `/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>` | get, apply, delete |
//! | POST | `/apply?namespace=<ns>` | apply a JSON `List`, an array, or multi-document YAML, atomically |
//! | GET | `/v1/prometheus/targets` | Prometheus HTTP service discovery of the registered proxies ([`mesh_core::proxy_api::HTTP_SD_PATH`], answered from the index in `serve_apis`) |
//!
//! Errors are Kubernetes `Status` objects; validation failures carry `details.causes[].field`.

#![allow(
    clippy::result_large_err,
    reason = "the error is the early response to a request, built once per request"
)]

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use mesh_crds::validate::{self, ResourceKind};
use serde_json::{Value, json};

use crate::{
    http::{
        Body, json_response, ndjson_response, path_segment, query_param, read_body, status_error,
    },
    publish::json_line,
};
use mesh_store::{ObjectKey, ResourceStore, Selector, StoreError, Watcher};

/// The namespace objects land in when neither they nor the request name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Content type of a watch response.
const WATCH_CONTENT_TYPE: &str = "application/json;stream=watch";

/// Handles one request.
pub async fn handle<S: ResourceStore>(store: Arc<S>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(path_segment)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["healthz"]) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::POST, ["apply"]) => {
            let ns = query_param(query.as_deref(), "namespace")
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
            apply_many(&*store, req, &ns).await
        }
        (_, ["apis", group, version, rest @ ..]) => {
            let (ns, plural, name) = match rest {
                [plural] => (None, *plural, None),
                ["namespaces", ns, plural] => (Some(*ns), *plural, None),
                ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
                _ => return not_found(&path),
            };
            let Some(kind) = ResourceKind::from_path(group, version, plural) else {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("the server does not serve {plural} in {group}/{version}"),
                    None,
                );
            };
            let ns = ns.map(str::to_string);
            match (&method, name) {
                (&Method::GET, None) => {
                    let selector = Selector::kind(kind, ns);
                    let watch = matches!(
                        query_param(query.as_deref(), "watch").as_deref(),
                        Some("true" | "1")
                    );
                    if watch {
                        let from = query_param(query.as_deref(), "resourceVersion")
                            .filter(|v| !v.is_empty());
                        watch_response(&*store, selector, from.as_deref())
                    } else {
                        list(&*store, kind, &selector)
                    }
                }
                (&Method::GET, Some(name)) => {
                    let key = ObjectKey::new(kind, ns.unwrap_or_default(), name);
                    match store.get(&key) {
                        Ok(Some(obj)) => json_response(StatusCode::OK, &*obj),
                        Ok(None) => store_error(&StoreError::NotFound(key)),
                        Err(e) => store_error(&e),
                    }
                }
                (&Method::POST, None) | (&Method::PUT, Some(_)) => {
                    let Some(ns) = ns else {
                        return status_error(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "MethodNotAllowed",
                            "apply to a namespaced path",
                            None,
                        );
                    };
                    apply_one(&*store, req, kind, &ns, name).await
                }
                (&Method::DELETE, Some(name)) => {
                    let key = ObjectKey::new(kind, ns.unwrap_or_default(), name);
                    match store.delete(&key).await {
                        Ok(obj) => json_response(StatusCode::OK, &*obj),
                        Err(e) => store_error(&e),
                    }
                }
                _ => status_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{method} is not allowed on {path}"),
                    None,
                ),
            }
        }
        _ => not_found(&path),
    }
}

fn not_found(path: &str) -> Response<Body> {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("no API at {path}"),
        None,
    )
}

/// Maps a store error to its Kubernetes status.
pub fn store_error(e: &StoreError) -> Response<Body> {
    let message = e.to_string();
    match e {
        StoreError::Invalid { index, source } => {
            let (kind, name) = match source {
                validate::ValidationError::Field { kind, name, .. } => {
                    (kind.kind().to_string(), name.clone())
                }
                _ => (String::new(), String::new()),
            };
            let causes = source.field().map_or_else(Vec::new, |field| {
                vec![json!({"field": field, "message": source.to_string()})]
            });
            status_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                message,
                Some(json!({"index": index, "kind": kind, "name": name, "causes": causes})),
            )
        }
        StoreError::Conflict { key, .. } => status_error(
            StatusCode::CONFLICT,
            "Conflict",
            message,
            Some(json!({"kind": key.kind.kind(), "name": key.name})),
        ),
        StoreError::NotFound(key) => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            message,
            Some(json!({"kind": key.kind.kind(), "name": key.name})),
        ),
        StoreError::Gone { .. } => status_error(StatusCode::GONE, "Expired", message, None),
        StoreError::Database { .. } => status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            message,
            None,
        ),
        StoreError::Closed => status_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
            None,
        ),
    }
}

fn list<S: ResourceStore>(store: &S, kind: ResourceKind, selector: &Selector) -> Response<Body> {
    match store.list(selector) {
        Ok(listed) => json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": kind.api_version(),
                "kind": format!("{}List", kind.kind()),
                "metadata": {"resourceVersion": listed.resource_version.to_string()},
                "items": listed.items,
            }),
        ),
        Err(e) => store_error(&e),
    }
}

fn watch_response<S: ResourceStore>(
    store: &S,
    selector: Selector,
    from: Option<&str>,
) -> Response<Body> {
    let from = match from.map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!(
                    "resourceVersion {:?} is not a number",
                    from.unwrap_or_default()
                ),
                None,
            );
        }
    };
    let watcher = match store.watch(selector, from) {
        Ok(w) => w,
        Err(e) => return store_error(&e),
    };
    let lines = futures_util::stream::unfold(Some(watcher), |state| async move {
        let mut watcher = state?;
        match watcher.next().await {
            Ok(event) => Some((json_line(&event), Some(watcher))),
            // Kubernetes ends a watch that fell out of the history with an ERROR event.
            Err(e @ StoreError::Gone { .. }) => Some((
                json_line(&json!({
                    "type": "ERROR",
                    "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": e.to_string(), "reason": "Expired", "code": 410}
                })),
                None,
            )),
            Err(_) => None,
        }
    });
    ndjson_response(WATCH_CONTENT_TYPE, lines)
}

fn bad_request(message: String) -> Response<Body> {
    status_error(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// Parses a request body into documents: multi-document YAML when the content type says YAML,
/// otherwise JSON (one object, an array, or a `List`).
fn documents(content_type: &str, body: &[u8]) -> Result<Vec<Value>, String> {
    if content_type.contains("yaml") {
        let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
        let mut docs = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .map_err(|e| format!("malformed YAML in document {i}: {e}"))?;
            if !value.is_null() {
                docs.push(value);
            }
        }
        return Ok(docs);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    Ok(match value {
        Value::Array(items) => items,
        Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            match map.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => return Err("items: a List needs an array of items".into()),
            }
        }
        other => vec![other],
    })
}

fn fill_namespace(doc: &mut Value, namespace: &str) {
    if let Some(Value::Object(meta)) = doc.get_mut("metadata")
        && meta.get("namespace").is_none_or(|n| n.is_null() || n == "")
    {
        meta.insert("namespace".into(), namespace.into());
    }
}

async fn apply_many<S: ResourceStore>(
    store: &S,
    req: Request<Incoming>,
    namespace: &str,
) -> Response<Body> {
    let content_type = content_type(&req);
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let mut docs = match documents(&content_type, &body) {
        Ok(d) => d,
        Err(message) => return bad_request(message),
    };
    for doc in &mut docs {
        fill_namespace(doc, namespace);
    }
    match store.apply(docs).await {
        Ok(applied) => json_response(
            StatusCode::OK,
            &json!({"kind": "ApplyResult", "items": applied}),
        ),
        Err(e) => store_error(&e),
    }
}

fn content_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase()
}

async fn apply_one<S: ResourceStore>(
    store: &S,
    req: Request<Incoming>,
    kind: ResourceKind,
    namespace: &str,
    name: Option<&str>,
) -> Response<Body> {
    let content_type = content_type(&req);
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let mut docs = match documents(&content_type, &body) {
        Ok(d) => d,
        Err(message) => return bad_request(message),
    };
    let [doc] = docs.as_mut_slice() else {
        return bad_request(format!(
            "expected one object, got {}; POST /apply takes several",
            docs.len()
        ));
    };
    fill_namespace(doc, namespace);
    if let Ok(declared) = validate::kind_of(doc)
        && declared != kind
    {
        return bad_request(format!(
            "kind: the object is a {declared}, but the path serves {kind}"
        ));
    }
    let field = |f: &str| doc.pointer(f).and_then(Value::as_str).map(str::to_string);
    if field("/metadata/namespace").as_deref() != Some(namespace) {
        return bad_request(format!(
            "metadata.namespace: the object's namespace does not match the path's {namespace:?}"
        ));
    }
    if let Some(name) = name
        && field("/metadata/name").as_deref() != Some(name)
    {
        return bad_request(format!(
            "metadata.name: the object's name does not match the path's {name:?}"
        ));
    }
    match store.apply(docs).await {
        Ok(mut applied) => {
            let status = match applied.first().map(|a| a.action) {
                Some(mesh_store::ApplyAction::Created) => StatusCode::CREATED,
                _ => StatusCode::OK,
            };
            match applied.pop() {
                Some(a) => json_response(status, &*a.object),
                None => bad_request("nothing to apply".into()),
            }
        }
        Err(e) => store_error(&e),
    }
}
