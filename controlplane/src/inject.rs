//! Sidecar injection: what the proxy-injector webhook and `mesh inject` add to a pod.
//!
//! A pod is injected when its own annotation `mesh.dev/inject` is `enabled`, or when its
//! namespace's is and the pod's is not `disabled`. Injection adds:
//!
//! - an init container, `mesh-init`, that installs the iptables rules sending the pod's inbound
//!   TCP to the proxy's inbound port and its outbound TCP to the outbound port, except the
//!   proxy's own traffic (it runs as [`PROXY_UID`]) and loopback;
//! - the `mesh-proxy` container, as a native sidecar (an init container with
//!   `restartPolicy: Always`, after `mesh-init`, which the kubelet starts and sees ready before
//!   the app's containers and stops after them, so a Job's pod still completes) on API servers
//!   that have them ([`ProxyLayout::for_server`]), or else first among the app's containers;
//!   configured through `MESH_PROXY_*` variables, with the pod's
//!   SPIFFE identity from its namespace and service account, a projected service-account
//!   token (audience [`TOKEN_AUDIENCE`]) to bootstrap it, and the mesh's trust roots
//!   (`MESH_PROXY_TRUST_ROOTS`, as Linkerd passes its trust anchors) to verify the control
//!   plane's proxy API with;
//! - the annotation `mesh.dev/injected: <proxy image>`, so a second pass changes nothing.
//!
//! Everything here is pure: the webhook and the CLI supply the namespace's annotations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The opt-in annotation, on a namespace or a pod (template).
pub const INJECT_ANNOTATION: &str = "mesh.dev/inject";
/// Set on injected pods: the proxy image that was injected.
pub const INJECTED_ANNOTATION: &str = "mesh.dev/injected";
/// Comma-separated inbound ports the proxy must not intercept (besides its own).
pub const SKIP_INBOUND_ANNOTATION: &str = "config.mesh.dev/skip-inbound-ports";
/// Comma-separated outbound ports the proxy must not intercept (e.g. a database's).
pub const SKIP_OUTBOUND_ANNOTATION: &str = "config.mesh.dev/skip-outbound-ports";
/// Comma-separated ports (or `a-b` ranges) whose connections the proxy forwards as opaque TCP
/// without sniffing, both ways, like Linkerd's `config.linkerd.io/opaque-ports`; replaces the
/// proxy's default list (25, 587, 3306, 4444, 5432, 6379, 9300, 11211).
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.mesh.dev/opaque-ports";
/// Pod annotation: the OTLP collector this pod's proxy sends spans to (`host:port` or an
/// `http(s)://` URL), or `off`; it overrides the injector's default (`mesh install
/// --trace-collector`).
pub const TRACE_COLLECTOR_ANNOTATION: &str = "config.mesh.dev/trace-collector";
/// Pod annotation: the share of new traces this pod's proxy samples, 0 to 1.
pub const TRACE_SAMPLING_ANNOTATION: &str = "config.mesh.dev/trace-sampling";
/// The proxy container's name.
pub const PROXY_CONTAINER: &str = "mesh-proxy";
/// The name of the proxy container's admin port (`/metrics`, `/tap`), where the control plane
/// finds a pod's proxy to tap.
pub const ADMIN_PORT_NAME: &str = "mesh-admin";
/// The proxy variable holding the SHA-256 of the control plane's tap token (see
/// [`mesh_core::tap`]): the proxy admits a tap that presents the token.
pub const ENV_PROXY_TAP_TOKEN_SHA256: &str = "MESH_PROXY_TAP_TOKEN_SHA256";
/// The init container's name.
pub const INIT_CONTAINER: &str = "mesh-init";
/// The user the proxy runs as; iptables lets its traffic through untouched.
pub const PROXY_UID: i64 = 2102;
/// Audience of the projected token the proxy presents to the identity API.
pub const TOKEN_AUDIENCE: &str = "identity.mesh.dev";
/// Where the projected token is mounted.
pub const TOKEN_DIR: &str = "/var/run/mesh/tokens";

