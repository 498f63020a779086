//! The Helm chart (`deploy/helm/mesh`) through a real helm: `helm lint --strict` passes, and
//! `helm template` renders the same objects as `mesh install` with the same flags, apart from
//! the keys (which Helm makes or is given). The chart's drift from the code is caught by a unit
//! test in `cli/src/k8s/helm.rs`.
//!
//! helm is a Go module `scripts/test` builds, pinned, into the cache and passes as `MESH_HELM`
//! (else it is looked up on PATH). Under `CI=true` a missing helm fails the test; elsewhere the
//! test says so and skips.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "tests; a skipped test says why on stderr"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh_test_support::process::workspace_bin;
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/helm/mesh")
        .canonicalize()
        .unwrap()
}

fn helm() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_HELM").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "MESH_HELM={} is not a file", path.display());
        return Some(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("helm"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = "helm is missing (set MESH_HELM or put it on PATH; ./scripts/test builds it)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipping: {why}");
    }
    found
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn documents(yaml: &[u8]) -> Vec<Value> {
    serde_yaml::Deserializer::from_slice(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// An identity issuer, as a user would bring one: a CA certificate and its PKCS#8 key.
fn issuer(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "identity.mesh.dev");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let (crt, pem) = (dir.join("issuer.crt"), dir.join("issuer.key"));
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&pem, key.serialize_pem()).unwrap();
    (crt, pem)
}

/// Drops what differs by design between two renderings: keys and the annotation that follows
/// the injector's certificate.
fn without_keys(mut docs: Vec<Value>) -> Vec<Value> {
    for d in &mut docs {
        if d["kind"] == "Secret" {
            d["data"] = Value::Null;
        }
        if d["kind"] == "MutatingWebhookConfiguration" {
            d["webhooks"][0]["clientConfig"]["caBundle"] = Value::Null;
        }
        if d["kind"] == "Deployment" {
            d["spec"]["template"]["metadata"]["annotations"] = Value::Null;
        }
    }
    docs.sort_by_key(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]));
    docs
}

fn cert(pem: &[u8]) -> (String, String) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    let c = pem.parse_x509().unwrap();
    (c.subject().to_string(), c.issuer().to_string())
}

#[test]
fn helm_lints_the_chart_and_renders_what_mesh_install_renders() {
    let Some(helm) = helm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = issuer(dir.path());
    let issuer_flags = [
        "--set-file".to_string(),
        format!("identity.issuer.crtPEM={}", crt.display()),
        "--set-file".to_string(),
        format!("identity.issuer.keyPEM={}", key.display()),
    ];

    let lint = Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(chart())
        .args(&issuer_flags)
        .output()
        .unwrap();
    assert!(lint.status.success(), "{}", text(&lint));

    // Without the issuer, helm says which value is missing.
    let bare = Command::new(&helm)
        .args(["template", "mesh"])
        .arg(chart())
        .output()
        .unwrap();
    assert!(!bare.status.success());
    assert!(
        text(&bare).contains("identity.issuer.crtPEM is required"),
        "{}",
        text(&bare)
    );

    for ha in [false, true] {
        let mut template = Command::new(&helm);
        template
            .args(["template", "mesh"])
            .arg(chart())
            .args(&issuer_flags)
            .args([
                "--set",
                "imageRegistry=localhost/mesh",
                "--set",
                "version=dev",
            ])
            .args(["--set", "prometheusUrl=http://prom.example:9090"]);
        let mut install = Command::new(workspace_bin("mesh").unwrap());
        install.args([
            "install",
            "--skip-gateway-api-crds",
            "--image-registry",
            "localhost/mesh",
            "--version",
            "dev",
            "--prometheus-url",
            "http://prom.example:9090",
        ]);
        if ha {
            template.args(["--set", "ha=true"]);
            install.arg("--ha");
        }
        let from_helm = template.output().unwrap();
        assert!(from_helm.status.success(), "{}", text(&from_helm));
        let from_mesh = install.output().unwrap();
        assert!(from_mesh.status.success(), "{}", text(&from_mesh));
        let helm_docs = documents(&from_helm.stdout);
        let mesh_docs: Vec<Value> = documents(&from_mesh.stdout)
            .into_iter()
            .filter(|d| d["kind"] != "CustomResourceDefinition")
            .collect();
        assert_eq!(
            without_keys(helm_docs.clone()),
            without_keys(mesh_docs),
            "ha={ha}"
        );

        // The keys: the issuer is the one given; the injector's certificate is one Helm made,
        // issued by the CA the webhook trusts.
        let secret = |name: &str| {
            helm_docs
                .iter()
                .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)
                .unwrap()["data"]
                .clone()
        };
        let b64 = |v: &Value| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
        };
        assert_eq!(
            b64(&secret("mesh-identity-issuer")["tls.crt"]),
            std::fs::read(&crt).unwrap()
        );
        let hook = helm_docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        let (ca_subject, _) = cert(&b64(&hook["webhooks"][0]["clientConfig"]["caBundle"]));
        let (subject, issued_by) = cert(&b64(&secret("mesh-injector-tls")["tls.crt"]));
        assert!(
            subject.contains("mesh-controlplane.mesh-system.svc"),
            "{subject}"
        );
        assert_eq!(issued_by, ca_subject);
        let cp = helm_docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "mesh-controlplane")
            .unwrap();
        assert!(
            cp["spec"]["template"]["metadata"]["annotations"]
                ["mesh.dev/injector-certificate-serial"]
                .is_string()
        );
    }
}
