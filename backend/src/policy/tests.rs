//! Policy unit tests: pattern rights, quotas, rule resolution, the rate limiter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vshm_format::Status;

use super::*;

fn globs(list: &[&str]) -> Patterns {
    Patterns::new(
        list.iter()
            .map(|p| Glob::new(p).expect("pattern"))
            .collect(),
    )
}

fn web() -> Policy {
    Policy {
        name: "web".into(),
        create: globs(&["web/*"]),
        open: globs(&["web/*", "shared/*"]),
        delete: globs(&["web/*"]),
        delete_others: Patterns::none(),
        max_bytes: Some(1 << 20),
        max_objects: Some(2),
        max_handles: Some(8),
        rate: None,
    }
}

fn id(socket: &str, uid: u32, label: &str) -> Identity {
    Identity {
        socket: socket.into(),
        uid: Some(uid),
        gid: Some(uid),
        label: Some(label.into()),
    }
}

#[test]
fn a_create_outside_the_create_patterns_is_access_denied_and_says_which_patterns() {
    let p = web();
    assert_eq!(
        p.check_create(Some("web/a"), 4096, Usage::default()),
        Ok(())
    );
    let d = p
        .check_create(Some("db/a"), 4096, Usage::default())
        .expect_err("denied");
    assert_eq!(d.status(), Status::AccessDenied);
    let msg = d.to_string();
    assert!(
        msg.contains("\"db/a\"") && msg.contains("web/*") && msg.contains("\"web\""),
        "{msg}"
    );
    // Unnamed objects are the empty name: `web/*` does not cover them.
    assert!(p.check_create(None, 4096, Usage::default()).is_err());
    assert!(Policy::unrestricted()
        .check_create(None, 4096, Usage::default())
        .is_ok());
}

#[test]
fn byte_and_object_quotas_count_what_the_vm_holds_plus_what_it_asks_for() {
    let p = web();
    let used = Usage {
        bytes: (1 << 20) - 4096,
        objects: 1,
    };
    assert_eq!(p.check_create(Some("web/b"), 4096, used), Ok(()));
    let d = p
        .check_create(Some("web/b"), 8192, used)
        .expect_err("over bytes");
    assert_eq!(d.status(), Status::QuotaExceeded);
    assert!(matches!(
        d,
        Denial::Quota {
            what: Quota::Bytes,
            limit: 1048576,
            wanted: 8192,
            ..
        }
    ));
    let d = p
        .check_create(
            Some("web/c"),
            0,
            Usage {
                bytes: 0,
                objects: 2,
            },
        )
        .expect_err("over objects");
    assert!(matches!(
        d,
        Denial::Quota {
            what: Quota::Objects,
            limit: 2,
            ..
        }
    ));
    assert!(d.to_string().contains("max_objects 2"), "{d}");
}

#[test]
fn deleting_another_vms_object_needs_delete_others() {
    let p = web();
    assert_eq!(p.check_delete(Some("web/a"), true), Ok(()));
    let d = p.check_delete(Some("web/a"), false).expect_err("not own");
    assert_eq!(d.status(), Status::AccessDenied);
    assert!(d.to_string().contains("delete_others"), "{d}");
    let mut admin = web();
    admin.delete_others = Patterns::any();
    assert_eq!(admin.check_delete(Some("web/a"), false), Ok(()));
}

#[test]
fn the_first_matching_rule_wins_and_the_socket_policy_is_the_fallback() {
    let web = Arc::new(web());
    let mut db = Policy::unrestricted();
    db.name = "db".into();
    let db = Arc::new(db);
    let mut none = Policy::unrestricted();
    none.name = "nothing".into();
    none.create = Patterns::none();
    let none = Arc::new(none);
    let rules = Rules::new(
        vec![
            Rule {
                socket: None,
                uid: Some(64055),
                gid: None,
                name: Some(Glob::new("web-*").expect("glob")),
                policy: web.clone(),
            },
            Rule {
                socket: Some("vm-db".into()),
                uid: None,
                gid: None,
                name: None,
                policy: db.clone(),
            },
        ],
        vec![
            (MAIN_SOCKET.into(), none.clone()),
            ("vm-db".into(), none.clone()),
        ],
    );
    assert_eq!(
        rules.resolve(&id("main", 64055, "web-1")).policy.name,
        "web"
    );
    // Every value of a rule must match: same name, other uid.
    assert_eq!(
        rules.resolve(&id("main", 1000, "web-1")).policy.name,
        "nothing"
    );
    assert_eq!(rules.resolve(&id("vm-db", 1000, "x")).policy.name, "db");
    // Earlier rules first.
    assert_eq!(
        rules.resolve(&id("vm-db", 64055, "web-2")).policy.name,
        "web"
    );
    // A peer without a label matches no name pattern.
    let mut anon = id("main", 64055, "");
    anon.label = None;
    assert_eq!(rules.resolve(&anon).policy.name, "nothing");
    // The account is the whole identity.
    let g = rules.resolve(&id("main", 64055, "web-1"));
    assert_eq!(*g.account, id("main", 64055, "web-1"));
}

#[test]
fn the_rate_limiter_allows_a_burst_then_refills_at_the_rate_per_account() {
    let mut p = web();
    p.rate = Some(Rate {
        per_sec: 2.0,
        burst: 3.0,
    });
    let a = Arc::new(id("main", 1, "a"));
    let b = Arc::new(id("main", 1, "b"));
    let mut r = RateLimiter::default();
    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(r.admit(&a, &p, t0), Ok(()));
    }
    let d = r.admit(&a, &p, t0).expect_err("burst spent");
    assert_eq!(d.status(), Status::QuotaExceeded);
    // Another account is not affected.
    assert_eq!(r.admit(&b, &p, t0), Ok(()));
    // Half a second refills one token at 2/s.
    let t1 = t0 + Duration::from_millis(500);
    assert_eq!(r.admit(&a, &p, t1), Ok(()));
    assert!(r.admit(&a, &p, t1).is_err());
    // Never more than the burst, however long the pause.
    let t2 = t1 + Duration::from_secs(3600);
    for _ in 0..3 {
        assert_eq!(r.admit(&a, &p, t2), Ok(()));
    }
    assert!(r.admit(&a, &p, t2).is_err());
    // Unlimited policies keep no bucket.
    let before = r.len();
    assert_eq!(r.admit(&a, &Policy::unrestricted(), t2), Ok(()));
    assert_eq!(r.len(), before);
}

#[test]
fn open_is_checked_against_its_own_patterns() {
    let p = web();
    assert_eq!(p.check_open(Some("shared/x")), Ok(()));
    let d = p.check_open(Some("db/x")).expect_err("advisory denial");
    assert_eq!(
        d.to_string(),
        "\"db/x\" is outside policy \"web\"'s open patterns (web/*, shared/*)"
    );
}
