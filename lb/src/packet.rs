//! DNS wire-format helpers for the hot path. They work on raw message bytes and never
//! allocate: header fields, the bounds and a case-insensitive key of the question
//! section (what a response must echo to be accepted), and SERVFAIL synthesis in place.
//! Everything else in a message is opaque and passes through untouched.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Largest DNS message (16-bit length on TCP, 64 KiB datagram on UDP).
pub const MAX_MESSAGE: usize = 65535;
/// RCODE 2.
pub const RCODE_SERVFAIL: u8 = 2;
/// The UDP payload size dnslb's own answers advertise in their OPT record (the DNS
/// flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// RR type of the EDNS OPT pseudo-record.
const TYPE_OPT: u16 = 41;
/// RCODEs with which a response may leave the question section empty although the
/// query had one: FORMERR, SERVFAIL, NOTIMP, REFUSED.
const EMPTY_QUESTION_RCODES: [u8; 4] = [1, 2, 4, 5];
/// RR type SOA.
const TYPE_SOA: u16 = 6;
/// RR type TSIG (a signed message is answered for one query only).
const TYPE_TSIG: u16 = 250;
/// QTYPE IXFR.
pub const TYPE_IXFR: u16 = 251;
/// QTYPE AXFR.
pub const TYPE_AXFR: u16 = 252;
/// RCODE 3.
const RCODE_NXDOMAIN: u8 = 3;

/// Why an incoming message was dropped before it reached a backend or a client.
/// Each variant is a `reason` label of the dropped-packets metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Shorter than a DNS header.
    Short,
    /// A response (QR=1) sent to the listener.
    ResponseToListener,
    /// A query (QR=0) arriving from a backend.
    QueryFromBackend,
    /// A backend response whose ID matches nothing in flight (late, duplicate, spoofed).
    UnknownId,
    /// A response from an address other than the backend the ID was sent to.
    WrongSource,
    /// A response whose question or opcode differs, or whose question section is
    /// empty although the query had one and its RCODE is not an error that allows it.
    QuestionMismatch,
    /// Every ID towards backends is in use.
    IdsExhausted,
    /// The kernel refused to send (buffer full, unreachable).
    SendFailed,
    /// The kernel reported an error receiving (e.g. ICMP unreachable).
    ReceiveFailed,
    /// A datagram larger than the receive buffer (queries over 4096 bytes).
    Oversized,
    /// A TCP length prefix too small for a header or above the configured maximum.
    BadLength,
    /// The client's TCP connection ended in the middle of a frame or stalled in it.
    PartialFrame,
    /// A TCP connection refused on accept because `tcp.max_connections` are open.
    TooManyConnections,
    /// A UDP query or TCP connection from a client the `[acl]` does not allow.
    Acl,
    /// A TCP connection refused on accept because its client has
    /// `tcp.max_connections_per_client` open.
    ClientConnections,
}

impl Drop {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Drop; 15] = [
        Drop::Short,
        Drop::ResponseToListener,
        Drop::QueryFromBackend,
        Drop::UnknownId,
        Drop::WrongSource,
        Drop::QuestionMismatch,
        Drop::IdsExhausted,
        Drop::SendFailed,
        Drop::ReceiveFailed,
        Drop::Oversized,
        Drop::BadLength,
        Drop::PartialFrame,
        Drop::TooManyConnections,
        Drop::Acl,
        Drop::ClientConnections,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Short => "short",
            Drop::ResponseToListener => "response_to_listener",
            Drop::QueryFromBackend => "query_from_backend",
            Drop::UnknownId => "unknown_id",
            Drop::WrongSource => "wrong_source",
            Drop::QuestionMismatch => "question_mismatch",
            Drop::IdsExhausted => "ids_exhausted",
            Drop::SendFailed => "send_failed",
            Drop::ReceiveFailed => "receive_failed",
            Drop::Oversized => "oversized",
            Drop::BadLength => "bad_length",
            Drop::PartialFrame => "partial_frame",
            Drop::TooManyConnections => "too_many_connections",
            Drop::Acl => "acl",
            Drop::ClientConnections => "too_many_client_connections",
        }
    }
}

/// The message ID.
#[inline]
pub fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// Overwrites the message ID.
#[inline]
pub fn set_id(msg: &mut [u8], id: u16) {
    msg[..2].copy_from_slice(&id.to_be_bytes());
}

/// QR bit.
#[inline]
pub fn is_response(msg: &[u8]) -> bool {
    msg[2] & 0x80 != 0
}

