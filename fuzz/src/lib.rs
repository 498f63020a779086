//! Property-based fuzzing of every parser that reads input from outside the mesh: Go-style
//! durations, the Prometheus text scrape, CRD/YAML validation, the proxy-API stream in both
//! directions, route matching and the proxy's request routing (authority, path, query,
//! headers), and policy evaluation. Each [`Target`] takes raw bytes and must neither panic nor
//! allocate without bound; proptest drives it on the stable toolchain with inputs that are
//! either arbitrary bytes or a committed seed (`fuzz/seeds/<target>/`) mutated by a few edits
//! and tokens of the format. The `mesh-fuzz` binary runs a million inputs per target under an
//! address-space limit (`scripts/fuzz`); `tests/bounded.rs` runs a short pass in the suite.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// Longest input a target is given; parsers read whole bodies, so longer only costs time.
pub const MAX_INPUT: usize = 4096;

/// One parser under test.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Its name, also its seed directory.
    pub name: &'static str,
    /// What it reads.
    pub about: &'static str,
    /// Tokens of its format that mutations insert.
    pub tokens: &'static [&'static str],
    /// Feeds one input to the parser; panics are the bugs.
    pub run: fn(&[u8]),
}

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "-1",
    "1e999",
    "18446744073709551616",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[[[[[[[[",
    "{\"version\":",
    "\"value\":",
];

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "duration",
            about: "Go-style durations (Canary intervals, route timeouts, MESH_* settings)",
            tokens: &[
                "h",
                "m",
                "s",
                "ms",
                "us",
                "µs",
                "ns",
                ".",
                "-",
                "+",
                "9223372036854775807",
                "0.0000000001",
                "1e9",
                " ",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                let _ = mesh_core::duration::parse(&text);
            },
        },
        Target {
            name: "prometheus-text",
            about: "the Prometheus text exposition the rollout controller scrapes from proxies",
            tokens: &[
                "\n",
                "# TYPE ",
                "# HELP ",
                "{",
                "}",
                "=",
                "\"",
                ",",
                "le=\"+Inf\"",
                "NaN",
                "+Inf",
                "-Inf",
                "_bucket",
                "_total",
                " 1e308",
                "\\\"",
                "\\n",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                if let Ok(samples) = mesh_core::exposition::parse(&text) {
                    for s in &samples {
                        let _ = mesh_core::exposition::count(s.value);
                    }
                }
            },
        },
        Target {
            name: "crd-yaml",
            about: "multi-document YAML through the CRD validation the resource API applies",
            tokens: &[
                "\n",
                "---\n",
                ": ",
                "- ",
                "&a ",
                "*a",
                "!!binary ",
                "{",
                "}",
                "[",
                "]",
                "'",
                "apiVersion: ",
                "kind: ",
                "metadata:",
                "spec:",
                "  ",
                "weight: ",
                "-1",
                "99999999999999999999",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let Ok(value) = <serde_json::Value as serde::Deserialize>::deserialize(doc)
                    else {
                        break;
                    };
                    let _ = mesh_crds::validate::validate(&value);
                }
            },
        },
        Target {
            name: "proxy-api-to-proxy",
            about: "watch-stream lines a proxy reads from the control plane (routes, endpoints, \
                    policy), each compiled and used as the proxy would",
            tokens: JSON_TOKENS,
            run: |input| {
                use mesh_core::proxy_api::{Endpoints, RouteTable, Update};
                for line in input.split(|b| *b == b'\n') {
                    if let Ok(update) = serde_json::from_slice::<Update<RouteTable>>(line)
                        && let Some(table) = update.value
                        && let Ok(routes) = mesh_core::routing::CompiledRoutes::new(table)
                    {
                        route_some_requests(&routes);
                    }
                    let _ = serde_json::from_slice::<Update<Endpoints>>(line);
                    if let Ok(update) =
                        serde_json::from_slice::<Update<mesh_policies::InboundPolicy>>(line)
                        && let Some(policy) = update.value
                    {
                        authorize_some_clients(&policy);
                    }
                }
            },
        },
        Target {
            name: "proxy-api-to-control-plane",
            about: "what a proxy sends the control plane: certificate requests, workload \
                    registrations, policy-watch labels",
            tokens: JSON_TOKENS,
            run: |input| {
                use mesh_core::proxy_api::{CertifyRequest, WorkloadRegistration, parse_labels};
                let _ = serde_json::from_slice::<CertifyRequest>(input);
                let _ = serde_json::from_slice::<WorkloadRegistration>(input);
                let _ = parse_labels(&String::from_utf8_lossy(input));
            },
        },
        Target {
            name: "request-routing",
            about: "a request as the proxy routes it: authority (Host), method, path and \
                    query, headers, against HTTPRoute rules with every kind of match",
            tokens: &[
                "\n",
                ":",
                "?",
                "&",
                "=",
                "/",
                "//",
                "%",
                "%00",
                "..",
                "x-canary",
                "GET",
                "*",
                "[::1]",
                ":65536",
                ".svc.cluster.local",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                let mut lines = text.split('\n');
                let authority = lines.next().unwrap_or_default();
                let _ = mesh_sidecar::tables::parse_authority(authority);
                let _ = authority.parse::<mesh_core::proxy_api::ServiceRef>();
                let method = lines.next().unwrap_or_default();
                let target = lines.next().unwrap_or_default();
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (target, None),
                };
                let headers: Vec<(String, &str)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.trim()))
                    .collect();
                let lookup = |name: &str| {
                    headers
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, v)| *v)
                        .collect::<Vec<&str>>()
                };
                let parts = mesh_core::routing::RequestParts {
                    method,
                    path,
                    query,
                    headers: &lookup,
                };
                let _ = routes().route(&parts);
            },
        },
        Target {
            name: "policy",
            about: "inbound policy as the proxy evaluates it: policy JSON, CIDRs, clients",
            tokens: &[
                "0.0.0.0/0",
                "::/0",
                "/33",
                "/129",
                "10.0.0.1",
                "spiffe://",
                "*",
                "\"identities\"",
                "\"networks\"",
                "{",
                "}",
                "[",
                "]",
                "\"",
            ],
            run: |input| {
                let text = String::from_utf8_lossy(input);
                for line in text.split('\n') {
                    let _ = mesh_policies::parse_cidr(line);
                }
                if let Ok(policy) = serde_json::from_slice::<mesh_policies::InboundPolicy>(input) {
                    authorize_some_clients(&policy);
                }
            },
        },
    ]
}