/// Where the proxy goes in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyLayout {
    /// An init container with `restartPolicy: Always` (a native sidecar), after `mesh-init`:
    /// started, and ready, before the app's containers, stopped after them.
    NativeSidecar,
    /// The first of the pod's containers, for API servers without native sidecars.
    Container,
}

impl ProxyLayout {
    /// The first Kubernetes release whose API servers and kubelets have native sidecars on by
    /// default (the `SidecarContainers` feature went beta, enabled, in 1.29 and GA in 1.33).
    pub const NATIVE_SINCE: (u32, u32) = (1, 29);

    /// The layout for an API server reporting `major` and `minor` in its `/version` (`minor`
    /// may carry a suffix, as in `"29+"`). A version that does not parse gets the layout every
    /// release accepts.
    pub fn for_server(major: &str, minor: &str) -> Self {
        let number = |s: &str| {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        };
        match (number(major), number(minor)) {
            (Some(major), Some(minor)) if (major, minor) >= Self::NATIVE_SINCE => {
                Self::NativeSidecar
            }
            _ => Self::Container,
        }
    }
}

/// What to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// Where the proxy goes; the webhook picks it from the API server's version.
    pub layout: ProxyLayout,
    /// The proxy image.
    pub proxy_image: String,
    /// An image with `sh` and `iptables` for the init container.
    pub init_image: String,
    /// The control plane's proxy API, `host:port`.
    pub control_plane_addr: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The mesh's trust roots, PEM, which the proxy verifies the control plane with; the
    /// webhook takes them from the CA. Empty leaves them out, and the proxy will refuse to
    /// start until they are set.
    pub trust_roots_pem: String,
    /// The proxy's inbound port.
    pub inbound_port: u16,
    /// The proxy's outbound port.
    pub outbound_port: u16,
    /// The proxy's admin port (`/metrics`, `/ready`, `/live`).
    pub admin_port: u16,
    /// The SHA-256 of the control plane's tap token ([`mesh_core::tap::token_sha256`]), given
    /// to each proxy so that it admits taps from the control plane only; `None` leaves tap off.
    pub tap_token_sha256: Option<String>,
    /// The OTLP collector injected proxies send spans to, unless a pod says otherwise with
    /// [`TRACE_COLLECTOR_ANNOTATION`]; `None` leaves tracing off.
    pub trace_collector: Option<String>,
    /// The share of new traces they sample ([`TRACE_SAMPLING_ANNOTATION`] overrides it).
    pub trace_sampling: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            layout: ProxyLayout::NativeSidecar,
            proxy_image: format!("ghcr.io/mesh-dev/proxy:{}", env!("CARGO_PKG_VERSION")),
            init_image: format!("ghcr.io/mesh-dev/proxy-init:{}", env!("CARGO_PKG_VERSION")),
            control_plane_addr: "mesh-controlplane.mesh-system.svc.cluster.local:4181".into(),
            trust_domain: "cluster.local".into(),
            trust_roots_pem: String::new(),
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            tap_token_sha256: None,
            trace_collector: None,
            trace_sampling: None,
        }
    }
}

/// Whether a pod gets the proxy, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Inject.
    Inject,
    /// Leave the pod alone.
    Skip(String),
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Decides for a pod with `meta` and `spec` in a namespace annotated `namespace`.
pub fn decide(namespace: &BTreeMap<String, String>, meta: &ObjectMeta, spec: &PodSpec) -> Decision {
    let in_init = spec.init_containers.iter().flatten();
    if spec
        .containers
        .iter()
        .chain(in_init)
        .any(|c| c.name == PROXY_CONTAINER)
    {
        return Decision::Skip("already injected".into());
    }
    let from_pod = annotation(meta, INJECT_ANNOTATION);
    let from_ns = namespace.get(INJECT_ANNOTATION).map(String::as_str);
    match (from_pod, from_ns) {
        (Some("disabled"), _) => {
            Decision::Skip(format!("the pod sets {INJECT_ANNOTATION}: disabled"))
        }
        (Some("enabled"), _) | (None, Some("enabled")) => {
            if spec.host_network == Some(true) {
                Decision::Skip("hostNetwork pods share the node's network; not injected".into())
            } else {
                Decision::Inject
            }
        }
        _ => Decision::Skip(format!(
            "neither the pod nor its namespace sets {INJECT_ANNOTATION}: enabled"
        )),
    }
}

