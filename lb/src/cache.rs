//! The packet cache (`[cache]`): answers of backends kept per data-plane worker and
//! served again to the same query, byte for byte but for the ID and the question's
//! case.
//!
//! An entry belongs to one [`Epoch`]: the generation of the backend set, and the count
//! of manual flushes (`DELETE /v1/cache`). A worker that sees a newer epoch drops its
//! whole cache before it looks anything up, so a swap makes every earlier entry
//! unreachable at once; an answer to a query forwarded in an older epoch is not
//! stored. In an immutable fleet zone data changes only with a new generation of
//! backends, so the cache is exactly coherent and TTLs are not aged.
//!
//! The key is the whole query but its ID (EDNS buffer size, DO, options, RD and CD,
//! the question), with the query name lowercased, behind one byte for the transport:
//! a UDP answer fits the client's UDP size, a TCP one may not. Each worker owns its
//! cache (no lock, no atomics per query) with a share of `max_entries`; eviction is
//! CLOCK (second chance).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use crate::metrics::DataPlane;
use crate::packet::{self, Query};

/// What an entry's answers are good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Epoch {
    /// Generation of the backend set.
    pub generation: u64,
    /// Manual flushes so far.
    pub flushes: u64,
}

/// The transport a query came over (the first byte of its key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp = 0,
    Tcp = 1,
}

/// Hashes keys dnslb makes itself, not ones an attacker picks (SipHash is for those):
/// the 16-bit IDs of a TCP backend connection's queries, and this cache's key hashes,
/// already seeded at random. One multiply spreads them over the map.
#[derive(Default)]
pub(crate) struct OwnKeyHasher(u64);

impl Hasher for OwnKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(SPREAD);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(SPREAD);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(SPREAD);
    }
}

/// An odd constant (2^64 / the golden ratio): multiplying by it is a bijection that
/// moves low bits up.
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

struct Entry {
    /// The key, then the answer (one allocation).
    data: Box<[u8]>,
    key_len: u16,
    hash: u64,
    expires: Instant,
    /// Looked up since the clock hand last passed (CLOCK's second chance).
    referenced: bool,
}

impl Entry {
    fn key(&self) -> &[u8] {
        &self.data[..usize::from(self.key_len)]
    }

    fn answer(&self) -> &[u8] {
        &self.data[usize::from(self.key_len)..]
    }
}

/// Counts since they were last taken, added to the shared metrics once per batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Change in the number of entries.
    pub entries: i64,
}

/// One worker's cache.
pub(crate) struct Cache {
    capacity: usize,
    max_ttl: Duration,
    epoch: Epoch,
    /// Seeds the key hash, so that which keys collide cannot be known from outside.
    seed: u64,
    /// Key hash -> index in `entries`.
    map: HashMap<u64, u32, BuildHasherDefault<OwnKeyHasher>>,
    entries: Vec<Entry>,
    hand: usize,
    counts: Counts,
}

/// The key of a query being looked up or stored, built in a buffer the caller owns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    pub hash: u64,
    /// End of the question's name in the query (and in its answer).
    pub name_end: usize,
}

/// What the cache does with one query (see [`Cache::probe`]).
pub(crate) enum Probe<'a> {
    /// Answered from the cache: the stored answer, and where the question's name
    /// ends (the client's ID and name go over the answer's).
    Hit(&'a [u8], usize),
    /// Not held: forward the query and offer its answer to [`Cache::store`] with
    /// this epoch and key (the key's bytes are in the caller's buffer).
    Miss(Epoch, Key),
    /// A query the cache never answers (not looked up, not counted).
    Never,
}