/// OPCODE field.
#[inline]
pub fn opcode(msg: &[u8]) -> u8 {
    (msg[2] >> 3) & 0x0f
}

/// RCODE field (low four bits; extended RCODEs live in OPT and are not needed here).
#[inline]
pub fn rcode(msg: &[u8]) -> u8 {
    msg[3] & 0x0f
}

/// QDCOUNT field.
#[inline]
pub fn qdcount(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[4], msg[5]])
}

/// What a response must echo to be accepted for a query: the opcode, and a hash of
/// the question section with names lowercased (DNS names compare case-insensitively,
/// and a backend may echo 0x20-mixed case as it pleases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuestionKey {
    /// `None` when the question section could not be parsed: then only a response with
    /// an empty question section (FORMERR, NOTIMP) can match.
    pub hash: Option<u64>,
    /// The query's opcode.
    pub opcode: u8,
    /// Whether the query had a question (QDCOUNT > 0): then an answer with an empty
    /// question section is accepted only with an error RCODE.
    pub had_question: bool,
}

/// A validated query header and its question key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// The client's ID.
    pub id: u16,
    /// Key the response must match.
    pub key: QuestionKey,
    /// End offset of the question section, when it parsed.
    pub question_end: Option<usize>,
}

/// Checks that `msg` is something to forward: a header, and QR=0. Content only a
/// backend can judge (odd QDCOUNT, unknown opcode, unparsable question) is forwarded
/// so the client gets the backend's own FORMERR or NOTIMP.
#[inline]
pub fn parse_query(msg: &[u8]) -> Result<Query, Drop> {
    if msg.len() < HEADER_LEN {
        return Err(Drop::Short);
    }
    if is_response(msg) {
        return Err(Drop::ResponseToListener);
    }
    let (hash, question_end) = match question(msg) {
        Some((h, end)) => (Some(h), Some(end)),
        None => (None, None),
    };
    Ok(Query {
        id: id(msg),
        key: QuestionKey {
            hash,
            opcode: opcode(msg),
            had_question: qdcount(msg) != 0,
        },
        question_end,
    })
}

/// Checks a backend's response against the key of the query it claims to answer.
/// A response with an empty question section matches by opcode alone if the query had
/// none either, or if its RCODE is FORMERR, SERVFAIL, NOTIMP or REFUSED (servers send
/// those for queries they cannot or will not parse); an empty question with any
/// other RCODE (a NOERROR answer that does not say what it answers) is refused.
#[inline]
pub fn response_matches(msg: &[u8], key: &QuestionKey) -> Result<(), Drop> {
    if msg.len() < HEADER_LEN {
        return Err(Drop::Short);
    }
    if !is_response(msg) {
        return Err(Drop::QueryFromBackend);
    }
    if qdcount(msg) == 0 {
        let allowed = !key.had_question || EMPTY_QUESTION_RCODES.contains(&rcode(msg));
        return if opcode(msg) == key.opcode && allowed {
            Ok(())
        } else {
            Err(Drop::QuestionMismatch)
        };
    }
    match (question(msg), key.hash) {
        (Some((h, _)), Some(k)) if h == k && opcode(msg) == key.opcode => Ok(()),
        _ => Err(Drop::QuestionMismatch),
    }
}

/// FNV-1a, 64 bit: a few instructions a byte, and question sections are short.
struct Fnv(u64);

