//! One TCP connection to a peer: framed messages, a maximum frame size, read and write
//! timeouts, byte counters. Sending never blocks the protocol: frames go to a writer thread
//! through a queue, so both halves of an exchange are sent before either side receives and
//! large exchanges cannot deadlock on full socket buffers. There is no acknowledgement: TCP is
//! reliable, and the per-direction sequence number in every header catches protocol bugs.
use super::wire::{Header, Kind, HEADER_LEN};
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Link settings shared by all links of a party.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Longest wait for a peer's next frame (and for a blocked write).
    pub timeout: Duration,
    /// Largest accepted payload in bytes.
    pub max_frame: usize,
    /// Most bytes of offline frames kept while an online frame is awaited (the dealer sends
    /// an image's whole offline part ahead: 0.34 GB for ResNet50 at 224x224 and 6%).
    pub max_ahead: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            timeout: Duration::from_secs(120),
            max_frame: 1 << 30,
            max_ahead: 4 << 30,
        }
    }
}

/// A framed, counted connection to one peer.
pub struct Link {
    peer: String,
    stream: TcpStream,
    tx: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    /// Signalled when the writer thread ends.
    writer_done: mpsc::Receiver<()>,
    cfg: LinkConfig,
    send_seq: u32,
    recv_seq: u32,
    /// Frames that arrived before they were asked for (the dealer's offline frames run ahead
    /// of its online ones on the same connection), in arrival order.
    pending: std::collections::VecDeque<(Header, Vec<u8>)>,
    pending_bytes: usize,
    /// Bytes written to this link (headers included).
    pub bytes_sent: u64,
    /// Bytes read from this link (headers included).
    pub bytes_recv: u64,
    pub frames_sent: u64,
}

impl Link {
    /// Wraps a connected stream; `peer` names the other party in errors.
    pub fn new(stream: TcpStream, peer: &str, cfg: LinkConfig) -> Result<Link> {
        let err = |e: std::io::Error| Error::Link {
            peer: peer.to_string(),
            msg: e.to_string(),
        };
        stream.set_nodelay(true).map_err(err)?;
        stream.set_read_timeout(Some(cfg.timeout)).map_err(err)?;
        stream.set_write_timeout(Some(cfg.timeout)).map_err(err)?;
        let mut w = stream.try_clone().map_err(err)?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, writer_done) = mpsc::channel::<()>();
        let writer = std::thread::Builder::new()
            .name(format!("link-writer-{peer}"))
            .spawn(move || {
                let r = (|| {
                    for frame in rx {
                        w.write_all(&frame)?;
                    }
                    w.flush()
                })();
                let _ = done_tx.send(());
                r
            })
            .map_err(err)?;
        Ok(Link {
            peer: peer.to_string(),
            stream,
            tx: Some(tx),
            writer: Some(writer),
            writer_done,
            cfg,
            send_seq: 0,
            recv_seq: 0,
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

    /// Queues one frame; returns at once.
    pub fn send(&mut self, kind: Kind, tag: u32, payload: &[u8]) -> Result<()> {
        if payload.len() > self.cfg.max_frame || payload.len() > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "message of {} bytes to {} exceeds the maximum frame size {}",
                payload.len(),
                self.peer,
                self.cfg.max_frame
            )));
        }
        let h = Header {
            kind,
            tag,
            seq: self.send_seq,
            len: payload.len() as u32,
        };
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&h.encode());
        frame.extend_from_slice(payload);
        self.send_seq = self.send_seq.wrapping_add(1);
        self.bytes_sent += frame.len() as u64;
        self.frames_sent += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send(frame).is_ok());
        if sent != Some(true) {
            return Err(self.writer_error());
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
        match e.kind() {
            WouldBlock | TimedOut => Error::Timeout {
                peer: self.peer.clone(),
                secs: self.cfg.timeout.as_secs_f64(),
            },
            UnexpectedEof => self.link_err("connection closed by peer"),
            _ => self.link_err(e.to_string()),
        }
    }

    /// Receives the next frame of `kind` for step `tag`, which must have exactly `expect_len`
    /// payload bytes when given. Offline frames (input-independent data the dealer sends
    /// ahead) that arrive while an online frame is awaited are kept until asked for, at most
    /// `max_ahead` bytes of them; any other frame out of order is an error.
    pub fn recv(&mut self, kind: Kind, tag: u32, expect_len: Option<usize>) -> Result<Vec<u8>> {
        let found = self
            .pending
            .iter()
            .position(|(h, _)| h.kind == kind && h.tag == tag);
        let (h, payload) = match found {
            Some(i) => {
                let f = self.pending.remove(i).expect("index from position");
                self.pending_bytes -= f.1.len();
                f
            }
            None => loop {
                let (h, payload) = self.read_frame()?;
                if h.kind == kind && h.tag == tag {
                    break (h, payload);
                }
                // Only offline frames may run ahead of online ones; anything else out of order
                // is a protocol violation.
                if h.kind != Kind::Offline || kind == Kind::Offline {
                    return Err(self.malformed(format!(
                        "got a {:?} frame for step {}, expected {:?} for step {}",
                        h.kind, h.tag, kind, tag
                    )));
                }
                self.pending_bytes += payload.len();
                if self.pending_bytes > self.cfg.max_ahead {
                    return Err(self.malformed(format!(
                        "more than {} bytes sent ahead while waiting for {:?} of step {}",
                        self.cfg.max_ahead, kind, tag
                    )));
                }
                self.pending.push_back((h, payload));
            },
        };
        if let Some(n) = expect_len {
            if h.len as usize != n {
                return Err(self.malformed(format!(
                    "{:?} frame for step {} has {} bytes, expected {n}",
                    h.kind, h.tag, h.len
                )));
            }
        }
        Ok(payload)
    }

    /// Reads one frame from the socket, checking the header and the arrival sequence number.
    fn read_frame(&mut self) -> Result<(Header, Vec<u8>)> {
        let mut hb = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut hb)
            .map_err(|e| self.io_error(e))?;
        let h = Header::decode(&hb, self.cfg.max_frame).map_err(|m| self.malformed(m))?;
        if h.seq != self.recv_seq {
            return Err(self.malformed(format!(
                "sequence number {} (expected {})",
                h.seq, self.recv_seq
            )));
        }
        let mut payload = vec![0u8; h.len as usize];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| self.io_error(e))?;
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.bytes_recv += (HEADER_LEN + payload.len()) as u64;
        Ok((h, payload))
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
