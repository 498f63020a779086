//! The harness's kube-apiserver is real: a Canary is created, read back, listed and watched
//! through kube-rs, and the CRD schema generated from our types rejects bad canaries before
//! anything is stored.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use futures_util::StreamExt;
use kube::{
    Api,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};
use mesh_crds::Canary;
use mesh_test_support::kube::KubeApiServer;

fn canary(name: &str, analysis: &serde_json::Value) -> Canary {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "targetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo" },
            "service": { "port": 9898 },
            "analysis": analysis,
        }
    }))
    .unwrap()
}

fn good_analysis() -> serde_json::Value {
    serde_json::json!({
        "interval": "10s",
        "threshold": 3,
        "maxWeight": 50,
        "stepWeight": 10,
        "metrics": [{ "name": "request-success-rate", "thresholdRange": { "min": 99.0 } }]
    })
}

#[tokio::test]
async fn canary_round_trips_through_a_real_apiserver() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let api: Api<Canary> = Api::namespaced(kube.client(), "default");

    // Watch from the current list's resourceVersion so the creation arrives as an event.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert!(list.items.is_empty());
    let rv = list.metadata.resource_version.unwrap();
    let mut events = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();

    let created = api
        .create(&PostParams::default(), &canary("podinfo", &good_analysis()))
        .await
        .unwrap();
    let uid = created
        .metadata
        .uid
        .clone()
        .expect("the apiserver assigns a uid");

    let fetched = api.get("podinfo").await.unwrap();
    assert_eq!(fetched.spec, canary("podinfo", &good_analysis()).spec);
    assert_eq!(fetched.metadata.uid.as_deref(), Some(uid.as_str()));

    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(names, ["podinfo"]);

    match events.next().await.expect("watch stream ended").unwrap() {
        WatchEvent::Added(c) => {
            assert_eq!(c.metadata.uid.as_deref(), Some(uid.as_str()));
            assert_eq!(c.spec.analysis.step_weight, Some(10));
        }
        other => panic!("expected Added, got {other:?}"),
    }
}

#[tokio::test]
async fn schema_rejects_bad_canaries_and_stores_nothing() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let api: Api<Canary> = Api::namespaced(kube.client(), "default");

    let mut over_100 = good_analysis();
    over_100["stepWeight"] = 150.into();
    let mut step_above_max = good_analysis();
    step_above_max["stepWeight"] = 60.into();
    let mut bad_interval = good_analysis();
    bad_interval["interval"] = "soon".into();
    let mut custom_without_template = good_analysis();
    custom_without_template["metrics"] = serde_json::json!([{ "name": "error-budget" }]);

    let cases = [
        ("over-100", over_100, "spec.analysis.stepWeight"),
        (
            "step-above-max",
            step_above_max,
            "stepWeight must not exceed maxWeight",
        ),
        ("bad-interval", bad_interval, "spec.analysis.interval"),
        ("no-template", custom_without_template, "need a templateRef"),
    ];
    for (name, analysis, expected) in cases {
        let err = api
            .create(&PostParams::default(), &canary(name, &analysis))
            .await
            .expect_err(&format!("{name}: the apiserver accepted an invalid canary"));
        let kube::Error::Api(status) = err else {
            panic!("{name}: unexpected error {err}")
        };
        assert_eq!(status.code, 422, "{name}: {status:?}");
        assert!(
            status.message.contains(expected),
            "{name}: {:?} lacks {expected:?}",
            status.message
        );
        let stored = api.get_opt(name).await.unwrap();
        assert!(stored.is_none(), "{name}: rejected canary was stored");
    }
}

/// The Canary schema's CEL rules and their Rust twins (which the embedded store runs) agree:
/// each rule's examples are kept or broken by a real apiserver's CEL exactly as the crate's own
/// test finds the Rust twin keeps or breaks them.
#[tokio::test]
async fn cel_rules_keep_and_break_what_their_examples_say() {
    let kube = KubeApiServer::start()
        .await
        .expect("start etcd + kube-apiserver");
    let api: Api<Canary> = Api::namespaced(kube.client(), "default");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let base = serde_json::to_value(canary("cel", &good_analysis())).unwrap();
    for rule in mesh_crds::canary::CEL_RULES {
        for example in rule.keeps {
            let doc = rule.with_example(&base, example).unwrap();
            let doc: Canary = serde_json::from_value(doc).unwrap();
            if let Err(e) = api.create(&dry_run, &doc).await {
                panic!("{:?} should keep {example}: {e}", rule.expression);
            }
        }
        for example in rule.breaks {
            let doc = rule.with_example(&base, example).unwrap();
            let doc: Canary = serde_json::from_value(doc).unwrap();
            let err = api
                .create(&dry_run, &doc)
                .await
                .expect_err(&format!("{:?} should break {example}", rule.expression));
            let kube::Error::Api(status) = err else {
                panic!("{example}: unexpected error {err}")
            };
            assert_eq!(status.code, 422, "{example}: {status:?}");
            assert!(
                status.message.contains(rule.message),
                "{example}: {:?} lacks {:?}",
                status.message,
                rule.message
            );
        }
    }
}
