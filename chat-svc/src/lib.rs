//! `parley-chat`, one chat-service replica of a Parley cluster: the domain
//! core (`parley-core`) on PostgreSQL (`parley-store`), Redis
//! (`parley-redis`) and RabbitMQ (`parley-amqp`), served to gateways over
//! internal gRPC and to the app's backend over the admin gRPC API. The chat
//! rules are not here: this crate wires adapters to the core and speaks
//! gRPC.

pub mod admin;
pub mod cli;
pub mod internal;

use parley_core::ChatError;

/// The gRPC status a chat error is answered with: the Parley error code in
/// the metadata, a client-safe message (storage details are logged, not
/// sent).
pub fn status(e: ChatError) -> tonic::Status {
    parley_proto::grpc::status(e.code(), e.client_message())
}
