//! Route status in a cluster: every HTTPRoute and GRPCRoute with a Service parent gets a
//! `status.parents[]` entry per such parent under the mesh's controller name, with Gateway API's
//! `Accepted` (the parent Service exists) and `ResolvedRefs` (every backendRef names a Service
//! that exists) conditions, so `kubectl get httproute -o yaml` says whether the mesh took it.
//!
//! [`statuses`] is pure: routes and the set of Services in, the status each route should have
//! out. [`write_statuses`] follows the cluster's routes and Services and writes, with
//! server-side apply under one field manager, the whole status of each route whose wanted
//! status differs from the one it has (conditions compared without their timestamps).

use std::collections::BTreeSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mesh_crds::{GrpcRoute, HttpRoute};
use serde_json::{Value, json};

/// The controller name the mesh writes route status under.
pub const CONTROLLER_NAME: &str = "mesh.dev/controlplane";
/// The field manager of status writes.
const FIELD_MANAGER: &str = "mesh-controlplane-route-status";

/// One route as the status computation reads it (a stored HTTPRoute or GRPCRoute, as JSON).
#[derive(Clone, Debug)]
pub struct RouteObject {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// The whole object.
    pub object: Value,
}

/// The `status` a route should have, or `None` when it has no Service parent (not the mesh's).
/// `services` holds every Service as `(namespace, name)`; `now` stamps new conditions.
pub fn statuses(route: &Value, services: &BTreeSet<(String, String)>, now: &str) -> Option<Value> {
    let ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
    let generation = route["metadata"]["generation"].as_i64().unwrap_or(0);
    let is_service = |r: &Value, default_kind: &str| {
        r["group"].as_str().unwrap_or("").is_empty()
            && r["kind"].as_str().unwrap_or(default_kind) == "Service"
    };
    let parents: Vec<&Value> = route["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service(p, "Gateway"))
        .collect();
    if parents.is_empty() {
        return None;
    }
    let missing: Vec<String> = route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["backendRefs"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| {
            if !is_service(&b, "Service") {
                return Some(format!(
                    "{}/{} is not a Service",
                    b["kind"].as_str().unwrap_or("?"),
                    b["name"].as_str().unwrap_or("?")
                ));
            }
            let name = b["name"].as_str()?.to_string();
            let bns = b["namespace"].as_str().unwrap_or(ns).to_string();
            (!services.contains(&(bns.clone(), name.clone())))
                .then(|| format!("Service {bns}/{name} not found"))
        })
        .collect();
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": now,
        })
    };
    let entries: Vec<Value> = parents
        .iter()
        .map(|p| {
            let pns = p["namespace"].as_str().unwrap_or(ns).to_string();
            let pname = p["name"].as_str().unwrap_or("").to_string();
            let exists = services.contains(&(pns.clone(), pname.clone()));
            let mut parent_ref = json!({"group": "", "kind": "Service", "name": pname});
            if p["namespace"].is_string() {
                parent_ref["namespace"] = json!(pns);
            }
            if let Some(port) = p["port"].as_i64() {
                parent_ref["port"] = json!(port);
            }
            let accepted = if exists {
                condition(
                    "Accepted",
                    true,
                    "Accepted",
                    "attached to the Service".into(),
                )
            } else {
                condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!("Service {pns}/{pname} not found"),
                )
            };
            let resolved = if missing.is_empty() {
                condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "all backends resolved".into(),
                )
            } else {
                condition("ResolvedRefs", false, "BackendNotFound", missing.join("; "))
            };
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved],
            })
        })
        .collect();
    Some(json!({"parents": entries}))
}

