//! The driver side: bind a Unix socket safely, tell the spawner it is ready,
//! serve a tonic router, and leave cleanly.

use std::fs;
use std::io::Write as _;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use futures::Stream;
use openshell_wire::authority::AuthorityFix;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

use crate::error::{LifecycleError, Result};
use crate::socket;
use crate::spawn::{PARENT_PID_ENV, READY_FD_ENV, READY_LINE_PREFIX, READY_PROTOCOL_VERSION};

/// Which peers may talk to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Required peer uid (normally our own effective uid).
    pub uid: u32,
    /// Required peer pid, when the driver was told who its gateway is.
    pub pid: Option<u32>,
}

impl PeerPolicy {
    /// Any process of this user.
    pub fn same_uid() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            pid: None,
        }
    }

    /// Only the process `pid`, which must also run as this user.
    pub fn same_uid_and_pid(pid: u32) -> Self {
        Self {
            pid: Some(pid),
            ..Self::same_uid()
        }
    }

    /// Checks the credentials the kernel recorded for `stream`'s peer.
    pub fn check(&self, stream: &UnixStream) -> std::result::Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("peer credentials unavailable: {e}"))?;
        if cred.uid() != self.uid {
            return Err(format!("peer uid {} is not {}", cred.uid(), self.uid));
        }
        if let Some(expected) = self.pid {
            let actual = cred.pid().and_then(|p| u32::try_from(p).ok());
            if actual != Some(expected) {
                return Err(format!(
                    "peer pid {} is not the expected gateway pid {expected}",
                    actual.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
                ));
            }
        }
        Ok(())
    }
}

/// The standard driver flags, for `#[command(flatten)]` into a driver's CLI.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to serve the ComputeDriver API on.
    #[arg(long, value_name = "PATH", env = "OPENSHELL_COMPUTE_DRIVER_SOCKET")]
    pub bind_socket: PathBuf,

    /// Accept connections only from this process (the gateway that spawned
    /// the driver passes its own pid).
    #[arg(long, value_name = "PID")]
    pub expected_peer_pid: Option<u32>,

    /// Accept connections from any process running as this user. Needed to
    /// run the driver standalone and attach a gateway to it with
    /// `--drivers NAME@SOCKET`.
    #[arg(long, env = "OPENSHELL_COMPUTE_DRIVER_ALLOW_SAME_UID_PEER")]
    pub allow_same_uid_peer: bool,

    /// Also serve on TCP at HOST:PORT, always with mutual TLS: for a
    /// gateway on another host (`--drivers NAME@https://HOST:PORT`). Needs
    /// --tls-cert, --tls-key and --tls-client-ca.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "OPENSHELL_COMPUTE_DRIVER_BIND_TCP"
    )]
    pub bind_tcp: Option<String>,

    /// Server certificate (PEM) for --bind-tcp.
    #[arg(long, value_name = "PATH", env = "OPENSHELL_COMPUTE_DRIVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", env = "OPENSHELL_COMPUTE_DRIVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that gateways' client certificates must be signed by; a
    /// gateway without such a certificate cannot attach.
    #[arg(
        long,
        value_name = "PATH",
        env = "OPENSHELL_COMPUTE_DRIVER_TLS_CLIENT_CA"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Descriptor to write the ready line to (set by the spawner).
    #[arg(long, value_name = "FD", env = READY_FD_ENV, hide = true)]
    pub ready_fd: Option<RawFd>,

    /// Exit when this process exits (set by the spawner).
    #[arg(long, value_name = "PID", env = PARENT_PID_ENV, hide = true)]
    pub parent_pid: Option<u32>,
}

impl ServeArgs {
    /// Turns the flags into [`ServeOptions`]. Binding a socket without saying
    /// who may connect is refused.
    pub fn options(&self) -> Result<ServeOptions> {
        let peers = match (self.expected_peer_pid, self.allow_same_uid_peer) {
            (Some(pid), _) => PeerPolicy::same_uid_and_pid(pid),
            (None, true) => PeerPolicy::same_uid(),
            (None, false) => return Err(LifecycleError::PeerPolicyMissing),
        };
        Ok(ServeOptions {
            socket: self.bind_socket.clone(),
            tcp: self.tcp()?,
            peers,
            ready_fd: self.ready_fd,
            parent_pid: self.parent_pid,
            shutdown_grace: Duration::from_secs(3),
            handle_signals: true,
        })
    }
}

