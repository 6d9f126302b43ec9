//! Ingest's MQTT 3.1.1 connection: rumqttc's packet codec (`mqttbytes::v4`),
//! our own loop.
//!
//! Why not rumqttc's `EventLoop`: with manual acknowledgements it writes and
//! flushes every PUBACK on its own, one syscall and one TCP segment per
//! message, and the broker reads them one by one. Ingest releases its PUBACKs
//! a spool write at a time (thousands at once), so here they go out in one
//! write. The protocol part (`Wire`) does no IO and is tested on bytes; `run`
//! moves bytes between it and the socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    self, Connect, Packet, PubAck, PubComp, PubRec, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rumqttc::SubscribeReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::metrics;

/// Where and how to connect.
#[derive(Clone)]
pub struct SessionConfig {
    pub host: String,
    pub port: u16,
    /// Some: TLS (rustls) with this client config.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keepalive: Duration,
    pub login: Option<(String, String)>,
    /// Subscribed at QoS 1 whenever the broker holds no session for us.
    pub filters: Vec<String>,
    /// Largest packet accepted.
    pub max_packet: usize,
}

/// Numbers the connections of one `run` (1, 2, ...): a publish is
/// forwarded with the number of the connection it came on, and its ack
/// must go back on that connection or nowhere.
pub type ConnId = u64;

/// What the rest of ingest asks of the connection, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// These messages, received on connection `conn`, are durable:
    /// acknowledge them (QoS 0 needs nothing).
    Acks {
        conn: ConnId,
        publishes: Vec<Publish>,
    },
    /// Publish at QoS 0 (Sparkplug NCMD rebirth requests must be QoS 0).
    Publish { topic: String, payload: Vec<u8> },
    /// Send DISCONNECT (after everything queued before it) and stop.
    Disconnect,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet from the broker: {0}")]
    Codec(CodecError),
    #[error("broker refused the connection: {0:?}")]
    Refused(v4::ConnectReturnCode),
    #[error("expected CONNACK, got another packet")]
    NoConnAck,
    #[error("no PINGRESP within the keepalive interval")]
    PingTimeout,
    #[error("timed out connecting")]
    Timeout,
    #[error("tls: {0}")]
    Tls(String),
    #[error("the broker closed the connection")]
    Closed,
}

/// What one incoming packet means for ingest.
#[derive(Debug, PartialEq)]
pub enum Event {
    Publish(Publish),
    /// Subscriptions confirmed; true if the broker refused one.
    SubAck {
        refused: bool,
    },
    Other,
}

/// The protocol state of one connection: no IO. Incoming bytes go in with
/// `parse`, outgoing packets are encoded into `out`, which the caller writes.
pub struct Wire {
    pub out: BytesMut,
    max_packet: usize,
    ping_outstanding: bool,
    conn: ConnId,
}

impl Wire {
    /// The protocol state of connection number `conn`.
    pub fn new(max_packet: usize, conn: ConnId) -> Wire {
        Wire {
            out: BytesMut::with_capacity(16 << 10),
            max_packet,
            ping_outstanding: false,
            conn,
        }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// CONNECT with a persistent session (clean session off).
    pub fn connect(&mut self, cfg: &SessionConfig) -> Result<(), CodecError> {
        let mut c = Connect::new(cfg.client_id.clone());
        c.clean_session = false;
        c.keep_alive = cfg.keepalive.as_secs().min(u16::MAX as u64) as u16;
        if let Some((u, p)) = &cfg.login {
            c.set_login(u.clone(), p.clone());
        }
        c.write(&mut self.out).map(drop)
    }

    pub fn subscribe(&mut self, filters: &[String]) -> Result<(), CodecError> {
        let mut s = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        );
        s.pkid = 1;
        s.write(&mut self.out).map(drop)
    }

