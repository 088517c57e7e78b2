//! One authenticated, encrypted connection to a peer ([`super::noise`] over a
//! [`super::conn::Conn`]): framed messages cut into frames of at most `max_frame` bytes, a
//! deadline per received message and per written frame, byte counters. Sending rarely blocks
//! the protocol: frames go to a writer thread (which also encrypts) through a queue of at most
//! `max_ahead` bytes (1 GiB at least), so both halves of an exchange are sent before either
//! side receives and large exchanges cannot deadlock on full socket buffers. There is no
//! acknowledgement: TCP is reliable, the AEAD catches any change on the way, and the
//! per-direction sequence number in every header catches protocol bugs.
//!
//! What a hostile peer can make a link hold is bounded: frames kept ahead count their headers
//! against `max_ahead` and are at most [`MAX_AHEAD_FRAMES`]; an empty frame announcing more is
//! refused (a message's frames must make progress); a message must arrive whole within the
//! timeout, however it is cut.
use super::conn::Stream;
use super::noise::{AuthFailed, RecordReader, RecordWriter, Transport, MAX_PLAIN};
use super::wire::{Header, Kind, HEADER_LEN};
use crate::error::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Link settings shared by all links of a party.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Longest wait for each message from a peer (from the request to its last byte, all of
    /// its frames) and for each frame to be written.
    pub timeout: Duration,
    /// Longest wait for the peers to connect and authenticate at session start (they may
    /// still be loading their model).
    pub connect_timeout: Duration,
    /// Largest frame payload in bytes; larger messages travel as several frames.
    pub max_frame: usize,
    /// Most bytes of the dealer's offline frames (headers included) kept while an online
    /// frame is awaited (the dealer sends an image's whole offline part ahead: 0.34 GB for
    /// ResNet50 at 224x224 and 6%); also the most bytes queued for sending on one link (at
    /// least 1 GiB).
    pub max_ahead: usize,
    /// DReLU batches the dealer's offline thread may produce ahead of its online part (see
    /// `secure::ahead`); with `max_ahead` it bounds the client's buffer.
    pub ahead_batches: u64,
}

/// Seconds a frame may take, and the parties to connect ([`LinkConfig`]'s defaults, and the
/// CLI's).
pub const DEFAULT_TIMEOUT_S: f64 = 120.0;
/// Largest frame, MiB.
pub const DEFAULT_MAX_FRAME_MB: usize = 16;
/// Dealer material a party may hold ahead, MiB.
pub const DEFAULT_MAX_AHEAD_MB: usize = 4096;
/// DReLU batches the dealer may prepare ahead.
pub const DEFAULT_AHEAD_BATCHES: u64 = 2;
/// The send queue holds at least this much (more when `max_ahead` is larger): both sides of
/// an exchange may queue large messages before either reads, and a queue smaller than what one
/// step sends would stall both until the timeout.
const MIN_SEND_QUEUE: usize = 1 << 30;
/// Most frames kept ahead (whatever their size): the dealer sends one per offline message
/// and `max_frame` bytes, tens per image.
pub const MAX_AHEAD_FRAMES: usize = 1 << 16;

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_S),
            connect_timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_S),
            max_frame: DEFAULT_MAX_FRAME_MB << 20,
            max_ahead: DEFAULT_MAX_AHEAD_MB << 20,
            ahead_batches: DEFAULT_AHEAD_BATCHES,
        }
    }
}

/// Bytes on the wire for a frame of `n` bytes (header included): each frame is sealed into its
/// own records of at most [`MAX_PLAIN`] bytes, each with a 2-byte length and a 16-byte tag.
pub fn wire_len(n: usize) -> u64 {
    (n + n.div_ceil(MAX_PLAIN) * crate::spec::framing::RECORD_OVERHEAD) as u64
}

/// A framed, counted, encrypted connection to one peer.
pub struct Link {
    peer: String,
    stream: Stream,
    reader: RecordReader,
    sender: Option<LinkSender>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    /// Signalled when the writer thread ends.
    writer_done: mpsc::Receiver<()>,
    cfg: LinkConfig,
    recv_seq: u32,
    /// Whether the peer may send offline frames ahead (only the dealer does).
    pub accepts_offline: bool,
    /// Offline frames that arrived before they were asked for (the dealer's offline frames
    /// run ahead of its online ones on the same connection), per (kind, tag) in arrival order.
    pending: HashMap<(Kind, u32), VecDeque<Frame>>,
    pending_frames: usize,
    /// Bytes kept in `pending`, frame headers included.
    pending_bytes: usize,
    /// The most bytes ever kept ahead in `pending`.
    pub peak_pending: usize,
    /// Frame bytes read from this link (headers included).
    pub bytes_recv: u64,
}

