//! Authenticated, encrypted links (docs/method.md 8.3): every party has a static X25519 key pair
//! and starts with the pinned public keys of the two others; each link runs the Noise KK
//! handshake (`snow`), which proves both keys, and then carries AEAD records.
//!
//! Who speaks first: the party with the higher role index dials and initiates (server -> client,
//! dealer -> client, dealer -> server). Before the Noise messages the initiator sends an 8-byte
//! preamble naming its role and the role it wants to reach; the preamble is the Noise prologue,
//! so a claim changed on the way fails the handshake. The responder takes the pinned key of the
//! claimed role and refuses (closes, sends nothing) when the first message does not
//! authenticate: an impostor learns nothing, not even the session hash.
//!
//! Wire format after the preamble: records of `u16 LE length | ciphertext` (at most 65,535
//! bytes, 16 of them the Poly1305 tag). Nonces count records per direction and are implicit, so
//! a tampered, dropped, replayed or reordered record fails to decrypt.
use super::conn::{read_exact_by, write_all_by, Conn, Stream};
use super::wire::Role;
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use snow::{Builder, StatelessTransportState};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// The Noise protocol name: KK (both static keys known in advance), X25519, ChaCha20-Poly1305,
/// BLAKE2s.
pub const PATTERN: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";
const PREAMBLE_MAGIC: [u8; 4] = *b"BRNK";
/// 2: the handshake payloads moved into a key-confirmation record, and a session id.
const PREAMBLE_VERSION: u8 = 2;
const PREAMBLE_LEN: usize = 8;
pub use crate::spec::framing::{MAX_PLAIN, MAX_RECORD};
use crate::spec::framing::{RECORD_LEN_PREFIX, RECORD_TAG_LEN as TAG_LEN};

fn params() -> snow::params::NoiseParams {
    PATTERN.parse().expect("a valid Noise protocol name")
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A short, printable name of a public key (first 8 bytes of its SHA-256).
pub fn fingerprint(public: &[u8; 32]) -> String {
    hex(&Sha256::digest(public)[..8])
}

/// A party's static key pair.
pub struct Identity {
    pub role: Role,
    secret: [u8; 32],
    pub public: [u8; 32],
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    role: String,
    public: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    private: Option<String>,
}

fn read_key_file(path: &Path) -> Result<(Role, [u8; 32], Option<[u8; 32]>)> {
    let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let parsed = toml::from_str::<KeyFile>(&text);
    text.zeroize();
    let mut f = parsed.map_err(|e| Error::parse(path, e.to_string()))?;
    let out = key_file_fields(path, &f);
    if let Some(p) = f.private.as_mut() {
        p.zeroize();
    }
    out
}

fn key_file_fields(path: &Path, f: &KeyFile) -> Result<(Role, [u8; 32], Option<[u8; 32]>)> {
    let field = |name: &str, msg: String| Error::Config {
        path: path.to_path_buf(),
        field: name.into(),
        msg,
    };
    let role = Role::parse(&f.role).ok_or_else(|| {
        field(
            "role",
            format!("'{}' is not client, server or dealer", f.role),
        )
    })?;
    let public = unhex32(&f.public)
        .ok_or_else(|| field("public", "expected 64 hexadecimal digits".into()))?;
    let private = match &f.private {
        Some(p) => Some(
            unhex32(p).ok_or_else(|| field("private", "expected 64 hexadecimal digits".into()))?,
        ),
        None => None,
    };
    Ok((role, public, private))
}

impl Identity {
    /// A fresh key pair from the operating system's RNG.
    pub fn generate(role: Role) -> Result<Identity> {
        let kp = Builder::new(params())
            .generate_keypair()
            .map_err(|e| Error::InvalidArgument(format!("generating a key pair: {e}")))?;
        let mut secret = [0u8; 32];
        let mut public = [0u8; 32];
        secret.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Ok(Identity {
            role,
            secret,
            public,
        })
    }

    /// Writes `ROLE.key` (private, mode 0600) and `ROLE.pub` into `dir`; returns both paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let role = self.role.name();
        let key = dir.join(format!("{role}.key"));
        let public = dir.join(format!("{role}.pub"));
        let mut private = KeyFile {
            role: role.into(),
            public: hex(&self.public),
            private: Some(hex(&self.secret)),
        };
        let body = |f: &KeyFile, what: &str| {
            format!(
                "# brelu secure {what} of the {role} (fingerprint {})\n{}",
                fingerprint(&self.public),
                toml::to_string(f).expect("a key file serialises")
            )
        };
        crate::fs::write_atomic_private(&key, body(&private, "private key").as_bytes())?;
        private.private = None;
        crate::fs::write_atomic(&public, body(&private, "public key").as_bytes())?;
        Ok((key, public))
    }

    /// Reads a private key file written by [`Identity::save`]. Refused: a file that others
    /// than its owner may read or write (as ssh refuses one), and a file whose public key is
    /// not the one its private key gives.
    pub fn load(path: &Path) -> Result<Identity> {
        let (role, public, secret) = read_key_file(path)?;
        let secret = secret.ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            field: "private".into(),
            msg: "missing: this is a public key file, give the party's own .key file".into(),
        })?;
        check_private_mode(path)?;
        let id = Identity {
            role,
            secret,
            public,
        };
        if id.derived_public() != id.public {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "public".into(),
                msg: "is not the public key of the file's private key (an edited or mixed-up \
                      file): generate the pair again with `brelu secure keygen`"
                    .into(),
            });
        }
        Ok(id)
    }

    /// The X25519 public key of this identity's secret.
    fn derived_public(&self) -> [u8; 32] {
        x25519_dalek::x25519(self.secret, x25519_dalek::X25519_BASEPOINT_BYTES)
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// A private key file must be its owner's alone (no group or other permission bits).
fn check_private_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            field: "file mode".into(),
            msg: format!(
                "{:03o}: a private key must not be accessible to group or others; \
                 run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        });
    }
    Ok(())
}

