//! The conformance suite every [`Backend`](super::Backend) must pass.
