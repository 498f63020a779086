//! Errors as people read them. A transport error's own message often hides why it failed (a
//! refused connection, a certificate that did not verify), so where an error becomes text, in
//! a log line, a proxy's error header or a status message, it is written with its causes.

/// An error with its causes, `outer: inner: innermost`. A cause whose text the message so far
/// already ends with is left out, since some layers repeat their cause in their own message.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !out.ends_with(&cause_text) {
            out.push_str(": ");
            out.push_str(&cause_text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    /// Repeats its cause in its own message, as some client errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("connect failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn error_chains_name_every_cause_once() {
        let inner = std::io::Error::other("peer presented identity a, expected b");
        assert_eq!(
            chain(&Outer(inner)),
            "error sending request: peer presented identity a, expected b"
        );
        let inner = std::io::Error::other("connection refused");
        assert_eq!(
            chain(&Outer(std::io::Error::other(Repeats(inner)))),
            "error sending request: connect failed: connection refused"
        );
    }
}
