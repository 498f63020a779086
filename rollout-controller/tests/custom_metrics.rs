//! Metrics with a `templateRef` are read through their MetricTemplate at each analysis tick and
//! judged against their range; the query runs on a real Prometheus.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::Utc;
use mesh_crds::canary::Verdict;
use mesh_crds::{Canary, CanaryPhase, CanaryStatus, MetricTemplate};
use mesh_rollout_controller::controller::{Driver, TargetState, reconcile};
use mesh_rollout_controller::error::DriverError;
use mesh_rollout_controller::judge::{JudgeConfig, Window};
use mesh_rollout_controller::machine::Action;
use mesh_rollout_controller::sources::{MetricSource, SourceError, Target};
use mesh_test_support::prometheus::Prometheus;
use serde_json::json;

/// A target that is always ready and serves the templates it was given.
struct Templates(Vec<MetricTemplate>);

impl Driver for Templates {
    async fn observe(&mut self, _canary: &Canary) -> Result<TargetState, DriverError> {
        Ok(TargetState {
            revision: "rev-2".into(),
            primary_ready: true,
            canary_ready: true,
        })
    }

    async fn metric_template(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<MetricTemplate>, DriverError> {
        Ok(self
            .0
            .iter()
            .find(|t| {
                t.metadata.namespace.as_deref() == Some(namespace)
                    && t.metadata.name.as_deref() == Some(name)
            })
            .cloned())
    }

    async fn act(&mut self, _: &Canary, _: &str, _: &Action) -> Result<(), DriverError> {
        Ok(())
    }

    async fn write_status(&mut self, _: &Canary, _: &CanaryStatus) -> Result<(), DriverError> {
        Ok(())
    }
}

/// Plenty of healthy traffic, so only the custom gates can decide; and no query engine.
struct Healthy;

impl MetricSource for Healthy {
    async fn window(&mut self, _: &Target, _: Duration) -> Result<Window, SourceError> {
        let mut w = Window::default();
        w.canary.requests = 1000;
        w.primary.requests = 9000;
        Ok(w)
    }
}

fn template(name: &str, address: Option<&str>, query: &str) -> MetricTemplate {
    let mut provider = json!({"type": "prometheus"});
    if let Some(a) = address {
        provider["address"] = a.into();
    }
    serde_json::from_value(json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "MetricTemplate",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"provider": provider, "query": query},
    }))
    .unwrap()
}

fn canary(depth: &str) -> Canary {
    let mut c: Canary = serde_json::from_value(json!({
        "apiVersion": "rollouts.mesh.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": "cart", "namespace": "shop"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cart"},
            "service": {"port": 8080},
            "analysis": {
                "interval": "10s", "threshold": 2, "stepWeight": 10, "maxWeight": 50,
                "metrics": [
                    {"name": "queue-depth", "templateRef": {"name": "depth"},
                     "templateVariables": {"depth": depth}, "thresholdRange": {"max": 20}},
                    {"name": "no-engine", "templateRef": {"name": "local"},
                     "thresholdRange": {"max": 1}},
                    {"name": "missing", "templateRef": {"name": "nope"},
                     "thresholdRange": {"max": 1}},
                ],
            },
        },
    }))
    .unwrap();
    c.status = Some(CanaryStatus {
        phase: CanaryPhase::Progressing,
        canary_weight: 10,
        iterations: 1,
        last_applied_spec: Some("rev-2".into()),
        ..CanaryStatus::default()
    });
    c
}

#[tokio::test]
async fn template_metrics_are_queried_and_judged_each_tick() {
    let prometheus = Prometheus::builder().start().await.unwrap();
    let mut driver = Templates(vec![
        template(
            "depth",
            Some(prometheus.url()),
            "vector({{ variables.depth }})",
        ),
        template("local", None, "vector(0)"),
    ]);
    let client = mesh_test_support::http_client();
    let judge = JudgeConfig::default();

    let gate = |status: &CanaryStatus, name: &str| {
        status
            .analysis
            .iter()
            .find(|g| g.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no gate {name} in {:#?}", status.analysis))
    };

    let ok = reconcile(
        &canary("12"),
        &mut driver,
        &mut Healthy,
        &client,
        &judge,
        Utc::now(),
    )
    .await
    .unwrap();
    let depth = gate(&ok.status, "queue-depth");
    assert_eq!(depth.canary, Some(12.0), "{depth:?}");
    assert_eq!(depth.verdict, Verdict::Pass, "{depth:?}");
    // Without a provider address, the direct scrape cannot run the query; without the
    // template there is nothing to run. Neither passes or fails the canary on no evidence.
    assert_eq!(gate(&ok.status, "no-engine").verdict, Verdict::Inconclusive);
    assert_eq!(gate(&ok.status, "missing").verdict, Verdict::Inconclusive);
    assert_eq!(ok.status.failed_checks, 0);

    let bad = reconcile(
        &canary("30"),
        &mut driver,
        &mut Healthy,
        &client,
        &judge,
        Utc::now(),
    )
    .await
    .unwrap();
    let depth = gate(&bad.status, "queue-depth");
    assert_eq!(depth.canary, Some(30.0), "{depth:?}");
    assert_eq!(depth.verdict, Verdict::Fail, "{depth:?}");
    assert_eq!(bad.status.failed_checks, 1, "{:#?}", bad.status.analysis);
}