impl Cache {
    /// A cache holding at most `capacity` entries (at least one), each for at most
    /// `max_ttl`.
    pub(crate) fn new(capacity: usize, max_ttl: Duration) -> Self {
        Cache {
            capacity: capacity.max(1),
            max_ttl,
            epoch: Epoch::default(),
            seed: fastrand::u64(..) | 1,
            map: HashMap::default(),
            entries: Vec::new(),
            hand: 0,
            counts: Counts::default(),
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The counts since the last call.
    pub(crate) fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Adds the counts since the last call to the shared metrics.
    pub(crate) fn report(&mut self, metrics: &DataPlane, transport: Transport) {
        let c = self.take_counts();
        metrics.count_cache(transport as usize, c.hits, c.misses, c.evictions, c.entries);
    }

    /// Looks `msg` (a parsed query that came over `transport`) up in `epoch`, the
    /// backend set's generation and flushes now: moves the cache to `epoch` first,
    /// so no entry of an earlier one is ever served. The key's bytes are left in `buf`.
    pub(crate) fn probe(
        &mut self,
        msg: &[u8],
        q: &Query,
        transport: Transport,
        buf: &mut Vec<u8>,
        epoch: Epoch,
        now: Instant,
    ) -> Probe<'_> {
        let Some(key) = self.key(msg, q, transport, buf) else {
            return Probe::Never;
        };
        self.enter(epoch);
        let epoch = self.epoch;
        match self.lookup(&key, buf, now) {
            Some(answer) => Probe::Hit(answer, key.name_end),
            None => Probe::Miss(epoch, key),
        }
    }

    /// Builds the key of `msg` (a parsed query) into `buf`. `None` if the query is not
    /// one the cache answers: not exactly one question, not a standard query, a name
    /// with a compression pointer, or a zone transfer (many messages per query).
    pub(crate) fn key(
        &self,
        msg: &[u8],
        q: &Query,
        transport: Transport,
        buf: &mut Vec<u8>,
    ) -> Option<Key> {
        let question_end = q.question_end?;
        if packet::qdcount(msg) != 1 || q.key.opcode != 0 {
            return None;
        }
        let name_end = question_end - 4;
        let qtype = u16::from_be_bytes([msg[name_end], msg[name_end + 1]]);
        if matches!(qtype, packet::TYPE_AXFR | packet::TYPE_IXFR) {
            return None;
        }
        // An uncompressed name: its labels run up to the root label just before the
        // type (a pointer would end the name two bytes after it).
        if msg[name_end - 1] != 0 || !packet::plain_name(msg, packet::HEADER_LEN, name_end) {
            return None;
        }
        fill_key(msg, name_end, transport, buf);
        let mut h = self.seed;
        for chunk in buf.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(w))
                .wrapping_mul(SPREAD)
                .rotate_left(29);
        }
        Some(Key {
            hash: h ^ buf.len() as u64,
            name_end,
        })
    }

    /// Moves to `epoch`, dropping every entry if it is newer than the cache's.
    pub(crate) fn enter(&mut self, epoch: Epoch) {
        if epoch != self.epoch {
            self.counts.entries -= self.entries.len() as i64;
            self.entries.clear();
            self.map.clear();
            self.hand = 0;
            self.epoch = epoch;
        }
    }

    /// The answer stored for `key` (whose bytes are `bytes`), if it has not expired.
    /// Call [`Cache::enter`] first.
    pub(crate) fn lookup(&mut self, key: &Key, bytes: &[u8], now: Instant) -> Option<&[u8]> {
        let found = self.map.get(&key.hash).copied().filter(|&i| {
            let e = &self.entries[i as usize];
            e.expires > now && e.key() == bytes
        });
        match found {
            Some(i) => {
                self.counts.hits += 1;
                let e = &mut self.entries[i as usize];
                e.referenced = true;
                Some(e.answer())
            }
            None => {
                self.counts.misses += 1;
                None
            }
        }
    }

    /// Stores `answer` (matched to its query, its ID as the backend sent it) for
    /// `key`, if it is cacheable: NOERROR or NXDOMAIN, no TC, the same question,
    /// unsigned, a lifetime over zero seconds, no longer than `max_len`, and its query
    /// forwarded in the cache's epoch.
    pub(crate) fn store(
        &mut self,
        epoch: Epoch,
        key: &Key,
        bytes: &[u8],
        answer: &[u8],
        max_len: usize,
        now: Instant,
    ) -> bool {
        if epoch != self.epoch || answer.len() > max_len || bytes.len() > usize::from(u16::MAX) {
            return false;
        }
        // The answer's question is the query's (the names compared ignoring case),
        // so a hit can write the client's name over it at the same place.
        let question = packet::HEADER_LEN - 1..key.name_end + 4 - 1;
        match answer.get(packet::HEADER_LEN..key.name_end + 4) {
            Some(q) if q.eq_ignore_ascii_case(&bytes[question]) => {}
            _ => return false,
        }
        let Some(ttl) = packet::cacheable_lifetime(answer) else {
            return false;
        };
        let lifetime = Duration::from_secs(u64::from(ttl)).min(self.max_ttl);
        if lifetime.is_zero() {
            return false;
        }
        let mut data = Vec::with_capacity(bytes.len() + answer.len());
        data.extend_from_slice(bytes);
        data.extend_from_slice(answer);
        let entry = Entry {
            data: data.into_boxed_slice(),
            key_len: bytes.len() as u16,
            hash: key.hash,
            expires: now + lifetime,
            referenced: false,
        };
        if let Some(&i) = self.map.get(&key.hash) {
            // The same key (or one whose hash collides): the newer answer wins.
            self.entries[i as usize] = entry;
            return true;
        }
        let index = if self.entries.len() < self.capacity {
            self.entries.push(entry);
            self.counts.entries += 1;
            self.entries.len() - 1
        } else {
            let i = self.victim(now);
            let old = std::mem::replace(&mut self.entries[i], entry);
            self.map.remove(&old.hash);
            i
        };
        self.map.insert(key.hash, index as u32);
        true
    }

    /// The entry to replace in a full cache: the first expired or unreferenced one
    /// from the clock hand on, clearing the references it passes.
    fn victim(&mut self, now: Instant) -> usize {
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.entries.len();
            let e = &mut self.entries[i];
            if e.expires <= now {
                return i;
            }
            if !e.referenced {
                self.counts.evictions += 1;
                return i;
            }
            e.referenced = false;
        }
    }
}

