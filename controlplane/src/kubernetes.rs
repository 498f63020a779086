//! The control plane's Kubernetes backend: the discovery index fed from the cluster instead of
//! the embedded store and workload registrations.
//!
//! - **Resources.** The cluster is the control plane's store
//!   ([`mesh_store::kubernetes::KubernetesStore`]): the resource API serves it, and its
//!   HTTPRoutes and policy objects feed the route and policy indexes through the same code as
//!   the embedded store's.
//! - **Endpoints.** Reflectors over Services, EndpointSlices and Pods. Each ready address of an
//!   EndpointSlice becomes an endpoint of `<service>.<namespace>:<service port>`, at the pod's IP
//!   and the slice's target port. A pod the injector marked (`mesh.dev/injected`) is meshed: its
//!   endpoint carries the SPIFFE ID of its service account, which peers must present over mTLS,
//!   and is the proxy's inbound port on the pod's IP, which the injector's rules leave
//!   unredirected. Peer proxies connect there directly, so their mTLS is never taken for the
//!   app's own traffic on a port declared opaque (which the inbound proxy forwards unsniffed).
//!   Endpoints are fed to the index as registrations under ids derived from the slice, address
//!   and port; each change of the three caches recomputes them and applies only the difference.
//!
//! - **Service addresses.** Every ClusterIP and TCP port of a Service is its own address, so a
//!   proxy that sees a redirected connection to it knows which service the app meant.
//!
//! - **Route status.** HTTPRoutes and GRPCRoutes with Service parents get `Accepted` and
//!   `ResolvedRefs` under the mesh's controller name ([`crate::route_status`]).
//! - **Identity.** Proxies present their projected service-account tokens, which the control
//!   plane checks with TokenReview (see [`crate::tokenreview`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use mesh_core::SpiffeId;
use mesh_core::proxy_api::{ServiceRef, WorkloadRegistration};
use tokio::net::TcpListener;

use crate::inject::{INJECTED_ANNOTATION, deployment_of};
use crate::{ControlPlane, Shared};
use mesh_store::kubernetes::KubernetesStore;

/// Label EndpointSlices carry naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl ControlPlane {
    /// Serves the resource API and the proxy API like [`ControlPlane::serve`], with the
    /// discovery index fed from the cluster behind `client`. As there, the pointer to the API
    /// token is left before this returns.
    pub fn serve_kubernetes(
        self,
        client: Client,
        trust_domain: String,
        api: TcpListener,
        proxy: TcpListener,
    ) -> impl std::future::Future<Output = ()> + Send {
        if let Ok(addr) = api.local_addr() {
            self.api_token.register(addr);
        }
        self.serve_cluster(client, trust_domain, api, proxy)
    }

    async fn serve_cluster(
        self,
        client: Client,
        trust_domain: String,
        api: TcpListener,
        proxy: TcpListener,
    ) {
        // Proxies in pods authenticate with their projected tokens, checked by TokenReview.
        let _ = self.shared.kube.set(client.clone());
        let client_for_observe = client.clone();
        // The cluster is the store: the resource API serves it, and it feeds the route and
        // policy indexes exactly as the embedded store does.
        let store = KubernetesStore::start(client.clone());
        crate::spawn_feeds(&store, &self.shared);
        tokio::spawn(crate::route_status::write_statuses(client.clone()));
        tokio::spawn(feed_endpoints(
            client,
            trust_domain,
            Arc::clone(&self.shared),
        ));
        crate::serve_apis(
            store,
            self.shared,
            &self.proxy_tls,
            &self.api_token,
            // In a cluster Prometheus keeps the metrics (registrations carry no admin address
            // to scrape), so the window stays empty; taps go to the pods' proxies.
            crate::observe::Observe::in_cluster(client_for_observe),
            api,
            proxy,
        )
        .await;
    }
}

