//! An id as the bill run holds it: up to 15 bytes inline (every id `sim
//! fleet` writes, and the meter and account numbers utilities use), longer
//! ones on the heap. 16 bytes and no allocation, where a `Box<str>` took 16
//! bytes and a 16-byte heap block: at 10 million meters and accounts, 480 MB
//! and 30 million allocations less.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU8;
use std::ops::Deref;

const INLINE: usize = 15;

#[derive(Clone)]
pub struct Id(Repr);

#[derive(Clone)]
enum Repr {
    /// The id's bytes, then its length + 1: never 0, so the compiler tags
    /// `Heap` with a 0 there and the whole fits in 16 bytes.
    Inline([u8; INLINE], NonZeroU8),
    /// Two boxes, so this variant is one pointer wide.
    Heap(Box<Box<str>>),
}

impl Id {
    pub fn new(s: &str) -> Id {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // len + 1 is in 1..=16.
            let n = NonZeroU8::new(s.len() as u8 + 1).unwrap_or(NonZeroU8::MIN);
            Id(Repr::Inline(bytes, n))
        } else {
            Id(Repr::Heap(Box::new(s.into())))
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline(bytes, n) => {
                let b = &bytes[..n.get() as usize - 1];
                // SAFETY: `Inline` is built only by `Id::new`, from the
                // whole of a `&str`'s bytes, so `b` is valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(b) }
            }
            Repr::Heap(s) => s,
        }
    }
}

impl Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Id {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Id {
        Id::new(s)
    }
}

impl From<String> for Id {
    fn from(s: String) -> Id {
        Id::new(&s)
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Id {}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Id) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Id {
    fn cmp(&self, other: &Id) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Id {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_sixteen_bytes_and_reads_back_what_it_was_given_at_every_length() {
        assert_eq!(std::mem::size_of::<Id>(), 16);
        // The sizes master/mod.rs documents for the bill run's rows.
        assert_eq!(std::mem::size_of::<super::super::BillingMeter>(), 64);
        assert_eq!(std::mem::size_of::<super::super::BillingAccount>(), 56);
        let long = "é1234567890abcdefghijklmnopqrstuvwxyz";
        for end in long.char_indices().map(|(i, _)| i).chain([long.len()]) {
            let s = &long[..end];
            let id = Id::new(s);
            assert_eq!(id.as_str(), s);
            assert_eq!(id, Id::from(s.to_string()));
            assert_eq!(format!("{id}"), s);
            assert_eq!(format!("{id:?}"), format!("{s:?}"));
        }
    }

    #[test]
    fn ids_order_and_hash_as_their_text_whether_inline_or_not() {
        let mut ids: Vec<Id> = ["b", "a-very-long-account-number-0001", "a", "", "ab"]
            .into_iter()
            .map(Id::from)
            .collect();
        ids.sort();
        let text: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        assert_eq!(
            text,
            ["", "a", "a-very-long-account-number-0001", "ab", "b"]
        );
        let set: std::collections::HashSet<Id> = ids.iter().cloned().collect();
        assert!(set.contains("a-very-long-account-number-0001"));
        assert!(set.contains("ab"));
        assert!(!set.contains("abc"));
    }
}