/// Builds the key bytes of the query `msg`, whose name ends at `name_end`, into
/// `buf`: the transport, then the query but its ID, the name lowercased.
pub(crate) fn fill_key(msg: &[u8], name_end: usize, transport: Transport, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(transport as u8);
    buf.extend_from_slice(&msg[2..]);
    // Offsets in `buf` are one less than in the message (ID gone, transport in).
    buf[packet::HEADER_LEN - 1..name_end - 1].make_ascii_lowercase();
}

/// Writes the cached `answer` for a query into `out`, which holds the query (its
/// first `name_end` bytes at least): the query's ID and name (the client's case) stay,
/// everything else is the answer's. Returns the answer's length. `out` must be as
/// long as the answer.
pub(crate) fn answer_in_place(out: &mut [u8], answer: &[u8], name_end: usize) -> usize {
    out[2..packet::HEADER_LEN].copy_from_slice(&answer[2..packet::HEADER_LEN]);
    out[name_end..answer.len()].copy_from_slice(&answer[name_end..]);
    answer.len()
}

/// Writes the query's ID and name (the client's case) over `out`, a copy of the cached
/// answer to it: what [`answer_in_place`] leaves, where the answer cannot be written
/// over its query.
pub(crate) fn address_to(out: &mut [u8], query: &[u8], name_end: usize) {
    out[..2].copy_from_slice(&query[..2]);
    out[packet::HEADER_LEN..name_end].copy_from_slice(&query[packet::HEADER_LEN..name_end]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use hickory_proto::serialize::binary::BinEncodable;

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(HQuery::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        m.to_bytes().unwrap()
    }

    fn answer_to(q: &[u8], ttl: u32, rcode: ResponseCode) -> Vec<u8> {
        let mut m = Message::from_vec(q).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.metadata.authoritative = true;
        m.metadata.response_code = rcode;
        let name = m.queries[0].name().clone();
        if rcode == ResponseCode::NoError {
            m.answers.push(Record::from_rdata(
                name,
                ttl,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        } else {
            let soa = SOA::new(
                Name::from_ascii("ns.example.").unwrap(),
                Name::from_ascii("host.example.").unwrap(),
                1,
                3600,
                600,
                86400,
                ttl,
            );
            m.authorities.push(Record::from_rdata(
                Name::from_ascii("example.").unwrap(),
                3600,
                RData::SOA(soa),
            ));
        }
        m.to_bytes().unwrap()
    }

    fn key_of(c: &Cache, msg: &[u8], t: Transport, buf: &mut Vec<u8>) -> Option<Key> {
        let q = packet::parse_query(msg).unwrap();
        c.key(msg, &q, t, buf)
    }

    const E: Epoch = Epoch {
        generation: 1,
        flushes: 0,
    };

    #[test]
    fn a_hit_ignores_id_and_name_case_and_gives_the_clients_back() {
        let mut c = Cache::new(10, Duration::from_secs(300));
        c.enter(E);
        let now = Instant::now();
        let q = query("www.Example.", 7);
        let a = answer_to(&q, 60, ResponseCode::NoError);
        let mut kb = Vec::new();
        let k = key_of(&c, &q, Transport::Udp, &mut kb).unwrap();
        assert!(c.lookup(&k, &kb, now).is_none());
        assert!(c.store(E, &k, &kb, &a, 4096, now));
        let mut q2 = query("WWW.example.", 9);
        let k2 = key_of(&c, &q2, Transport::Udp, &mut kb).unwrap();
        let hit = c.lookup(&k2, &kb, now).unwrap().to_vec();
        q2.resize(hit.len(), 0);
        let n = answer_in_place(&mut q2, &hit, k2.name_end);
        let got = &q2[..n];
        assert_eq!(packet::id(got), 9);
        assert_eq!(&got[12..25], b"\x03WWW\x07example\x00");
        assert_eq!(&got[2..12], &a[2..12]);
        assert_eq!(&got[25..], &a[25..]);
        assert_eq!(
            c.take_counts(),
            Counts {
                hits: 1,
                misses: 1,
                evictions: 0,
                entries: 1
            }
        );
    }

    /// `probe` moves to the epoch it is given before looking up, so an answer stored
    /// in an earlier one is a miss in the next; a zone transfer is never looked up.
    #[test]
    fn a_probe_enters_the_epoch_it_is_given_and_never_looks_up_a_transfer() {
        let mut c = Cache::new(10, Duration::from_secs(300));
        let now = Instant::now();
        let q = query("www.example.", 3);
        let pq = packet::parse_query(&q).unwrap();
        let mut kb = Vec::new();
        let Probe::Miss(epoch, key) = c.probe(&q, &pq, Transport::Tcp, &mut kb, E, now) else {
            panic!("an empty cache holds nothing");
        };
        assert_eq!(epoch, E);
        let a = answer_to(&q, 60, ResponseCode::NoError);
        assert!(c.store(epoch, &key, &kb, &a, 65535, now));
        let Probe::Hit(hit, name_end) = c.probe(&q, &pq, Transport::Tcp, &mut kb, E, now) else {
            panic!("stored in this epoch");
        };
        assert_eq!((hit, name_end), (&a[..], key.name_end));
        let next = Epoch {
            generation: 2,
            flushes: 0,
        };
        match c.probe(&q, &pq, Transport::Tcp, &mut kb, next, now) {
            Probe::Miss(e, _) => assert_eq!(e, next),
            _ => panic!("a new generation holds nothing of the old"),
        }
        assert_eq!(c.len(), 0);
        let mut m = Message::from_vec(&q).unwrap();
        m.queries[0].set_query_type(RecordType::AXFR);
        let axfr = m.to_bytes().unwrap();
        let pa = packet::parse_query(&axfr).unwrap();
        assert!(matches!(
            c.probe(&axfr, &pa, Transport::Tcp, &mut kb, next, now),
            Probe::Never
        ));
        let counts = c.take_counts();
        assert_eq!(
            (counts.hits, counts.misses),
            (1, 2),
            "a transfer is not counted"
        );
    }

    #[test]
    fn transport_epoch_and_expiry_each_make_a_miss() {
        let mut c = Cache::new(10, Duration::from_secs(30));
        c.enter(E);
        let now = Instant::now();
        let q = query("a.example.", 1);
        let mut kb = Vec::new();
        let k = key_of(&c, &q, Transport::Udp, &mut kb).unwrap();
        assert!(c.store(
            E,
            &k,
            &kb,
            &answer_to(&q, 3600, ResponseCode::NoError),
            4096,
            now
        ));
        let tcp = key_of(&c, &q, Transport::Tcp, &mut kb).unwrap();
        assert!(
            c.lookup(&tcp, &kb, now).is_none(),
            "UDP entry served to TCP"
        );
        let k = key_of(&c, &q, Transport::Udp, &mut kb).unwrap();
        assert!(c.lookup(&k, &kb, now + Duration::from_secs(29)).is_some());
        // Capped by max_ttl (30 s), not the record's 3600.
        assert!(c.lookup(&k, &kb, now + Duration::from_secs(30)).is_none());
        c.enter(Epoch {
            generation: 2,
            flushes: 0,
        });
        assert_eq!(c.len(), 0);
        assert!(c.lookup(&k, &kb, now).is_none());
        // An answer to a query forwarded before the swap is not kept.
        assert!(!c.store(
            E,
            &k,
            &kb,
            &answer_to(&q, 60, ResponseCode::NoError),
            4096,
            now
        ));
    }

    #[test]
    fn only_positive_and_nxdomain_answers_with_a_lifetime_are_stored() {
        let mut c = Cache::new(10, Duration::from_secs(300));
        c.enter(E);
        let now = Instant::now();
        let q = query("n.example.", 1);
        let mut kb = Vec::new();
        let k = key_of(&c, &q, Transport::Udp, &mut kb).unwrap();
        let refused = answer_to(&q, 60, ResponseCode::Refused);
        assert!(!c.store(E, &k, &kb, &refused, 4096, now));
        let zero = answer_to(&q, 0, ResponseCode::NoError);
        assert!(!c.store(E, &k, &kb, &zero, 4096, now));
        let mut tc = answer_to(&q, 60, ResponseCode::NoError);
        tc[2] |= 0x02;
        assert!(!c.store(E, &k, &kb, &tc, 4096, now));
        let big = answer_to(&q, 60, ResponseCode::NoError);
        assert!(!c.store(E, &k, &kb, &big, big.len() - 1, now));
        let nx = answer_to(&q, 5, ResponseCode::NXDomain);
        assert!(c.store(E, &k, &kb, &nx, 4096, now));
        // Negative lifetime: the SOA minimum (5 s), not the SOA's TTL (3600 s).
        assert!(c.lookup(&k, &kb, now + Duration::from_secs(4)).is_some());
        assert!(c.lookup(&k, &kb, now + Duration::from_secs(5)).is_none());
        // Zone transfers are never keyed.
        let mut axfr = Message::from_vec(&q).unwrap();
        axfr.queries[0].set_query_type(RecordType::AXFR);
        assert!(key_of(&c, &axfr.to_bytes().unwrap(), Transport::Tcp, &mut kb).is_none());
    }

    #[test]
    fn a_full_cache_evicts_what_was_not_looked_up_since_the_hand_passed() {
        let mut c = Cache::new(3, Duration::from_secs(300));
        c.enter(E);
        let now = Instant::now();
        let mut kb = Vec::new();
        let mut put = |c: &mut Cache, name: &str| {
            let q = query(name, 1);
            let k = key_of(c, &q, Transport::Udp, &mut kb).unwrap();
            let a = answer_to(&q, 60, ResponseCode::NoError);
            assert!(c.store(E, &k, &kb, &a, 4096, now));
        };
        for n in ["a.", "b.", "c."] {
            put(&mut c, n);
        }
        let hit = |c: &mut Cache, name: &str| {
            let q = query(name, 1);
            let mut kb = Vec::new();
            let k = key_of(c, &q, Transport::Udp, &mut kb).unwrap();
            c.lookup(&k, &kb, now).is_some()
        };
        assert!(hit(&mut c, "a."));
        put(&mut c, "d.");
        assert_eq!(c.len(), 3);
        assert!(hit(&mut c, "a."), "a referenced entry got a second chance");
        assert!(!hit(&mut c, "b."), "the first unreferenced entry went");
        assert!(hit(&mut c, "c.") && hit(&mut c, "d."));
        assert_eq!(c.take_counts().evictions, 1);
    }
}
