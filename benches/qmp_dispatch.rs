//! In-process QMP dispatch, without sockets or threads:
//! * `execute_json`: [`Vmm::execute_json`] for `query-status` and `query-phase` (phase check,
//!   argument decoding, handler, result to JSON, under the VMM's lock);
//! * `execute_typed`: [`Vmm::execute`] with the Rust command type (no JSON at all);
//! * `session`: one request line through a negotiated [`Session`]: parse → check → dispatch
//!   → serialise the reply line, what a QMP socket client costs the VMM apart from I/O;
//! * `parse`: the JSON parser alone on the same line.
//!
//! `benches/qmp.rs` measures the same over a real socket against QEMU.
//!
//! Run: `cargo bench --bench qmp_dispatch` (add `-- --quick` for a short run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_qmp::Session;
use serde_json::Map;
use vmm::Vmm;
use vmm::commands::{QueryPhase, QueryStatus};

fn bench(c: &mut Criterion) {
    let vmm = Vmm::new();
    let mut g = c.benchmark_group("qmp_dispatch");

    for name in ["query-status", "query-phase"] {
        g.bench_function(format!("execute_json/{name}"), |b| {
            b.iter(|| vmm.execute_json(black_box(name), Map::new()).unwrap())
        });
    }
    g.bench_function("execute_typed/query-status", |b| {
        b.iter(|| vmm.execute(black_box(QueryStatus {})).unwrap())
    });
    g.bench_function("execute_typed/query-phase", |b| {
        b.iter(|| vmm.execute(black_box(QueryPhase {})).unwrap())
    });

    let dispatcher = vmm.dispatcher();
    let mut session = Session::new(None);
    let mut out = Vec::new();
    session.input(
        b"{\"execute\": \"qmp_capabilities\"}\n",
        &*dispatcher,
        &mut out,
    );
    assert!(session.negotiated(), "{}", String::from_utf8_lossy(&out));
    for (name, line) in [
        (
            "query-status",
            &b"{\"execute\": \"query-status\", \"id\": 7}\n"[..],
        ),
        ("query-phase", &b"{\"execute\": \"query-phase\"}\n"[..]),
    ] {
        out.clear();
        session.input(line, &*dispatcher, &mut out);
        assert!(
            out.starts_with(b"{\"return\""),
            "{}",
            String::from_utf8_lossy(&out)
        );
        g.bench_function(format!("session/{name}"), |b| {
            b.iter(|| {
                out.clear();
                session.input(black_box(line), &*dispatcher, &mut out);
                black_box(out.len())
            })
        });
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| keel_qmp::json::from_slice(black_box(line)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
