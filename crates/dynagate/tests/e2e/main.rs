//! End-to-end tests: the real `dynagate` binary, real backends, real sockets.

mod harness;

mod admin_errors;
mod algorithms;
mod balancing;
mod churn;
mod disk;
mod durability;
mod h2_hardening;
mod health;
mod http1;
mod lifecycle;
mod observability;
mod registry;
mod routing;
mod slow_clients;
mod streaming;
