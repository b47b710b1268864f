//! `parley-operator`: `crd` prints the CustomResourceDefinition.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "parley-operator", version, about = "The Parley operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ChatCluster CustomResourceDefinition as YAML.
    Crd,
}

fn main() {
    match Cli::parse().command {
        Command::Crd => print!("{}", parley_operator::crd::crd_yaml()),
    }
}