    /// Encodes one outgoing request; false for `Disconnect`. Acks of an
    /// earlier connection are dropped: a broker that kept the session
    /// redelivers those messages, one that did not forgot them, and either
    /// way their packet ids may now name other, not yet durable, messages.
    pub fn push(&mut self, o: Outgoing) -> Result<bool, CodecError> {
        match o {
            Outgoing::Acks { conn, publishes } if conn != self.conn => {
                tracing::debug!(
                    acks = publishes.len(),
                    of = conn,
                    now = self.conn,
                    "dropping acks of a lost connection"
                );
            }
            Outgoing::Acks { publishes, .. } => {
                for p in publishes {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            PubAck::new(p.pkid).write(&mut self.out)?;
                        }
                        // The PUBREL that follows is answered in `parse`.
                        QoS::ExactlyOnce => {
                            PubRec::new(p.pkid).write(&mut self.out)?;
                        }
                    }
                }
            }
            Outgoing::Publish { topic, payload } => {
                Publish::new(topic, QoS::AtMostOnce, payload).write(&mut self.out)?;
            }
            Outgoing::Disconnect => {
                v4::Disconnect.write(&mut self.out)?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Keepalive tick: a PINGREQ, unless the last one is still unanswered.
    pub fn keepalive(&mut self) -> Result<(), SessionError> {
        if self.ping_outstanding {
            return Err(SessionError::PingTimeout);
        }
        v4::PingReq
            .write(&mut self.out)
            .map_err(SessionError::Codec)?;
        self.ping_outstanding = true;
        Ok(())
    }

    /// The broker's answer to CONNECT, off `buf`: whether it kept our
    /// session; None until the CONNACK is complete.
    pub fn connack(&mut self, buf: &mut BytesMut) -> Result<Option<bool>, SessionError> {
        match Packet::read(buf, self.max_packet) {
            Ok(Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success => {
                Ok(Some(a.session_present))
            }
            Ok(Packet::ConnAck(a)) => Err(SessionError::Refused(a.code)),
            Ok(_) => Err(SessionError::NoConnAck),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(SessionError::Codec(e)),
        }
    }

    /// Takes the next whole packet off `buf`; None until one is complete.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, SessionError> {
        let packet = match Packet::read(buf, self.max_packet) {
            Ok(p) => p,
            Err(CodecError::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(SessionError::Codec(e)),
        };
        // Any packet shows the connection is alive.
        self.ping_outstanding = false;
        Ok(Some(match packet {
            Packet::Publish(p) => Event::Publish(p),
            Packet::SubAck(s) => Event::SubAck {
                refused: s
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure)),
            },
            Packet::PubRel(r) => {
                PubComp::new(r.pkid)
                    .write(&mut self.out)
                    .map_err(SessionError::Codec)?;
                Event::Other
            }
            _ => Event::Other,
        }))
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A connection after its CONNACK.
struct Connected {
    stream: Box<dyn Stream>,
    /// Bytes read after the CONNACK.
    buf: BytesMut,
    wire: Wire,
    /// The broker kept our session (and so our subscriptions).
    session_present: bool,
}

/// Opens the socket (and TLS), sends CONNECT, waits for CONNACK.
async fn open(cfg: &SessionConfig, conn: ConnId) -> Result<Connected, SessionError> {
    let limit = Duration::from_secs(10);
    let tcp = tokio::time::timeout(
        limit,
        tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| SessionError::Timeout)??;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = match &cfg.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
                .map_err(|e| SessionError::Tls(e.to_string()))?;
            let c = rumqttc::tokio_rustls::TlsConnector::from(tls.clone());
            Box::new(
                tokio::time::timeout(limit, c.connect(name, tcp))
                    .await
                    .map_err(|_| SessionError::Timeout)??,
            )
        }
    };
    let mut wire = Wire::new(cfg.max_packet, conn);
    wire.connect(cfg).map_err(SessionError::Codec)?;
    stream.write_all(&wire.out).await?;
    wire.out.clear();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let session_present = tokio::time::timeout(limit, async {
        loop {
            if let Some(p) = wire.connack(&mut buf)? {
                return Ok::<bool, SessionError>(p);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(SessionError::Closed);
            }
        }
    })
    .await
    .map_err(|_| SessionError::Timeout)??;
    Ok(Connected {
        stream,
        buf,
        wire,
        session_present,
    })
}