impl Fnv {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Hashes the question section: QDCOUNT, then each name (lowercased, labels with
/// their lengths, compression pointers followed backwards) with its type and class.
/// Returns the hash and the offset just past the section, or `None` if the section
/// runs past the message or holds a malformed name.
pub fn question(msg: &[u8]) -> Option<(u64, usize)> {
    let count = qdcount(msg);
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.byte((count >> 8) as u8);
    h.byte(count as u8);
    let mut pos = HEADER_LEN;
    for _ in 0..count {
        pos = hash_name(msg, pos, &mut h)?;
        let tail = msg.get(pos..pos + 4)?;
        for &b in tail {
            h.byte(b);
        }
        pos += 4;
    }
    Some((h.0, pos))
}

/// Hashes one name starting at `pos`; returns the offset after it in the message.
/// A compression pointer must point backwards, past the header, and what it points
/// at must end before the pointer itself (it names an earlier occurrence): so the
/// walk reads only bytes of the question section before the name's end, never loops,
/// and hashes the same in a query and in the answer dnslb makes of it, whose header
/// and records differ (found by fuzzing).
fn hash_name(msg: &[u8], mut pos: usize, h: &mut Fnv) -> Option<usize> {
    let mut end = None;
    let mut total = 0usize;
    // Bytes at or past `limit` may not be read (the latest pointer's position).
    let mut limit = msg.len();
    loop {
        let len = *msg.get(pos).filter(|_| pos < limit)?;
        match len & 0xc0 {
            0x00 => {
                h.byte(len);
                if len == 0 {
                    return Some(end.unwrap_or(pos + 1));
                }
                if pos + 1 + len as usize > limit {
                    return None;
                }
                let label = msg.get(pos + 1..pos + 1 + len as usize)?;
                total += 1 + label.len();
                if total > 255 {
                    return None;
                }
                for &b in label {
                    h.byte(b.to_ascii_lowercase());
                }
                pos += 1 + len as usize;
            }
            0xc0 => {
                if pos + 1 >= limit {
                    return None;
                }
                let ptr = (usize::from(len & 0x3f) << 8) | usize::from(*msg.get(pos + 1)?);
                if ptr >= pos || ptr < HEADER_LEN {
                    return None;
                }
                end.get_or_insert(pos + 2);
                limit = pos;
                pos = ptr;
            }
            _ => return None,
        }
    }
}

/// Skips the name at `pos`; returns the offset after it. Bounds-checked; a pointer
/// ends the name.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => return msg.get(pos + 1).map(|_| pos + 2),
            _ => return None,
        }
    }
}

/// Whether the name at `start` is made of plain labels only (no compression pointer)
/// and ends exactly at `end`.
pub fn plain_name(msg: &[u8], start: usize, end: usize) -> bool {
    let mut pos = start;
    while pos < end {
        let len = msg[pos];
        if len == 0 {
            return pos + 1 == end;
        }
        if len & 0xc0 != 0 {
            return false;
        }
        pos += 1 + usize::from(len);
    }
    false
}

/// How long an answer may be cached, in seconds: for a NOERROR or NXDOMAIN answer
/// (QR=1, TC=0, one question) the smallest TTL of its records (OPT aside), and for a
/// negative answer (NXDOMAIN, or NOERROR without answer records) no longer than the
/// SOA's MINIMUM field (RFC 2308 section 5); a referral (NS records, no SOA) lives as
/// long as its records. `None` if it may not be cached: another RCODE, TC set, signed
/// (TSIG), NXDOMAIN without a SOA, no record to take a TTL from, or malformed.
pub fn cacheable_lifetime(msg: &[u8]) -> Option<u32> {
    if msg.len() < HEADER_LEN || !is_response(msg) || msg[2] & 0x02 != 0 || qdcount(msg) != 1 {
        return None;
    }
    let rcode = rcode(msg);
    if rcode != 0 && rcode != RCODE_NXDOMAIN {
        return None;
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]));
    let (answers, authority, additional) = (count(6), count(8), count(10));
    let negative = rcode == RCODE_NXDOMAIN || answers == 0;
    let mut pos = skip_name(msg, HEADER_LEN)? + 4;
    let mut least: Option<u32> = None;
    let mut soa = false;
    for i in 0..answers + authority + additional {
        pos = skip_name(msg, pos)?;
        let fixed = msg.get(pos..pos + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = msg.get(pos + 10..pos + 10 + rdlen)?;
        pos += 10 + rdlen;
        match rtype {
            TYPE_TSIG => return None,
            TYPE_OPT => continue,
            _ => {}
        }
        let mut life = ttl;
        let in_authority = i >= answers && i < answers + authority;
        if negative && in_authority && rtype == TYPE_SOA && rdlen >= 20 {
            let m = &rdata[rdlen - 4..];
            life = life.min(u32::from_be_bytes([m[0], m[1], m[2], m[3]]));
            soa = true;
        }
        least = Some(least.map_or(life, |l| l.min(life)));
    }
    if pos != msg.len() || (rcode == RCODE_NXDOMAIN && !soa) {
        return None;
    }
    least
}

/// The DO bit of the query's OPT record, if it has one: walks the records after the
/// question (which ends at `question_end`) to the additional section.
fn opt_do_bit(msg: &[u8], question_end: usize) -> Option<bool> {
    let count = |at: usize| usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]));
    let (before, additional) = (count(6) + count(8), count(10));
    let mut pos = question_end;
    for i in 0..before + additional {
        pos = skip_name(msg, pos)?;
        let fixed = msg.get(pos..pos + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        if i >= before && rtype == TYPE_OPT {
            // TTL field: extended RCODE, version, then the flags, DO first.
            return Some(fixed[6] & 0x80 != 0);
        }
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        pos += 10 + rdlen;
        if pos > msg.len() {
            return None;
        }
    }
    None
}

