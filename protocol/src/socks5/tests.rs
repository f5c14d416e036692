use super::*;

fn req(target: TargetAddr, port: u16) -> Request {
    Request {
        command: Command::Connect,
        target,
        port,
    }
}

#[test]
fn greeting_parses_and_chooses() {
    let bytes = encode_greeting(&[method::NO_AUTH, method::USER_PASS]);
    assert_eq!(bytes, [5, 2, 0, 2]);
    let (g, used) = parse_greeting(&bytes).expect("valid").expect("complete");
    assert_eq!(used, 4);
    assert_eq!(g.choose(false), method::NO_AUTH);
    assert_eq!(g.choose(true), method::USER_PASS);
    let (g, _) = parse_greeting(&[5, 1, 0])
        .expect("valid")
        .expect("complete");
    assert_eq!(g.choose(true), method::NO_ACCEPTABLE);
    assert_eq!(encode_method_selection(method::NO_ACCEPTABLE), [5, 0xFF]);
}

#[test]
fn greeting_garbage() {
    // SOCKS4.
    assert_eq!(parse_greeting(&[4, 1]), Err(SocksError::WrongVersion(4)));
    assert_eq!(SocksError::WrongVersion(4).response(), SocksResponse::Close);
    // NMETHODS 0: answered with 0xFF.
    assert_eq!(parse_greeting(&[5, 0]), Err(SocksError::NoMethods));
    assert_eq!(
        SocksError::NoMethods.response(),
        SocksResponse::NoAcceptableMethod
    );
    // NMETHODS 255 and then FIN: the parser waits; the listener's deadline or EOF ends it.
    let mut partial = vec![5, 255];
    partial.extend([0; 254]);
    assert_eq!(parse_greeting(&partial), Ok(None));
    partial.push(0);
    assert!(parse_greeting(&partial).expect("valid").is_some());
    // Empty input needs more.
    assert_eq!(parse_greeting(&[]), Ok(None));
}

#[test]
fn other_protocols_are_recognised_on_the_first_byte() {
    for first in [
        b"GET / HTTP/1.1\r\n".as_slice(),
        b"CONNECT x:443 HTTP/1.1",
        b"\x16\x03\x01\x02\x00",
    ] {
        // Only the first byte is needed: no waiting for more.
        let err = parse_greeting(&first[..1]).expect_err("refused");
        assert!(matches!(err, SocksError::OtherProtocol(_)), "{err:?}");
        assert_eq!(err.response(), SocksResponse::Close);
        assert_eq!(parse_greeting(first).expect_err("refused"), err);
    }
}

#[test]
fn userpass_round_trip_and_errors() {
    let bytes = encode_userpass(b"alice", b"s3cret");
    let (c, used) = parse_userpass(&bytes).expect("valid").expect("complete");
    assert_eq!(used, bytes.len());
    assert_eq!(c.username, b"alice");
    assert_eq!(c.password, b"s3cret");
    assert!(!format!("{c:?}").contains("s3cret"));
    for cut in 0..bytes.len() {
        assert_eq!(parse_userpass(&bytes[..cut]), Ok(None), "cut {cut}");
    }
    assert_eq!(
        parse_userpass(&[5, 1, b'a', 1, b'b']),
        Err(SocksError::WrongAuthVersion(5))
    );
    assert_eq!(parse_userpass(&[1, 0]), Err(SocksError::EmptyCredential));
    assert_eq!(
        parse_userpass(&[1, 1, b'a', 0]),
        Err(SocksError::EmptyCredential)
    );
    assert_eq!(
        SocksError::EmptyCredential.response(),
        SocksResponse::AuthFailure
    );
    assert_eq!(encode_userpass_status(true), [1, 0]);
    assert_eq!(encode_userpass_status(false), [1, 1]);
}

#[test]
fn requests_golden_bytes() {
    let cases: [(Request, &[u8]); 3] = [
        (
            req(TargetAddr::Domain("api.payments.mesh".into()), 443),
            b"\x05\x01\x00\x03\x11api.payments.mesh\x01\xbb",
        ),
        (
            req(TargetAddr::Ipv4(Ipv4Addr::new(127, 0, 0, 1)), 80),
            &[5, 1, 0, 1, 127, 0, 0, 1, 0, 80],
        ),
        (
            req(TargetAddr::Ipv6(Ipv6Addr::LOCALHOST), 8080),
            &[
                5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x1f, 0x90,
            ],
        ),
    ];
    for (r, wire) in cases {
        assert_eq!(encode_request(&r), wire);
        assert_eq!(parse_request(wire), Ok(Some((r, wire.len()))));
        for cut in 0..wire.len() {
            assert_eq!(parse_request(&wire[..cut]), Ok(None), "cut {cut}");
        }
    }
}

