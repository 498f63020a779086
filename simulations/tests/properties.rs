//! Properties of the simulator as a whole: it is deterministic, a clearly bad canary is rolled
//! back and a healthy one promoted by every strategy in most seeds, and the mesh strategy reacts
//! to its judge settings (it really runs the judge it is given).

use mesh_simulations::run::{self, Summary};
use mesh_simulations::scenario;
use mesh_simulations::strategy::{self, Decision, MeshConfig, Strategy};

const SEEDS: u64 = 100;

fn summaries(scenario_name: &str) -> Vec<Summary> {
    let Some(sc) = scenario::by_name(scenario_name) else {
        panic!("no scenario {scenario_name}");
    };
    run::matrix(&strategy::standard(), &[sc], SEEDS, 2)
        .iter()
        .map(Summary::of)
        .collect()
}

#[test]
fn same_seed_same_results_on_any_number_of_threads() {
    let strategies = strategy::standard();
    let scenarios = [
        scenario::by_name("bursts").unwrap(),
        scenario::by_name("metric-gaps").unwrap(),
    ];
    let one = run::matrix(&strategies, &scenarios, 60, 1);
    let three = run::matrix(&strategies, &scenarios, 60, 3);
    assert_eq!(one, three);
    let again = strategies[0].run(&scenarios[0], 42);
    assert_eq!(again, strategies[0].run(&scenarios[0], 42));
    // Different seeds do give different rollouts.
    let outcomes: Vec<_> = (0..20)
        .map(|s| strategies[1].run(&scenarios[0], s))
        .collect();
    assert!(outcomes.iter().any(|o| *o != outcomes[0]));
}

#[test]
fn a_clearly_bad_canary_is_rolled_back_by_every_strategy() {
    for s in summaries("errors-5pct") {
        assert!(
            s.p_rollback() >= 0.9,
            "{} rolled back only {} of bad canaries",
            s.strategy,
            s.p_rollback()
        );
        assert_eq!(
            s.promotions, 0,
            "{} promoted a 5 % error canary",
            s.strategy
        );
    }
}

#[test]
fn a_healthy_canary_is_mostly_promoted_by_every_strategy() {
    for s in summaries("healthy") {
        assert!(
            s.p_promote() >= 0.9,
            "{} promoted only {} of healthy canaries",
            s.strategy,
            s.p_promote()
        );
    }
}

#[test]
fn the_mesh_never_promotes_on_one_request_per_second() {
    let sc = scenario::by_name("low-traffic-1rps").unwrap();
    let mesh = Strategy::mesh("mesh", MeshConfig::default());
    for seed in 0..50 {
        let o = mesh.run(&sc, seed);
        assert_eq!(o.decision, Decision::Inconclusive, "seed {seed}: {o:?}");
    }
}

#[test]
fn the_mesh_strategy_runs_the_judge_it_is_given() {
    let sc = scenario::by_name("errors-5pct").unwrap();
    let lenient = {
        let mut c = MeshConfig {
            absolute_gates: false,
            ..MeshConfig::default()
        };
        // A test that can never conclude: it never passes (too few samples, always) and never
        // fails (a likelihood ratio of at least 1 / alpha is out of reach at alpha 0).
        c.judge.min_samples = u64::MAX;
        c.judge.alpha = 0.0;
        Strategy::mesh("mesh-blind", c)
    };
    let o = lenient.run(&sc, 1);
    assert_eq!(o.decision, Decision::Inconclusive, "{o:?}");
    let strict = Strategy::mesh("mesh", MeshConfig::default()).run(&sc, 1);
    assert_eq!(strict.decision, Decision::Rollback, "{strict:?}");
}

/// `mesh` must run what the product ships: the Canary of `examples/mesh.yaml` (the `mesh demo`
/// Canary has the same analysis) with the judge's defaults. The Canary there is flat YAML, so
/// reading its scalar settings line by line is enough and keeps this crate free of a YAML parser.
#[test]
fn the_mesh_strategy_runs_the_shipped_canary() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let canary = text
        .split("\n---")
        .find(|doc| doc.lines().any(|l| l.trim() == "kind: Canary"))
        .expect("examples/mesh.yaml has a Canary");
    let setting = |key: &str| -> String {
        let prefix = format!("{key}:");
        canary
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("the Canary has no {key}"))
    };
    let c = MeshConfig::default();
    assert_eq!(setting("interval"), format!("{}s", c.interval_s));
    assert_eq!(setting("threshold"), c.threshold.to_string());
    assert_eq!(setting("stepWeight"), c.step_weight.to_string());
    assert_eq!(setting("maxWeight"), c.max_weight.to_string());
    assert_eq!(setting("progressDeadlineSeconds"), c.deadline_s.to_string());
    assert!(c.absolute_gates);
    assert!(canary.contains("name: request-success-rate"));
    assert!(canary.contains("name: request-duration"));
    assert_eq!(
        c.judge,
        mesh_rollout_controller::judge::JudgeConfig::default()
    );
}
