//! `mesh install [--crds]`: everything a cluster needs, as YAML for `kubectl apply -f -`.
//!
//! The output holds, in apply order: the CRDs (ours, plus Gateway API's HTTPRoute and GRPCRoute unless
//! `--skip-gateway-api-crds`); then, without `--crds`, the `mesh-system` namespace, service
//! accounts and RBAC, the identity issuer and the injector's serving certificate (generated
//! here with rcgen, so every install gets its own keys), the control plane and rollout
//! controller Deployments and Service, and the proxy injector's MutatingWebhookConfiguration.

use base64::Engine;
use mesh_controlplane::inject::{INJECT_ANNOTATION, InjectConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};

/// The namespace the mesh runs in.
pub const NAMESPACE: &str = "mesh-system";
/// The control plane's Deployment, Service and service account.
pub const CONTROLPLANE: &str = "mesh-controlplane";
/// The rollout controller's Deployment and service account.
pub const ROLLOUT_CONTROLLER: &str = "mesh-rollout-controller";
/// The injector's MutatingWebhookConfiguration.
pub const WEBHOOK: &str = "mesh-proxy-injector";
/// The injector's port in the control plane pod.
pub const INJECTOR_PORT: u16 = 8443;
/// The proxy API's port.
pub const PROXY_API_PORT: u16 = 4181;
/// Where the control plane mounts the identity issuer Secret (its CA).
pub const ISSUER_DIR: &str = "/var/run/mesh/issuer";
/// The Secret holding the identity issuer (the CA workload certificates are signed with).
pub const ISSUER_SECRET: &str = "mesh-identity-issuer";
/// The Secret holding the injector's serving certificate.
pub const INJECTOR_TLS_SECRET: &str = "mesh-injector-tls";
/// Replicas of each Deployment with `--ha`.
pub const HA_REPLICAS: i32 = 3;

/// Flags of `mesh install`.
#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// Render only the CRDs.
    #[arg(long)]
    pub crds: bool,
    /// Leave out the Gateway API HTTPRoute and GRPCRoute CRDs (when the cluster already has
    /// Gateway API).
    #[arg(long)]
    pub skip_gateway_api_crds: bool,
    /// Image of the control plane [default: <registry>/controlplane:<version>].
    #[arg(long)]
    pub controlplane_image: Option<String>,
    /// Image of the rollout controller [default: <registry>/rollout-controller:<version>].
    #[arg(long)]
    pub rollout_controller_image: Option<String>,
    /// High availability: the control plane and the rollout controller with 3 replicas each,
    /// spread over nodes where possible, with PodDisruptionBudgets.
    #[arg(long)]
    pub ha: bool,
    /// Write the Helm chart made from this rendering into DIR (deploy/helm/mesh in the
    /// repository) instead of printing manifests.
    #[arg(long, value_name = "DIR", hide = true)]
    pub helm_chart: Option<std::path::PathBuf>,
    /// Prometheus the rollout controller reads gate metrics from.
    #[arg(long, default_value = "http://prometheus.monitoring:9090")]
    pub prometheus_url: String,
    /// Also render how a Prometheus scrapes the proxies: the ConfigMap `mesh-prometheus` (its
    /// `scrape-configs.yaml` is a `scrape_configs` list with Linkerd's relabeling) and a
    /// PodMonitor for prometheus-operator (whose CRD must exist).
    #[arg(long)]
    pub prometheus: bool,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Where the mesh's images come from when no `--*-image` flag names one.
pub const DEFAULT_REGISTRY: &str = "ghcr.io/mesh-dev";

/// The images `scripts/build-images` writes and `mesh install` refers to, by short name:
/// `<registry>/<name>:<version>`.
pub mod image {
    /// The sidecar proxy.
    pub const PROXY: &str = "proxy";
    /// The init container (sh and iptables).
    pub const PROXY_INIT: &str = "proxy-init";
    /// The control plane.
    pub const CONTROLPLANE: &str = "controlplane";
    /// The rollout controller.
    pub const ROLLOUT_CONTROLLER: &str = "rollout-controller";
}

