//! A Flagger manifest, with only its apiVersion changed, parses into our types with every field
//! kept, and serializes back with the same field names.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use mesh_crds::{Canary, canary::WebhookType};

const FLAGGER_CANARY: &str = r#"
apiVersion: rollouts.mesh.dev/v1alpha1
kind: Canary
metadata:
  name: podinfo
  namespace: test
spec:
  targetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: podinfo
  progressDeadlineSeconds: 60
  service:
    port: 9898
    targetPort: 9898
  analysis:
    interval: 30s
    threshold: 5
    maxWeight: 50
    stepWeight: 10
    metrics:
    - name: request-success-rate
      thresholdRange:
        min: 99
      interval: 1m
    - name: request-duration
      thresholdRange:
        max: 500
      interval: 30s
    webhooks:
    - name: acceptance-test
      type: pre-rollout
      url: http://flagger-loadtester.test/
      timeout: 30s
      metadata:
        type: bash
        cmd: "curl -sd 'test' http://podinfo-canary.test:9898/token | grep token"
    - name: load-test
      url: http://flagger-loadtester.test/
      timeout: 5s
      metadata:
        cmd: "hey -z 1m -q 10 -c 2 http://podinfo-canary.test:9898/"
"#;

#[test]
fn flagger_manifest_round_trips() {
    let canary: Canary = serde_yaml::from_str(FLAGGER_CANARY).unwrap();
    let a = &canary.spec.analysis;
    assert_eq!(canary.spec.target_ref.name, "podinfo");
    assert_eq!(canary.spec.progress_deadline_seconds, Some(60));
    assert_eq!(canary.spec.service.port, 9898);
    assert_eq!((a.interval.as_str(), a.threshold), ("30s", 5));
    assert_eq!((a.max_weight, a.step_weight), (Some(50), Some(10)));
    assert_eq!(
        a.metrics[0].threshold_range.as_ref().unwrap().min,
        Some(99.0)
    );
    assert_eq!(
        a.metrics[1].threshold_range.as_ref().unwrap().max,
        Some(500.0)
    );
    assert_eq!(a.webhooks[0].type_, Some(WebhookType::PreRollout));
    assert_eq!(a.webhooks[1].type_, None);

    let back = serde_json::to_value(&canary).unwrap();
    assert_eq!(back["spec"]["analysis"]["stepWeight"], 10);
    assert_eq!(
        back["spec"]["analysis"]["webhooks"][0]["type"],
        "pre-rollout"
    );
    assert_eq!(back["spec"]["progressDeadlineSeconds"], 60);
    let again: Canary = serde_json::from_value(back).unwrap();
    assert_eq!(again.spec, canary.spec);
}
