//! Parley's Kubernetes operator: the `ChatCluster` resource, the pure
//! desired-state, scaling and drain logic, and the controller that applies
//! them, with leader election on a Lease.

pub mod controller;
pub mod crd;
pub mod desired;
pub mod drains;
pub mod leader;
pub mod metrics;
pub mod publish;
pub mod rebalance;
pub mod routing;
pub mod scaling;
pub mod simulate;
pub mod status;
