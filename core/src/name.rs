//! [`Name`]: the immutable, shared string the proxy API's names are held in (service names and
//! namespaces, rule names, workload identities and owners).
//!
//! A proxy keeps every route table and endpoint list discovery gives it for as long as it runs,
//! and the same few strings recur across them: a namespace in every service reference of it, one
//! identity in every endpoint of a workload, a backend's name in its route, its endpoint list and
//! the address index. As `String`s each copy was its own allocation; with 10,000 services that
//! was about a dozen small allocations per service. A `Name` is a reference-counted `str`:
//! cloning one shares it, and names decoded from the wire are interned (see [`Name::intern`]),
//! so equal names decoded apart share one allocation too.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable string, cheap to clone (a reference count), compared, ordered and hashed as the
/// `str` it holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    /// The name, shared with an equal name interned before if there is one. Decoding interns;
    /// [`From`] does not (a name built per request is dropped with the request, and interning
    /// it would only add a lock).
    pub fn intern(s: &str) -> Self {
        INTERNED.intern(s)
    }

    /// The name as a `str`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Forgets the names interned so far, and frees the set that held them (at 20,000 names,
    /// 0.56 MB). Names already decoded stay shared with each other; names decoded later are not
    /// shared with them. For a process that has decoded what it will hold for good, such as a
    /// proxy after its static config.
    pub fn release_interned() {
        INTERNED.release();
    }
}

/// The names decoded so far that something still holds. Entries nobody else holds are dropped
/// whenever the set has doubled since it was last swept, so names that come and go (services
/// deleted, workloads replaced) cost at most twice the live set.
struct Interned {
    set: LazyLock<Mutex<Swept>>,
}

struct Swept {
    names: HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Swept {
    fn new() -> Self {
        Self {
            names: HashSet::new(),
            sweep_at: FIRST_SWEEP,
        }
    }
}

/// Fewest entries before the first sweep.
const FIRST_SWEEP: usize = 1024;

static INTERNED: Interned = Interned::new();

impl Interned {
    const fn new() -> Self {
        Self {
            set: LazyLock::new(|| Mutex::new(Swept::new())),
        }
    }

    fn release(&self) {
        *self.set.lock().unwrap_or_else(PoisonError::into_inner) = Swept::new();
    }

    fn intern(&self, s: &str) -> Name {
        let mut swept = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = swept.names.get(s) {
            return Name(known.clone());
        }
        if swept.names.len() >= swept.sweep_at {
            swept.names.retain(|n| Arc::strong_count(n) > 1);
            swept.sweep_at = (swept.names.len() * 2).max(FIRST_SWEEP);
        }
        let name: Arc<str> = Arc::from(s);
        swept.names.insert(name.clone());
        Name(name)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .names
            .len()
    }
}

impl Default for Name {
    fn default() -> Self {
        Self::from("")
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the `str`, so that maps keyed by names can be looked up by `&str`.
        (*self.0).hash(state);
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Self(Arc::from(s.as_str()))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl From<Name> for Arc<str> {
    fn from(n: Name) -> Self {
        n.0
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NameVisitor)
    }
}

/// Decodes a name from the decoder's own buffer when it can (no temporary `String`), interned.
struct NameVisitor;

impl serde::de::Visitor<'_> for NameVisitor {
    type Value = Name;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name, E> {
        Ok(Name::intern(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_names_share_one_allocation_and_compare_as_strings() {
        let a: Name = serde_json::from_str("\"interned-once\"").unwrap();
        let b: Name = serde_json::from_str("\"interned-once\"").unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, "interned-once");
        assert_eq!(a, Name::from("interned-once"));
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"interned-once\"");
        // Names built with From are not interned, and still equal.
        assert!(!Arc::ptr_eq(&Name::from("interned-once").0, &a.0));
        // Looked up by &str in a map keyed by names.
        let set: HashSet<Name> = [a].into_iter().collect();
        assert!(set.contains("interned-once"));
        // An escaped string (not borrowable from the input) decodes too.
        let c: Name = serde_json::from_str("\"interned\\u002donce\"").unwrap();
        assert!(Arc::ptr_eq(&c.0, &b.0));
    }

    #[test]
    fn released_names_stay_valid_and_later_ones_are_not_shared_with_them() {
        // A set of its own: the process-wide one is shared with the other tests.
        let interned = Interned::new();
        let before = interned.intern("released");
        assert!(Arc::ptr_eq(&interned.intern("released").0, &before.0));
        interned.release();
        assert_eq!(interned.len(), 0);
        assert_eq!(before, "released");
        let after = interned.intern("released");
        assert!(!Arc::ptr_eq(&after.0, &before.0));
        // Interning goes on as before from the new set.
        assert!(Arc::ptr_eq(&interned.intern("released").0, &after.0));
    }

    #[test]
    fn names_nobody_holds_are_swept_once_the_set_doubles() {
        let held: Vec<Name> = (0..10)
            .map(|i| Name::intern(&format!("held-{i}")))
            .collect();
        for i in 0..(FIRST_SWEEP * 8) {
            drop(Name::intern(&format!("dropped-{i}")));
        }
        // Every sweep left at most the held names and what other tests hold; the set never
        // grew past twice what was live at the last sweep, and the floor of the first sweep.
        assert!(INTERNED.len() <= FIRST_SWEEP * 2, "{}", INTERNED.len());
        let again = Name::intern("held-3");
        assert!(Arc::ptr_eq(&again.0, &held[3].0));
    }
}
