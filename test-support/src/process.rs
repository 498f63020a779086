//! Child processes that die with their handle, and our own binaries started on port 0.
//!
//! [`ChildGuard`] owns a spawned process and its log file and kills it when dropped, so a test
//! that panics still cleans up. [`MeshProcess`] starts one of the workspace's binaries with
//! every listener on `127.0.0.1:0` and waits for its `mesh: listening <name> <addr>` lines (see
//! `mesh_core::announce`), so tests learn the real ports without racing for them.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use mesh_core::Listening;

use crate::{HarnessError, Result};

/// A running child process, killed when dropped (after a grace period, if one is set).
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
    stop_grace: Option<Duration>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out =
            File::create(log).map_err(HarnessError::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("duplicating a log file handle"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Self::spawn_configured(name, cmd, log)
    }

    fn spawn_configured(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let child = cmd.spawn().map_err(HarnessError::io(format!(
            "starting {name} ({})",
            cmd.get_program().to_string_lossy()
        )))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stop_grace: None,
        })
    }

    /// On drop, send SIGTERM and wait up to `grace` before SIGKILL. For a supervisor such as
    /// `mesh up`, whose children outlive a SIGKILL: a test that panics then still stops them.
    pub fn set_stop_grace(&mut self, grace: Duration) {
        self.stop_grace = Some(grace);
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file the process logs to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// `Err` with the exit status if the process has already exited.
    pub fn check_running(&mut self) -> std::result::Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited early with {status}", self.name)),
            Err(e) => Err(format!("cannot poll {}: {e}", self.name)),
        }
    }

    /// A [`HarnessError::NotReady`] carrying this process's log tail.
    pub fn not_ready(&self, waited: Duration, detail: impl Into<String>) -> HarnessError {
        HarnessError::NotReady {
            what: self.name.clone(),
            waited,
            detail: detail.into(),
            log: self.log.display().to_string(),
            tail: self.log_tail(30),
        }
    }

    /// Polls `probe` every 100 ms until it answers `Ok`, for at most the start-up patience; an
    /// error names why the process was not ready: it exited, or the probe's last answer.
    pub async fn wait_ready(
        &mut self,
        mut probe: impl AsyncFnMut() -> std::result::Result<(), String>,
    ) -> Result<()> {
        let waited = startup_timeout();
        let start = std::time::Instant::now();
        let mut last = String::from("not polled yet");
        while start.elapsed() < waited {
            self.check_running()
                .map_err(|e| self.not_ready(waited, e))?;
            match probe().await {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(self.not_ready(waited, last))
    }

    /// Sends SIGTERM, as Ctrl-C or a supervisor would, to ask for a graceful stop.
    pub fn terminate(&self) {
        if let Some(pid) = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    /// Waits up to `limit` for the process to exit, and returns how it exited.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Errors mean it already exited, which is what we want.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    #[allow(
        clippy::disallowed_methods,
        reason = "drop cannot await; this runs once per test, at its end or on a panic"
    )]
    fn drop(&mut self) {
        if let Some(grace) = self.stop_grace
            && let Ok(None) = self.child.try_wait()
        {
            self.terminate();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

/// The last `n` lines of a file, or a note that it could not be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The path of a binary of this workspace, next to the running test executable.
///
/// Integration tests of the crate that owns a binary should prefer
/// `env!("CARGO_BIN_EXE_<name>")`; this finds binaries of other crates, which
/// `cargo test --workspace` builds into the same target directory.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let missing = |hint: String| HarnessError::Missing {
        program: name.to_string(),
        hint,
    };
    let exe = std::env::current_exe()
        .map_err(|e| missing(format!("cannot locate the test executable: {e}")))?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .ok_or_else(|| missing(format!("unexpected test executable path {}", exe.display())))?;
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(missing(format!(
            "expected {}; build it with `cargo build --workspace --bins`",
            path.display()
        )))
    }
}

/// A builder for starting one of our binaries with its listeners on port 0.
#[derive(Debug)]
pub struct MeshBinary {
    path: PathBuf,
    via: Vec<OsString>,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    listeners: Vec<String>,
}

