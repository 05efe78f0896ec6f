//! What the gateway remembers: sandbox rows in SQLite ([`store`]).

pub mod store;
