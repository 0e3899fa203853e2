//! The C ABI (guest/capi, docs/C-API.md) end to end: the C examples compiled with the
//! system compiler against the built static library and the committed header, run against
//! a real vshmd; and a transport callback table (`vshm_transport_ops`) driving the library.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use capi::*;
use vshm::host::HostTransport;
use vshm::{Transport, TransportError};
use vshm_format::shm::SharedMemory;
use vshm_format::PeerId;
use vshm_tests::{command, stderr, stdout, wait_for, watchdog, Backend, TempDir};

const LIMIT: Duration = Duration::from_secs(300);

/// The workspace root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// Builds libvshm (`cargo build -p vshm-capi --lib`, a no-op when it is current) into this
/// test's target directory and returns the directory holding `libvshm_capi.a`. Once per process.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/<profile>
        let profile = exe.parent().and_then(Path::parent).expect("profile dir");
        let target = profile.parent().expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "vshm-capi",
                "--lib",
                "--target-dir",
            ])
            .arg(target)
            .current_dir(root());
        if profile.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let out = build.output().expect("run cargo build -p vshm-capi");
        assert!(
            out.status.success(),
            "cargo build -p vshm-capi failed:\n{}",
            stderr(&out)
        );
        let lib = profile.join("libvshm_capi.a");
        assert!(lib.exists(), "{} is missing after the build", lib.display());
        profile.to_owned()
    })
}

/// Installs libvshm.a, vshm.h and vshm.pc (from vshm.pc.in) under `prefix` the way a
/// package would, and returns the directory to put on `PKG_CONFIG_PATH`.
fn install(prefix: &Path) -> PathBuf {
    let (lib, include, pc) = (
        prefix.join("lib"),
        prefix.join("include"),
        prefix.join("lib/pkgconfig"),
    );
    for d in [&lib, &include, &pc] {
        std::fs::create_dir_all(d).expect("install dir");
    }
    std::fs::copy(lib_dir().join("libvshm_capi.a"), lib.join("libvshm.a")).expect("install lib");
    let capi = root().join("guest/capi");
    std::fs::copy(capi.join("include/vshm.h"), include.join("vshm.h")).expect("install header");
    let template = std::fs::read_to_string(capi.join("vshm.pc.in")).expect("vshm.pc.in");
    let text = template
        .replace("@PREFIX@", &prefix.to_string_lossy())
        .replace("@LIBDIR@", &lib.to_string_lossy())
        .replace("@INCLUDEDIR@", &include.to_string_lossy())
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    assert!(
        !text.contains('@'),
        "vshm.pc.in has a placeholder left:\n{text}"
    );
    std::fs::write(pc.join("vshm.pc"), text).expect("write vshm.pc");
    pc
}

/// `pkg-config --cflags --libs --static vshm` against the installed copy.
fn pkg_config_flags(pc_path: &Path) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(["--cflags", "--libs", "--static", "vshm"])
        .env("PKG_CONFIG_PATH", pc_path)
        .output()
        .expect("run pkg-config (Debian package pkg-config)");
    assert!(out.status.success(), "pkg-config: {}", stderr(&out));
    stdout(&out).split_whitespace().map(str::to_owned).collect()
}

/// Compiles one C file with the system compiler, warnings as errors.
fn cc(source: &Path, binary: &Path, flags: &[String]) {
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o"])
        .arg(binary)
        .arg(source)
        .args(flags)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc {} failed:\n{}",
        source.display(),
        stderr(&out)
    );
}

/// Runs a compiled example with the socket as its argument.
fn run(binary: &Path, socket: &Path) -> Output {
    command(binary)
        .arg(socket)
        .output()
        .expect("run the C example")
}

#[test]
fn the_host_example_builds_with_pkg_config_and_runs_against_vshmd() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("capi-host");
        let pc = install(&dir.path().join("prefix"));
        let flags = pkg_config_flags(&pc);
        assert!(flags.iter().any(|f| f == "-lvshm"), "{flags:?}");
        let binary = dir.path().join("host");
        cc(&root().join("guest/capi/examples/host.c"), &binary, &flags);

        let b = Backend::start(&["--size", "16M"]);
        let out = run(&binary, &b.socket);
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "host.c exited with {}:\n{text}\n{}",
            out.status,
            stderr(&out)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("attached as peer "), "{text}");
        for want in [
            "created capi-demo (65536 of 1048576 bytes)",
            "opened again: hello from C",
            "grown to 131072 bytes",
            "changes seen: 1",
            "event signalled and taken",
            "mutex locked and unlocked",
            "listed section capi-demo (131072 bytes)",
            "listed section capi-demo-heap (4096 bytes)",
            "listed event capi-demo-event (0 bytes)",
            "listed mutex capi-demo-mutex (0 bytes)",
            "listed 4 of 4 objects",
            "closed everything",
        ] {
            assert!(lines.contains(&want), "no line {want:?} in:\n{text}");
        }
        assert!(
            lines.iter().any(|l| l.starts_with("block of ")),
            "no block line in:\n{text}"
        );
        // Every handle closed and none persistent: vshmd destroyed them all.
        assert!(
            wait_for(Duration::from_secs(10), || b.section("capi-demo").is_none()
                && b.section("capi-demo-heap").is_none()),
            "capi-demo outlived its handles: {}",
            b.status()
        );
    });
}

