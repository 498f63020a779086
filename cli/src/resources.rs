//! `mesh apply`, `mesh get` and `mesh delete`: kubectl-style commands against the embedded
//! control plane's resource API or, with `--kube`, `--kubeconfig` or `--context`, a Kubernetes
//! cluster (see [`crate::backend`]).
//!
//! Files are parsed here, so a malformed YAML document is reported with its file and line before
//! anything is sent; everything else (types, required fields, rules such as `stepWeight <=
//! maxWeight`) is checked with `mesh_crds::validate`: by the embedded control plane, or here
//! before anything reaches a cluster. A refused batch writes nothing, and the error names the
//! file, the document and the field at fault.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, anyhow, bail};
use mesh_crds::validate::ResourceKind;
use serde_json::Value;

use crate::backend::{Applied, ApplyError, Backend, Where};

/// Output formats of `mesh get`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    /// Whole objects as YAML.
    Yaml,
    /// Whole objects as JSON.
    Json,
}

/// What to do.
#[derive(Debug)]
pub enum Action {
    /// `mesh apply -f ...`.
    Apply(Vec<PathBuf>),
    /// `mesh get KIND [NAME]`.
    Get {
        /// The kind as typed.
        kind: String,
        /// One name, or all.
        name: Option<String>,
        /// Output format; a table when none.
        output: Option<Output>,
    },
    /// `mesh delete KIND NAME`.
    Delete {
        /// The kind as typed.
        kind: String,
        /// The name.
        name: String,
    },
}

