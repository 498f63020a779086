//! PID files for the supervised processes, so a `mesh up` that was killed outright (SIGKILL, a
//! power cut of the terminal) leaves nothing running behind for long.
//!
//! Every app and sidecar the supervisor starts gets `<state>/run/<pid>.pid`, holding the
//! process's start time (field 22 of `/proc/<pid>/stat`) and what it is. A clean stop removes
//! the file. The next `mesh up` on the same state directory stops whatever is still listed
//! before it starts anything: left alone, an orphaned sidecar would re-register its old
//! instance with the new control plane and take traffic. The start time guards against a PID
//! the kernel has since given to an unrelated process.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};

/// How long a left-over process gets to exit after SIGTERM before SIGKILL.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// The directory of PID files.
#[derive(Clone, Debug)]
pub struct PidFiles {
    dir: PathBuf,
}

impl PidFiles {
    /// PID files under `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, pid: u32) -> PathBuf {
        self.dir.join(format!("{pid}.pid"))
    }

    /// Records a process the supervisor just started. Failing to record is logged, not fatal:
    /// the process is supervised either way.
    pub fn record(&self, pid: Option<u32>, what: &str) {
        let Some(pid) = pid else { return };
        let Some(start) = start_time(pid) else { return };
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(self.path(pid), format!("{start} {what}\n")));
        if let Err(e) = written {
            tracing::warn!(pid, error = %e, "cannot write a PID file in {}", self.dir.display());
        }
    }

    /// Forgets a process that has exited.
    pub fn forget(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            let _ = std::fs::remove_file(self.path(pid));
        }
    }

    /// Stops every listed process that is still the one that was recorded, and removes the
    /// files. Returns what was stopped.
    pub async fn reap(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut alive = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some((pid, what)) = still_running(&path) {
                if let Some(p) = raw(pid) {
                    let _ = kill_process(p, Signal::TERM);
                }
                alive.push((pid, what));
            }
            let _ = std::fs::remove_file(&path);
        }
        let deadline = Instant::now() + REAP_GRACE;
        while alive.iter().any(|(pid, _)| exists(*pid)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (pid, _) in &alive {
            if exists(*pid)
                && let Some(p) = raw(*pid)
            {
                let _ = kill_process(p, Signal::KILL);
            }
        }
        alive
            .into_iter()
            .map(|(pid, what)| format!("{what} (pid {pid})"))
            .collect()
    }
}

/// The PID and description in a PID file, when that process still runs.
fn still_running(path: &Path) -> Option<(u32, String)> {
    let pid: u32 = path.file_stem()?.to_str()?.parse().ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let (start, what) = text.trim().split_once(' ')?;
    (start_time(pid)? == start.parse::<u64>().ok()?).then(|| (pid, what.to_string()))
}

fn raw(pid: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(pid).ok()?)
}

fn exists(pid: u32) -> bool {
    // A zombie has no start time worth killing; /proc keeps it until its parent (gone) is
    // replaced by init, which reaps it at once.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reaps_a_recorded_process_and_skips_a_reused_pid() {
        let dir = tempfile::tempdir().unwrap();
        let pids = PidFiles::new(dir.path().join("run"));
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        pids.record(Some(child.id()), "sleep 60");
        // A file whose start time does not match its PID's: the PID was reused.
        let me = std::process::id();
        std::fs::write(pids.path(me), "1 not me\n").unwrap();

        let reaped = pids.reap().await;
        assert_eq!(reaped, vec![format!("sleep 60 (pid {})", child.id())]);
        let status = child.wait().unwrap();
        assert!(!status.success(), "sleep was not stopped: {status}");
        assert!(
            std::fs::read_dir(dir.path().join("run"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn reads_the_start_time_past_a_command_name_with_spaces() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }
}
