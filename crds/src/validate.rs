//! Admission checks shared by every store that accepts mesh resources.
//!
//! The Kubernetes apiserver enforces the CRDs' OpenAPI schema and CEL rules; the embedded control
//! plane has no apiserver, so it runs these functions instead, and the Kubernetes path can run
//! them too (for HTTPRoutes, whose upstream schema is looser than what the mesh can route).
//! [`validate`] first parses a document into its typed struct through `serde_path_to_error`, so a
//! wrong type or a missing field is reported with its path (`spec.rules[0].backendRefs[1].weight`),
//! then applies the semantic rules the schema states in CEL (`stepWeight <= maxWeight`, ranges,
//! duration syntax). Every error names the field at fault.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    Canary, HttpRoute, MetricTemplate, Workload,
    policy::{AuthorizationPolicy, MeshTlsAuthentication, NetworkAuthentication, Server},
};

/// A kind of resource the mesh serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// `rollouts.mesh.dev/v1alpha1` Canary.
    Canary,
    /// `rollouts.mesh.dev/v1alpha1` MetricTemplate.
    MetricTemplate,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoute,
    /// `workloads.mesh.dev/v1alpha1` Workload (embedded mesh only).
    Workload,
    /// `policy.mesh.dev/v1alpha1` Server.
    Server,
    /// `policy.mesh.dev/v1alpha1` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `policy.mesh.dev/v1alpha1` MeshTLSAuthentication.
    MeshTlsAuthentication,
    /// `policy.mesh.dev/v1alpha1` NetworkAuthentication.
    NetworkAuthentication,
}

impl ResourceKind {
    /// Every served kind.
    pub const ALL: [Self; 8] = [
        Self::Canary,
        Self::MetricTemplate,
        Self::HttpRoute,
        Self::Workload,
        Self::Server,
        Self::AuthorizationPolicy,
        Self::MeshTlsAuthentication,
        Self::NetworkAuthentication,
    ];

    /// The policy kinds, which the control plane resolves into proxies' inbound policies.
    pub const POLICY: [Self; 4] = [
        Self::Server,
        Self::AuthorizationPolicy,
        Self::MeshTlsAuthentication,
        Self::NetworkAuthentication,
    ];

