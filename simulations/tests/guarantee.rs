//! The guarantee docs/rollout.md states, asserted on the simulator's fixed seeds with the
//! shipped Canary and judge (`MeshConfig::default()`):
//! - a canary failing 5x as often as the primary, or 2x as slow, is promoted at most 1 % of
//!   the time;
//! - a canary identical to the primary is rolled back at most 0.5 % of the time;
//! - with too little traffic for the evidence, the rollout ends inconclusive, never promoted.
//!
//! The tolerance is statistical and derived here: a promise "rate <= p" holds on the fixed seeds
//! when the count over `n` seeds is at most `n p`. [`check`] also derives that `n` is large enough
//! for this to mean something: a judge whose true rate were twice the promise would pass with
//! probability under 5 % (it computes that chance from the binomial distribution and asserts it).
//! The seeds are fixed, so the test is deterministic; a change to the judge that breaks a promise
//! moves these counts past it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_simulations::run::{Summary, matrix};
use mesh_simulations::scenario::{self, Expect, Scenario};
use mesh_simulations::stats::binomial_at_least;
use mesh_simulations::strategy::{MeshConfig, Strategy};

/// Seeds per scenario.
const SEEDS: u64 = 2_000;

fn summary(s: &Scenario) -> Summary {
    let mesh = [Strategy::mesh("mesh", MeshConfig::default())];
    let cells = matrix(&mesh, std::slice::from_ref(s), SEEDS, 2);
    Summary::of(&cells[0])
}

/// Asserts `k` of `n` is within the promise `p`, after checking that `n` tells a broken judge
/// (true rate `2p`) from one that keeps it.
fn check(what: &str, k: u64, n: u64, p: f64) {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let allowed = (n as f64 * p).floor() as u64;
    let broken_passes = 1.0 - binomial_at_least(allowed + 1, n, 2.0 * p);
    assert!(
        broken_passes < 0.05,
        "{n} seeds cannot tell {p} from {}: a broken judge passes with probability {broken_passes}",
        2.0 * p
    );
    assert!(
        k <= allowed,
        "{what}: {k} of {n}, more than the {allowed} a rate of {p} allows"
    );
}

#[test]
fn a_canary_five_times_worse_on_errors_is_never_promoted() {
    let s = Scenario {
        canary_fail: 5.0 * scenario::BASE_FAIL,
        expect: Expect::Rollback,
        ..scenario::by_name("healthy").unwrap()
    };
    let r = summary(&s);
    check("5x errors promoted", r.promotions, r.runs, 0.01);
}

#[test]
fn a_canary_twice_as_slow_is_never_promoted() {
    // latency-2x-loaded is the real trials' failure: shared load delays that a slow bound
    // frozen in one window could not see past.
    for name in ["latency-2x", "latency-2x-loaded"] {
        let r = summary(&scenario::by_name(name).unwrap());
        check(&format!("{name} promoted"), r.promotions, r.runs, 0.01);
    }
}

#[test]
fn an_identical_canary_is_rarely_rolled_back() {
    for name in [
        "healthy",
        "noisy-primary",
        "primary-degrades",
        "client-5xx-bursts",
        "healthy-loaded",
        "healthy-overloaded",
    ] {
        let r = summary(&scenario::by_name(name).unwrap());
        check(&format!("{name} rolled back"), r.rollbacks, r.runs, 0.005);
    }
}

#[test]
fn too_little_traffic_ends_inconclusive_never_promoted() {
    let r = summary(&scenario::by_name("low-traffic-1rps").unwrap());
    assert_eq!(r.promotions, 0);
    assert_eq!(r.inconclusive, r.runs, "every rollout ends inconclusive");
}

/// docs/rollout.md states the traffic the guarantee needs; the figures come from the judge's
/// own test math (`judge::requests_to_clear_floor`, `judge::events_to_clear_ratio`) and this
/// test fails when the page and the math drift apart.
#[test]
fn the_traffic_docs_rollout_states_is_the_tests_own_math() {
    use mesh_rollout_controller::judge::{
        JudgeConfig, events_to_clear_ratio, requests_to_clear_floor,
    };
    let c = JudgeConfig::default();
    assert_rollout_page_states(&guarantee_line(&c));
    // And the figures mean what they say: the floor test needs more requests as failures rise.
    let a = requests_to_clear_floor(0.0, c.error_floor, &c).unwrap();
    let b = requests_to_clear_floor(0.001, c.error_floor, &c).unwrap();
    assert!(a < b, "{a} {b}");
    assert!(requests_to_clear_floor(c.error_floor, c.error_floor, &c).is_none());
    assert!(events_to_clear_ratio(0.5, c.slow_ratio, &c).is_some());
}

