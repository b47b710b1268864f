//! `parley-e2e-node gateway|chat|push [flags]`: the gateway's, the chat
//! service's and the push sender's command lines in one binary the e2e
//! tests can name (a binary of their own package, built with the tests'
//! features). It runs exactly the code of `parley-gateway`, `parley-chat`
//! and `parley-push`.

use std::ffi::OsString;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let role = args.next().unwrap_or_default();
    let rest: Vec<OsString> = args.collect();
    match role.to_str() {
        Some("gateway") => {
            parley_gateway::cli::run(std::iter::once(OsString::from("parley-gateway")).chain(rest))
                .await
        }
        Some("chat") => {
            parley_chat::cli::run(std::iter::once(OsString::from("parley-chat")).chain(rest)).await
        }
        Some("push") => {
            parley_push::process::run(std::iter::once(OsString::from("parley-push")).chain(rest))
                .await
        }
        _ => anyhow::bail!("usage: parley-e2e-node gateway|chat|push [flags]"),
    }
}
