//! Parley's Kubernetes operator: the `ChatCluster` resource, the pure
//! desired-state and scaling logic, and (next) the controller that applies
//! them.

pub mod crd;
pub mod desired;
pub mod routing;
pub mod scaling;
pub mod status;