    /// The `kind` field.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Canary => "Canary",
            Self::MetricTemplate => "MetricTemplate",
            Self::HttpRoute => "HTTPRoute",
            Self::Workload => "Workload",
            Self::Server => "Server",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::MeshTlsAuthentication => "MeshTLSAuthentication",
            Self::NetworkAuthentication => "NetworkAuthentication",
        }
    }

    /// The API group.
    pub fn group(self) -> &'static str {
        match self {
            Self::Canary | Self::MetricTemplate => crate::ROLLOUTS_GROUP,
            Self::HttpRoute => "gateway.networking.k8s.io",
            Self::Workload => crate::workload::WORKLOADS_GROUP,
            Self::Server
            | Self::AuthorizationPolicy
            | Self::MeshTlsAuthentication
            | Self::NetworkAuthentication => crate::policy::POLICY_GROUP,
        }
    }

    /// The API version within the group.
    pub fn version(self) -> &'static str {
        match self {
            Self::Canary
            | Self::MetricTemplate
            | Self::Workload
            | Self::Server
            | Self::AuthorizationPolicy
            | Self::MeshTlsAuthentication
            | Self::NetworkAuthentication => "v1alpha1",
            Self::HttpRoute => "v1",
        }
    }

    /// The `apiVersion` field: `<group>/<version>`.
    pub fn api_version(self) -> String {
        format!("{}/{}", self.group(), self.version())
    }

    /// The plural used in API paths.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Canary => "canaries",
            Self::MetricTemplate => "metrictemplates",
            Self::HttpRoute => "httproutes",
            Self::Workload => "workloads",
            Self::Server => "servers",
            Self::AuthorizationPolicy => "authorizationpolicies",
            Self::MeshTlsAuthentication => "meshtlsauthentications",
            Self::NetworkAuthentication => "networkauthentications",
        }
    }

    /// Names a user may type for this kind on the command line, besides `<plural>.<group>`.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Self::Canary => &["canary", "canaries"],
            Self::MetricTemplate => &["metrictemplate", "metrictemplates", "mt"],
            Self::HttpRoute => &["httproute", "httproutes"],
            Self::Workload => &["workload", "workloads", "wl"],
            Self::Server => &["server", "servers", "srv"],
            Self::AuthorizationPolicy => &[
                "authorizationpolicy",
                "authorizationpolicies",
                "authzpolicy",
            ],
            Self::MeshTlsAuthentication => &[
                "meshtlsauthentication",
                "meshtlsauthentications",
                "meshtlsauthn",
            ],
            Self::NetworkAuthentication => &[
                "networkauthentication",
                "networkauthentications",
                "netauthn",
            ],
        }
    }

    /// The kind a user means by `name` (`canary`, `canaries`, `mt`, `httproutes.gateway.networking.k8s.io`).
    pub fn from_user(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|k| {
            k.names().contains(&name.as_str())
                || name == format!("{}.{}", k.plural(), k.group())
                || name == format!("{}.{}", k.kind().to_ascii_lowercase(), k.group())
        })
    }

    /// The kind served under `group`/`version` with plural `plural`.
    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }

    /// The kind a document declares with its `apiVersion` and `kind`.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.api_version() == api_version)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// A field whose value is not allowed, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.analysis.stepWeight` or `spec.rules[0].backendRefs[1].weight`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error at `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a document was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The document is not a JSON/YAML object.
    #[error("the document is not an object")]
    NotAnObject,
    /// `apiVersion` or `kind` is missing or not a string.
    #[error("{0}: required, as a string")]
    MissingType(&'static str),
    /// The mesh serves no such kind.
    #[error(
        "unknown kind {kind:?} in apiVersion {api_version:?}: served kinds are Canary and \
         MetricTemplate (rollouts.mesh.dev/v1alpha1), HTTPRoute (gateway.networking.k8s.io/v1), \
         Workload (workloads.mesh.dev/v1alpha1), and Server, AuthorizationPolicy, \
         MeshTLSAuthentication and NetworkAuthentication (policy.mesh.dev/v1alpha1)"
    )]
    UnknownKind {
        /// The document's `apiVersion`.
        api_version: String,
        /// The document's `kind`.
        kind: String,
    },
    /// A field is malformed or breaks a rule.
    #[error("{kind} {name:?}: {error}")]
    Field {
        /// The resource's kind.
        kind: ResourceKind,
        /// The resource's name (empty if it has none).
        name: String,
        /// The field at fault.
        error: FieldError,
    },
}

impl ValidationError {
    /// The path of the field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::NotAnObject | Self::UnknownKind { .. } => None,
            Self::MissingType(f) => Some(f),
            Self::Field { error, .. } => Some(&error.field),
        }
    }
}

/// A document that passed validation, typed.
#[derive(Clone, Debug)]
pub enum Validated {
    /// A Canary.
    Canary(Box<Canary>),
    /// A MetricTemplate.
    MetricTemplate(Box<MetricTemplate>),
    /// An HTTPRoute.
    HttpRoute(Box<HttpRoute>),
    /// A Workload.
    Workload(Box<Workload>),
    /// A Server.
    Server(Box<Server>),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    /// A MeshTLSAuthentication.
    MeshTlsAuthentication(Box<MeshTlsAuthentication>),
    /// A NetworkAuthentication.
    NetworkAuthentication(Box<NetworkAuthentication>),
}

/// The kind a document declares, without validating the rest.
pub fn kind_of(object: &Value) -> Result<ResourceKind, ValidationError> {
    let map = object.as_object().ok_or(ValidationError::NotAnObject)?;
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or(ValidationError::MissingType("apiVersion"))?;
    let kind = map
        .get("kind")
        .and_then(Value::as_str)
        .ok_or(ValidationError::MissingType("kind"))?;
    ResourceKind::from_type(api_version, kind).ok_or_else(|| ValidationError::UnknownKind {
        api_version: api_version.into(),
        kind: kind.into(),
    })
}

