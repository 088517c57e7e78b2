//! One authenticated, encrypted TCP connection to a peer ([`super::noise`]): framed messages
//! cut into frames of at most `max_frame` bytes, deadlines per frame, byte counters. Sending
//! never blocks the protocol: frames go to a writer thread (which also encrypts) through a
//! queue, so both halves of an exchange are sent before either side receives and large
//! exchanges cannot deadlock on full socket buffers. There is no acknowledgement: TCP is
//! reliable, the AEAD catches any change on the way, and the per-direction sequence number in
//! every header catches protocol bugs.
use super::noise::{AuthFailed, RecordReader, RecordWriter, Transport, MAX_PLAIN};
use super::wire::{Header, Kind, HEADER_LEN};
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Link settings shared by all links of a party.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Longest wait for each frame from a peer (from the request to its last byte) and for
    /// each frame to be written.
    pub timeout: Duration,
    /// Largest frame payload in bytes; larger messages travel as several frames.
    pub max_frame: usize,
    /// Most bytes of the dealer's offline frames kept while an online frame is awaited (the
    /// dealer sends an image's whole offline part ahead: 0.34 GB for ResNet50 at 224x224 and
    /// 6%).
    pub max_ahead: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            timeout: Duration::from_secs(120),
            max_frame: 16 << 20,
            max_ahead: 4 << 30,
        }
    }
}

/// Bytes on the wire for a frame of `n` bytes (header included): each frame is sealed into its
/// own records of at most [`MAX_PLAIN`] bytes, each with a 2-byte length and a 16-byte tag.
pub fn wire_len(n: usize) -> u64 {
    (n + n.div_ceil(MAX_PLAIN) * 18) as u64
}

/// A framed, counted, encrypted connection to one peer.
pub struct Link {
    peer: String,
    stream: TcpStream,
    reader: RecordReader,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    /// Signalled when the writer thread ends.
    writer_done: mpsc::Receiver<()>,
    cfg: LinkConfig,
    send_seq: u32,
    recv_seq: u32,
    /// Whether the peer may send offline frames ahead (only the dealer does).
    pub accepts_offline: bool,
    /// Offline frames that arrived before they were asked for (the dealer's offline frames
    /// run ahead of its online ones on the same connection), in arrival order.
    pending: std::collections::VecDeque<(Header, Vec<u8>)>,
    pending_bytes: usize,
    /// Bytes written to this link (frame headers, record lengths and tags included).
    pub bytes_sent: u64,
    /// Frame bytes read from this link (headers included).
    pub bytes_recv: u64,
    pub frames_sent: u64,
}

impl Link {
    /// Wraps a stream whose handshake gave `transport`; `peer` names the other party in
    /// errors.
    pub fn new(
        stream: TcpStream,
        peer: &str,
        cfg: LinkConfig,
        transport: Transport,
    ) -> Result<Link> {
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
        stream.set_nodelay(true).map_err(err)?;
        let reader = RecordReader::new(stream.try_clone().map_err(err)?, transport.clone());
        let mut w = RecordWriter::new(stream.try_clone().map_err(err)?, transport, cfg.timeout);
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let writer = std::thread::Builder::new()
            .name(format!("link-writer-{peer}"))
            .spawn(move || {
                let r = (|| {
                    for frame in rx {
                        w.write_all(&frame)?;
                        w.flush()?;
                    }
                    Ok(())
                })();
                let _ = done_tx.send(());
                r
            })
            .map_err(err)?;
        Ok(Link {
            peer: peer.to_string(),
            stream,
            reader,
            tx: Some(tx),
            writer: Some(writer),
            writer_done,
            cfg,
            send_seq: 0,
            recv_seq: 0,
            accepts_offline: false,
            pending: std::collections::VecDeque::new(),
            pending_bytes: 0,
            bytes_sent: 0,
            bytes_recv: 0,
            frames_sent: 0,
        })
    }

    /// Renames the peer (once its role is known from the handshake).
    pub fn set_peer(&mut self, name: &str) {
        self.peer = name.to_string();
    }

    pub fn peer(&self) -> &str {
        &self.peer
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

    /// Queues one message (as frames of at most `max_frame` bytes); returns at once.
    pub fn send(&mut self, kind: Kind, tag: u32, payload: &[u8]) -> Result<()> {
        let max = self.cfg.max_frame;
        let frames = payload.len().div_ceil(max).max(1);
        for i in 0..frames {
            let chunk = &payload[i * max..((i + 1) * max).min(payload.len())];
            let h = Header {
                kind,
                more: i + 1 < frames,
                tag,
                seq: self.send_seq,
                len: chunk.len() as u32,
            };
            let mut frame = Vec::with_capacity(HEADER_LEN + chunk.len());
            frame.extend_from_slice(&h.encode());
            frame.extend_from_slice(chunk);
            self.send_seq = self.send_seq.wrapping_add(1);
            self.bytes_sent += wire_len(frame.len());
            self.frames_sent += 1;
            let sent = self.tx.as_ref().map(|tx| tx.send(frame).is_ok());
            if sent != Some(true) {
                return Err(self.writer_error());
            }
        }
        Ok(())
    }

    /// The writer thread's error after it stopped.
    fn writer_error(&mut self) -> Error {
        self.tx = None;
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
        let mut out: Vec<u8> = Vec::new();
        loop {
            let (h, chunk) = self.next_chunk(kind, tag, len - out.len())?;
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

    /// The next frame of (`kind`, `tag`), from those kept ahead or from the socket; its
    /// payload may have at most `room` bytes.
    fn next_chunk(&mut self, kind: Kind, tag: u32, room: usize) -> Result<(Header, Vec<u8>)> {
        let too_long = |s: &Self, h: &Header| {
            s.malformed(format!(
                "{:?} frame for step {} has {} bytes, at most {room} expected",
                h.kind, h.tag, h.len
            ))
        };
        if let Some(i) = self
            .pending
            .iter()
            .position(|(h, _)| h.kind == kind && h.tag == tag)
        {
            let f = self.pending.remove(i).expect("index from position");
            self.pending_bytes -= f.1.len();
            if f.0.len as usize > room {
                return Err(too_long(self, &f.0));
            }
            return Ok(f);
        }
        loop {
            let h = self.read_header()?;
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
            if self.pending_bytes + h.len as usize > self.cfg.max_ahead {
                return Err(self.malformed(format!(
                    "more than {} bytes sent ahead while waiting for {:?} of step {}",
                    self.cfg.max_ahead, kind, tag
                )));
            }
            let payload = self.read_payload(&h)?;
            self.pending_bytes += payload.len();
            self.pending.push_back((h, payload));
        }
    }

    /// Reads and checks one frame header; the frame must arrive within the timeout.
    fn read_header(&mut self) -> Result<Header> {
        self.reader.deadline = Instant::now() + self.cfg.timeout;
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
        self.tx = None;
        let r = match self.writer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => Err(self.io_error(e)),
            Some(Err(_)) => Err(self.link_err("writer thread panicked")),
            _ => Ok(()),
        };
        let _ = self.stream.shutdown(Shutdown::Both);
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
            self.tx = None;
            let _ = self.writer_done.recv_timeout(DROP_GRACE);
            let _ = self.stream.shutdown(Shutdown::Both);
            if let Some(h) = self.writer.take() {
                let _ = h.join();
            }
        }
    }
}
