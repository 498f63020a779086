//! What both backends share: where the embedded control plane is, and how a write turns out
//! (applied, refused, or stopped at a document). It sits below the backends and the module that
//! chooses between them.

use serde_json::Value;

/// Where the control plane is and which namespace to work in.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The control plane's resource API.
    #[arg(long, env = "MESH_SERVER", default_value = "http://127.0.0.1:4180")]
    pub server: String,
    /// The file holding the resource API's token (the control plane's `api-token`, mode
    /// 0600); by default the one the control plane at --server left a pointer to for the user
    /// who started it (`~/.mesh/servers/`).
    #[arg(long, env = "MESH_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Namespace of the resources.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

/// What an apply did to one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// `created`, `configured` or `unchanged`.
    pub action: String,
    /// The object as stored.
    pub object: Value,
}

/// A request the store refused, as its Kubernetes `Status` tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The HTTP status code.
    pub code: u16,
    /// The `Status` reason (`NotFound`, `Invalid`, `Conflict`, ...).
    pub reason: String,
    /// What the store said.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "from server ({}): {}", self.reason, self.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// Whether `e` is a refusal because the object does not exist.
    pub fn is_not_found(e: &anyhow::Error) -> bool {
        e.downcast_ref::<Self>().is_some_and(|r| r.code == 404)
    }
}

/// Why an apply stopped.
#[derive(Debug)]
pub enum ApplyError {
    /// One document was refused, by validation or by the store.
    Document {
        /// Its position in the batch, from 0.
        index: usize,
        /// The field at fault, when one is named.
        field: Option<String>,
        /// What is wrong.
        message: String,
        /// What was written before it: nothing through the embedded API, whose batches are
        /// atomic, nor when validation refused it; in a cluster, the documents before it when
        /// the apiserver refused it.
        applied: Vec<Applied>,
    },
    /// The request failed as a whole; nothing was written.
    Request(anyhow::Error),
}

impl From<anyhow::Error> for ApplyError {
    fn from(e: anyhow::Error) -> Self {
        Self::Request(e)
    }
}
