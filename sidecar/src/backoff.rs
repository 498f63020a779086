//! Doubling waits between attempts to reach the control plane, as certification and
//! registration both retry: a control plane that is away is asked again soon, then less and
//! less often, and a success starts over.

use std::time::Duration;

/// First wait after a failed call; it doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between attempts while the control plane is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Doubling waits between attempts, from [`MIN_BACKOFF`] to [`MAX_BACKOFF`].
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8)
            .map(|_| u64::try_from(b.next_wait().as_millis()).unwrap())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_wait(), MIN_BACKOFF);
    }
}
