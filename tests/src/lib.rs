//! Local control-plane harness for end-to-end tests (filled in by the local cluster issue).
