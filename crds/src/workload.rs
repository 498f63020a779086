//! `Workload`: a service the embedded mesh runs as local processes, its stand-in for a Kubernetes
//! Deployment.
//!
//! A Workload names the versions it can run (each a command and its environment) and the one it
//! should run now (`spec.version`). Changing `spec.version` is a new revision, exactly as changing
//! a Deployment's image is in Flagger's model: with a Canary whose `targetRef` names the Workload,
//! the new version is rolled out as a canary; without one, the supervisor simply restarts the
//! service on it. The status records what each arm runs, so `mesh up` resumes after a restart.
//! This kind exists only in the embedded store; in Kubernetes the Canary targets a Deployment.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the embedded-mesh resources.
pub const WORKLOADS_GROUP: &str = "workloads.mesh.dev";

/// A service run by the embedded mesh.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "workloads.mesh.dev",
    version = "v1alpha1",
    kind = "Workload",
    plural = "workloads",
    namespaced,
    status = "WorkloadStatus",
    doc = "A service the embedded mesh runs as supervised processes, each with its own sidecar."
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The port the service is called on: peers send to `<name>.<namespace>:<port>` through
    /// their sidecars. Leave it out for a client-only workload (a load generator), which gets a
    /// sidecar for its outbound traffic and no inbound listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,

    /// The version to run, a key of `versions`. Changing it is a new revision.
    pub version: String,

    /// Processes per arm (primary, canary); 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// The versions this workload can run, by name.
    pub versions: BTreeMap<String, WorkloadVersion>,
}

/// How to run one version.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadVersion {
    /// The program and its arguments. The app must listen on `127.0.0.1:$PORT`; it reaches
    /// other services through `$HTTP_PROXY`, its sidecar.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// What the supervisor runs for the workload now.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The version the primary runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The version the canary runs, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
}

impl WorkloadSpec {
    /// Processes per arm.
    pub fn replicas(&self) -> usize {
        usize::try_from(self.replicas.unwrap_or(1))
            .unwrap_or(1)
            .max(1)
    }

    /// The revision of `version`: its name and a checksum of how it runs, so editing a
    /// version's command or environment is a new revision too.
    pub fn revision_of(&self, version: &str) -> Option<String> {
        let v = self.versions.get(version)?;
        let mut h = Fnv::default();
        h.write(version.as_bytes());
        for part in &v.command {
            h.write(&[0]);
            h.write(part.as_bytes());
        }
        for (k, val) in &v.env {
            h.write(&[1]);
            h.write(k.as_bytes());
            h.write(&[2]);
            h.write(val.as_bytes());
        }
        if let Some(p) = self.port {
            h.write(&p.to_le_bytes());
        }
        Some(format!("{version}-{:08x}", h.0 >> 32))
    }

    /// The revision the spec asks for.
    pub fn revision(&self) -> Option<String> {
        self.revision_of(&self.version)
    }
}

/// The version a revision string names (`v2-1a2b3c4d` -> `v2`).
pub fn version_of_revision(revision: &str) -> &str {
    revision.rsplit_once('-').map_or(revision, |(v, _)| v)
}

/// FNV-1a: a checksum that stays the same across builds and toolchains, so a stored revision
/// still matches after an upgrade.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(version: &str) -> WorkloadSpec {
        let mut versions = BTreeMap::new();
        for v in ["v1", "v2"] {
            versions.insert(
                v.to_string(),
                WorkloadVersion {
                    command: vec!["app".into(), format!("--version={v}")],
                    env: BTreeMap::new(),
                },
            );
        }
        WorkloadSpec {
            port: Some(80),
            version: version.into(),
            replicas: None,
            versions,
        }
    }

    #[test]
    fn revisions_change_with_the_version_and_how_it_runs() {
        let a = mk("v1");
        let b = mk("v2");
        assert_ne!(a.revision(), b.revision());
        assert_eq!(a.revision(), mk("v1").revision());
        let mut c = mk("v1");
        if let Some(v) = c.versions.get_mut("v1") {
            v.env.insert("X".into(), "1".into());
        }
        assert_ne!(a.revision(), c.revision());
        let rev = a.revision().unwrap();
        assert!(rev.starts_with("v1-"), "{rev}");
        assert_eq!(version_of_revision(&rev), "v1");
        assert_eq!(version_of_revision("my-v2-0000aaaa"), "my-v2");
        assert_eq!(mk("v3").revision(), None);
    }
}
