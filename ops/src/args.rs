//! Flags every cluster process shares, flattened into each binary's own
//! (clap derive, `--x-y` = `PARLEY_X_Y`), so the chat service and the
//! gateways read one cluster's settings under the same names.

/// Where the shared backends are; the gateway takes the same flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Shared key on gateway-to-chat-service calls (optional; the same on both).
    #[arg(long, env = "PARLEY_INTERNAL_KEY", hide_env_values = true)]
    pub internal_key: Option<String>,
    #[arg(
        long,
        env = "PARLEY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    #[arg(
        long,
        env = "PARLEY_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Starts every Redis key and RabbitMQ name of this cluster.
    #[arg(long, env = "PARLEY_PREFIX", default_value = "parley")]
    pub prefix: String,
}
