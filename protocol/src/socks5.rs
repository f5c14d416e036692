//! SOCKS5 (RFC 1928) and username/password authentication (RFC 1929): pure parsers and
//! encoders over byte slices.
//!
//! Parsers return `Ok(None)` when more bytes are needed and `Ok(Some((value, used)))` once a
//! whole message is in. Errors say exactly what to send back through
//! [`SocksError::response`], so the listener never has to guess a reply code.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// Protocol version byte.
pub const VERSION: u8 = 5;
/// Sub-negotiation version of RFC 1929.
pub const USERPASS_VERSION: u8 = 1;

/// Authentication methods (RFC 1928 §3).
pub mod method {
    /// No authentication.
    pub const NO_AUTH: u8 = 0x00;
    /// Username/password (RFC 1929).
    pub const USER_PASS: u8 = 0x02;
    /// No acceptable method: the client must close.
    pub const NO_ACCEPTABLE: u8 = 0xFF;
}

/// Reply codes (RFC 1928 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// 0x00.
    Succeeded = 0x00,
    /// 0x01.
    GeneralFailure = 0x01,
    /// 0x02: connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03.
    NetworkUnreachable = 0x03,
    /// 0x04.
    HostUnreachable = 0x04,
    /// 0x05.
    ConnectionRefused = 0x05,
    /// 0x06.
    TtlExpired = 0x06,
    /// 0x07.
    CommandNotSupported = 0x07,
    /// 0x08.
    AddressTypeNotSupported = 0x08,
}

/// The client's method offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Offered methods, 1 to 255.
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Picks our method: username/password when we require it, otherwise no-auth; returns
    /// [`method::NO_ACCEPTABLE`] if the client did not offer it.
    pub fn choose(&self, require_auth: bool) -> u8 {
        let wanted = if require_auth {
            method::USER_PASS
        } else {
            method::NO_AUTH
        };
        if self.methods.contains(&wanted) {
            wanted
        } else {
            method::NO_ACCEPTABLE
        }
    }
}

/// Credentials of RFC 1929. Bytes, not text: the RFC does not say they are UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name, 1 to 255 bytes.
    pub username: Vec<u8>,
    /// Password, 1 to 255 bytes; redacted in `Debug`.
    pub password: Vec<u8>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"(redacted)")
            .finish()
    }
}

/// The request command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (0x01): the only one hopmesh serves.
    Connect,
    /// BIND (0x02).
    Bind,
    /// UDP ASSOCIATE (0x03).
    UdpAssociate,
}

/// The request's destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetAddr {
    /// ATYP 0x01.
    Ipv4(Ipv4Addr),
    /// ATYP 0x04.
    Ipv6(Ipv6Addr),
    /// ATYP 0x03: a name, 1 to 255 bytes of UTF-8 (checked; not resolved here).
    Domain(String),
}

impl TargetAddr {
    /// The host as text (IPv6 without brackets).
    pub fn host(&self) -> String {
        match self {
            Self::Ipv4(a) => a.to_string(),
            Self::Ipv6(a) => a.to_string(),
            Self::Domain(d) => d.clone(),
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Destination address.
    pub target: TargetAddr,
    /// Destination port, never 0.
    pub port: u16,
}

/// What the listener must send before closing, for a given error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocksResponse {
    /// Close without a byte: not SOCKS5 at all, nothing meaningful to say.
    Close,
    /// Send the method selection `[5, 0xFF]`, then close.
    NoAcceptableMethod,
    /// Send the RFC 1929 failure status `[1, 1]`, then close.
    AuthFailure,
    /// Send this reply, then close.
    Reply(Reply),
}

/// Why a SOCKS message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    /// First byte looks like another protocol (HTTP method letter, TLS handshake record).
    #[error("not SOCKS5: another protocol on the SOCKS port (first byte {0:#04x})")]
    OtherProtocol(u8),
    /// SOCKS4 or another version.
    #[error("unsupported SOCKS version {0}")]
    WrongVersion(u8),
    /// NMETHODS = 0.
    #[error("greeting offers no methods")]
    NoMethods,
    /// Username/password sub-negotiation with a wrong version byte.
    #[error("unsupported auth sub-negotiation version {0}")]
    WrongAuthVersion(u8),
    /// Empty user name or password.
    #[error("empty user name or password")]
    EmptyCredential,
    /// Unknown command byte.
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    /// RSV was not 0.
    #[error("reserved byte is {0:#04x}, must be 0")]
    ReservedNonZero(u8),
    /// ATYP unknown.
    #[error("unsupported address type {0:#04x}")]
    AddressType(u8),
    /// Domain of length 0.
    #[error("empty domain name")]
    EmptyDomain,
    /// Domain not UTF-8.
    #[error("domain name is not UTF-8")]
    DomainNotUtf8,
    /// Port 0.
    #[error("destination port 0")]
    ZeroPort,
}