/// The pinned public keys of the other parties, by role.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    keys: [Option<[u8; 32]>; 3],
}

impl Trust {
    pub fn pin(&mut self, role: Role, public: [u8; 32]) {
        self.keys[role as usize] = Some(public);
    }

    pub fn get(&self, role: Role) -> Option<&[u8; 32]> {
        self.keys[role as usize].as_ref()
    }

    /// An error when two of the three parties would share a key: `own` and the pinned keys
    /// must all differ (a server and dealer with one key pair are one party in disguise, and
    /// the security of the protocol rests on their not colluding).
    pub fn check_distinct(&self, own: &Identity) -> Result<()> {
        let mut keys: Vec<(Role, &[u8; 32])> = vec![(own.role, &own.public)];
        keys.extend(Role::ALL.iter().filter_map(|&r| Some((r, self.get(r)?))));
        for (i, (ra, ka)) in keys.iter().enumerate() {
            if let Some((rb, _)) = keys[i + 1..].iter().find(|(rb, kb)| rb != ra && kb == ka) {
                return Err(Error::InvalidArgument(format!(
                    "the {ra} and the {rb} have the same key (fingerprint {}): each party \
                     needs its own key pair",
                    fingerprint(ka)
                )));
            }
        }
        Ok(())
    }

    /// Pins the key of a public (or private) key file, which must be `role`'s.
    pub fn pin_file(&mut self, role: Role, path: &Path) -> Result<()> {
        let (file_role, public, _) = read_key_file(path)?;
        if file_role != role {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "role".into(),
                msg: format!("the key is the {file_role}'s, expected the {role}'s"),
            });
        }
        self.pin(role, public);
        Ok(())
    }
}

/// Fresh key pairs for the three parties of one process (`brelu secure run`, tests), each
/// party trusting the other two.
pub fn ephemeral_session() -> Result<[(Identity, Trust); 3]> {
    let ids = [
        Identity::generate(Role::Client)?,
        Identity::generate(Role::Server)?,
        Identity::generate(Role::Dealer)?,
    ];
    let mut trust = Trust::default();
    for id in &ids {
        trust.pin(id.role, id.public);
    }
    Ok(ids.map(|id| (id, trust.clone())))
}

