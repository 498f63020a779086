//! The embedded control plane's resource API over HTTP (`controlplane/src/api.rs`): Kubernetes'
//! paths and verbs, plus `POST /apply` for an atomic batch, which the control plane validates.
//! It has no PATCH, so a merge patch is read, merged here and written back naming the
//! resourceVersion it read.

use std::time::Duration;

use anyhow::{Context, bail};
use mesh_crds::validate::ResourceKind;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::common::{Applied, ApplyError, Conn, Refused};

/// How long a read or a write of one object may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a merge patch starts over when the object changed under it.
const CONFLICT_RETRIES: usize = 10;

/// The resource API of one control plane, in one namespace.
pub struct ResourceApi {
    client: reqwest::Client,
    server: String,
    namespace: String,
}

impl ResourceApi {
    /// A client of the API at `conn.server`.
    pub fn new(conn: &Conn) -> anyhow::Result<Self> {
        Ok(Self {
            client: client(conn)?,
            server: conn.server.trim_end_matches('/').to_string(),
            namespace: conn.namespace.clone(),
        })
    }

    /// The namespace the commands work in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn collection_url(&self, kind: ResourceKind) -> String {
        format!(
            "{}/apis/{}/{}/namespaces/{}/{}",
            self.server,
            kind.group(),
            kind.version(),
            self.namespace,
            kind.plural()
        )
    }

    fn object_url(&self, kind: ResourceKind, name: &str) -> String {
        format!("{}/{name}", self.collection_url(kind))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.send().await.with_context(|| {
            format!(
                "cannot reach the control plane at {} (set --server or MESH_SERVER, or --kube \
                 for a cluster)",
                self.server
            )
        })
    }

    /// One object; a [`Refused`] with code 404 when there is none.
    pub async fn get(&self, kind: ResourceKind, name: &str) -> anyhow::Result<Value> {
        let req = self
            .client
            .get(self.object_url(kind, name))
            .timeout(REQUEST_TIMEOUT);
        answer(self.send(req).await?).await
    }

    /// Every object of `kind` in the namespace, as a `<Kind>List`.
    pub async fn list(&self, kind: ResourceKind) -> anyhow::Result<Value> {
        answer(
            self.send(self.client.get(self.collection_url(kind)))
                .await?,
        )
        .await
    }

    /// Deletes one object.
    pub async fn delete(&self, kind: ResourceKind, name: &str) -> anyhow::Result<()> {
        answer(
            self.send(self.client.delete(self.object_url(kind, name)))
                .await?,
        )
        .await
        .map(drop)
    }

    /// One atomic request; the control plane fills in missing namespaces, validates every
    /// document and stores all or none.
    pub async fn apply(&self, items: Vec<Value>) -> Result<Vec<Applied>, ApplyError> {
        let body = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let req = self
            .client
            .post(format!("{}/apply", self.server))
            .query(&[("namespace", self.namespace.as_str())])
            .json(&body);
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = body_of(resp).await?;
        if !status.is_success() {
            // The control plane names the document (from 0) and the field it refused.
            if let Some(index) = body["details"]["index"]
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
            {
                let message = body["message"].as_str().unwrap_or_default();
                let message = message
                    .split_once(": ")
                    .filter(|(head, _)| head.starts_with("document "))
                    .map_or(message, |(_, rest)| rest);
                return Err(ApplyError::Document {
                    index,
                    field: body["details"]["causes"][0]["field"]
                        .as_str()
                        .map(str::to_string),
                    message: message.to_string(),
                    applied: Vec::new(),
                });
            }
            return Err(ApplyError::Request(refused(status, &body).into()));
        }
        Ok(body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| Applied {
                action: item["action"].as_str().unwrap_or_default().to_string(),
                object: item["object"].clone(),
            })
            .collect())
    }

    /// Reads the object, merges `patch` into it and writes it back without its status. The
    /// write names the resourceVersion it read, so a concurrent change (the controller writes
    /// status every tick) makes it start over instead of losing one.
    pub async fn merge_patch(
        &self,
        kind: ResourceKind,
        name: &str,
        patch: &Value,
    ) -> anyhow::Result<Value> {
        for _ in 0..CONFLICT_RETRIES {
            let mut object = self.get(kind, name).await?;
            merge(&mut object, patch);
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
            let req = self
                .client
                .put(self.object_url(kind, name))
                .json(&object)
                .timeout(REQUEST_TIMEOUT);
            let resp = self.send(req).await?;
            if resp.status() == StatusCode::CONFLICT {
                continue;
            }
            return answer(resp).await;
        }
        bail!(
            "{} {name:?} kept changing under us; try again",
            kind.kind().to_ascii_lowercase()
        )
    }

    /// The revision an embedded Workload runs, when it can be read.
    pub async fn workload_revision(&self, name: &str) -> Option<String> {
        let w = self.get(ResourceKind::Workload, name).await.ok()?;
        let w: mesh_crds::Workload = serde_json::from_value(w).ok()?;
        w.spec.revision()
    }
}

async fn body_of(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    resp.json()
        .await
        .with_context(|| format!("reading the control plane's answer ({status})"))
}

/// The `Authorization` value for the control plane at `conn.server`: from `--token-file` /
/// `MESH_TOKEN_FILE` (which must be readable), else from the file the control plane left a
/// pointer to; `None` when there is neither, and the API will answer 401 saying what it needs.
/// An HTTP client of the control plane at `conn.server` that presents its token on every
/// request (the resource API's and the observe API's clients).
pub fn client(conn: &Conn) -> anyhow::Result<reqwest::Client> {
    mesh_core::crypto::install_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token(conn)? {
        headers.insert(reqwest::header::AUTHORIZATION, token);
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .context("building the HTTP client")
}

pub fn token(conn: &Conn) -> anyhow::Result<Option<reqwest::header::HeaderValue>> {
    let (path, explicit) = match &conn.token_file {
        Some(path) => (path.clone(), true),
        None => match mesh_controlplane::access::token_file_for(&conn.server) {
            Some(path) => (path, false),
            None => return Ok(None),
        },
    };
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if explicit => {
            bail!(
                "reading the token file {} (--token-file / MESH_TOKEN_FILE): {e}",
                path.display()
            )
        }
        Err(_) => return Ok(None),
    };
    let value = mesh_controlplane::access::authorization(&secret)
        .with_context(|| format!("the token file {} holds no usable token", path.display()))?;
    Ok(Some(value))
}

/// The response's JSON when it succeeded; its `Status` as a [`Refused`] otherwise.
async fn answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body = body_of(resp).await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(refused(status, &body).into())
    }
}

fn refused(status: StatusCode, body: &Value) -> Refused {
    Refused {
        code: status.as_u16(),
        reason: body["reason"].as_str().unwrap_or("Error").to_string(),
        message: body["message"]
            .as_str()
            .unwrap_or("(no message)")
            .to_string(),
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"metadata": {"name": "web", "annotations": {"a": "1", "b": "2"}},
                                "spec": {"suspend": false, "service": {"port": 80}}});
        merge(
            &mut target,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}, "spec": {"suspend": true}}),
        );
        assert_eq!(
            target,
            json!({"metadata": {"name": "web", "annotations": {"b": "2", "c": "3"}},
                   "spec": {"suspend": true, "service": {"port": 80}}})
        );
    }
}
