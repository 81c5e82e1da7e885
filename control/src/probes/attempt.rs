//! One probe attempt: the TCP handshake, and for HTTP(S) one `GET` whose status must be in the
//! probe's accepted range (200 by default), all within the attempt's timeout.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xlb_engine::config::ProbeProtocol;

use super::tls::TlsSpec;
use super::ProbeSpec;

/// Most bytes of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// One attempt: `Ok` if healthy, else why not.
pub async fn probe_once(spec: &ProbeSpec, member: IpAddr) -> Result<(), String> {
    let addr = SocketAddr::new(member, spec.port);
    let attempt = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let host = match (&spec.tls, member) {
            (
                Some(TlsSpec {
                    server_name: Some(name),
                    ..
                }),
                _,
            ) => format!("{name}:{}", spec.port),
            (_, IpAddr::V4(a)) => format!("{a}:{}", spec.port),
            (_, IpAddr::V6(a)) => format!("[{a}]:{}", spec.port),
        };
        match (spec.protocol, &spec.tls) {
            (ProbeProtocol::Tcp, _) => Ok(()),
            (ProbeProtocol::Https, Some(tls)) => {
                let s = super::tls::connect(s, tls, member).await?;
                http_exchange(s, &spec.path, &host, spec.accept).await
            }
            _ => http_exchange(s, &spec.path, &host, spec.accept).await,
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

/// `GET path` on `s`; healthy only on a status within `accept`.
async fn http_exchange<S>(
    mut s: S,
    path: &str,
    host: &str,
    accept: (u16, u16),
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlbd-health-probe\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    s.flush()
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_STATUS_LINE {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    match http_status(&buf) {
        Some(code) if (accept.0..=accept.1).contains(&code) => Ok(()),
        Some(code) => Err(format!("HTTP status {code}")),
        None => Err("no HTTP status line in the answer".into()),
    }
}

/// The status code of an HTTP/1.x status line at the start of `buf`.
pub fn http_status(buf: &[u8]) -> Option<u16> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}
