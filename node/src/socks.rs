//! The local SOCKS5 endpoint: CONNECT to mesh names only.
//!
//! Loopback sources only; 5 s handshake deadline; unknown, disallowed, IP-literal and
//! non-mesh targets get REP 0x02 with no network action (no DNS, no dial). By default
//! (`socks_reply = "early"`) the success reply is sent once every local check has passed, and
//! the app's first bytes follow the token and header: one tunnel round trip per connection. A
//! refusal by the far end then resets the app's connection and is counted and audited here;
//! `after_connect` waits for the serving node's backend result and answers with its true code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hopmesh_protocol::control::{FlowAssertion, StreamHeader};
use hopmesh_protocol::flow_seal::{Ephemeral, MAX_RECORD_PAYLOAD, RecordKind};
use hopmesh_protocol::ids::NodeId;
use hopmesh_protocol::routing::EgressRoute;
use hopmesh_protocol::secret::ct_eq;
use hopmesh_protocol::socks5::{
    self, Command, Reply, SocksError, SocksResponse, encode_method_selection, encode_reply,
    encode_userpass_status, method,
};
use hopmesh_protocol::wire::BoundedVec;
use hopmesh_transport::fields;
use hopmesh_transport::quic::codes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::SocksReply;
use crate::counters::Counters;
use crate::peer::Dial;
use crate::refusal::{MintRefusal, RemoteRefusal, SocksRefusal};
use crate::sealed::{
    AnswerCheck, OriginFlow, SealedCut, SealedEnds, origin_keys, origin_status, send_record,
    splice_sealed,
};
use crate::shared::Shared;
use crate::splice::{SpliceEnd, read_status, rst, splice, splice_after_status};
use crate::state::Mint;

/// Whole SOCKS handshake deadline.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// How long to wait for the serving node's backend connect result (the status byte).
pub const STATUS_DEADLINE: Duration = Duration::from_secs(15);
/// Largest handshake message (a request with a 255-byte name is 262 bytes; auth is 513).
const MAX_HANDSHAKE: usize = 1024;

/// Time a client refused at the `socks_max_clients` limit has to send its greeting before the
/// `05 FF` answer (reading the greeting first lets the close be a FIN, not an RST that could
/// discard the answer).
pub const REFUSAL_DEADLINE: Duration = Duration::from_millis(500);
/// Refused clients answered at once (each for at most [`REFUSAL_DEADLINE`]); past it a refused
/// client is closed without an answer (still counted), so a flood costs bounded tasks.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Accepts SOCKS clients until shutdown, at most `socks_max_clients` at once
/// ([`crate::config::NodeConfig::socks_max_clients`]).
pub async fn serve(
    node: Arc<Shared>,
    dial: Arc<dyn Dial>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    let clients = Arc::new(Semaphore::new(node.config.socks_max_clients));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (tcp, from) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or memory: the error repeats at once, so
                // wait instead of spinning; clients queue in the listen backlog meanwhile.
                node.counters.refused("socks_accept_failed");
                let wait = backoff.failed();
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "SOCKS accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => break,
                }
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            node.counters.refused(SocksRefusal::ClientLimit.reason());
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_at_limit(tcp).await;
                    drop(slot);
                });
            } else {
                rst(tcp);
            }
            continue;
        };
        let (node, dial) = (node.clone(), dial.clone());
        tokio::spawn(async move {
            client(node, dial, tcp, from).await;
            drop(permit);
        });
    }
}

/// Answers a client refused at the limit: `05 FF` (no acceptable method, the one refusal a
/// greeting can get), after its greeting or [`REFUSAL_DEADLINE`], then a clean close.
async fn refuse_at_limit(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
        let mut greeting = [0u8; MAX_HANDSHAKE];
        let _ = tcp.read(&mut greeting).await;
    })
    .await;
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
        let _ = tcp
            .write_all(&encode_method_selection(method::NO_ACCEPTABLE))
            .await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// First wait after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait after repeated failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long the accept loop waits after a failed accept: doubling from
/// [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`], reset by a good accept.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// A failed accept: the wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((wait * 2).min(ACCEPT_BACKOFF_MAX));
        wait
    }

    /// A good accept.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

/// RFC 1929 credentials check: both fields compared in constant time (per field length),
/// both always compared.
pub fn credentials_match(user: &[u8], pass: &[u8], want_user: &str, want_pass: &str) -> bool {
    ct_eq(user, want_user.as_bytes()) & ct_eq(pass, want_pass.as_bytes())
}