/// Checks a whole document (as a Kubernetes object in JSON form): its type, its metadata, that it
/// parses into the typed struct, and the semantic rules of its kind.
pub fn validate(object: &Value) -> Result<Validated, ValidationError> {
    let kind = kind_of(object)?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let fail = |error: FieldError| ValidationError::Field {
        kind,
        name: name.clone(),
        error,
    };
    validate_metadata(object).map_err(fail)?;
    Ok(match kind {
        ResourceKind::Canary => {
            let c: Canary = parse(object).map_err(fail)?;
            validate_canary(&c).map_err(fail)?;
            Validated::Canary(Box::new(c))
        }
        ResourceKind::MetricTemplate => {
            let m: MetricTemplate = parse(object).map_err(fail)?;
            validate_metric_template(&m).map_err(fail)?;
            Validated::MetricTemplate(Box::new(m))
        }
        ResourceKind::HttpRoute => {
            let r: HttpRoute = parse(object).map_err(fail)?;
            validate_http_route(&r).map_err(fail)?;
            Validated::HttpRoute(Box::new(r))
        }
        ResourceKind::Workload => {
            let w: Workload = parse(object).map_err(fail)?;
            validate_workload(&w).map_err(fail)?;
            Validated::Workload(Box::new(w))
        }
        ResourceKind::Server => {
            let srv: Server = parse(object).map_err(fail)?;
            validate_server(&srv).map_err(fail)?;
            Validated::Server(Box::new(srv))
        }
        ResourceKind::AuthorizationPolicy => {
            let p: AuthorizationPolicy = parse(object).map_err(fail)?;
            validate_authorization_policy(&p).map_err(fail)?;
            Validated::AuthorizationPolicy(Box::new(p))
        }
        ResourceKind::MeshTlsAuthentication => {
            let m: MeshTlsAuthentication = parse(object).map_err(fail)?;
            validate_mesh_tls_authentication(&m).map_err(fail)?;
            Validated::MeshTlsAuthentication(Box::new(m))
        }
        ResourceKind::NetworkAuthentication => {
            let n: NetworkAuthentication = parse(object).map_err(fail)?;
            validate_network_authentication(&n).map_err(fail)?;
            Validated::NetworkAuthentication(Box::new(n))
        }
    })
}

/// Parses a document into `T`, naming the field path when it does not fit.
pub fn parse<T: DeserializeOwned>(object: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let field = match missing_field(&message) {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None if path == "." => "(root)".to_string(),
            None => path,
        };
        FieldError::new(field, message)
    })
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field)
}

/// `metadata.name` and `metadata.namespace` are DNS-style names, as Kubernetes requires; the
/// embedded store uses them in keys, so a `/` must never get through.
pub fn validate_metadata(object: &Value) -> Result<(), FieldError> {
    let name = object.pointer("/metadata/name");
    match name {
        None | Some(Value::Null) => return Err(FieldError::new("metadata.name", "required")),
        Some(Value::String(n)) => check_dns_name("metadata.name", n, 253)?,
        Some(_) => return Err(FieldError::new("metadata.name", "must be a string")),
    }
    match object.pointer("/metadata/namespace") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(ns)) => check_dns_name("metadata.namespace", ns, 63),
        Some(_) => Err(FieldError::new("metadata.namespace", "must be a string")),
    }
}

fn check_dns_name(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ok_ends = value
        .bytes()
        .next()
        .zip(value.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if !value.is_empty() && value.len() <= max && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{value:?} is not a valid name: use at most {max} lowercase letters, digits, \
                 '-' and '.', starting and ending with a letter or digit"
            ),
        ))
    }
}

fn check_range(field: &str, value: Option<i32>, min: i32, max: i32) -> Result<(), FieldError> {
    match value {
        Some(v) if v < min || v > max => Err(FieldError::new(
            field,
            format!("{v} is out of range: must be between {min} and {max}"),
        )),
        _ => Ok(()),
    }
}

/// A duration as Flagger and Kubernetes users write them (`30s`, `1m30s`, `500ms`), in
/// milliseconds. `None` when the text is not such a duration.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let d = mesh_core::duration::parse(text).ok()?;
    u64::try_from(d.as_millis()).ok()
}

fn check_duration(field: &str, value: Option<&str>) -> Result<(), FieldError> {
    match value {
        Some(v) if parse_duration_ms(v).is_none() => Err(FieldError::new(
            field,
            format!("{v:?} is not a duration: write it like 30s, 1m or 500ms"),
        )),
        _ => Ok(()),
    }
}

