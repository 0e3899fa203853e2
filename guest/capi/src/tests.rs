//! Unit tests of the ABI's own rules (the end-to-end tests against vshmd are in
//! tests/tests/capi.rs).

use std::ffi::CStr;

use vshm::format::layout::{kind, object_flags};
use vshm::Status;

use super::*;

#[test]
fn every_protocol_status_has_a_constant_with_its_value_and_name() {
    for s in Status::ALL {
        let want = format!("VSHM_{}", s.name());
        let found = STATUS_CONSTANTS.iter().find(|(n, _)| *n == want);
        assert_eq!(found.map(|(_, c)| *c), Some(s.code()), "{want}");
        // SAFETY: vshm_status_name returns NULL or a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(vshm_status_name(s.code())) };
        assert_eq!(name.to_str(), Ok(s.name()));
        assert_eq!(vshm_nt_success(s.code()), s.is_success(), "{want}");
    }
    assert!(Status::from_code(VSHM_STATUS_INTERNAL_ERROR).is_none());
    assert!(!vshm_nt_success(VSHM_STATUS_INTERNAL_ERROR));
    assert!(vshm_status_name(0xC000_0001).is_null());
}

#[test]
fn kinds_and_flags_are_the_formats() {
    assert_eq!(VSHM_KIND_SECTION, kind::SECTION);
    assert_eq!(VSHM_KIND_EVENT, kind::EVENT);
    assert_eq!(VSHM_KIND_MUTEX, kind::MUTEX);
    assert_eq!(VSHM_OBJECT_PERSISTENT, object_flags::PERSISTENT);
    assert_eq!(VSHM_OBJECT_NAMED, object_flags::NAMED);
    assert_eq!(VSHM_OBJECT_MANUAL_RESET, object_flags::MANUAL_RESET);
}

#[test]
fn a_panic_becomes_internal_error_and_says_so() {
    let st = boundary(|| panic!("boom"));
    assert_eq!(st, VSHM_STATUS_INTERNAL_ERROR);
    // SAFETY: vshm_last_error never returns NULL.
    let msg = unsafe { CStr::from_ptr(vshm_last_error()) };
    assert!(msg.to_string_lossy().contains("boom"), "{msg:?}");
}

#[test]
fn null_pointers_and_bad_names_are_invalid_parameter() {
    let mut ns: *mut vshm_namespace = std::ptr::dangling_mut();
    // SAFETY: NULL and valid pointers, as the contracts allow.
    unsafe {
        assert_eq!(
            vshm_attach_host(std::ptr::null(), &mut ns),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert!(ns.is_null(), "a failed attach leaves NULL");
        assert_eq!(
            vshm_attach_host(c"\xff\xfe".as_ptr(), &mut ns),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_attach_host(c"/nonexistent/vshm.sock".as_ptr(), std::ptr::null_mut()),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_attach_host(c"/nonexistent/vshm.sock".as_ptr(), &mut ns),
            VSHM_STATUS_OBJECT_NAME_NOT_FOUND
        );
        let msg = CStr::from_ptr(vshm_last_error())
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains("/nonexistent/vshm.sock"), "{msg}");
        assert_eq!(
            vshm_detach(std::ptr::null_mut()),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_section_close(std::ptr::null_mut()),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_event_signal(std::ptr::null()),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_mutex_lock(std::ptr::null(), 0),
            VSHM_STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            vshm_attach_transport(std::ptr::null(), &mut ns),
            VSHM_STATUS_INVALID_PARAMETER
        );
    }
}

static RELEASED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

unsafe extern "C" fn count_release(_ctx: *mut std::ffi::c_void) {
    RELEASED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn an_incomplete_transport_table_is_refused_and_released_once() {
    let ops = vshm_transport_ops {
        ctx: std::ptr::null_mut(),
        region: None,
        peer_id: None,
        ring: None,
        wait_until: None,
        lock_token: None,
        token_alive: None,
        thread_token: None,
        notify_local: None,
        release: Some(count_release),
    };
    let mut ns = std::ptr::null_mut();
    // SAFETY: a table whose only function is `release`.
    let st = unsafe { vshm_attach_transport(&ops, &mut ns) };
    assert_eq!(st, VSHM_STATUS_INVALID_PARAMETER);
    assert!(ns.is_null());
    assert_eq!(RELEASED.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// The header cbindgen generated in this build (build.rs) is the committed one.
#[test]
fn header_is_current() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/vshm.h"));
    let committed = include_str!("../include/vshm.h");
    assert!(
        generated == committed,
        "guest/capi/include/vshm.h is stale: run `VSHM_UPDATE_HEADER=1 cargo build -p vshm-capi` \
         and commit the result"
    );
}
