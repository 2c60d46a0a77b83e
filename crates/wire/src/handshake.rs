//! Opening a connection: the client's magic and `Hello`, the server's `Welcome` with the
//! version chosen, or an `Error` frame that says why not.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::frame::{ErrorCode, Frame, MAX_VERSION, MIN_VERSION, Role};
use crate::io::{FrameReader, FrameWriter, WireError};

/// The other end of a connection, as its handshake introduced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The protocol version both ends speak from now on.
    pub version: u16,
    pub role: Role,
    pub name: String,
}

/// The highest version in both ranges.
pub fn choose_version(min: u16, max: u16) -> Option<u16> {
    let v = max.min(MAX_VERSION);
    (v >= min && v >= MIN_VERSION).then_some(v)
}

/// Whether a peer's credentials (its TLS certificate) back the role and name it claims; `Err`
/// says why not. [`crate::tls::vouch`] is the check for TLS connections.
pub trait Vouch: FnOnce(Role, &str) -> Result<(), String> {}
impl<F: FnOnce(Role, &str) -> Result<(), String>> Vouch for F {}

/// The client's side: introduces itself as `role` named `name`, and accepts a server that is
/// an `expect` and whose credentials `vouch` backs.
pub async fn connect<R, W>(
    rd: &mut FrameReader<R>,
    wr: &mut FrameWriter<W>,
    role: Role,
    name: &str,
    expect: Role,
    vouch: impl Vouch,
) -> Result<Peer, WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_magic().await?;
    wr.send(&Frame::Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        role,
        name: name.to_string(),
    })
    .await?;
    match rd.read().await? {
        Frame::Welcome {
            version,
            role,
            name,
        } if (MIN_VERSION..=MAX_VERSION).contains(&version) => {
            if role != expect {
                return Err(WireError::Protocol(format!(
                    "{name} is {}, where {} was expected: check the address",
                    role.with_article(),
                    expect.with_article()
                )));
            }
            vouch(role, &name).map_err(|why| {
                WireError::Protocol(format!("the server says it is {role} {name}, but {why}"))
            })?;
            Ok(Peer {
                version,
                role,
                name,
            })
        }
        Frame::Welcome { version, .. } => Err(WireError::Protocol(format!(
            "the server chose protocol version {version}, which this build (versions {MIN_VERSION} to {MAX_VERSION}) did not offer"
        ))),
        Frame::Error { code, message } => Err(WireError::Refused { code, message }),
        other => Err(WireError::Protocol(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

/// The server's side: reads the client's introduction, refuses a client whose role is not in
/// `accepted`, whose versions do not overlap ours, or whose credentials `vouch` does not back
/// (telling it why), and welcomes the rest.
pub async fn accept<R, W>(
    rd: &mut FrameReader<R>,
    wr: &mut FrameWriter<W>,
    role: Role,
    name: &str,
    accepted: &[Role],
    vouch: impl Vouch,
) -> Result<Peer, WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    rd.read_magic().await?;
    let (min, max, peer_role, peer_name) = match rd.read().await? {
        Frame::Hello {
            min_version,
            max_version,
            role,
            name,
        } => (min_version, max_version, role, name),
        other => {
            let why = "the first frame must be a hello";
            wr.refuse(ErrorCode::BadFrame, why).await;
            return Err(WireError::Protocol(format!("{why}, got {other:?}")));
        }
    };
    let Some(version) = choose_version(min, max) else {
        let why = format!(
            "{peer_name} speaks replication protocol versions {min} to {max} and this {role} ({name}) speaks {MIN_VERSION} to {MAX_VERSION}: upgrade the older of the two"
        );
        wr.refuse(ErrorCode::Version, &why).await;
        return Err(WireError::Protocol(why));
    };
    if !accepted.contains(&peer_role) {
        let expected: Vec<String> = accepted.iter().map(Role::to_string).collect();
        let why = format!(
            "{peer_name} is {}, and this {role} ({name}) takes connections from {} only: point it at the right component",
            peer_role.with_article(),
            expected.join(" or ")
        );
        wr.refuse(ErrorCode::Role, &why).await;
        return Err(WireError::Protocol(why));
    }
    if let Err(why) = vouch(peer_role, &peer_name) {
        let why = format!(
            "{peer_name} says it is {}, but {why}",
            peer_role.with_article()
        );
        wr.refuse(ErrorCode::Role, &why).await;
        return Err(WireError::Protocol(why));
    }
    wr.send(&Frame::Welcome {
        version,
        role,
        name: name.to_string(),
    })
    .await?;
    Ok(Peer {
        version,
        role: peer_role,
        name: peer_name,
    })
}
