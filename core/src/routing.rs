//! Pure routing decisions over a [`RouteTable`]: which rule a request matches, and which backend
//! it goes to. The proxy calls these per request; they allocate nothing on the hot path except
//! compiled regexes, which are built once per table by [`CompiledRoutes`].

use crate::proxy_api::{
    PathMatch, PathModifier, Redirect, RetryPolicy, RouteMatch, RouteRule, RouteTable, ValueMatch,
    WeightedBackend,
};

/// Statuses a control plane should put in a retry policy whose HTTPRoute names no codes: the
/// gateway errors that mean the request did not get a real answer (Linkerd's default too).
pub const DEFAULT_RETRY_STATUSES: [u16; 3] = [502, 503, 504];

impl RetryPolicy {
    /// Whether a response with `status` is retried. Connection failures (nothing was sent) are
    /// always retried, whatever the statuses say.
    pub fn retries_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }
}

/// The parts of a request that routing reads.
#[derive(Clone, Copy)]
pub struct RequestParts<'a> {
    /// Method, upper case.
    pub method: &'a str,
    /// Path, without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Header lookup: all values of a header (name lower case).
    pub headers: &'a dyn Fn(&str) -> Vec<&'a str>,
}

impl std::fmt::Debug for RequestParts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestParts")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// A regex in a route that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("route {parent} rule {rule}: invalid regular expression {pattern:?}: {source}")]
pub struct RouteRegexError {
    parent: String,
    rule: usize,
    pattern: String,
    source: regex::Error,
}

/// A route table with its regular expressions compiled.
#[derive(Clone, Debug)]
pub struct CompiledRoutes {
    table: RouteTable,
    /// Per rule, per match: compiled (path, headers, query) regexes where the match uses them;
    /// empty when no rule has a match.
    regexes: Vec<Vec<MatchRegexes>>,
}

#[derive(Clone, Debug, Default)]
struct MatchRegexes {
    path: Option<regex::Regex>,
    headers: Vec<Option<regex::Regex>>,
    query: Vec<Option<regex::Regex>>,
}

