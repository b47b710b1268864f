//! `parley-gateway`: one gateway of a Parley cluster (see `--help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    parley_gateway::cli::run(std::env::args_os()).await
}
