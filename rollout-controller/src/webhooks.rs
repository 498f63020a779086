//! Calling a Canary's webhooks, with Flagger's payload and semantics: a hook passes when it
//! answers 2xx within its timeout; a timeout, a refused connection or any other status is a
//! failure (for gating hooks, a failed check). Notification hooks (`event`, `post-rollout`) are
//! called the same way, and their failures are only logged.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_crds::canary::CanaryWebhook;
use serde::Serialize;

use crate::duration;

/// Flagger's default webhook timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON body POSTed to a webhook (Flagger's shape).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Payload {
    /// Canary name.
    pub name: String,
    /// Canary namespace.
    pub namespace: String,
    /// Phase at the time of the call.
    pub phase: String,
    /// Revision checksum under test.
    pub checksum: String,
    /// The hook's `metadata`, plus `eventMessage`/`eventType` for event hooks.
    pub metadata: BTreeMap<String, String>,
}

/// How a call went.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook has no URL: it is a gate the mesh holds, opened by `mesh rollout promote`.
    #[error("webhook {hook} has no url: it is a gate the mesh holds, not a call")]
    NoUrl {
        /// Hook name.
        hook: String,
    },
    /// The hook's `timeout` does not parse.
    #[error("webhook {hook}: timeout: {source}")]
    Timeout {
        /// Hook name.
        hook: String,
        /// The parse error.
        source: duration::DurationError,
    },
    /// The request failed: refused, timed out, or an unreadable answer.
    #[error("webhook {hook} ({url}): {source}")]
    Request {
        /// Hook name.
        hook: String,
        /// Its URL.
        url: String,
        /// What went wrong.
        source: reqwest::Error,
    },
    /// The hook answered with a non-2xx status.
    #[error("webhook {hook} ({url}) answered {status}: {body}")]
    Status {
        /// Hook name.
        hook: String,
        /// Its URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of its body.
        body: String,
    },
}

/// Calls one hook. `Ok(())` means it answered 2xx in time.
pub async fn call(
    client: &reqwest::Client,
    hook: &CanaryWebhook,
    payload: &Payload,
) -> Result<(), HookError> {
    let Some(url) = hook.url.as_deref() else {
        return Err(HookError::NoUrl {
            hook: hook.name.clone(),
        });
    };
    let timeout = match &hook.timeout {
        Some(t) => duration::parse(t).map_err(|source| HookError::Timeout {
            hook: hook.name.clone(),
            source,
        })?,
        None => DEFAULT_TIMEOUT,
    };
    let mut payload = payload.clone();
    if let Some(meta) = &hook.metadata {
        payload
            .metadata
            .extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let request_error = |source| HookError::Request {
        hook: hook.name.clone(),
        url: url.to_string(),
        source,
    };
    let rsp = client
        .post(url)
        .timeout(timeout)
        .json(&payload)
        .send()
        .await
        .map_err(request_error)?;
    let status = rsp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = rsp.text().await.unwrap_or_default();
    Err(HookError::Status {
        hook: hook.name.clone(),
        url: url.to_string(),
        status: status.as_u16(),
        body: body.chars().take(200).collect(),
    })
}
