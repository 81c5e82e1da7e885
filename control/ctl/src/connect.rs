//! Reaching the daemon: its Unix socket, or TCP with or without TLS, and the bearer token.

use std::net::SocketAddr;
use std::path::Path;

use xlb_api::server::{self, BearerToken, Client, ClientTls, Listen};

use crate::{invalid, Cli, Failure, Res};

/// The bearer token: `--token-file`, else `XLB_TOKEN`; `--token` is refused.
fn token(cli: &Cli) -> Res<Option<String>> {
    if cli.token.is_some() {
        return Err(invalid(
            "--token is refused: a token on the command line is visible to every user in `ps`. \
             Put it in a file only you can read and pass --token-file FILE, or set XLB_TOKEN",
        ));
    }
    if let Some(path) = &cli.token_file {
        let t = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("--token-file {}: {e}", path.display())))?;
        let t = t.trim();
        if t.is_empty() {
            return Err(invalid(format!(
                "--token-file {}: the file is empty",
                path.display()
            )));
        }
        return Ok(Some(t.to_string()));
    }
    Ok(std::env::var("XLB_TOKEN").ok().filter(|t| !t.is_empty()))
}

fn read_pem(flag: &str, path: &Path) -> Res<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))
}

/// TLS settings when any is given (`None`: no --tls-* option).
fn client_tls(cli: &Cli) -> Res<Option<ClientTls>> {
    if cli.tls_ca.is_none() && cli.tls_cert.is_none() && cli.tls_server_name.is_none() {
        return Ok(None);
    }
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => Some((read_pem("--tls-cert", c)?, read_pem("--tls-key", k)?)),
        _ => None,
    };
    Ok(Some(ClientTls {
        ca_pem: cli
            .tls_ca
            .as_deref()
            .map(|p| read_pem("--tls-ca", p))
            .transpose()?,
        identity,
        server_name: cli.tls_server_name.clone(),
    }))
}

/// A client of the daemon that `cli` names.
pub async fn connect(cli: &Cli) -> Res<Client> {
    let token =
        BearerToken::new(token(cli)?.as_deref()).map_err(|s| invalid(s.message().to_string()))?;
    let tls = client_tls(cli)?;
    let channel = match &cli.addr {
        None => {
            if tls.is_some() {
                return Err(invalid(
                    "the --tls-* options need a TCP daemon (--addr https://HOST:PORT); the Unix \
                     socket has no TLS",
                ));
            }
            let p = &cli.socket;
            server::channel(&Listen::Unix(p.clone()))
                .await
                .map_err(|e| {
                    Failure::Other(format!("cannot connect to xlbd at {}: {e}", p.display()))
                })?
        }
        Some(a) => tcp(a, tls).await?,
    };
    Ok(server::client(channel, token))
}

/// A channel to `a`: `HOST:PORT`, `http://HOST:PORT`, or `https://HOST:PORT` (TLS, also
/// implied by `tls`).
async fn tcp(a: &str, tls: Option<ClientTls>) -> Res<tonic::transport::Channel> {
    let (tls_scheme, hostport) = if let Some(rest) = a.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = a.strip_prefix("http://") {
        if tls.is_some() {
            return Err(invalid(format!(
                "--addr {a:?} is plaintext but --tls-* options were given; use https://"
            )));
        }
        (false, rest)
    } else {
        (false, a)
    };
    let hostport = hostport.trim_end_matches('/');
    if tls_scheme || tls.is_some() {
        let uri = format!("https://{hostport}");
        return server::channel_tls(&uri, &tls.unwrap_or_default())
            .await
            .map_err(|e| {
                Failure::Other(format!(
                    "cannot connect to xlbd at {uri}: {}",
                    server::error_chain(&e)
                ))
            });
    }
    let addr: SocketAddr = tokio::net::lookup_host(hostport)
        .await
        .ok()
        .and_then(|mut i| i.next())
        .ok_or_else(|| invalid(format!("--addr = {a:?}: not a host:port that resolves")))?;
    server::channel(&Listen::Tcp(addr))
        .await
        .map_err(|e| Failure::Other(format!("cannot connect to xlbd at {addr}: {e}")))
}
