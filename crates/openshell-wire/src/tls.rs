//! Mutual TLS over TCP, for every TCP hop of the compute plane: CLI to
//! gateway and gateway to a driver on another host.
//!
//! rustls (ring backend) through tonic; no OpenSSL. Both sides always
//! present a certificate: servers require a client certificate signed by
//! their client CA, clients verify the server against their CA and the host
//! name (or IP address) they dialled.
//!
//! Certificates and keys are PEM files. They are read and checked for shape
//! when the configuration is built, so a wrong path or a swapped file is
//! reported at startup, naming the file, and not at the first connection.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig, Uri,
};
use tower::service_fn;

use crate::uds::{ConnectionCounter, DialPolicy, root_cause};

/// What went wrong setting up or using TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is not a PEM file with {expected}; give the file `openshell-gateway certs init` wrote for it", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {address} within {timeout:?}: {reason}")]
    Dial {
        address: String,
        timeout: Duration,
        reason: String,
    },
}

/// Reads a PEM file and checks that it holds the expected block.
fn read_pem(what: &'static str, path: &Path, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = match expected {
        "a private key" => text.contains("PRIVATE KEY-----"),
        _ => text.contains("-----BEGIN CERTIFICATE-----"),
    };
    if !found {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

/// A certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl KeyPair {
    fn identity(&self) -> Result<Identity, TlsError> {
        let cert = read_pem("certificate", &self.cert, "a certificate")?;
        let key = read_pem("private key", &self.key, "a private key")?;
        Ok(Identity::from_pem(cert, key))
    }
}

/// A server's TLS files: its own certificate and the CA its clients'
/// certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub identity: KeyPair,
    pub client_ca: PathBuf,
}

impl ServerTls {
    /// The tonic server configuration: client certificates required.
    pub fn config(&self) -> Result<ServerTlsConfig, TlsError> {
        let ca = read_pem("client CA", &self.client_ca, "a certificate")?;
        Ok(ServerTlsConfig::new()
            .identity(self.identity.identity()?)
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false)
            .timeout(Duration::from_secs(10)))
    }
}

impl ServerTls {
    /// A rustls acceptor with the same rules as [`ServerTls::config`]
    /// (client certificate required, signed by the client CA; HTTP/2 by
    /// ALPN), for servers that accept connections themselves.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;

        fn pem_error(
            what: &'static str,
            path: &Path,
            expected: &'static str,
        ) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError {
            let path = path.to_owned();
            move |_| TlsError::NotPem {
                what,
                path,
                expected,
            }
        }
        let ca_pem = read_pem("client CA", &self.client_ca, "a certificate")?;
        let cert_pem = read_pem("certificate", &self.identity.cert, "a certificate")?;
        let key_pem = read_pem("private key", &self.identity.key, "a private key")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(pem_error("client CA", &self.client_ca, "a certificate"))?;
            roots.add(cert).map_err(|e| {
                TlsError::Config(format!("client CA {}: {e}", self.client_ca.display()))
            })?;
        }
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_error(
                "certificate",
                &self.identity.cert,
                "a certificate",
            ))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(pem_error(
            "private key",
            &self.identity.key,
            "a private key",
        ))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(format!("client CA {}: {e}", self.client_ca.display())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                TlsError::Config(format!(
                    "certificate {} and key {} do not make a usable pair: {e}",
                    self.identity.cert.display(),
                    self.identity.key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
    }
}

/// A client's TLS files: the CA the server must chain to and the client's
/// own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub identity: KeyPair,
}

impl ClientTls {
    /// The three files, each where it was given, or the `names` (of the CA,
    /// the certificate and the key, in that order) of the ones missing,
    /// for an error that says what to set.
    pub fn from_parts(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        names: [&'static str; 3],
    ) -> Result<Self, Vec<&'static str>> {
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Self {
                ca: ca.clone(),
                identity: KeyPair {
                    cert: cert.clone(),
                    key: key.clone(),
                },
            }),
            _ => Err([ca.is_none(), cert.is_none(), key.is_none()]
                .into_iter()
                .zip(names)
                .filter_map(|(absent, name)| absent.then_some(name))
                .collect()),
        }
    }

    /// The tonic client configuration, verifying the server as `host`.
    pub fn config(&self, host: &str) -> Result<ClientTlsConfig, TlsError> {
        let ca = read_pem("CA certificate", &self.ca, "a certificate")?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(self.identity.identity()?)
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
            .assume_http2(true))
    }
}

/// `https://HOST:PORT`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsAddr {
    pub host: String,
    pub port: u16,
}

