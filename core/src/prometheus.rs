//! How a Prometheus finds the proxies and labels their series: the scrape configs the docs
//! show and `mesh install --prometheus` renders, built here once so the docs, the installer and
//! the tests that run them against a real Prometheus cannot drift apart.
//!
//! - **Embedded mesh:** HTTP service discovery from the control plane
//!   ([`crate::proxy_api::HTTP_SD_PATH`], behind the resource API's token). The proxies write
//!   Linkerd's resource labels (`namespace`, `deployment`, `pod`) themselves, so the job keeps
//!   the scraped labels as they are.
//! - **Kubernetes:** pod discovery, keeping the `mesh-proxy` container's `mesh-admin` port, with
//!   the relabeling Linkerd's own scrape config does: `namespace` and `pod` from the pod,
//!   `deployment` (or `statefulset`, `daemonset`) from the pod's controller.

use crate::metrics::label;

/// The name of the scrape job both configs define.
pub const JOB: &str = "mesh-proxy";

/// The name of the scrape job of the embedded control plane's own `/metrics`.
pub const CONTROLPLANE_JOB: &str = "mesh-controlplane";

/// The name of the proxy's admin port in an injected pod.
pub const ADMIN_PORT_NAME: &str = "mesh-admin";

/// The proxy container's name in an injected pod.
pub const PROXY_CONTAINER: &str = "mesh-proxy";

/// Two `scrape_configs` entries (list items under `scrape_configs:`): every proxy the embedded
/// control plane at `api` (`http://host:port`, its resource API) has registered, and the control
/// plane's own `/metrics` (the rollout metrics), every `interval` (a Prometheus duration such as `10s`), presenting the token in
/// `token_file` (`<state>/controlplane/api-token`).
pub fn embedded_scrape_config(api: &str, token_file: &str, interval: &str) -> String {
    let api = api.trim_end_matches('/');
    let host = api
        .strip_prefix("http://")
        .or_else(|| api.strip_prefix("https://"))
        .unwrap_or(api);
    let path = crate::proxy_api::HTTP_SD_PATH;
    format!(
        "- job_name: {JOB}
  scrape_interval: {interval}
  http_sd_configs:
    - url: {api}{path}
      refresh_interval: {interval}
      # `type` is spelled out: some Prometheus releases send the bare token without it.
      authorization:
        type: Bearer
        credentials_file: {token_file}
# The rollout metrics (Flagger's `flagger_canary_*` and `mesh_canary_*`) and the control
# plane's own, from the same API.
- job_name: {CONTROLPLANE_JOB}
  scrape_interval: {interval}
  authorization:
    type: Bearer
    credentials_file: {token_file}
  static_configs:
    - targets: [\"{host}\"]
"
    )
}

/// One `scrape_configs` entry scraping every injected proxy of a cluster, with Linkerd's
/// resource labels added by relabeling; `namespaces` limits discovery (empty: all).
pub fn kubernetes_scrape_config(namespaces: &[&str], interval: &str) -> String {
    let names = if namespaces.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = namespaces.iter().map(|n| format!("\"{n}\"")).collect();
        format!("\n      namespaces:\n        names: [{}]", list.join(", "))
    };
    format!(
        "- job_name: {JOB}
  scrape_interval: {interval}
  kubernetes_sd_configs:
    - role: pod{names}
  relabel_configs:
{}",
        kubernetes_relabeling("source_labels", "target_label", "    ")
    )
}