impl ServeArgs {
    /// `--bind-tcp` with its TLS files, all or nothing.
    fn tcp(&self) -> Result<Option<TcpServe>> {
        let tls = (&self.tls_cert, &self.tls_key, &self.tls_client_ca);
        let Some(bind) = &self.bind_tcp else {
            if tls.0.is_some() || tls.1.is_some() || tls.2.is_some() {
                return Err(LifecycleError::Tcp(
                    "--tls-cert/--tls-key/--tls-client-ca apply to --bind-tcp, which is not set; \
                     add --bind-tcp HOST:PORT or drop them"
                        .to_owned(),
                ));
            }
            return Ok(None);
        };
        let addr: std::net::SocketAddr = bind.trim().parse().map_err(|_| {
            LifecycleError::Tcp(format!(
                "--bind-tcp {bind:?} is not IP:PORT (e.g. 0.0.0.0:7443, 127.0.0.1:7443 or [::]:7443)"
            ))
        })?;
        let (Some(cert), Some(key), Some(client_ca)) = tls else {
            return Err(LifecycleError::Tcp(format!(
                "--bind-tcp {bind} is served only with mutual TLS: give --tls-cert, --tls-key and \
                 --tls-client-ca (`openshell-gateway certs init DIR --driver NAME` writes them)"
            )));
        };
        Ok(Some(TcpServe {
            addr,
            tls: openshell_wire::tls::ServerTls {
                identity: openshell_wire::tls::KeyPair {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                client_ca: client_ca.clone(),
            },
        }))
    }
}

/// A TCP listener beside the Unix socket, with mutual TLS.
#[derive(Debug, Clone)]
pub struct TcpServe {
    pub addr: std::net::SocketAddr,
    pub tls: openshell_wire::tls::ServerTls,
}

/// Everything [`serve_uds`] needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: PathBuf,
    /// Also serve on TCP with mutual TLS (peer credentials do not apply
    /// there: the client certificate is the credential).
    pub tcp: Option<TcpServe>,
    pub peers: PeerPolicy,
    /// Write the ready line here after bind+listen.
    pub ready_fd: Option<RawFd>,
    /// Stop serving when this process exits.
    pub parent_pid: Option<u32>,
    /// After a stop is requested, how long open calls (watch streams) may
    /// run before the server returns anyway.
    pub shutdown_grace: Duration,
    /// Stop on SIGTERM and SIGINT.
    pub handle_signals: bool,
}

/// Why [`serve_uds`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeExit {
    /// SIGTERM or SIGINT.
    Signal,
    /// The parent process exited.
    ParentExited,
    /// The caller's cancellation token fired.
    Cancelled,
}

/// Standard error for log output that survives its reader going away.
///
/// A managed driver's stderr is a pipe to the gateway. When the gateway dies
/// the pipe breaks, and a logger that reports the failed write (as
/// tracing-subscriber does, through `eprintln!`, which panics on a broken
/// stderr) would take down whatever task happened to log. Writes that fail
/// with `EPIPE` are dropped instead. Use it as the log writer:
/// `tracing_subscriber::fmt().with_writer(|| LogStderr)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogStderr;

impl std::io::Write for LogStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stderr().write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match std::io::stderr().write_all(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stderr().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}

/// Closes every inherited descriptor from 3 upward except the ready fd named
/// in the environment. Call it first thing in a driver's `main`, before a
/// runtime or any thread exists.
pub fn close_inherited_fds() -> Result<()> {
    let ready = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok());
    let keep: Vec<RawFd> = ready.into_iter().collect();
    crate::sys::close_fds_except(&keep)
        .map_err(|e| LifecycleError::io("close inherited descriptors of", "/proc/self/fd", e))
}