/// Keeps a connection up until `Outgoing::Disconnect` (or until nobody takes
/// the publishes any more): forwards publishes to `tx` with their connection's
/// number, sends what `rx` asks,
/// subscribes when the broker has no session for us, reconnects with backoff
/// (100 ms doubling to 30 s) after any error.
pub async fn run(
    cfg: SessionConfig,
    tx: mpsc::UnboundedSender<(ConnId, Publish)>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    subscribed: Option<Arc<tokio::sync::Notify>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut subscribed_once = false;
    let mut conn: ConnId = 0;
    loop {
        conn += 1;
        let error = match open(&cfg, conn).await {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                metrics::gauge_set("meterflow_mqtt_connected", &[], 1.0);
                tracing::info!(session_present = c.session_present, "mqtt connected");
                // A new session has no subscriptions; the first connection
                // of a process subscribes anyway (the config may have changed).
                let subscribe = !c.session_present || !subscribed_once;
                subscribed_once = true;
                match serve(&cfg, c, subscribe, &tx, &mut rx, &subscribed).await {
                    Ok(_) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        metrics::gauge_set("meterflow_mqtt_connected", &[], 0.0);
        metrics::counter_add("meterflow_mqtt_reconnects_total", &[], 1);
        tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64, "mqtt connection lost; reconnecting");
        // Requests wait in `rx` meanwhile; acks of the lost connection are
        // dropped when they reach the next one (see `Wire::push`). A stop
        // asked for while down is the caller's to time out.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn serve(
    cfg: &SessionConfig,
    c: Connected,
    subscribe: bool,
    tx: &mpsc::UnboundedSender<(ConnId, Publish)>,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    subscribed: &Option<Arc<tokio::sync::Notify>>,
) -> Result<(), SessionError> {
    let Connected {
        stream,
        mut buf,
        mut wire,
        ..
    } = c;
    let (mut reader, mut writer) = tokio::io::split(stream);
    if subscribe {
        wire.subscribe(&cfg.filters).map_err(SessionError::Codec)?;
    }
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.keepalive, cfg.keepalive);
    loop {
        // Everything parsed or asked for so far goes out in one write.
        while let Some(ev) = wire.parse(&mut buf)? {
            match ev {
                Event::Publish(p) => {
                    if tx.send((wire.conn(), p)).is_err() {
                        return Ok(()); // nobody decodes any more: stopping
                    }
                }
                Event::SubAck { refused } => {
                    if refused {
                        tracing::error!(filters = ?cfg.filters, "broker refused a subscription");
                    } else {
                        tracing::info!(filters = ?cfg.filters, "subscribed");
                    }
                    if let Some(n) = subscribed {
                        n.notify_one();
                    }
                }
                Event::Other => {}
            }
        }
        if !wire.out.is_empty() {
            writer.write_all(&wire.out).await?;
            wire.out.clear();
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        tokio::select! {
            n = reader.read_buf(&mut buf) => {
                if n? == 0 {
                    return Err(SessionError::Closed);
                }
            }
            o = rx.recv() => {
                let mut next = o;
                loop {
                    let keep = match next {
                        Some(o) => wire.push(o).map_err(SessionError::Codec)?,
                        None => wire.push(Outgoing::Disconnect).map_err(SessionError::Codec)?,
                    };
                    if !keep {
                        writer.write_all(&wire.out).await?;
                        writer.flush().await?;
                        let _ = writer.shutdown().await;
                        return Ok(());
                    }
                    // Whatever else is queued joins this write.
                    match rx.try_recv() {
                        Ok(o) => next = Some(o),
                        Err(_) => break,
                    }
                }
            }
            _ = ping.tick() => wire.keepalive()?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, qos: QoS) -> Publish {
        let mut p = Publish::new("t", qos, b"x".to_vec());
        p.pkid = pkid;
        p
    }

    fn packets(mut out: BytesMut) -> Vec<Packet> {
        let mut v = Vec::new();
        while !out.is_empty() {
            v.push(Packet::read(&mut out, 1 << 20).unwrap());
        }
        v
    }

    #[test]
    fn acks_of_one_durable_batch_are_encoded_together_in_order() {
        let mut w = Wire::new(1 << 20, 1);
        let batch = (1..=3).map(|i| publish(i, QoS::AtLeastOnce)).collect();
        assert!(w
            .push(Outgoing::Acks {
                conn: 1,
                publishes: batch
            })
            .unwrap());
        let got = packets(w.out.split());
        assert_eq!(
            got,
            vec![
                Packet::PubAck(PubAck::new(1)),
                Packet::PubAck(PubAck::new(2)),
                Packet::PubAck(PubAck::new(3)),
            ]
        );
    }

    #[test]
    fn acks_of_a_lost_connection_are_not_sent_on_the_next_one() {
        // The broker kept no session: packet id 5 now names a new message.
        let mut w = Wire::new(1 << 20, 2);
        let stale = Outgoing::Acks {
            conn: 1,
            publishes: vec![publish(5, QoS::AtLeastOnce), publish(6, QoS::ExactlyOnce)],
        };
        assert!(w.push(stale).unwrap());
        assert!(w.out.is_empty(), "nothing acknowledged");
        let current = Outgoing::Acks {
            conn: 2,
            publishes: vec![publish(5, QoS::AtLeastOnce)],
        };
        w.push(current).unwrap();
        assert_eq!(packets(w.out.split()), vec![Packet::PubAck(PubAck::new(5))]);
    }

    #[test]
    fn qos0_messages_need_no_ack_and_qos2_get_pubrec_then_pubcomp() {
        let mut w = Wire::new(1 << 20, 1);
        let batch = vec![publish(0, QoS::AtMostOnce), publish(9, QoS::ExactlyOnce)];
        w.push(Outgoing::Acks {
            conn: 1,
            publishes: batch,
        })
        .unwrap();
        assert_eq!(packets(w.out.split()), vec![Packet::PubRec(PubRec::new(9))]);
        let mut incoming = BytesMut::new();
        v4::PubRel::new(9).write(&mut incoming).unwrap();
        assert_eq!(w.parse(&mut incoming).unwrap(), Some(Event::Other));
        assert_eq!(
            packets(w.out.split()),
            vec![Packet::PubComp(PubComp::new(9))]
        );
    }

    #[test]
    fn a_publish_split_across_reads_comes_out_whole_once_complete() {
        let mut w = Wire::new(1 << 20, 1);
        let mut full = BytesMut::new();
        publish(7, QoS::AtLeastOnce).write(&mut full).unwrap();
        let mut buf = BytesMut::from(&full[..5]);
        assert_eq!(w.parse(&mut buf).unwrap(), None);
        buf.extend_from_slice(&full[5..]);
        assert_eq!(
            w.parse(&mut buf).unwrap(),
            Some(Event::Publish(publish(7, QoS::AtLeastOnce)))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn an_unanswered_ping_at_the_next_tick_ends_the_connection() {
        let mut w = Wire::new(1 << 20, 1);
        w.keepalive().unwrap();
        assert_eq!(packets(w.out.split()), vec![Packet::PingReq]);
        assert!(matches!(w.keepalive(), Err(SessionError::PingTimeout)));
    }

    #[test]
    fn any_packet_from_the_broker_answers_the_ping() {
        let mut w = Wire::new(1 << 20, 1);
        w.keepalive().unwrap();
        let mut incoming = BytesMut::new();
        v4::PingResp.write(&mut incoming).unwrap();
        w.parse(&mut incoming).unwrap();
        w.keepalive().unwrap();
    }

    #[test]
    fn connack_tells_whether_the_broker_kept_our_session() {
        let mut w = Wire::new(1 << 20, 1);
        let mut full = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::Success, true)
            .write(&mut full)
            .unwrap();
        let mut buf = BytesMut::from(&full[..1]);
        assert_eq!(w.connack(&mut buf).unwrap(), None, "incomplete");
        buf.extend_from_slice(&full[1..]);
        assert_eq!(w.connack(&mut buf).unwrap(), Some(true));
    }

    #[test]
    fn a_refused_connection_or_another_packet_first_is_an_error() {
        let mut w = Wire::new(1 << 20, 1);
        let mut buf = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::NotAuthorized, false)
            .write(&mut buf)
            .unwrap();
        let e = w.connack(&mut buf).unwrap_err();
        assert!(matches!(e, SessionError::Refused(_)), "{e}");
        assert!(e.to_string().contains("NotAuthorized"), "{e}");
        let mut buf = BytesMut::new();
        v4::PingResp.write(&mut buf).unwrap();
        assert!(matches!(w.connack(&mut buf), Err(SessionError::NoConnAck)));
    }

    #[test]
    fn a_refused_subscription_is_reported() {
        let mut w = Wire::new(1 << 20, 1);
        let mut incoming = BytesMut::new();
        v4::SubAck::new(1, vec![SubscribeReasonCode::Failure])
            .write(&mut incoming)
            .unwrap();
        assert_eq!(
            w.parse(&mut incoming).unwrap(),
            Some(Event::SubAck { refused: true })
        );
    }

    #[test]
    fn rebirth_requests_go_out_at_qos0_and_disconnect_stops() {
        let mut w = Wire::new(1 << 20, 1);
        assert!(w
            .push(Outgoing::Publish {
                topic: "spBv1.0/g/NCMD/n".into(),
                payload: vec![1, 2],
            })
            .unwrap());
        assert!(!w.push(Outgoing::Disconnect).unwrap());
        let got = packets(w.out.split());
        match &got[0] {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtMostOnce);
                assert_eq!(p.topic, "spBv1.0/g/NCMD/n");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1], Packet::Disconnect);
    }

    #[test]
    fn oversized_and_garbage_packets_are_errors_not_panics() {
        let mut w = Wire::new(16, 1);
        let mut buf = BytesMut::new();
        let mut big = Publish::new("t", QoS::AtLeastOnce, vec![0u8; 100]);
        big.pkid = 1;
        big.write(&mut buf).unwrap();
        assert!(w.parse(&mut buf).is_err());
        let mut junk = BytesMut::from(&[0xf0u8, 0x00][..]);
        assert!(Wire::new(1 << 20, 1).parse(&mut junk).is_err());
    }
}