#[test]
fn the_error_paths_return_their_statuses() {
    watchdog(LIMIT, || {
        let dir = TempDir::new("capi-errors");
        let binary = dir.path().join("errors");
        let include = root().join("guest/capi/include");
        let lib = lib_dir().join("libvshm_capi.a");
        let mut flags = vec![
            format!("-I{}", include.display()),
            lib.to_string_lossy().into_owned(),
        ];
        flags.extend(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"].map(str::to_owned));
        cc(
            &root().join("guest/capi/examples/errors.c"),
            &binary,
            &flags,
        );

        let b = Backend::start(&["--size", "16M"]);
        let out = run(&binary, &b.socket);
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "errors.c exited with {}:\n{text}\n{}",
            out.status,
            stderr(&out)
        );
        for want in [
            "ok attach-missing-socket STATUS_OBJECT_NAME_NOT_FOUND",
            "ok attach-null-path STATUS_INVALID_PARAMETER",
            "ok open-null-name STATUS_INVALID_PARAMETER",
            "ok open-bad-utf8 STATUS_INVALID_PARAMETER",
            "ok open-unknown-name STATUS_OBJECT_NAME_NOT_FOUND",
            "ok open-backslash STATUS_OBJECT_NAME_INVALID",
            "ok open-section-named-like-an-event STATUS_INVALID_HANDLE",
            "ok create-section-named-like-an-event STATUS_INVALID_HANDLE",
            "ok open-mutex-named-like-an-event STATUS_INVALID_HANDLE",
            "ok open-event-named-like-a-mutex STATUS_INVALID_HANDLE",
            "ok unlock-not-owned STATUS_MUTANT_NOT_OWNED",
            "ok event-wait-times-out STATUS_TIMEOUT",
            "ok write-read-only STATUS_ACCESS_DENIED",
            "ok write-past-size STATUS_INVALID_PARAMETER",
            "0 failures",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "no line {want:?} in:\n{text}"
            );
        }
        assert!(!text.contains("FAIL"), "{text}");
    });
}

/// The transport behind a callback table in the test below: a real host transport, and
/// how often the library released the table.
struct Ctx {
    transport: HostTransport,
    released: Arc<AtomicU32>,
}

/// # Safety
/// `ctx` is the test's live `Ctx`.
unsafe fn ctx<'a>(ctx: *mut c_void) -> &'a Ctx {
    // SAFETY: per the contract; the library passes the table's ctx until `release`.
    unsafe { &*ctx.cast::<Ctx>() }
}

fn transport_code(e: TransportError) -> i32 {
    match e {
        TransportError::BackendGone => VSHM_TRANSPORT_BACKEND_GONE,
        TransportError::NotSupported => VSHM_TRANSPORT_NOT_SUPPORTED,
        TransportError::Os(errno) => -errno,
        TransportError::BadPeerId(_) => -22,
    }
}

unsafe extern "C" fn ops_region(c: *mut c_void, base: *mut *mut c_void, size: *mut u64) -> i32 {
    // SAFETY: the library passes our ctx and two valid output pointers.
    let region = unsafe { ctx(c) }.transport.region();
    // SAFETY: as above.
    unsafe {
        *base = region.base().as_ptr().cast();
        *size = region.size();
    }
    VSHM_TRANSPORT_OK
}

unsafe extern "C" fn ops_peer_id(c: *mut c_void) -> u16 {
    // SAFETY: the library passes our ctx.
    unsafe { ctx(c) }.transport.peer_id().raw()
}

unsafe extern "C" fn ops_ring(c: *mut c_void, peer: u16, vector: u16) -> i32 {
    // SAFETY: the library passes our ctx.
    match unsafe { ctx(c) }.transport.ring(PeerId(peer), vector) {
        Ok(()) => VSHM_TRANSPORT_OK,
        Err(e) => transport_code(e),
    }
}

