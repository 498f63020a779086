//! CEL rules stated once for both stores.
//!
//! A real apiserver enforces the `x-kubernetes-validations` rules of the CRD schemas; the
//! embedded store has no CEL, so it runs each rule's Rust twin instead. A [`CelRule`] holds both
//! halves: the expression and message the schema attribute reads (`#[x_kube(validation =
//! &RULE)]`), and the check the store's validation runs, which reports the same message. Each
//! rule also carries examples that keep it and examples that break it; the crate's tests run
//! them through the Rust check and the schema, and test-support's apiserver test runs them
//! through a real apiserver's CEL, so the two halves cannot drift apart silently.

use serde_json::Value;

/// The half of a rule that tests and the schema read: what it says, where it sits, and
/// examples of its object.
#[derive(Clone, Copy, Debug)]
pub struct CelText {
    /// The CEL expression, with `self` the object the rule is attached to.
    pub expression: &'static str,
    /// What is wrong when it fails; an apiserver reports it, and so does the embedded store.
    pub message: &'static str,
    /// Where `self` sits in a resource of its kind, as a JSON pointer (list entries as `0`),
    /// e.g. `/spec/analysis/metrics/0/thresholdRange`.
    pub pointer: &'static str,
    /// JSON values of `self` that keep the rule (and every other rule, in a resource that is
    /// otherwise valid).
    pub keeps: &'static [&'static str],
    /// JSON values of `self` that break the rule.
    pub breaks: &'static [&'static str],
}

impl CelText {
    /// A copy of `resource` with `example` (one of [`Self::keeps`] or [`Self::breaks`], JSON)
    /// put where the rule's object sits. `None` when the example is no JSON or the resource has
    /// no place at [`Self::pointer`].
    pub fn with_example(&self, resource: &Value, example: &str) -> Option<Value> {
        let example: Value = serde_json::from_str(example).ok()?;
        let mut resource = resource.clone();
        let (parent, last) = self.pointer.rsplit_once('/')?;
        match resource.pointer_mut(parent)? {
            Value::Object(map) => {
                map.insert(last.to_string(), example);
            }
            Value::Array(list) => *list.get_mut(last.parse::<usize>().ok()?)? = example,
            _ => return None,
        }
        Some(resource)
    }

    /// [`Self::pointer`] as validation names fields: `spec.analysis.metrics[0].thresholdRange`.
    pub fn field(&self) -> String {
        let mut field = String::new();
        for segment in self.pointer.split('/').skip(1) {
            if segment.bytes().all(|b| b.is_ascii_digit()) {
                field.push_str(&format!("[{segment}]"));
            } else {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(segment);
            }
        }
        field
    }
}

/// A CEL rule on objects of type `T` and its Rust twin.
#[derive(Debug)]
pub struct CelRule<T: ?Sized> {
    /// The expression, message and examples.
    pub text: CelText,
    /// The rule in Rust: `Err` says which field under `self` broke it and the values that did.
    pub check: fn(&T) -> Result<(), Broken>,
}

/// Where and how a value broke a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    /// The path under the rule's object, joined to the object's own path: `.stepWeight`,
    /// `[1]`, or empty for the object itself.
    pub field: String,
    /// The values that broke the rule, e.g. `30 > 20`; empty when the message says it all.
    pub values: String,
}

impl Broken {
    /// The rule broke at `field` (relative to the rule's object) because of `values`.
    pub fn at(field: impl Into<String>, values: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            values: values.into(),
        }
    }
}

impl<T: ?Sized> From<&CelRule<T>> for kube::core::Rule {
    fn from(rule: &CelRule<T>) -> Self {
        Self::new(rule.text.expression).message(rule.text.message)
    }
}
