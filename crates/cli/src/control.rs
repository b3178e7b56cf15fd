//! The running node's control endpoint: how commands reach the process that owns a library.
//!
//! Protocol: TCP on a loopback address, one request per connection. The client sends one line of
//! JSON, `{"token": "...", "request": {...}}` ([`crate::ops::Request`]), and reads one line back:
//! `{"ok": {...}}` ([`crate::views::Reply`]) or `{"error": "..."}`; then the connection closes.
//! The token holds 244 random bits from the operating system's generator, written with the address
//! to `DIR/control.json`, readable by the owner only (0600): whoever can read that file could
//! edit the library file directly anyway, and nobody else can talk to the node. The node answers
//! nothing to a wrong token but an error, and compares tokens in constant time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{CliError, Context};
use crate::home::{Home, write_private};
use crate::ops::{Device, Request};
use crate::views::Reply;

/// The longest request line accepted: 1 MiB, far above any request (paths and names), so that
/// a client cannot make the node buffer without bound.
const MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// How long the node waits for a client's request line: 10 s. A command sends it right after
/// connecting; a connection that sends nothing is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a command waits to connect: 5 s, on loopback a refused or silent port means no node
/// listens there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a command waits for the answer: 10 minutes. Indexing a million files takes well
/// under a minute; a node that does not answer by then is stuck, and the user is told.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// What `control.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ControlInfo {
    pub(crate) address: SocketAddr,
    pub(crate) token: String,
    pub(crate) pid: u32,
}

impl ControlInfo {
    /// Reads the device's control file, if there is one.
    pub(crate) fn read(home: &Home) -> Option<ControlInfo> {
        let text = std::fs::read_to_string(home.control_path()).ok()?;
        serde_json::from_str(&text).ok()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    token: String,
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(Reply),
    Error(String),
}

/// A fresh token: two version-4 UUIDs from the operating system's random generator (244 random
/// bits), as 64 hex characters.
pub(crate) fn new_token() -> String {
    let mut token = String::with_capacity(64);
    for _ in 0..2 {
        token.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    token
}

/// Equality that takes as long for every pair of tokens of the same length.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The node's side: a listener on loopback and the token it expects.
pub(crate) struct ControlServer {
    listener: TcpListener,
    token: String,
}

impl ControlServer {
    /// Binds a free port on loopback and writes `control.json`.
    pub(crate) async fn start(home: &Home) -> Result<(Self, SocketAddr), CliError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context(|| "cannot open the control endpoint".to_owned())?;
        let address = listener.local_addr().context(|| "control endpoint".to_owned())?;
        let info = ControlInfo { address, token: new_token(), pid: std::process::id() };
        let text = serde_json::to_string_pretty(&info).context(|| "control file".to_owned())?;
        write_private(&home.control_path(), text.as_bytes())?;
        Ok((Self { listener, token: info.token }, address))
    }

    /// Answers requests with `device` until `stop` resolves; then waits for the requests in
    /// progress to finish.
    pub(crate) async fn serve(self, device: Arc<Device>, stop: impl Future<Output = ()>) {
        let token = Arc::new(self.token);
        let mut running = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                accepted = self.listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (device, token) = (device.clone(), token.clone());
                    running.spawn(async move { answer(stream, &device, &token).await });
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        drop(self.listener);
        while running.join_next().await.is_some() {}
    }
}

async fn answer(stream: TcpStream, device: &Device, token: &str) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let received = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let answer = match received {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Envelope>(&line) {
            Ok(envelope) if same_token(&envelope.token, token) => {
                tracing::debug!(request = ?envelope.request, "control request");
                match device.execute(envelope.request).await {
                    Ok(reply) => Answer::Ok(reply),
                    Err(error) => Answer::Error(error.one_line()),
                }
            }
            Ok(_) => {
                tracing::warn!("control request with a wrong token refused");
                Answer::Error("wrong control token".to_owned())
            }
            Err(error) => Answer::Error(format!("malformed control request: {error}")),
        },
        _ => return,
    };
    if let Ok(mut text) = serde_json::to_string(&answer) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
        let _ = write.shutdown().await;
    }
}

/// Sends `request` to the node described by `info` and returns its reply. `Ok(None)` if nothing
/// answers at that address (a node that just stopped, or is still starting).
pub(crate) async fn call(info: &ControlInfo, request: &Request) -> Result<Option<Reply>, CliError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(info.address)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) | Err(_) => return Ok(None),
    };
    let (read, mut write) = stream.into_split();
    let envelope = Envelope { token: info.token.clone(), request: request.clone() };
    let mut text = serde_json::to_string(&envelope).context(|| "control request".to_owned())?;
    text.push('\n');
    if write.write_all(text.as_bytes()).await.is_err() {
        return Ok(None);
    }
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    match tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err(CliError::msg(format!(
            "the node (pid {}) did not answer within {} s",
            info.pid,
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(Err(error)) => Err(CliError::msg(format!("the node's answer was cut off: {error}"))),
        Ok(Ok(0)) => {
            Err(CliError::msg("the node closed the connection without answering (is it stopping?)"))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Ok(reply)) => Ok(Some(reply)),
            Ok(Answer::Error(message)) => Err(CliError::Message(message)),
            Err(error) => Err(CliError::msg(format!("malformed answer from the node: {error}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_compared_exactly() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &b));
        assert!(!same_token(&a, &a[..63]));
    }

    #[test]
    fn answers_round_trip_as_one_json_line() {
        let answer = Answer::Error("no tag is named \"x\"".into());
        let text = serde_json::to_string(&answer).unwrap();
        assert!(!text.contains('\n'));
        assert!(
            matches!(serde_json::from_str::<Answer>(&text).unwrap(), Answer::Error(m) if m.contains("no tag"))
        );
    }
}
