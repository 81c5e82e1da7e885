//! The API on TCP: TLS, client certificates (mutual TLS), bearer tokens, and the listeners that
//! are refused at start. Certificates are made by the test (`common::pki`).

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::pki::{Pair, Pki};
use common::{Harness, BASE};
use tonic::Code;
use xlb_api::server::{self, BearerToken, ClientTls, ServerTls};
use xlb_api::{Listen, ServeError, ServeOptions};
use xlb_proto::v1 as pb;

const TOKEN: &str = "0123456789abcdef-test-token";

fn loopback() -> Listen {
    Listen::Tcp("127.0.0.1:0".parse().unwrap())
}

async fn tls_server(pki: &Pki, mutual: bool, token: Option<&str>) -> Harness {
    let tls = pki.server_tls(mutual);
    let token = token.map(str::to_string);
    Harness::start_with(BASE, move |o| {
        o.listen = loopback();
        o.tls = Some(tls);
        o.token = token;
    })
    .await
}

fn port(h: &Harness) -> u16 {
    match h.listen {
        Listen::Tcp(a) => a.port(),
        Listen::Unix(_) => unreachable!(),
    }
}

/// `ListFrontends` over TLS as `tls` and `token` allow: the frontend count, or what failed
/// (connecting or the call).
async fn list_over_tls(
    h: &Harness,
    host: &str,
    tls: &ClientTls,
    token: Option<&str>,
) -> Result<usize, String> {
    let uri = format!("https://{host}:{}", port(h));
    let channel = server::channel_tls(&uri, tls)
        .await
        .map_err(|e| format!("connect: {}", server::error_chain(&e)))?;
    let mut c = server::client(channel, BearerToken::new(token).unwrap());
    c.list_frontends(pb::ListRequest {})
        .await
        .map(|r| r.into_inner().frontends.len())
        .map_err(|s| format!("{:?}: {}", s.code(), server::error_chain(&s)))
}

async fn health_over_tls(h: &Harness, tls: &ClientTls) -> Result<(), String> {
    let uri = format!("https://localhost:{}", port(h));
    let channel = server::channel_tls(&uri, tls)
        .await
        .map_err(|e| format!("connect: {}", server::error_chain(&e)))?;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), server::error_chain(&s)))
}

#[tokio::test]
async fn tls_with_a_bearer_token() {
    let pki = Pki::new();
    let h = tls_server(&pki, false, Some(TOKEN)).await;
    let trusting = Pki::client_tls(&pki.ca, None);

    // The right CA and token, by name and by address (the certificate has both).
    for host in ["localhost", "127.0.0.1"] {
        assert_eq!(list_over_tls(&h, host, &trusting, Some(TOKEN)).await, Ok(3));
    }
    // Health needs no token.
    health_over_tls(&h, &trusting).await.unwrap();
    // No token, a wrong one.
    for token in [None, Some("0123456789abcdef-test-tokeX")] {
        let e = list_over_tls(&h, "localhost", &trusting, token)
            .await
            .unwrap_err();
        assert!(e.starts_with("Unauthenticated"), "{token:?}: {e}");
    }
    // A client that does not trust the server's CA, or expects another name.
    let distrusting = Pki::client_tls(&pki.rogue_ca, None);
    let e = list_over_tls(&h, "localhost", &distrusting, Some(TOKEN))
        .await
        .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    let other_name = ClientTls {
        server_name: Some("not-xlb.example".into()),
        ..trusting.clone()
    };
    let e = list_over_tls(&h, "localhost", &other_name, Some(TOKEN))
        .await
        .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    // Plaintext to the TLS port gets nothing.
    let addr: SocketAddr = format!("127.0.0.1:{}", port(&h)).parse().unwrap();
    let plain = match server::channel(&Listen::Tcp(addr)).await {
        Err(_) => None,
        Ok(ch) => Some(
            server::client(ch, BearerToken::new(Some(TOKEN)).unwrap())
                .list_frontends(pb::ListRequest {})
                .await,
        ),
    };
    assert!(
        !matches!(plain, Some(Ok(_))),
        "a plaintext call was answered"
    );
    h.stop().await;
}

/// A call refused in the TLS layer (not by the token check).
fn refused(e: &str) -> bool {
    !e.starts_with("Unauthenticated")
        && [
            "CertificateRequired",
            "fatal alert",
            "connection closed",
            "broken pipe",
            "reset by peer",
        ]
        .iter()
        .any(|s| e.contains(s))
}

#[tokio::test]
async fn tls_on_ipv6_loopback_verifies_the_address() {
    let pki = Pki::new();
    let tls = pki.server_tls(false);
    let h = Harness::start_with(BASE, move |o| {
        o.listen = Listen::Tcp("[::1]:0".parse().unwrap());
        o.tls = Some(tls);
        o.token = Some(TOKEN.into());
    })
    .await;
    // The target's brackets are not part of the name checked against the certificate.
    let trusting = Pki::client_tls(&pki.ca, None);
    assert_eq!(
        list_over_tls(&h, "[::1]", &trusting, Some(TOKEN)).await,
        Ok(3)
    );
    h.stop().await;
}