/// A route table with every kind of match, for the routing target.
fn routes() -> &'static mesh_core::routing::CompiledRoutes {
    static ROUTES: std::sync::OnceLock<mesh_core::routing::CompiledRoutes> =
        std::sync::OnceLock::new();
    ROUTES.get_or_init(|| {
        let table = serde_json::from_str(ROUTE_TABLE)
            .unwrap_or_else(|e| unreachable!("the routing target's table is valid JSON: {e}"));
        mesh_core::routing::CompiledRoutes::new(table)
            .unwrap_or_else(|e| unreachable!("the routing target's table compiles: {e}"))
    })
}

const ROUTE_TABLE: &str = r#"{"parent":"web.default:80","rules":[
 {"name":"exact","matches":[{"path":{"type":"Exact","value":"/a"},"method":"GET"}],"backends":[{"service":"a.default:80","weight":1}]},
 {"name":"regex","matches":[{"path":{"type":"RegularExpression","value":"/v[0-9]+/.*"},"headers":[{"name":"x-canary","value":"^(yes|true)$","regex":true}]}],"backends":[{"service":"b.default:80","weight":1}]},
 {"name":"query","matches":[{"path":{"type":"PathPrefix","value":"/api"},"queryParams":[{"name":"v","value":"2"}]}],"backends":[{"service":"c.default:80","weight":1}]},
 {"name":"default","backends":[{"service":"web-primary.default:80","weight":9},{"service":"web-canary.default:80","weight":1}]}]}"#;

