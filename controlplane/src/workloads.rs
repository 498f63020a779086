//! Workload leases: a sidecar registers its workload and keeps the lease alive with heartbeats;
//! a workload that stops heartbeating drops out of its service's endpoints after the TTL, and
//! one that shuts down cleanly deregisters so it drops out at once.
//!
//! The table is pure (time comes in as an argument) so expiry is tested without waiting; the
//! control plane's sweeper feeds it the clock and carries expiries into the index.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use mesh_core::proxy_api::{WorkloadLease, WorkloadRegistration};

#[derive(Clone, Debug)]
struct Lease {
    registration: WorkloadRegistration,
    expires: Instant,
}

/// Live workload leases.
#[derive(Debug)]
pub struct Leases {
    ttl: Duration,
    leases: BTreeMap<String, Lease>,
}

impl Leases {
    /// An empty table whose leases last `ttl` after each heartbeat.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            leases: BTreeMap::new(),
        }
    }

    /// Registers a workload under a new lease id. A workload that registers again at the same
    /// service and address (a restarted sidecar) replaces its old lease, whose id is returned
    /// second so its endpoint can be withdrawn.
    pub fn register(
        &mut self,
        id: String,
        registration: WorkloadRegistration,
        now: Instant,
    ) -> (WorkloadLease, Option<String>) {
        let replaced = self
            .leases
            .iter()
            .find(|(_, l)| {
                l.registration.service == registration.service
                    && l.registration.addr == registration.addr
            })
            .map(|(id, _)| id.clone());
        if let Some(old) = &replaced {
            self.leases.remove(old);
        }
        self.leases.insert(
            id.clone(),
            Lease {
                registration,
                expires: now + self.ttl,
            },
        );
        (
            WorkloadLease {
                id,
                ttl_seconds: self.ttl.as_secs().max(1),
            },
            replaced,
        )
    }

    /// Extends a lease; false when it does not exist (expired or never registered).
    pub fn heartbeat(&mut self, id: &str, now: Instant) -> bool {
        match self.leases.get_mut(id) {
            Some(lease) if lease.expires > now => {
                lease.expires = now + self.ttl;
                true
            }
            _ => false,
        }
    }

    /// Ends a lease at once (a workload shutting down); false when it does not exist.
    pub fn remove(&mut self, id: &str) -> bool {
        self.leases.remove(id).is_some()
    }

    /// Removes and returns the ids of leases that expired by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.leases.remove(id);
        }
        expired
    }

    /// The registration under `id`.
    pub fn get(&self, id: &str) -> Option<&WorkloadRegistration> {
        self.leases.get(id).map(|l| &l.registration)
    }

    /// How long a lease lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// A random lease id.
pub fn new_lease_id() -> String {
    let mut b = [0u8; 12];
    // Ids only need to be unique, not secret; the clock is a fine fallback.
    if getrandom::fill(&mut b).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
        b.copy_from_slice(&nanos[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_registration(addr: &str) -> WorkloadRegistration {
        WorkloadRegistration {
            service: "web.default:80".parse().unwrap(),
            addr: addr.parse().unwrap(),
            identity: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn leases_expire_without_heartbeats() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut leases = Leases::new(ttl);
        let (a, _) = leases.register("a".into(), mk_registration("127.0.0.1:1"), t0);
        leases.register("b".into(), mk_registration("127.0.0.1:2"), t0);
        assert_eq!(a.ttl_seconds, 10);
        assert!(leases.heartbeat("a", t0 + Duration::from_secs(8)));
        assert_eq!(leases.expire(t0 + Duration::from_secs(11)), ["b"]);
        assert!(!leases.heartbeat("b", t0 + Duration::from_secs(11)));
        assert!(leases.get("a").is_some());
        assert_eq!(leases.expire(t0 + Duration::from_secs(19)), ["a"]);
        assert!(!leases.heartbeat("zzz", t0));
    }

    #[test]
    fn re_registration_replaces_the_old_lease() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(10));
        leases.register("a".into(), mk_registration("127.0.0.1:1"), t0);
        let (_, replaced) = leases.register("b".into(), mk_registration("127.0.0.1:1"), t0);
        assert_eq!(replaced.as_deref(), Some("a"));
        assert!(leases.get("a").is_none());
        assert!(new_lease_id() != new_lease_id());
    }

    #[test]
    fn removed_leases_are_gone_at_once() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(60));
        leases.register("a".into(), mk_registration("127.0.0.1:1"), t0);
        leases.register("b".into(), mk_registration("127.0.0.1:2"), t0);
        assert!(leases.remove("a"));
        assert!(!leases.remove("a"), "a second delete finds nothing");
        assert!(leases.get("a").is_none());
        assert!(!leases.heartbeat("a", t0));
        assert!(leases.get("b").is_some());
        assert_eq!(leases.expire(t0 + Duration::from_secs(61)), ["b"]);
    }
}
