//! Holds no code: the integration tests live in `it/`.