unsafe extern "C" fn ops_wait_until(
    c: *mut c_void,
    ready: vshm_ready_fn,
    ready_ctx: *mut c_void,
    timeout_ns: u64,
) -> i32 {
    let Some(ready) = ready else {
        return -22;
    };
    // SAFETY: `ready` with its `ready_ctx`, on this thread, before returning: its contract.
    let mut cond = || unsafe { ready(ready_ctx) };
    // SAFETY: the library passes our ctx.
    let t = &unsafe { ctx(c) }.transport;
    match t.wait_until(&mut cond, Duration::from_nanos(timeout_ns)) {
        Ok(true) => VSHM_TRANSPORT_OK,
        Ok(false) => VSHM_TRANSPORT_TIMED_OUT,
        Err(e) => transport_code(e),
    }
}

unsafe extern "C" fn ops_thread_token(c: *mut c_void) -> u32 {
    // SAFETY: the library passes our ctx.
    unsafe { ctx(c) }.transport.thread_token()
}

unsafe extern "C" fn ops_token_alive(c: *mut c_void, token: u32) -> bool {
    // SAFETY: the library passes our ctx.
    unsafe { ctx(c) }.transport.token_alive(token)
}

unsafe extern "C" fn ops_notify_local(c: *mut c_void) {
    // SAFETY: the library passes our ctx.
    unsafe { ctx(c) }.transport.notify_local()
}

unsafe extern "C" fn ops_release(c: *mut c_void) {
    // SAFETY: the Box made in the test, handed back once by the library.
    let ctx = unsafe { Box::from_raw(c.cast::<Ctx>()) };
    ctx.released.fetch_add(1, Ordering::SeqCst);
}

/// Returns the status, failing with the library's last error message if it is not `want`.
fn expect(what: &str, got: vshm_status, want: vshm_status) {
    // SAFETY: vshm_last_error never returns NULL.
    let why = unsafe { std::ffi::CStr::from_ptr(vshm_last_error()) };
    assert_eq!(got, want, "{what}: {got:#x} ({why:?})");
}

#[test]
fn a_transport_callback_table_drives_the_library_against_vshmd() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "16M"]);
        let released = Arc::new(AtomicU32::new(0));
        let c = Box::new(Ctx {
            transport: HostTransport::connect(&b.socket).expect("connect"),
            released: Arc::clone(&released),
        });
        let ops = vshm_transport_ops {
            ctx: Box::into_raw(c).cast(),
            region: Some(ops_region),
            peer_id: Some(ops_peer_id),
            ring: Some(ops_ring),
            wait_until: Some(ops_wait_until),
            lock_token: None,
            token_alive: Some(ops_token_alive),
            thread_token: Some(ops_thread_token),
            notify_local: Some(ops_notify_local),
            release: Some(ops_release),
        };
        let other = b.connect();
        let mut ns = std::ptr::null_mut();
        let mut section = std::ptr::null_mut();
        let mut event = std::ptr::null_mut();
        let mut mutex = std::ptr::null_mut();
        // SAFETY: a table following the contract; valid output pointers; live handles.
        unsafe {
            expect(
                "attach",
                vshm_attach_transport(&ops, &mut ns),
                VSHM_STATUS_SUCCESS,
            );
            let mut disposition = 9;
            expect(
                "create",
                vshm_section_create(
                    ns,
                    c"ops-section".as_ptr(),
                    65536,
                    65536,
                    false,
                    &mut section,
                    std::ptr::null_mut(),
                    &mut disposition,
                ),
                VSHM_STATUS_SUCCESS,
            );
            assert_eq!(disposition, VSHM_DISPOSITION_CREATED);
            let data = b"through the table";
            expect(
                "write",
                vshm_section_write(section, 100, data.as_ptr().cast(), data.len()),
                VSHM_STATUS_SUCCESS,
            );
        }
        // Another peer (plain Rust, its own transport) sees the bytes: the table's region
        // is the real one.
        let seen = other.open("ops-section").expect("open from the other peer");
        let mut buf = [0u8; 17];
        seen.read_at(100, &mut buf).expect("read");
        assert_eq!(&buf, b"through the table");

        // An event signalled by the other peer while this one sleeps in the table's
        // wait_until: the ring reaches it through the table.
        // SAFETY: as above.
        unsafe {
            expect(
                "event",
                vshm_event_create(
                    ns,
                    c"ops-event".as_ptr(),
                    false,
                    false,
                    &mut event,
                    std::ptr::null_mut(),
                ),
                VSHM_STATUS_SUCCESS,
            );
        }
        let signaller = std::thread::spawn({
            let socket = b.socket.clone();
            move || {
                let ns = vshm::Namespace::attach(HostTransport::connect(&socket).expect("connect"))
                    .expect("attach");
                let e = ns.open_event("ops-event").expect("open event");
                std::thread::sleep(Duration::from_millis(300));
                e.signal().expect("signal");
            }
        });
        // SAFETY: a live event handle.
        let st = unsafe { vshm_event_wait(event, 20_000_000_000) };
        expect("wait", st, VSHM_STATUS_SUCCESS);
        signaller.join().expect("signaller");

        // A mutex held through the table is held for the other peer too.
        // SAFETY: as above.
        unsafe {
            expect(
                "mutex",
                vshm_mutex_create(
                    ns,
                    c"ops-mutex".as_ptr(),
                    false,
                    &mut mutex,
                    std::ptr::null_mut(),
                ),
                VSHM_STATUS_SUCCESS,
            );
            expect(
                "lock",
                vshm_mutex_lock(mutex, VSHM_WAIT_INFINITE),
                VSHM_STATUS_SUCCESS,
            );
        }
        let m = other.open_mutex("ops-mutex").expect("open mutex");
        assert_eq!(
            m.try_lock().expect("try_lock"),
            None,
            "held through the table"
        );
        // SAFETY: a live mutex handle, locked by this thread.
        unsafe { expect("unlock", vshm_mutex_unlock(mutex), VSHM_STATUS_SUCCESS) };
        assert!(m.try_lock().expect("try_lock").is_some(), "free again");
        m.unlock().expect("unlock");

        // Closing in any order: the namespace handle first; the table is released only
        // when the last handle goes.
        // SAFETY: live handles, each closed once.
        unsafe {
            expect("detach", vshm_detach(ns), VSHM_STATUS_SUCCESS);
            assert_eq!(
                released.load(Ordering::SeqCst),
                0,
                "released while handles live"
            );
            expect("close event", vshm_event_close(event), VSHM_STATUS_SUCCESS);
            expect("close mutex", vshm_mutex_close(mutex), VSHM_STATUS_SUCCESS);
            assert_eq!(
                released.load(Ordering::SeqCst),
                0,
                "released while a section lives"
            );
            expect(
                "close section",
                vshm_section_close(section),
                VSHM_STATUS_SUCCESS,
            );
        }
        assert_eq!(
            released.load(Ordering::SeqCst),
            1,
            "released once, at the last close"
        );
        drop(seen);
    });
}

