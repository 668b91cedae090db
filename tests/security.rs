//! Security basics: basic auth and API keys over TLS with a CA bundle.
//!
//! The test search node is assembled from Maven Central artifacts, where the
//! OpenSearch security plugin is not available, so the node itself cannot
//! require credentials. A loopback TLS front (a certificate from a CA made
//! here) that demands basic auth or an API key, the way the Elasticsearch
//! security layer answers, stands in front of the real node. What is tested is
//! the client side: CA bundles, credentials, refusals, and no secret in output.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use base64::Engine;

const USER: &str = "elastic";
const PASSWORD: &str = "s3cret-Pa55word";
const API_KEY: &str = "a2xtLWtleTpzM2NyZXQta2V5LXZhbHVl";

struct SecureFront {
    url: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start_secure_front(upstream: String) -> SecureFront {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "security test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        server_cert.pem().into_bytes(),
        server_key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();

    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (basic, http, upstream) = (basic.clone(), http.clone(), upstream.clone());
        async move {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if auth != basic && auth != format!("ApiKey {API_KEY}") {
                let denied =
                    r#"{"error":{"type":"security_exception","reason":"unable to authenticate user"},"status":401}"#;
                return (
                    StatusCode::UNAUTHORIZED,
                    [("content-type", "application/json")],
                    Bytes::from_static(denied.as_bytes()),
                );
            }
            let target = format!("{upstream}{}", uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
            let mut request = http.request(method, target).body(body);
            if let Some(ct) = headers.get("content-type") {
                request = request.header("content-type", ct);
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                [("content-type", "application/json")],
                response.bytes().await.unwrap(),
            )
        }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum_server::from_tcp_rustls(listener, config)
            .expect("TLS listener")
            .serve(app.into_make_service())
            .await
    });
    SecureFront {
        url: format!("https://127.0.0.1:{}", addr.port()),
        ca,
        _dir: dir,
    }
}

fn lockctl(front: &SecureFront, args: &[&str]) -> std::process::Output {
    common::lockctl()
        .env("ELASTICSEARCH_URL", &front.url)
        .env_remove("ELASTICSEARCH_USERNAME")
        .env_remove("ELASTICSEARCH_PASSWORD")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_api_keys_over_tls_with_a_ca_bundle() {
    let Some(upstream) = common::es_url() else { return };
    let front = start_secure_front(upstream).await;
    let ca = front.ca.to_str().unwrap().to_string();
    let id = common::unique("secure");

    let out = lockctl(
        &front,
        &[
            "acquire",
            &id,
            "--es-ca-cert",
            &ca,
            "--es-username",
            USER,
            "--es-password",
            PASSWORD,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = lockctl(&front, &["get", &id, "--es-ca-cert", &ca, "--es-api-key", API_KEY]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "API keys work too: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lockctl(
        &front,
        &[
            "release",
            &id,
            "--token",
            &token,
            "--es-ca-cert",
            &ca,
            "--es-api-key",
            API_KEY,
        ],
    );
    assert_eq!(out.status.code(), Some(0));

    // without the CA bundle the certificate is not trusted
    let out = lockctl(&front, &["get", &id, "--es-username", USER, "--es-password", PASSWORD]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // wrong credentials: a clear refusal that does not print the secret
    let out = lockctl(
        &front,
        &[
            "acquire",
            &id,
            "--es-ca-cert",
            &ca,
            "--es-username",
            USER,
            "--es-password",
            "wrong-Secret-123",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("unable to authenticate"), "{err}");
    assert!(!err.contains("wrong-Secret-123"), "secret printed: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_refuses_bad_credentials_and_never_logs_secrets() {
    let Some(upstream) = common::services() else { return };
    let front = start_secure_front(upstream).await;
    let client = kube::Client::try_default().await.unwrap();
    common::install_crd(&client).await;
    let run = common::unique("secure-op");

    let operator = |password: &str, port: u16| {
        common::lockctl()
            .args(["operator", "--selector", &format!("{}={run}", common::RUN_LABEL)])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .env("ELASTICSEARCH_URL", &front.url)
            .env("ELASTICSEARCH_CA_CERT", &front.ca)
            .env("ELASTICSEARCH_USERNAME", USER)
            .env("ELASTICSEARCH_PASSWORD", password)
            .env("RUST_LOG", "debug")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // bad credentials: refuses to start, with a clear message
    let child = operator("not-the-Password-9", common::free_port());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // other tasks may still log after the error line; find it
    let error = err
        .lines()
        .find(|l| l.starts_with("lockctl: error:"))
        .unwrap_or_default();
    assert!(
        error.contains("lock index is not usable") && error.contains("401"),
        "{err}"
    );
    assert!(!err.contains("not-the-Password-9"), "secret in the output");

    // good credentials: it starts and serves; the password is nowhere in its logs
    let port = common::free_port();
    let mut child = operator(PASSWORD, port);
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text).unwrap();
        text
    });
    common::eventually("the operator to be ready", Duration::from_secs(20), || async {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the operator keeps running");
    let _ = child.kill();
    let _ = child.wait();
    let text = log.join().unwrap();
    assert!(text.contains("operator started"), "{text}");
    assert!(!text.contains(PASSWORD), "the password appears in the operator's log");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(
        !text.contains(&basic),
        "the encoded credentials appear in the operator's log"
    );
}