/// A received frame: its header and payload.
type Frame = (Header, Vec<u8>);

/// One message queued for the writer thread, which cuts it into frames and numbers them.
struct Message {
    kind: Kind,
    tag: u32,
    payload: Vec<u8>,
}

/// The sending half of a link. Clones send on the same connection (the dealer's offline
/// thread and its online part); each message's frames go out together, numbered in queue
/// order by the writer thread.
#[derive(Clone)]
pub struct LinkSender {
    peer: String,
    tx: mpsc::Sender<Message>,
    max_frame: usize,
    bytes: Arc<AtomicU64>,
    frames: Arc<AtomicU64>,
    queue: Arc<Queue>,
    /// Most bytes queued (`max_ahead`) and the longest wait for room (`timeout`).
    cap: usize,
    timeout: Duration,
}

/// Payload bytes waiting for the writer thread, and whether it stopped.
#[derive(Default)]
struct Queue {
    state: Mutex<(usize, bool)>,
    room: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer thread wrote `n` bytes (or stopped): wakes waiting senders.
    fn done(&self, n: usize, stopped: bool) {
        let mut s = self.lock();
        s.0 = s.0.saturating_sub(n);
        s.1 |= stopped;
        drop(s);
        self.room.notify_all();
    }
}

impl LinkSender {
    /// Queues one message (as frames of at most `max_frame` bytes); returns at once with the
    /// bytes it will take on the wire.
    pub fn send(&self, kind: Kind, tag: u32, payload: &[u8]) -> Result<u64> {
        self.reserve(payload.len())?;
        let frames = payload.len().div_ceil(self.max_frame).max(1);
        let wire = (0..frames)
            .map(|i| {
                let len = (payload.len() - i * self.max_frame).min(self.max_frame);
                wire_len(HEADER_LEN + len)
            })
            .sum::<u64>();
        let m = Message {
            kind,
            tag,
            payload: payload.to_vec(),
        };
        self.tx.send(m).map_err(|_| Error::Link {
            peer: self.peer.clone(),
            msg: "connection closed".into(),
        })?;
        self.bytes.fetch_add(wire, Ordering::Relaxed);
        self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        Ok(wire)
    }

    /// Waits until `n` more bytes fit the queue (one message always does), at most the
    /// timeout: a peer that stops reading cannot make this side's memory grow without bound.
    fn reserve(&self, n: usize) -> Result<()> {
        let by = Instant::now() + self.timeout;
        let mut s = self.queue.lock();
        while s.0 > 0 && s.0 + n > self.cap && !s.1 {
            let left = by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    peer: self.peer.clone(),
                    secs: self.timeout.as_secs_f64(),
                });
            }
            s = self
                .queue
                .room
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.0 += n;
        Ok(())
    }

    /// Bytes queued so far on this connection (by every clone; frame headers, record
    /// lengths and tags included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn frames_sent(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// The writer thread: frames, numbers, encrypts and writes each queued message; each frame
/// must be written within `timeout`.
fn write_messages(
    rx: mpsc::Receiver<Message>,
    w: &mut RecordWriter,
    max_frame: usize,
    timeout: Duration,
    queue: &Queue,
) -> std::io::Result<()> {
    let mut seq = 0u32;
    for m in rx {
        let frames = m.payload.len().div_ceil(max_frame).max(1);
        for i in 0..frames {
            let chunk = &m.payload[i * max_frame..((i + 1) * max_frame).min(m.payload.len())];
            let h = Header {
                kind: m.kind,
                more: i + 1 < frames,
                tag: m.tag,
                seq,
                len: chunk.len() as u32,
            };
            seq = seq.wrapping_add(1);
            w.deadline = Some(Instant::now() + timeout);
            w.write_all(&h.encode())?;
            w.write_all(chunk)?;
            w.flush()?;
        }
        queue.done(m.payload.len(), false);
    }
    Ok(())
}

