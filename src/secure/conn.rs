//! The byte streams links run over: a [`Conn`] is TCP between machines, or an in-memory pipe
//! ([`mem_pair`]) between threads of one process, for tests and the fuzzer, where the network
//! is not what they test. Handshakes, records and frames above are the same on both.
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A connected, bidirectional byte stream with per-handle deadlines.
pub trait Conn: Read + Write + Send + 'static {
    /// How long a read may block (`None`: forever); a read that times out fails with
    /// `WouldBlock` or `TimedOut`, as TCP's do.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// How long a write may block waiting for the peer to read.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Another handle on the same connection (a link's reader and its writer thread).
    fn try_clone_conn(&self) -> io::Result<Stream>;
    /// Ends both directions at once: our reads see the end, our writes fail, and the peer's
    /// reads see the end after what was already sent.
    fn shutdown_both(&self) -> io::Result<()>;
    /// Who is at the other end, for messages (an address, or "memory").
    fn peer_name(&self) -> String;
}

/// A connection of either kind.
pub type Stream = Box<dyn Conn>;

impl std::fmt::Debug for dyn Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.peer_name())
    }
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
    fn try_clone_conn(&self) -> io::Result<Stream> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn peer_name(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "peer".into())
    }
}

/// Time left until `deadline`, or a timeout error.
pub fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(std::io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

/// `read_exact` that gives up at `deadline` however the bytes trickle in.
pub fn read_exact_by(
    s: &mut dyn Conn,
    mut buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(remaining(deadline)?))?;
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline` however slowly the peer reads.
pub fn write_all_by(s: &mut dyn Conn, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.set_write_timeout(Some(remaining(deadline)?))?;
        match s.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TCP connection as a link's stream: Nagle off, since every frame is flushed when whole.
pub fn tcp(s: TcpStream) -> io::Result<Stream> {
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// Bytes one direction holds before a writer waits, about what loopback TCP buffers hold.
const PIPE_CAPACITY: usize = 4 << 20;

/// One direction of an in-memory connection.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    changed: Condvar,
}

#[derive(Default)]
struct PipeState {
    bytes: VecDeque<u8>,
    /// The writing end is gone: readers see the end once `bytes` is drained.
    writer_closed: bool,
    /// The reading end is gone: writes fail.
    reader_closed: bool,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        // A panic while holding the lock leaves plain bytes and flags: still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a change until `deadline`; `WouldBlock` (as a socket's timeout) when it
    /// passed.
    fn wait<'a>(
        &self,
        g: MutexGuard<'a, PipeState>,
        deadline: Option<Instant>,
    ) -> io::Result<MutexGuard<'a, PipeState>> {
        let Some(d) = deadline else {
            return Ok(self.changed.wait(g).unwrap_or_else(|p| p.into_inner()));
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let (g, _) = self
            .changed
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner());
        Ok(g)
    }

    fn close(&self, reader: bool) {
        let mut g = self.lock();
        if reader {
            g.reader_closed = true;
            g.bytes.clear();
        } else {
            g.writer_closed = true;
        }
        drop(g);
        self.changed.notify_all();
    }
}

/// One end of an in-memory connection; dropping its last handle closes it, as closing a
/// socket does.
struct End {
    rx: Arc<Pipe>,
    tx: Arc<Pipe>,
}

impl End {
    fn close(&self) {
        self.rx.close(true);
        self.tx.close(false);
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.close();
    }
}

/// A handle on one end of an in-memory connection.
pub struct MemConn {
    end: Arc<End>,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

impl MemConn {
    /// Ends our direction only (TCP's `shutdown(Write)`): the peer reads what was sent, then
    /// the end; we can still read.
    pub fn close_write(&self) {
        self.end.tx.close(false);
    }
}

/// The two ends of a new in-memory connection.
pub fn mem_pair() -> (MemConn, MemConn) {
    let (ab, ba) = (Arc::new(Pipe::default()), Arc::new(Pipe::default()));
    let end = |rx: &Arc<Pipe>, tx: &Arc<Pipe>| MemConn {
        end: Arc::new(End {
            rx: rx.clone(),
            tx: tx.clone(),
        }),
        read_timeout: Mutex::new(None),
        write_timeout: Mutex::new(None),
    };
    (end(&ba, &ab), end(&ab, &ba))
}

fn deadline(t: &Mutex<Option<Duration>>) -> Option<Instant> {
    let t = *t.lock().unwrap_or_else(|p| p.into_inner());
    t.map(|t| Instant::now() + t)
}

impl Read for MemConn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let pipe = &self.end.rx;
        let by = deadline(&self.read_timeout);
        let mut g = pipe.lock();
        loop {
            if g.reader_closed {
                return Ok(0);
            }
            if !g.bytes.is_empty() {
                let n = out.len().min(g.bytes.len());
                for (o, b) in out.iter_mut().zip(g.bytes.drain(..n)) {
                    *o = b;
                }
                drop(g);
                pipe.changed.notify_all();
                return Ok(n);
            }
            if g.writer_closed {
                return Ok(0);
            }
            g = pipe.wait(g, by)?;
        }
    }
}

impl Write for MemConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pipe = &self.end.tx;
        let by = deadline(&self.write_timeout);
        let mut g = pipe.lock();
        loop {
            if g.reader_closed || g.writer_closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let room = PIPE_CAPACITY.saturating_sub(g.bytes.len());
            if room > 0 {
                let n = room.min(buf.len());
                g.bytes.extend(&buf[..n]);
                drop(g);
                pipe.changed.notify_all();
                return Ok(n);
            }
            g = pipe.wait(g, by)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for MemConn {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        *self.read_timeout.lock().unwrap_or_else(|p| p.into_inner()) = t;
        Ok(())
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        *self.write_timeout.lock().unwrap_or_else(|p| p.into_inner()) = t;
        Ok(())
    }
    fn try_clone_conn(&self) -> io::Result<Stream> {
        Ok(Box::new(MemConn {
            end: self.end.clone(),
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(None),
        }))
    }
    fn shutdown_both(&self) -> io::Result<()> {
        self.end.close();
        Ok(())
    }
    fn peer_name(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_carries_bytes_both_ways_and_ends_like_a_socket() {
        let (mut a, mut b) = mem_pair();
        // More than the capacity: the writer waits for the reader.
        let data: Vec<u8> = (0..3 * PIPE_CAPACITY + 5).map(|i| (i * 7) as u8).collect();
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            a.write_all(&sent).unwrap();
            let mut back = [0u8; 3];
            a.read_exact(&mut back).unwrap();
            (back, a)
        });
        let mut got = vec![0u8; data.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        b.write_all(b"end").unwrap();
        let (back, a) = t.join().unwrap();
        assert_eq!(&back, b"end");

        // A silent peer (still connected): the read times out; the peer gone: the end, then
        // broken writes.
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let e = b.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(b.read(&mut [0u8; 1]).unwrap(), 0);
        let (mut c, d) = mem_pair();
        let d2 = d.try_clone_conn().unwrap();
        drop(d);
        c.write_all(b"x").unwrap();
        drop(d2);
        assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
        assert_eq!(c.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);

        // A full pipe whose reader never reads: the write times out.
        let (mut e, _f) = mem_pair();
        e.set_write_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let big = vec![0u8; PIPE_CAPACITY + 1];
        let err = e.write_all(&big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        // Shutdown: our reads end at once, the peer reads what was sent, then the end.
        let (mut g, mut h) = mem_pair();
        g.write_all(b"ab").unwrap();
        g.shutdown_both().unwrap();
        assert_eq!(g.read(&mut [0u8; 1]).unwrap(), 0);
        let mut two = [0u8; 2];
        h.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        assert_eq!(h.read(&mut [0u8; 1]).unwrap(), 0);
    }
}