/// The sentence of docs/rollout.md with the traffic the guarantee needs.
fn guarantee_line(c: &mesh_rollout_controller::judge::JudgeConfig) -> String {
    use mesh_rollout_controller::judge::{events_to_clear_ratio, requests_to_clear_floor};
    let floor0 = requests_to_clear_floor(0.0, c.error_floor, c).unwrap();
    let floor1 = requests_to_clear_floor(0.001, c.error_floor, c).unwrap();
    let slow = events_to_clear_ratio(0.5, c.slow_ratio, c).unwrap();
    format!(
        "To promote, the canary needs about {floor0} requests without a failure, or {floor1} at a \
         0.1 % failure rate, and about {slow:.0} slow requests (above each window's p95 bucket) \
         on both sides together at a 50 % weight."
    )
}

/// docs/rollout.md states what the guarantee costs any judge in failed requests; the figures
/// come from `judge::fewest_failures_to_roll_back` and `judge::fewest_requests_to_promote`, and
/// this test fails when the page and the math drift apart.
#[test]
fn the_blast_radius_floor_docs_rollout_states_is_the_math() {
    assert_rollout_page_states(&blast_floor_line());
}

/// docs/rollout.md states how fast any comparison that keeps the healthy promise could catch
/// a canary failing 5 %; the figure comes from `judge::best_comparison_power` on the shipped
/// Canary's fastest schedule, and this test fails when the page and the math drift apart.
#[test]
fn the_detection_ceiling_docs_rollout_states_is_the_math() {
    assert_rollout_page_states(&detection_ceiling_line());
}

/// The sentence of docs/rollout.md with the most any such comparison decides within 10 s.
fn detection_ceiling_line() -> String {
    use mesh_rollout_controller::judge::best_comparison_power;
    let mesh = MeshConfig::default();
    let rps = 100.0;
    let (bad, base) = (0.05, scenario::BASE_FAIL);
    let at = |windows: &[(f64, f64)]| {
        100.0 * best_comparison_power(windows, bad, base, mesh.judge.alpha).unwrap()
    };
    let shipped = at(&mesh.fastest_windows(rps, 10.0));
    let with = |step_weight: i32, max_weight: i32| {
        at(&MeshConfig {
            step_weight,
            max_weight,
            ..mesh.clone()
        }
        .fastest_windows(rps, 10.0))
    };
    let held = with(mesh.step_weight, mesh.step_weight);
    let doubled = with(2 * mesh.step_weight, mesh.max_weight);
    format!(
        "At {rps:.0} req/s with the shipped Canary, no comparison at alpha {} whose false \
         rollbacks stay within it whatever failure rate both sides share may roll back a canary \
         failing 5 % against a primary failing {} % within 10 s in more than {shipped:.1} % of \
         rollouts, even if the weight steps to {} % at the first tick ({held:.1} % if it stays at \
         {} %; {doubled:.1} % with a stepWeight of {}).",
        mesh.judge.alpha,
        100.0 * base,
        2 * mesh.step_weight,
        mesh.step_weight,
        2 * mesh.step_weight,
    )
}

/// Fails unless docs/rollout.md holds `line` word for word.
fn assert_rollout_page_states(line: &str) {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/rollout.md"),
    )
    .unwrap();
    assert!(
        page.contains(line),
        "docs/rollout.md should state, word for word:\n{line}"
    );
}

/// The sentence of docs/rollout.md with the fewest failed requests any judge serves.
fn blast_floor_line() -> String {
    use mesh_rollout_controller::judge::{
        JudgeConfig, fewest_failures_to_roll_back, fewest_requests_to_promote,
    };
    let c = JudgeConfig::default();
    let base = scenario::BASE_FAIL;
    let k = |bad: f64| fewest_failures_to_roll_back(bad, base, c.alpha).unwrap();
    let n = fewest_requests_to_promote(c.error_floor, c.promote_alpha).unwrap();
    format!(
        "Against a primary failing {} %, no test at alpha {} may roll back a canary failing 1 % \
         before it has served {} failed requests ({} at 0.5 %, {} at 5 %), and no rule may promote \
         a canary before it has served {n} requests ({:.2} failed requests on average at {} %).",
        100.0 * base,
        c.alpha,
        k(0.01),
        k(0.005),
        k(0.05),
        n as f64 * base,
        100.0 * base
    )
}
