//! Mutual TLS for the replication protocol: both ends present a certificate from the site's CA
//! ([`crate::pki`]), TLS 1.3 only, and each checks that the other's certificate names the role
//! and name its handshake frame claims. A plain TCP client, or one whose certificate another CA
//! issued, is refused with a reason that names the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::pki::{CertRole, identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "could not read {}: {why}; issue the component's certificate with `boomerang pki issue CA_DIR --name NAME --role ROLE` and pass its directory",
        path.display()
    )]
    Files { path: PathBuf, why: String },
    #[error("the TLS settings are unusable: {0}")]
    Config(String),
    #[error(
        "{peer} did not start a TLS handshake: every Boomerang component talks mutual TLS only; start it with its certificate directory"
    )]
    NotTls { peer: String },
    #[error(
        "{peer} presented a certificate that this site's CA did not issue ({why}): issue it from the same CA with `boomerang pki issue`"
    )]
    ForeignCertificate { peer: String, why: String },
    #[error(
        "{peer} presented no certificate: components must use a certificate from `boomerang pki issue`"
    )]
    NoCertificate { peer: String },
    #[error("the TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
}

/// A component's certificate, key and CA, from a directory written by `pki issue`.
pub struct TlsIdentity {
    pub dir: PathBuf,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            dir: self.dir.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Reads `ca.crt`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let files = |name: &str, why: String| TlsError::Files {
            path: dir.join(name),
            why,
        };
        let ca = CertificateDer::from_pem_file(dir.join("ca.crt"))
            .map_err(|e| files("ca.crt", e.to_string()))?;
        let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| files("cert.pem", e.to_string()))?;
        if chain.is_empty() {
            return Err(files("cert.pem", "it holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))
            .map_err(|e| files("key.pem", e.to_string()))?;
        Ok(TlsIdentity {
            dir: dir.to_path_buf(),
            ca,
            chain,
            key,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("ca.crt in {}: {e}", self.dir.display())))?;
        Ok(Arc::new(roots))
    }

    /// The settings of a server that takes only clients with a certificate from this CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg)?;
        Ok(Arc::new(config))
    }

    /// The settings of an HTTPS server (the configuration server's API): this certificate,
    /// no client certificate asked for (users bring bearer tokens), HTTP/1.1.
    pub fn https_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The settings of a client that trusts only servers with a certificate from this CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg)?;
        Ok(Arc::new(config))
    }
}

/// The settings of a client of the configuration server's HTTPS API. It trusts only the
/// site's CA (`ca_pem`), and only a certificate that carries the configuration server's own
/// identity name, whatever address it was reached at: a component's certificate from the same
/// CA, even one valid for that address, is refused, so a component cannot pose as the server
/// and collect users' tokens.
pub fn api_client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let ca = CertificateDer::from_pem_slice(ca_pem)
        .map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let name = ServerName::try_from(identity(CertRole::Server, "server"))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(cfg)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerIdentity { inner, name }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks a server certificate against the configuration server's identity name instead of
/// the address dialled (see [`api_client_config`]).
#[derive(Debug)]
struct ServerIdentity {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for ServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a handshake failed, in the words of [`TlsError`].
fn explain(peer: String, e: std::io::Error) -> TlsError {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidMessage(_)) | Some(Error::InappropriateMessage { .. }) => {
            TlsError::NotTls { peer }
        }
        Some(Error::NoCertificatesPresented) => TlsError::NoCertificate { peer },
        Some(Error::InvalidCertificate(
            why @ (CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::BadEncoding),
        )) => TlsError::ForeignCertificate {
            peer,
            why: format!("{why:?}"),
        },
        Some(other) => TlsError::Handshake {
            peer,
            why: other.to_string(),
        },
        None => TlsError::Handshake {
            peer,
            why: e.to_string(),
        },
    }
}

/// A server's side of the TLS handshake on an accepted connection.
pub async fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, TlsError> {
    let peer = peer_of(&tcp);
    tokio_rustls::TlsAcceptor::from(config)
        .accept(tcp)
        .await
        .map_err(|e| explain(peer, e))
}

/// A client's side: connects to `host` (the name or address in the server's certificate).
pub async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let peer = peer_of(&tcp);
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Config(format!("{host:?} is not a host name or IP address")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| explain(peer, e))
}

fn peer_of(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "the peer".to_string(), |a: SocketAddr| a.to_string())
}

/// Checks that `certs` (the peer's chain, already verified against the CA) belong to `name` in
/// `role`: the check a server runs on a client's `Hello`, and a client on a server's `Welcome`.
pub fn vouch(
    certs: Option<&[CertificateDer<'_>]>,
    role: CertRole,
    name: &str,
) -> Result<(), String> {
    let cert = certs
        .and_then(|c| c.first())
        .ok_or("the peer presented no certificate")?;
    let end = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("its certificate is unreadable: {e}"))?;
    let id = identity(role, name);
    let subject = ServerName::try_from(id.as_str())
        .map_err(|_| format!("{name:?} is not a valid component name"))?;
    end.verify_is_valid_for_subject_name(&subject).map_err(|_| {
        format!(
            "its certificate is not issued to {} {name} ({id}): issue one for that name and role, or correct the name it is started with",
            role.label()
        )
    })
}

/// The certificate chain a peer presented on `conn` (empty if none).
pub fn peer_certs(conn: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    conn.peer_certificates().unwrap_or_default().to_vec()
}

/// The reading half of a client connection.
pub type ClientReader =
    crate::FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>;
/// The writing half of a client connection.
pub type ClientWriter =
    crate::FrameWriter<tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Why a client could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("could not reach {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Wire(#[from] crate::WireError),
}

/// Connects to `addr` (`host:port`) as `name` in `role`, runs the TLS and protocol handshakes,
/// and checks that the server is an `expect` whose certificate backs what it says.
pub async fn dial(
    identity: &TlsIdentity,
    addr: &str,
    role: crate::Role,
    name: &str,
    expect: crate::Role,
) -> Result<(ClientReader, ClientWriter, crate::Peer), DialError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = connect(identity.client_config()?, host, tcp).await?;
    let certs = peer_certs(stream.get_ref().1);
    let (r, w) = tokio::io::split(stream);
    let (mut rd, mut wr) = (crate::FrameReader::new(r), crate::FrameWriter::new(w));
    let peer = crate::connect(&mut rd, &mut wr, role, name, expect, |role, name| {
        vouch(Some(&certs), CertRole::Wire(role), name)
    })
    .await?;
    Ok((rd, wr, peer))
}
