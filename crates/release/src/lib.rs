//! Release store.
