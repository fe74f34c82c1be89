//! stdio front door (`hangar serve --stdio`) for desktop clients: newline-delimited JSON-RPC
//! on stdin/stdout. stdout carries only JSON-RPC (logs go to stderr). Requests are served
//! concurrently; progress, logs and relayed requests are written as they happen, and list
//! changes reach the client as notifications.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::{Ctx, Gateway, Scope};
use crate::jsonrpc::{INVALID_REQUEST, Message, PARSE_ERROR, RpcError};
use crate::lines::read_line_capped;

/// Largest accepted line (16 MiB).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// Serve MCP on this process's stdin/stdout until stdin closes.
pub async fn serve(gateway: Arc<Gateway>) -> std::io::Result<()> {
    serve_on(gateway, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serve MCP on any reader/writer pair (used by tests).
pub async fn serve_on<R, W>(gateway: Arc<Gateway>, reader: R, writer: W) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(256);
    let writer_task = tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::new(writer);
        while let Some(m) = out_rx.recv().await {
            let mut line = m.to_json();
            line.push('\n');
            if w.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            if out_rx.is_empty() && w.flush().await.is_err() {
                break;
            }
        }
        let _ = w.flush().await;
    });

    // Forward list-change notifications to the client.
    let mut listen = gateway.listen();
    let note_tx = out_tx.clone();
    let notes = tokio::spawn(async move {
        while let Ok(b) = listen.recv().await {
            if let Ok(m) = serde_json::from_str::<Message>(&b.json)
                && note_tx.send(m).await.is_err()
            {
                break;
            }
        }
    });

    let mut reader = BufReader::new(reader);
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        // MAX_LINE + 1 kept bytes tell a line that is too long from one that just fits.
        let n = read_line_capped(&mut reader, &mut buf, MAX_LINE + 1).await?;
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE {
            let _ = out_tx
                .send(Message::error(
                    None,
                    RpcError::new(
                        INVALID_REQUEST,
                        format!("message longer than {MAX_LINE} bytes"),
                    ),
                ))
                .await;
            continue;
        }
        let line = trim(&buf);
        if line.is_empty() {
            continue;
        }
        let msg: Message = match serde_json::from_slice(line) {
            Ok(m) => m,
            Err(e) => {
                let _ = out_tx
                    .send(Message::error(
                        None,
                        RpcError::new(PARSE_ERROR, format!("Parse error: {e}")),
                    ))
                    .await;
                continue;
            }
        };
        let gw = gateway.clone();
        let tx = out_tx.clone();
        tokio::spawn(async move {
            let ctx = Ctx {
                scope: Scope::Aggregate,
                out: Some(tx.clone()),
                cancel_key: "stdio".to_owned(),
                // A desktop client on stdio is the local user: no auth.
                grants: None,
                caller: Arc::new(crate::ratelimit::Caller::local()),
            };
            if let Some(resp) = gw.handle(&ctx, msg).await {
                let _ = tx.send(resp).await;
            }
        });
    }
    notes.abort();
    drop(out_tx);
    // In-flight requests hold senders; the writer ends when they finish.
    let _ = writer_task.await;
    Ok(())
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}