/// Checks `--image-registry`: `host[:port][/path]`, lowercase, as image references need.
fn parse_registry(value: &str) -> Result<String, String> {
    let value = value.trim_end_matches('/');
    let mut parts = value.split('/');
    let host = parts.next().unwrap_or_default();
    let (name, port) = host.split_once(':').unwrap_or((host, ""));
    let host_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && (port.is_empty() || port.parse::<u16>().is_ok());
    let path_ok = parts.all(|p| {
        !p.is_empty()
            && p.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' || c == '-'
            })
    });
    if host_ok && path_ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not a registry: expected host[:port][/path] in lowercase, \
             e.g. ghcr.io/mesh-dev or localhost/mesh"
        ))
    }
}

/// Checks `--version`: an image tag (letters, digits, `_`, `.`, `-`; at most 128, not
/// starting with `.` or `-`). A leading `v` is kept: the tag is what was given.
fn parse_tag(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with(['.', '-'])
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not an image tag: letters, digits, '_', '.' and '-', at most 128, \
             not starting with '.' or '-'"
        ))
    }
}

/// Which images the mesh runs, and what injected pods run; shared by `mesh install` and
/// `mesh inject`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Registry (and path) of the mesh's images: <registry>/proxy, proxy-init, controlplane and
    /// rollout-controller, the names scripts/build-images writes.
    #[arg(long, default_value = DEFAULT_REGISTRY, value_parser = parse_registry)]
    pub image_registry: String,
    /// Tag of the mesh's images.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"), value_parser = parse_tag)]
    pub version: String,
    /// Image of the proxy [default: <registry>/proxy:<version>].
    #[arg(long)]
    pub proxy_image: Option<String>,
    /// Image of the init container, which needs sh and iptables
    /// [default: <registry>/proxy-init:<version>].
    #[arg(long)]
    pub init_image: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The OTLP/HTTP collector injected proxies send spans to (`host:port` or an http(s) URL,
    /// e.g. `otel-collector.tracing:4318`); a pod's `config.mesh.dev/trace-collector`
    /// annotation overrides it. Tracing is off without either.
    #[arg(long, value_name = "URL", value_parser = parse_collector)]
    pub trace_collector: Option<String>,
    /// The share of new traces injected proxies sample, 0 to 1 [default: 1].
    #[arg(long, value_name = "SHARE", value_parser = parse_sampling, requires = "trace_collector")]
    pub trace_sampling: Option<String>,
}

fn parse_collector(value: &str) -> Result<String, String> {
    mesh_core::trace::collector_url(value)?;
    Ok(value.trim().to_string())
}

fn parse_sampling(value: &str) -> Result<String, String> {
    mesh_core::trace::sampling(value)?;
    Ok(value.trim().to_string())
}

impl ProxyArgs {
    /// The reference of one of the mesh's images: the flag that names it, else
    /// `<registry>/<name>:<version>`.
    pub fn image(&self, name: &str, flag: Option<&String>) -> String {
        flag.cloned()
            .unwrap_or_else(|| format!("{}/{name}:{}", self.image_registry, self.version))
    }

    /// The injector's configuration.
    pub fn inject_config(&self) -> InjectConfig {
        InjectConfig {
            proxy_image: self.image(image::PROXY, self.proxy_image.as_ref()),
            init_image: self.image(image::PROXY_INIT, self.init_image.as_ref()),
            trust_domain: self.trust_domain.clone(),
            control_plane_addr: format!(
                "{CONTROLPLANE}.{NAMESPACE}.svc.{}:{PROXY_API_PORT}",
                self.trust_domain
            ),
            trace_collector: self.trace_collector.clone(),
            trace_sampling: self.trace_sampling.clone(),
            ..InjectConfig::default()
        }
    }
}

