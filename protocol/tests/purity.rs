//! The protocol crate stays sans-IO: no async runtime, no QUIC stack, no sockets crate in
//! its normal dependency tree (docs/design.md, "Crates and dependency direction").

use std::process::Command;

#[test]
fn protocol_has_no_io_dependencies() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "hopmesh-protocol",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
            "--locked",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"hopmesh-protocol"),
        "unexpected output: {tree}"
    );
    assert!(
        crates.contains(&"ring"),
        "expected the crypto dependencies: {tree}"
    );
    for forbidden in [
        "tokio",
        "quinn",
        "quinn-proto",
        "mio",
        "socket2",
        "hickory-resolver",
        "rustls",
    ] {
        assert!(
            !crates.contains(&forbidden),
            "{forbidden} must not be a dependency of hopmesh-protocol"
        );
    }
}
