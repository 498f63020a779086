//! `mesh-fuzz [--inputs N] [--seed S] [TARGET...]`: runs N inputs (default 1,000,000) through
//! each target (all by default) under a 4 GiB address-space limit, and prints a table of inputs
//! run and time taken; exits 1 naming the smallest failing input when a parser panics.

use std::process::ExitCode;
use std::time::Instant;

#[allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the table goes to stdout, failures to stderr"
)]
fn main() -> ExitCode {
    let mut inputs: u32 = 1_000_000;
    let mut seed: u64 = 0x6d65_7368;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |v: Option<String>| v.and_then(|v| v.replace('_', "").parse::<u64>().ok());
        match arg.as_str() {
            "--inputs" => match value(args.next()).and_then(|n| u32::try_from(n).ok()) {
                Some(n) => inputs = n,
                None => return usage("--inputs takes a number"),
            },
            "--seed" => match value(args.next()) {
                Some(n) => seed = n,
                None => return usage("--seed takes a number"),
            },
            name => names.push(name.to_string()),
        }
    }
    let targets: Vec<_> = mesh_fuzz::targets()
        .into_iter()
        .filter(|t| names.is_empty() || names.iter().any(|n| n == t.name))
        .collect();
    if targets.len() < names.len().max(1) && !names.is_empty() {
        let known: Vec<_> = mesh_fuzz::targets().iter().map(|t| t.name).collect();
        return usage(&format!(
            "unknown target; the targets are {}",
            known.join(", ")
        ));
    }
    if let Err(e) = mesh_fuzz::limit_memory(4 << 30) {
        eprintln!("mesh-fuzz: cannot limit the address space: {e}");
        return ExitCode::FAILURE;
    }
    // Panics are caught and reported per target; their default message would flood the output.
    std::panic::set_hook(Box::new(|_| {}));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    println!("| target | inputs | seconds | result |\n|---|---|---|---|");
    let mut failed = false;
    for target in &targets {
        let start = Instant::now();
        let report = mesh_fuzz::run(target, &dir, inputs, seed);
        let result = match &report.failure {
            None => "no panic".to_string(),
            Some((input, why)) => {
                failed = true;
                eprintln!(
                    "{}: {why}\nsmallest failing input: {:?}",
                    target.name,
                    String::from_utf8_lossy(input)
                );
                "PANIC".to_string()
            }
        };
        println!(
            "| {} | {} | {:.0} | {result} |",
            target.name,
            report.inputs,
            start.elapsed().as_secs_f64()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[allow(clippy::print_stderr, reason = "usage goes to stderr")]
fn usage(why: &str) -> ExitCode {
    eprintln!("mesh-fuzz: {why}\nusage: mesh-fuzz [--inputs N] [--seed S] [TARGET...]");
    ExitCode::from(64)
}