fn anchored(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

impl CompiledRoutes {
    /// Compiles a table; a bad regex is an error naming the route and rule.
    pub fn new(table: RouteTable) -> Result<Self, RouteRegexError> {
        // A table whose rules match every request (a catch-all or a plain split, the common
        // case) keeps no list: `route` reads it only for a rule with matches.
        if table.rules.iter().all(|r| r.matches.is_empty()) {
            return Ok(Self {
                table,
                regexes: Vec::new(),
            });
        }
        let mut regexes = Vec::with_capacity(table.rules.len());
        for (i, rule) in table.rules.iter().enumerate() {
            let err = |pattern: &str, source| RouteRegexError {
                parent: table.parent.to_string(),
                rule: i,
                pattern: pattern.to_string(),
                source,
            };
            let compile_values = |values: &[ValueMatch]| {
                values
                    .iter()
                    .map(|v| {
                        v.regex
                            .then(|| anchored(&v.value).map_err(|e| err(&v.value, e)))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let mut per_match = Vec::with_capacity(rule.matches.len());
            for m in &rule.matches {
                let path = match &m.path {
                    Some(PathMatch::RegularExpression(p)) => {
                        Some(anchored(p).map_err(|e| err(p, e))?)
                    }
                    _ => None,
                };
                per_match.push(MatchRegexes {
                    path,
                    headers: compile_values(&m.headers)?,
                    query: compile_values(&m.query_params)?,
                });
            }
            regexes.push(per_match);
        }
        Ok(Self { table, regexes })
    }

    /// The table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// The first rule matching the request, with its index.
    pub fn route(&self, req: &RequestParts<'_>) -> Option<(usize, &RouteRule)> {
        self.table.rules.iter().enumerate().find(|(i, rule)| {
            rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .zip(&self.regexes[*i])
                    .any(|(m, re)| matches(m, re, req))
        })
    }
}

fn value_ok(want: &ValueMatch, re: Option<&regex::Regex>, got: &str) -> bool {
    match re {
        Some(re) => re.is_match(got),
        None => want.value == got,
    }
}

fn matches(m: &RouteMatch, re: &MatchRegexes, req: &RequestParts<'_>) -> bool {
    if m.method
        .as_ref()
        .is_some_and(|method| !method.eq_ignore_ascii_case(req.method))
    {
        return false;
    }
    let path_ok = match &m.path {
        None => true,
        Some(PathMatch::Exact(p)) => req.path == p,
        Some(PathMatch::PathPrefix(p)) => prefix_matches(p, req.path),
        Some(PathMatch::RegularExpression(_)) => {
            re.path.as_ref().is_some_and(|r| r.is_match(req.path))
        }
    };
    if !path_ok {
        return false;
    }
    let headers_ok = m.headers.iter().zip(&re.headers).all(|(h, r)| {
        (req.headers)(&h.name.to_ascii_lowercase())
            .iter()
            .any(|v| value_ok(h, r.as_ref(), v))
    });
    if !headers_ok {
        return false;
    }
    m.query_params.iter().zip(&re.query).all(|(q, r)| {
        req.query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .any(|(k, v)| k == q.name && value_ok(q, r.as_ref(), v))
    })
}

/// Gateway API PathPrefix: element-wise, so `/api` matches `/api` and `/api/x` but not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl RouteRule {
    /// The services this rule's RequestMirror filters copy requests to.
    pub fn mirror_backends(&self) -> impl Iterator<Item = &crate::proxy_api::ServiceRef> {
        self.filters.iter().filter_map(|f| match f {
            crate::proxy_api::RouteFilter::RequestMirror { backend, .. } => Some(backend),
            _ => None,
        })
    }

    /// The prefix this rule's PathPrefix match matched, which a `ReplacePrefixMatch` replaces.
    /// The control plane sends one match per rule, so there is at most one.
    pub fn matched_prefix(&self) -> Option<&str> {
        self.matches.iter().find_map(|m| match &m.path {
            Some(PathMatch::PathPrefix(p)) => Some(p.as_str()),
            _ => None,
        })
    }
}

/// The path after a Gateway API path modifier. `ReplacePrefixMatch` replaces the matched prefix
/// element-wise (`/api` matched in `/api/v1`, replaced by `/v2`, gives `/v2/v1`; replaced by `/`,
/// gives `/v1`); without a matched prefix it replaces nothing but the leading `/`.
pub fn modified_path(modifier: &PathModifier, matched_prefix: Option<&str>, path: &str) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(full) => full.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.get(prefix.len()..).unwrap_or("");
            let rest = if rest.is_empty() || rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            };
            let out = format!("{}{rest}", replacement.trim_end_matches('/'));
            if out.is_empty() {
                "/".into()
            } else if out.starts_with('/') {
                out
            } else {
                format!("/{out}")
            }
        }
    }
}

/// What a redirect reads from the request it answers.
#[derive(Clone, Copy, Debug)]
pub struct RedirectFrom<'a> {
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The host the request named, without a port.
    pub host: &'a str,
    /// The port the request was for.
    pub port: u16,
    /// Path, without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `Location` of a Gateway API RequestRedirect. Parts the redirect leaves out keep the
/// request's; the port is the redirect's, else the new scheme's well-known one when the scheme
/// changes, else the request's, and is left out when it is the scheme's well-known port. The
/// query is kept.
pub fn redirect_location(
    redirect: &Redirect,
    matched_prefix: Option<&str>,
    from: &RedirectFrom<'_>,
) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(from.scheme);
    let host = redirect.hostname.as_deref().unwrap_or(from.host);
    let port = match (redirect.port, &redirect.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(s)) => default_port(s),
        (None, None) => Some(from.port),
    };
    let path = redirect.path.as_ref().map_or_else(
        || from.path.to_string(),
        |m| modified_path(m, matched_prefix, from.path),
    );
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| Some(*p) != default_port(scheme)) {
        out += &format!(":{p}");
    }
    out += &path;
    if let Some(q) = from.query {
        out += "?";
        out += q;
    }
    out
}