/// The CRDs, in apply order.
pub fn crds(skip_gateway_api: bool) -> Vec<Value> {
    let mut out: Vec<Value> = mesh_crds::all()
        .into_iter()
        .filter_map(|(_, crd)| serde_json::to_value(crd).ok())
        .collect();
    if !skip_gateway_api {
        for crd in [mesh_crds::httproute_crd(), mesh_crds::grpcroute_crd()] {
            if let Ok(v) = serde_json::to_value(crd) {
                out.push(v);
            }
        }
    }
    out
}

/// The keys and certificates an install holds: the identity issuer (the CA workload
/// certificates chain to, which injected proxies trust) and the injector's serving certificate
/// with the CA the API server checks it against. `mesh install` makes new ones; `mesh upgrade`
/// keeps the cluster's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pki {
    /// The identity issuer's certificate, PEM.
    pub issuer_cert: String,
    /// The identity issuer's key, PEM.
    pub issuer_key: String,
    /// The CA in the webhook's caBundle, PEM.
    pub webhook_ca: String,
    /// The injector's serving certificate, PEM.
    pub webhook_cert: String,
    /// The injector's serving key, PEM.
    pub webhook_key: String,
}

fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(params)
}

/// A new identity issuer (a CA the control plane signs workload certificates with) and a new
/// injector serving certificate with the CA the API server checks it against.
pub fn pki() -> anyhow::Result<Pki> {
    let issuer_key = KeyPair::generate()?;
    let issuer = ca_params("identity.mesh.dev")?.self_signed(&issuer_key)?;
    let webhook = webhook_pki()?;
    Ok(Pki {
        issuer_cert: issuer.pem(),
        issuer_key: issuer_key.serialize_pem(),
        ..webhook
    })
}

/// A new injector serving certificate and its CA (the issuer fields are left empty).
pub fn webhook_pki() -> anyhow::Result<Pki> {
    let webhook_ca_key = KeyPair::generate()?;
    let webhook_ca_params = ca_params("webhook.mesh.dev")?;
    let webhook_ca = webhook_ca_params.self_signed(&webhook_ca_key)?;
    let signer = rcgen::Issuer::new(webhook_ca_params, webhook_ca_key);
    let dns = format!("{CONTROLPLANE}.{NAMESPACE}.svc");
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![dns.clone()])?;
    params.distinguished_name.push(DnType::CommonName, dns);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let leaf = params.signed_by(&key, &signer)?;
    Ok(Pki {
        issuer_cert: String::new(),
        issuer_key: String::new(),
        webhook_ca: webhook_ca.pem(),
        webhook_cert: leaf.pem(),
        webhook_key: key.serialize_pem(),
    })
}

/// On the control plane's pod template: the serial number of the injector's certificate.
pub const INJECTOR_CERT_ANNOTATION: &str = "mesh.dev/injector-certificate-serial";

/// The serial number of a PEM certificate, in hex.
pub fn cert_serial(pem: &str) -> anyhow::Result<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the injector certificate is not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("the injector certificate does not parse: {e}"))?;
    Ok(cert.raw_serial_as_string().replace(':', ""))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Renders the whole install as documents, in apply order, with new keys.
pub fn render(args: &InstallArgs) -> anyhow::Result<Vec<Value>> {
    if args.crds {
        return Ok(crds(args.skip_gateway_api_crds));
    }
    render_with(args, &pki()?)
}

