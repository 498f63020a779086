//! What the mesh needs of an HTTPRoute (GAMMA) to route by it.

use gateway_api::apis::standard::httproutes::HttpRoute;

use super::{
    checks::{check_duration, check_range, non_empty},
    error::FieldError,
};

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