/// The keys of an established link, shared by its reader and its writer thread.
#[derive(Clone)]
pub struct Transport {
    state: Arc<StatelessTransportState>,
}

/// A finished handshake: the link's keys, the peer's payload and the handshake hash (which
/// names this one link of this one session: it covers both static and ephemeral keys).
pub struct Handshake {
    pub transport: Transport,
    pub payload: Vec<u8>,
    pub hash: [u8; 32],
}

fn finish(
    hs: snow::HandshakeState,
    payload: Vec<u8>,
    snow_err: impl Fn(snow::Error) -> Error,
) -> Result<Handshake> {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&hs.get_handshake_hash()[..32]);
    let state = hs.into_stateless_transport_mode().map_err(snow_err)?;
    Ok(Handshake {
        transport: Transport {
            state: Arc::new(state),
        },
        payload,
        hash,
    })
}

/// Why a handshake was refused, as the error names it.
fn refused(peer: &str, msg: impl Into<String>) -> Error {
    Error::Refused {
        peer: peer.to_string(),
        msg: msg.into(),
    }
}

fn handshake_io(peer: &str, e: std::io::Error, waiting_for: &str) -> Error {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Error::Refused {
            peer: peer.to_string(),
            msg: format!("no {waiting_for} in time"),
        },
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => refused(
            peer,
            format!(
                "closed the connection while we waited for {waiting_for} (it does not accept \
                 our key or role, or already has this role connected)"
            ),
        ),
        _ => refused(peer, format!("{e} while waiting for {waiting_for}")),
    }
}

fn preamble(from: Role, to: Role) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&PREAMBLE_MAGIC);
    p[4] = PREAMBLE_VERSION;
    p[5] = from as u8;
    p[6] = to as u8;
    p
}

fn send_record(s: &mut dyn Conn, msg: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg);
    write_all_by(s, &out, deadline)
}

fn recv_record(s: &mut dyn Conn, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    read_exact_by(s, &mut len, deadline)?;
    let mut msg = vec![0u8; u16::from_le_bytes(len) as usize];
    read_exact_by(s, &mut msg, deadline)?;
    Ok(msg)
}

/// Dials side: authenticates to `peer` (whose pinned key is `peer_key`) and exchanges the
/// handshake payloads (ours first). The responder cannot tell our first message from a
/// recording of it: the caller confirms the keys with a first record only we can seal.
pub fn initiate(
    s: &mut dyn Conn,
    me: &Identity,
    peer: Role,
    peer_key: &[u8; 32],
    payload: &[u8],
    deadline: Instant,
) -> Result<Handshake> {
    let name = peer.name();
    let pre = preamble(me.role, peer);
    let snow_err = |e: snow::Error| refused(name, format!("handshake: {e}"));
    let mut hs = Builder::new(params())
        .local_private_key(&me.secret)
        .and_then(|b| b.remote_public_key(peer_key))
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_initiator())
        .map_err(snow_err)?;
    let mut buf = vec![0u8; MAX_RECORD];
    let n = hs.write_message(payload, &mut buf).map_err(snow_err)?;
    let io = |e| handshake_io(name, e, "the handshake reply");
    write_all_by(s, &pre, deadline).map_err(io)?;
    send_record(s, &buf[..n], deadline).map_err(io)?;
    let reply = recv_record(s, deadline).map_err(io)?;
    let n = hs.read_message(&reply, &mut buf).map_err(|_| {
        refused(
            name,
            format!(
                "its reply does not authenticate: the {name} does not hold the pinned {name} key"
            ),
        )
    })?;
    let theirs = buf[..n].to_vec();
    finish(hs, theirs, snow_err)
}