/// Renders the whole install with the given keys and certificates.
pub fn render_with(args: &InstallArgs, pki: &Pki) -> anyhow::Result<Vec<Value>> {
    let mut docs = crds(args.skip_gateway_api_crds);
    if args.crds {
        return Ok(docs);
    }
    let labels =
        |app: &str| json!({"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "mesh"});
    let meta = |name: &str| json!({"name": name, "namespace": NAMESPACE, "labels": labels(name)});
    docs.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "mesh"},
                     "annotations": {INJECT_ANNOTATION: "disabled"}},
    }));
    for sa in [CONTROLPLANE, ROLLOUT_CONTROLLER] {
        docs.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(sa)}));
    }
    let rules = |rules: Value| rules;
    let roles = [
        (
            CONTROLPLANE,
            rules(json!([
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                // The cluster is the control plane's store: its resource API reads and writes
                // the mesh's kinds (writes are server-side applies and deletes).
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["get", "list", "watch", "patch", "delete"]},
                // Route status: Accepted and ResolvedRefs on routes with Service parents.
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["get", "patch", "update"]},
                {"apiGroups": ["rollouts.mesh.dev"], "resources": ["canaries", "metrictemplates"], "verbs": ["get", "list", "watch", "patch", "delete"]},
                {"apiGroups": ["policy.mesh.dev"], "resources": ["servers", "authorizationpolicies", "meshtlsauthentications", "networkauthentications"], "verbs": ["get", "list", "watch", "patch", "delete"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                // Tap: who may tap a workload is the API server's answer (see `mesh-tap` below).
                {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
            ])),
        ),
        (
            ROLLOUT_CONTROLLER,
            rules(json!([
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "update", "patch"]},
                {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
                {"apiGroups": ["rollouts.mesh.dev"], "resources": ["canaries", "metrictemplates"], "verbs": ["get", "list", "watch", "update", "patch"]},
                {"apiGroups": ["rollouts.mesh.dev"], "resources": ["canaries/status", "canaries/finalizers"], "verbs": ["get", "update", "patch"]},
                {"apiGroups": ["events.k8s.io", ""], "resources": ["events"], "verbs": ["create", "patch"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
            ])),
        ),
    ];
    for (name, rules) in roles {
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels(name)}, "rules": rules,
        }));
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels(name)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
        }));
    }
    // The role a user is bound to (a RoleBinding per namespace, or a ClusterRoleBinding) to
    // tap: the control plane asks the API server for this permission before it opens a tap.
    // Nothing serves this group; RBAC rules may name it, as Linkerd's `tap.linkerd.io` does.
    docs.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": mesh_core::tap::CLUSTER_ROLE, "labels": labels(mesh_core::tap::CLUSTER_ROLE)},
        "rules": [{"apiGroups": [mesh_core::tap::API_GROUP], "resources": [mesh_core::tap::RESOURCE],
                   "verbs": [mesh_core::tap::VERB]}],
    }));
    docs.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": meta(ISSUER_SECRET),
        "data": {"tls.crt": b64(&pki.issuer_cert), "tls.key": b64(&pki.issuer_key)},
    }));
    docs.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": meta(INJECTOR_TLS_SECRET),
        "data": {"tls.crt": b64(&pki.webhook_cert), "tls.key": b64(&pki.webhook_key)},
    }));
    let inject = args.proxy.inject_config();
    let replicas = if args.ha { HA_REPLICAS } else { 1 };
    let deployment =
        |name: &str, image: &str, env: Value, ports: Value, volumes: Value, mounts: Value| {
            let mut d = json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name),
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                    "template": {
                        "metadata": {"labels": labels(name)},
                        "spec": {
                            "serviceAccountName": name,
                            "containers": [{
                                "name": name, "image": image, "env": env, "ports": ports,
                                "volumeMounts": mounts,
                                "securityContext": {"runAsNonRoot": true, "runAsUser": 2103,
                                                    "readOnlyRootFilesystem": true,
                                                    "allowPrivilegeEscalation": false},
                            }],
                            "volumes": volumes,
                        },
                    },
                },
            });
            if args.ha {
                // Preferred, not required: a cluster with fewer nodes than replicas still runs
                // them all, spread as far as its nodes allow.
                d["spec"]["template"]["spec"]["affinity"] = json!({"podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }],
                }});
                d["spec"]["strategy"] = json!({"type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}});
            }
            d
        };
    let mut controlplane_env = json!([
        {"name": "MESH_CONTROLPLANE_STATE_DIR", "value": "/var/lib/mesh"},
        {"name": "MESH_CONTROLPLANE_KUBERNETES", "value": "true"},
        {"name": "MESH_CONTROLPLANE_PROXY_ADDR", "value": format!("0.0.0.0:{PROXY_API_PORT}")},
        {"name": "MESH_CONTROLPLANE_TRUST_DOMAIN", "value": args.proxy.trust_domain},
        // The CA comes from the issuer Secret, so the trust roots injected proxies hold
        // survive restarts of the control plane (its state is an emptyDir).
        {"name": "MESH_CONTROLPLANE_ISSUER_DIR", "value": ISSUER_DIR},
        {"name": "MESH_CONTROLPLANE_INJECTOR_ADDR", "value": format!("0.0.0.0:{INJECTOR_PORT}")},
        {"name": "MESH_CONTROLPLANE_INJECTOR_TLS_DIR", "value": "/var/run/mesh/injector"},
        {"name": "MESH_CONTROLPLANE_PROXY_IMAGE", "value": inject.proxy_image},
        {"name": "MESH_CONTROLPLANE_INIT_IMAGE", "value": inject.init_image},
    ]);
    // Tracing stays off unless asked for: its variables are rendered only when set.
    for (name, value) in [
        ("MESH_CONTROLPLANE_TRACE_COLLECTOR", &inject.trace_collector),
        ("MESH_CONTROLPLANE_TRACE_SAMPLING", &inject.trace_sampling),
    ] {
        if let (Some(value), Some(env)) = (value, controlplane_env.as_array_mut()) {
            env.push(json!({"name": name, "value": value}));
        }
    }
    docs.push(deployment(
        CONTROLPLANE,
        &args
            .proxy
            .image(image::CONTROLPLANE, args.controlplane_image.as_ref()),
        controlplane_env,
        json!([{"name": "proxy-api", "containerPort": PROXY_API_PORT},
               {"name": "injector", "containerPort": INJECTOR_PORT}]),
        json!([{"name": "state", "emptyDir": {}},
               {"name": "injector-tls", "secret": {"secretName": INJECTOR_TLS_SECRET}},
               {"name": "identity-issuer", "secret": {"secretName": ISSUER_SECRET}}]),
        json!([{"name": "state", "mountPath": "/var/lib/mesh"},
               {"name": "injector-tls", "mountPath": "/var/run/mesh/injector", "readOnly": true},
               {"name": "identity-issuer", "mountPath": ISSUER_DIR, "readOnly": true}]),
    ));
    // The control plane reads its serving certificate at start: a new one (from `mesh upgrade`)
    // must restart its pods, so the pod template names the certificate.
    let serial = cert_serial(&pki.webhook_cert)?;
    if let Some(cp) = docs.last_mut() {
        cp["spec"]["template"]["metadata"]["annotations"] =
            json!({INJECTOR_CERT_ANNOTATION: serial});
    }
    docs.push(deployment(
        ROLLOUT_CONTROLLER,
        &args
            .proxy
            .image(image::ROLLOUT_CONTROLLER, args.rollout_controller_image.as_ref()),
        // The Lease the replicas elect a leader on lives in mesh-system, and names its holder
        // by pod.
        json!([
            {"name": mesh_rollout_controller::config::ENV_PROMETHEUS_URL, "value": args.prometheus_url},
            {"name": mesh_rollout_controller::config::ENV_INSTANCE,
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": mesh_rollout_controller::config::ENV_LEASE_NAMESPACE,
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ]),
        json!([]),
        json!([]),
        json!([]),
    ));
    if args.ha {
        // Voluntary disruptions (drains, upgrades) take one replica at a time.
        for name in [CONTROLPLANE, ROLLOUT_CONTROLLER] {
            docs.push(json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(name),
                "spec": {"maxUnavailable": 1,
                         "selector": {"matchLabels": {"app.kubernetes.io/name": name}}},
            }));
        }
    }
    docs.push(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta(CONTROLPLANE),
        "spec": {
            "selector": {"app.kubernetes.io/name": CONTROLPLANE},
            "ports": [
                {"name": "proxy-api", "port": PROXY_API_PORT, "targetPort": PROXY_API_PORT},
                {"name": "injector", "port": 443, "targetPort": INJECTOR_PORT},
            ],
        },
    }));
    docs.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK, "labels": labels(WEBHOOK)},
        "webhooks": [{
            "name": "proxy-injector.mesh.dev",
            "clientConfig": {
                "service": {"name": CONTROLPLANE, "namespace": NAMESPACE, "path": "/inject", "port": 443},
                "caBundle": b64(&pki.webhook_ca),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["kube-system", NAMESPACE]}]},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": 10,
        }],
    }));
    if args.prometheus {
        docs.extend(prometheus_docs()?);
    }
    Ok(docs)
}

