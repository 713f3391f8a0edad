//! The cluster PKI: a cluster CA, node certificates and the admin client certificate, and the
//! tonic TLS configurations that require them on both ends (mutual TLS).
//!
//! Every node certificate carries the DNS name [`SERVER_NAME`] (clients verify that name, so a
//! node is reachable under any address) plus the node's IP addresses, and is valid for both server
//! and client authentication. Keys are ECDSA P-256 and written with mode 0600.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The DNS name every node certificate holds and every client verifies.
pub const SERVER_NAME: &str = "raftsan-node";
/// Common name of the cluster CA.
pub const CA_COMMON_NAME: &str = "raftsan-cluster-ca";
/// Common name of the admin client certificate.
pub const ADMIN_COMMON_NAME: &str = "raftsan-admin";
/// File names of the CA in its directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

/// The three PEM files a node or the admin client presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn pki_err(what: &str, e: rcgen::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn read_pem(path: &Path, what: &str) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

/// Writes `data` to `path` (created or truncated) with `mode`, and syncs it.
fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    f.write_all(data)?;
    f.sync_all()
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

/// Creates a new cluster CA: `dir/ca.crt` and `dir/ca.key` (mode 0600). Refuses to overwrite an
/// existing CA key.
pub fn create_ca(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("CA key {} already exists", key_path.display()),
        ));
    }
    let key = KeyPair::generate().map_err(|e| pki_err("generate CA key", e))?;
    let cert = ca_params().self_signed(&key).map_err(|e| pki_err("self-sign CA", e))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), 0o644)
}

/// Loads the CA key of `ca_dir` as an issuer. The issuer's name and key identifier are derived
/// from the fixed CA parameters and the key, exactly as when the CA was created.
fn load_issuer(ca_dir: &Path) -> io::Result<Issuer<'static, KeyPair>> {
    let key_pem = read_pem(&ca_dir.join(CA_KEY_FILE), "CA key")?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| pki_err("parse CA key", e))?;
    Ok(Issuer::new(ca_params(), key))
}

fn issue(
    ca_dir: &Path,
    common_name: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    out_dir: &Path,
    stem: &str,
) -> io::Result<TlsFiles> {
    let issuer = load_issuer(ca_dir)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate().map_err(|e| pki_err("generate key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err(&format!("sign certificate {common_name}"), e))?;
    fs::create_dir_all(out_dir)?;
    let files = TlsFiles {
        ca_cert: out_dir.join(CA_CERT_FILE),
        cert: out_dir.join(format!("{stem}.crt")),
        key: out_dir.join(format!("{stem}.key")),
    };
    let ca_src = ca_dir.join(CA_CERT_FILE);
    if ca_src != files.ca_cert {
        let ca_pem = read_pem(&ca_src, "CA certificate")?;
        write_file(&files.ca_cert, ca_pem.as_bytes(), 0o644)?;
    }
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// Issues the certificate of node `node_id`: `out_dir/node-<id>.crt` and `.key` (0600), CN
/// `raftsan-node-<id>`, SAN DNS [`SERVER_NAME`] plus `ips`, server and client authentication.
/// `out_dir/ca.crt` receives a copy of the CA certificate.
pub fn issue_node_cert(ca_dir: &Path, node_id: u64, ips: &[IpAddr], out_dir: &Path) -> io::Result<TlsFiles> {
    let dns = SERVER_NAME
        .to_string()
        .try_into()
        .map_err(|e| pki_err("server name", e))?;
    let mut sans = vec![SanType::DnsName(dns)];
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    issue(
        ca_dir,
        &format!("raftsan-node-{node_id}"),
        sans,
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        out_dir,
        &format!("node-{node_id}"),
    )
}

/// Issues the admin client certificate: `out_dir/admin.crt` and `.key` (0600), CN
/// `raftsan-admin`, client authentication only.
pub fn issue_admin_cert(ca_dir: &Path, out_dir: &Path) -> io::Result<TlsFiles> {
    issue(
        ca_dir,
        ADMIN_COMMON_NAME,
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        out_dir,
        "admin",
    )
}

fn load(files: &TlsFiles) -> io::Result<(Certificate, Identity)> {
    let ca = read_pem(&files.ca_cert, "CA certificate")?;
    let cert = read_pem(&files.cert, "certificate")?;
    let key = read_pem(&files.key, "key")?;
    Ok((Certificate::from_pem(ca), Identity::from_pem(cert, key)))
}

/// Server TLS: presents `files.cert`, and REQUIRES a client certificate signed by the cluster CA
/// (a client without one fails the handshake).
pub fn server_tls(files: &TlsFiles) -> io::Result<ServerTlsConfig> {
    let (ca, identity) = load(files)?;
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca)
        .client_auth_optional(false))
}

/// Client TLS: presents `files.cert` and accepts only a server certificate signed by the cluster
/// CA for the name [`SERVER_NAME`].
pub fn client_tls(files: &TlsFiles) -> io::Result<ClientTlsConfig> {
    let (ca, identity) = load(files)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .domain_name(SERVER_NAME))
}