/// The relabeling of a cluster's proxy targets, written with `source` and `target` as the
/// field names (`source_labels`/`target_label` in a scrape config, `sourceLabels`/`targetLabel`
/// in a PodMonitor) and each rule indented by `indent`.
pub fn kubernetes_relabeling(source: &str, target: &str, indent: &str) -> String {
    let rules: Vec<String> = vec![
        format!(
            "- {source}: [__meta_kubernetes_pod_container_name, __meta_kubernetes_pod_container_port_name]\n  action: keep\n  regex: {PROXY_CONTAINER};{ADMIN_PORT_NAME}"
        ),
        format!(
            "- {source}: [__meta_kubernetes_namespace]\n  {target}: {}",
            label::NAMESPACE
        ),
        format!(
            "- {source}: [__meta_kubernetes_pod_name]\n  {target}: {}",
            label::POD
        ),
        // A Deployment's pods belong to a ReplicaSet named `<deployment>-<pod-template-hash>`.
        format!(
            "- {source}: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]\n  regex: ReplicaSet;(.+)-[^-]+\n  {target}: {}",
            label::DEPLOYMENT
        ),
        format!(
            "- {source}: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]\n  regex: StatefulSet;(.+)\n  {target}: statefulset"
        ),
        format!(
            "- {source}: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]\n  regex: DaemonSet;(.+)\n  {target}: daemonset"
        ),
    ];
    let mut out = String::new();
    for rule in rules {
        for line in rule.lines() {
            out.push_str(indent);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/metrics.md shows the metric table and both scrape configs as this crate renders them.
    #[test]
    fn the_metrics_doc_shows_the_contract_and_the_scrape_configs() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        let blocks = [
            (
                "metrics table: generated from mesh_core::metrics",
                "end of metrics table",
                crate::metrics::markdown_table(),
            ),
            (
                "embedded scrape config: generated from mesh_core::prometheus",
                "end of embedded scrape config",
                format!(
                    "```yaml\nscrape_configs:\n{}```\n",
                    indent(&embedded_scrape_config(
                        "http://127.0.0.1:7070",
                        "/var/lib/mesh/controlplane/api-token",
                        "10s"
                    ))
                ),
            ),
            (
                "cluster scrape config: generated from mesh_core::prometheus",
                "end of cluster scrape config",
                format!(
                    "```yaml\nscrape_configs:\n{}```\n",
                    indent(&kubernetes_scrape_config(&[], "10s"))
                ),
            ),
        ];
        let mut want = doc.clone();
        for (begin, end, body) in blocks {
            let (begin, end) = (format!("<!-- {begin} -->\n"), format!("<!-- {end} -->"));
            let Some((head, rest)) = want.split_once(&begin) else {
                panic!("docs/metrics.md lacks {begin}");
            };
            let Some((_, tail)) = rest.split_once(&end) else {
                panic!("docs/metrics.md lacks {end}");
            };
            want = format!("{head}{begin}{body}{end}{tail}");
        }
        if std::env::var_os("MESH_UPDATE_DOCS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        assert!(
            doc == want,
            "docs/metrics.md drifted from the code; rerun with MESH_UPDATE_DOCS=1"
        );
    }

    fn indent(text: &str) -> String {
        text.lines().map(|l| format!("  {l}\n")).collect()
    }

    #[test]
    fn the_embedded_config_discovers_through_the_control_plane() {
        let c = embedded_scrape_config("http://127.0.0.1:7000/", "/s/api-token", "5s");
        assert!(
            c.contains("url: http://127.0.0.1:7000/v1/prometheus/targets\n"),
            "{c}"
        );
        assert!(c.contains("credentials_file: /s/api-token\n"), "{c}");
        assert!(
            c.starts_with("- job_name: mesh-proxy\n  scrape_interval: 5s\n"),
            "{c}"
        );
    }

    #[test]
    fn the_kubernetes_config_relabels_as_linkerd_does() {
        let c = kubernetes_scrape_config(&["shop"], "10s");
        assert!(c.contains("names: [\"shop\"]"), "{c}");
        assert!(c.contains("regex: mesh-proxy;mesh-admin\n"), "{c}");
        for target in ["namespace", "pod", "deployment"] {
            assert!(c.contains(&format!("target_label: {target}\n")), "{c}");
        }
        let monitor = kubernetes_relabeling("sourceLabels", "targetLabel", "  ");
        assert!(
            monitor.contains(
                "  - sourceLabels: [__meta_kubernetes_namespace]\n    targetLabel: namespace\n"
            ),
            "{monitor}"
        );
    }
}