fn check_url(field: &str, value: &str) -> Result<(), FieldError> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} must be an http:// or https:// URL"),
        ))
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// The rules of the Canary schema: ranges, durations and the CEL rules on `analysis`.
pub fn validate_canary(canary: &Canary) -> Result<(), FieldError> {
    let spec = &canary.spec;
    non_empty("spec.targetRef.kind", &spec.target_ref.kind)?;
    non_empty("spec.targetRef.name", &spec.target_ref.name)?;
    check_range("spec.service.port", Some(spec.service.port), 1, 65535)?;
    check_duration("spec.service.timeout", spec.service.timeout.as_deref())?;
    check_range(
        "spec.progressDeadlineSeconds",
        spec.progress_deadline_seconds,
        1,
        i32::MAX,
    )?;

    let a = &spec.analysis;
    check_duration("spec.analysis.interval", Some(&a.interval))?;
    check_range("spec.analysis.threshold", Some(a.threshold), 1, i32::MAX)?;
    check_range("spec.analysis.maxWeight", a.max_weight, 1, 100)?;
    check_range("spec.analysis.stepWeight", a.step_weight, 1, 100)?;
    check_range(
        "spec.analysis.stepWeightPromotion",
        a.step_weight_promotion,
        1,
        100,
    )?;
    check_range("spec.analysis.iterations", a.iterations, 1, i32::MAX)?;
    if let (Some(step), Some(max)) = (a.step_weight, a.max_weight)
        && step > max
    {
        return Err(FieldError::new(
            "spec.analysis.stepWeight",
            format!("stepWeight must not exceed maxWeight ({step} > {max})"),
        ));
    }
    if let Some(steps) = &a.step_weights {
        if steps.is_empty() || steps.len() > 100 {
            return Err(FieldError::new(
                "spec.analysis.stepWeights",
                "must hold between 1 and 100 entries",
            ));
        }
        for (i, w) in steps.iter().enumerate() {
            let field = format!("spec.analysis.stepWeights[{i}]");
            check_range(&field, Some(*w), 1, 100)?;
            if let Some(max) = a.max_weight
                && *w > max
            {
                return Err(FieldError::new(
                    field,
                    format!("every stepWeights entry must be at most maxWeight ({w} > {max})"),
                ));
            }
        }
    }
    if a.step_weight.is_none() && a.step_weights.is_none() && a.iterations.is_none() {
        return Err(FieldError::new(
            "spec.analysis",
            "one of stepWeight, stepWeights or iterations is required",
        ));
    }
    if a.metrics.len() > 32 {
        return Err(FieldError::new(
            "spec.analysis.metrics",
            "at most 32 entries",
        ));
    }
    for (i, m) in a.metrics.iter().enumerate() {
        let at = |f: &str| format!("spec.analysis.metrics[{i}].{f}");
        non_empty(&at("name"), &m.name)?;
        check_duration(&at("interval"), m.interval.as_deref())?;
        if mesh_core::gates::builtin(&m.name).is_none() && m.template_ref.is_none() {
            return Err(FieldError::new(
                at("templateRef"),
                format!(
                    "metric {:?} needs a templateRef: only {} are built in",
                    m.name,
                    mesh_core::gates::names_in_words("")
                ),
            ));
        }
        if let Some(r) = &m.threshold_range
            && let (Some(min), Some(max)) = (r.min, r.max)
            && min > max
        {
            return Err(FieldError::new(
                at("thresholdRange"),
                format!("thresholdRange.min must not exceed thresholdRange.max ({min} > {max})"),
            ));
        }
        if let Some(t) = &m.template_ref {
            non_empty(&at("templateRef.name"), &t.name)?;
        }
    }
    if a.webhooks.len() > 32 {
        return Err(FieldError::new(
            "spec.analysis.webhooks",
            "at most 32 entries",
        ));
    }
    for (i, w) in a.webhooks.iter().enumerate() {
        let at = |f: &str| format!("spec.analysis.webhooks[{i}].{f}");
        non_empty(&at("name"), &w.name)?;
        check_url(&at("url"), &w.url)?;
        check_duration(&at("timeout"), w.timeout.as_deref())?;
    }
    Ok(())
}

