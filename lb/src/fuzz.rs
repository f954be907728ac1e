//! The bodies of the fuzz targets in `lb/fuzz/` (cargo-fuzz, nightly), kept here so a
//! stable `#[test]` drives the same code with random and mutated inputs. Each takes
//! arbitrary bytes and panics only if an invariant breaks: query parsing, answer
//! matching, TCP framing, the packet cache. Not part of the supported API.

use std::time::{Duration, Instant};

use crate::cache::{self, Cache, Epoch, Transport};
use crate::packet::{self, HEADER_LEN};
use crate::tcp::{FrameReader, Next};

/// Query parsing and the answers dnslb makes in place (SERVFAIL, and the slipped TC=1
/// answer, which is made only for a question that parsed): never a panic; a made
/// answer is no longer than the query, parses as a response, and is accepted as the
/// answer to that query.
pub fn query_parsing(data: &[u8]) {
    let Ok(q) = packet::parse_query(data) else {
        return;
    };
    for tc in [false, true] {
        if tc && q.question_end.is_none() {
            continue;
        }
        let mut m = data.to_vec();
        let n = if tc {
            packet::truncated_in_place(&mut m, q.question_end)
        } else {
            packet::servfail_in_place(&mut m, q.question_end)
        };
        assert!(
            (HEADER_LEN..=data.len()).contains(&n),
            "{n} of {}",
            data.len()
        );
        assert!(packet::is_response(&m[..n]));
        assert_eq!(packet::id(&m[..n]), q.id);
        assert_eq!(packet::response_matches(&m[..n], &q.key), Ok(()));
    }
}

/// Answer matching: the first byte splits the input into a query and a response.
/// Never a panic; the query with QR set answers itself when its question parsed (or
/// it had none), and never when a question it had did not parse.
pub fn answer_matching(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (query, response) = rest.split_at(at);
    let Ok(q) = packet::parse_query(query) else {
        let _ = packet::response_matches(response, &Default::default());
        return;
    };
    let _ = packet::response_matches(response, &q.key);
    let mut echo = query.to_vec();
    echo[2] |= 0x80;
    let expected = q.key.hash.is_some() || !q.key.had_question;
    assert_eq!(
        packet::response_matches(&echo, &q.key).is_ok(),
        expected,
        "{q:?}"
    );
}

/// The packet cache: the first byte splits the input into a query and a backend's
/// answer to it. Never a panic (the answer's records are walked for their TTLs); an
/// answer the cache stores is found again for the same query and only over the same
/// transport, and served with the query's ID and name and otherwise the answer's
/// bytes, still matching the query.
pub fn cache_store(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (query, answer) = rest.split_at(at);
    let _ = packet::cacheable_lifetime(answer);
    let Ok(q) = packet::parse_query(query) else {
        return;
    };
    let epoch = Epoch {
        generation: 1,
        flushes: 0,
    };
    let mut c = Cache::new(4, Duration::from_secs(60));
    c.enter(epoch);
    let mut udp = Vec::new();
    let Some(key) = c.key(query, &q, Transport::Udp, &mut udp) else {
        return;
    };
    // Only an answer that matched its query is ever offered to the cache.
    if packet::response_matches(answer, &q.key).is_err() {
        return;
    }
    let now = Instant::now();
    if !c.store(epoch, &key, &udp, answer, usize::MAX, now) {
        return;
    }
    let mut tcp = Vec::new();
    let other = c
        .key(query, &q, Transport::Tcp, &mut tcp)
        .expect("the same query");
    assert!(c.lookup(&other, &tcp, now).is_none(), "served to TCP");
    let hit = c
        .lookup(&key, &udp, now)
        .expect("a stored answer is found")
        .to_vec();
    assert_eq!(hit, answer);
    let mut out = query.to_vec();
    out.resize(out.len().max(hit.len()), 0);
    let n = cache::answer_in_place(&mut out, &hit, key.name_end);
    let end = key.name_end;
    assert_eq!(n, answer.len());
    assert_eq!(&out[..2], &query[..2], "the client's ID");
    assert_eq!(&out[2..HEADER_LEN], &answer[2..HEADER_LEN]);
    assert_eq!(
        &out[HEADER_LEN..end],
        &query[HEADER_LEN..end],
        "the client's name"
    );
    assert_eq!(&out[end..n], &answer[end..]);
    // Over TCP the answer is copied out first, then addressed: the same bytes.
    let mut copy = hit.clone();
    cache::address_to(&mut copy, query, end);
    assert_eq!(copy, &out[..n], "TCP's hit is UDP's");
    assert_eq!(packet::response_matches(&out[..n], &q.key), Ok(()));
}

