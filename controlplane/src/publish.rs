//! How the indexes publish to watch streams: each watched value is sent through a
//! `tokio::sync::watch` channel only when it changed ([`send_changed`]), stamped with a version,
//! and encoded once as the NDJSON line every stream writes ([`Published`]). [`json_line`] is that
//! line encoding, which the resource API's watch streams share.
//!
//! It sits below the discovery [`crate::index`], the [`crate::policy`] index and the serving
//! modules, so the pure indexes depend on no HTTP plumbing.

use std::collections::BTreeMap;

use bytes::Bytes;
use mesh_core::proxy_api::Update;
use serde::Serialize;
use tokio::sync::watch;

/// One JSON line, newline included.
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A published value and its NDJSON line, encoded once however many streams send it: with a
/// thousand proxies on one authority, encoding per stream would dominate propagation time.
#[derive(Clone, Debug)]
pub struct Published<T> {
    /// The update.
    pub update: Update<T>,
    /// `update` as one JSON line, newline included.
    pub line: Bytes,
    /// When it was published: streams measure propagation from here.
    pub at: std::time::Instant,
}

impl<T: Serialize> Published<T> {
    pub(crate) fn new(version: u64, value: Option<T>) -> Self {
        let update = Update { version, value };
        let line = json_line(&update);
        Self {
            update,
            line,
            at: std::time::Instant::now(),
        }
    }
}

impl<T> std::ops::Deref for Published<T> {
    type Target = Update<T>;

    fn deref(&self) -> &Update<T> {
        &self.update
    }
}

/// Sends each of `values` (the new value of a watched key) to that key's watch when it differs
/// from what the watch holds, stamped `version`; unchanged watches are not woken. Both indexes
/// publish through this.
pub(crate) fn send_changed<K: Ord, T: PartialEq + Serialize>(
    watches: &BTreeMap<K, watch::Sender<Published<T>>>,
    values: Vec<(K, Option<T>)>,
    version: u64,
) {
    for (key, value) in values {
        if let Some(tx) = watches.get(&key) {
            tx.send_if_modified(|u| {
                if u.value == value {
                    return false;
                }
                *u = Published::new(version, value);
                true
            });
        }
    }
}
