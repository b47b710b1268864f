//! `parley-chat`: one chat-service replica of a Parley cluster (see `--help`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    parley_chat::cli::run(std::env::args_os()).await
}