/// Answering side: reads the preamble and first message of a connection that claims one of the
/// `allowed` roles (both by `first_by`: a silent connection is dropped early), checks them
/// against that role's pinned key and replies with `reply(role, peer_payload)` by
/// `deadline`. Refuses (without sending anything) a bad preamble, a role not allowed, and a
/// first message that does not authenticate. A replayed first message authenticates: only
/// the initiator's first record under the new keys proves it live (the caller's job).
pub fn respond(
    s: &mut dyn Conn,
    me: &Identity,
    trust: &Trust,
    allowed: &[Role],
    (first_by, deadline): (Instant, Instant),
    reply: impl FnOnce(Role, &[u8]) -> Vec<u8>,
) -> Result<(Role, Handshake)> {
    let addr = s.peer_name();
    let mut pre = [0u8; PREAMBLE_LEN];
    read_exact_by(s, &mut pre, first_by).map_err(|e| handshake_io(&addr, e, "a preamble"))?;
    if pre[..4] != PREAMBLE_MAGIC || pre[4] != PREAMBLE_VERSION || pre[7] != 0 {
        return Err(refused(
            &addr,
            "not a brelu handshake (bad preamble: wrong program or version)",
        ));
    }
    let claimed =
        Role::from_u8(pre[5]).ok_or_else(|| refused(&addr, format!("unknown role {}", pre[5])))?;
    if pre[6] != me.role as u8 {
        return Err(refused(
            &addr,
            format!("wants to reach role {}, this is the {}", pre[6], me.role),
        ));
    }
    let who = format!("{claimed} at {addr}");
    if !allowed.contains(&claimed) {
        return Err(refused(
            &who,
            format!("the {claimed} is not expected here (already connected, or not a role that dials the {})", me.role),
        ));
    }
    let key = trust
        .get(claimed)
        .ok_or_else(|| refused(&who, format!("no pinned key for the {claimed}")))?;
    let snow_err = |e: snow::Error| refused(&who, format!("handshake: {e}"));
    let mut hs = Builder::new(params())
        .local_private_key(&me.secret)
        .and_then(|b| b.remote_public_key(key))
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_responder())
        .map_err(snow_err)?;
    let first = recv_record(s, first_by)
        .map_err(|e| handshake_io(&who, e, "the first handshake message"))?;
    let mut buf = vec![0u8; MAX_RECORD];
    let n = hs.read_message(&first, &mut buf).map_err(|_| {
        refused(
            &who,
            format!(
                "authentication failed: it does not hold the pinned {claimed} key (fingerprint {})",
                fingerprint(key)
            ),
        )
    })?;
    let theirs = buf[..n].to_vec();
    let ours = reply(claimed, &theirs);
    let n = hs.write_message(&ours, &mut buf).map_err(snow_err)?;
    send_record(s, &buf[..n], deadline)
        .map_err(|e| handshake_io(&who, e, "the reply to go out"))?;
    Ok((claimed, finish(hs, theirs, snow_err)?))
}

/// Runs the handshake between the two ends of one connection in this process with fresh keys
/// (`a` answers as the client, `b` dials as the server): for tests of what travels inside an
/// established link.
pub fn handshake_pair(a: &mut dyn Conn, b: &mut dyn Conn) -> Result<(Transport, Transport)> {
    let [(client, trust), (server, _), _] = ephemeral_session()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = client.public;
    let (ra, rb) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            respond(
                a,
                &client,
                &trust,
                &[Role::Server],
                (deadline, deadline),
                |_, _| Vec::new(),
            )
        });
        let rb = initiate(b, &server, Role::Client, &key, &[], deadline);
        (h.join().expect("handshake thread"), rb)
    });
    Ok((ra?.1.transport, rb?.transport))
}

/// Marks an io::Error as a record that failed authentication.
#[derive(Debug)]
pub struct AuthFailed;

impl std::fmt::Display for AuthFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a record failed authentication (tampered, replayed, reordered or dropped data)",
        )
    }
}

impl std::error::Error for AuthFailed {}