/// TCP framing: the input is a byte stream cut into reads at sizes taken from it.
/// The frames read must be exactly those of the stream, in order, up to the first
/// length prefix out of bounds; nothing is lost or invented across reads.
pub fn tcp_framing(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let max = 512 + usize::from(cut) * 64;
    // The model: frames of the whole stream, and whether it ends in a bad prefix.
    let mut want = Vec::new();
    let mut pos = 0;
    let mut bad = false;
    while stream.len() - pos >= 2 {
        let len = usize::from(u16::from_be_bytes([stream[pos], stream[pos + 1]]));
        if !(HEADER_LEN..=max).contains(&len) {
            bad = true;
            break;
        }
        if stream.len() - pos - 2 < len {
            break;
        }
        want.push(&stream[pos + 2..pos + 2 + len]);
        pos += 2 + len;
    }
    let mut rd = FrameReader::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut fed = 0;
    let mut saw_bad = false;
    let mut step = 1 + usize::from(cut % 7);
    'outer: while fed < stream.len() {
        let chunk = &stream[fed..(fed + step).min(stream.len())];
        fed += rd.feed(chunk);
        step = step * 3 % 4093 + 1;
        loop {
            match rd.next(max) {
                Next::Frame(a, b) => got.push(rd.frame(a, b).to_vec()),
                Next::Partial => break,
                Next::Bad => {
                    saw_bad = true;
                    break 'outer;
                }
            }
        }
    }
    assert_eq!(got.len(), want.len(), "frames");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.as_slice(), *w);
    }
    assert_eq!(saw_bad, bad, "bad prefix");
    if !bad {
        assert_eq!(rd.has_partial(), pos < stream.len());
    }
}

#[cfg(test)]
mod tests {
    //! The fuzz targets on stable: random inputs and mutations of real queries and
    //! streams, a bounded number of cases each.
    use super::*;
    use proptest::prelude::*;

    fn real_query() -> impl Strategy<Value = Vec<u8>> {
        use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        use hickory_proto::serialize::binary::BinEncodable;
        (
            prop::sample::select(vec![
                "www.example.test.",
                "a.b.c.",
                ".",
                "x.wild.example.test.",
            ]),
            any::<bool>(),
            any::<u16>(),
        )
            .prop_map(|(name, edns, id)| {
                let mut m = Message::new(id, MessageType::Query, OpCode::Query);
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
                if edns {
                    m.set_edns(Edns::new());
                }
                m.to_bytes().unwrap()
            })
    }