/// The rules of the MetricTemplate schema.
pub fn validate_metric_template(template: &MetricTemplate) -> Result<(), FieldError> {
    non_empty("spec.query", &template.spec.query)?;
    if let Some(address) = &template.spec.provider.address {
        check_url("spec.provider.address", address)?;
    }
    Ok(())
}

/// What the mesh needs of an HTTPRoute to route by it (GAMMA): at least one parentRef, every
/// weight between 0 and 1,000,000 (the Gateway API bound), ports in range and durations readable.
pub fn validate_http_route(route: &HttpRoute) -> Result<(), FieldError> {
    let spec = &route.spec;
    let parents = spec.parent_refs.as_deref().unwrap_or_default();
    if parents.is_empty() {
        return Err(FieldError::new(
            "spec.parentRefs",
            "at least one parentRef is required: the Service whose traffic the route splits",
        ));
    }
    for (i, p) in parents.iter().enumerate() {
        non_empty(&format!("spec.parentRefs[{i}].name"), &p.name)?;
        check_range(&format!("spec.parentRefs[{i}].port"), p.port, 1, 65535)?;
    }
    for (r, rule) in spec.rules.iter().flatten().enumerate() {
        for (b, backend) in rule.backend_refs.iter().flatten().enumerate() {
            let at = |f: &str| format!("spec.rules[{r}].backendRefs[{b}].{f}");
            non_empty(&at("name"), &backend.name)?;
            check_range(&at("weight"), backend.weight, 0, 1_000_000)?;
            check_range(&at("port"), backend.port, 1, 65535)?;
        }
        if let Some(t) = &rule.timeouts {
            check_duration(
                &format!("spec.rules[{r}].timeouts.request"),
                t.request.as_deref(),
            )?;
            check_duration(
                &format!("spec.rules[{r}].timeouts.backendRequest"),
                t.backend_request.as_deref(),
            )?;
        }
        for (m, matched) in rule.matches.iter().flatten().enumerate() {
            if let Some(path) = &matched.path
                && let Some(value) = &path.value
                && !value.starts_with('/')
            {
                return Err(FieldError::new(
                    format!("spec.rules[{r}].matches[{m}].path.value"),
                    format!("{value:?} must start with '/'"),
                ));
            }
        }
    }
    Ok(())
}