/// Turns the query in `msg` into a SERVFAIL answer in place: QR=1, opcode, RD and CD
/// kept, RCODE=2, the question echoed when it parsed, and, if the query has an OPT
/// record, an OPT record (RFC 6891 6.1.1: advertising [`EDNS_PAYLOAD`], version 0,
/// the query's DO bit, no options). Nothing else of the query is echoed. Returns the
/// new length (never more than the query's).
pub fn servfail_in_place(msg: &mut [u8], question_end: Option<usize>) -> usize {
    empty_answer_in_place(msg, question_end, RCODE_SERVFAIL, false)
}

/// Turns the query in `msg` into the empty truncated answer that rate limiting
/// "slips" (as BIND's RRL does): QR=1, TC=1, NOERROR, the question, no records, and the
/// OPT record as [`servfail_in_place`] keeps it. A real client retries over TCP; a
/// spoofed victim gets no more bytes than the query had. Meant for a query whose
/// question parsed (`question_end` is `Some`): the answer echoes it. Returns the new
/// length.
pub fn truncated_in_place(msg: &mut [u8], question_end: Option<usize>) -> usize {
    empty_answer_in_place(msg, question_end, 0, true)
}

/// An answer made of the query's header and question alone (see the callers).
fn empty_answer_in_place(
    msg: &mut [u8],
    question_end: Option<usize>,
    rcode: u8,
    tc: bool,
) -> usize {
    let dnssec_ok = question_end.and_then(|end| opt_do_bit(msg, end));
    let rd_opcode = msg[2] & 0x79; // opcode + RD
    let cd = msg[3] & 0x10;
    msg[2] = 0x80 | rd_opcode | if tc { 0x02 } else { 0 };
    msg[3] = cd | rcode;
    let end = match question_end {
        Some(end) => end,
        None => {
            msg[4..6].fill(0);
            HEADER_LEN
        }
    };
    msg[6..12].fill(0);
    let Some(dnssec_ok) = dnssec_ok else {
        return end;
    };
    // The query's OPT record starts at or after `end` and takes at least these 11
    // bytes, so they fit.
    let [p0, p1] = EDNS_PAYLOAD.to_be_bytes();
    let flags = if dnssec_ok { 0x80 } else { 0 };
    msg[end..end + 11].copy_from_slice(&[0, 0, 41, p0, p1, 0, 0, flags, 0, 0, 0]);
    msg[11] = 1; // ARCOUNT
    end + 11
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use hickory_proto::serialize::binary::BinEncodable;
    use proptest::prelude::*;

    fn query_bytes(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_bytes().unwrap()
    }

    #[test]
    fn question_key_is_case_insensitive_and_type_sensitive() {
        let a = parse_query(&query_bytes("WwW.Example.Test.", RecordType::A)).unwrap();
        let b = parse_query(&query_bytes("www.example.test.", RecordType::A)).unwrap();
        let c = parse_query(&query_bytes("www.example.test.", RecordType::AAAA)).unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
        assert_eq!(a.id, 0x1234);
    }

    #[test]
    fn short_and_response_packets_are_rejected() {
        assert_eq!(parse_query(&[0; 11]), Err(Drop::Short));
        let mut r = query_bytes("a.test.", RecordType::A);
        r[2] |= 0x80;
        assert_eq!(parse_query(&r), Err(Drop::ResponseToListener));
    }

    #[test]
    fn response_matching() {
        let q = query_bytes("a.test.", RecordType::A);
        let key = parse_query(&q).unwrap().key;
        let mut r = q.clone();
        r[2] |= 0x80;
        assert_eq!(response_matches(&r, &key), Ok(()));
        let other = parse_query(&query_bytes("b.test.", RecordType::A))
            .unwrap()
            .key;
        assert_eq!(response_matches(&r, &other), Err(Drop::QuestionMismatch));
        // Empty question section: matches on opcode, and only with an error RCODE
        // when the query had a question.
        let mut empty = r[..12].to_vec();
        empty[4..6].fill(0);
        assert_eq!(response_matches(&empty, &key), Err(Drop::QuestionMismatch));
        for rcode in [1, 2, 4, 5] {
            empty[3] = rcode;
            assert_eq!(response_matches(&empty, &key), Ok(()), "rcode {rcode}");
        }
        for rcode in [0, 3, 9] {
            empty[3] = rcode;
            assert_eq!(
                response_matches(&empty, &key),
                Err(Drop::QuestionMismatch),
                "rcode {rcode}"
            );
        }
        let notify = QuestionKey { opcode: 4, ..key };
        empty[3] = 4;
        assert_eq!(
            response_matches(&empty, &notify),
            Err(Drop::QuestionMismatch)
        );
        // A query without a question: any RCODE.
        let mut none = q[..12].to_vec();
        none[4..6].fill(0);
        let none_key = parse_query(&none).unwrap().key;
        none[2] |= 0x80;
        assert_eq!(response_matches(&none, &none_key), Ok(()));
        assert_eq!(response_matches(&q, &key), Err(Drop::QueryFromBackend));
    }

    #[test]
    fn compression_pointer_in_question_is_followed_backwards_only() {
        // Two questions, the second compressed to the first.
        let mut m = query_bytes("a.test.", RecordType::A);
        m[5] = 2;
        let first = m.len();
        m.extend_from_slice(&[0xc0, 12, 0, 28, 0, 1]);
        let (_, end) = question(&m).unwrap();
        assert_eq!(end, first + 6);
        // A pointer into the header is refused: those bytes differ in the answer.
        let mut hdr = m[..12].to_vec();
        hdr[5] = 1;
        hdr.extend_from_slice(&[0xc0, 2, 0, 1, 0, 1]);
        assert_eq!(question(&hdr), None);
        // A pointer to itself is refused.
        let mut bad = m[..12].to_vec();
        bad[5] = 1;
        bad.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(question(&bad), None);
    }

    #[test]
    fn servfail_is_a_valid_answer_to_the_query() {
        let mut q = query_bytes("www.example.test.", RecordType::AAAA);
        let parsed = parse_query(&q).unwrap();
        let n = servfail_in_place(&mut q, parsed.question_end);
        let m = Message::from_vec(&q[..n]).unwrap();
        assert_eq!(m.id, 0x1234);
        assert_eq!(m.message_type, MessageType::Response);
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(response_matches(&q[..n], &parsed.key), Ok(()));
        assert!(m.edns.is_none(), "no OPT without one in the query");
        assert_eq!(n, q.len(), "nothing added");
    }

    #[test]
    fn servfail_of_an_edns_query_keeps_an_opt_record_and_nothing_else() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        for dnssec_ok in [false, true] {
            let mut m = Message::new(0x4321, MessageType::Query, OpCode::Query);
            m.add_query(HQuery::query(
                Name::from_ascii("a.example.test.").unwrap(),
                RecordType::A,
            ));
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(4096);
            e.set_dnssec_ok(dnssec_ok);
            e.options_mut()
                .insert(EdnsOption::Unknown(EdnsCode::Cookie.into(), vec![7; 8]));
            m.set_edns(e);
            let mut q = m.to_bytes().unwrap();
            let parsed = parse_query(&q).unwrap();
            let n = servfail_in_place(&mut q, parsed.question_end);
            let r = Message::from_vec(&q[..n]).unwrap();
            assert_eq!(r.response_code, ResponseCode::ServFail);
            assert_eq!(r.queries.len(), 1);
            assert!(r.answers.is_empty() && r.authorities.is_empty() && r.additionals.is_empty());
            let edns = r.edns.as_ref().expect("OPT kept");
            assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
            assert_eq!(edns.version(), 0);
            assert_eq!(edns.flags().dnssec_ok, dnssec_ok);
            assert!(edns.options().as_ref().is_empty(), "options are not echoed");
            assert_eq!(response_matches(&q[..n], &parsed.key), Ok(()));
        }
    }

    #[test]
    fn a_slipped_answer_is_an_empty_truncated_answer_to_the_query() {
        let mut q = query_bytes("www.example.test.", RecordType::A);
        q[2] |= 0x01; // RD
        let parsed = parse_query(&q).unwrap();
        let n = truncated_in_place(&mut q, parsed.question_end);
        let m = Message::from_vec(&q[..n]).unwrap();
        assert_eq!(m.id, 0x1234);
        assert_eq!(m.message_type, MessageType::Response);
        let h = &m.metadata;
        assert!(h.truncation && h.recursion_desired && !h.authoritative);
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert_eq!(m.queries.len(), 1);
        assert!(m.answers.is_empty() && m.additionals.is_empty());
        assert_eq!(response_matches(&q[..n], &parsed.key), Ok(()));
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(q) = parse_query(&bytes) {
                let mut b = bytes.clone();
                let n = servfail_in_place(&mut b, q.question_end);
                prop_assert!(n >= HEADER_LEN && n <= bytes.len());
                prop_assert!(response_matches(&b[..n], &q.key).is_ok());
            }
            let _ = response_matches(&bytes, &QuestionKey::default());
        }
    }
}