#[tokio::test]
async fn mutual_tls_admits_the_cas_clients_and_refuses_others() {
    let pki = Pki::new();
    let h = tls_server(&pki, true, None).await;
    let with = |id: Option<&Pair>| Pki::client_tls(&pki.ca, id);

    // A certificate of the configured CA is the credential: no token needed.
    assert_eq!(
        list_over_tls(&h, "localhost", &with(Some(&pki.client)), None).await,
        Ok(3)
    );
    health_over_tls(&h, &with(Some(&pki.client))).await.unwrap();
    // No certificate, or one of another CA (same subject name): refused, health included.
    // TLS 1.3: the server judges the client's certificate after the client finished its
    // handshake, so the client's first call fails, with the server's alert or with the
    // connection closed (whichever it reads first).
    for id in [None, Some(&pki.rogue_client)] {
        let e = list_over_tls(&h, "localhost", &with(id), None)
            .await
            .unwrap_err();
        assert!(refused(&e), "{e}");
        let e = health_over_tls(&h, &with(id)).await.unwrap_err();
        assert!(refused(&e), "{e}");
    }
    h.stop().await;

    // Both: the certificate and the token.
    let h = tls_server(&pki, true, Some(TOKEN)).await;
    assert_eq!(
        list_over_tls(&h, "localhost", &with(Some(&pki.client)), Some(TOKEN)).await,
        Ok(3)
    );
    let e = list_over_tls(&h, "localhost", &with(Some(&pki.client)), None)
        .await
        .unwrap_err();
    assert!(e.starts_with("Unauthenticated"), "{e}");
    let e = list_over_tls(&h, "localhost", &with(None), Some(TOKEN))
        .await
        .unwrap_err();
    assert!(refused(&e), "{e}");
    h.stop().await;
}

fn opts(listen: &str, token: bool, tls: Option<ServerTls>, insecure: bool) -> ServeOptions {
    ServeOptions {
        listen: Listen::Tcp(listen.parse().unwrap()),
        token: token.then(|| TOKEN.to_string()),
        tls,
        insecure,
        ..ServeOptions::default()
    }
}

#[tokio::test]
async fn tcp_without_authentication_or_off_loopback_in_clear_is_refused_at_start() {
    let pki = Pki::new();
    let tls = || Some(pki.server_tls(false));
    let mtls = || Some(pki.server_tls(true));
    // (listen, token, tls, insecure) → refusal
    type Want = Option<fn(&ServeError) -> bool>;
    let unauthenticated: Want = Some(|e| matches!(e, ServeError::Unauthenticated(_)));
    let cleartext: Want = Some(|e| matches!(e, ServeError::Cleartext(_)));
    let cases: Vec<(&str, bool, Option<ServerTls>, bool, Want)> = vec![
        ("127.0.0.1:50051", false, None, false, unauthenticated),
        ("[::1]:50051", false, None, false, unauthenticated),
        ("127.0.0.1:50051", false, tls(), false, unauthenticated),
        ("127.0.0.1:50051", true, None, false, None),
        ("127.0.0.1:50051", false, mtls(), false, None),
        ("127.0.0.1:50051", false, None, true, None),
        ("198.18.0.1:50051", false, None, false, unauthenticated),
        ("198.18.0.1:50051", true, None, false, cleartext),
        ("[2001:db8::1]:50051", true, None, false, cleartext),
        ("198.18.0.1:50051", true, tls(), false, None),
        ("198.18.0.1:50051", false, mtls(), false, None),
        ("198.18.0.1:50051", false, tls(), true, None),
        ("198.18.0.1:50051", false, None, true, None),
    ];
    for (listen, token, tls, insecure, want) in cases {
        let o = opts(listen, token, tls.clone(), insecure);
        let r = o.check();
        let what = format!("{listen} token={token} tls={tls:?} insecure={insecure}: {r:?}");
        match want {
            None => assert!(r.is_ok(), "{what}"),
            Some(is) => {
                let e = r.unwrap_err();
                assert!(is(&e), "{what}");
                assert!(e.to_string().contains("--api-insecure"), "{e}");
            }
        }
    }
    // bind refuses what check refuses, before binding anything.
    let r = xlb_api::bind(opts("127.0.0.1:0", false, None, false)).await;
    assert!(matches!(r, Err(ServeError::Unauthenticated(_))), "{r:?}");

    // TLS is for TCP.
    let o = ServeOptions {
        listen: Listen::Unix("/tmp/never-bound.sock".into()),
        tls: tls(),
        ..ServeOptions::default()
    };
    assert!(matches!(o.check(), Err(ServeError::TlsOnUnix)), "{o:?}");

    // Certificates that are not, a key of another certificate.
    let mut bad = pki.server_tls(false);
    bad.cert_pem = b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec();
    let e = opts("127.0.0.1:0", true, Some(bad), false)
        .check()
        .unwrap_err();
    assert!(matches!(e, ServeError::Tls(_)), "{e}");
    let mut mismatched = pki.server_tls(false);
    mismatched.key_pem = pki.client.key.clone().into_bytes();
    let e = opts("127.0.0.1:0", true, Some(mismatched), false)
        .check()
        .unwrap_err();
    assert!(matches!(e, ServeError::Tls(_)), "{e}");

    // Files that do not exist are named.
    let e = ServerTls::from_files(
        Path::new("/nonexistent/server.pem"),
        Path::new("/nonexistent/server.key"),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/server.pem"), "{e}");

    // The options' Debug never shows the token or the key.
    let o = opts("127.0.0.1:0", true, tls(), false);
    let shown = format!("{o:?}");
    assert!(
        !shown.contains(TOKEN) && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
}

#[tokio::test]
async fn insecure_loopback_serves_without_a_token() {
    let h = Harness::start_with(BASE, |o| {
        o.listen = loopback();
        o.insecure = true;
    })
    .await;
    let mut c = h.client().await;
    assert_eq!(
        c.list_frontends(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .frontends
            .len(),
        3
    );
    // With a token configured as well, insecure does not switch the check off.
    h.stop().await;
    let h = Harness::start_with(BASE, |o| {
        o.listen = loopback();
        o.insecure = true;
        o.token = Some(TOKEN.into());
    })
    .await;
    let s = h
        .client()
        .await
        .list_frontends(pb::ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    h.stop().await;
}
