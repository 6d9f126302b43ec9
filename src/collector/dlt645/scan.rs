//! Discovery: the address of the only meter on a bus (0x13 to `AA..AA`), and
//! probing a list of candidate addresses with a read of the energy total.

use super::bus::{Bus, TxError};
use crate::protocol::dlt645::catalogue::probe_di;
use crate::protocol::dlt645::message::{read_address_request, read_request};
use crate::protocol::dlt645::{Address, Edition};

/// Reads the address of the single meter on the bus. With several meters the
/// answers collide and this fails (timeout or corrupt reply).
pub async fn read_single_address(bus: &mut Bus) -> Result<Address, TxError> {
    let reply = bus
        .transact(&read_address_request(), "AAAAAAAAAAAA")
        .await?;
    let mut a = [0u8; 6];
    if reply.data.len() >= 6 {
        a.copy_from_slice(&reply.data[..6]);
        Ok(Address(a))
    } else {
        // The header address is the meter's own too.
        Ok(reply.address)
    }
}

/// What a probe found at one address.
#[derive(Debug)]
pub struct Probe {
    pub address: Address,
    /// The edition of the last read sent: the one that answered when present.
    pub edition: Edition,
    /// The first edition tried, when it stayed silent and the other was tried.
    pub silent_to: Option<Edition>,
    /// `Ok` if a meter answered; an error reply or a garbled answer also
    /// proves something is there. Only a timeout means absent.
    pub result: Result<(), TxError>,
}

impl Probe {
    /// Something answered at this address in `edition`: a reply, an error
    /// reply, or a garbled answer ([`Probe::garbled`]). Only silence is absent.
    pub fn present(&self) -> bool {
        !matches!(self.result, Err(TxError::Timeout(_)))
    }

    /// The answer was garbled (bad checksum after the retries): something
    /// speaks this edition there (a meter on a noisy line, two meters with
    /// one address), but the reply itself could not be trusted.
    pub fn garbled(&self) -> bool {
        matches!(self.result, Err(TxError::Corrupt(_)))
    }
}

/// The edition that is not `e`.
pub fn other_edition(e: Edition) -> Edition {
    match e {
        Edition::V2007 => Edition::V1997,
        Edition::V1997 => Edition::V2007,
    }
}

/// Probes each candidate with a read of forward active energy in `edition`
/// only (a meter of the other edition stays silent: absent).
pub async fn probe(
    bus: &mut Bus,
    candidates: &[Address],
    edition: Edition,
) -> Result<Vec<Probe>, std::io::Error> {
    probe_editions(bus, candidates, edition, false).await
}

/// Probes each candidate in `first`; with `fallback`, an address that stays
/// silent (timeout) is asked once more in the other edition, because a meter
/// ignores the other edition's read and an engineer may have picked the
/// wrong one. Only a timeout falls back: any answer, even a refusal or a
/// garbled one, is from something speaking `first` at that address, and
/// counts as present ([`Probe::present`]).
pub async fn probe_editions(
    bus: &mut Bus,
    candidates: &[Address],
    first: Edition,
    fallback: bool,
) -> Result<Vec<Probe>, std::io::Error> {
    let mut out = vec![];
    for &address in candidates {
        let mut p = probe_one(bus, address, first).await?;
        if fallback && matches!(p.result, Err(TxError::Timeout(_))) {
            let second = other_edition(first);
            tracing::debug!(bus = %bus.name, meter = %address, %first, %second, "silent; trying the other edition");
            p = probe_one(bus, address, second).await?;
            p.silent_to = Some(first);
        }
        out.push(p);
    }
    Ok(out)
}

async fn probe_one(
    bus: &mut Bus,
    address: Address,
    edition: Edition,
) -> Result<Probe, std::io::Error> {
    let req = read_request(address, probe_di(edition));
    let result = bus.transact(&req, &address.to_string()).await.map(|_| ());
    if let Err(TxError::Io(e)) = result {
        return Err(e);
    }
    Ok(Probe {
        address,
        edition,
        silent_to: None,
        result,
    })
}