/// Why an annotation could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {key}: {value:?} {reason}")]
pub struct AnnotationError {
    /// The annotation.
    pub key: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

const NOT_PORTS: &str = "is not a comma-separated list of ports (1-65535)";

fn ports(meta: &ObjectMeta, key: &'static str) -> Result<Vec<u16>, AnnotationError> {
    let Some(value) = annotation(meta, key) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0))
        .collect::<Option<Vec<u16>>>()
        .ok_or_else(|| AnnotationError {
            key,
            value: value.to_string(),
            reason: NOT_PORTS.into(),
        })
}

/// The opaque-port list of `key`, normalized (`5432,8000-8010`), or `None` when unset.
fn port_ranges(meta: &ObjectMeta, key: &'static str) -> Result<Option<String>, AnnotationError> {
    let Some(value) = annotation(meta, key) else {
        return Ok(None);
    };
    let error = || AnnotationError {
        key,
        value: value.to_string(),
        reason: NOT_PORTS.into(),
    };
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let mut items = Vec::new();
    for item in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match item.split_once('-') {
            Some((lo, hi)) => match (port(lo), port(hi)) {
                (Some(lo), Some(hi)) if lo <= hi => items.push(format!("{lo}-{hi}")),
                _ => return Err(error()),
            },
            None => items.push(port(item).ok_or_else(error)?.to_string()),
        }
    }
    Ok(Some(items.join(",")))
}

/// The proxy's tracing variables: the pod's annotations, else the injector's defaults, checked
/// as the proxy will read them. A collector of `off` leaves tracing off for the pod.
fn trace_env(meta: &ObjectMeta, config: &InjectConfig) -> Result<Vec<EnvVar>, AnnotationError> {
    use mesh_core::trace::{ENV_COLLECTOR, ENV_SAMPLING, collector_url, sampling};
    let bad = |key, value: &str, reason| AnnotationError {
        key,
        value: value.to_string(),
        reason: format!("is not usable: {reason}"),
    };
    // Both annotations are checked, even where tracing ends up off.
    let share = match annotation(meta, TRACE_SAMPLING_ANNOTATION) {
        Some(v) => {
            sampling(v).map_err(|e| bad(TRACE_SAMPLING_ANNOTATION, v, e))?;
            Some(v.trim().to_string())
        }
        None => config.trace_sampling.clone(),
    };
    let collector = match annotation(meta, TRACE_COLLECTOR_ANNOTATION) {
        Some(v) if v.trim() == "off" => return Ok(Vec::new()),
        Some(v) => {
            collector_url(v).map_err(|e| bad(TRACE_COLLECTOR_ANNOTATION, v, e))?;
            v.trim().to_string()
        }
        None => match &config.trace_collector {
            Some(c) => c.clone(),
            None => return Ok(Vec::new()),
        },
    };
    let mut envs = vec![env(ENV_COLLECTOR, collector)];
    if let Some(share) = share {
        envs.push(env(ENV_SAMPLING, share));
    }
    Ok(envs)
}

