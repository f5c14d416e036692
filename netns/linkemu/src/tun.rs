//! Creating a TUN device: open `/dev/net/tun` and attach it by name (the `TUNSETIFF` ioctl,
//! the only `unsafe` of the crate).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

/// `struct ifreq` with the name and the flags of the union (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TUN device named `name` (IFF_TUN, no packet information header), blocking.
pub(crate) fn create(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "`{name}` is not an interface name (1 to {} bytes)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    set_iff(&file, &mut req)?;
    Ok(file)
}

#[allow(unsafe_code)]
fn set_iff(file: &File, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `file` is an open /dev/net/tun descriptor for the duration of the call, and `req`
    // is a valid, initialized `struct ifreq` layout that TUNSETIFF reads (and may write back).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