/// The rules of a Workload: the version to run is one it declares, each version has a command,
/// and the port and replica count are in range.
pub fn validate_workload(w: &Workload) -> Result<(), FieldError> {
    let spec = &w.spec;
    check_range("spec.port", spec.port, 1, 65535)?;
    check_range("spec.replicas", spec.replicas, 1, 16)?;
    if spec.versions.is_empty() {
        return Err(FieldError::new(
            "spec.versions",
            "declare at least one version, e.g. v1: {command: [my-app]}",
        ));
    }
    for (name, v) in &spec.versions {
        check_dns_name(&format!("spec.versions.{name}"), name, 63)?;
        if v.command.first().is_none_or(|c| c.trim().is_empty()) {
            return Err(FieldError::new(
                format!("spec.versions.{name}.command"),
                "required: the program to run and its arguments",
            ));
        }
        if let Some(k) = v.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(FieldError::new(
                format!("spec.versions.{name}.env"),
                format!("{k:?} is not a valid environment variable name"),
            ));
        }
    }
    if !spec.versions.contains_key(&spec.version) {
        let known: Vec<&str> = spec.versions.keys().map(String::as_str).collect();
        return Err(FieldError::new(
            "spec.version",
            format!(
                "{:?} is not one of the declared versions ({})",
                spec.version,
                known.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The rules of the Server schema: a port in range and a selector whose expressions make sense.
pub fn validate_server(server: &Server) -> Result<(), FieldError> {
    check_range("spec.port", Some(server.spec.port), 1, 65535)?;
    for (i, e) in server
        .spec
        .pod_selector
        .match_expressions
        .iter()
        .enumerate()
    {
        let at = |f: &str| format!("spec.podSelector.matchExpressions[{i}].{f}");
        non_empty(&at("key"), &e.key)?;
        let needs_values = matches!(
            e.operator,
            crate::policy::SelectorOperator::In | crate::policy::SelectorOperator::NotIn
        );
        if needs_values == e.values.is_empty() {
            return Err(FieldError::new(
                at("values"),
                if needs_values {
                    "required (non-empty) for In and NotIn"
                } else {
                    "must be empty for Exists and DoesNotExist"
                },
            ));
        }
    }
    Ok(())
}

/// The rules of the AuthorizationPolicy schema: a target and authentications of known kinds.
pub fn validate_authorization_policy(policy: &AuthorizationPolicy) -> Result<(), FieldError> {
    let target = &policy.spec.target_ref;
    let group = target.group.as_deref().unwrap_or_default();
    match (target.kind.as_str(), group) {
        ("Server", crate::policy::POLICY_GROUP) | ("Namespace", "") => {}
        (kind, group) => {
            return Err(FieldError::new(
                "spec.targetRef",
                format!(
                    "kind {kind:?} in group {group:?} cannot be targeted: use kind Server \
                     (group policy.mesh.dev) or kind Namespace (core group)"
                ),
            ));
        }
    }
    non_empty("spec.targetRef.name", &target.name)?;
    for (i, r) in policy.spec.required_authentication_refs.iter().enumerate() {
        let at = |f: &str| format!("spec.requiredAuthenticationRefs[{i}].{f}");
        let group = r.group.as_deref().unwrap_or_default();
        match (r.kind.as_str(), group) {
            ("MeshTLSAuthentication" | "NetworkAuthentication", crate::policy::POLICY_GROUP)
            | ("ServiceAccount", "") => {}
            (kind, group) => {
                return Err(FieldError::new(
                    at("kind"),
                    format!(
                        "kind {kind:?} in group {group:?} is not an authentication: use \
                         MeshTLSAuthentication or NetworkAuthentication (group policy.mesh.dev) \
                         or ServiceAccount (core group)"
                    ),
                ));
            }
        }
        check_dns_name(&at("name"), &r.name, 253)?;
        if let Some(ns) = &r.namespace {
            check_dns_name(&at("namespace"), ns, 63)?;
        }
    }
    Ok(())
}

/// The rules of the MeshTLSAuthentication schema: at least one identity, each well formed.
pub fn validate_mesh_tls_authentication(m: &MeshTlsAuthentication) -> Result<(), FieldError> {
    if m.spec.identities.is_empty() && m.spec.identity_refs.is_empty() {
        return Err(FieldError::new(
            "spec.identities",
            "give at least one identity or identityRef",
        ));
    }
    for (i, id) in m.spec.identities.iter().enumerate() {
        id.parse::<mesh_policies::IdentityMatch>()
            .map_err(|e| FieldError::new(format!("spec.identities[{i}]"), e.to_string()))?;
    }
    for (i, r) in m.spec.identity_refs.iter().enumerate() {
        let at = |f: &str| format!("spec.identityRefs[{i}].{f}");
        if !matches!(r.kind.as_str(), "ServiceAccount" | "Namespace") {
            return Err(FieldError::new(
                at("kind"),
                format!("{:?} is not ServiceAccount or Namespace", r.kind),
            ));
        }
        check_dns_name(&at("name"), &r.name, 253)?;
        if let Some(ns) = &r.namespace {
            check_dns_name(&at("namespace"), ns, 63)?;
        }
    }
    Ok(())
}

/// The rules of the NetworkAuthentication schema: at least one network, every CIDR readable and
/// every exception inside its network.
pub fn validate_network_authentication(n: &NetworkAuthentication) -> Result<(), FieldError> {
    if n.spec.networks.is_empty() {
        return Err(FieldError::new(
            "spec.networks",
            "give at least one network, e.g. {cidr: 10.0.0.0/8}",
        ));
    }
    for (i, net) in n.spec.networks.iter().enumerate() {
        let cidr = mesh_policies::parse_cidr(&net.cidr)
            .map_err(|e| FieldError::new(format!("spec.networks[{i}].cidr"), e))?;
        for (j, except) in net.except.iter().enumerate() {
            let field = format!("spec.networks[{i}].except[{j}]");
            let e = mesh_policies::parse_cidr(except).map_err(|e| FieldError::new(&field, e))?;
            if !cidr.contains(&e) {
                return Err(FieldError::new(field, format!("{e} is not inside {cidr}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::needless_pass_by_value,
    reason = "builders read better taking json! values"
)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mk_route(weights: Value) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "parentRefs": [{"name": "web", "kind": "Service", "port": 80}],
                "rules": [{"backendRefs": [
                    {"name": "web-primary", "port": 80, "weight": weights[0]},
                    {"name": "web-canary", "port": 80, "weight": weights[1]},
                ]}]
            }
        })
    }

    fn mk_canary(analysis: Value) -> Value {
        json!({
            "apiVersion": "rollouts.mesh.dev/v1alpha1",
            "kind": "Canary",
            "metadata": {"name": "web"},
            "spec": {
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "service": {"port": 80},
                "analysis": analysis
            }
        })
    }

    fn field(v: &Value) -> String {
        validate(v)
            .unwrap_err()
            .field()
            .unwrap_or_default()
            .to_string()
    }

    fn policy(kind: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "policy.mesh.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": "p", "namespace": "default"},
            "spec": spec,
        })
    }

    #[test]
    fn policy_resources_name_the_field_at_fault() {
        let server = |spec| policy("Server", spec);
        assert!(matches!(
            validate(&server(
                json!({"podSelector": {"matchLabels": {"app": "b"}}, "port": 8080, "proxyProtocol": "HTTP/2"})
            )),
            Ok(Validated::Server(_))
        ));
        assert_eq!(field(&server(json!({"port": 8080}))), "spec.podSelector");
        assert_eq!(
            field(&server(json!({"podSelector": {}, "port": 70000}))),
            "spec.port"
        );
        assert_eq!(
            field(&server(json!({"podSelector": {}, "port": "http"}))),
            "spec.port"
        );
        assert_eq!(
            field(&server(
                json!({"podSelector": {}, "port": 80, "proxyProtocol": "SMTP"})
            )),
            "spec.proxyProtocol"
        );
        assert_eq!(
            field(&server(
                json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}, "port": 80})
            )),
            "spec.podSelector.matchExpressions[0].values"
        );

        let authz = |spec| policy("AuthorizationPolicy", spec);
        assert!(
            validate(&authz(json!({
                "targetRef": {"group": "policy.mesh.dev", "kind": "Server", "name": "b"},
                "requiredAuthenticationRefs": [
                    {"group": "policy.mesh.dev", "kind": "MeshTLSAuthentication", "name": "web"},
                    {"kind": "ServiceAccount", "name": "web", "namespace": "prod"},
                ],
            })))
            .is_ok()
        );
        assert_eq!(
            field(&authz(
                json!({"targetRef": {"kind": "Deployment", "name": "b"}})
            )),
            "spec.targetRef"
        );
        assert_eq!(
            field(&authz(json!({
                "targetRef": {"kind": "Namespace", "name": "default"},
                "requiredAuthenticationRefs": [{"kind": "Secret", "name": "x"}],
            }))),
            "spec.requiredAuthenticationRefs[0].kind"
        );

        let mtls = |spec| policy("MeshTLSAuthentication", spec);
        assert!(
            validate(&mtls(
                json!({"identities": ["*", "spiffe://cluster.local/ns/a/*"]})
            ))
            .is_ok()
        );
        assert_eq!(field(&mtls(json!({}))), "spec.identities");
        assert_eq!(
            field(&mtls(json!({"identities": ["web"]}))),
            "spec.identities[0]"
        );
        assert_eq!(
            field(&mtls(
                json!({"identityRefs": [{"kind": "User", "name": "x"}]})
            )),
            "spec.identityRefs[0].kind"
        );

        let net = |spec| policy("NetworkAuthentication", spec);
        assert!(validate(&net(json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}, {"cidr": "::1"}]}))).is_ok());
        assert_eq!(field(&net(json!({"networks": []}))), "spec.networks");
        assert_eq!(
            field(&net(json!({"networks": [{"cidr": "10.0.0.0/33"}]}))),
            "spec.networks[0].cidr"
        );
        let e = validate(&net(
            json!({"networks": [{"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]}),
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("spec.networks[0].except[0]"));
        assert!(
            e.to_string()
                .contains("192.168.0.0/16 is not inside 10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn good_documents_pass() {
        assert!(matches!(
            validate(&mk_route(json!([90, 10]))),
            Ok(Validated::HttpRoute(_))
        ));
        let c =
            mk_canary(json!({"interval": "1m", "threshold": 5, "maxWeight": 50, "stepWeight": 10}));
        assert!(matches!(validate(&c), Ok(Validated::Canary(_))));
    }

    #[test]
    fn weights_must_be_non_negative_integers() {
        assert_eq!(
            field(&mk_route(json!([90, -1]))),
            "spec.rules[0].backendRefs[1].weight"
        );
        assert_eq!(
            field(&mk_route(json!([90, "ten"]))),
            "spec.rules[0].backendRefs[1].weight"
        );
        assert_eq!(
            field(&mk_route(json!([1.5, 10]))),
            "spec.rules[0].backendRefs[0].weight"
        );
    }

    #[test]
    fn routes_need_a_parent() {
        let mut r = mk_route(json!([1, 1]));
        r["spec"].as_object_mut().unwrap().remove("parentRefs");
        assert_eq!(field(&r), "spec.parentRefs");
    }

    #[test]
    fn missing_fields_are_named() {
        let mut c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 10}));
        c["spec"].as_object_mut().unwrap().remove("targetRef");
        assert_eq!(field(&c), "spec.targetRef");
        let c = mk_canary(json!({"threshold": 5, "stepWeight": 10}));
        assert_eq!(field(&c), "spec.analysis.interval");
        let mut c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 10}));
        c["metadata"].as_object_mut().unwrap().remove("name");
        assert_eq!(field(&c), "metadata.name");
    }

    #[test]
    fn cel_rules_are_enforced() {
        let c =
            mk_canary(json!({"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeight": 30}));
        let err = validate(&c).unwrap_err();
        assert_eq!(err.field(), Some("spec.analysis.stepWeight"));
        assert!(err.to_string().contains("maxWeight"), "{err}");
        let c = mk_canary(
            json!({"interval": "1m", "threshold": 5, "maxWeight": 20, "stepWeights": [10, 30]}),
        );
        assert_eq!(field(&c), "spec.analysis.stepWeights[1]");
        let c = mk_canary(json!({"interval": "1m", "threshold": 5}));
        assert_eq!(field(&c), "spec.analysis");
        let c = mk_canary(json!({"interval": "soon", "threshold": 5, "stepWeight": 5}));
        assert_eq!(field(&c), "spec.analysis.interval");
        let c = mk_canary(json!({"interval": "1m", "threshold": 5, "stepWeight": 5,
            "metrics": [{"name": "error-budget"}]}));
        assert_eq!(field(&c), "spec.analysis.metrics[0].templateRef");
    }

    #[test]
    fn unknown_kinds_and_bad_names_are_rejected() {
        let err = validate(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}))
            .unwrap_err();
        assert!(matches!(err, ValidationError::UnknownKind { .. }), "{err}");
        let mut r = mk_route(json!([1, 1]));
        r["metadata"]["name"] = json!("a/b");
        assert_eq!(field(&r), "metadata.name");
        assert_eq!(
            validate(&json!({"kind": "Canary"})).unwrap_err(),
            ValidationError::MissingType("apiVersion")
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1.5s"), Some(1_500));
        assert_eq!(parse_duration_ms("24h"), Some(86_400_000));
        for bad in ["", "10", "s", "1d", "-1s"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn kinds_resolve_from_user_names_and_paths() {
        assert_eq!(
            ResourceKind::from_user("canaries"),
            Some(ResourceKind::Canary)
        );
        assert_eq!(
            ResourceKind::from_user("mt"),
            Some(ResourceKind::MetricTemplate)
        );
        assert_eq!(
            ResourceKind::from_user("httproutes.gateway.networking.k8s.io"),
            Some(ResourceKind::HttpRoute)
        );
        assert_eq!(ResourceKind::from_user("pods"), None);
        assert_eq!(
            ResourceKind::from_path("gateway.networking.k8s.io", "v1", "httproutes"),
            Some(ResourceKind::HttpRoute)
        );
    }
}
