//! The site's CA and mutual TLS: certificates from `pki`, connections over real TCP on
//! loopback, and the refusals of a plain client, a foreign certificate and a false claim.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use boomerang_wire::pki::{self, CertRole, PkiError};
use boomerang_wire::tls::{self, TlsError, TlsIdentity};
use boomerang_wire::{ErrorCode, FrameReader, FrameWriter, Peer, Role, WireError, accept};
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};

fn agent() -> CertRole {
    CertRole::Wire(Role::Agent)
}

/// A process server "ps1" on loopback that runs the TLS and wire handshakes with one client
/// and reports how each went.
async fn serve_once(ca: &Path) -> (String, tokio::task::JoinHandle<Result<Peer, String>>) {
    let id = TlsIdentity::load(&ca.join("issued/ps1")).unwrap();
    let config = id.server_config().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tls::accept(config, tcp).await.map_err(|e| e.to_string())?;
        let certs = tls::peer_certs(tls.get_ref().1);
        let (r, w) = tokio::io::split(tls);
        let (mut rd, mut wr) = (FrameReader::new(r), FrameWriter::new(w));
        accept(
            &mut rd,
            &mut wr,
            Role::ProcessServer,
            "ps1",
            &[Role::Agent],
            |role, name| tls::vouch(Some(&certs), CertRole::Wire(role), name),
        )
        .await
        .map_err(|e| e.to_string())
    });
    (addr, task)
}

/// An agent that dials `addr` with the certificate in `dir` and claims to be `name`.
async fn dial(addr: &str, dir: &Path, name: &str) -> Result<Peer, String> {
    let id = TlsIdentity::load(dir).map_err(|e| e.to_string())?;
    match tls::dial(&id, addr, Role::Agent, name, Role::ProcessServer).await {
        Ok((_, _, peer)) => Ok(peer),
        Err(tls::DialError::Wire(WireError::Refused { code, message })) => {
            Err(format!("refused ({}): {message}", code.code()))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn site(dir: &Path) {
    pki::init_ca(dir).unwrap();
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    pki::issue(dir, "ps1", CertRole::Wire(Role::ProcessServer), &hosts, 30).unwrap();
    pki::issue(dir, "web01", agent(), &[], 30).unwrap();
}

#[test]
fn the_ca_is_created_once_and_issues_named_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    assert!(matches!(
        pki::issue(&ca, "web01", agent(), &[], 30),
        Err(PkiError::NoCa { .. })
    ));
    pki::init_ca(&ca).unwrap();
    let mode = std::fs::metadata(ca.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    assert!(matches!(pki::init_ca(&ca), Err(PkiError::CaExists { .. })));
    for bad in ["", "Web01", "web_01", "-web", &"a".repeat(64)] {
        assert!(
            matches!(
                pki::issue(&ca, bad, agent(), &[], 30),
                Err(PkiError::BadName(_))
            ),
            "{bad:?}"
        );
    }
    for host in ["ps1.process-server.boomerang.internal", "*.example"] {
        assert!(
            matches!(
                pki::issue(&ca, "web01", agent(), &[host.into()], 30),
                Err(PkiError::BadHost(_))
            ),
            "{host}"
        );
    }
    let issued = pki::issue(&ca, "web01", agent(), &["db.example".into()], 30).unwrap();
    assert_eq!(issued.identity, "web01.agent.boomerang.internal");
    for file in ["cert.pem", "key.pem", "ca.crt"] {
        assert!(issued.dir.join(file).is_file(), "{file}");
    }
    assert_eq!(pki::identity_name(&issued.dir).as_deref(), Some("web01"));
    std::fs::write(issued.dir.join("name"), "Not A Name").unwrap();
    assert_eq!(
        pki::identity_name(&issued.dir),
        None,
        "an invalid name is not taken"
    );
    let mode = std::fs::metadata(issued.dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The certificate names its holder, and only its holder.
    let id = std::fs::read(issued.dir.join("cert.pem")).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&id).unwrap();
    let certs: Vec<CertificateDer<'static>> = vec![der];
    tls::vouch(Some(&certs), agent(), "web01").unwrap();
    let wrong = tls::vouch(Some(&certs), agent(), "web02").unwrap_err();
    assert!(wrong.contains("not issued to agent web02"), "{wrong}");
    assert!(tls::vouch(Some(&certs), CertRole::Wire(Role::MasterTarget), "web01").is_err());
    assert!(matches!(
        TlsIdentity::load(&ca.join("issued/nobody")),
        Err(TlsError::Files { .. })
    ));
}

#[tokio::test]
async fn mutual_tls_admits_the_sites_components_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    site(&ca);

    // The site's agent, under its own name.
    let (addr, server) = serve_once(&ca).await;
    let peer = dial(&addr, &ca.join("issued/web01"), "web01")
        .await
        .unwrap();
    assert_eq!(
        (peer.role, peer.name.as_str()),
        (Role::ProcessServer, "ps1")
    );
    let client = server.await.unwrap().unwrap();
    assert_eq!((client.role, client.name.as_str()), (Role::Agent, "web01"));

    // The same certificate claiming another machine's name.
    let (addr, server) = serve_once(&ca).await;
    let refused = dial(&addr, &ca.join("issued/web01"), "web02")
        .await
        .unwrap_err();
    assert!(
        refused.contains(&format!("refused ({})", ErrorCode::Role.code()))
            && refused.contains("not issued to agent web02"),
        "{refused}"
    );
    assert!(
        server
            .await
            .unwrap()
            .unwrap_err()
            .contains("web02 says it is an agent")
    );

    // Plain TCP, speaking the protocol without TLS.
    let (addr, server) = serve_once(&ca).await;
    {
        use tokio::io::AsyncWriteExt;
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let mut hello = b"BMRGWIRE".to_vec();
        boomerang_wire::Frame::Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Agent,
            name: "web01".into(),
        }
        .encode(&mut hello)
        .unwrap();
        let _ = tcp.write_all(&hello).await;
        let why = server.await.unwrap().unwrap_err();
        assert!(why.contains("did not start a TLS handshake"), "{why}");
    }

    // A certificate from another CA, presented to this site's process server.
    let other = dir.path().join("other-ca");
    site(&other);
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(ca.join("ca.crt"), mixed.join("ca.crt")).unwrap();
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(other.join("issued/web01").join(file), mixed.join(file)).unwrap();
    }
    let (addr, server) = serve_once(&ca).await;
    let _ = dial(&addr, &mixed, "web01").await.unwrap_err();
    let why = server.await.unwrap().unwrap_err();
    assert!(why.contains("this site's CA did not issue"), "{why}");

    // And the other CA's agent, which trusts only its own CA, refuses this site's server.
    let (addr, server) = serve_once(&ca).await;
    let why = dial(&addr, &other.join("issued/web01"), "web01")
        .await
        .unwrap_err();
    assert!(why.contains("this site's CA did not issue"), "{why}");
    assert!(server.await.unwrap().is_err());
}