/// The init container's script: NAT rules redirecting the pod's TCP through the proxy.
pub fn iptables_script(
    config: &InjectConfig,
    skip_inbound: &[u16],
    skip_outbound: &[u16],
) -> String {
    let mut s = String::from("set -eu\n");
    // Inbound: everything arriving for the pod goes to the proxy's inbound port, except the
    // proxy's own ports and those the pod opts out.
    s += "iptables -t nat -N MESH_INBOUND\n";
    let mut inbound_skips = vec![config.inbound_port, config.admin_port];
    inbound_skips.extend_from_slice(skip_inbound);
    for port in inbound_skips {
        s += &format!("iptables -t nat -A MESH_INBOUND -p tcp --dport {port} -j RETURN\n");
    }
    s += &format!(
        "iptables -t nat -A MESH_INBOUND -p tcp -j REDIRECT --to-ports {}\n",
        config.inbound_port
    );
    s += "iptables -t nat -A PREROUTING -p tcp -j MESH_INBOUND\n";
    // Outbound: the app's connections go to the proxy's outbound port; the proxy's own (by its
    // uid), loopback and opted-out ports leave untouched.
    s += "iptables -t nat -N MESH_OUTBOUND\n";
    // The proxy calling its own pod (a client of a service this pod also serves) dials the
    // pod's IP, which the kernel delivers over loopback, past PREROUTING: send it to the
    // inbound listener as if it had come from outside (the listener's own port excepted).
    s += &format!(
        "iptables -t nat -A MESH_OUTBOUND -o lo ! -d 127.0.0.1/32 -p tcp ! --dport {inbound} \
         -m owner --uid-owner {PROXY_UID} -j REDIRECT --to-ports {inbound}\n",
        inbound = config.inbound_port
    );
    s += &format!("iptables -t nat -A MESH_OUTBOUND -m owner --uid-owner {PROXY_UID} -j RETURN\n");
    s += "iptables -t nat -A MESH_OUTBOUND -o lo -j RETURN\n";
    for port in skip_outbound {
        s += &format!("iptables -t nat -A MESH_OUTBOUND -p tcp --dport {port} -j RETURN\n");
    }
    s += &format!(
        "iptables -t nat -A MESH_OUTBOUND -p tcp -j REDIRECT --to-ports {}\n",
        config.outbound_port
    );
    s += "iptables -t nat -A OUTPUT -p tcp -j MESH_OUTBOUND\n";
    s
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn http_probe(path: &str, port: u16) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    }
}

/// The first port the app containers declare: where the proxy forwards inbound requests that
/// were not redirected.
pub(crate) fn app_port(spec: &PodSpec) -> Option<i32> {
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| p.container_port)
}