/// Decrypting reader of a link. Each read waits at most until `deadline` (set per exchange by
/// the link), however slowly bytes arrive.
pub struct RecordReader {
    stream: Stream,
    transport: Transport,
    nonce: u64,
    /// Decrypted bytes not yet handed out are `plain[pos..end]`.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
    cipher: Vec<u8>,
    pub deadline: Instant,
}

impl RecordReader {
    pub fn new(stream: Stream, transport: Transport) -> RecordReader {
        RecordReader {
            stream,
            transport,
            nonce: 0,
            plain: vec![0u8; MAX_RECORD],
            pos: 0,
            end: 0,
            cipher: Vec::new(),
            deadline: Instant::now() + Duration::from_secs(3600),
        }
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut len = [0u8; 2];
        read_exact_by(&mut *self.stream, &mut len, self.deadline)?;
        let len = u16::from_le_bytes(len) as usize;
        if len <= TAG_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                AuthFailed,
            ));
        }
        self.cipher.resize(len, 0);
        read_exact_by(&mut *self.stream, &mut self.cipher, self.deadline)?;
        let n = self
            .transport
            .state
            .read_message(self.nonce, &self.cipher, &mut self.plain)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, AuthFailed))?;
        self.nonce += 1;
        Ok(n)
    }
}

impl Read for RecordReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.end {
            self.end = self.fill()?;
            self.pos = 0;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Encrypting writer of a link: bytes are gathered into records of at most [`MAX_PLAIN`]
/// bytes; `flush` seals the last partial record. Records are written by `deadline` (the
/// link sets one per frame), or else each within `timeout` of its start.
pub struct RecordWriter {
    stream: Stream,
    transport: Transport,
    nonce: u64,
    plain: Vec<u8>,
    out: Vec<u8>,
    timeout: Duration,
    pub deadline: Option<Instant>,
}

impl RecordWriter {
    pub fn new(stream: Stream, transport: Transport, timeout: Duration) -> RecordWriter {
        RecordWriter {
            stream,
            transport,
            nonce: 0,
            plain: Vec::with_capacity(MAX_PLAIN),
            out: vec![0u8; RECORD_LEN_PREFIX + MAX_RECORD],
            timeout,
            deadline: None,
        }
    }

    fn seal(&mut self) -> std::io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let n = self
            .transport
            .state
            .write_message(self.nonce, &self.plain, &mut self.out[2..])
            .map_err(|e| std::io::Error::other(format!("encrypting: {e}")))?;
        self.nonce += 1;
        self.out[..2].copy_from_slice(&(n as u16).to_le_bytes());
        self.plain.clear();
        let deadline = self
            .deadline
            .unwrap_or_else(|| Instant::now() + self.timeout);
        write_all_by(&mut *self.stream, &self.out[..2 + n], deadline)?;
        Ok(())
    }

    /// Writes raw bytes past the encryption (tests of tampering only).
    #[doc(hidden)]
    pub fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b)
    }
}

impl Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_PLAIN - self.plain.len());
        self.plain.extend_from_slice(&buf[..n]);
        if self.plain.len() == MAX_PLAIN {
            self.seal()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.seal()?;
        self.stream.flush()
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release --lib secure::noise::timing -- --ignored --nocapture`: the record
    /// layer's cost, sealing and opening 64 MiB over loopback (one core each side).
    #[test]
    #[ignore]
    fn record_throughput() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let (ta, tb) = handshake_pair(&mut a, &mut b).unwrap();
        let total = 64usize << 20;
        let data = vec![7u8; 1 << 20];
        let t = Instant::now();
        let writer = std::thread::spawn(move || {
            let mut w = RecordWriter::new(Box::new(b), tb, Duration::from_secs(60));
            for _ in 0..total >> 20 {
                w.write_all(&data).unwrap();
            }
            w.flush().unwrap();
        });
        let mut r = RecordReader::new(Box::new(a), ta);
        r.deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..total >> 20 {
            r.read_exact(&mut buf).unwrap();
        }
        writer.join().unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{PATTERN}: {:.0} MB/s sealed + opened",
            total as f64 / s / 1e6
        );
    }
}