/// The name of the ConfigMap and PodMonitor `--prometheus` adds.
pub const PROMETHEUS_SCRAPE: &str = "mesh-prometheus";
/// The ConfigMap key holding the scrape config.
pub const SCRAPE_CONFIGS_KEY: &str = "scrape-configs.yaml";
/// How often the rendered configs scrape each proxy.
const SCRAPE_INTERVAL: &str = "10s";

/// What `--prometheus` adds: the scrape config (a `scrape_configs` list, for Prometheus's
/// `scrape_config_files` or to paste) in a ConfigMap, and the same discovery and relabeling as a
/// PodMonitor; both add Linkerd's `namespace`, `pod` and `deployment` labels, so Flagger's
/// Linkerd queries and Linkerd's dashboards select the proxies' series unchanged.
pub fn prometheus_docs() -> anyhow::Result<Vec<Value>> {
    use mesh_core::prometheus::{self as prom, ADMIN_PORT_NAME};
    let labels =
        json!({"app.kubernetes.io/name": PROMETHEUS_SCRAPE, "app.kubernetes.io/part-of": "mesh"});
    let relabelings: Value = serde_yaml::from_str(&prom::kubernetes_relabeling(
        "sourceLabels",
        "targetLabel",
        "",
    ))?;
    Ok(vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": PROMETHEUS_SCRAPE, "namespace": NAMESPACE, "labels": labels},
            "data": {SCRAPE_CONFIGS_KEY: prom::kubernetes_scrape_config(&[], SCRAPE_INTERVAL)},
        }),
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": PROMETHEUS_SCRAPE, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "namespaceSelector": {"any": true},
                "selector": {},
                "podMetricsEndpoints": [{
                    "port": ADMIN_PORT_NAME,
                    "path": "/metrics",
                    "interval": SCRAPE_INTERVAL,
                    "relabelings": relabelings,
                }],
            },
        }),
    ])
}

