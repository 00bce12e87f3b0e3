//! Rollout specification and progress types (owned by the rollout engine work).
