//! What `mesh stat workloads` adds from the Kubernetes API in a cluster: every Deployment of
//! the namespace (or of all), with the pods it runs and how many of them the injector meshed,
//! joined with Prometheus's traffic rows. A Deployment without traffic still gets its row, as in
//! `linkerd viz stat`.

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use mesh_controlplane::inject::INJECTED_ANNOTATION;
use mesh_observe::{Query, StatRow};

/// Sets each row's meshed and total pods from the cluster's Deployments, and adds a row for
/// each Deployment Prometheus has no traffic of.
pub async fn with_pods(client: &Client, q: &Query, rows: &mut Vec<StatRow>) -> anyhow::Result<()> {
    let (deployments, pods): (Api<Deployment>, Api<Pod>) = match &q.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let deployments = deployments
        .list(&ListParams::default())
        .await
        .context("listing Deployments in the cluster")?
        .items;
    let pods = pods
        .list(&ListParams::default())
        .await
        .context("listing Pods in the cluster")?
        .items;
    let counts = pod_counts(&deployments, &pods);
    for ((namespace, name), (meshed, total)) in counts {
        if q.name.as_ref().is_some_and(|n| *n != name) {
            continue;
        }
        match rows
            .iter_mut()
            .find(|r| r.namespace == namespace && r.name == name)
        {
            Some(row) => {
                row.meshed = meshed;
                row.total = total;
            }
            None => rows.push(StatRow {
                namespace,
                name,
                meshed,
                total,
                ..StatRow::default()
            }),
        }
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(())
}

/// Each Deployment's (meshed, total) running pods, by (namespace, name): the pods its selector's
/// labels match that have not ended, meshed when the injector marked them.
pub fn pod_counts(
    deployments: &[Deployment],
    pods: &[Pod],
) -> BTreeMap<(String, String), (u32, u32)> {
    let mut out = BTreeMap::new();
    for d in deployments {
        let namespace = d.namespace().unwrap_or_default();
        let wanted = d
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        let mut counts = (0u32, 0u32);
        if !wanted.is_empty() {
            for pod in pods {
                let ended = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Succeeded" || p == "Failed");
                let labels = pod.labels();
                if pod.namespace().unwrap_or_default() != namespace
                    || ended
                    || pod.metadata.deletion_timestamp.is_some()
                    || !wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
                {
                    continue;
                }
                counts.1 += 1;
                if pod.annotations().contains_key(INJECTED_ANNOTATION) {
                    counts.0 += 1;
                }
            }
        }
        out.insert((namespace, d.name_any()), counts);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_counts_its_live_pods_and_the_meshed_ones() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}}},
        }))
        .unwrap();
        let pod = |name: &str, ns: &str, app: &str, meshed: bool, phase: &str| -> Pod {
            let annotations = if meshed {
                serde_json::json!({INJECTED_ANNOTATION: "proxy:1"})
            } else {
                serde_json::json!({})
            };
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": {"app": app},
                             "annotations": annotations},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let pods = [
            pod("a", "shop", "web", true, "Running"),
            pod("b", "shop", "web", false, "Running"),
            pod("c", "shop", "web", true, "Succeeded"),
            pod("d", "prod", "web", true, "Running"),
            pod("e", "shop", "db", true, "Running"),
        ];
        let counts = pod_counts(&[d], &pods);
        assert_eq!(counts[&("shop".to_string(), "web".to_string())], (1, 2));
    }
}