/// Binds `options.socket` under the socket rules of this crate, writes the
/// ready line, and serves `router` until a signal, the parent's exit or
/// `cancel`. Open calls get `shutdown_grace` to finish. The socket is
/// removed on the way out if it is still the one this call bound.
///
/// `cancel` is also cancelled when the server decides to stop, so services
/// can end their long-lived streams by watching a clone of it.
pub async fn serve_uds(
    options: ServeOptions,
    router: Router,
    cancel: CancellationToken,
) -> Result<ServeExit> {
    // Take the fd first: if anything below fails, dropping it closes the
    // pipe and the spawner sees the failure at once.
    let ready = options
        .ready_fd
        .map(|fd| {
            crate::sys::adopt_inherited_fd(fd)
                .map_err(|source| LifecycleError::ReadyFd { fd, source })
        })
        .transpose()?;

    let (reason_tx, mut reason_rx) = tokio::sync::mpsc::channel::<ServeExit>(4);
    if let Some(parent) = options.parent_pid {
        watch_parent(parent, reason_tx.clone(), cancel.clone())?;
    }
    if options.handle_signals {
        watch_signals(reason_tx.clone(), cancel.clone())?;
    }
    drop(reason_tx);

    // TLS files and the TCP address are checked before the socket is
    // bound, so a mistake fails startup before the driver looks ready.
    let tcp = match &options.tcp {
        Some(tcp) => {
            let acceptor = tcp
                .tls
                .acceptor()
                .map_err(|e| LifecycleError::Tcp(format!("--bind-tcp {}: {e}", tcp.addr)))?;
            let listener = tokio::net::TcpListener::bind(tcp.addr).await.map_err(|e| {
                LifecycleError::Tcp(format!("cannot listen on --bind-tcp {}: {e}", tcp.addr))
            })?;
            Some((listener, acceptor))
        }
        None => None,
    };
    let (listener, bound) = socket::bind_unix_listener_async(&options.socket).await?;
    if let Some(ready) = ready {
        let mut file = fs::File::from(ready);
        let line = format!(
            "{READY_LINE_PREFIX} {READY_PROTOCOL_VERSION} {} {}\n",
            std::process::id(),
            options.socket.display()
        );
        file.write_all(line.as_bytes())
            .map_err(|source| LifecycleError::ReadyFd {
                fd: options.ready_fd.unwrap_or(-1),
                source,
            })?;
    }
    tracing::info!(socket = %options.socket.display(), peer_uid = options.peers.uid, peer_pid = ?options.peers.pid, "driver serving");

    let tcp_server = tcp.map(|(listener, acceptor)| {
        let address = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        tracing::info!(address = %address, "driver serving on TCP (mutual TLS)");
        let stop = cancel.clone();
        tokio::spawn(router.clone().serve_with_incoming_shutdown(
            tls_accept_stream(listener, acceptor, cancel.clone()),
            async move { stop.cancelled().await },
        ))
    });
    let incoming = accept_stream(listener, options.peers);
    let stop = cancel.clone();
    let server =
        router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await });
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => result,
        () = async { cancel.cancelled().await; tokio::time::sleep(options.shutdown_grace).await } => {
            tracing::warn!(grace = ?options.shutdown_grace, "open calls did not finish in time; closing them");
            Ok(())
        }
    };
    let exit = reason_rx.try_recv().unwrap_or(ServeExit::Cancelled);
    if let Some(tcp_server) = tcp_server {
        cancel.cancel();
        tcp_server.abort();
    }
    drop(bound);
    served.map_err(|source| LifecycleError::Serve {
        path: options.socket.clone(),
        source,
    })?;
    tracing::info!(?exit, "driver stopped");
    Ok(exit)
}

/// Accepted connections whose peers pass `peers`; others are dropped with a
/// warning. Accept errors (out of descriptors, say) are logged and retried
/// after a pause instead of ending the server.
/// Accepted connections from permitted peers, each behind an
/// [`AuthorityFix`] so stock gRPC clients (which send the socket path as
/// `:authority`) are served too.
fn accept_stream(
    listener: UnixListener,
    peers: PeerPolicy,
) -> impl Stream<Item = std::io::Result<AuthorityFix<UnixStream>>> {
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match peers.check(&stream) {
                    Ok(()) => return Some((Ok(AuthorityFix::new(stream)), listener)),
                    Err(reason) => tracing::warn!(%reason, "rejected a connection"),
                },
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// TLS connections accepted on `listener` whose client certificate the
/// acceptor verified. Handshakes run in their own tasks (bounded by a
/// timeout), so a slow or silent client cannot hold up the others; failed
/// handshakes are logged with the peer address and dropped.
pub fn tls_accept_stream(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    cancel: CancellationToken,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = cancel.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                                .await;
                        match handshake {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(error)) => {
                                tracing::warn!(%peer, %error, "rejected a TLS connection");
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "rejected a TLS connection: no handshake within 10s");
                            }
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn watch_signals(
    reasons: tokio::sync::mpsc::Sender<ServeExit>,
    cancel: CancellationToken,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| LifecycleError::io("install handler for", "SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| LifecycleError::io("install handler for", "SIGINT", e))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = cancel.cancelled() => return,
        }
        // Cancel before logging: nothing after this point may keep the
        // server from stopping.
        let _ = reasons.try_send(ServeExit::Signal);
        cancel.cancel();
        tracing::info!("stop signal received");
    });
    Ok(())
}

/// Cancels `cancel` when process `parent` exits. Uses a pidfd where the
/// kernel has them, else polls `getppid`.
fn watch_parent(
    parent: u32,
    reasons: tokio::sync::mpsc::Sender<ServeExit>,
    cancel: CancellationToken,
) -> Result<()> {
    let parent_raw =
        i32::try_from(parent).map_err(|_| LifecycleError::ParentGone { pid: parent })?;
    let pidfd = crate::sys::pidfd_open(parent).ok();
    // Checked after opening the pidfd: if the parent is still our parent
    // now, the pidfd cannot refer to a recycled pid.
    if nix::unistd::getppid().as_raw() != parent_raw {
        return Err(LifecycleError::ParentGone { pid: parent });
    }
    tokio::spawn(async move {
        let exited = async {
            if let Some(fd) = pidfd
                && crate::sys::wait_pidfd(fd).await.is_ok()
            {
                return;
            }
            while nix::unistd::getppid().as_raw() == parent_raw {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            () = exited => {}
            () = cancel.cancelled() => return,
        }
        // Cancel before logging: with the parent gone, our stderr is most
        // likely a broken pipe, and nothing may keep the server running.
        let _ = reasons.try_send(ServeExit::ParentExited);
        cancel.cancel();
        tracing::info!(parent, "parent process exited; stopping");
    });
    Ok(())
}
