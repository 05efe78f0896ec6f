//! `openshell-gateway certs init DIR`: a private CA and the certificates a
//! multi-host deployment needs, written 0600 into a 0700 directory.
//!
//! | file | what | used by |
//! |---|---|---|
//! | `ca.pem`, `ca.key` | the CA (keep `ca.key` offline once done) | everyone trusts `ca.pem` |
//! | `gateway.pem`, `gateway.key` | the gateway: server auth (its tcp:// listener) and client auth (towards remote drivers) | `--tls-cert/--tls-key`, `--driver-tls-cert/--driver-tls-key` |
//! | `cli.pem`, `cli.key` | the CLI: client auth | `openshell --tls-cert/--tls-key` |
//! | `driver-NAME.pem`, `driver-NAME.key` | one per remote driver: server auth | the driver's `--tls-cert/--tls-key` |
//!
//! Server certificates name `localhost`, `127.0.0.1`, `::1` and every
//! `--host`/`--ip` given. One CA signs everything, so any holder of a client
//! certificate from it is trusted by every server that trusts `ca.pem`:
//! make one CA per deployment.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::drivers::plan::normalize_name;
use crate::error::{Error, Result};

/// What `certs init` makes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InitArgs {
    /// Directory to write into (created 0700; must not already hold a CA).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// A remote driver to issue a server certificate for
    /// (`driver-NAME.pem`). Repeatable.
    #[arg(long = "driver", value_name = "NAME")]
    pub drivers: Vec<String>,

    /// A DNS name the gateway and drivers are reached by (added to every
    /// server certificate). Repeatable.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,

    /// An IP address the gateway and drivers are reached by. Repeatable.
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<IpAddr>,

    /// Validity of every certificate, in days.
    #[arg(long, value_name = "DAYS", default_value_t = 825)]
    pub days: u32,
}

/// `openshell-gateway certs ...`
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "openshell-gateway certs",
    about = "Certificates for TCP with mutual TLS"
)]
pub struct CertsCli {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertsCommand {
    /// Write a CA, a gateway certificate, a CLI client certificate and one
    /// server certificate per --driver.
    Init(InitArgs),
}

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Config(format!("could not make the {what}: {e}"))
}

/// Today and `days` later, as rcgen validity bounds (a day of slack
/// before now for clocks that lag).
fn validity(days: u32) -> Result<(time::OffsetDateTime, time::OffsetDateTime)> {
    if days == 0 {
        return Err(Error::Config("--days must be at least 1".to_owned()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Config("the system clock is before 1970".to_owned()))?;
    let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let from = time::OffsetDateTime::from_unix_timestamp(secs - 86_400)
        .map_err(|e| Error::Config(format!("the system clock is out of range: {e}")))?;
    let until =
        time::OffsetDateTime::from_unix_timestamp(secs.saturating_add(i64::from(days) * 86_400))
            .map_err(|e| Error::Config(format!("--days {days} is out of range: {e}")))?;
    Ok((from, until))
}

fn params(common_name: &str, days: u32) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "OpenShell");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    (params.not_before, params.not_after) = validity(days)?;
    Ok(params)
}

fn server_sans(args: &InitArgs) -> Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::DnsName(
            "localhost"
                .try_into()
                .map_err(rcgen_error("localhost name"))?,
        ),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ];
    for host in &args.hosts {
        let name = host
            .clone()
            .try_into()
            .map_err(|e| Error::Config(format!("--host {host:?} is not a DNS name: {e}")))?;
        sans.push(SanType::DnsName(name));
    }
    sans.extend(args.ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

/// Writes `contents` to a new file `path`, 0600, never through a symlink
/// and never over an existing file.
fn write_new(path: &Path, contents: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", path, e))
}

/// Makes the CA and certificates; returns the files written.
pub fn init(args: &InitArgs) -> Result<Vec<PathBuf>> {
    let dir = &args.dir;
    let mut drivers = Vec::new();
    for raw in &args.drivers {
        let name = normalize_name(raw).map_err(|e| Error::Config(format!("--driver: {e}")))?;
        if drivers.contains(&name) {
            return Err(Error::Config(format!("--driver {name} is given twice")));
        }
        drivers.push(name);
    }
    let sans = server_sans(args)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create", dir, e))?;
    if dir.join("ca.key").exists() || dir.join("ca.pem").exists() {
        return Err(Error::Config(format!(
            "{} already holds a CA (ca.pem/ca.key); choose an empty directory, or remove \
             the old files if you mean to replace every certificate",
            dir.display()
        )));
    }

    let ca_key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
    // A name of its own: verifiers find the issuer by name, and two
    // deployments' CAs with one name would fail as a bad signature instead
    // of an unknown CA.
    let ca_name = format!(
        "OpenShell CA {}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut ca_params = params(&ca_name, args.days)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(rcgen_error("CA certificate"))?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut written = Vec::new();
    let mut emit = |stem: &str, cert: &str, key: &str| -> Result<()> {
        let pem = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        write_new(&pem, cert)?;
        write_new(&key_path, key)?;
        written.push(pem);
        written.push(key_path);
        Ok(())
    };
    emit("ca", &ca_cert.pem(), &ca_key.serialize_pem())?;

    let leaf = |common_name: &str, server: bool, client: bool| -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(rcgen_error("key"))?;
        let mut params = params(common_name, args.days)?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if server {
            params.subject_alt_names.clone_from(&sans);
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen_error("certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (cert, key) = leaf("openshell-gateway", true, true)?;
    emit("gateway", &cert, &key)?;
    let (cert, key) = leaf("openshell-cli", false, true)?;
    emit("cli", &cert, &key)?;
    for name in &drivers {
        let (cert, key) = leaf(&format!("openshell-driver {name}"), true, false)?;
        emit(&format!("driver-{name}"), &cert, &key)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn init_writes_private_files_and_refuses_to_overwrite() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("certs");
        let args = InitArgs {
            dir: dir.clone(),
            drivers: vec!["Remote-Podman".to_owned()],
            hosts: vec!["gw.example".to_owned()],
            ips: vec!["10.0.0.5".parse().expect("ip")],
            days: 30,
        };
        let written = init(&args).expect("init");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        for expected in [
            "ca.pem",
            "ca.key",
            "gateway.pem",
            "gateway.key",
            "cli.pem",
            "cli.key",
            "driver-remote-podman.pem",
            "driver-remote-podman.key",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        for path in &written {
            let mode = fs::metadata(path).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert_eq!(
            fs::metadata(&dir).expect("stat").permissions().mode() & 0o777,
            0o700
        );
        // The files are what the TLS code reads.
        let tls = openshell_wire::tls::ServerTls {
            identity: openshell_wire::tls::KeyPair {
                cert: dir.join("driver-remote-podman.pem"),
                key: dir.join("driver-remote-podman.key"),
            },
            client_ca: dir.join("ca.pem"),
        };
        tls.acceptor().expect("a usable server identity");
        let error = init(&args).expect_err("second init").to_string();
        assert!(error.contains("already holds a CA"), "{error}");
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("c");
        let args = InitArgs {
            dir: dir.clone(),
            drivers: vec!["a/b".to_owned()],
            days: 1,
            ..InitArgs::default()
        };
        assert!(
            init(&args)
                .expect_err("bad name")
                .to_string()
                .contains("--driver")
        );
        assert!(!dir.exists());
        let args = InitArgs {
            dir: dir.clone(),
            days: 0,
            ..InitArgs::default()
        };
        assert!(init(&args).is_err());
    }
}
