//! The node's media socket with batched system calls.
//!
//! * Receive: `recvmmsg` through [`quinn_udp`] (up to [`quinn_udp::BATCH_SIZE`]
//!   datagrams per call), with UDP GRO where the kernel coalesces datagrams of one
//!   source into one buffer (each buffer is then split at `stride`).
//! * Send: `sendmmsg` through [`rustix`] — the copies of one forwarded packet go to
//!   different subscribers, i.e. different destinations, which `quinn-udp` (one
//!   destination per call, GSO) cannot batch. Up to [`SEND_BATCH`] datagrams per call.
//!
//! Both calls are non-blocking: they report `WouldBlock` when the socket has nothing to
//! read or no room to write, and the caller waits for readiness.
//!
//! A media worker that does not read (`crate::workers`) sends on a send-only duplicate
//! of the descriptor ([`MediaSocket::send_only`]), registered with its runtime only
//! while it waits for room: a descriptor registered for good would wake every worker's
//! thread each time the shared socket's buffer drains or a datagram arrives.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;

use meridian_media::Transmit;
use quinn_udp::{RecvMeta, UdpSocketState};
use rustix::net::addr::SocketAddrArg;
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most datagrams handed to one `sendmmsg`.
pub(crate) const SEND_BATCH: usize = 256;
/// Room for one (possibly GRO-coalesced) receive buffer.
const RECV_BUF: usize = 64 * 1024;

/// The descriptor a [`MediaSocket`] uses.
enum Fd {
    /// Read and written; registered with the runtime for both.
    Full(Arc<UdpSocket>),
    /// Written only; registered while waiting for room.
    SendOnly(std::net::UdpSocket),
}

/// A UDP socket read with `recvmmsg`/GRO and written with `sendmmsg`.
pub(crate) struct MediaSocket {
    socket: Fd,
    state: Option<UdpSocketState>,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Buffers filled by the last receive.
    filled: usize,
}

impl MediaSocket {
    /// Wraps a bound socket (enables GRO and the other options `quinn-udp` sets).
    pub(crate) fn new(socket: Arc<UdpSocket>) -> io::Result<MediaSocket> {
        let state = UdpSocketState::new((&*socket).into())?;
        let batch = quinn_udp::BATCH_SIZE.max(1);
        Ok(MediaSocket {
            socket: Fd::Full(socket),
            state: Some(state),
            bufs: (0..batch).map(|_| vec![0u8; RECV_BUF]).collect(),
            meta: vec![RecvMeta::default(); batch],
            filled: 0,
        })
    }

    /// A send-only duplicate of `socket`'s descriptor (for a worker that does not
    /// read).
    pub(crate) fn send_only(socket: Arc<UdpSocket>) -> io::Result<MediaSocket> {
        let fd = std::os::fd::AsFd::as_fd(&*socket).try_clone_to_owned()?;
        let dup = std::net::UdpSocket::from(fd);
        dup.set_nonblocking(true)?;
        Ok(MediaSocket {
            socket: Fd::SendOnly(dup),
            state: None,
            bufs: Vec::new(),
            meta: Vec::new(),
            filled: 0,
        })
    }

    /// Waits until the socket may have datagrams to read (never, for a send-only
    /// socket).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match &self.socket {
            Fd::Full(s) => s.readable().await,
            Fd::SendOnly(_) => std::future::pending().await,
        }
    }

    /// Waits until the socket may take datagrams.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        match &self.socket {
            Fd::Full(s) => s.writable().await,
            Fd::SendOnly(s) => {
                // Registered (a fresh duplicate) only for this wait.
                let waiting = UdpSocket::from_std(s.try_clone()?)?;
                waiting.writable().await
            }
        }
    }

    /// Reads one batch of datagrams without waiting; [`MediaSocket::received`] then
    /// yields them. Returns how many buffers were filled; `Err(WouldBlock)` when there
    /// was nothing to read.
    pub(crate) fn try_recv_batch(&mut self) -> io::Result<usize> {
        self.filled = 0;
        let (Fd::Full(socket), Some(state)) = (&self.socket, &self.state) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut iovs: Vec<IoSliceMut<'_>> =
            self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let meta = &mut self.meta;
        let n = socket.try_io(Interest::READABLE, || {
            state.recv((&**socket).into(), &mut iovs, meta)
        })?;
        self.filled = n;
        Ok(n)
    }

    /// The datagrams of the last [`MediaSocket::try_recv_batch`] in arrival order
    /// (GRO buffers split), with their source.
    pub(crate) fn received(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.bufs
            .iter()
            .zip(&self.meta)
            .take(self.filled)
            .flat_map(|(buf, m)| buf[..m.len].chunks(m.stride.max(1)).map(|d| (m.addr, d)))
    }

    /// Sends the front of `transmits` with one `sendmmsg` without waiting. Returns how
    /// many were handed to the kernel; `Err(WouldBlock)` when the socket has no room.
    /// A datagram the kernel refuses for another reason is counted as sent (dropped),
    /// so one bad destination cannot stall the others.
    pub(crate) fn try_send_batch(&self, transmits: &[Transmit]) -> io::Result<usize> {
        let batch = &transmits[..transmits.len().min(SEND_BATCH)];
        if batch.is_empty() {
            return Ok(0);
        }
        let addrs: Vec<SocketAddrAny> = batch.iter().map(|t| t.destination.as_any()).collect();
        let iovs: Vec<[IoSlice<'_>; 1]> =
            batch.iter().map(|t| [IoSlice::new(&t.contents)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = batch
            .iter()
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut msgs: Vec<MMsgHdr<'_>> = addrs
            .iter()
            .zip(&iovs)
            .zip(controls.iter_mut())
            .map(|((addr, iov), control)| MMsgHdr::new_with_addr(addr, iov, control))
            .collect();
        let result = match &self.socket {
            Fd::Full(s) => s.try_io(Interest::WRITABLE, || {
                rustix::net::sendmmsg(&**s, &mut msgs, SendFlags::empty()).map_err(io::Error::from)
            }),
            Fd::SendOnly(s) => {
                rustix::net::sendmmsg(s, &mut msgs, SendFlags::empty()).map_err(io::Error::from)
            }
        };
        match result {
            Ok(sent) => Ok(sent),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                // The first datagram failed (e.g. an unreachable destination): drop it.
                tracing::debug!("media send to {}: {e}", batch[0].destination);
                Ok(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_goes_out_in_order_and_comes_back_in_order() {
        let a = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let b = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let sender = MediaSocket::new(a).unwrap();
        let mut receiver = MediaSocket::new(b).unwrap();
        let transmits: Vec<Transmit> = (0..100u8)
            .map(|i| Transmit {
                destination: b_addr,
                contents: vec![i; 100 + usize::from(i)],
            })
            .collect();
        let mut sent = 0;
        while sent < transmits.len() {
            sender.writable().await.unwrap();
            match sender.try_send_batch(&transmits[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < transmits.len() {
            receiver.readable().await.unwrap();
            if receiver.try_recv_batch().is_ok() {
                for (from, d) in receiver.received() {
                    assert_eq!(from, a_addr);
                    got.push(d.to_vec());
                }
            }
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &transmits[i].contents);
        }
    }
}
