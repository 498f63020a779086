//! A client of the control plane's observe API (`/v1/observe/...`), with the resource API's
//! token: what `mesh stat|routes|edges|tap|top` and the dashboard ask through. It sits below
//! both.

use anyhow::{Context, bail};

use crate::backend::{Conn, api_client};

/// A client of the control plane's observe API.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    server: String,
}

impl Api {
    pub fn new(conn: &Conn) -> anyhow::Result<Self> {
        Ok(Self {
            client: api_client(conn)?,
            server: conn.server.trim_end_matches('/').to_string(),
        })
    }

    /// A client of the control plane at `server` presenting `token` (a Kubernetes bearer token,
    /// for a cluster's control plane to review).
    pub fn with_token(server: &str, token: &str) -> anyhow::Result<Self> {
        mesh_core::crypto::install_provider();
        let value = mesh_controlplane::access::authorization(token)
            .context("the kubeconfig's bearer token is not usable in a header")?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, value);
        Ok(Self {
            client: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .default_headers(headers)
                .build()
                .context("building the HTTP client")?,
            server: server.trim_end_matches('/').to_string(),
        })
    }

    pub async fn send(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<reqwest::Response> {
        let rsp = self
            .client
            .get(format!("{}{path}", self.server))
            .query(query)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the control plane at {} (set --server or MESH_SERVER)",
                    self.server
                )
            })?;
        if !rsp.status().is_success() {
            let status = rsp.status();
            let body: serde_json::Value = rsp.json().await.unwrap_or_default();
            let message = body["message"].as_str().unwrap_or("no reason given");
            bail!("the control plane refused ({status}): {message}");
        }
        Ok(rsp)
    }

    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.send(path, query)
            .await?
            .json()
            .await
            .with_context(|| format!("reading the control plane's answer to {path}"))
    }
}