/// Injects the proxy into a pod (or pod template) that [`decide`] said to inject.
pub fn inject(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    config: &InjectConfig,
) -> Result<(), AnnotationError> {
    let skip_inbound = ports(meta, SKIP_INBOUND_ANNOTATION)?;
    let skip_outbound = ports(meta, SKIP_OUTBOUND_ANNOTATION)?;
    let opaque_ports = port_ranges(meta, OPAQUE_PORTS_ANNOTATION)?;
    let tracing = trace_env(meta, config)?;

    let init = Container {
        name: INIT_CONTAINER.into(),
        image: Some(config.init_image.clone()),
        command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            iptables_script(config, &skip_inbound, &skip_outbound),
        ]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let mut envs = vec![
        field_env("MESH_POD_NAMESPACE", "metadata.namespace"),
        field_env("MESH_POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env(
            "MESH_PROXY_OUTBOUND_ADDR",
            format!("127.0.0.1:{}", config.outbound_port),
        ),
        env(
            "MESH_PROXY_INBOUND_ADDR",
            format!("0.0.0.0:{}", config.inbound_port),
        ),
        env(
            "MESH_PROXY_ADMIN_ADDR",
            format!("0.0.0.0:{}", config.admin_port),
        ),
        env(
            "MESH_PROXY_CONTROL_PLANE_ADDR",
            config.control_plane_addr.clone(),
        ),
        env(
            "MESH_PROXY_IDENTITY",
            format!(
                "spiffe://{}/ns/$(MESH_POD_NAMESPACE)/sa/$(MESH_POD_SERVICE_ACCOUNT)",
                config.trust_domain
            ),
        ),
        env("MESH_PROXY_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        // Policy Servers select the pod by namespace and labels, as admitted.
        env("MESH_PROXY_WORKLOAD_NAMESPACE", "$(MESH_POD_NAMESPACE)"),
    ];
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        let list: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        envs.push(env("MESH_PROXY_WORKLOAD_LABELS", list.join(",")));
    }
    if !config.trust_roots_pem.is_empty() {
        envs.push(env(
            "MESH_PROXY_TRUST_ROOTS",
            config.trust_roots_pem.clone(),
        ));
    }
    // Inbound connections are redirected to the proxy, which sends each to the port it was
    // meant for; the declared port is where peer proxies' own connections to the inbound
    // listener go. An app that declares no port still gets the listener, with port 0 (nothing)
    // as that default: the control plane then sends peers to the app's ports through the
    // redirect instead (see `kubernetes::slice_registrations`).
    let port = app_port(spec).unwrap_or(0);
    envs.push(env("MESH_PROXY_APP_ADDR", format!("127.0.0.1:{port}")));
    if let Some(digest) = &config.tap_token_sha256 {
        envs.push(env(ENV_PROXY_TAP_TOKEN_SHA256, digest.clone()));
    }
    if let Some(list) = opaque_ports {
        envs.push(env("MESH_PROXY_OUTBOUND_OPAQUE_PORTS", list.clone()));
        envs.push(env("MESH_PROXY_INBOUND_OPAQUE_PORTS", list));
    }
    envs.extend(tracing);
    let proxy = Container {
        name: PROXY_CONTAINER.into(),
        image: Some(config.proxy_image.clone()),
        env: Some(envs),
        ports: Some(vec![
            ContainerPort {
                name: Some("mesh-inbound".into()),
                container_port: config.inbound_port.into(),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.into()),
                container_port: config.admin_port.into(),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/ready", config.admin_port)),
        liveness_probe: Some(http_probe("/live", config.admin_port)),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "mesh-identity-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let token = Volume {
        name: "mesh-identity-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(86_400),
                    path: "token".into(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };

    // The identity names the service account, and a projected token needs one set. The API
    // server's ServiceAccount admission sets `default` before webhooks run; say it here too,
    // so offline injection (`mesh inject`) yields the same pod.
    spec.service_account_name
        .get_or_insert_with(|| "default".to_string());
    let init_containers = spec.init_containers.get_or_insert_with(Vec::new);
    init_containers.insert(0, init);
    match config.layout {
        ProxyLayout::NativeSidecar => {
            // Right after mesh-init, before any of the pod's own init containers, which then
            // reach the network through the proxy too. The kubelet starts the next container
            // only once this one's startup probe passes: the app never starts before the proxy
            // has its identity and is ready.
            let sidecar = Container {
                restart_policy: Some("Always".into()),
                startup_probe: Some(Probe {
                    period_seconds: Some(1),
                    failure_threshold: Some(300),
                    ..http_probe("/ready", config.admin_port)
                }),
                ..proxy
            };
            init_containers.insert(1, sidecar);
        }
        // The proxy goes first so that it is started (and ready) before the app's containers.
        ProxyLayout::Container => spec.containers.insert(0, proxy),
    }
    spec.volumes.get_or_insert_with(Vec::new).push(token);
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), config.proxy_image.clone());
    Ok(())
}

/// The Deployment a pod belongs to: its ReplicaSet owner's name without the
/// `pod-template-hash` suffix, as Linkerd's `deployment` label names it.
pub fn deployment_of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "ReplicaSet")?;
    let hash = kube::ResourceExt::labels(pod).get("pod-template-hash")?;
    owner
        .name
        .strip_suffix(hash.as_str())?
        .strip_suffix('-')
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> (ObjectMeta, PodSpec) {
        let meta = ObjectMeta {
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        };
        let spec = PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("podinfo".into()),
                ports: Some(vec![ContainerPort {
                    container_port: 9898,
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        (meta, spec)
    }

    fn ns(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(INJECT_ANNOTATION.to_string(), v.to_string())])
    }

    #[test]
    fn pods_opt_in_and_out_over_their_namespace() {
        let none = BTreeMap::new();
        let (m, s) = pod(&[]);
        assert!(matches!(decide(&none, &m, &s), Decision::Skip(_)));
        assert_eq!(decide(&ns("enabled"), &m, &s), Decision::Inject);
        let (m, s) = pod(&[(INJECT_ANNOTATION, "disabled")]);
        assert!(
            matches!(decide(&ns("enabled"), &m, &s), Decision::Skip(r) if r.contains("disabled"))
        );
        let (m, s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        assert_eq!(decide(&none, &m, &s), Decision::Inject);
        let (m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        s.host_network = Some(true);
        assert!(matches!(decide(&none, &m, &s), Decision::Skip(r) if r.contains("hostNetwork")));
    }

    #[test]
    fn native_sidecars_from_1_29_on_and_the_old_layout_before() {
        for (major, minor, layout) in [
            ("1", "36", ProxyLayout::NativeSidecar),
            ("1", "29", ProxyLayout::NativeSidecar),
            ("1", "33+", ProxyLayout::NativeSidecar),
            ("2", "0", ProxyLayout::NativeSidecar),
            ("1", "28", ProxyLayout::Container),
            ("1", "28+", ProxyLayout::Container),
            ("1", "", ProxyLayout::Container),
            ("", "", ProxyLayout::Container),
        ] {
            assert_eq!(
                ProxyLayout::for_server(major, minor),
                layout,
                "{major}.{minor}"
            );
        }
    }

    #[test]
    fn a_native_sidecar_starts_after_mesh_init_and_before_everything_else() {
        let (mut m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        s.init_containers = Some(vec![Container {
            name: "migrate".into(),
            ..Container::default()
        }]);
        let config = InjectConfig {
            layout: ProxyLayout::NativeSidecar,
            ..InjectConfig::default()
        };
        inject(&mut m, &mut s, &config).unwrap();
        let names = |cs: &[Container]| cs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let init = s.init_containers.as_deref().unwrap();
        assert_eq!(names(init), [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(names(&s.containers), ["app"]);
        let proxy = &init[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            proxy
                .startup_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/ready")
        );
        assert_eq!(init[0].restart_policy, None);
        // Injected once: the proxy among the init containers counts.
        assert!(
            matches!(decide(&BTreeMap::new(), &m, &s), Decision::Skip(r) if r == "already injected")
        );

        let (mut m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        let old = InjectConfig {
            layout: ProxyLayout::Container,
            ..InjectConfig::default()
        };
        inject(&mut m, &mut s, &old).unwrap();
        assert_eq!(
            names(s.init_containers.as_deref().unwrap()),
            [INIT_CONTAINER]
        );
        assert_eq!(names(&s.containers), [PROXY_CONTAINER, "app"]);
        assert_eq!(s.containers[0].restart_policy, None);
    }

    #[test]
    fn injection_adds_the_proxy_the_init_container_and_the_token_once() {
        let config = InjectConfig {
            layout: ProxyLayout::Container,
            trust_roots_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
            ..InjectConfig::default()
        };
        let (mut m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        m.labels = Some(BTreeMap::from([
            ("app".to_string(), "backend".to_string()),
            ("version".to_string(), "v2".to_string()),
        ]));
        inject(&mut m, &mut s, &config).unwrap();
        assert_eq!(s.containers[0].name, PROXY_CONTAINER);
        assert_eq!(s.containers[1].name, "app");
        let env: BTreeMap<_, _> = s.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        assert_eq!(env["MESH_PROXY_APP_ADDR"], "127.0.0.1:9898");
        // Policy selects the pod by its namespace and admitted labels.
        assert_eq!(env["MESH_PROXY_WORKLOAD_LABELS"], "app=backend,version=v2");
        assert_eq!(
            env["MESH_PROXY_WORKLOAD_NAMESPACE"],
            "$(MESH_POD_NAMESPACE)"
        );
        assert_eq!(env["MESH_PROXY_TRUST_ROOTS"], config.trust_roots_pem);
        // Tap stays off unless the control plane gives the proxy its tap token's digest.
        assert!(!env.contains_key(ENV_PROXY_TAP_TOKEN_SHA256));
        assert_eq!(
            env["MESH_PROXY_IDENTITY"],
            "spiffe://cluster.local/ns/$(MESH_POD_NAMESPACE)/sa/$(MESH_POD_SERVICE_ACCOUNT)"
        );
        let init = &s.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.name, INIT_CONTAINER);
        let script = &init.command.as_ref().unwrap()[2];
        assert!(script.contains("--uid-owner 2102 -j RETURN"), "{script}");
        assert!(script.contains("REDIRECT --to-ports 4143"), "{script}");
        assert!(
            s.volumes
                .as_ref()
                .unwrap()
                .iter()
                .any(|v| v.name == "mesh-identity-token")
        );
        assert_eq!(
            annotation(&m, INJECTED_ANNOTATION),
            Some(config.proxy_image.as_str())
        );
        // A second pass is a no-op.
        assert!(
            matches!(decide(&BTreeMap::new(), &m, &s), Decision::Skip(r) if r == "already injected")
        );
    }

    #[test]
    fn the_proxy_gets_the_tap_token_s_digest_never_the_token() {
        let digest = mesh_core::tap::token_sha256("the-tap-token");
        let config = InjectConfig {
            tap_token_sha256: Some(digest.clone()),
            ..InjectConfig::default()
        };
        let (mut m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        inject(&mut m, &mut s, &config).unwrap();
        let spec = serde_json::to_string(&s).unwrap();
        assert!(spec.contains(&digest), "{spec}");
        assert!(!spec.contains("the-tap-token"), "{spec}");
    }

    /// The injected proxy container's variables that have a value, by name.
    fn proxy_container_env(s: &PodSpec) -> BTreeMap<String, String> {
        s.init_containers
            .iter()
            .flatten()
            .find(|c| c.name == PROXY_CONTAINER)
            .unwrap()
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    #[test]
    fn opaque_ports_reach_the_proxy_both_ways_and_are_checked() {
        let config = InjectConfig::default();
        let (mut m, mut s) = pod(&[
            (INJECT_ANNOTATION, "enabled"),
            (OPAQUE_PORTS_ANNOTATION, "5432, 8000-8010"),
        ]);
        inject(&mut m, &mut s, &config).unwrap();
        let env = proxy_container_env(&s);
        assert_eq!(env["MESH_PROXY_OUTBOUND_OPAQUE_PORTS"], "5432,8000-8010");
        assert_eq!(env["MESH_PROXY_INBOUND_OPAQUE_PORTS"], "5432,8000-8010");
        // Unset: the proxy keeps its defaults.
        let (mut m, mut s) = pod(&[(INJECT_ANNOTATION, "enabled")]);
        inject(&mut m, &mut s, &config).unwrap();
        assert!(!proxy_container_env(&s).contains_key("MESH_PROXY_OUTBOUND_OPAQUE_PORTS"));
        for bad in ["5432,postgres", "0", "9-1", "70000"] {
            let (mut m, mut s) = pod(&[(OPAQUE_PORTS_ANNOTATION, bad)]);
            let e = inject(&mut m, &mut s, &config).unwrap_err();
            assert!(e.to_string().contains(OPAQUE_PORTS_ANNOTATION), "{e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn tracing_comes_from_the_injector_s_default_or_the_pod_s_annotations() {
        let proxy_env = |annotations: &[(&str, &str)], config: &InjectConfig| {
            let (mut m, mut s) = pod(annotations);
            inject(&mut m, &mut s, config).map(|()| {
                let mut env = proxy_container_env(&s);
                env.retain(|name, _| name.starts_with("MESH_PROXY_TRACE_"));
                env
            })
        };
        let off = InjectConfig::default();
        let on = InjectConfig {
            trace_collector: Some("otel-collector.tracing:4318".into()),
            trace_sampling: Some("0.1".into()),
            ..InjectConfig::default()
        };
        let vars = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        // Off unless the injector or the pod names a collector.
        assert_eq!(proxy_env(&[], &off).unwrap(), vars(&[]));
        assert_eq!(
            proxy_env(&[], &on).unwrap(),
            vars(&[
                ("MESH_PROXY_TRACE_COLLECTOR", "otel-collector.tracing:4318"),
                ("MESH_PROXY_TRACE_SAMPLING", "0.1"),
            ])
        );
        // The pod's annotations win, and `off` opts a pod out.
        assert_eq!(
            proxy_env(
                &[
                    (TRACE_COLLECTOR_ANNOTATION, "http://jaeger.tracing:4318"),
                    (TRACE_SAMPLING_ANNOTATION, "1"),
                ],
                &off
            )
            .unwrap(),
            vars(&[
                ("MESH_PROXY_TRACE_COLLECTOR", "http://jaeger.tracing:4318"),
                ("MESH_PROXY_TRACE_SAMPLING", "1"),
            ])
        );
        assert_eq!(
            proxy_env(&[(TRACE_SAMPLING_ANNOTATION, "0.5")], &on).unwrap()["MESH_PROXY_TRACE_SAMPLING"],
            "0.5"
        );
        assert_eq!(
            proxy_env(&[(TRACE_COLLECTOR_ANNOTATION, "off")], &on).unwrap(),
            vars(&[])
        );
        // A value the proxy would refuse is an error naming the annotation (the webhook then
        // leaves the pod uninjected, with a warning), with or without a collector.
        let e = proxy_env(&[(TRACE_SAMPLING_ANNOTATION, "all")], &off).unwrap_err();
        assert!(e.to_string().contains(TRACE_SAMPLING_ANNOTATION), "{e}");
        for (key, bad) in [
            (TRACE_COLLECTOR_ANNOTATION, "ftp://collector:21"),
            (TRACE_COLLECTOR_ANNOTATION, "collector:http"),
            (TRACE_SAMPLING_ANNOTATION, "2"),
            (TRACE_SAMPLING_ANNOTATION, "half"),
        ] {
            let e = proxy_env(&[(key, bad)], &on).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn skip_port_annotations_are_honoured_and_checked() {
        let config = InjectConfig::default();
        let (mut m, mut s) = pod(&[
            (INJECT_ANNOTATION, "enabled"),
            (SKIP_OUTBOUND_ANNOTATION, "5432, 6379"),
            (SKIP_INBOUND_ANNOTATION, "9090"),
        ]);
        inject(&mut m, &mut s, &config).unwrap();
        let script = &s.init_containers.as_ref().unwrap()[0]
            .command
            .as_ref()
            .unwrap()[2];
        for rule in [
            "MESH_OUTBOUND -p tcp --dport 5432 -j RETURN",
            "MESH_OUTBOUND -p tcp --dport 6379 -j RETURN",
            "MESH_INBOUND -p tcp --dport 9090 -j RETURN",
        ] {
            assert!(script.contains(rule), "{rule} missing from {script}");
        }
        let (mut m, mut s) = pod(&[(SKIP_OUTBOUND_ANNOTATION, "5432,db")]);
        let e = inject(&mut m, &mut s, &config).unwrap_err();
        assert!(
            e.to_string()
                .contains("config.mesh.dev/skip-outbound-ports"),
            "{e}"
        );
    }
}
