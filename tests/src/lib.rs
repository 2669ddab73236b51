//! Shared helpers for Meridian's workspace-level integration tests.
