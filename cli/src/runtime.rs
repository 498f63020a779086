//! How every command runs: on a tokio runtime of its own, with errors printed for people and
//! logs on stderr. Commands sit above this module; it imports none of them.

/// Runs `fut` to completion on a new runtime (a multi-thread one for long-running commands);
/// an error is printed as `error: ...` and gives `None`.
pub fn block_on<T>(
    multi_thread: bool,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Option<T> {
    let runtime = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let result = match runtime {
        Ok(r) => r.block_on(fut),
        Err(e) => Err(anyhow::anyhow!("starting the runtime: {e}")),
    };
    result.map_err(|e| tell(&format!("error: {e:#}"))).ok()
}

/// Logs go to stderr; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// One line to the user on stderr, written at once. `mesh up` and `mesh demo` share their output
/// with the workloads they run, and `eprintln!` writes a line in pieces, so a workload's line
/// could land inside ours (a test reading `mesh up`'s sign-in link once found `mesh:` where the
/// address should have been).
pub fn tell(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}
