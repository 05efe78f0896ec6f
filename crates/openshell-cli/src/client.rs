//! Gateway addresses and the connection to the gateway.

use std::path::PathBuf;
use std::time::Duration;

use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::CliError;

/// Where the gateway serves its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`, plain TCP: only a gateway started with
    /// `--insecure-tcp` (development) answers it.
    Tcp(String),
    /// `https://host:port`: TCP with mutual TLS.
    Https(openshell_wire::tls::HttpsAddr),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(authority) => write!(f, "tcp://{authority}"),
            Self::Https(addr) => write!(f, "{addr}"),
        }
    }
}

/// The address the gateway listens on when started without `--listen`.
pub fn default_address() -> Address {
    Address::Unix(openshell_wire::paths::default_gateway_socket())
}

const ADDRESS_HINT: &str = "use unix:///path/to/gateway.sock, https://HOST:PORT (with --tls-ca/--tls-cert/--tls-key) or tcp://HOST:PORT";

/// Parses `unix:///path` or `tcp://host:port`.
pub fn parse_address(text: &str) -> Result<Address, CliError> {
    let bad =
        |why: &str| CliError::Usage(format!("gateway address '{text}' {why}; {ADDRESS_HINT}"));
    if let Some(path) = text.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(bad("has no socket path"));
        }
        if !path.starts_with('/') {
            return Err(bad(
                "needs an absolute socket path (three slashes: unix:///...)",
            ));
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    if text.starts_with("https://") {
        return openshell_wire::tls::HttpsAddr::parse(text)
            .map(Address::Https)
            .map_err(|e| CliError::Usage(format!("gateway address: {e}; {ADDRESS_HINT}")));
    }
    if let Some(authority) = text.strip_prefix("tcp://") {
        let authority = authority.trim_end_matches('/');
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(bad("has no port"));
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("has an invalid port"));
        }
        return Ok(Address::Tcp(authority.to_owned()));
    }
    Err(bad("has an unknown scheme"))
}

/// How long to keep trying to reach the gateway before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The CLI's TLS files for an https:// gateway, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// All three, or a usage error naming the missing flags.
    fn complete(&self) -> Result<openshell_wire::tls::ClientTls, CliError> {
        openshell_wire::tls::ClientTls::from_parts(
            self.ca.as_ref(),
            self.cert.as_ref(),
            self.key.as_ref(),
            ["--tls-ca", "--tls-cert", "--tls-key"],
        )
        .map_err(|missing| {
            CliError::Usage(format!(
                "an https:// gateway needs the CA that signed its certificate and your \
                 client certificate and key; missing: {} (or OPENSHELL_GATEWAY_TLS_CA, \
                 OPENSHELL_GATEWAY_TLS_CERT, OPENSHELL_GATEWAY_TLS_KEY)",
                missing.join(", ")
            ))
        })
    }

    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Connects to the gateway. Messages are limited as on every OpenShell
/// client and server (`openshell_wire::limits::MAX_MESSAGE_BYTES`), so a
/// page of large sandboxes is not refused by a default 4 MiB limit.
pub async fn connect(
    address: &Address,
    tls: &TlsFiles,
) -> Result<GatewayClient<Channel>, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        address: address.to_string(),
        reason,
    };
    if tls.any() && !matches!(address, Address::Https(_)) {
        return Err(CliError::Usage(format!(
            "--tls-ca/--tls-cert/--tls-key apply to an https:// gateway, not {address}"
        )));
    }
    let channel = match address {
        Address::Https(addr) => {
            let files = tls.complete()?;
            openshell_wire::tls::connect(
                addr,
                &files,
                openshell_wire::DialPolicy::within(CONNECT_TIMEOUT),
                None,
            )
            .await
            .map_err(|e| match e {
                openshell_wire::tls::TlsError::Dial { reason, .. } => unreachable(reason),
                other => CliError::Usage(other.to_string()),
            })?
        }
        Address::Unix(path) => {
            if let Err(e) = std::fs::symlink_metadata(path) {
                return Err(unreachable(socket_problem(path, &e)));
            }
            openshell_wire::uds::connect(path, openshell_wire::DialPolicy::within(CONNECT_TIMEOUT))
                .await
                .map_err(|e| unreachable(e.last_error))?
        }
        Address::Tcp(authority) => Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| unreachable(openshell_wire::uds::root_cause(&e)))?,
    };
    Ok(GatewayClient::new(channel)
        .max_decoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES))
}

