use clap::Parser;

fn main() {
    let _cli = pgcdc::cli::Cli::parse();
}