    /// A real query with a few bytes replaced, truncated or extended.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        (
            real_query(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(mut q, edits, cut, tail)| {
                for (i, b) in edits {
                    let at = i.index(q.len());
                    q[at] = b;
                }
                q.truncate(HEADER_LEN + cut.index(q.len() - HEADER_LEN + 1));
                q.extend(tail);
                q
            })
    }

    /// A real query and a real answer to it (a name in the client's case or another,
    /// records with random TTLs, NOERROR, NXDOMAIN with a SOA, or SERVFAIL), with a few
    /// of the answer's bytes replaced.
    fn query_and_answer() -> impl Strategy<Value = Vec<u8>> {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::rdata::{A, SOA};
        use hickory_proto::rr::{Name, RData, Record};
        use hickory_proto::serialize::binary::BinEncodable;
        (
            real_query(),
            prop::collection::vec(any::<u32>(), 0..4),
            0..3u8,
            any::<bool>(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        )
            .prop_map(|(q, ttls, rcode, upper, edits)| {
                let mut m = Message::from_vec(&q).unwrap();
                m.metadata.message_type = MessageType::Response;
                if upper {
                    let name = m.queries[0].name().to_ascii().to_uppercase();
                    m.queries[0].set_name(Name::from_ascii(&name).unwrap());
                }
                let name = m.queries[0].name().clone();
                match rcode {
                    0 => {
                        m.metadata.response_code = ResponseCode::NoError;
                        for t in ttls {
                            m.answers.push(Record::from_rdata(
                                name.clone(),
                                t,
                                RData::A(A::new(192, 0, 2, 1)),
                            ));
                        }
                    }
                    1 => {
                        m.metadata.response_code = ResponseCode::NXDomain;
                        let soa = SOA::new(
                            name.clone(),
                            name.clone(),
                            1,
                            2,
                            3,
                            4,
                            ttls.first().copied().unwrap_or(5),
                        );
                        m.authorities
                            .push(Record::from_rdata(name, 3600, RData::SOA(soa)));
                    }
                    _ => m.metadata.response_code = ResponseCode::ServFail,
                }
                let mut a = m.to_bytes().unwrap();
                for (i, b) in edits {
                    let at = i.index(a.len());
                    a[at] = b;
                }
                let mut data = vec![q.len() as u8];
                data.extend(q);
                data.extend(a);
                data
            })
    }

    /// What cargo-fuzz found: a compression pointer into the header, and one whose
    /// target name ran past the question into the records (the answer dnslb makes
    /// differs in both places, so its question hashed differently).
    #[test]
    fn crashes_found_by_fuzzing_stay_fixed() {
        query_parsing(&[
            13, 0, 0, 183, 0, 1, 0, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 1, 8, 8, 8, 8, 8, 8, 8, 8, 8,
            8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 49, 8, 8, 8, 8, 8, 8,
            8, 8, 8, 8, 0, 121, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8,
            8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 12, 32, 0, 1, 1, 0, 0, 0, 192,
            13, 4, 10, 47, 1, 0, 0, 0, 0, 1, 0, 64, 8, 0, 0, 1, 1, 241, 255, 255, 22, 1, 0, 0, 0,
            0, 0, 0,
        ]);
        query_parsing(&[
            10, 2, 0, 114, 0, 6, 1, 0, 0, 0, 22, 0, 0, 0, 0, 6, 0, 0, 6, 0, 0, 0, 192, 0, 0, 0, 0,
            13, 0, 0, 0, 16, 0, 0, 0, 1, 8, 0, 0, 6, 6, 6, 6, 6, 220, 13, 0, 0, 0, 0, 0, 0, 0, 0,
            13, 0, 0, 0, 16, 0,
        ]);
        answer_matching(&[
            152, 8, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 192, 0, 0, 0, 0, 0, 243, 0, 210, 1, 0, 210,
        ]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn query_parsing_holds(q in prop_oneof![mutated(), prop::collection::vec(any::<u8>(), 0..300)]) {
            query_parsing(&q);
        }

        #[test]
        fn answer_matching_holds(split in any::<u8>(), q in mutated(), r in mutated()) {
            let mut data = vec![split.min(q.len() as u8)];
            data.extend(&q);
            data.extend(&r);
            answer_matching(&data);
        }

        #[test]
        fn cache_store_holds(data in prop_oneof![
            query_and_answer(),
            prop::collection::vec(any::<u8>(), 0..300),
        ]) {
            cache_store(&data);
        }

        #[test]
        fn tcp_framing_holds(
            cut in any::<u8>(),
            frames in prop::collection::vec(mutated(), 0..12),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut data = vec![cut];
            for f in frames {
                data.extend((f.len() as u16).to_be_bytes());
                data.extend(f);
            }
            data.extend(tail);
            tcp_framing(&data);
        }

        #[test]
        fn tcp_framing_holds_on_noise(data in prop::collection::vec(any::<u8>(), 0..2000)) {
            tcp_framing(&data);
        }
    }
}
