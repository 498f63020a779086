//! `mesh inject -f FILE|-`: the proxy injector, offline, on YAML.
//!
//! Every workload in the input (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob) gets the annotation `mesh.dev/inject: enabled` and the same containers the webhook
//! would add, unless its pod template says `mesh.dev/inject: disabled`. Other documents pass
//! through unchanged. The output is YAML for `kubectl apply -f -`.

use std::io::Read;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_controlplane::inject::{self, Decision, INJECT_ANNOTATION, InjectConfig};
use serde::Deserialize as _;
use serde_json::Value;

/// Where the pod template sits in a workload of `kind`, as a JSON pointer.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to one document.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy was added.
    Injected,
    /// Left alone, and why.
    Skipped(String),
    /// Not a workload.
    NotAWorkload,
}

/// Injects one document in place.
pub fn inject_document(doc: &mut Value, config: &InjectConfig) -> anyhow::Result<Outcome> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
    let Some(template) = doc.pointer_mut(pointer) else {
        bail!("{kind} {name}: no pod template at {pointer}");
    };
    let mut meta: ObjectMeta = serde_json::from_value(template["metadata"].clone())
        .with_context(|| format!("{kind} {name}: metadata"))?;
    let spec: Option<PodSpec> = serde_json::from_value(template["spec"].clone())
        .with_context(|| format!("{kind} {name}: pod spec"))?;
    let Some(mut spec) = spec else {
        bail!("{kind} {name}: the pod template has no spec");
    };
    // Offline there is no namespace to ask: injecting is what was asked for, unless the
    // workload opted out.
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations
        .entry(INJECT_ANNOTATION.to_string())
        .or_insert_with(|| "enabled".to_string());
    match inject::decide(&Default::default(), &meta, &spec) {
        Decision::Skip(why) => return Ok(Outcome::Skipped(why)),
        Decision::Inject => {}
    }
    inject::inject(&mut meta, &mut spec, config).with_context(|| format!("{kind} {name}"))?;
    template["metadata"] = serde_json::to_value(&meta)?;
    template["spec"] = serde_json::to_value(&spec)?;
    Ok(Outcome::Injected)
}

/// Reads `path` (`-` for stdin), injects every workload, returns the YAML and a report line
/// per document.
pub fn inject_file(path: &str, config: &InjectConfig) -> anyhow::Result<(String, Vec<String>)> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    let mut out = Vec::new();
    let mut report = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let yaml = serde_yaml::Value::deserialize(de)
            .with_context(|| format!("{path}: document {} is not YAML", i + 1))?;
        if yaml.is_null() {
            continue;
        }
        let mut doc: Value =
            serde_json::to_value(&yaml).with_context(|| format!("{path}: document {}", i + 1))?;
        let label = format!(
            "{} {}",
            doc["kind"].as_str().unwrap_or("?"),
            doc["metadata"]["name"].as_str().unwrap_or("?")
        );
        match inject_document(&mut doc, config)? {
            Outcome::Injected => report.push(format!("{label}: injected")),
            Outcome::Skipped(why) => report.push(format!("{label}: skipped ({why})")),
            Outcome::NotAWorkload => {}
        }
        out.push(serde_yaml::to_string(&doc)?);
    }
    Ok((out.join("---\n"), report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(annotations: &Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}, "annotations": annotations},
                                  "spec": {"containers": [{"name": "app", "image": "podinfo"}]}}},
        })
    }

    #[test]
    fn workloads_get_the_proxy_and_other_documents_pass_through() {
        let config = InjectConfig::default();
        let mut d = deployment(&json!({}));
        assert_eq!(inject_document(&mut d, &config).unwrap(), Outcome::Injected);
        let t = &d["spec"]["template"];
        assert_eq!(
            t["spec"]["initContainers"][1]["name"],
            inject::PROXY_CONTAINER
        );
        assert_eq!(t["spec"]["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(t["metadata"]["annotations"][INJECT_ANNOTATION], "enabled");
        // Twice is the same as once.
        let once = d.clone();
        assert!(matches!(
            inject_document(&mut d, &config).unwrap(),
            Outcome::Skipped(_)
        ));
        assert_eq!(d, once);

        let mut off = deployment(&json!({INJECT_ANNOTATION: "disabled"}));
        assert!(matches!(
            inject_document(&mut off, &config).unwrap(),
            Outcome::Skipped(_)
        ));
        let mut svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}});
        assert_eq!(
            inject_document(&mut svc, &config).unwrap(),
            Outcome::NotAWorkload
        );
    }
}