/// Keeps the index's endpoints in step with the cluster's EndpointSlices.
pub async fn feed_endpoints(client: Client, trust_domain: String, shared: Arc<Shared>) {
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let config = watcher::Config::default();
    let services_stream = reflector::reflector(
        services_writer,
        watcher::watcher(Api::<Service>::all(client.clone()), config.clone()),
    )
    .default_backoff()
    .map(|_| ())
    .boxed();
    let slices_stream = reflector::reflector(
        slices_writer,
        watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config.clone()),
    )
    .default_backoff()
    .map(|_| ())
    .boxed();
    let pods_stream = reflector::reflector(
        pods_writer,
        watcher::watcher(Api::<Pod>::all(client), config),
    )
    .default_backoff()
    .map(|_| ())
    .boxed();
    let mut changes =
        futures_util::stream::select_all([services_stream, slices_stream, pods_stream]);
    let mut applied: BTreeMap<String, WorkloadRegistration> = BTreeMap::new();
    while changes.next().await.is_some() {
        let wanted = registrations(&services, &slices, &pods, &trust_domain);
        let addresses = service_addresses(&services.state());
        let mut index = shared.index();
        index.reset_service_addresses(addresses);
        for id in applied.keys() {
            if !wanted.contains_key(id) {
                index.delete_workload(id);
            }
        }
        for (id, registration) in &wanted {
            if applied.get(id) != Some(registration) {
                index.apply_workload(id, registration.clone());
            }
        }
        drop(index);
        applied = wanted;
    }
}

/// Every Service's ClusterIPs and TCP ports, as the service each stands for. Headless Services
/// (`clusterIP: None`) have none: their clients dial endpoints, which are known by address.
pub fn service_addresses(services: &[Arc<Service>]) -> BTreeMap<SocketAddr, ServiceRef> {
    let mut out = BTreeMap::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let ns = service.namespace().unwrap_or_default();
        let ips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok());
        for ip in ips {
            for port in spec.ports.iter().flatten() {
                if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(p) = u16::try_from(port.port) else {
                    continue;
                };
                out.insert(
                    SocketAddr::new(ip, p),
                    ServiceRef::new(service.name_any(), &ns, p),
                );
            }
        }
    }
    out
}

/// The endpoints the three caches describe, as registrations by id.
fn registrations(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    pods: &Store<Pod>,
    trust_domain: &str,
) -> BTreeMap<String, WorkloadRegistration> {
    let mut out = BTreeMap::new();
    let pods: BTreeMap<(String, String), Arc<Pod>> = pods
        .state()
        .into_iter()
        .map(|p| ((p.namespace().unwrap_or_default(), p.name_any()), p))
        .collect();
    for slice in slices.state() {
        let ns = slice.namespace().unwrap_or_default();
        let Some(svc_name) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else {
            continue;
        };
        let key = reflector::ObjectRef::<Service>::new(&svc_name).within(&ns);
        let Some(service) = services.get(&key) else {
            continue;
        };
        out.extend(slice_registrations(&service, &slice, &pods, trust_domain));
    }
    out
}

