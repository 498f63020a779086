//! The Canary schema's CEL rule and the validation accept exactly the built-in gates defined in
//! `mesh_core::gates`, so a gate added there is accepted everywhere without naming it again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use mesh_core::gates::{self, BUILTIN};
use serde_json::{Value, json};

fn canary_with_metric(name: &str) -> Value {
    json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "service": {"port": 80},
            "analysis": {
                "interval": "30s",
                "threshold": 2,
                "stepWeight": 10,
                "metrics": [{"name": name}]
            }
        }
    })
}

#[test]
fn validation_accepts_every_builtin_gate_without_a_template() {
    for g in BUILTIN {
        let canary = canary_with_metric(g.name);
        mesh_crds::validate::validate(&canary)
            .unwrap_or_else(|e| panic!("built-in gate {} refused: {e}", g.name));
    }
    let e = mesh_crds::validate::validate(&canary_with_metric("queue-depth"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("templateRef"), "{e}");
    for g in BUILTIN {
        assert!(e.contains(g.name), "{e}");
    }
}

#[test]
fn the_crd_rule_is_the_gates_rule() {
    let crd = serde_json::to_string(&mesh_crds::all()).unwrap();
    let rule = serde_json::to_string(&gates::metric_rule()).unwrap();
    let message = serde_json::to_string(&gates::metric_rule_message()).unwrap();
    assert!(crd.contains(&rule), "{rule} not in the Canary CRD");
    assert!(crd.contains(&message), "{message} not in the Canary CRD");
}
