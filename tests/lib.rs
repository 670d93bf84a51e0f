//! Shared fixtures for kiln integration tests.