impl SocksError {
    /// The single mapping from a parse error to what goes on the wire.
    pub fn response(&self) -> SocksResponse {
        match self {
            Self::OtherProtocol(_) | Self::WrongVersion(_) => SocksResponse::Close,
            Self::NoMethods => SocksResponse::NoAcceptableMethod,
            Self::WrongAuthVersion(_) | Self::EmptyCredential => SocksResponse::AuthFailure,
            Self::UnknownCommand(_) => SocksResponse::Reply(Reply::CommandNotSupported),
            Self::AddressType(_) => SocksResponse::Reply(Reply::AddressTypeNotSupported),
            Self::ReservedNonZero(_) | Self::EmptyDomain | Self::DomainNotUtf8 => {
                SocksResponse::Reply(Reply::GeneralFailure)
            }
            Self::ZeroPort => SocksResponse::Reply(Reply::NotAllowed),
        }
    }

    /// A stable snake_case name for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OtherProtocol(_) => "other_protocol",
            Self::WrongVersion(_) => "wrong_version",
            Self::NoMethods => "no_methods",
            Self::WrongAuthVersion(_) => "wrong_auth_version",
            Self::EmptyCredential => "empty_credential",
            Self::UnknownCommand(_) => "unknown_command",
            Self::ReservedNonZero(_) => "reserved_non_zero",
            Self::AddressType(_) => "address_type",
            Self::EmptyDomain => "empty_domain",
            Self::DomainNotUtf8 => "domain_not_utf8",
            Self::ZeroPort => "zero_port",
        }
    }
}

type Parsed<T> = Result<Option<(T, usize)>, SocksError>;

fn check_version(b: u8) -> Result<(), SocksError> {
    match b {
        VERSION => Ok(()),
        // TLS handshake record, or an ASCII letter starting an HTTP method / text protocol.
        0x16 | b'A'..=b'Z' | b'a'..=b'z' => Err(SocksError::OtherProtocol(b)),
        other => Err(SocksError::WrongVersion(other)),
    }
}

/// Parses the method greeting `VER NMETHODS METHODS...`. Refuses another protocol on the
/// first byte, without waiting for more.
pub fn parse_greeting(buf: &[u8]) -> Parsed<Greeting> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    check_version(ver)?;
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + usize::from(n);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    Ok(Some((
        Greeting {
            methods: methods.to_vec(),
        },
        end,
    )))
}

/// Encodes a greeting (client side; for tests and test clients).
pub fn encode_greeting(methods: &[u8]) -> Vec<u8> {
    let mut out = vec![VERSION, u8::try_from(methods.len()).unwrap_or(u8::MAX)];
    out.extend(methods.iter().take(255));
    out
}

/// The server's method selection `[5, method]`.
pub fn encode_method_selection(method: u8) -> [u8; 2] {
    [VERSION, method]
}

