//! The endpoint and request layer of `mesh-proxy`, started in-process in front of real upstream
//! HTTP servers on 127.0.0.1: retries and their budget, replayable request bodies, route
//! timeouts, connect timeouts, P2C over peak-EWMA latency, failure accrual and fault injection. Every assertion counts requests (at the upstream, at the
//! client, or in the proxy's metrics); none measures time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::TokioExecutor;
use mesh_test_support::apps::app;
use mesh_test_support::assert_eventually;
use mesh_test_support::proxies::{ProxyBuilder, Sidecar, proxy};

/// A proxy with one route on `web.default:80` with `rule` (YAML fields of the rule, besides
/// backends), to one backend with `endpoints`.
fn one_backend(rule: &str, endpoints: &[SocketAddr]) -> ProxyBuilder {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{addr: \"{a}\"}}"))
        .collect();
    proxy().outbound(format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: main
        {rule}
        backends: [{{service: web-primary.default:80, weight: 1}}]
endpoints:
  - service: web-primary.default:80
    endpoints: [{}]
"#,
        endpoints.join(", ")
    ))
}

const RETRY_5XX: &str = "retry: {statuses: [502, 503, 504], maxRetries: 2}";

#[tokio::test]
async fn a_retry_turns_a_failed_first_attempt_into_a_success() {
    // Every request fails its first attempt with 503 and succeeds on the second.
    let up = app("v1").body_len().fail_first_attempt(503).await.unwrap();
    let p = one_backend(RETRY_5XX, &[up.addr()]).run().unwrap();
    let client = p.client();
    for i in 0..100 {
        let rsp = client
            .get("http://web.default:80/")
            .header("x-request-id", format!("get-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200, "request {i}");
    }
    assert_eq!(up.hits(), 200, "each request took exactly two attempts");

    // A small POST body is held and sent again whole.
    let body = vec![b'x'; 10 * 1024];
    let rsp = client
        .post("http://web.default:80/")
        .header("x-request-id", "small-post")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        rsp.text().await.unwrap(),
        "v1 10240",
        "the retry carried the body"
    );
    assert_eq!(up.attempts("small-post"), 2);

    // The route's retry series count what happened; the failed attempts stay visible to the
    // canary judge in response_total.
    let route = r#"route="main""#;
    assert_eq!(
        p.metric_sum("outbound_http_route_retry_requests_total", &[route])
            .await,
        101.0
    );
    assert_eq!(
        p.metric_sum("outbound_http_route_retry_successes_total", &[route])
            .await,
        101.0
    );
    assert_eq!(
        p.metric_sum("response_total", &[r#"status_code="503""#])
            .await,
        101.0
    );
}

#[tokio::test]
async fn retries_recover_a_30_percent_failing_backend_within_the_budget() {
    // A seeded generator and one request at a time: the same failures on every run.
    let up = app("v1")
        .fail_rate(0.3)
        .failing_with(503)
        .seed(7)
        .await
        .unwrap();
    // The only endpoint must stay in the pick however the failures fall.
    let p = one_backend(RETRY_5XX, &[up.addr()])
        .env("MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES", "0")
        .run()
        .unwrap();
    let client = p.client();
    let requests = 300;
    let mut ok = 0;
    for i in 0..requests {
        let rsp = client
            .get("http://web.default:80/")
            .header("x-request-id", format!("r{i}"))
            .send()
            .await
            .unwrap();
        if rsp.status() == 200 {
            ok += 1;
        }
    }
    let failed_attempts = p
        .metric_sum("response_total", &[r#"status_code="503""#])
        .await;
    // Without retries about 90 requests would fail; with two retries about 8 do.
    assert!(
        failed_attempts >= 60.0,
        "the backend failed only {failed_attempts} times"
    );
    assert!(ok >= 285, "only {ok} of {requests} succeeded");
    // The default budget: 20 % of requests plus 10 per second over 10 s.
    let retries = up.hits() - requests;
    eprintln!("{ok} of {requests} succeeded, {failed_attempts} attempts failed, {retries} retries");
    assert!(retries <= requests / 5 + 100, "{retries} retries");
}

#[tokio::test]
async fn a_request_body_over_64_kib_is_never_retried() {
    let up = app("v1").body_len().fail_first_attempt(503).await.unwrap();
    let p = one_backend(RETRY_5XX, &[up.addr()]).run().unwrap();
    let client = p.client();
    let rsp = client
        .post("http://web.default:80/")
        .header("x-request-id", "large-post")
        .body(vec![b'x'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 503, "the upstream's own answer, not retried");
    assert_eq!(rsp.text().await.unwrap(), "v1 102400", "streamed whole");
    assert_eq!(up.attempts("large-post"), 1);

    // Exactly at the limit it is still retried.
    let rsp = client
        .post("http://web.default:80/")
        .header("x-request-id", "limit-post")
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(up.attempts("limit-post"), 2);
}

/// Sends a POST of `chunks` × `chunk` bytes with no Content-Length (chunked), as a streaming
/// client does, and returns the status and body.
async fn post_chunked(
    proxy: &impl Sidecar,
    id: &str,
    chunks: usize,
    chunk: usize,
) -> (u16, String) {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(2);
    tokio::spawn(async move {
        for _ in 0..chunks {
            if tx.send_data(Bytes::from(vec![b'x'; chunk])).await.is_err() {
                return;
            }
        }
    });
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{}/", proxy.addr("outbound")))
        .header("host", "web.default:80")
        .header("x-request-id", id)
        .body(body)
        .unwrap();
    let rsp = client.request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let text = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn a_streamed_body_is_retried_while_it_fits_in_64_kib() {
    let up = app("v1").body_len().fail_first_attempt(503).await.unwrap();
    let p = one_backend(RETRY_5XX, &[up.addr()]).run().unwrap();
    assert_eq!(
        post_chunked(&p, "small-stream", 8, 4096).await,
        (200, "v1 32768".to_string()),
        "the retry carried the whole body"
    );
    assert_eq!(up.attempts("small-stream"), 2);
    assert_eq!(
        post_chunked(&p, "large-stream", 25, 4096).await,
        (503, "v1 102400".to_string()),
        "forwarded whole and not retried"
    );
    assert_eq!(up.attempts("large-stream"), 1);
}

#[tokio::test]
async fn retries_stop_at_the_budget() {
    let up = app("v1").status(503).await.unwrap();
    // No minimum, and a window longer than the test: retries may add exactly 20 % of requests.
    let rule = "retry: {statuses: [503], maxRetries: 3, budget: {ratio: 0.2, minPerSecond: 0, ttlMs: 60000}}";
    // Failure accrual would take the only endpoint out after a few 503s; here it must stay in.
    let p = one_backend(rule, &[up.addr()])
        .env("MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES", "0")
        .run()
        .unwrap();
    let client = p.client();
    let requests = 500;
    for i in 0..requests {
        let rsp = client
            .get("http://web.default:80/")
            .header("x-request-id", format!("r{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 503);
    }
    // Without the budget, 3 retries each would make 2000 attempts.
    let retries = up.hits() - requests;
    assert_eq!(retries, requests / 5, "retries beyond 20 % of requests");
    let route = r#"route="main""#;
    assert_eq!(
        p.metric_sum("outbound_http_route_retry_requests_total", &[route])
            .await,
        100.0
    );
    assert!(
        p.metric_sum("outbound_http_route_retry_overflow_total", &[route])
            .await
            >= 300.0
    );
}

#[tokio::test]
async fn max_retries_bounds_the_attempts_of_one_request() {
    let up = app("v1").status(502).await.unwrap();
    let p = one_backend(RETRY_5XX, &[up.addr()])
        .env("MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES", "0")
        .run()
        .unwrap();
    let rsp = p
        .client()
        .get("http://web.default:80/")
        .header("x-request-id", "doomed")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(up.attempts("doomed"), 3, "one attempt and two retries");
    assert_eq!(
        p.metric_sum(
            "outbound_http_route_retry_limit_exceeded_total",
            &[r#"route="main""#]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_request_past_the_route_timeout_is_answered_504_and_attempted_once() {
    // Far longer than the test waits: only the proxy's timeout can answer.
    let up = app("v1").latency(Duration::from_secs(600)).await.unwrap();
    let rule = format!("timeoutMs: 300\n        {RETRY_5XX}");
    let p = one_backend(&rule, &[up.addr()]).run().unwrap();
    let rsp = p
        .client()
        .get("http://web.default:80/")
        .header("x-request-id", "slow")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 504);
    assert!(rsp.headers().contains_key("mesh-proxy-error"));
    assert_eq!(up.attempts("slow"), 1, "a timed-out request is not retried");
    assert_eq!(
        p.metric_sum(
            "outbound_http_route_retry_requests_total",
            &[r#"route="main""#]
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn p2c_sends_most_requests_to_the_faster_endpoint() {
    let fast = app("fast").await.unwrap();
    let slow = app("slow")
        .latency(Duration::from_millis(50))
        .await
        .unwrap();
    let p = one_backend("", &[fast.addr(), slow.addr()]).run().unwrap();
    let client = p.client();
    // Four clients at once, so pending requests weigh in as well as latency.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        tasks.spawn(async move {
            for _ in 0..100 {
                let rsp = client.get("http://web.default:80/").send().await.unwrap();
                assert_eq!(rsp.status(), 200);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (f, s) = (fast.hits(), slow.hits());
    eprintln!("fast endpoint: {f} requests, slow endpoint: {s}");
    assert_eq!(f + s, 400);
    assert!(f * 100 > 80 * 400, "fast got {f}, slow got {s}");
}

/// One request through the proxy; a 502 must come from an attempt at `closed`.
async fn get(client: &reqwest::Client, closed: SocketAddr) -> u16 {
    let rsp = client.get("http://web.default:80/").send().await.unwrap();
    let status = rsp.status().as_u16();
    if status == 502 {
        let why = rsp.headers()["mesh-proxy-error"].to_str().unwrap();
        assert!(why.contains(&closed.to_string()), "{why}");
    }
    status
}

#[tokio::test]
async fn failure_accrual_stops_attempts_to_a_closed_port_and_probes_it_later() {
    let healthy = app("healthy").await.unwrap();
    // A port nobody listens on: every attempt is a connection refused, a fast 502.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = format!(
        r#"
routes:
  - parent: web.default:80
    rules:
      - name: split
        backends:
          - {{service: broken.default:80, weight: 50}}
          - {{service: healthy.default:80, weight: 50}}
endpoints:
  - service: broken.default:80
    endpoints: [{{addr: "{closed}"}}]
  - service: healthy.default:80
    endpoints: [{{addr: "{}"}}]
"#,
        healthy.addr()
    );
    // A backoff long enough that the first phase below cannot outlast it twice.
    let p = proxy()
        .outbound(config)
        .env("MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES", "5")
        .env("MESH_PROXY_FAILURE_ACCRUAL_MIN_BACKOFF", "5s")
        .run()
        .unwrap();
    let client = p.client();
    // Each 502 is one attempt at the closed port. After five, it gets no more.
    let mut refused = 0;
    let mut sent = 0;
    while refused < 5 {
        sent += 1;
        assert!(
            sent < 1000,
            "only {refused} attempts reached the closed port"
        );
        match get(&client, closed).await {
            502 => refused += 1,
            200 => {}
            other => panic!("unexpected {other}"),
        }
    }
    let mut after = Vec::new();
    for _ in 0..100 {
        after.push(get(&client, closed).await);
    }
    let attempts = after.iter().filter(|s| **s == 502).count();
    // At most one probe, should this phase outlast the 5 s backoff.
    assert!(
        attempts <= 1,
        "the failing endpoint still got {attempts} of 100"
    );
    assert!(
        after.iter().all(|s| *s == 200 || *s == 502),
        "the broken backend got weight 0, not errors: {after:?}"
    );

    // Later, a probe goes to it again.
    let mut probes = attempts;
    assert_eventually!(
        {
            if get(&client, closed).await == 502 {
                probes += 1;
            }
            probes >= 1
        },
        "the failing endpoint was never probed"
    );

    // Once something listens there, a probe succeeds and the endpoint is back in the pick.
    let revived = app("revived").on(closed).await.unwrap();
    assert_eventually!(
        {
            assert_eq!(get(&client, closed).await, 200);
            revived.hits() >= 20
        },
        "the revived endpoint did not return to the pick"
    );
}

#[tokio::test]
async fn a_fault_filter_aborts_its_share_of_requests() {
    let up = app("v1").await.unwrap();
    let rule = "filters: [{type: fault, abort: {status: 503, percent: 25}}]";
    let p = one_backend(rule, &[up.addr()]).run().unwrap();
    let client = p.client();
    let mut aborted = 0;
    for _ in 0..1000 {
        let rsp = client.get("http://web.default:80/").send().await.unwrap();
        if rsp.status() == 503 {
            assert!(rsp.headers().contains_key("mesh-proxy-error"));
            aborted += 1;
        }
    }
    // Binomial(1000, 0.25): sd 13.7; 70 is beyond 5 sd.
    assert!(
        (180..=320).contains(&aborted),
        "{aborted} of 1000 aborted at 25 %"
    );
    assert_eq!(
        up.hits(),
        1000 - aborted,
        "aborted requests never reach the app"
    );
}

#[tokio::test]
async fn a_connect_that_hangs_fails_at_the_connect_timeout_and_counts_for_accrual() {
    // A listener that never accepts, with its accept queue full: the kernel drops further SYNs,
    // so a connect to it hangs (for minutes of SYN retries) until the connector gives up.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(1).unwrap();
    let hung = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(hung);
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            fillers.push(c);
        }
    }
    let p = one_backend("", &[hung])
        .env("MESH_PROXY_OUTBOUND_CONNECT_TIMEOUT", "100ms")
        .env("MESH_PROXY_FAILURE_ACCRUAL_CONSECUTIVE_FAILURES", "3")
        .run()
        .unwrap();
    // A guard, not a measurement: a missing connect timeout shows as this error, not a hang.
    let client = p.client_with_timeout(mesh_test_support::patience());
    for _ in 0..3 {
        let rsp = client.get("http://web.default:80/").send().await.unwrap();
        assert_eq!(rsp.status(), 502);
        let why = rsp.headers()["mesh-proxy-error"].to_str().unwrap();
        assert!(why.contains(&hung.to_string()), "{why}");
        assert!(why.contains("connect"), "{why}");
    }
    // Three connect failures in a row: the endpoint is out, and the proxy answers at once.
    let rsp = client.get("http://web.default:80/").send().await.unwrap();
    assert_eq!(rsp.status(), 503);
    let why = rsp.headers()["mesh-proxy-error"].to_str().unwrap();
    assert!(why.contains("failing"), "{why}");
    drop((stuck, fillers));
}
