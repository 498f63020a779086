//! The start-up announcement: one line per bound listener, written to stdout.
//!
//! Mesh processes accept `127.0.0.1:0` for every listener so that tests and the embedded
//! supervisor never race for ports. The kernel picks the port, so the process has to say which
//! one it got; it does so with a line `mesh: listening <name> <addr>` as soon as the socket is
//! bound. A fixed, line-oriented format keeps the supervisor independent of log formatting.

use std::{fmt, net::SocketAddr, str::FromStr};

const PREFIX: &str = "mesh: listening ";

/// A listener a process has bound, as announced on its stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listening {
    /// What the listener serves, e.g. `admin`, `outbound`, `api`.
    pub name: String,
    /// The address the kernel actually bound.
    pub addr: SocketAddr,
}

/// A line that starts like an announcement but cannot be read as one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnounceError {
    /// The line does not start with the announcement prefix.
    #[error("not a listening announcement")]
    NotAnnouncement,
    /// The name or the address is missing or malformed.
    #[error("malformed listening announcement {line:?}: expected `{PREFIX}<name> <ip:port>`")]
    Malformed {
        /// The offending line.
        line: String,
    },
}

impl Listening {
    /// Builds an announcement for `name` bound at `addr`.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            name: name.into(),
            addr,
        }
    }
}

impl fmt::Display for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{} {}", self.name, self.addr)
    }
}

impl FromStr for Listening {
    type Err = AnnounceError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let rest = line
            .trim_end()
            .strip_prefix(PREFIX)
            .ok_or(AnnounceError::NotAnnouncement)?;
        let malformed = || AnnounceError::Malformed {
            line: line.to_string(),
        };
        let (name, addr) = rest.split_once(' ').ok_or_else(malformed)?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(malformed());
        }
        let addr = addr.parse().map_err(|_| malformed())?;
        Ok(Self::new(name, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let l = Listening::new("admin", "127.0.0.1:4191".parse().unwrap());
        assert_eq!(l.to_string(), "mesh: listening admin 127.0.0.1:4191");
        assert_eq!(l.to_string().parse::<Listening>().unwrap(), l);
    }

    #[test]
    fn ipv6_and_trailing_newline() {
        let l: Listening = "mesh: listening outbound [::1]:4140\n".parse().unwrap();
        assert_eq!(l.addr, "[::1]:4140".parse().unwrap());
        assert_eq!(l.name, "outbound");
    }

    #[test]
    fn other_lines_are_not_announcements() {
        assert_eq!(
            "INFO starting".parse::<Listening>(),
            Err(AnnounceError::NotAnnouncement)
        );
    }

    #[test]
    fn malformed_announcements_are_errors() {
        for line in [
            "mesh: listening admin",
            "mesh: listening admin nowhere",
            "mesh: listening  1.2.3.4:5",
        ] {
            assert!(
                matches!(
                    line.parse::<Listening>(),
                    Err(AnnounceError::Malformed { .. })
                ),
                "{line:?} should be malformed"
            );
        }
    }
}