/// Parses an RFC 1929 request `VER ULEN UNAME PLEN PASSWD`.
pub fn parse_userpass(buf: &[u8]) -> Parsed<Credentials> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != USERPASS_VERSION {
        return Err(SocksError::WrongAuthVersion(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    let ulen = usize::from(ulen);
    if ulen == 0 {
        return Err(SocksError::EmptyCredential);
    }
    let Some(username) = buf.get(2..2 + ulen) else {
        return Ok(None);
    };
    let Some(&plen) = buf.get(2 + ulen) else {
        return Ok(None);
    };
    let plen = usize::from(plen);
    if plen == 0 {
        return Err(SocksError::EmptyCredential);
    }
    let start = 3 + ulen;
    let Some(password) = buf.get(start..start + plen) else {
        return Ok(None);
    };
    Ok(Some((
        Credentials {
            username: username.to_vec(),
            password: password.to_vec(),
        },
        start + plen,
    )))
}

/// Encodes an RFC 1929 request (client side). Fields longer than 255 bytes are cut.
pub fn encode_userpass(username: &[u8], password: &[u8]) -> Vec<u8> {
    let u = &username[..username.len().min(255)];
    let p = &password[..password.len().min(255)];
    let mut out = vec![USERPASS_VERSION];
    out.push(u.len() as u8);
    out.extend_from_slice(u);
    out.push(p.len() as u8);
    out.extend_from_slice(p);
    out
}

/// The RFC 1929 status `[1, 0]` on success, `[1, 1]` on failure.
pub fn encode_userpass_status(ok: bool) -> [u8; 2] {
    [USERPASS_VERSION, if ok { 0 } else { 1 }]
}

/// Parses a request `VER CMD RSV ATYP DST.ADDR DST.PORT`.
pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    check_version(ver)?;
    let Some(&cmd) = buf.get(1) else {
        return Ok(None);
    };
    let command = match cmd {
        0x01 => Command::Connect,
        0x02 => Command::Bind,
        0x03 => Command::UdpAssociate,
        other => return Err(SocksError::UnknownCommand(other)),
    };
    let Some(&rsv) = buf.get(2) else {
        return Ok(None);
    };
    if rsv != 0 {
        return Err(SocksError::ReservedNonZero(rsv));
    }
    let Some(&atyp) = buf.get(3) else {
        return Ok(None);
    };
    let (target, addr_end) = match atyp {
        0x01 => {
            let Some(b) = buf.get(4..8) else {
                return Ok(None);
            };
            (TargetAddr::Ipv4(Ipv4Addr::new(b[0], b[1], b[2], b[3])), 8)
        }
        0x04 => {
            let Some(b) = buf.get(4..20).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                return Ok(None);
            };
            (TargetAddr::Ipv6(Ipv6Addr::from(b)), 20)
        }
        0x03 => {
            let Some(&len) = buf.get(4) else {
                return Ok(None);
            };
            if len == 0 {
                return Err(SocksError::EmptyDomain);
            }
            let end = 5 + usize::from(len);
            let Some(name) = buf.get(5..end) else {
                return Ok(None);
            };
            let name = std::str::from_utf8(name).map_err(|_| SocksError::DomainNotUtf8)?;
            (TargetAddr::Domain(name.to_owned()), end)
        }
        other => return Err(SocksError::AddressType(other)),
    };
    let Some(port) = buf.get(addr_end..addr_end + 2) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    if port == 0 {
        return Err(SocksError::ZeroPort);
    }
    Ok(Some((
        Request {
            command,
            target,
            port,
        },
        addr_end + 2,
    )))
}

fn encode_addr(out: &mut Vec<u8>, target: &TargetAddr) {
    match target {
        TargetAddr::Ipv4(a) => {
            out.push(0x01);
            out.extend_from_slice(&a.octets());
        }
        TargetAddr::Ipv6(a) => {
            out.push(0x04);
            out.extend_from_slice(&a.octets());
        }
        TargetAddr::Domain(d) => {
            let d = &d.as_bytes()[..d.len().min(255)];
            out.push(0x03);
            out.push(d.len() as u8);
            out.extend_from_slice(d);
        }
    }
}

/// Encodes a request (client side; for tests and test clients).
pub fn encode_request(req: &Request) -> Vec<u8> {
    let cmd = match req.command {
        Command::Connect => 0x01,
        Command::Bind => 0x02,
        Command::UdpAssociate => 0x03,
    };
    let mut out = vec![VERSION, cmd, 0];
    encode_addr(&mut out, &req.target);
    out.extend_from_slice(&req.port.to_be_bytes());
    out
}

/// Encodes a reply. `bound` is the server-side address; hopmesh sends `0.0.0.0:0` (the
/// app does not need the relay's address, and we do not reveal it).
pub fn encode_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![VERSION, reply as u8, 0];
    let bound = bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    match bound {
        SocketAddr::V4(a) => encode_addr(&mut out, &TargetAddr::Ipv4(*a.ip())),
        SocketAddr::V6(a) => encode_addr(&mut out, &TargetAddr::Ipv6(*a.ip())),
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Parses a reply (client side): returns the REP byte and the bytes used.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(u8, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::WrongVersion(ver));
    }
    let (Some(&rep), Some(&atyp)) = (buf.get(1), buf.get(3)) else {
        return Ok(None);
    };
    let len = match atyp {
        0x01 => 10,
        0x04 => 22,
        0x03 => match buf.get(4) {
            Some(&n) => 7 + usize::from(n),
            None => return Ok(None),
        },
        other => return Err(SocksError::AddressType(other)),
    };
    Ok((buf.len() >= len).then_some((rep, len)))
}

#[cfg(test)]
mod tests;
