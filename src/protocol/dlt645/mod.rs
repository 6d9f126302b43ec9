//! DL/T 645-2007 and -1997, the meter protocol of Chinese distribution networks.
//!
//! A pure codec: bytes in, frames and values out, and back. No IO and no
//! clocks; the collector (`crate::collector::dlt645`) and the simulator
//! (`crate::sim::dlt645`) do the talking.
//!
//! - [`frame`]: the frame, addresses, [`decode`] from a byte stream.
//! - [`bcd`]: packed BCD numbers with implied decimals and sign bits.
//! - [`catalogue`]: data identifiers, their formats, units and channels.
//! - [`message`]: requests, replies, error status, follow-up assembly, matching.

pub mod bcd;
pub mod catalogue;
pub mod frame;
pub mod message;

pub use catalogue::{lookup, Di, DiInfo, Edition, Format, MeterTime, TimeRef, Value, ValueError};
pub use frame::{decode, hex, Address, Decoded, Frame, FrameError, FrameRef};
pub use message::{
    classify, ErrorStatus, FollowUp, Match, Operator, Password, RelayCommand, ReplyError,
};

#[cfg(test)]
mod tests;
