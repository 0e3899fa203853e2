//! User and group names to ids (getpwnam_r / getgrnam_r), for socket groups and rules.

use std::ffi::CString;
use std::io;

/// Largest buffer tried for one entry (ERANGE doubles it up to here).
const MAX_BUF: usize = 1 << 20;

/// The uid of user `name`, `None` if there is no such user.
pub(super) fn user(name: &str) -> io::Result<Option<u32>> {
    // SAFETY: getpwnam_r gets a valid name, a local passwd, a buffer of the length given
    // and a local result pointer (`lookup` provides them).
    lookup(
        name,
        |n, e, b, l, r| unsafe { libc::getpwnam_r(n, e, b, l, r) },
        |pw: &libc::passwd| pw.pw_uid,
    )
}

/// The gid of group `name`, `None` if there is no such group.
pub(super) fn group(name: &str) -> io::Result<Option<u32>> {
    // SAFETY: as in `user`, for getgrnam_r.
    lookup(
        name,
        |n, e, b, l, r| unsafe { libc::getgrnam_r(n, e, b, l, r) },
        |gr: &libc::group| gr.gr_gid,
    )
}

/// One reentrant name lookup (`getpwnam_r` or `getgrnam_r`): calls `call` with the name,
/// an entry, a buffer that grows on ERANGE, and the result pointer; returns `id` of the
/// entry found.
fn lookup<E>(
    name: &str,
    call: impl Fn(*const libc::c_char, *mut E, *mut libc::c_char, usize, *mut *mut E) -> libc::c_int,
    id: impl Fn(&E) -> u32,
) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd and group are plain C data; zeroed is a valid (empty) value. The
        // strings the entry points to live in `buf`; only the number is kept.
        let mut entry: E = unsafe { std::mem::zeroed() };
        let mut result: *mut E = std::ptr::null_mut();
        let rc = call(
            cname.as_ptr(),
            &mut entry,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc == libc::ERANGE && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok((!result.is_null()).then(|| id(&entry)));
    }
}
