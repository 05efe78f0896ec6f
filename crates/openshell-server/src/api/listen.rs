//! Where the gateway serves its API: `unix:///path` or `tcp://HOST:PORT`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// A parsed `--listen` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl ListenAddr {
    /// Parses `unix:///absolute/path` or `tcp://HOST:PORT`, where HOST is an
    /// IP address (IPv6 in brackets) or `localhost`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!(
                    "listen address {text:?} has no path; write unix:///path/to/gateway.sock"
                ));
            }
            if !path.starts_with('/') {
                return Err(format!(
                    "listen address {text:?}: the socket path must be absolute (three slashes: unix:///path/to/gateway.sock)"
                ));
            }
            if path.ends_with('/') {
                return Err(format!(
                    "listen address {text:?} names a directory; add a file name such as gateway.sock"
                ));
            }
            if path.contains('\0') {
                return Err(format!("listen address {text:?} contains a NUL byte"));
            }
            let path = PathBuf::from(path);
            driver_lifecycle::socket::check_socket_path(&path)
                .map_err(|e| format!("listen address {text:?}: {e}"))?;
            return Ok(Self::Unix(path));
        }
        if let Some(rest) = text.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            if let Ok(addr) = rest.parse::<SocketAddr>() {
                return Ok(Self::Tcp(addr));
            }
            if let Some(port) = rest.strip_prefix("localhost:") {
                let port = port.parse::<u16>().map_err(|_| {
                    format!("listen address {text:?}: {port:?} is not a port number (0-65535)")
                })?;
                return Ok(Self::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )));
            }
            return Err(format!(
                "listen address {text:?} is not tcp://IP:PORT; use an IP address \
                 (e.g. tcp://127.0.0.1:50051 or tcp://[::1]:50051) or localhost"
            ));
        }
        Err(format!(
            "listen address {text:?} needs a scheme: unix:///path/to/gateway.sock or tcp://HOST:PORT"
        ))
    }

    /// True when only this machine can reach the address.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Unix(_) => true,
            Self::Tcp(addr) => addr.ip().is_loopback(),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            ListenAddr::parse("unix:///run/os/gateway.sock").unwrap(),
            ListenAddr::Unix(PathBuf::from("/run/os/gateway.sock"))
        );
        assert_eq!(
            ListenAddr::parse("tcp://127.0.0.1:50051").unwrap(),
            ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())
        );
        assert_eq!(
            ListenAddr::parse("tcp://[::1]:7").unwrap(),
            ListenAddr::Tcp("[::1]:7".parse().unwrap())
        );
        assert_eq!(
            ListenAddr::parse("tcp://localhost:8080").unwrap(),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
    }

    #[test]
    fn locality() {
        assert!(ListenAddr::parse("tcp://127.0.0.1:1").unwrap().is_local());
        assert!(ListenAddr::parse("tcp://[::1]:1").unwrap().is_local());
        assert!(!ListenAddr::parse("tcp://0.0.0.0:1").unwrap().is_local());
        assert!(!ListenAddr::parse("tcp://10.1.2.3:1").unwrap().is_local());
        assert!(ListenAddr::parse("unix:///a/b.sock").unwrap().is_local());
    }

    #[test]
    fn rejects_bad_addresses_with_hints() {
        let cases = [
            ("/run/gateway.sock", "needs a scheme"),
            ("unix://", "has no path"),
            ("unix://relative.sock", "must be absolute"),
            ("unix:///run/dir/", "names a directory"),
            ("tcp://example.com:80", "not tcp://IP:PORT"),
            ("tcp://127.0.0.1", "not tcp://IP:PORT"),
            ("tcp://localhost:http", "not a port number"),
            ("http://127.0.0.1:80", "needs a scheme"),
        ];
        for (input, expected) in cases {
            let err = ListenAddr::parse(input).unwrap_err();
            assert!(err.contains(expected), "{input}: {err}");
        }
        let long = format!("unix:///{}", "a".repeat(200));
        let err = ListenAddr::parse(&long).unwrap_err();
        assert!(err.contains("limited to"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for text in ["unix:///run/x.sock", "tcp://127.0.0.1:5", "tcp://[::1]:6"] {
            assert_eq!(ListenAddr::parse(text).unwrap().to_string(), text);
        }
    }
}