/// The documents as one YAML stream.
pub fn to_yaml(docs: &[Value]) -> anyhow::Result<String> {
    let mut out = String::from("# Rendered by `mesh install`; apply with `kubectl apply -f -`.\n");
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(crds: bool) -> InstallArgs {
        InstallArgs {
            crds,
            skip_gateway_api_crds: false,
            ha: false,
            helm_chart: None,
            controlplane_image: Some("cp:dev".into()),
            rollout_controller_image: Some("rc:dev".into()),
            prometheus_url: "http://prom:9090".into(),
            prometheus: false,
            proxy: ProxyArgs {
                image_registry: DEFAULT_REGISTRY.into(),
                version: "0.1.0".into(),
                proxy_image: Some("proxy:dev".into()),
                init_image: Some("init:dev".into()),
                trust_domain: "cluster.local".into(),
                trace_collector: None,
                trace_sampling: None,
            },
        }
    }

    #[test]
    fn prometheus_adds_a_scrape_config_and_a_pod_monitor_with_linkerd_s_labels() {
        let pki = pki().unwrap();
        let plain = render_with(&args(false), &pki).unwrap();
        assert!(!plain.iter().any(|d| d["kind"] == "PodMonitor"));
        let with = render_with(
            &InstallArgs {
                prometheus: true,
                ..args(false)
            },
            &pki,
        )
        .unwrap();
        let monitor = with.iter().find(|d| d["kind"] == "PodMonitor").unwrap();
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["port"], "mesh-admin");
        let targets: Vec<&str> = endpoint["relabelings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["targetLabel"].as_str())
            .collect();
        for label in ["namespace", "pod", "deployment"] {
            assert!(targets.contains(&label), "{targets:?}");
        }
        let config = with.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let scrape: Value =
            serde_yaml::from_str(config["data"][SCRAPE_CONFIGS_KEY].as_str().unwrap()).unwrap();
        assert_eq!(scrape[0]["job_name"], "mesh-proxy");
        assert_eq!(scrape[0]["kubernetes_sd_configs"][0]["role"], "pod");
    }

    #[test]
    fn crds_only_renders_the_crds() {
        let docs = render(&args(true)).unwrap();
        assert!(docs.iter().all(|d| d["kind"] == "CustomResourceDefinition"));
        let names: Vec<&str> = docs
            .iter()
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        assert!(names.contains(&"canaries.rollouts.mesh.dev"), "{names:?}");
        assert!(
            names.contains(&"httproutes.gateway.networking.k8s.io"),
            "{names:?}"
        );
    }

    #[test]
    fn the_control_plane_signs_with_the_issuer_secret() {
        let docs = render(&args(false)).unwrap();
        let cp = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == CONTROLPLANE)
            .unwrap();
        let container = &cp["spec"]["template"]["spec"]["containers"][0];
        let env = container["env"].as_array().unwrap();
        assert!(
            env.contains(&json!({"name": "MESH_CONTROLPLANE_ISSUER_DIR", "value": ISSUER_DIR}))
        );
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["name"] == "identity-issuer" && m["mountPath"] == ISSUER_DIR)
        );
    }

    #[test]
    fn every_install_gets_its_own_keys() {
        let a = to_yaml(&render(&args(false)).unwrap()).unwrap();
        let b = to_yaml(&render(&args(false)).unwrap()).unwrap();
        assert_ne!(a, b);
        assert!(a.contains("kind: MutatingWebhookConfiguration"));
        assert!(a.contains("cp:dev") && a.contains("rc:dev"));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        install: InstallArgs,
    }

    fn parse(flags: &[&str]) -> Result<InstallArgs, clap::Error> {
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("install").chain(flags.iter().copied()))
            .map(|c| c.install)
    }

    #[test]
    fn trace_flags_reach_the_injector_checked() {
        let env_of = |docs: &[Value]| {
            docs.iter()
                .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == CONTROLPLANE)
                .unwrap()["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .clone()
        };
        let traced = |env: &[Value]| {
            env.iter()
                .filter(|e| e["name"].as_str().unwrap().contains("TRACE"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(traced(&env_of(&render(&parse(&[]).unwrap()).unwrap())).is_empty());
        let args = parse(&[
            "--trace-collector",
            "otel-collector.tracing:4318",
            "--trace-sampling",
            "0.1",
        ])
        .unwrap();
        assert_eq!(
            traced(&env_of(&render(&args).unwrap())),
            [
                json!({"name": "MESH_CONTROLPLANE_TRACE_COLLECTOR", "value": "otel-collector.tracing:4318"}),
                json!({"name": "MESH_CONTROLPLANE_TRACE_SAMPLING", "value": "0.1"}),
            ]
        );
        for bad in [
            &["--trace-collector", "ftp://collector"][..],
            &["--trace-collector", "c:4318", "--trace-sampling", "2"],
            &["--trace-sampling", "0.5"],
        ] {
            let e = parse(bad).err().unwrap().to_string();
            assert!(e.contains("--trace-"), "{e}");
        }
    }

    fn images(docs: &[Value]) -> Vec<String> {
        let mut out: Vec<String> = docs
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .flat_map(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .flat_map(|c| {
                let mut refs = vec![c["image"].as_str().unwrap().to_string()];
                for e in c["env"].as_array().unwrap() {
                    if e["name"] == "MESH_CONTROLPLANE_PROXY_IMAGE"
                        || e["name"] == "MESH_CONTROLPLANE_INIT_IMAGE"
                    {
                        refs.push(e["value"].as_str().unwrap().to_string());
                    }
                }
                refs
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn registry_and_version_name_every_image() {
        let args = parse(&["--image-registry", "localhost/mesh", "--version", "dev"]).unwrap();
        assert_eq!(
            images(&render(&args).unwrap()),
            [
                "localhost/mesh/controlplane:dev",
                "localhost/mesh/proxy-init:dev",
                "localhost/mesh/proxy:dev",
                "localhost/mesh/rollout-controller:dev",
            ]
        );
        // A flag naming one image wins over the registry for that image only.
        let args = parse(&["--version", "1.2.3", "--proxy-image", "example.test/p:x"]).unwrap();
        assert_eq!(
            images(&render(&args).unwrap()),
            [
                "example.test/p:x",
                "ghcr.io/mesh-dev/controlplane:1.2.3",
                "ghcr.io/mesh-dev/proxy-init:1.2.3",
                "ghcr.io/mesh-dev/rollout-controller:1.2.3",
            ]
        );
        // The defaults are this CLI's version on the project's registry.
        let v = env!("CARGO_PKG_VERSION");
        assert!(
            images(&render(&parse(&[]).unwrap()).unwrap())
                .contains(&format!("ghcr.io/mesh-dev/proxy:{v}"))
        );
    }

    #[test]
    fn ha_runs_three_spread_replicas_behind_budgets_and_the_webhook_still_fails_open() {
        let docs = render(&parse(&["--ha"]).unwrap()).unwrap();
        for name in [CONTROLPLANE, ROLLOUT_CONTROLLER] {
            let d = docs
                .iter()
                .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
                .unwrap();
            assert_eq!(d["spec"]["replicas"], HA_REPLICAS, "{name}");
            let term = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                [0]["podAffinityTerm"];
            assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
            assert_eq!(
                term["labelSelector"]["matchLabels"]["app.kubernetes.io/name"],
                name
            );
            let pdb = docs
                .iter()
                .find(|d| d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == name)
                .unwrap();
            assert_eq!(pdb["spec"]["maxUnavailable"], 1);
            assert_eq!(
                pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
                name
            );
        }
        let hook = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        assert_eq!(hook["webhooks"][0]["failurePolicy"], "Ignore");
        // Replicas of the rollout controller elect their leader on a Lease in mesh-system.
        let rc = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == ROLLOUT_CONTROLLER)
            .unwrap();
        let env = rc["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        assert!(env.iter().any(|e| e["name"] == "POD_NAMESPACE"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"));

        // Without --ha: one replica, no budgets, no affinity.
        let docs = render(&parse(&[]).unwrap()).unwrap();
        assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
        let d = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        assert_eq!(d["spec"]["replicas"], 1);
        assert!(d["spec"]["template"]["spec"].get("affinity").is_none());
    }

    #[test]
    fn bad_registries_and_tags_are_refused_by_name() {
        for (flags, needle) in [
            (&["--image-registry", "Local/Mesh"][..], "is not a registry"),
            (
                &["--image-registry", "host:port/x"][..],
                "is not a registry",
            ),
            (&["--image-registry", "a//b"][..], "is not a registry"),
            (&["--version=-rc1"][..], "is not an image tag"),
            (&["--version=1.0/x"][..], "is not an image tag"),
        ] {
            let error = parse(flags).unwrap_err().to_string();
            assert!(
                error.contains(needle) && error.contains(flags[0].split('=').next().unwrap()),
                "{flags:?}: {error}"
            );
        }
        assert_eq!(
            parse(&["--image-registry", "localhost:5000/mesh/"])
                .unwrap()
                .proxy
                .image_registry,
            "localhost:5000/mesh"
        );
    }
}
