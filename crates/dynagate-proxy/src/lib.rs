//! dynagate's data plane and the control plane that feeds it.

pub mod control;
pub mod routing;
pub mod runtime;

pub use control::{ControlError, Controller, Outcome, ServerStatus, UpstreamStatus};