#[test]
fn request_edge_cases_map_to_reply_codes() {
    let cases: [(&[u8], SocksError, SocksResponse); 8] = [
        (
            &[5, 1, 1, 1, 1, 2, 3, 4, 0, 80],
            SocksError::ReservedNonZero(1),
            SocksResponse::Reply(Reply::GeneralFailure),
        ),
        (
            &[5, 1, 0, 2, 1, 2, 3, 4, 0, 80],
            SocksError::AddressType(2),
            SocksResponse::Reply(Reply::AddressTypeNotSupported),
        ),
        (
            &[5, 1, 0, 3, 0, 0, 80],
            SocksError::EmptyDomain,
            SocksResponse::Reply(Reply::GeneralFailure),
        ),
        (
            &[5, 1, 0, 3, 2, 0xC3, 0x28, 0, 80],
            SocksError::DomainNotUtf8,
            SocksResponse::Reply(Reply::GeneralFailure),
        ),
        (
            &[5, 1, 0, 1, 1, 2, 3, 4, 0, 0],
            SocksError::ZeroPort,
            SocksResponse::Reply(Reply::NotAllowed),
        ),
        (
            &[5, 9, 0, 1, 1, 2, 3, 4, 0, 80],
            SocksError::UnknownCommand(9),
            SocksResponse::Reply(Reply::CommandNotSupported),
        ),
        (
            &[4, 1, 0, 80, 1, 2, 3, 4, 0],
            SocksError::WrongVersion(4),
            SocksResponse::Close,
        ),
        (
            b"GET /",
            SocksError::OtherProtocol(b'G'),
            SocksResponse::Close,
        ),
    ];
    for (wire, err, resp) in cases {
        assert_eq!(parse_request(wire), Err(err.clone()), "{wire:?}");
        assert_eq!(err.response(), resp);
    }
    // BIND and UDP ASSOCIATE parse; the listener refuses them with 0x07.
    let bind = parse_request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80])
        .expect("valid")
        .expect("complete");
    assert_eq!(bind.0.command, Command::Bind);
    let udp = parse_request(&[5, 3, 0, 1, 1, 2, 3, 4, 0, 80])
        .expect("valid")
        .expect("complete");
    assert_eq!(udp.0.command, Command::UdpAssociate);
    // A 255-byte domain is valid SOCKS (routing refuses it later as no mesh name).
    let long = "a".repeat(255);
    let wire = encode_request(&req(TargetAddr::Domain(long.clone()), 1));
    assert_eq!(
        parse_request(&wire)
            .expect("valid")
            .expect("complete")
            .0
            .target,
        TargetAddr::Domain(long)
    );
    // Trailing bytes are left for the caller, which refuses pipelined data.
    let mut pipelined = encode_request(&req(TargetAddr::Ipv4(Ipv4Addr::LOCALHOST), 80));
    let len = pipelined.len();
    pipelined.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(
        parse_request(&pipelined)
            .expect("valid")
            .expect("complete")
            .1,
        len
    );
}

#[test]
fn replies_golden_bytes() {
    assert_eq!(
        encode_reply(Reply::Succeeded, None),
        [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        encode_reply(Reply::NotAllowed, None),
        [5, 2, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    let v6 = encode_reply(
        Reply::HostUnreachable,
        Some("[::1]:9".parse().expect("addr")),
    );
    assert_eq!(v6.len(), 22);
    assert_eq!(parse_reply(&v6), Ok(Some((4, 22))));
    let all = [
        Reply::Succeeded,
        Reply::GeneralFailure,
        Reply::NotAllowed,
        Reply::NetworkUnreachable,
        Reply::HostUnreachable,
        Reply::ConnectionRefused,
        Reply::TtlExpired,
        Reply::CommandNotSupported,
        Reply::AddressTypeNotSupported,
    ];
    for (code, r) in all.into_iter().enumerate() {
        let wire = encode_reply(r, None);
        assert_eq!(parse_reply(&wire), Ok(Some((code as u8, 10))));
        for cut in 0..wire.len() {
            assert_eq!(parse_reply(&wire[..cut]), Ok(None));
        }
    }
    assert_eq!(parse_reply(&[5, 0, 0, 7]), Err(SocksError::AddressType(7)));
}

#[test]
fn random_garbage_never_panics_and_is_bounded() {
    // 64 KiB of deterministic pseudo-random bytes, parsed from every offset.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for start in (0..data.len()).step_by(61) {
        let buf = &data[start..];
        if let Ok(Some((_, used))) = parse_greeting(buf) {
            assert!(used <= 257);
        }
        if let Ok(Some((_, used))) = parse_request(buf) {
            assert!(used <= 262);
        }
        if let Ok(Some((_, used))) = parse_userpass(buf) {
            assert!(used <= 513);
        }
    }
}