impl HttpsAddr {
    /// Parses `https://HOST:PORT` (IPv6 in brackets). No path, no user.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("https://")
            .ok_or_else(|| format!("{text:?} is not https://HOST:PORT"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "{text:?}: only https://HOST:PORT is accepted (no path, user or query)"
            ));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no port; write https://HOST:PORT"))?;
        if host.is_empty() || host == "[]" {
            return Err(format!("{text:?} has no host; write https://HOST:PORT"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(format!(
                "{text:?}: put an IPv6 address in brackets, e.g. https://[::1]:7443"
            ));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?}: {port:?} is not a port number (1-65535)"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The host without IPv6 brackets, as DNS or an IP literal.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl std::fmt::Display for HttpsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}:{}", self.host, self.port)
    }
}

/// Opens a mutual-TLS HTTP/2 channel to `addr`, retrying until
/// `policy.deadline`; every TCP connection the channel opens (first and
/// redials) is counted in `counter`. Errors carry [`explain`]'s reading of
/// the TLS failure.
pub async fn connect(
    addr: &HttpsAddr,
    tls: &ClientTls,
    policy: DialPolicy,
    counter: Option<ConnectionCounter>,
) -> Result<Channel, TlsError> {
    let config = tls.config(addr.bare_host())?;
    let endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| TlsError::Config(format!("{addr}: {e}")))?
        .tls_config(config)
        .map_err(|e| TlsError::Config(format!("TLS settings for {addr}: {}", root_cause(&e))))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    let deadline = tokio::time::Instant::now() + policy.deadline;
    let mut backoff = policy.initial_backoff;
    loop {
        let host = addr.bare_host().to_owned();
        let port = addr.port;
        let counter = counter.clone();
        let attempt = endpoint
            .connect_with_connector(service_fn(move |_: Uri| {
                let host = host.clone();
                let counter = counter.clone();
                async move {
                    let stream = TcpStream::connect((host.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    if let Some(counter) = counter {
                        counter.0.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await;
        let error = match attempt {
            Ok(channel) => return Ok(channel),
            Err(error) => error,
        };
        let now = tokio::time::Instant::now();
        // TLS refusals do not heal by retrying: report them at once.
        let reason = explain(&root_cause(&error));
        if now >= deadline || is_tls_refusal(&reason) {
            return Err(TlsError::Dial {
                address: addr.to_string(),
                timeout: policy.deadline,
                reason,
            });
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2)
            .min(policy.max_backoff)
            .max(Duration::from_millis(1));
    }
}

fn is_tls_refusal(reason: &str) -> bool {
    reason.starts_with("TLS:")
}

/// Turns a rustls failure into what a person can act on. Anything that is
/// not a recognised TLS failure is returned unchanged.
pub fn explain(cause: &str) -> String {
    let hint = if cause.contains("UnknownIssuer") || cause.contains("BadSignature") {
        "the server's certificate is not signed by the CA you trust (wrong --tls-ca, or the server uses another CA's certificate)"
    } else if cause.contains("expired") || cause.contains("Expired") {
        "a certificate has expired (or the clock is wrong); issue a new one with `openshell-gateway certs init`"
    } else if cause.contains("NotValidYet") || cause.contains("not valid yet") {
        "a certificate is not valid yet; check the clocks of both machines"
    } else if cause.contains("not valid for name") || cause.contains("NotValidForName") {
        "host name mismatch: the server's certificate does not name the host you dialled; dial a name or IP in its SANs, or issue it with --host/--ip"
    } else if cause.contains("CertificateRequired") {
        "the server requires a client certificate; pass --tls-cert and --tls-key"
    } else if cause.contains("UnknownCA") || cause.contains("BadCertificate") {
        "the server does not trust our client certificate (signed by a CA it does not know)"
    } else if cause.contains("InvalidCertificate") || cause.contains("invalid peer certificate") {
        "the peer's certificate was refused"
    } else if cause.contains("HandshakeFailure") || cause.contains("CorruptMessage") {
        "TLS handshake failed (is the other side speaking TLS?)"
    } else {
        return cause.to_owned();
    };
    format!("TLS: {hint} ({cause})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_files_name_the_missing_ones() {
        let p = |s: &str| PathBuf::from(s);
        let (ca, cert, key) = (p("/ca.pem"), p("/c.pem"), p("/k.pem"));
        let names = ["ca", "cert", "key"];
        let tls = ClientTls::from_parts(Some(&ca), Some(&cert), Some(&key), names).unwrap();
        assert_eq!(
            (tls.ca, tls.identity.cert, tls.identity.key),
            (ca.clone(), cert, key.clone())
        );
        assert_eq!(
            ClientTls::from_parts(Some(&ca), None, Some(&key), names).unwrap_err(),
            ["cert"]
        );
        assert_eq!(
            ClientTls::from_parts(None, None, None, names).unwrap_err(),
            names
        );
    }

    #[test]
    fn https_addresses_parse_with_hints() {
        let a = HttpsAddr::parse("https://127.0.0.1:7443").expect("ip");
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 7443));
        let a = HttpsAddr::parse("https://[::1]:7443/").expect("v6");
        assert_eq!(a.bare_host(), "::1");
        assert_eq!(a.to_string(), "https://[::1]:7443");
        let a = HttpsAddr::parse("https://drivers.example:9").expect("dns");
        assert_eq!(a.bare_host(), "drivers.example");
        for (bad, hint) in [
            ("http://h:1", "not https://"),
            ("https://h", "no port"),
            ("https://:1", "no host"),
            ("https://h:0", "not a port"),
            ("https://h:x", "not a port"),
            ("https://h:1/path", "only https://HOST:PORT"),
            ("https://::1:5", "brackets"),
        ] {
            let error = HttpsAddr::parse(bad).expect_err(bad);
            assert!(error.contains(hint), "{bad}: {error}");
        }
    }

    #[test]
    fn tls_failures_are_explained() {
        assert!(
            explain("invalid peer certificate: UnknownIssuer").contains("not signed by the CA")
        );
        assert!(explain("received fatal alert: CertificateRequired").contains("--tls-cert"));
        assert!(explain("certificate not valid for name \"x\"").contains("host name mismatch"));
        assert_eq!(explain("connection refused"), "connection refused");
    }

    /// A CA, a server certificate (`sans`, valid `years` around `year`)
    /// and a client certificate, as PEM files in `dir`.
    fn issue(dir: &Path, sans: &[&str], not_after_year: i32) -> (ServerTls, ClientTls) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair as Key};
        let ca_key = Key::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, &ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let server_key = Key::generate().expect("key");
        let mut server =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        server.not_before = rcgen::date_time_ymd(2000, 1, 1);
        server.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        let server_pem = server
            .signed_by(&server_key, &issuer)
            .expect("server")
            .pem();
        let client_key = Key::generate().expect("key");
        let client = CertificateParams::new(Vec::<String>::new()).expect("params");
        let client_pem = client
            .signed_by(&client_key, &issuer)
            .expect("client")
            .pem();
        let ca = write("ca.pem", ca_pem);
        (
            ServerTls {
                identity: KeyPair {
                    cert: write("server.pem", server_pem),
                    key: write("server.key", server_key.serialize_pem()),
                },
                client_ca: ca.clone(),
            },
            ClientTls {
                ca,
                identity: KeyPair {
                    cert: write("client.pem", client_pem),
                    key: write("client.key", client_key.serialize_pem()),
                },
            },
        )
    }

    /// Serves TLS handshakes on a loopback port; returns its address.
    async fn handshakes(server: &ServerTls) -> HttpsAddr {
        let acceptor = server.acceptor().expect("acceptor");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _tls = acceptor.accept(stream).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        HttpsAddr::parse(&format!("https://127.0.0.1:{port}")).expect("addr")
    }

    async fn refusal(sans: &[&str], not_after_year: i32) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let (server, client) = issue(dir.path(), sans, not_after_year);
        let addr = handshakes(&server).await;
        match connect(&addr, &client, DialPolicy::ONCE, None).await {
            Ok(_) => "connected".to_owned(),
            Err(error) => error.to_string(),
        }
    }

    #[tokio::test]
    async fn real_rustls_refusals_are_explained() {
        let ok = refusal(&["127.0.0.1"], 2999).await;
        assert_eq!(ok, "connected");
        let mismatch = refusal(&["elsewhere.example"], 2999).await;
        assert!(mismatch.contains("host name mismatch"), "{mismatch}");
        let expired = refusal(&["127.0.0.1"], 2001).await;
        assert!(expired.contains("has expired"), "{expired}");
    }

    #[test]
    fn files_are_checked_for_shape_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wrong = dir.path().join("key-as-cert.pem");
        std::fs::write(&wrong, "-----BEGIN PRIVATE KEY-----\n").expect("write");
        let server = ServerTls {
            identity: KeyPair {
                cert: wrong.clone(),
                key: wrong.clone(),
            },
            client_ca: dir.path().join("absent.pem"),
        };
        let error = server.config().expect_err("missing CA").to_string();
        assert!(
            error.contains("client CA") && error.contains("absent.pem"),
            "{error}"
        );
        std::fs::copy(&wrong, dir.path().join("absent.pem")).expect("copy");
        let error = server.config().expect_err("not a cert").to_string();
        assert!(
            error.contains("not a PEM file with a certificate"),
            "{error}"
        );
    }
}
