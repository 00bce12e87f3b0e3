//! Harness for process-level tests: locating the built binary, temp roots, process guards.
