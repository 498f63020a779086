//! Every CEL rule in the CRD schemas is stated once, as a [`CelRule`](mesh_crds::cel::CelRule)
//! whose Rust twin validation runs for the embedded store, and the twin agrees with each rule's
//! examples. (test-support's apiserver test runs the same examples through a real apiserver's
//! CEL.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use mesh_crds::{canary::CEL_RULES, validate::validate};
use serde_json::{Value, json};

/// Every `x-kubernetes-validations` entry under `schema`, with the JSON pointer of the schema
/// that holds it.
fn cel_rules_in(schema: &Value, at: &str, out: &mut Vec<(String, String, String)>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "x-kubernetes-validations" {
                    for rule in value.as_array().unwrap() {
                        out.push((
                            at.to_string(),
                            rule["rule"].as_str().unwrap().to_string(),
                            rule["message"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                } else {
                    cel_rules_in(value, &format!("{at}/{key}"), out);
                }
            }
        }
        Value::Array(list) => {
            for (i, value) in list.iter().enumerate() {
                cel_rules_in(value, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The rule on built-in gate names is stated with the gate list rather than in `CEL_RULES`.
fn is_gate_name_rule(at: &str) -> bool {
    at.ends_with("/analysis/properties/metrics/items")
}

#[test]
fn every_schema_rule_is_stated_once_with_its_rust_twin() {
    let mut found = Vec::new();
    for (file, crd) in mesh_crds::all() {
        cel_rules_in(&serde_json::to_value(&crd).unwrap(), file, &mut found);
    }
    for (at, rule, message) in &found {
        if is_gate_name_rule(at) {
            continue;
        }
        assert!(
            CEL_RULES
                .iter()
                .any(|r| r.expression == rule && r.message == message),
            "{at}: the CEL rule {rule:?} has no Rust twin: state it as a CelRule (see \
             mesh_crds::cel) and list it in CEL_RULES"
        );
    }
    for rule in CEL_RULES {
        let times = found
            .iter()
            .filter(|(_, r, m)| r == rule.expression && m == rule.message)
            .count();
        assert_eq!(
            times, 1,
            "{:?} appears {times} times in the schemas",
            rule.expression
        );
    }
}

fn canary() -> Value {
    json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "service": {"port": 80},
            "analysis": {
                "interval": "1m",
                "threshold": 5,
                "stepWeight": 10,
                "metrics": [{"name": "request-success-rate"}]
            }
        }
    })
}

#[test]
fn rust_twins_keep_and_break_what_the_examples_say() {
    assert!(validate(&canary()).is_ok());
    for rule in CEL_RULES {
        assert!(
            !rule.keeps.is_empty() && !rule.breaks.is_empty(),
            "{:?} needs examples both ways",
            rule.expression
        );
        for example in rule.keeps {
            let doc = rule.with_example(&canary(), example).unwrap();
            if let Err(e) = validate(&doc) {
                panic!("{:?} should keep {example}: {e}", rule.expression);
            }
        }
        for example in rule.breaks {
            let doc = rule.with_example(&canary(), example).unwrap();
            let err =
                validate(&doc).expect_err(&format!("{:?} should break {example}", rule.expression));
            assert!(
                err.to_string().contains(rule.message),
                "{example}: {err} does not say {:?}",
                rule.message
            );
            let field = err.field().unwrap_or_default();
            assert!(
                field.starts_with(&rule.field()),
                "{example}: {field} is not under {}",
                rule.field()
            );
        }
    }
}
