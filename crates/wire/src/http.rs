//! A minimal HTTP/1.1 endpoint for `/healthz` and `/metrics` (Prometheus text format): one
//! GET per connection, read with a size bound and a timeout, answered and closed. Bind it to a
//! loopback or management address.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What `/metrics` returns, rendered at each request.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `/healthz` ("ok") and `/metrics` (`render()`) on `listener`, for ever.
pub async fn serve_metrics(listener: TcpListener, render: Render) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split(' ');
            let (status, body) = match (parts.next(), parts.next()) {
                (Some("GET"), Some("/healthz")) => ("200 OK", "ok\n".to_string()),
                (Some("GET"), Some("/metrics")) => ("200 OK", render()),
                (Some("GET"), _) => (
                    "404 Not Found",
                    "not found: try /metrics or /healthz\n".into(),
                ),
                _ => ("405 Method Not Allowed", "only GET\n".into()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
