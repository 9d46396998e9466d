//! End-to-end tests: the real `dynagate` binary, real backends, real sockets.

mod harness;

mod admin_errors;
mod balancing;
mod churn;
mod durability;
mod lifecycle;
mod routing;
mod streaming;