/// The endpoints one EndpointSlice of `service` contributes.
pub fn slice_registrations(
    service: &Service,
    slice: &EndpointSlice,
    pods: &BTreeMap<(String, String), Arc<Pod>>,
    trust_domain: &str,
) -> BTreeMap<String, WorkloadRegistration> {
    let mut out = BTreeMap::new();
    let proxy_inbound = crate::inject::InjectConfig::default().inbound_port;
    let ns = slice.namespace().unwrap_or_default();
    let svc_name = service.name_any();
    let slice_ports: Vec<(String, u16)> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let service_ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    for sp in service_ports {
        if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let name = sp.name.clone().unwrap_or_default();
        let Some(target) = slice_ports
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
        else {
            continue;
        };
        let service_ref = ServiceRef::new(&svc_name, &ns, port);
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| pods.get(&(ns.clone(), r.name.clone()?)));
            let meshed = pod.is_some_and(|p| p.annotations().contains_key(INJECTED_ANNOTATION));
            let identity = pod.filter(|_| meshed).and_then(|p| {
                let sa = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into());
                SpiffeId::new(trust_domain, &ns, &sa)
                    .ok()
                    .map(|id| id.to_string())
            });
            let labels = pod.map(|p| p.labels().clone()).unwrap_or_default();
            // A meshed pod is reached at its proxy's inbound listener when the port is the one
            // its proxy forwards to by default (the app's declared port); any other port of the
            // app is dialled as is, and the pod's redirect hands it to the proxy, which sends it
            // on to that port.
            let app_port = pod
                .and_then(|p| p.spec.as_ref())
                .and_then(crate::inject::app_port)
                .and_then(|p| u16::try_from(p).ok());
            let deployment = pod.and_then(|p| deployment_of(p));
            let pod_name = pod.map(|p| p.name_any());
            let port = if identity.is_some() && app_port == Some(target) {
                proxy_inbound
            } else {
                target
            };
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                // One registration per service port: two ports of a service may share a
                // target port, and each is its own endpoint set.
                let id = format!(
                    "k8s/{ns}/{}/{ip}/{}/{port}",
                    slice.name_any(),
                    service_ref.port
                );
                out.insert(
                    id,
                    WorkloadRegistration {
                        service: service_ref.clone(),
                        addr: SocketAddr::new(ip, port),
                        identity: identity.clone(),
                        labels: labels.clone(),
                        // In a cluster Prometheus finds pods itself (kubernetes_sd), so
                        // the admin port is not listed.
                        admin_addr: None,
                        deployment: deployment.clone(),
                        pod: pod_name.clone(),
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_s_deployment_is_its_replica_set_without_the_template_hash() {
        let pod = |owner: &str, hash: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "x", "labels": {"pod-template-hash": hash},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                  "name": owner, "uid": "u"}]},
            }))
            .unwrap()
        };
        assert_eq!(
            deployment_of(&pod("web-canary-7d9f8b6c5", "7d9f8b6c5")).as_deref(),
            Some("web-canary")
        );
        assert_eq!(deployment_of(&pod("web-canary-7d9f8b6c5", "other")), None);
    }

    fn service(json: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    #[test]
    fn meshed_pods_are_reached_at_the_proxy_for_their_declared_port_and_through_the_redirect_otherwise()
     {
        let svc = service(serde_json::json!({
            "metadata": {"name": "echo", "namespace": "mesh"},
            "spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "http-alt", "port": 8080},
                {"name": "grpc", "port": 7070}
            ]}
        }));
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "echo-abc", "namespace": "mesh"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "http-alt", "port": 8080},
                      {"name": "grpc", "port": 7070}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "declared"}},
                {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "undeclared"}}
            ]
        }))
        .unwrap();
        let pod = |name: &str, ports: serde_json::Value| {
            let p: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "mesh",
                             "annotations": {INJECTED_ANNOTATION: "true"}},
                "spec": {"containers": [{"name": "app", "ports": ports}]}
            }))
            .unwrap();
            (("mesh".to_string(), name.to_string()), Arc::new(p))
        };
        let pods = BTreeMap::from([
            pod("declared", serde_json::json!([{"containerPort": 8080}])),
            pod("undeclared", serde_json::json!([])),
        ]);
        let regs = slice_registrations(&svc, &slice, &pods, "cluster.local");
        let mut got: Vec<(u16, SocketAddr)> =
            regs.values().map(|r| (r.service.port, r.addr)).collect();
        got.sort();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            got,
            [
                (80, a("10.0.0.1:4143")),
                (80, a("10.0.0.2:8080")),
                (7070, a("10.0.0.1:7070")),
                (7070, a("10.0.0.2:7070")),
                (8080, a("10.0.0.1:4143")),
                (8080, a("10.0.0.2:8080")),
            ],
            "two service ports on one target port are both served"
        );
        assert!(regs.values().all(|r| r.identity.is_some()));
    }

    #[test]
    fn cluster_ips_and_tcp_ports_name_their_service() {
        let services = [
            service(serde_json::json!({
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {
                    "clusterIP": "10.96.0.10",
                    "clusterIPs": ["10.96.0.10", "fd00::10"],
                    "ports": [
                        {"port": 5432},
                        {"port": 5433, "protocol": "UDP"}
                    ]
                }
            })),
            service(serde_json::json!({
                "metadata": {"name": "headless", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
            })),
        ];
        let addrs = service_addresses(&services);
        let db = ServiceRef::new("db", "shop", 5432);
        assert_eq!(
            addrs,
            BTreeMap::from([
                ("10.96.0.10:5432".parse().unwrap(), db.clone()),
                ("[fd00::10]:5432".parse().unwrap(), db),
            ])
        );
    }
}
