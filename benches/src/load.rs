//! The load tool: a raw TCP byte source (the backend) and the clients that drive it, directly or
//! through a SOCKS5 proxy (`ssh -D` and hopmesh alike).
//!
//! Wire protocol of the backend, chosen so the backend is never the bottleneck: the client sends
//! the number of bytes it wants as a big-endian `u64`; the backend writes that many bytes from a
//! static buffer in 256 KiB writes and closes. The client counts what arrives and fails on a
//! short read, so a cut transfer can never pass for a fast one.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hopmesh_protocol::socks5::{self, Command, Request, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Size of the reads and writes on every leg of the load tool.
const CHUNK: usize = 256 * 1024;

/// How a client reaches the backend.
#[derive(Clone, Debug)]
pub enum Via {
    /// Straight TCP to the backend address.
    Direct(SocketAddr),
    /// Through a SOCKS5 proxy, asking it for `host:port` (an IP literal or a name).
    Socks {
        /// The proxy's listening address.
        proxy: SocketAddr,
        /// The destination the proxy is asked for.
        host: String,
        /// The destination port.
        port: u16,
    },
}

/// Runs the backend on `listener` until the process is stopped.
pub async fn serve_backend(listener: TcpListener) -> io::Result<()> {
    let data: &'static [u8] = Box::leak(
        (0..CHUNK)
            .map(|i| (i as u8).wrapping_mul(31))
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    loop {
        let (mut tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let mut want = [0u8; 8];
            if tcp.read_exact(&mut want).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(want);
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                if tcp.write_all(&data[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = tcp.shutdown().await;
        });
    }
}

/// Opens a connection to the backend (with the SOCKS5 handshake if proxied).
pub async fn connect(via: &Via) -> io::Result<TcpStream> {
    match via {
        Via::Direct(addr) => {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(tcp)
        }
        Via::Socks { proxy, host, port } => {
            let target = match host.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => TargetAddr::Ipv4(ip),
                Ok(IpAddr::V6(ip)) => TargetAddr::Ipv6(ip),
                Err(_) if host.len() > 255 => {
                    return Err(io::Error::other("SOCKS host name longer than 255"));
                }
                Err(_) => TargetAddr::Domain(host.clone()),
            };
            let mut tcp = TcpStream::connect(proxy).await?;
            tcp.set_nodelay(true)?;
            // Greeting and request in one write: both proxies accept pipelining, and it is what
            // curl does on a warm path.
            let mut req = socks5::encode_greeting(&[socks5::method::NO_AUTH]);
            req.extend_from_slice(&socks5::encode_request(&Request {
                command: Command::Connect,
                target,
                port: *port,
            }));
            tcp.write_all(&req).await?;
            // Method selection, then the reply. Nothing else can arrive before we send the
            // first byte of the request, so reading whatever is there never eats payload.
            let mut got = Vec::with_capacity(32);
            let mut chunk = [0u8; 300];
            loop {
                let n = tcp.read(&mut chunk).await?;
                if n == 0 || got.len() + n > 2 + 262 {
                    return Err(io::Error::other("SOCKS reply cut short or too long"));
                }
                got.extend_from_slice(&chunk[..n]);
                if got.len() >= 2 && got[..2] != [5, socks5::method::NO_AUTH] {
                    return Err(io::Error::other(format!(
                        "SOCKS method refused: {:?}",
                        &got[..2]
                    )));
                }
                match socks5::parse_reply(got.get(2..).unwrap_or_default()) {
                    Ok(Some((0, _))) => return Ok(tcp),
                    Ok(Some((rep, _))) => {
                        return Err(io::Error::other(format!("SOCKS REP {rep:#04x}")));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(io::Error::other(format!("SOCKS reply: {e}"))),
                }
            }
        }
    }
}

/// One request on a new connection: asks for `bytes` and reads them all. Returns the time from
/// before the connect to the last byte.
pub async fn fetch(via: &Via, bytes: u64, buf: &mut [u8]) -> io::Result<Duration> {
    let start = Instant::now();
    let mut tcp = connect(via).await?;
    tcp.write_all(&bytes.to_be_bytes()).await?;
    let mut got = 0u64;
    loop {
        let n = tcp.read(buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    if got != bytes {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {got} of {bytes} bytes"),
        ));
    }
    Ok(start.elapsed())
}

/// `n` requests one after the other, each on a new connection; the latency of each.
pub async fn sequential(via: &Via, n: usize, bytes: u64) -> io::Result<Vec<Duration>> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(fetch(via, bytes, &mut buf).await?);
    }
    Ok(out)
}

/// `total` requests from `clients` concurrent clients, each request on a new connection.
/// Returns every latency and the wall time of the whole run.
pub async fn concurrent(
    via: &Via,
    clients: usize,
    total: usize,
    bytes: u64,
) -> io::Result<(Vec<Duration>, Duration)> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let via = via.clone();
        let share = total / clients + usize::from(c < total % clients);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut out = Vec::with_capacity(share);
            for _ in 0..share {
                out.push(fetch(&via, bytes, &mut buf).await?);
            }
            io::Result::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.map_err(io::Error::other)??);
    }
    Ok((all, start.elapsed()))
}

/// `streams` downloads of `bytes` each, all at once; the wall time until the last one ends.
pub async fn parallel(via: &Via, streams: usize, bytes: u64) -> io::Result<Duration> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let via = via.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                fetch(&via, bytes, &mut buf).await
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok(start.elapsed())
}

/// Opens `n` connections through to the backend and leaves them idle (the caller holds them).
pub async fn idle(via: &Via, n: usize) -> io::Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect(via).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn direct_fetch_counts_exactly_and_short_reads_fail() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(serve_backend(l));
        let via = Via::Direct(addr);
        let mut buf = vec![0u8; 1000];
        fetch(&via, 3 * CHUNK as u64 + 7, &mut buf)
            .await
            .expect("fetch");
        let lat = sequential(&via, 5, 10).await.expect("sequential");
        assert_eq!(lat.len(), 5);
        let (lat, _) = concurrent(&via, 3, 10, 100).await.expect("concurrent");
        assert_eq!(lat.len(), 10);
        parallel(&via, 4, 1 << 20).await.expect("parallel");

        // A server that sends less than asked: the client must fail, not report a fast transfer.
        let short = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let short_addr = short.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut t, _) = short.accept().await.expect("accept");
            let mut want = [0u8; 8];
            t.read_exact(&mut want).await.expect("read");
            t.write_all(&[1, 2, 3]).await.expect("write");
        });
        let err = fetch(&Via::Direct(short_addr), 10, &mut buf)
            .await
            .expect_err("short transfer must fail");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn socks_refusal_is_an_error_with_the_reply_code() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut t, _) = l.accept().await.expect("accept");
            let mut req = [0u8; 3 + 4 + 1 + 8 + 2];
            t.read_exact(&mut req).await.expect("read");
            assert_eq!(&req[8..16], b"svc.mesh");
            t.write_all(&[5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .expect("write");
        });
        let via = Via::Socks {
            proxy,
            host: "svc.mesh".into(),
            port: 80,
        };
        let err = connect(&via).await.expect_err("REP 2 must fail");
        assert!(err.to_string().contains("SOCKS REP 0x02"), "{err}");
    }
}