/// Runs a resource command, printing its result or its error.
pub fn run(at: &Where, action: Action) -> ExitCode {
    crate::runtime::block_on(false, execute(at, action))
        .map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

async fn execute(at: &Where, action: Action) -> anyhow::Result<()> {
    // A mistyped kind is reported before any connection is made.
    match action {
        Action::Apply(paths) => apply(&Backend::connect(at).await?, &paths).await,
        Action::Get { kind, name, output } => {
            let kind = parse_kind(&kind)?;
            get(&Backend::connect(at).await?, kind, name.as_deref(), output).await
        }
        Action::Delete { kind, name } => {
            let kind = parse_kind(&kind)?;
            Backend::connect(at).await?.delete(kind, &name).await?;
            print_out(&format!(
                "{}.{} \"{name}\" deleted",
                kind.kind().to_ascii_lowercase(),
                kind.group()
            ));
            Ok(())
        }
    }
}

#[allow(clippy::print_stdout, reason = "the CLI talks to its user")]
fn print_out(text: &str) {
    println!("{text}");
}

fn parse_kind(kind: &str) -> anyhow::Result<ResourceKind> {
    ResourceKind::from_user(kind).ok_or_else(|| {
        anyhow!(
            "the mesh serves no kind {kind:?}: use canary (canaries), metrictemplate (mt) or \
             httproute"
        )
    })
}

/// One document to apply and where it came from.
struct Source {
    file: PathBuf,
    document: usize,
}

pub(crate) fn files_of(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading directory {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

pub(crate) fn read_documents(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| {
            anyhow!(
                "{} (document {}): malformed YAML: {e}",
                file.display(),
                i + 1
            )
        })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `<kind>.<group>/<name> created|configured|unchanged`, as kubectl prints it.
fn print_applied(applied: &[Applied]) {
    for a in applied {
        let kind = a.object["kind"].as_str().unwrap_or_default();
        let group = a.object["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .map_or("", |(g, _)| g);
        print_out(&format!(
            "{}.{group}/{} {}",
            kind.to_ascii_lowercase(),
            a.object["metadata"]["name"].as_str().unwrap_or_default(),
            a.action
        ));
    }
}

async fn apply(backend: &Backend, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut items = Vec::new();
    let mut sources = Vec::new();
    for path in paths {
        for file in files_of(path)? {
            for (i, doc) in read_documents(&file)?.into_iter().enumerate() {
                items.push(doc);
                sources.push(Source {
                    file: file.clone(),
                    document: i + 1,
                });
            }
        }
    }
    if items.is_empty() {
        bail!("no objects to apply in {paths:?}");
    }
    match backend.apply(items).await {
        Ok(applied) => {
            print_applied(&applied);
            Ok(())
        }
        // Point at the file and document that was refused.
        Err(ApplyError::Document {
            index,
            field,
            message,
            applied,
        }) => {
            print_applied(&applied);
            let outcome = if applied.is_empty() {
                "nothing was applied"
            } else {
                "the objects above were applied; nothing after them"
            };
            let field = field.map(|f| format!("field {f}: ")).unwrap_or_default();
            match sources.get(index) {
                Some(source) => bail!(
                    "{} (document {}): {field}{message}\n{outcome}",
                    source.file.display(),
                    source.document,
                ),
                None => bail!("document {index}: {field}{message}\n{outcome}"),
            }
        }
        Err(ApplyError::Request(e)) => Err(e.context("nothing was applied")),
    }
}

async fn get(
    backend: &Backend,
    kind: ResourceKind,
    name: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let body = match name {
        Some(name) => backend.get(kind, name).await?,
        None => backend.list(kind).await?,
    };
    match output {
        Some(Output::Json) => print_out(&serde_json::to_string_pretty(&body)?),
        Some(Output::Yaml) => print_out(serde_yaml::to_string(&body)?.trim_end()),
        None => {
            let items = match name {
                Some(_) => vec![body],
                None => body["items"].as_array().cloned().unwrap_or_default(),
            };
            if items.is_empty() {
                #[allow(clippy::print_stderr, reason = "kubectl says this on stderr too")]
                {
                    eprintln!("No resources found in {} namespace.", backend.namespace());
                }
                return Ok(());
            }
            print_out(table(kind, &items, chrono::Utc::now()).trim_end());
        }
    }
    Ok(())
}

fn age(object: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(created) = object["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    let secs = (now - created.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn table(kind: ResourceKind, items: &[Value], now: chrono::DateTime<chrono::Utc>) -> String {
    let str_of = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        ResourceKind::Canary => (
            vec!["NAME", "STATUS", "WEIGHT", "AGE"],
            items
                .iter()
                .map(|o| {
                    vec![
                        str_of(&o["metadata"]["name"]),
                        o["status"]["phase"].as_str().unwrap_or("").to_string(),
                        o["status"]["canaryWeight"]
                            .as_i64()
                            .unwrap_or(0)
                            .to_string(),
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::MetricTemplate => (
            vec!["NAME", "PROVIDER", "AGE"],
            items
                .iter()
                .map(|o| {
                    vec![
                        str_of(&o["metadata"]["name"]),
                        str_of(&o["spec"]["provider"]["type"]),
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::HttpRoute | ResourceKind::GrpcRoute => (
            vec!["NAME", "PARENTS", "BACKENDS", "AGE"],
            items
                .iter()
                .map(|o| {
                    let parents: Vec<String> = o["spec"]["parentRefs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| str_of(&p["name"]))
                        .collect();
                    let backends: Vec<String> = o["spec"]["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|r| r["backendRefs"].as_array().cloned().unwrap_or_default())
                        .map(|b| {
                            format!(
                                "{}={}",
                                str_of(&b["name"]),
                                b["weight"].as_i64().unwrap_or(1)
                            )
                        })
                        .collect();
                    vec![
                        str_of(&o["metadata"]["name"]),
                        parents.join(","),
                        backends.join(","),
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::Workload => (
            vec!["NAME", "PORT", "VERSION", "PRIMARY", "CANARY", "AGE"],
            items
                .iter()
                .map(|o| {
                    let or_none = |v: &Value| {
                        if v.is_null() {
                            "<none>".to_string()
                        } else {
                            str_of(v)
                        }
                    };
                    vec![
                        str_of(&o["metadata"]["name"]),
                        or_none(&o["spec"]["port"]),
                        str_of(&o["spec"]["version"]),
                        or_none(&o["status"]["primary"]),
                        or_none(&o["status"]["canary"]),
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::Server => (
            vec!["NAME", "PORT", "PROTOCOL", "AGE"],
            items
                .iter()
                .map(|o| {
                    vec![
                        str_of(&o["metadata"]["name"]),
                        str_of(&o["spec"]["port"]),
                        o["spec"]["proxyProtocol"]
                            .as_str()
                            .unwrap_or("unknown")
                            .to_string(),
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::AuthorizationPolicy => (
            vec!["NAME", "TARGET", "AUTHENTICATIONS", "AGE"],
            items
                .iter()
                .map(|o| {
                    let refs: Vec<String> = o["spec"]["requiredAuthenticationRefs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| format!("{}/{}", str_of(&r["kind"]), str_of(&r["name"])))
                        .collect();
                    vec![
                        str_of(&o["metadata"]["name"]),
                        format!(
                            "{}/{}",
                            str_of(&o["spec"]["targetRef"]["kind"]),
                            str_of(&o["spec"]["targetRef"]["name"])
                        ),
                        if refs.is_empty() {
                            "<none>".to_string()
                        } else {
                            refs.join(",")
                        },
                        age(o, now),
                    ]
                })
                .collect(),
        ),
        ResourceKind::MeshTlsAuthentication | ResourceKind::NetworkAuthentication => (
            vec!["NAME", "AGE"],
            items
                .iter()
                .map(|o| vec![str_of(&o["metadata"]["name"]), age(o, now)])
                .collect(),
        ),
    };
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn route_tables_show_weights() {
        let now = chrono::Utc::now();
        let created = (now - chrono::Duration::seconds(90)).to_rfc3339();
        let route = json!({
            "metadata": {"name": "web", "creationTimestamp": created},
            "spec": {"parentRefs": [{"name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web-primary", "weight": 90},
                                                {"name": "web-canary", "weight": 10}]}]}
        });
        let t = table(ResourceKind::HttpRoute, &[route], now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(lines[1].contains("web-primary=90,web-canary=10"), "{t}");
        assert!(lines[1].ends_with("90s"), "{t}");
    }

    #[test]
    fn kinds_are_named_like_kubectl() {
        assert!(parse_kind("canaries").is_ok());
        assert!(parse_kind("HTTPRoute").is_ok());
        assert!(parse_kind("pods").unwrap_err().to_string().contains("pods"));
    }
}