impl Link {
    /// Wraps a stream whose handshake gave `transport`; `peer` names the other party in
    /// errors.
    pub fn new(stream: Stream, peer: &str, cfg: LinkConfig, transport: Transport) -> Result<Link> {
        let err = |e: std::io::Error| Error::Link {
            peer: peer.to_string(),
            msg: e.to_string(),
        };
        if cfg.max_frame == 0 || cfg.max_frame > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "maximum frame size {} must be in 1..=4 GiB",
                cfg.max_frame
            )));
        }
        let reader = RecordReader::new(stream.try_clone_conn().map_err(err)?, transport.clone());
        let mut w = RecordWriter::new(
            stream.try_clone_conn().map_err(err)?,
            transport,
            cfg.timeout,
        );
        let (tx, rx) = mpsc::channel::<Message>();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let max_frame = cfg.max_frame;
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        let timeout = cfg.timeout;
        let writer = std::thread::Builder::new()
            .name(format!("link-writer-{peer}"))
            .spawn(move || {
                let r = write_messages(rx, &mut w, max_frame, timeout, &q);
                q.done(0, true);
                let _ = done_tx.send(());
                r
            })
            .map_err(err)?;
        Ok(Link {
            peer: peer.to_string(),
            stream,
            reader,
            sender: Some(LinkSender {
                peer: peer.to_string(),
                tx,
                max_frame,
                bytes: Arc::new(AtomicU64::new(0)),
                frames: Arc::new(AtomicU64::new(0)),
                queue,
                cap: cfg.max_ahead.max(MIN_SEND_QUEUE),
                timeout: cfg.timeout,
            }),
            writer: Some(writer),
            writer_done,
            cfg,
            recv_seq: 0,
            accepts_offline: false,
            pending: HashMap::new(),
            pending_frames: 0,
            pending_bytes: 0,
            peak_pending: 0,
            bytes_recv: 0,
        })
    }

    /// Sets how long a message may take to arrive (the listener shortens it while it waits
    /// for a key confirmation).
    pub fn set_timeout(&mut self, t: Duration) {
        self.cfg.timeout = t;
    }

    fn link_err(&self, msg: impl Into<String>) -> Error {
        Error::Link {
            peer: self.peer.clone(),
            msg: msg.into(),
        }
    }

    fn malformed(&self, msg: impl Into<String>) -> Error {
        Error::Malformed {
            peer: self.peer.clone(),
            msg: msg.into(),
        }
    }

    /// Queues one message (as frames of at most `max_frame` bytes); returns at once with the
    /// bytes it takes on the wire.
    pub fn send(&mut self, kind: Kind, tag: u32, payload: &[u8]) -> Result<u64> {
        match self.sender.as_ref().map(|s| s.send(kind, tag, payload)) {
            Some(Ok(n)) => Ok(n),
            _ => Err(self.writer_error()),
        }
    }

    /// A sender on this connection for another thread.
    pub fn sender(&self) -> Option<LinkSender> {
        self.sender.clone()
    }

    /// Bytes queued on this link so far (frame headers, record lengths and tags included).
    pub fn bytes_sent(&self) -> u64 {
        self.sender.as_ref().map_or(0, |s| s.bytes_sent())
    }

    pub fn frames_sent(&self) -> u64 {
        self.sender.as_ref().map_or(0, |s| s.frames_sent())
    }

    /// The writer thread's error after it stopped.
    fn writer_error(&mut self) -> Error {
        self.sender = None;
        match self.writer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => self.io_error(e),
            _ => self.link_err("connection closed"),
        }
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        use std::io::ErrorKind::*;
        if e.get_ref().is_some_and(|i| i.is::<AuthFailed>()) {
            return Error::Tampered {
                peer: self.peer.clone(),
            };
        }
        match e.kind() {
            WouldBlock | TimedOut => Error::Timeout {
                peer: self.peer.clone(),
                secs: self.cfg.timeout.as_secs_f64(),
            },
            UnexpectedEof => self.link_err("connection closed by peer"),
            _ => self.link_err(e.to_string()),
        }
    }

    /// Receives the message of `kind` for step `tag`, which must have exactly `len` bytes.
    /// Offline frames (input-independent data the dealer sends ahead) that arrive while an
    /// online message is awaited are kept until asked for, at most `max_ahead` bytes of them;
    /// any other frame out of order is an error. No frame longer than what is still expected
    /// (or than `max_frame`, for frames kept ahead) is ever allocated.
    pub fn recv(&mut self, kind: Kind, tag: u32, len: usize) -> Result<Vec<u8>> {
        let by = Instant::now() + self.cfg.timeout;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let (h, chunk) = self.next_chunk(kind, tag, len - out.len(), by)?;
            if out.is_empty() && !h.more && chunk.len() == len {
                return Ok(chunk);
            }
            if out.is_empty() {
                out.reserve_exact(len);
            }
            out.extend_from_slice(&chunk);
            if !h.more {
                break;
            }
        }
        if out.len() != len {
            return Err(self.malformed(format!(
                "{kind:?} message for step {tag} has {} bytes, expected {len}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The next frame of (`kind`, `tag`), from those kept ahead or from the socket by `by`;
    /// its payload may have at most `room` bytes.
    fn next_chunk(
        &mut self,
        kind: Kind,
        tag: u32,
        room: usize,
        by: Instant,
    ) -> Result<(Header, Vec<u8>)> {
        let too_long = |s: &Self, h: &Header| {
            s.malformed(format!(
                "{:?} frame for step {} has {} bytes, at most {room} expected",
                h.kind, h.tag, h.len
            ))
        };
        let kept = self
            .pending
            .get_mut(&(kind, tag))
            .and_then(VecDeque::pop_front);
        if let Some(f) = kept {
            self.pending_frames -= 1;
            self.pending_bytes -= HEADER_LEN + f.1.len();
            if f.0.len as usize > room {
                return Err(too_long(self, &f.0));
            }
            return Ok(f);
        }
        loop {
            let h = self.read_header(by)?;
            if h.kind == kind && h.tag == tag {
                if h.len as usize > room {
                    return Err(too_long(self, &h));
                }
                let payload = self.read_payload(&h)?;
                return Ok((h, payload));
            }
            // Only the dealer's offline frames may run ahead of online ones; anything else out
            // of order is a protocol violation.
            if h.kind != Kind::Offline || kind == Kind::Offline || !self.accepts_offline {
                return Err(self.malformed(format!(
                    "got a {:?} frame for step {}, expected {:?} for step {}",
                    h.kind, h.tag, kind, tag
                )));
            }
            if self.pending_bytes + HEADER_LEN + h.len as usize > self.cfg.max_ahead
                || self.pending_frames >= MAX_AHEAD_FRAMES
            {
                return Err(self.malformed(format!(
                    "more than {} bytes or {MAX_AHEAD_FRAMES} frames sent ahead while waiting \
                     for {:?} of step {}",
                    self.cfg.max_ahead, kind, tag
                )));
            }
            let payload = self.read_payload(&h)?;
            self.pending_frames += 1;
            self.pending_bytes += HEADER_LEN + payload.len();
            self.peak_pending = self.peak_pending.max(self.pending_bytes);
            self.pending
                .entry((h.kind, h.tag))
                .or_default()
                .push_back((h, payload));
        }
    }

    /// Reads and checks one frame header; the frame must arrive by `by`.
    fn read_header(&mut self, by: Instant) -> Result<Header> {
        self.reader.deadline = by;
        let mut hb = [0u8; HEADER_LEN];
        self.reader
            .read_exact(&mut hb)
            .map_err(|e| self.io_error(e))?;
        let h = Header::decode(&hb, self.cfg.max_frame).map_err(|m| self.malformed(m))?;
        if h.seq != self.recv_seq {
            return Err(self.malformed(format!(
                "sequence number {} (expected {})",
                h.seq, self.recv_seq
            )));
        }
        if h.more && h.len == 0 {
            return Err(self.malformed(format!(
                "an empty {:?} frame for step {} announcing more (a message's frames must \
                 carry bytes)",
                h.kind, h.tag
            )));
        }
        Ok(h)
    }

    fn read_payload(&mut self, h: &Header) -> Result<Vec<u8>> {
        let mut payload = vec![0u8; h.len as usize];
        self.reader
            .read_exact(&mut payload)
            .map_err(|e| self.io_error(e))?;
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.bytes_recv += (HEADER_LEN + payload.len()) as u64;
        Ok(payload)
    }

    /// Flushes every queued frame and closes the connection cleanly.
    pub fn finish(mut self) -> Result<()> {
        self.sender = None;
        let r = match self.writer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => Err(self.io_error(e)),
            Some(Err(_)) => Err(self.link_err("writer thread panicked")),
            _ => Ok(()),
        };
        let _ = self.stream.shutdown_both();
        r
    }
}

/// How long an abandoned link (error path) tries to deliver what is already queued (e.g. the
/// handshake that tells the peer why) before it is shut down.
const DROP_GRACE: Duration = Duration::from_millis(500);

impl Drop for Link {
    /// An unfinished link (error path) is shut down promptly so the peer sees the end of the
    /// connection instead of waiting for its timeout; frames already queued get a short grace
    /// period to go out first.
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.sender = None;
            let _ = self.writer_done.recv_timeout(DROP_GRACE);
            let _ = self.stream.shutdown_both();
            if let Some(h) = self.writer.take() {
                let _ = h.join();
            }
        }
    }
}
