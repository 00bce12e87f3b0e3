//! The control socket protocol: one JSON line from the client, one JSON line back, then close.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"reply":"status","version":"1.0.0","pid":41,"listen":"127.0.0.1:8080","draining":false}
//! -> {"cmd":"handover","version":"1.0.1"}
//! <- {"reply":"handed_over","from":"1.0.0","version":"1.0.1","pid":57,"listen":"127.0.0.1:8080"}
//! <- {"reply":"error","message":"..."}
//! ```
//!
//! The `handed_over` reply is sent only once the successor is serving and the old process has
//! stopped accepting, so from then on every new connection reaches the successor.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::Error;

/// Longest line either side accepts; a real message is under 200 bytes.
pub const MAX_LINE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Hand the listening socket to `ROOT/releases/<version>/bin/demo-service`, then drain.
    Handover {
        version: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status {
        version: String,
        pid: u32,
        listen: SocketAddr,
        draining: bool,
    },
    HandedOver {
        from: String,
        version: String,
        pid: u32,
        listen: SocketAddr,
    },
    Error {
        message: String,
    },
}

/// Sends `req` to the control socket at `path` and returns the reply, or `None` when no service
/// listens there (no socket file, or a stale one left by a process that died). The whole exchange
/// is bounded by `timeout`.
pub async fn request(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Option<Reply>, Error> {
    let err = |message: String| Error::Control {
        path: path.to_owned(),
        message,
        source: None,
    };
    let by = |message: &str| {
        let message = message.to_string();
        move |e: std::io::Error| Error::Control {
            path: path.to_owned(),
            message,
            source: Some(e.into()),
        }
    };
    let exchange = async {
        let mut stream = match UnixStream::connect(path).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(by("cannot connect")(e)),
        };
        let mut line = serde_json::to_string(req).map_err(|e| Error::Control {
            path: path.to_owned(),
            message: "cannot encode the request".into(),
            source: Some(e.into()),
        })?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(by("cannot send"))?;
        let reply = read_line(&mut stream)
            .await
            .map_err(by("cannot read the reply"))?;
        if reply.is_empty() {
            return Err(err("closed without replying".into()));
        }
        serde_json::from_str(&reply)
            .map(Some)
            .map_err(|e| Error::Control {
                path: path.to_owned(),
                message: format!("unreadable reply {reply:?}"),
                source: Some(e.into()),
            })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(err(format!("no reply within {timeout:?}"))),
    }
}

/// Reads one line (without its newline) of at most [`MAX_LINE`] bytes. An empty string means the
/// peer closed without sending anything.
pub async fn read_line<R: AsyncRead + Unpin>(reader: R) -> std::io::Result<String> {
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(reader, MAX_LINE));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.ends_with('\n') && !line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long or not terminated",
        ));
    }
    Ok(line.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Handover {
                version: "1.0.1".into()
            })
            .unwrap(),
            r#"{"cmd":"handover","version":"1.0.1"}"#
        );
        let reply = Reply::HandedOver {
            from: "1.0.0".into(),
            version: "1.0.1".into(),
            pid: 57,
            listen: "127.0.0.1:8080".parse().unwrap(),
        };
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"handed_over","from":"1.0.0","version":"1.0.1","pid":57,"listen":"127.0.0.1:8080"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), reply);
    }

    #[tokio::test]
    async fn missing_socket_means_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("none.sock");
        let r = request(&path, &Request::Status, Duration::from_secs(1)).await;
        assert!(matches!(r, Ok(None)), "{r:?}");
        // A stale socket file (bound, then its listener closed) is "not running" too.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let r = request(&path, &Request::Status, Duration::from_secs(1)).await;
        assert!(matches!(r, Ok(None)), "{r:?}");
    }

    #[tokio::test]
    async fn silent_server_times_out_with_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.sock");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let err = request(&path, &Request::Status, Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no reply within"), "{err}");
    }
}
