//! Default locations shared by the gateway and its clients.

use std::path::PathBuf;

/// File name of the gateway's socket inside the run directory.
pub const GATEWAY_SOCKET_NAME: &str = "gateway.sock";

/// The run directory used when none is configured: `$XDG_RUNTIME_DIR/openshell`
/// when the session has one, else `/tmp/openshell-<euid>`.
pub fn default_run_dir() -> PathBuf {
    directories::BaseDirs::new()
        .and_then(|dirs| dirs.runtime_dir().map(|d| d.join("openshell")))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("openshell-{}", nix::unistd::geteuid().as_raw()))
        })
}

/// Where the gateway listens, and the CLI looks, when neither is told.
pub fn default_gateway_socket() -> PathBuf {
    default_run_dir().join(GATEWAY_SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_socket_lives_in_the_run_dir() {
        let socket = default_gateway_socket();
        assert_eq!(socket.parent(), Some(default_run_dir().as_path()));
        assert!(socket.is_absolute(), "{}", socket.display());
    }
}