/// Whether `have` already says what `want` says, timestamps aside.
pub fn same_status(have: &Value, want: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        for p in v["parents"].as_array_mut().into_iter().flatten() {
            for c in p["conditions"].as_array_mut().into_iter().flatten() {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(have) == strip(want)
}

/// Keeps the status of the cluster's HTTPRoutes and GRPCRoutes with Service parents current.
/// Runs until the watches end (never, in practice: they back off and retry).
pub async fn write_statuses(client: Client) {
    let (services, services_writer) = reflector::store::<Service>();
    let (http, http_writer) = reflector::store::<HttpRoute>();
    let (grpc, grpc_writer) = reflector::store::<GrpcRoute>();
    let config = watcher::Config::default();
    let streams = [
        reflector::reflector(
            services_writer,
            watcher::watcher(Api::<Service>::all(client.clone()), config.clone()),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
        reflector::reflector(
            http_writer,
            watcher::watcher(Api::<HttpRoute>::all(client.clone()), config.clone()),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
        reflector::reflector(
            grpc_writer,
            watcher::watcher(Api::<GrpcRoute>::all(client.clone()), config),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
    ];
    let mut changes = futures_util::stream::select_all(streams);
    while changes.next().await.is_some() {
        let names: BTreeSet<(String, String)> = services
            .state()
            .iter()
            .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let routes = http
            .state()
            .iter()
            .filter_map(|r| serde_json::to_value(r.as_ref()).ok())
            .map(|object| RouteObject {
                kind: "HTTPRoute",
                object,
            })
            .chain(
                grpc.state()
                    .iter()
                    .filter_map(|r| serde_json::to_value(r.as_ref()).ok())
                    .map(|object| RouteObject {
                        kind: "GRPCRoute",
                        object,
                    }),
            )
            .collect::<Vec<_>>();
        for route in routes {
            let Some(want) = statuses(&route.object, &names, &now) else {
                continue;
            };
            if same_status(&route.object["status"], &want) {
                continue;
            }
            let ns = route.object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = route.object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let patch = json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": route.kind,
                "metadata": {"name": name, "namespace": ns},
                "status": want,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let result = if route.kind == "HTTPRoute" {
                Api::<HttpRoute>::namespaced(client.clone(), &ns)
                    .patch_status(&name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            } else {
                Api::<GrpcRoute>::namespaced(client.clone(), &ns)
                    .patch_status(&name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            };
            if let Err(error) = result {
                tracing::warn!(%error, kind = route.kind, %ns, %name, "writing route status failed");
            }
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::needless_pass_by_value,
    reason = "builders read better taking json! values"
)]
mod tests {
    use super::*;

    fn services(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(n, s)| ((*n).to_string(), (*s).to_string()))
            .collect()
    }

    fn route(parents: Value, backends: Value) -> Value {
        json!({
            "metadata": {"name": "r", "namespace": "shop", "generation": 3},
            "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]}
        })
    }

    fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
        status["parents"][0]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
    }

    #[test]
    fn a_route_to_existing_services_is_accepted_with_resolved_refs() {
        let r = route(
            json!([{"group": "", "kind": "Service", "name": "web", "port": 80}]),
            json!([{"name": "web-v2", "port": 80}]),
        );
        let s = statuses(&r, &services(&[("shop", "web"), ("shop", "web-v2")]), "t").unwrap();
        assert_eq!(s["parents"][0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(
            s["parents"][0]["parentRef"],
            json!({"group": "", "kind": "Service", "name": "web", "port": 80})
        );
        assert_eq!(condition(&s, "Accepted")["status"], "True");
        assert_eq!(condition(&s, "ResolvedRefs")["status"], "True");
        assert_eq!(condition(&s, "Accepted")["observedGeneration"], 3);
    }

    #[test]
    fn missing_parents_and_backends_are_named() {
        let r = route(
            json!([{"group": "", "kind": "Service", "name": "gone"}]),
            json!([{"name": "nowhere", "port": 80}]),
        );
        let s = statuses(&r, &services(&[]), "t").unwrap();
        let accepted = condition(&s, "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "NoMatchingParent");
        let resolved = condition(&s, "ResolvedRefs");
        assert_eq!(resolved["reason"], "BackendNotFound");
        assert!(
            resolved["message"]
                .as_str()
                .unwrap()
                .contains("shop/nowhere")
        );
    }

    #[test]
    fn gateway_routes_are_not_the_meshs_and_timestamps_do_not_count_as_changes() {
        let r = route(json!([{"name": "gw"}]), json!([]));
        assert!(statuses(&r, &services(&[]), "t").is_none());
        let r = route(
            json!([{"group": "", "kind": "Service", "name": "web"}]),
            json!([]),
        );
        let a = statuses(&r, &services(&[("shop", "web")]), "t1").unwrap();
        let b = statuses(&r, &services(&[("shop", "web")]), "t2").unwrap();
        assert!(same_status(&a, &b));
        let c = statuses(&r, &services(&[]), "t2").unwrap();
        assert!(!same_status(&a, &c));
    }
}
