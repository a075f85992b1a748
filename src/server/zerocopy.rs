//! A plain TCP connection for hyper whose writes of stored or arriving object bytes go out with
//! `sendfile(2)` straight from the page cache: hyper hands us slices of the object's mapping, and
//! `store::mapped` tells which file and offset they are. Anything else (headers, chunk framing, bytes in
//! memory) is written as usual. The bytes on the wire are the same either way; only the copy through
//! user space is saved.

use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::store::mapped;

/// Largest single `sendfile` call.
const MAX_SEND: usize = 4 << 20;
/// Smaller slices (a 64 KiB range, the tail of a body) are cheaper to write with their headers in one
/// `writev` than with a `sendfile` of their own.
const MIN_SEND: usize = 256 << 10;

fn source(b: &[u8]) -> Option<(std::sync::Arc<std::fs::File>, u64)> {
    if b.len() < MIN_SEND {
        return None;
    }
    mapped::source_of(b.as_ptr(), b.len())
}

pub struct Conn {
    io: TokioIo<TcpStream>,
}

impl Conn {
    pub fn new(tcp: TcpStream) -> Conn {
        Conn {
            io: TokioIo::new(tcp),
        }
    }

    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        let tcp = self.io.inner();
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            let r = tcp.try_io(Interest::WRITABLE, || {
                let mut off = offset as libc::off_t;
                // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
                // pointer; the kernel reads at most `len` bytes of the file at `off`.
                let n = unsafe {
                    libc::sendfile(
                        tcp.as_raw_fd(),
                        file.as_raw_fd(),
                        &mut off,
                        len.min(MAX_SEND),
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some((file, off)) = source(buf) {
            return self.poll_sendfile(cx, &file, off, buf.len());
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        let b = &bufs[first];
        if let Some((file, off)) = source(b) {
            return self.poll_sendfile(cx, &file, off, b.len());
        }
        // Write the run of ordinary slices before the next mapped one in one call.
        let end = bufs[first..]
            .iter()
            .position(|b| source(b).is_some())
            .map(|i| first + i)
            .unwrap_or(bufs.len());
        Pin::new(&mut self.io).poll_write_vectored(cx, &bufs[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