impl MeshBinary {
    /// Starts the binary at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            via: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            listeners: Vec::new(),
        }
    }

    /// Starts the workspace binary `name` (see [`workspace_bin`]).
    pub fn workspace(name: &str) -> Result<Self> {
        Ok(Self::new(workspace_bin(name)?))
    }

    /// Runs the binary through a command that runs its arguments, such as
    /// [`crate::netns::Netns::exec_prefix`] (`ip netns exec <name> …`); the environment is
    /// passed through it.
    pub fn via(mut self, prefix: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        self.via = prefix.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Waits for the binary to announce a listener called `name` before `run` returns.
    pub fn listener(mut self, name: &str) -> Self {
        self.listeners.push(name.to_string());
        self
    }

    /// Spawns the binary and waits until every expected listener is announced.
    pub fn run(self) -> Result<MeshProcess> {
        let name = self.path.file_name().map_or_else(
            || "binary".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("mesh-{name}-"))
            .tempdir()
            .map_err(HarnessError::io("creating a log directory"))?;
        let log = dir.path().join(format!("{name}.log"));
        let log_file =
            File::create(&log).map_err(HarnessError::io(format!("creating {}", log.display())))?;
        let stderr = log_file
            .try_clone()
            .map_err(HarnessError::io("duplicating a log handle"))?;

        let mut cmd = match self.via.split_first() {
            None => Command::new(&self.path),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.path);
                cmd
            }
        };
        cmd.args(&self.args)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = ChildGuard::spawn_configured(&name, cmd, &log)?;

        // A thread copies stdout into the log and forwards announcements; it ends at EOF, when
        // the process exits.
        let stdout = child.child.stdout.take().ok_or_else(|| HarnessError::Io {
            context: format!("reading {name}'s stdout"),
            source: std::io::Error::other("stdout was not captured"),
        })?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log_file = log_file;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log_file, "{line}");
                if let Ok(listening) = line.parse::<Listening>() {
                    let _ = tx.send(listening);
                }
            }
        });

        let waited = startup_timeout();
        let deadline = Instant::now() + waited;
        let mut addrs = BTreeMap::new();
        while !self.listeners.iter().all(|l| addrs.contains_key(l)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(l) => {
                    addrs.insert(l.name, l.addr);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                    child
                        .check_running()
                        .map_err(|e| child.not_ready(waited, e))?;
                }
                Err(_) => {
                    let missing: Vec<_> = self
                        .listeners
                        .iter()
                        .filter(|l| !addrs.contains_key(*l))
                        .collect();
                    let detail = match child.check_running() {
                        Err(e) => e,
                        Ok(()) => format!("no announcement for listeners {missing:?}"),
                    };
                    return Err(child.not_ready(waited, detail));
                }
            }
        }
        Ok(MeshProcess {
            child,
            addrs,
            _dir: dir,
        })
    }
}

/// How long components get to start: the test patience, but at least a minute, since cold
/// starts of kube-apiserver on a loaded two-core machine take tens of seconds.
pub(crate) fn startup_timeout() -> Duration {
    crate::patience().max(Duration::from_secs(60))
}

/// One of our binaries, running.
#[derive(Debug)]
pub struct MeshProcess {
    child: ChildGuard,
    addrs: BTreeMap<String, SocketAddr>,
    _dir: tempfile::TempDir,
}

impl MeshProcess {
    /// The address announced for listener `name`.
    ///
    /// # Panics
    /// When the listener was not announced; ask for it with [`MeshBinary::listener`].
    pub fn addr(&self, name: &str) -> SocketAddr {
        match self.addrs.get(name) {
            Some(addr) => *addr,
            #[allow(
                clippy::panic,
                reason = "a test asked for a listener it did not wait for"
            )]
            None => panic!(
                "listener {name:?} was not announced; announced: {:?}",
                self.addrs
            ),
        }
    }

    /// The sum of the samples of metric family `name` (a full series name such as
    /// `request_total`) whose labels contain every one of `labels` (`key="value"` strings),
    /// scraped from the process's `admin` listener; 0 when none matches.
    ///
    /// # Panics
    /// When the scrape fails.
    pub async fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        crate::metric_sum(self.addr("admin"), name, labels).await
    }

    /// Every announced listener.
    pub fn addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.addrs
    }

    /// The process handle.
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}
