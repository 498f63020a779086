//! Workload leases: a sidecar registers its workload and keeps the lease alive with heartbeats;
//! a workload that stops heartbeating drops out of its service's endpoints after the TTL, and
//! one that shuts down cleanly deregisters so it drops out at once.
//!
//! Every lease belongs to the identity that registered it (the SPIFFE ID of the client
//! certificate the registration came with): only that identity may heartbeat or delete it, or
//! replace it by registering the same service and address again.
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
    owner: String,
    expires: Instant,
}

/// Why a lease call was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No such lease: it never existed, expired, or was deleted (register again).
    #[error("lease {0:?} does not exist or expired")]
    Unknown(String),
    /// The lease belongs to another identity.
    #[error("lease {id:?} was registered by {owner}, not by {caller}")]
    NotOwner {
        /// The lease.
        id: String,
        /// Who registered it.
        owner: String,
        /// Who asked.
        caller: String,
    },
    /// Another identity holds a live lease for the same service and address.
    #[error(
        "{service} at {addr} is registered by {owner}, not by {caller}; it is free again once \
         that lease is deleted or expires"
    )]
    Taken {
        /// The service.
        service: String,
        /// The address.
        addr: String,
        /// Who holds it.
        owner: String,
        /// Who asked.
        caller: String,
    },
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

    /// Registers a workload for `owner` under a new lease id. A workload that registers again
    /// at the same service and address (a restarted sidecar) replaces its old lease, whose id is
    /// returned second so its endpoint can be withdrawn; a live lease of another owner there is
    /// not replaced.
    pub fn register(
        &mut self,
        id: String,
        registration: WorkloadRegistration,
        owner: &str,
        now: Instant,
    ) -> Result<(WorkloadLease, Option<String>), LeaseError> {
        let existing = self.leases.iter().find(|(_, l)| {
            l.registration.service == registration.service
                && l.registration.addr == registration.addr
        });
        let replaced = match existing {
            Some((_, l)) if l.owner != owner && l.expires > now => {
                return Err(LeaseError::Taken {
                    service: registration.service.to_string(),
                    addr: registration.addr.to_string(),
                    owner: l.owner.clone(),
                    caller: owner.to_string(),
                });
            }
            Some((id, _)) => Some(id.clone()),
            None => None,
        };
        if let Some(old) = &replaced {
            self.leases.remove(old);
        }
        self.leases.insert(
            id.clone(),
            Lease {
                registration,
                owner: owner.to_string(),
                expires: now + self.ttl,
            },
        );
        Ok((
            WorkloadLease {
                id,
                ttl_seconds: self.ttl.as_secs().max(1),
            },
            replaced,
        ))
    }

    /// The live lease `id`, if `caller` owns it.
    fn owned(&mut self, id: &str, caller: &str, now: Instant) -> Result<&mut Lease, LeaseError> {
        match self.leases.get_mut(id) {
            Some(lease) if lease.expires > now => {
                if lease.owner == caller {
                    Ok(lease)
                } else {
                    Err(LeaseError::NotOwner {
                        id: id.to_string(),
                        owner: lease.owner.clone(),
                        caller: caller.to_string(),
                    })
                }
            }
            _ => Err(LeaseError::Unknown(id.to_string())),
        }
    }

    /// Extends a lease `caller` owns.
    pub fn heartbeat(&mut self, id: &str, caller: &str, now: Instant) -> Result<(), LeaseError> {
        let ttl = self.ttl;
        let lease = self.owned(id, caller, now)?;
        lease.expires = now + ttl;
        Ok(())
    }

    /// Ends a lease `caller` owns at once (a workload shutting down).
    pub fn remove(&mut self, id: &str, caller: &str, now: Instant) -> Result<(), LeaseError> {
        self.owned(id, caller, now)?;
        self.leases.remove(id);
        Ok(())
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
            admin_addr: None,
            deployment: None,
            pod: None,
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
    const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

    fn unknown(id: &str) -> Result<(), LeaseError> {
        Err(LeaseError::Unknown(id.into()))
    }

    #[test]
    fn leases_expire_without_heartbeats() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut leases = Leases::new(ttl);
        let (a, _) = leases
            .register("a".into(), mk_registration("127.0.0.1:1"), WEB, t0)
            .unwrap();
        leases
            .register("b".into(), mk_registration("127.0.0.1:2"), WEB, t0)
            .unwrap();
        assert_eq!(a.ttl_seconds, 10);
        assert_eq!(
            leases.heartbeat("a", WEB, t0 + Duration::from_secs(8)),
            Ok(())
        );
        assert_eq!(leases.expire(t0 + Duration::from_secs(11)), ["b"]);
        assert_eq!(
            leases.heartbeat("b", WEB, t0 + Duration::from_secs(11)),
            unknown("b")
        );
        assert!(leases.get("a").is_some());
        assert_eq!(leases.expire(t0 + Duration::from_secs(19)), ["a"]);
        assert_eq!(leases.heartbeat("zzz", WEB, t0), unknown("zzz"));
    }

    #[test]
    fn re_registration_replaces_the_old_lease() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(10));
        leases
            .register("a".into(), mk_registration("127.0.0.1:1"), WEB, t0)
            .unwrap();
        let (_, replaced) = leases
            .register("b".into(), mk_registration("127.0.0.1:1"), WEB, t0)
            .unwrap();
        assert_eq!(replaced.as_deref(), Some("a"));
        assert!(leases.get("a").is_none());
        assert!(new_lease_id() != new_lease_id());
    }

    #[test]
    fn removed_leases_are_gone_at_once() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(60));
        leases
            .register("a".into(), mk_registration("127.0.0.1:1"), WEB, t0)
            .unwrap();
        leases
            .register("b".into(), mk_registration("127.0.0.1:2"), WEB, t0)
            .unwrap();
        assert_eq!(leases.remove("a", WEB, t0), Ok(()));
        assert_eq!(leases.remove("a", WEB, t0), unknown("a"), "a second delete");
        assert!(leases.get("a").is_none());
        assert_eq!(leases.heartbeat("a", WEB, t0), unknown("a"));
        assert!(leases.get("b").is_some());
        assert_eq!(leases.expire(t0 + Duration::from_secs(61)), ["b"]);
    }

    #[test]
    fn only_the_owner_may_heartbeat_delete_or_replace_a_lease() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut leases = Leases::new(ttl);
        leases
            .register("a".into(), mk_registration("127.0.0.1:1"), WEB, t0)
            .unwrap();
        let not_owner = Err(LeaseError::NotOwner {
            id: "a".into(),
            owner: WEB.into(),
            caller: OTHER.into(),
        });
        assert_eq!(leases.heartbeat("a", OTHER, t0), not_owner);
        assert_eq!(leases.remove("a", OTHER, t0), not_owner);
        let taken = leases
            .register("b".into(), mk_registration("127.0.0.1:1"), OTHER, t0)
            .unwrap_err();
        assert!(
            matches!(&taken, LeaseError::Taken { owner, .. } if owner == WEB),
            "{taken}"
        );
        assert!(leases.get("a").is_some() && leases.get("b").is_none());
        // Once the owner's lease has run out, the address is free for anyone.
        let (_, replaced) = leases
            .register("b".into(), mk_registration("127.0.0.1:1"), OTHER, t0 + ttl)
            .unwrap();
        assert_eq!(replaced.as_deref(), Some("a"));
        assert_eq!(leases.heartbeat("b", OTHER, t0 + ttl), Ok(()));
    }
}