/// The share of requests (0-100) a Gateway API RequestMirror copies: its `percent`, else its
/// `fraction` (`numerator / denominator`, the denominator 100 when left out), else all. Out of
/// range values are clamped; a zero denominator mirrors nothing.
pub fn mirror_percent(percent: Option<i32>, fraction: Option<(i32, Option<i32>)>) -> f64 {
    let share = match (percent, fraction) {
        (Some(p), _) => f64::from(p),
        (None, Some((numerator, denominator))) => {
            let denominator = denominator.unwrap_or(100);
            if denominator <= 0 {
                0.0
            } else {
                f64::from(numerator) * 100.0 / f64::from(denominator)
            }
        }
        (None, None) => 100.0,
    };
    share.clamp(0.0, 100.0)
}

/// Whether a request falls in a sampled share: `percent` of 0-100, `roll` uniform in `[0, 1)`.
/// 0 never samples, 100 always does.
pub fn sampled(percent: f64, roll: f64) -> bool {
    roll * 100.0 < percent
}

/// Picks a backend by weight. `available(i)` says whether backend `i` has ready endpoints; an
/// unavailable backend counts as weight 0 for this pick. `roll` is uniform in `[0, 1)`. Returns
/// `None` when no backend has weight and endpoints.
pub fn pick_backend(
    backends: &[WeightedBackend],
    available: impl Fn(usize) -> bool,
    roll: f64,
) -> Option<usize> {
    let weight = |i: usize, b: &WeightedBackend| if available(i) { u64::from(b.weight) } else { 0 };
    let total: u64 = backends.iter().enumerate().map(|(i, b)| weight(i, b)).sum();
    if total == 0 {
        return None;
    }
    // Integer arithmetic keeps weights 0 and 100 exact: a zero-weight backend never owns a slot.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let mut slot = ((roll.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1);
    for (i, b) in backends.iter().enumerate() {
        let w = weight(i, b);
        if slot < w {
            return Some(i);
        }
        slot -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_api::ServiceRef;

    #[test]
    fn a_mirror_copies_its_percent_else_its_fraction_else_everything() {
        assert!((mirror_percent(None, None) - 100.0).abs() < f64::EPSILON);
        assert!((mirror_percent(Some(50), None) - 50.0).abs() < f64::EPSILON);
        assert!((mirror_percent(None, Some((1, Some(4)))) - 25.0).abs() < f64::EPSILON);
        assert!((mirror_percent(None, Some((33, None))) - 33.0).abs() < f64::EPSILON);
        assert!(mirror_percent(None, Some((1, Some(0)))).abs() < f64::EPSILON);
        assert!((mirror_percent(Some(250), None) - 100.0).abs() < f64::EPSILON);
        assert!(mirror_percent(Some(-5), None).abs() < f64::EPSILON);
    }

    #[test]
    fn sampling_takes_the_share_it_is_given() {
        assert!(!sampled(0.0, 0.0));
        assert!(sampled(100.0, 0.999_999));
        let rolls = (0..1000).map(|i| f64::from(i) / 1000.0);
        assert_eq!(rolls.filter(|r| sampled(50.0, *r)).count(), 500);
    }

    #[test]
    fn a_mirror_filter_reads_and_writes_as_the_proxy_api_says() {
        let json = r#"{"type": "requestMirror", "backend": "shadow.default:8080", "percent": 50}"#;
        let filter: crate::proxy_api::RouteFilter = serde_json::from_str(json).unwrap();
        assert_eq!(
            filter,
            crate::proxy_api::RouteFilter::RequestMirror {
                backend: ServiceRef::new("shadow", "default", 8080),
                percent: 50.0,
            }
        );
        let all: crate::proxy_api::RouteFilter =
            serde_json::from_str(r#"{"type": "requestMirror", "backend": "shadow.default:8080"}"#)
                .unwrap();
        assert!(
            matches!(all, crate::proxy_api::RouteFilter::RequestMirror { percent, .. } if (percent - 100.0).abs() < f64::EPSILON)
        );
    }

    fn mk_backend(name: &str, weight: u32) -> WeightedBackend {
        WeightedBackend {
            service: ServiceRef::new(name, "default", 80),
            weight,
        }
    }

    fn mk_rule(name: &str, matches: Vec<RouteMatch>) -> RouteRule {
        RouteRule {
            name: name.into(),
            matches,
            backends: vec![mk_backend(name, 1)],
            ..Default::default()
        }
    }

    fn mk_table(rules: Vec<RouteRule>) -> CompiledRoutes {
        CompiledRoutes::new(RouteTable {
            parent: ServiceRef::new("web", "default", 80),
            rules,
        })
        .unwrap()
    }

    fn route<'a>(
        t: &'a CompiledRoutes,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &[(&'static str, &'static str)],
    ) -> Option<&'a str> {
        let headers = headers.to_vec();
        let lookup = move |name: &str| {
            headers
                .iter()
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| *v)
                .collect::<Vec<&'static str>>()
        };
        let req = RequestParts {
            method,
            path,
            query,
            headers: &lookup,
        };
        t.route(&req).map(|(_, r)| r.name.as_str())
    }

    #[test]
    fn first_matching_rule_wins_with_gateway_api_semantics() {
        let t = mk_table(vec![
            mk_rule(
                "exact",
                vec![RouteMatch {
                    path: Some(PathMatch::Exact("/login".into())),
                    method: Some("POST".into()),
                    ..Default::default()
                }],
            ),
            mk_rule(
                "prefix",
                vec![RouteMatch {
                    path: Some(PathMatch::PathPrefix("/api/".into())),
                    ..Default::default()
                }],
            ),
            mk_rule(
                "regex",
                vec![RouteMatch {
                    path: Some(PathMatch::RegularExpression("/v[0-9]+/.*".into())),
                    ..Default::default()
                }],
            ),
            mk_rule(
                "header",
                vec![RouteMatch {
                    headers: vec![ValueMatch {
                        name: "X-Canary".into(),
                        value: "always".into(),
                        regex: false,
                    }],
                    ..Default::default()
                }],
            ),
            mk_rule(
                "query",
                vec![RouteMatch {
                    query_params: vec![ValueMatch {
                        name: "debug".into(),
                        value: "1|true".into(),
                        regex: true,
                    }],
                    ..Default::default()
                }],
            ),
        ]);
        assert_eq!(route(&t, "POST", "/login", None, &[]), Some("exact"));
        assert_eq!(route(&t, "GET", "/login", None, &[]), None);
        assert_eq!(route(&t, "GET", "/api", None, &[]), Some("prefix"));
        assert_eq!(route(&t, "GET", "/api/users", None, &[]), Some("prefix"));
        assert_eq!(route(&t, "GET", "/apix", None, &[]), None);
        assert_eq!(route(&t, "GET", "/v2/x", None, &[]), Some("regex"));
        assert_eq!(
            route(&t, "GET", "/xv2/x", None, &[]),
            None,
            "regex is anchored"
        );
        assert_eq!(
            route(&t, "GET", "/", None, &[("x-canary", "always")]),
            Some("header")
        );
        assert_eq!(
            route(&t, "GET", "/", Some("a=b&debug=true"), &[]),
            Some("query")
        );
        assert_eq!(route(&t, "GET", "/", Some("debug=2"), &[]), None);
    }

    #[test]
    fn a_rule_without_matches_matches_everything() {
        let t = mk_table(vec![mk_rule("all", vec![])]);
        assert_eq!(route(&t, "DELETE", "/anything", None, &[]), Some("all"));
    }

    #[test]
    fn bad_regexes_are_named() {
        let e = CompiledRoutes::new(RouteTable {
            parent: ServiceRef::new("web", "default", 80),
            rules: vec![mk_rule(
                "r",
                vec![RouteMatch {
                    path: Some(PathMatch::RegularExpression("(".into())),
                    ..Default::default()
                }],
            )],
        })
        .unwrap_err();
        assert!(e.to_string().contains("web.default:80 rule 0"), "{e}");
    }

    #[test]
    fn weights_split_traffic_and_zero_and_hundred_are_exact() {
        let b = [mk_backend("primary", 80), mk_backend("canary", 20)];
        let mut counts = [0; 2];
        for i in 0..1000 {
            let roll = f64::from(i) / 1000.0;
            counts[pick_backend(&b, |_| true, roll).unwrap()] += 1;
        }
        assert_eq!(counts, [800, 200]);

        let b = [mk_backend("primary", 100), mk_backend("canary", 0)];
        for roll in [0.0, 0.5, 0.999_999, 1.0] {
            assert_eq!(pick_backend(&b, |_| true, roll), Some(0));
        }
        let b = [mk_backend("primary", 0), mk_backend("canary", 100)];
        for roll in [0.0, 0.5, 1.0] {
            assert_eq!(pick_backend(&b, |_| true, roll), Some(1));
        }
    }

    #[test]
    fn retry_policies_retry_the_statuses_they_name() {
        let policy = RetryPolicy {
            statuses: DEFAULT_RETRY_STATUSES.to_vec(),
            max_retries: 2,
            budget: crate::proxy_api::RetryBudget::default(),
        };
        assert!(policy.retries_status(503));
        assert!(!policy.retries_status(500));
        assert!(!policy.retries_status(200));
    }

    #[test]
    fn path_modifiers_replace_the_whole_path_or_the_matched_prefix() {
        let full = PathModifier::ReplaceFullPath("/new".into());
        assert_eq!(modified_path(&full, Some("/old"), "/old/x"), "/new");
        let prefix = |r: &str| PathModifier::ReplacePrefixMatch(r.into());
        let cases = [
            (
                "/original-prefix",
                "/replacement-prefix",
                "/original-prefix/lemon",
                "/replacement-prefix/lemon",
            ),
            (
                "/original-prefix",
                "/replacement-prefix",
                "/original-prefix",
                "/replacement-prefix",
            ),
            ("/strip", "/", "/strip/three", "/three"),
            ("/strip", "/", "/strip", "/"),
            ("/strip/", "/", "/strip/three", "/three"),
            ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
            ("/", "/api", "/x", "/api/x"),
        ];
        for (matched, replacement, path, want) in cases {
            assert_eq!(
                modified_path(&prefix(replacement), Some(matched), path),
                want,
                "{matched} -> {replacement} on {path}"
            );
        }
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let from = RedirectFrom {
            scheme: "http",
            host: "echo",
            port: 80,
            path: "/hostname-redirect",
            query: Some("a=1"),
        };
        let r = |f: fn(&mut Redirect)| {
            let mut r = Redirect {
                status_code: 302,
                ..Default::default()
            };
            f(&mut r);
            r
        };
        let loc = |redirect: &Redirect, prefix| redirect_location(redirect, prefix, &from);
        assert_eq!(
            loc(&r(|r| r.hostname = Some("example.org".into())), None),
            "http://example.org/hostname-redirect?a=1"
        );
        assert_eq!(
            loc(&r(|r| r.port = Some(8083)), None),
            "http://echo:8083/hostname-redirect?a=1"
        );
        assert_eq!(
            loc(&r(|r| r.scheme = Some("https".into())), None),
            "https://echo/hostname-redirect?a=1",
            "a new scheme takes its own well-known port"
        );
        assert_eq!(
            loc(
                &r(|r| {
                    r.scheme = Some("https".into());
                    r.port = Some(8443);
                }),
                None
            ),
            "https://echo:8443/hostname-redirect?a=1"
        );
        assert_eq!(
            loc(
                &r(|r| r.path = Some(PathModifier::ReplacePrefixMatch("/new".into()))),
                Some("/hostname-redirect")
            ),
            "http://echo/new?a=1"
        );
        let from_8080 = RedirectFrom { port: 8080, ..from };
        assert_eq!(
            redirect_location(&r(|_| {}), None, &from_8080),
            "http://echo:8080/hostname-redirect?a=1",
            "the request's own port is kept when not well known"
        );
    }

    #[test]
    fn the_matched_prefix_is_the_rules_path_prefix() {
        let rule = mk_rule(
            "r",
            vec![RouteMatch {
                path: Some(PathMatch::PathPrefix("/api".into())),
                ..Default::default()
            }],
        );
        assert_eq!(rule.matched_prefix(), Some("/api"));
        assert_eq!(mk_rule("all", vec![]).matched_prefix(), None);
    }

    #[test]
    fn backends_without_endpoints_get_weight_zero() {
        let b = [mk_backend("primary", 90), mk_backend("canary", 10)];
        for roll in [0.0, 0.5, 0.99] {
            assert_eq!(pick_backend(&b, |i| i == 1, roll), Some(1));
        }
        assert_eq!(pick_backend(&b, |_| false, 0.5), None);
    }
}
