//! A stock gRPC C-core client (Python `grpcio`, as installed by `scripts/test`) on the default
//! transport, the Unix socket, with a plain `unix:PATH` target and no channel options: the
//! health service, then an `xlb.v1` read and change found through reflection.
//!
//! C-core sends the percent-encoded socket path as `:authority`, which the HTTP/2 layer alone
//! refuses; the server's Unix listener accepts it (see `xlb_api::authority`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Harness;

/// The Python interpreter that has `grpcio`, `grpcio-reflection` and `grpcio-health-checking`:
/// `XLB_GRPC_PYTHON`, else the virtual environment `scripts/test` creates.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_GRPC_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/xlb/grpc-venv/bin/python")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c_core_client.py")
}

/// Runs the client against `target` on a plain thread (the server runs on the test's
/// runtime), bounded in time.
async fn run_client(target: String, create: &str) -> (bool, String, String) {
    let py = python();
    assert!(
        py.exists(),
        "{} does not exist: run scripts/test once (it installs grpcio in a virtual environment) \
         or point XLB_GRPC_PYTHON at a python with grpcio, grpcio-reflection and \
         grpcio-health-checking",
        py.display()
    );
    let create = create.to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(py)
                .arg(script())
                .arg(target)
                .arg(create)
                .output()
                .expect("running the Python client")
        }),
    )
    .await
    .expect("the Python client did not finish within 60 s")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_on_the_unix_socket_with_a_plain_target() {
    let h = Harness::start().await;
    let target = format!("unix:{}", h.socket.display());
    let (ok, stdout, stderr) = run_client(target, "py-vip").await;
    assert!(ok, "the C-core client failed:\n{stderr}\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(v["health"], "SERVING", "{v}");
    assert_eq!(v["health_xlb"], "SERVING", "{v}");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(services.contains(&"xlb.v1.Xlb"), "{v}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{v}");
    assert_eq!(
        v["frontends"],
        serde_json::json!(["vip", "ilb", "snat"]),
        "{v}"
    );
    assert_eq!(v["generation"], 1, "{v}");
    // The change went through the same path as any other client's.
    assert_eq!(v["created_generation"], 2, "{v}");
    let (f, generation) = h
        .state
        .get::<xlb_engine::config::Frontend>("py-vip")
        .unwrap();
    assert_eq!(f.address.to_string(), "198.18.0.99");
    assert_eq!(generation, 2);
    h.stop().await;
}