/// A SOCKS client's socket with our answers not yet written. An answer waits while the
/// client's next message has already arrived, and goes out before any read that must wait:
/// a client that sends its greeting and request together gets the method selection and the
/// reply in one write (one wake-up of the client instead of two); any other client sees
/// exactly the exchange RFC 1928 describes.
struct SocksConn<S = TcpStream> {
    tcp: S,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SocksConn<S> {
    /// Holds `bytes` until the next flush.
    fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Writes what is held.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.tcp.write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// Writes what is held, then `bytes`, in one write.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.queue(bytes);
        self.flush().await
    }
}

/// Reads until `parse` has a whole message or fails; `Ok(None)` on EOF. Held answers are
/// written before a read that has to wait for the client.
async fn read_msg<T, S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut SocksConn<S>,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
) -> Result<Option<T>, SocksError> {
    loop {
        if let Some((v, used)) = parse(buf)? {
            buf.drain(..used);
            return Ok(Some(v));
        }
        if buf.len() >= MAX_HANDSHAKE {
            return Err(SocksError::WrongVersion(0));
        }
        if conn.flush().await.is_err() {
            return Ok(None);
        }
        let mut chunk = [0u8; 512];
        let n = conn.tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn answer(conn: &mut SocksConn, resp: SocksResponse) {
    let bytes = match resp {
        SocksResponse::Close => Vec::new(),
        SocksResponse::NoAcceptableMethod => {
            encode_method_selection(method::NO_ACCEPTABLE).to_vec()
        }
        SocksResponse::AuthFailure => encode_userpass_status(false).to_vec(),
        SocksResponse::Reply(r) => encode_reply(r, None),
    };
    let _ = conn.send(&bytes).await;
}

/// The outcome of the handshake.
enum Handshake {
    /// CONNECT to this host (answers may still be held in the connection).
    Connect(String),
    /// Already answered (or closed); stop.
    Done,
}

async fn handshake(node: &Shared, conn: &mut SocksConn) -> Handshake {
    let mut buf = Vec::new();
    let greeting = match read_msg(conn, &mut buf, socks5::parse_greeting).await {
        Ok(Some(g)) => g,
        Ok(None) => return Handshake::Done,
        Err(e) => {
            node.counters.refused(e.reason());
            answer(conn, e.response()).await;
            return Handshake::Done;
        }
    };
    let auth = node.config.socks_auth.clone();
    let chosen = greeting.choose(auth.is_some());
    if chosen == method::NO_ACCEPTABLE {
        let _ = conn.send(&encode_method_selection(chosen)).await;
        node.counters
            .refused(SocksRefusal::NoAcceptableMethod.reason());
        return Handshake::Done;
    }
    conn.queue(&encode_method_selection(chosen));
    if let Some((user, pass)) = auth {
        let creds = match read_msg(conn, &mut buf, socks5::parse_userpass).await {
            Ok(Some(c)) => c,
            Ok(None) => return Handshake::Done,
            Err(e) => {
                answer(conn, e.response()).await;
                return Handshake::Done;
            }
        };
        let ok = credentials_match(&creds.username, &creds.password, &user, &pass);
        if !ok {
            let _ = conn.send(&encode_userpass_status(false)).await;
            node.counters.refused(SocksRefusal::AuthFailed.reason());
            node.audit("socks_auth_failed", fields! {});
            return Handshake::Done;
        }
        conn.queue(&encode_userpass_status(true));
    }
    let req = match read_msg(conn, &mut buf, socks5::parse_request).await {
        Ok(Some(r)) => r,
        Ok(None) => return Handshake::Done,
        Err(e) => {
            node.counters.refused(e.reason());
            answer(conn, e.response()).await;
            return Handshake::Done;
        }
    };
    if req.command != Command::Connect {
        node.counters
            .refused(SocksRefusal::CommandNotSupported.reason());
        answer(conn, SocksResponse::Reply(Reply::CommandNotSupported)).await;
        return Handshake::Done;
    }
    if !buf.is_empty() {
        // Data before our reply: the client did not wait for the handshake.
        node.counters.refused(SocksRefusal::PipelinedData.reason());
        answer(conn, SocksResponse::Reply(Reply::GeneralFailure)).await;
        return Handshake::Done;
    }
    Handshake::Connect(req.target.host())
}

/// Our stream header for `route`. On a relayed route the origin signs the flow end to end,
/// with a fresh key for sealing its bytes ([`crate::sealed`]): the flow is returned with it.
fn stream_header(node: &Shared, route: &EgressRoute) -> Option<(Vec<u8>, Option<OriginFlow>)> {
    let st = node.state_read();
    let epoch = st.epoch.epoch_at(node.now());
    let flow = match route.via {
        None => None,
        Some(_) => {
            let ephemeral = Ephemeral::generate(&ring::rand::SystemRandom::new()).ok()?;
            let (env, _) = st.attestation.as_ref()?;
            let assertion = FlowAssertion::sign(
                node.identity.signing_key(),
                env,
                route.serving_node,
                route.service,
                epoch,
                rand::random(),
                ephemeral.public(),
            )?;
            Some(OriginFlow {
                assertion,
                ephemeral,
            })
        }
    };
    let header = StreamHeader {
        origin: node.local,
        service: route.service,
        route: BoundedVec::empty(),
        assertion: flow.as_ref().map(|f| f.assertion.clone()),
    }
    .encode()
    .ok()?;
    Some((header, flow))
}

async fn client(node: Arc<Shared>, dial: Arc<dyn Dial>, tcp: TcpStream, from: SocketAddr) {
    if !from.ip().is_loopback() {
        let why = SocksRefusal::NonLoopbackSource;
        node.counters.refused(why.reason());
        node.audit(
            "socks_refused",
            fields! {"from" => from.to_string(), "reason" => why.audit_text()},
        );
        return rst(tcp);
    }
    let _ = tcp.set_nodelay(true);
    let mut tcp = SocksConn {
        tcp,
        out: Vec::new(),
    };
    let host = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(&node, &mut tcp)).await {
        Ok(Handshake::Connect(h)) => h,
        Ok(Handshake::Done) => return,
        Err(_) => {
            node.counters
                .refused(SocksRefusal::HandshakeTimeout.reason());
            return;
        }
    };
    let reply = |r| encode_reply(r, None);
    // Route: a pure decision, before any network action.
    let decided = node.state_read().route(&host, node.now());
    let route = match decided {
        Ok(r) => r,
        Err(why) => {
            if why.counted() {
                node.counters.refused(why.reason());
            }
            node.audit(
                "socks_refused",
                fields! {"target" => host.as_str(), "reason" => why.audit_text()},
            );
            let _ = tcp.send(&reply(Reply::NotAllowed)).await;
            return;
        }
    };
    // The first hop: the serving node itself, or the relay the route goes through.
    let first_hop = route.via.unwrap_or(route.serving_node);
    let pc = match dial.connection_to(first_hop).await {
        Ok(pc) => pc,
        Err(e) => {
            node.counters
                .refused(SocksRefusal::PeerUnreachable.reason());
            tracing::debug!(target = %host, error = %e, "no connection to the serving node");
            let _ = tcp.send(&reply(Reply::HostUnreachable)).await;
            return;
        }
    };
    let Ok((mut send, mut recv)) = pc.conn.open_bi().await else {
        let _ = tcp.send(&reply(Reply::HostUnreachable)).await;
        return;
    };
    let mut sealed = None;
    let minted = stream_header(&node, &route)
        .ok_or(MintRefusal::NoSeedForPeer)
        .and_then(|(header, flow)| {
            sealed = flow;
            let mint = Mint {
                dst: first_hop,
                service: route.service,
                stream_id: u64::from(send.id()),
                header: &header,
            };
            let token = node.state_read().mint(
                &mint,
                |seed, pair, generation, epoch| pc.stream_key(seed, pair, generation, epoch),
                node.now(),
            )?;
            Ok([token.as_slice(), &header].concat())
        });
    let first = match minted {
        Ok(first) => first,
        Err(why) => {
            node.counters.refused(SocksRefusal::Mint(why).reason());
            let _ = send.reset(codes::INTERNAL);
            let _ = tcp.send(&reply(Reply::NotAllowed)).await;
            return;
        }
    };
    Counters::add(&node.counters.streams_opened, 1);
    if let Some(flow) = sealed {
        let ended = sealed_client(&node, tcp, send, recv, first, flow, route.serving_node).await;
        return client_ended(&node, first_hop, &host, ended);
    }
    let ended = match node.config.socks_reply {
        SocksReply::Early => {
            // Everything this node can know alone has passed: the app may send now, and the
            // token and header leave with its first bytes. What only the far end knows comes
            // down as the first byte of the stream (`splice_after_status`).
            if tcp.send(&reply(Reply::Succeeded)).await.is_err() {
                let _ = send.reset(codes::INTERNAL);
                return;
            }
            Counters::add(&node.counters.socks_ok, 1);
            let counters = node.counters.clone();
            splice_after_status(tcp.tcp, send, recv, counters, first.into(), STATUS_DEADLINE).await
        }
        SocksReply::AfterConnect => {
            if send.write_all(&first).await.is_err() {
                let _ = tcp.send(&reply(Reply::HostUnreachable)).await;
                return;
            }
            if let Err(why) = read_status(&mut recv, STATUS_DEADLINE).await {
                let _ = tcp.send(&reply(why.status().socks_reply())).await;
                let _ = send.reset(codes::INTERNAL);
                remote_refused(&node, first_hop, &host, why);
                return;
            }
            if tcp.send(&reply(Reply::Succeeded)).await.is_err() {
                let _ = send.reset(codes::INTERNAL);
                return;
            }
            Counters::add(&node.counters.socks_ok, 1);
            splice(tcp.tcp, send, recv, node.counters.clone()).await
        }
    };
    client_ended(&node, first_hop, &host, ended);
}

fn client_ended(node: &Shared, first_hop: NodeId, host: &str, ended: SpliceEnd) {
    match ended {
        SpliceEnd::Clean { .. } => {}
        SpliceEnd::Refused(why) => remote_refused(node, first_hop, host, why),
        SpliceEnd::Sealed(reason, detail) => {
            // The download direction of a relayed flow did not open: a relay on the path (or
            // the serving node) changed, dropped or cut records.
            node.counters.refused(reason);
            node.audit_refusal(
                "flow_record_refused",
                first_hop,
                reason,
                fields! {"target" => host, "peer" => first_hop.to_string(), "reason" => reason, "detail" => detail},
            );
        }
        SpliceEnd::Reset(e) => tracing::debug!(target = %host, error = %e, "outbound stream reset"),
    }
}

/// A relayed flow, sealed end to end: token and header go first; the serving node's answer
/// gives the keys; the first record carries what the app sent already (an early reply told it
/// to go ahead) or nothing (`after_connect`), and the status comes back as a record. A
/// refusal anywhere resets the app's connection (early) or becomes its SOCKS reply.
async fn sealed_client(
    node: &Shared,
    mut tcp: SocksConn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    first: Vec<u8>,
    flow: OriginFlow,
    serving: NodeId,
) -> SpliceEnd {
    let reply = |r| encode_reply(r, None);
    let early = node.config.socks_reply == SocksReply::Early;
    if early {
        if tcp.send(&reply(Reply::Succeeded)).await.is_err() {
            let _ = send.reset(codes::INTERNAL);
            return SpliceEnd::Reset("app closed".into());
        }
        Counters::add(&node.counters.socks_ok, 1);
    }
    let opened = async {
        send.write_all(&first)
            .await
            .map_err(|_| RemoteRefusal::Reset)?;
        let check = AnswerCheck {
            keys: node.state_read().keys.clone(),
            serving,
            now: node.now(),
        };
        let (mut sealer, mut opener) = origin_keys(&mut recv, flow, check, STATUS_DEADLINE)
            .await
            .map_err(|e| match e {
            SealedCut::Stream(_) => RemoteRefusal::Reset,
            SealedCut::Timeout => RemoteRefusal::Timeout,
            e => RemoteRefusal::Sealed(e.reason()),
        })?;
        // What the app sent already rides in the first record (an end of its stream stays in
        // the socket for the splice to see); nothing is waited for.
        let mut head = vec![0u8; MAX_RECORD_PAYLOAD];
        let n = if early {
            tcp.tcp.try_read(&mut head).unwrap_or(0)
        } else {
            0
        };
        send_record(&mut send, &mut sealer, RecordKind::Data, &head[..n])
            .await
            .map_err(|_| RemoteRefusal::Reset)?;
        Counters::add(&node.counters.bytes_out, n as u64);
        let pending = origin_status(&mut recv, &mut opener, STATUS_DEADLINE).await?;
        Ok::<_, RemoteRefusal>(SealedEnds {
            sealer,
            opener,
            pending,
            tcp_head: None,
        })
    };
    let ends = match opened.await {
        Ok(ends) => ends,
        Err(why) => {
            let _ = send.reset(codes::INTERNAL);
            let _ = recv.stop(codes::INTERNAL);
            if early {
                rst(tcp.tcp);
            } else {
                let _ = tcp.send(&reply(why.status().socks_reply())).await;
            }
            return SpliceEnd::Refused(why);
        }
    };
    if !early {
        if tcp.send(&reply(Reply::Succeeded)).await.is_err() {
            let _ = send.reset(codes::INTERNAL);
            return SpliceEnd::Reset("app closed".into());
        }
        Counters::add(&node.counters.socks_ok, 1);
    }
    Counters::add(&node.counters.sealed_flows, 1);
    let rekey = Duration::from_secs(node.state_read().epoch.as_secs());
    let counters = node.counters.clone();
    splice_sealed(
        tcp.tcp,
        send,
        recv,
        counters,
        ends,
        rekey,
        std::future::pending(),
    )
    .await
}

/// Counts and audits a refusal by the far end (aggregated per first hop and reason: a peer
/// can repeat it at will).
fn remote_refused(node: &Shared, first_hop: NodeId, host: &str, why: RemoteRefusal) {
    node.counters.refused(why.reason());
    node.audit_refusal(
        "stream_refused_remote",
        first_hop,
        why.reason(),
        fields! {"target" => host, "peer" => first_hop.to_string(), "reason" => why.reason()},
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u128> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_BACKOFF_MIN);
    }

    /// A client socket that hands out scripted reads and logs every read and write.
    struct Scripted {
        reads: std::collections::VecDeque<Vec<u8>>,
        log: Vec<String>,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let me = self.get_mut();
            if let Some(chunk) = me.reads.pop_front() {
                me.log.push(format!("read {}", chunk.len()));
                buf.put_slice(&chunk);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.get_mut().log.push(format!("write {}", buf.len()));
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Greeting, then request, then our reply, with the client's bytes in `reads`.
    async fn exchange(reads: Vec<Vec<u8>>) -> Vec<String> {
        let mut conn = SocksConn {
            tcp: Scripted {
                reads: reads.into(),
                log: Vec::new(),
            },
            out: Vec::new(),
        };
        let mut buf = Vec::new();
        read_msg(&mut conn, &mut buf, socks5::parse_greeting)
            .await
            .expect("greeting")
            .expect("not EOF");
        conn.queue(&encode_method_selection(method::NO_AUTH));
        read_msg(&mut conn, &mut buf, socks5::parse_request)
            .await
            .expect("request")
            .expect("not EOF");
        conn.send(&encode_reply(Reply::Succeeded, None))
            .await
            .expect("reply");
        conn.tcp.log
    }

    fn greeting_and_request() -> (Vec<u8>, Vec<u8>) {
        let greeting = socks5::encode_greeting(&[method::NO_AUTH]);
        let request = socks5::encode_request(&socks5::Request {
            command: Command::Connect,
            target: socks5::TargetAddr::Domain("api.s1.mesh".into()),
            port: 80,
        });
        (greeting, request)
    }

    #[tokio::test]
    async fn a_pipelined_greeting_gets_method_and_reply_in_one_write() {
        let (greeting, request) = greeting_and_request();
        let log = exchange(vec![[greeting, request].concat()]).await;
        assert_eq!(
            log,
            ["read 21", "write 12"],
            "method selection (2) + reply (10)"
        );
    }

    #[tokio::test]
    async fn a_client_that_waits_gets_the_method_selection_before_the_next_read() {
        let (greeting, request) = greeting_and_request();
        let log = exchange(vec![greeting, request]).await;
        assert_eq!(log, ["read 3", "write 2", "read 18", "write 10"]);
    }

    #[test]
    fn both_credentials_must_match() {
        assert!(credentials_match(b"u", b"p", "u", "p"));
        assert!(!credentials_match(b"u", b"x", "u", "p"));
        assert!(!credentials_match(b"x", b"p", "u", "p"));
        assert!(!credentials_match(b"uu", b"p", "u", "p"));
        assert!(!credentials_match(b"u", b"", "u", "p"));
        assert!(!credentials_match(b"", b"", "u", "p"));
    }
}
