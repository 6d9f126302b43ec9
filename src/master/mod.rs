//! Master data: meters, accounts and payments, as CSV files in one folder
//! (`meters.csv`, `accounts.csv`, `payments.csv`). Formats: docs/data-model.md.
//!
//! Loading never stops at the first bad row: every bad row is reported with
//! file, line and field, and the good rows are kept.

mod id;
mod load;

pub use id::Id;

pub use load::{
    load_accounts, load_accounts_for_billing, load_accounts_without_personal, load_billing_meters,
    load_billing_payments, load_meters, load_meters_for_billing, load_opening_balances,
    load_payments, load_prepaid_openings, Loaded, RowError,
};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub const METERS_FILE: &str = "meters.csv";
pub const ACCOUNTS_FILE: &str = "accounts.csv";
pub const PAYMENTS_FILE: &str = "payments.csv";
/// What accounts owed (or had in credit) in the billing system before
/// meterflow: read by a fleet's first run with `--settled-through`.
pub const OPENING_FILE: &str = "opening_balances.csv";

/// One physical meter installed for an account. A meter exchange is two rows
/// for one account: the old meter with `removed_on`, the new one with `installed_on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    pub meter_id: String,
    pub account_id: String,
    /// residential_1p, commercial_3p, industrial_ct (free text, for reports).
    pub meter_type: String,
    /// Current transformer ratio (primary/secondary), 1 for direct-connected meters.
    pub ct_ratio: Decimal,
    /// Voltage transformer ratio, 1 for low-voltage meters.
    pub pt_ratio: Decimal,
    /// Integer digits of the energy registers: they roll over at 10^digits.
    pub register_digits: u8,
    pub installed_on: NaiveDate,
    pub removed_on: Option<NaiveDate>,
    pub feeder: String,
}

impl Meter {
    /// CT x PT: consumption = register delta x multiplier.
    pub fn multiplier(&self) -> Decimal {
        self.ct_ratio * self.pt_ratio
    }
    /// Register modulus (10^digits).
    pub fn modulus(&self) -> Decimal {
        Decimal::from(10u64.pow(self.register_digits as u32))
    }
}

/// The terms of a meter that billing reads: meters.csv without type and
/// feeder, ids inline ([`Id`]), CT x PT multiplied once. 64 bytes and no
/// heap block, against a [`Meter`]'s 144 bytes and four heap blocks: at 10
/// million meters the bill run holds 640 MB of meters (1,120 MB with the
/// boxed ids and both ratios it held before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingMeter {
    pub meter_id: Id,
    pub account_id: Id,
    /// CT x PT: consumption = register delta x multiplier.
    pub multiplier: Decimal,
    pub register_digits: u8,
    pub installed_on: NaiveDate,
    pub removed_on: Option<NaiveDate>,
}

