//! `parley-push`: the push sender of a Parley cluster (see `--help`).

#[tokio::main]
async fn main() {
    if let Err(e) = parley_push::process::run(std::env::args_os()).await {
        eprintln!("error: {}", parley_core::redact_urls(&format!("{e:#}")));
        std::process::exit(1);
    }
}
