//! Who may use the resource API: the holder of its token. On first start the control plane
//! writes a random token to [`API_TOKEN_FILE`] in its state directory, readable by its owner
//! only (mode 0600), and answers every resource request without it (reads, writes, watches,
//! and with them the rollout actions, which are writes) with 401 and applies nothing. Only
//! `/healthz` is open, and says nothing but "ok".
//!
//! `mesh` finds the token as kubectl finds a kubeconfig: `--token-file` or `MESH_TOKEN_FILE`
//! when given, else the pointer the control plane leaves for its owner under
//! `$MESH_CONFIG_DIR/servers/` (default `~/.mesh/servers/`), one file per API address holding
//! the token file's path (never the token itself).
//!
//! The token is never logged, printed or stored anywhere else: [`ApiToken`]'s `Debug` shows
//! only its file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::header::{HeaderValue, InvalidHeaderValue};
use http::{Request, Response, StatusCode, header};

use crate::http::{Body, status_error};
use crate::identity::IdentityError;

/// The `Authorization` value that presents `secret` (a token file's contents) to the resource
/// API, marked sensitive so it stays out of debug output; an error when the file's contents
/// cannot be a header value.
pub fn authorization(secret: &str) -> Result<HeaderValue, InvalidHeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", secret.trim()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The token file, in the state directory.
pub const API_TOKEN_FILE: &str = "api-token";

/// Where the control plane leaves pointers to its token for its owner's `mesh`, and where
/// `mesh` looks for them (default `$HOME/.mesh`).
pub const ENV_CONFIG_DIR: &str = "MESH_CONFIG_DIR";

/// The resource API's token.
#[derive(Clone)]
pub struct ApiToken {
    secret: String,
    path: PathBuf,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// The token in `state_dir`, made (mode 0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        let path = state_dir.join(API_TOKEN_FILE);
        let secret = crate::identity::load_or_create_secret(&path)?;
        Ok(Self { secret, path })
    }

    /// The file holding it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `Authorization` value that carries the token; an error when the token file was
    /// edited into something no header can hold.
    pub fn authorization(&self) -> Result<HeaderValue, InvalidHeaderValue> {
        authorization(&self.secret)
    }

    /// Whether `req` carries the token (`Authorization: Bearer <token>`).
    pub fn admits<B>(&self, req: &Request<B>) -> bool {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| same(given.trim().as_bytes(), self.secret.as_bytes()))
    }

    /// Leaves a pointer to the token for the API at `api`, so its owner's `mesh` finds it;
    /// best effort (a control plane without a writable home still serves).
    pub fn register(&self, api: SocketAddr) {
        let mut addrs = vec![api];
        // A wildcard listener is reached on loopback.
        if api.ip().is_unspecified() {
            addrs.push(SocketAddr::new(
                std::net::Ipv4Addr::LOCALHOST.into(),
                api.port(),
            ));
        }
        for addr in addrs {
            let Some(pointer) = pointer_for(&format!("http://{addr}")) else {
                return;
            };
            if let Err(e) = write_pointer(&pointer, &self.path) {
                tracing::debug!(pointer = %pointer.display(), error = %e, "cannot leave a pointer to the API token");
            }
        }
    }
}

/// A fresh random secret (256 bits, hex) for a credential that stands in for the token where
/// the token itself must not be shown, such as a one-time sign-in link.
pub fn fresh_secret() -> Result<String, IdentityError> {
    crate::identity::random_hex(32)
}

/// Compares in time independent of where the first difference is.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_pointer(pointer: &Path, token: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = pointer.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let token = std::fs::canonicalize(token).unwrap_or_else(|_| token.to_path_buf());
    let tmp = pointer_tmp(pointer);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, format!("{}\n", token.display()).as_bytes())?;
    std::fs::rename(tmp, pointer)
}

/// A temporary name beside `pointer`, its own to this write: control planes starting together
/// (and every address's pointer) must not share one. `with_extension` would, since a pointer's
/// name (`127.0.0.1_4180`) has dots: every pointer on 127.0.0.1 wrote through `127.0.0.tmp`.
fn pointer_tmp(pointer: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = pointer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    pointer.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// The directory of pointers: `$MESH_CONFIG_DIR/servers`, else `$HOME/.mesh/servers`.
fn servers_dir() -> Option<PathBuf> {
    let base = match std::env::var_os(ENV_CONFIG_DIR).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".mesh"),
    };
    Some(base.join("servers"))
}

/// Where the pointer for the API at `server` (`http://host:port`) lives.
pub fn pointer_for(server: &str) -> Option<PathBuf> {
    let authority = server
        .trim_end_matches('/')
        .strip_prefix("http://")
        .or_else(|| server.strip_prefix("https://"))
        .unwrap_or(server);
    let name: String = authority
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Some(servers_dir()?.join(name))
}

/// The token file the control plane at `server` left a pointer to, if any.
pub fn token_file_for(server: &str) -> Option<PathBuf> {
    let pointer = std::fs::read_to_string(pointer_for(server)?).ok()?;
    let path = PathBuf::from(pointer.trim());
    path.exists().then_some(path)
}

/// The answer to a request without the token.
pub fn unauthorized() -> Response<Body> {
    let mut rsp = status_error(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        format!(
            "the resource API needs its token (Authorization: Bearer), which the control plane \
             keeps in {API_TOKEN_FILE} in its state directory, readable by its owner only; \
             `mesh` finds it for the user who started the mesh, or give it with --token-file \
             or MESH_TOKEN_FILE"
        ),
        None,
    );
    rsp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_written_together_each_get_their_own_temporary_file() {
        let a = pointer_tmp(Path::new("/x/servers/127.0.0.1_4180"));
        let b = pointer_tmp(Path::new("/x/servers/127.0.0.1_4181"));
        let c = pointer_tmp(Path::new("/x/servers/127.0.0.1_4180"));
        assert_ne!(a, b);
        assert_ne!(a, c, "two writes of one pointer");
        assert_eq!(a.parent(), Some(Path::new("/x/servers")));
        assert!(
            a.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".127.0.0.1_4180."),
            "{}",
            a.display()
        );
    }

    #[test]
    fn only_the_exact_token_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let token = ApiToken::load_or_create(dir.path()).unwrap();
        let again = ApiToken::load_or_create(dir.path()).unwrap();
        assert_eq!(token.secret, again.secret, "the token survives a restart");
        assert_eq!(token.secret.len(), 64);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(token.path()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let with = |value: &str| {
            Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(())
                .unwrap()
        };
        assert!(token.admits(&with(&format!("Bearer {}", token.secret))));
        assert!(!token.admits(&Request::new(())));
        assert!(!token.admits(&with(&format!("Basic {}", token.secret))));
        assert!(!token.admits(&with(&format!("Bearer {}x", token.secret))));
        assert!(!token.admits(&with("Bearer ")));
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.secret), "{shown}");
    }

    #[test]
    fn pointers_name_the_server_and_never_hold_the_token() {
        let p = pointer_for("http://127.0.0.1:4180/").unwrap();
        assert!(p.ends_with("servers/127.0.0.1_4180"), "{}", p.display());
    }
}