impl From<&Meter> for BillingMeter {
    fn from(m: &Meter) -> BillingMeter {
        BillingMeter {
            meter_id: Id::new(&m.meter_id),
            account_id: Id::new(&m.account_id),
            multiplier: m.multiplier(),
            register_digits: m.register_digits,
            installed_on: m.installed_on,
            removed_on: m.removed_on,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CustomerClass {
    Residential,
    Commercial,
    Industrial,
    Agricultural,
}

impl CustomerClass {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerClass::Residential => "residential",
            CustomerClass::Commercial => "commercial",
            CustomerClass::Industrial => "industrial",
            CustomerClass::Agricultural => "agricultural",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentMode {
    Prepaid,
    Postpaid,
}

/// A customer account: who pays, how, and on which tariff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub account_id: String,
    pub name: String,
    pub phone: String,
    pub id_number: String,
    pub address: String,
    pub district: String,
    pub age_band: String,
    pub occupation: String,
    pub gender: String,
    pub customer_class: CustomerClass,
    pub tariff_id: String,
    pub payment_mode: PaymentMode,
    /// Contracted (transformer) capacity, kVA; 0 when not applicable.
    pub contracted_kva: Decimal,
    pub household_size: u8,
    pub opened_on: NaiveDate,
}

/// The terms of an account that billing reads: accounts.csv without the
/// personal and demographic columns, which count at millions of accounts.
///
/// The id is inline ([`Id`]) and the tariff id shared between the accounts
/// of a tariff ([`load_accounts_for_billing`] interns it): 56 bytes an
/// account and no heap block of its own, where an [`Account`] takes 264
/// bytes and up to ten blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingAccount {
    pub account_id: Id,
    pub tariff_id: std::sync::Arc<str>,
    /// Contracted (transformer) capacity, kVA; 0 when not applicable.
    pub contracted_kva: Decimal,
    pub opened_on: NaiveDate,
    pub customer_class: CustomerClass,
    pub payment_mode: PaymentMode,
}

impl From<&Account> for BillingAccount {
    fn from(a: &Account) -> BillingAccount {
        BillingAccount {
            account_id: Id::new(&a.account_id),
            tariff_id: a.tariff_id.as_str().into(),
            contracted_kva: a.contracted_kva,
            opened_on: a.opened_on,
            customer_class: a.customer_class,
            payment_mode: a.payment_mode,
        }
    }
}

impl From<Account> for BillingAccount {
    fn from(a: Account) -> BillingAccount {
        BillingAccount {
            account_id: Id::new(&a.account_id),
            tariff_id: a.tariff_id.into(),
            contracted_kva: a.contracted_kva,
            opened_on: a.opened_on,
            customer_class: a.customer_class,
            payment_mode: a.payment_mode,
        }
    }
}

/// Meters grouped by account: `owner[m]` is meter `m`'s account position
/// (`< accounts`). Returns `(starts, grouped)`: the meters of account `a` are
/// `grouped[starts[a]..starts[a + 1]]`, ascending. A counting sort: two
/// allocations, not one per account.
pub fn group_by_account(owner: &[u32], accounts: usize) -> (Vec<u32>, Vec<u32>) {
    let mut starts = vec![0u32; accounts + 1];
    for &a in owner {
        starts[a as usize + 1] += 1;
    }
    for a in 0..accounts {
        starts[a + 1] += starts[a];
    }
    let mut next = starts.clone();
    let mut grouped = vec![0u32; owner.len()];
    for (m, &a) in owner.iter().enumerate() {
        grouped[next[a as usize] as usize] = m as u32;
        next[a as usize] += 1;
    }
    (starts, grouped)
}

/// A payment received through a channel (top-up for prepaid, bill payment for postpaid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The channel's transaction id: the idempotency key of the credit.
    pub txn_id: String,
    /// wechat, alipay, bank or counter.
    pub channel: String,
    pub account_id: String,
    /// Yuan, exact decimal, positive.
    pub amount: Decimal,
    pub paid_at: DateTime<Utc>,
}

/// A payment as the bill run reads it for late fees (`load_billing_payments`).
#[derive(Debug, Clone, PartialEq)]
pub struct BillingPayment {
    pub account_id: Id,
    /// Yuan, exact decimal, positive.
    pub amount: Decimal,
    pub paid_at: DateTime<Utc>,
}

/// A row of `opening_balances.csv`: an unpaid bill of the system before
/// meterflow (`owed` > 0, with its period and due date), or a credit
/// (`owed` < 0, neither). Periods are checked by the bill run.
#[derive(Debug, Clone, PartialEq)]
pub struct OpeningBalance {
    pub account_id: Box<str>,
    /// The day the balance is as of: the last day the system before billed.
    pub as_of: NaiveDate,
    /// The bill's period label (`YYYY-MM` or `YYYY-MM-DD..YYYY-MM-DD`);
    /// empty for a credit.
    pub period: String,
    /// Yuan owed; negative for a credit.
    pub owed: Decimal,
    pub due_date: Option<NaiveDate>,
    /// Line in the file, for errors found later.
    pub line: u64,
}

/// A row of a prepaid fleet's opening-balances file (`ledger
/// import-balances`): what a prepaid account held in the system before
/// meterflow at the instant meterflow takes over its deductions.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepaidOpening {
    pub account_id: String,
    /// The switch instant: the old system deducted every reading up to it.
    pub switched_at: DateTime<Utc>,
    /// Yuan, signed (negative: overdrawn).
    pub balance: Decimal,
    /// kWh the account consumed in its accumulation window (month or tier
    /// year) before the switch: where its tier position starts.
    pub position_kwh: Decimal,
    pub line: u64,
}
