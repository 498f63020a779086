//! The proxy's runtime: how many threads carry its traffic.
//!
//! A sidecar shares its node (or its pod's CPU limit) with the app it serves, so it sizes its
//! runtime to the cores it may use rather than to the node's: [`ENV_CORES`] when set, else the
//! parallelism the process is allowed (`std::thread::available_parallelism`, which reads the
//! cgroup CPU quota and the affinity mask), as Linkerd sizes its proxy to its CPU limit.
//!
//! One core gets a `current_thread` runtime: every task runs on the thread that polls the
//! sockets, so a request's hops (accept, route, send, answer) never wake another thread. The
//! work-stealing runtime pays futex wake-ups and cross-thread handoffs on every request, which
//! profiles of the proxy pair showed as a fifth of its CPU; it only pays off when the proxy
//! really has more than one core to spread over. Admin and control-plane traffic share the
//! runtime: they are a few requests a second beside the data path.

use std::num::NonZeroUsize;

use mesh_core::config::{ConfigError, Env};

/// Worker threads for the proxy's runtime (a whole number, at least 1); `1` runs everything on
/// one thread. Unset: the cores the process may use (its cgroup CPU limit, rounded up, or the
/// CPUs it may run on).
pub const ENV_CORES: &str = "MESH_PROXY_CORES";

/// The proxy's worker count: [`ENV_CORES`], or `available` (what the process may use) when
/// unset.
pub fn cores(env: &impl Env, available: NonZeroUsize) -> Result<NonZeroUsize, ConfigError> {
    let Some(value) = env.var(ENV_CORES).filter(|v| !v.trim().is_empty()) else {
        return Ok(available);
    };
    value
        .trim()
        .parse::<NonZeroUsize>()
        .map_err(|_| ConfigError {
            name: ENV_CORES,
            value: value.clone(),
            reason: "expected a whole number of cores, at least 1".into(),
        })
}

/// The cores this process may use: its cgroup CPU limit (rounded up) or affinity mask, 1 when
/// neither can be read.
pub fn available() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// What [`build`] makes for a worker count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Everything on the calling thread.
    CurrentThread,
    /// A work-stealing pool of this many workers.
    MultiThread(NonZeroUsize),
}

impl Flavor {
    /// The runtime for `cores` worker threads.
    pub fn for_cores(cores: NonZeroUsize) -> Self {
        if cores.get() == 1 {
            Self::CurrentThread
        } else {
            Self::MultiThread(cores)
        }
    }
}

impl std::fmt::Display for Flavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CurrentThread => f.write_str("current_thread"),
            Self::MultiThread(n) => write!(f, "multi_thread({n} workers)"),
        }
    }
}

/// A Tokio runtime of `flavor`, with I/O and time enabled.
pub fn build(flavor: Flavor) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread(workers) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers.get());
            b
        }
    };
    builder.enable_all().thread_name("mesh-proxy").build()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(ENV_CORES.to_string(), value.to_string())])
    }

    fn n(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).unwrap()
    }

    #[test]
    fn unset_uses_what_the_process_may_use() {
        assert_eq!(cores(&BTreeMap::new(), n(3)), Ok(n(3)));
        assert_eq!(cores(&env(" "), n(3)), Ok(n(3)));
        assert_eq!(cores(&env("2"), n(8)), Ok(n(2)));
    }

    #[test]
    fn zero_or_garbage_names_the_variable() {
        for bad in ["0", "-1", "two", "1.5"] {
            let e = cores(&env(bad), n(2)).unwrap_err();
            assert_eq!(e.name, ENV_CORES);
            assert_eq!(e.value, bad);
            assert!(e.to_string().contains("at least 1"), "{e}");
        }
    }

    #[test]
    fn one_core_runs_on_the_calling_thread() {
        assert_eq!(Flavor::for_cores(n(1)), Flavor::CurrentThread);
        assert_eq!(Flavor::for_cores(n(4)), Flavor::MultiThread(n(4)));
        let rt = build(Flavor::CurrentThread).unwrap();
        let caller = std::thread::current().id();
        // A spawned task runs on the thread that blocks on the runtime, not on a worker.
        let ran_on =
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_eq!(ran_on.unwrap(), caller);
        let rt = build(Flavor::MultiThread(n(2))).unwrap();
        let ran_on =
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_ne!(ran_on.unwrap(), caller);
    }
}
