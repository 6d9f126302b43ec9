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
    /// `Ok` if a meter answered (an error reply also proves it is there).
    pub result: Result<(), TxError>,
}

impl Probe {
    pub fn present(&self) -> bool {
        matches!(self.result, Ok(()) | Err(TxError::Refused(_)))
    }
}

/// Probes each candidate with a read of forward active energy.
pub async fn probe(
    bus: &mut Bus,
    candidates: &[Address],
    edition: Edition,
) -> Result<Vec<Probe>, std::io::Error> {
    let mut out = vec![];
    for &address in candidates {
        let req = read_request(address, probe_di(edition));
        let result = bus.transact(&req, &address.to_string()).await.map(|_| ());
        if let Err(TxError::Io(e)) = result {
            return Err(e);
        }
        out.push(Probe { address, result });
    }
    Ok(out)
}
