//! `mesh-loadgen` against a real `mesh-demo-app`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers outside #[test] functions fail the test by panicking"
)]

mod support;

use mesh_demo::stats::Report;
use support::{app, forward_proxy, loadgen};

fn reports(stdout: &str) -> Vec<Report> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn constant_rate_through_http_proxy() {
    let frontend = app("v1").start().await;
    let proxy = forward_proxy(&[("frontend.default:9898", frontend.addr())]).await;
    let (status, stdout, stderr) = loadgen("http://frontend.default:9898/")
        .args(["--rate", "50", "--duration", "2s", "--output", "json"])
        .via(proxy.addr)
        .output()
        .await;
    assert!(status.success(), "{status}: {stderr}");

    let reports = reports(&stdout);
    let (last, intervals) = reports.split_last().expect("no output");
    assert!(last.is_final, "{stdout}");
    assert!(intervals.iter().all(|r| !r.is_final), "{stdout}");
    // 2s at 50/s; the range is generous since it counts scheduled requests, not time.
    assert!((80..=120).contains(&last.sent), "{stdout}");
    assert_eq!(last.status.values().sum::<u64>() + last.errors, last.sent);
    assert_eq!(last.errors, 0, "{stdout}");
    assert_eq!(last.ok, last.sent);
    assert_eq!(last.status.get("200"), Some(&last.sent));
    // No downstream, so the count header falls back to x-demo-version.
    assert_eq!(last.versions.get("v1"), Some(&last.sent));
    assert!(last.p50_ms.is_some() && last.p99_ms.is_some());
    // Interval lines partition the run.
    assert_eq!(intervals.iter().map(|r| r.sent).sum::<u64>(), last.sent);
    // Every request crossed the proxy (the authority resolves nowhere else).
    let seen = proxy.seen();
    assert_eq!(seen.len() as u64, last.sent);
    assert!(seen.iter().all(|u| u == "http://frontend.default:9898/"));
}

#[tokio::test]
async fn counts_versions_by_the_count_header() {
    let app = app("v3").args(["--error-rate", "1"]).start().await;
    let (status, stdout, stderr) = loadgen(&app.url("/"))
        .args(["--rate", "100", "--duration", "300ms", "--output", "json"])
        .args(["--count-header", "x-demo-version"])
        .output()
        .await;
    assert!(status.success(), "{status}: {stderr}");
    let last = reports(&stdout).pop().unwrap();
    assert!(last.is_final && last.sent > 0, "{stdout}");
    assert_eq!(last.ok, 0);
    assert_eq!(last.status.get("500"), Some(&last.sent));
    assert_eq!(last.versions.get("v3"), Some(&last.sent));
}

#[tokio::test]
async fn warmup_requests_are_not_counted_and_tails_are_in_microseconds() {
    let app = app("v1").start().await;
    let samples = std::env::temp_dir().join(format!("loadgen-samples-{}", std::process::id()));
    let (status, stdout, stderr) = loadgen(&app.url("/"))
        .args(["--rate", "200", "--warmup", "500ms", "--duration", "1s"])
        .args(["--report-every", "1h", "--output", "json"])
        .args([std::ffi::OsStr::new("--samples"), samples.as_os_str()])
        .output()
        .await;
    assert!(status.success(), "{status}: {stderr}");
    let reports = reports(&stdout);
    let (last, intervals) = reports.split_last().expect("no output");
    assert!(last.is_final, "{stdout}");
    assert_eq!(intervals.iter().map(|r| r.sent).sum::<u64>(), last.sent);
    // 1 s at 200/s: the 100 warm-up requests are not in the count.
    assert!((160..=240).contains(&last.sent), "{stdout}");
    assert_eq!(last.ok, last.sent, "{stdout}");
    let (p50, p99, p999, max) = (
        last.p50_us.unwrap(),
        last.p99_us.unwrap(),
        last.p999_us.unwrap(),
        last.max_us.unwrap(),
    );
    assert!(
        p50 > 0 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "{stdout}"
    );
    assert!(last.lag_p99_us.is_some(), "{stdout}");
    // One sample per response, and the summary's percentiles are theirs.
    let mut written: Vec<u64> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    std::fs::remove_file(&samples).unwrap();
    written.sort_unstable();
    assert_eq!(written.len() as u64, last.ok);
    // The summary's histogram keeps three significant digits; the samples are exact.
    let close = |exact: u64, summary: u64| exact.abs_diff(summary) <= exact / 1000 + 1;
    assert!(close(written[written.len() - 1], max), "{stdout}");
    assert!(close(written[(written.len() - 1) / 2], p50), "{stdout}");
}

#[tokio::test]
async fn sigterm_prints_the_final_summary() {
    let app = app("v1").start().await;
    let mut generator = loadgen(&app.url("/"))
        .args(["--rate", "20", "--report-every", "100ms"])
        .spawn();
    let first = generator
        .next_line()
        .await
        .expect("no report before exiting");
    assert!(first.starts_with("t="), "{first}");
    generator.terminate().await;
    let mut last = first;
    while let Some(line) = generator.next_line().await {
        last = line;
    }
    assert!(last.starts_with("final t="), "{last}");
    let status = generator.wait().await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn bad_flags_exit_2_naming_the_flag() {
    for (args, name) in [
        (&["--url", "http://x/", "--rate", "0"][..], "--rate"),
        (&["--url", "http://x/", "--duration", "2"][..], "--duration"),
        (&["--url", "http://x/", "--output", "xml"][..], "--output"),
        (&["--rate", "5"][..], "--url"),
    ] {
        let mut bin = support::Bin::new(env!("CARGO_BIN_EXE_mesh-loadgen")).args(args);
        bin = bin.env("RUST_LOG", "warn");
        let (status, _, stderr) = bin.output().await;
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(name), "{args:?}: {stderr}");
    }
}