fn route_some_requests(routes: &mesh_core::routing::CompiledRoutes) {
    let none = |_: &str| Vec::new();
    let _ = routes.route(&mesh_core::routing::RequestParts {
        method: "GET",
        path: "/",
        query: None,
        headers: &none,
    });
    let canary = |name: &str| {
        if name == "x-canary" {
            vec!["yes"]
        } else {
            Vec::new()
        }
    };
    let _ = routes.route(&mesh_core::routing::RequestParts {
        method: "POST",
        path: "/v1/x",
        query: Some("v=2&a"),
        headers: &canary,
    });
}

fn authorize_some_clients(policy: &mesh_policies::InboundPolicy) {
    let clients = [
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), None),
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some("spiffe://cluster.local/ns/default/sa/web"),
        ),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), Some("")),
    ];
    for (ip, identity) in clients {
        let _ = policy.authorize(&mesh_policies::Client { ip, identity });
    }
}

/// The committed seeds of `target`, from `dir` (`fuzz/seeds`).
pub fn seeds(dir: &Path, target: &Target) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(target.name))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut seeds: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    seeds
}

/// One edit of a seed.
#[derive(Clone, Debug)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Token(usize, usize),
    Repeat(usize, usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Replace(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Edit::Token(p, t)),
        (any::<usize>(), any::<usize>(), 1u8..64).prop_map(|(p, l, n)| Edit::Repeat(p, l, n)),
    ]
}

fn apply(seed: &[u8], edits: &[Edit], tokens: &[&str]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for e in edits {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match *e {
            Edit::Replace(p, b) if !out.is_empty() => {
                let i = p % out.len();
                out[i] = b;
            }
            Edit::Insert(p, b) => out.insert(at(p, out.len()), b),
            Edit::Delete(p) if !out.is_empty() => {
                let i = p % out.len();
                out.remove(i);
            }
            Edit::Token(p, t) if !tokens.is_empty() => {
                let i = at(p, out.len());
                let token = tokens[t % tokens.len()].as_bytes();
                out.splice(i..i, token.iter().copied());
            }
            Edit::Repeat(p, l, n) if !out.is_empty() => {
                let start = p % out.len();
                let len = 1 + l % 16.min(out.len() - start);
                let chunk = out[start..start + len].to_vec();
                for _ in 0..n {
                    out.splice(start..start, chunk.iter().copied());
                }
            }
            _ => {}
        }
        out.truncate(MAX_INPUT);
    }
    out
}

/// Inputs for `target`: a third arbitrary bytes, the rest mutated seeds.
pub fn inputs(target: &Target, seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> + use<> {
    let tokens = target.tokens;
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        2 => (
            proptest::sample::select(seeds),
            proptest::collection::vec(edit(), 0..8)
        )
            .prop_map(move |(seed, edits)| apply(&seed, &edits, tokens)),
    ]
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    /// Inputs run.
    pub inputs: u64,
    /// The smallest failing input, if any, and what went wrong.
    pub failure: Option<(Vec<u8>, String)>,
}

/// Runs `cases` inputs through `target`, with proptest's seed `rng_seed` (so a run can be
/// repeated). A panic is a failure, shrunk to a small input.
pub fn run(target: &Target, seeds_dir: &Path, cases: u32, rng_seed: u64) -> Report {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        rng_seed: proptest::test_runner::RngSeed::Fixed(rng_seed),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let counted = std::sync::atomic::AtomicU64::new(0);
    let f = target.run;
    let result = runner.run(&inputs(target, seeds(seeds_dir, target)), |input| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::panic::catch_unwind(|| f(&input))
            .map_err(|e| TestCaseError::fail(panic_message(e.as_ref())))
    });
    let failure = match result {
        Ok(()) => None,
        Err(TestError::Fail(why, input)) => Some((input, why.to_string())),
        Err(TestError::Abort(why)) => Some((Vec::new(), why.to_string())),
    };
    Report {
        inputs: counted.into_inner(),
        failure,
    }
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| e.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// Caps the process's address space at `bytes`, so an input that allocates without bound
/// aborts the run instead of passing slowly.
pub fn limit_memory(bytes: u64) -> std::io::Result<()> {
    let limit = rustix::process::Rlimit {
        current: Some(bytes),
        maximum: Some(bytes),
    };
    rustix::process::setrlimit(rustix::process::Resource::As, limit).map_err(Into::into)
}
