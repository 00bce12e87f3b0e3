//! How a command ends: its exit code and, for `--json`, the kind of error. Handlers return
//! [`Exit`] for outcomes with their own code (a rollout that failed, paused or timed out);
//! any other error is classified here by its cause.

use orch_client::ClientError;

/// An outcome with its own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    pub kind: &'static str,
    pub message: String,
}

impl Exit {
    pub fn new(code: i32, kind: &'static str, message: impl Into<String>) -> Exit {
        Exit {
            code,
            kind,
            message: message.into(),
        }
    }
}

/// The exit code and error kind of a failed command.
pub fn classify(e: &anyhow::Error) -> (i32, &'static str) {
    if let Some(x) = e.downcast_ref::<Exit>() {
        return (x.code, x.kind);
    }
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return (
                1,
                match c {
                    ClientError::Refused(_) => "refused",
                    ClientError::Unreachable { .. } => "unreachable",
                    ClientError::Tls { .. } => "tls",
                    ClientError::NoLeader { .. } => "no_leader",
                },
            );
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return (1, "io");
        }
    }
    (1, "error")
}

/// The one line an error prints: every cause once, joined by ": ", on one line.
pub fn message(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_through() {
        let e: anyhow::Error = Exit::new(5, "timeout", "gave up").into();
        assert_eq!(classify(&e), (5, "timeout"));
        let e: anyhow::Error =
            anyhow::Error::from(ClientError::Refused("no".into())).context("start the rollout");
        assert_eq!(classify(&e), (1, "refused"));
        assert_eq!(message(&e), "start the rollout: no");
        assert_eq!(classify(&anyhow::anyhow!("x")), (1, "error"));
    }
}