/// guest/capi/examples/guest.c, linked static against libvshm_capi.a by `cargo xtask
/// images` and installed in the guest image as `vshm-c-example`, runs inside a TCG guest
/// (over the kernel driver) and meets a peer in another guest (over sysfs): it writes its
/// text under a mutex, signals `NAME.ready`, and reads back what the other guest wrote once
/// that one signals `NAME.ack`.
#[test]
fn the_guest_example_runs_inside_a_guest_and_meets_a_peer_in_another() {
    use vshm_images::{Vm, VmConfig};
    use vshm_tests::{guest_ok, guest_sh};

    watchdog(LIMIT, || {
        let _one = vshm_tests::serial();
        let b = Backend::start(&["--size", "16M"]);
        let image = vshm_tests::guest_image();
        let boot = |name: &str, driver: bool| {
            let mut cfg = VmConfig::new(name, &image, &b.socket, b.dir());
            cfg.driver = driver;
            Vm::start(&cfg).unwrap_or_else(|e| panic!("{e}"))
        };
        let (c, r) = (boot("c", true), boot("r", false));
        let ready = |s: vshm_images::Starting| {
            s.wait_ready(Duration::from_secs(180))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let (mut c, mut r) = (ready(c), ready(r));
        guest_ok(
            &mut c,
            "vshm-c-example capi-guest 'hello from C in a guest' > /tmp/cex.out 2>&1 & \
             echo $! > /tmp/cex.pid",
        );
        // The other guest waits for the example's signal, reads its text, answers.
        let seen = guest_ok(
            &mut r,
            "vshm event wait capi-guest.ready --timeout 60000 >/dev/null && \
             vshm read capi-guest --len 23",
        );
        assert_eq!(seen, "hello from C in a guest");
        guest_ok(
            &mut r,
            "vshm write capi-guest --data 'answer from r' && vshm event signal capi-guest.ack",
        );
        let out = guest_sh(
            &mut c,
            "p=$(cat /tmp/cex.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; \
             cat /tmp/cex.out",
        );
        let text = out.text;
        for want in [
            "attached as peer",
            "created capi-guest",
            "wrote 23 bytes",
            "acknowledged; the section now says: answer from r",
            "done",
        ] {
            assert!(text.contains(want), "`{want}` in:\n{text}");
        }
        // It closed everything: nothing of it is left in the namespace.
        assert!(
            wait_for(Duration::from_secs(10), || b
                .section("capi-guest")
                .is_none()),
            "the example's section went with its last handle"
        );
    });
}