/// What to tell a person whose gateway socket cannot be inspected.
fn socket_problem(path: &std::path::Path, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            format!(
                "{} does not exist (is the gateway running?)",
                path.display()
            )
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: its directory belongs to another user (run as that user, or point --gateway at your own gateway)",
            path.display()
        ),
        _ => format!("cannot inspect {}: {error}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            parse_address("unix:///run/openshell/gateway.sock").unwrap(),
            Address::Unix(PathBuf::from("/run/openshell/gateway.sock"))
        );
        assert_eq!(
            parse_address("tcp://127.0.0.1:7070").unwrap(),
            Address::Tcp("127.0.0.1:7070".to_owned())
        );
        assert_eq!(
            parse_address("tcp://[::1]:7070/").unwrap(),
            Address::Tcp("[::1]:7070".to_owned())
        );
    }

    #[test]
    fn https_needs_all_three_tls_files() {
        let address = parse_address("https://127.0.0.1:7443").unwrap();
        assert_eq!(address.to_string(), "https://127.0.0.1:7443");
        let tls = TlsFiles {
            ca: Some(PathBuf::from("/ca.pem")),
            ..TlsFiles::default()
        };
        let err = tls.complete().unwrap_err().to_string();
        assert!(err.contains("missing: --tls-cert, --tls-key"), "{err}");
        assert!(
            parse_address("https://h")
                .unwrap_err()
                .to_string()
                .contains("no port")
        );
    }

    #[tokio::test]
    async fn tls_flags_without_https_are_a_usage_error() {
        let address = parse_address("tcp://127.0.0.1:1").unwrap();
        let tls = TlsFiles {
            ca: Some(PathBuf::from("/ca.pem")),
            ..TlsFiles::default()
        };
        let err = connect(&address, &tls).await.unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("apply to an https:// gateway"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_addresses_with_a_hint() {
        for (input, why) in [
            ("unix://", "has no socket path"),
            ("unix://relative.sock", "absolute socket path"),
            ("tcp://localhost", "has no port"),
            ("tcp://:7070", "has no host"),
            ("tcp://h:0", "invalid port"),
            ("tcp://h:99999", "invalid port"),
            ("http://h:1", "unknown scheme"),
            ("/run/gateway.sock", "unknown scheme"),
        ] {
            let err = parse_address(input).unwrap_err().to_string();
            assert!(err.contains(why), "{input}: {err}");
            assert!(err.contains(ADDRESS_HINT), "{input}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["unix:///a/b.sock", "tcp://127.0.0.1:1"] {
            assert_eq!(parse_address(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn default_is_the_gateway_socket_in_the_run_dir() {
        let Address::Unix(path) = default_address() else {
            panic!("default must be a unix socket");
        };
        assert!(path.ends_with("gateway.sock"));
        assert_eq!(path, openshell_wire::paths::default_gateway_socket());
    }

    #[tokio::test]
    async fn missing_socket_is_reported_as_unreachable() {
        let tmp = tempfile::tempdir().unwrap();
        let address = Address::Unix(tmp.path().join("gateway.sock"));
        let err = connect(&address, &TlsFiles::default()).await.unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    /// A socket that exists behind a directory this user may not enter is
    /// "permission denied", not "does not exist".
    #[test]
    fn permission_problems_are_not_reported_as_missing() {
        let path = std::path::Path::new("/run/x/gateway.sock");
        let denied = socket_problem(
            path,
            &std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(denied.contains("permission denied"), "{denied}");
        assert!(!denied.contains("does not exist"), "{denied}");
        let missing = socket_problem(path, &std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
