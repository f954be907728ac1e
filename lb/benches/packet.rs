//! Micro-benchmarks of the per-packet functions of the hot path:
//! `cargo bench -p dnslb --bench packet`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use dnslb::backends::{AdminState, BackendSet, Member, Picker};
use dnslb::config::{BackendConfig, Policy};
use dnslb::packet;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

fn query() -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("www.Example.test.").unwrap(),
        RecordType::AAAA,
    ));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    m.to_bytes().unwrap()
}

fn packet_functions(c: &mut Criterion) {
    let q = query();
    let parsed = packet::parse_query(&q).unwrap();
    let mut answer = q.clone();
    answer[2] |= 0x80;
    c.bench_function("parse_query", |b| {
        b.iter(|| packet::parse_query(black_box(&q)))
    });
    c.bench_function("response_matches", |b| {
        b.iter(|| packet::response_matches(black_box(&answer), black_box(&parsed.key)))
    });
    c.bench_function("set_id", |b| {
        let mut m = q.clone();
        b.iter(|| packet::set_id(black_box(&mut m), black_box(7)))
    });
    c.bench_function("servfail_in_place", |b| {
        b.iter_batched_ref(
            || q.clone(),
            |m| packet::servfail_in_place(m, parsed.question_end),
            criterion::BatchSize::SmallInput,
        )
    });
}

fn pick(c: &mut Criterion) {
    let members: Vec<Member> = (0..4)
        .map(|i| Member {
            spec: BackendConfig {
                name: format!("ns{i}"),
                address: SocketAddr::from(([127, 0, 0, 1], 5300 + i)),
                weight: 1 + u32::from(i),
            },
            state: AdminState::Active,
        })
        .collect();
    let set = BackendSet::new(1, &members).unwrap();
    for policy in [
        Policy::LeastOutstanding,
        Policy::RoundRobin,
        Policy::WeightedRandom,
        Policy::FirstAvailable,
    ] {
        let mut p = Picker::default();
        c.bench_function(&format!("load+pick {policy:?} (4 backends)"), |b| {
            b.iter(|| {
                let snap = set.load();
                black_box(snap.pick(policy, &mut p).map(|e| e.spec.weight))
            })
        });
    }
}

criterion_group!(benches, packet_functions, pick);
criterion_main!(benches);
