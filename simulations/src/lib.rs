//! Rollout simulations: synthetic canaries (healthy, erroring, slow, flaky, low-traffic) run
//! through the rollout controller's real state machine and judge, to report how fast bad
//! versions are caught and how often good ones are wrongly rolled back. Empty until the rollout
//! controller's judge exists.
