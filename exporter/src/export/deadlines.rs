//! Time limits on one connection's socket: an idle limit on reads and a
//! deadline on each response's write.
//!
//! hyper bounds how long a request head may take to arrive
//! (`header_read_timeout`) but has no limit on writing a response, nor on
//! reads it makes outside a head (a TLS handshake's). A client that asks for
//! `/metrics` and never reads would otherwise hold its connection, its task
//! and its buffers for as long as it likes. The limits live on the socket,
//! under TLS and hyper, so they hold whatever protocol runs above.
//!
//! - A read that stays pending (nothing arrives) for `idle` fails with
//!   `TimedOut`; any byte that arrives restarts the wait.
//! - A response's write starts at its first byte and ends when hyper flushes
//!   (it flushes once its buffer is empty). If it has not ended `write`
//!   after it started, the next pending write fails with `TimedOut`. This is
//!   a deadline for the whole response, not a limit on each stall: a client
//!   that reads one byte every few seconds gets no more time than one that
//!   reads nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits of [`Deadlines`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may send nothing while the server waits.
    pub idle: Duration,
    /// How long writing one response may take, from its first byte to its
    /// flush.
    pub write: Duration,
}

/// A socket (or any byte stream) whose reads and writes fail with
/// `TimedOut` past the [`Limits`].
pub struct Deadlines<S> {
    inner: S,
    limits: Limits,
    read_timer: Pin<Box<Sleep>>,
    read_waiting: bool,
    write_timer: Pin<Box<Sleep>>,
    writing: bool,
}

impl<S> Deadlines<S> {
    pub fn new(inner: S, limits: Limits) -> Deadlines<S> {
        Deadlines {
            inner,
            limits,
            read_timer: Box::pin(tokio::time::sleep(limits.idle)),
            read_waiting: false,
            write_timer: Box::pin(tokio::time::sleep(limits.write)),
            writing: false,
        }
    }

    /// Starts the write deadline at the first byte of a response.
    fn start_writing(&mut self) {
        if !self.writing {
            self.writing = true;
            let deadline = Instant::now() + self.limits.write;
            self.write_timer.as_mut().reset(deadline);
        }
    }

    /// For a write that is pending: an error once the deadline has passed.
    fn check_write(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.writing && self.write_timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client did not read the response within {:?}",
                    self.limits.write
                ),
            ));
        }
        Ok(())
    }

    fn pending_write<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.check_write(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlines<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if !this.read_waiting {
                    this.read_waiting = true;
                    let deadline = Instant::now() + this.limits.idle;
                    this.read_timer.as_mut().reset(deadline);
                }
                if this.read_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client sent nothing for {:?}", this.limits.idle),
                    )));
                }
                Poll::Pending
            }
            ready => {
                this.read_waiting = false;
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlines<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.start_writing();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.pending_write(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.start_writing();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending_write(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending_write(cx),
            Poll::Ready(Ok(())) => {
                this.writing = false;
                Poll::Ready(Ok(()))
            }
            failed => failed,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.pending_write(cx),
            ready => ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        idle: Duration::from_millis(200),
        write: Duration::from_millis(300),
    };

    #[tokio::test]
    async fn a_silent_client_times_out_and_a_talking_one_does_not() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut server = Deadlines::new(server, LIMITS);
        let mut byte = [0u8; 1];
        for _ in 0..5 {
            // Each byte arrives within the idle limit: the wait restarts.
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
        }
        let silent = server.read(&mut byte).await.unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut, "{silent}");
    }

    #[tokio::test]
    async fn a_response_must_be_read_within_the_write_deadline() {
        let (server, mut client) = tokio::io::duplex(16);
        let mut server = Deadlines::new(server, LIMITS);
        // A small response the client reads: written and flushed in time,
        // and the next one gets its own full deadline.
        for _ in 0..3 {
            server.write_all(b"0123456789").await.unwrap();
            server.flush().await.unwrap();
            let mut read = [0u8; 10];
            client.read_exact(&mut read).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // A client that reads a byte every 100 ms keeps the write moving but
        // cannot stretch it past the deadline.
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if client.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let started = Instant::now();
        let late = server.write_all(&[b'y'; 1024]).await.unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::TimedOut, "{late}");
        let took = started.elapsed();
        assert!(
            took >= LIMITS.write && took < LIMITS.write + Duration::from_secs(2),
            "{took:?}"
        );
        drop(server);
        reader.await.unwrap();
    }
}
