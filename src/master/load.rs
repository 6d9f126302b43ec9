//! CSV loading with row-level errors (file, line, field).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::{Account, BillingAccount, BillingMeter, CustomerClass, Meter, Payment, PaymentMode};

/// A bad row: where and why. Good rows of the same file are still loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub file: PathBuf,
    pub line: u64,
    pub field: String,
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: field '{}': {}",
            self.file.display(),
            self.line,
            self.field,
            self.message
        )
    }
}

/// Rows that loaded, and the rows that did not.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub rows: Vec<T>,
    pub errors: Vec<RowError>,
    /// SHA-256 (hex) and length of the file as read: hashed while parsing,
    /// so a manifest's input hash costs no second read.
    pub sha256: String,
    pub bytes: u64,
}

/// Passes what the CSV reader reads through SHA-256.
struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

struct Row<'a> {
    file: &'a Path,
    line: u64,
    headers: &'a csv::StringRecord,
    rec: &'a csv::StringRecord,
}

impl Row<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> RowError {
        RowError {
            file: self.file.to_path_buf(),
            line: self.line,
            field: field.to_string(),
            message: message.into(),
        }
    }
    fn raw(&self, field: &str) -> Result<&str, RowError> {
        let i = self
            .headers
            .iter()
            .position(|h| h == field)
            .ok_or_else(|| self.err(field, "column missing from the header"))?;
        Ok(self.rec.get(i).unwrap_or("").trim())
    }
    fn text(&self, field: &str) -> Result<String, RowError> {
        let v = self.raw(field)?;
        if v.is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(v.to_string())
    }
    fn opt_text(&self, field: &str) -> Result<String, RowError> {
        // Optional columns may be absent from the header altogether.
        Ok(self.raw(field).map(str::to_string).unwrap_or_default())
    }
    fn decimal(&self, field: &str) -> Result<Decimal, RowError> {
        let v = self.raw(field)?;
        v.parse::<Decimal>()
            .map_err(|e| self.err(field, format!("'{v}' is not a decimal number: {e}")))
    }
    fn date(&self, field: &str) -> Result<NaiveDate, RowError> {
        let v = self.raw(field)?;
        ymd(v)
            .or_else(|| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok())
            .ok_or_else(|| self.err(field, format!("'{v}' is not a date (YYYY-MM-DD)")))
    }
    fn opt_date(&self, field: &str) -> Result<Option<NaiveDate>, RowError> {
        match self.raw(field) {
            Ok("") | Err(_) => Ok(None),
            Ok(_) => self.date(field).map(Some),
        }
    }
}

/// `YYYY-MM-DD` exactly, without chrono's format interpreter (a million
/// rows carry one or two dates each). Other spellings go to chrono.
fn ymd(v: &str) -> Option<NaiveDate> {
    let b = v.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        b[r].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)
}

fn load<T>(
    path: &Path,
    required: &[&str],
    parse: impl Fn(&Row) -> Result<T, RowError>,
) -> Result<Loaded<T>, RowError> {
    let whole = |message: String| RowError {
        file: path.to_path_buf(),
        line: 1,
        field: String::new(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| whole(format!("cannot open: {e}")))?;
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .comment(Some(b'#'))
        .buffer_capacity(1 << 20)
        .from_reader(Hashing {
            inner: file,
            hash: Default::default(),
            bytes: 0,
        });
    let headers = rdr
        .headers()
        .map_err(|e| whole(format!("cannot read header: {e}")))?
        .clone();
    for r in required {
        if !headers.iter().any(|h| h == *r) {
            return Err(RowError {
                file: path.to_path_buf(),
                line: 1,
                field: r.to_string(),
                message: "required column missing from the header".into(),
            });
        }
    }
    let mut out = Loaded {
        rows: Vec::new(),
        errors: Vec::new(),
        sha256: String::new(),
        bytes: 0,
    };
    // Sized from the first rows' length: growing a vector of a million
    // rows by doubling copies them over and over.
    let file_len = std::fs::metadata(path).map_or(0, |m| m.len());
    const SAMPLE: usize = 1024;
    let mut rec = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                if out.rows.len() == SAMPLE {
                    let read = rec.position().map_or(0, |p| p.byte()).max(1);
                    let estimate = file_len.saturating_mul(SAMPLE as u64) / read;
                    // No CSV row here is shorter than 16 bytes: a bound
                    // for first rows much shorter than the rest.
                    let rows = (estimate * 11 / 10).min(file_len / 16);
                    out.rows.reserve(rows as usize);
                }
                let line = rec.position().map(|p| p.line()).unwrap_or(0);
                let row = Row {
                    file: path,
                    line,
                    headers: &headers,
                    rec: &rec,
                };
                match parse(&row) {
                    Ok(v) => out.rows.push(v),
                    Err(e) => out.errors.push(e),
                }
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                out.errors.push(RowError {
                    file: path.to_path_buf(),
                    line,
                    field: String::new(),
                    message: format!("malformed CSV: {e}"),
                });
                if !matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) {
                    break;
                }
            }
        }
    }
    for e in &out.errors {
        tracing::warn!(error = %e, "master data row rejected");
    }
    // A read error stops the parse early: hash the rest too (or fail the
    // file, if it still cannot be read).
    let mut rest = rdr.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| whole(format!("cannot read: {e}")))?;
    out.sha256 = hex::encode(sha2::Digest::finalize(rest.hash));
    out.bytes = rest.bytes;
    Ok(out)
}

pub fn load_meters(path: &Path) -> Result<Loaded<Meter>, RowError> {
    load_meters_with(path, true, |m| m)
}

/// Meters with `meter_type` and `feeder` left empty: prepayment never reads
/// them, and two short strings per meter count at millions of meters (the
/// bill run goes further: [`load_billing_meters`]). Rows are validated
/// exactly as by [`load_meters`].
pub fn load_meters_for_billing(path: &Path) -> Result<Loaded<Meter>, RowError> {
    load_meters_with(path, false, |m| m)
}

/// Meters as the bill run holds them ([`BillingMeter`]: no type or feeder,
/// ids boxed), converted row by row, so the full [`Meter`]s never all exist.
pub fn load_billing_meters(path: &Path) -> Result<Loaded<BillingMeter>, RowError> {
    load_meters_with(path, false, BillingMeter::from)
}

fn load_meters_with<T>(
    path: &Path,
    descriptive: bool,
    into: impl Fn(Meter) -> T,
) -> Result<Loaded<T>, RowError> {
    let text = |r: &Row<'_>, field: &str| -> Result<String, RowError> {
        if descriptive {
            r.opt_text(field)
        } else {
            Ok(String::new())
        }
    };
    load(
        path,
        &[
            "meter_id",
            "account_id",
            "ct_ratio",
            "pt_ratio",
            "installed_on",
        ],
        |r| {
            let ct = r.decimal("ct_ratio")?;
            let pt = r.decimal("pt_ratio")?;
            if ct <= Decimal::ZERO {
                return Err(r.err("ct_ratio", "must be positive"));
            }
            if pt <= Decimal::ZERO {
                return Err(r.err("pt_ratio", "must be positive"));
            }
            let digits = match r.raw("register_digits") {
                Ok("") | Err(_) => 6,
                Ok(v) => v
                    .parse::<u8>()
                    .ok()
                    .filter(|d| (4..=10).contains(d))
                    .ok_or_else(|| r.err("register_digits", format!("'{v}' is not 4..10")))?,
            };
            let installed_on = r.date("installed_on")?;
            let removed_on = r.opt_date("removed_on")?;
            if removed_on.is_some_and(|d| d < installed_on) {
                return Err(r.err("removed_on", "is before installed_on"));
            }
            Ok(into(Meter {
                meter_id: r.text("meter_id")?,
                account_id: r.text("account_id")?,
                meter_type: text(r, "meter_type")?,
                ct_ratio: ct,
                pt_ratio: pt,
                register_digits: digits,
                installed_on,
                removed_on,
                feeder: text(r, "feeder")?,
            }))
        },
    )
}

pub fn load_accounts(path: &Path) -> Result<Loaded<Account>, RowError> {
    load_accounts_with(path, true, |a| a)
}

/// Accounts with the personal and demographic fields (name, phone, ID
/// number, address, district, age band, occupation, gender) left empty:
/// prepayment never reads them, and empty strings take no heap memory.
/// Rows are validated exactly as by [`load_accounts`].
pub fn load_accounts_without_personal(path: &Path) -> Result<Loaded<Account>, RowError> {
    load_accounts_with(path, false, |a| a)
}

/// Accounts as billing reads them (see [`BillingAccount`]): the personal and
/// demographic fields are not kept at all. Rows are validated exactly as by
/// [`load_accounts`].
pub fn load_accounts_for_billing(path: &Path) -> Result<Loaded<BillingAccount>, RowError> {
    // One shared copy of each tariff id: a fleet has a handful of tariffs.
    let tariffs = std::cell::RefCell::new(std::collections::HashMap::<String, Arc<str>>::new());
    load_accounts_with(path, false, |a| {
        let mut t = tariffs.borrow_mut();
        let tariff_id = match t.get(&a.tariff_id) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = a.tariff_id.as_str().into();
                t.insert(a.tariff_id.clone(), shared.clone());
                shared
            }
        };
        BillingAccount {
            account_id: a.account_id.into_boxed_str(),
            tariff_id,
            contracted_kva: a.contracted_kva,
            opened_on: a.opened_on,
            customer_class: a.customer_class,
            payment_mode: a.payment_mode,
        }
    })
}

fn load_accounts_with<T>(
    path: &Path,
    personal: bool,
    into: impl Fn(Account) -> T,
) -> Result<Loaded<T>, RowError> {
    let text = |r: &Row<'_>, field: &str| -> Result<String, RowError> {
        if personal {
            r.opt_text(field)
        } else {
            Ok(String::new())
        }
    };
    load(
        path,
        &["account_id", "customer_class", "tariff_id", "payment_mode"],
        |r| {
            let class = match r.raw("customer_class")? {
                "residential" => CustomerClass::Residential,
                "commercial" => CustomerClass::Commercial,
                "industrial" => CustomerClass::Industrial,
                "agricultural" => CustomerClass::Agricultural,
                v => {
                    return Err(r.err(
                        "customer_class",
                        format!("'{v}' is not residential|commercial|industrial|agricultural"),
                    ))
                }
            };
            let mode = match r.raw("payment_mode")? {
                "prepaid" => PaymentMode::Prepaid,
                "postpaid" => PaymentMode::Postpaid,
                v => return Err(r.err("payment_mode", format!("'{v}' is not prepaid|postpaid"))),
            };
            let kva = match r.raw("contracted_kva") {
                Ok("") | Err(_) => Decimal::ZERO,
                Ok(_) => r.decimal("contracted_kva")?,
            };
            if kva < Decimal::ZERO {
                return Err(r.err("contracted_kva", "must not be negative"));
            }
            let household_size = match r.raw("household_size") {
                Ok("") | Err(_) => 0,
                Ok(v) => v.parse().map_err(|_| {
                    r.err("household_size", format!("'{v}' is not a small integer"))
                })?,
            };
            Ok(into(Account {
                account_id: r.text("account_id")?,
                name: text(r, "name")?,
                phone: text(r, "phone")?,
                id_number: text(r, "id_number")?,
                address: text(r, "address")?,
                district: text(r, "district")?,
                age_band: text(r, "age_band")?,
                occupation: text(r, "occupation")?,
                gender: text(r, "gender")?,
                customer_class: class,
                tariff_id: r.text("tariff_id")?,
                payment_mode: mode,
                contracted_kva: kva,
                household_size,
                opened_on: r.opt_date("opened_on")?.unwrap_or(NaiveDate::MIN),
            }))
        },
    )
}

pub fn load_payments(path: &Path) -> Result<Loaded<Payment>, RowError> {
    load(
        path,
        &["txn_id", "channel", "account_id", "amount", "paid_at"],
        |r| {
            let amount = r.decimal("amount")?;
            if amount <= Decimal::ZERO {
                return Err(r.err("amount", "must be positive"));
            }
            let channel = r.text("channel")?;
            if !["wechat", "alipay", "bank", "counter"].contains(&channel.as_str()) {
                return Err(r.err(
                    "channel",
                    format!("'{channel}' is not wechat|alipay|bank|counter"),
                ));
            }
            let paid = r.raw("paid_at")?;
            let paid_at = DateTime::parse_from_rfc3339(paid)
                .map_err(|_| r.err("paid_at", format!("'{paid}' is not an RFC 3339 time")))?
                .with_timezone(&Utc);
            Ok(Payment {
                txn_id: r.text("txn_id")?,
                channel,
                account_id: r.text("account_id")?,
                amount,
                paid_at,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_read_as_yyyy_mm_dd_with_or_without_the_fast_path() {
        let d = |y, m, d| NaiveDate::from_ymd_opt(y, m, d);
        assert_eq!(ymd("2015-01-31"), d(2015, 1, 31));
        assert_eq!(ymd("2024-02-29"), d(2024, 2, 29));
        assert_eq!(ymd("2023-02-29"), None, "no such day");
        assert_eq!(ymd("2015-1-31"), None, "left to chrono");
        assert_eq!(ymd("20a5-01-31"), None);
        assert_eq!(ymd("2015/01/31"), None);
        let path = Path::new("meters.csv");
        let headers = csv::StringRecord::from(vec!["installed_on"]);
        let row = |v: &str| {
            let rec = csv::StringRecord::from(vec![v]);
            let r = Row {
                file: path,
                line: 2,
                headers: &headers,
                rec: &rec,
            };
            r.date("installed_on").ok()
        };
        assert_eq!(row("2015-01-31"), d(2015, 1, 31));
        assert_eq!(row("2015-1-31"), d(2015, 1, 31), "chrono still reads it");
        assert_eq!(row("2015-13-01"), None);
    }

    #[test]
    fn bad_rows_are_reported_with_file_line_and_field_and_good_rows_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meters.csv");
        std::fs::write(
            &p,
            "meter_id,account_id,ct_ratio,pt_ratio,installed_on,removed_on\n\
             000000000001,A1,1,1,2026-01-01,\n\
             000000000002,A2,x,1,2026-01-01,\n\
             000000000003,A3,1,1,2026-13-01,\n",
        )
        .unwrap();
        let l = load_meters(&p).unwrap();
        assert_eq!(l.rows.len(), 1);
        assert_eq!(l.errors.len(), 2);
        assert_eq!(l.errors[0].line, 3);
        assert_eq!(l.errors[0].field, "ct_ratio");
        assert_eq!(l.errors[1].line, 4);
        assert_eq!(l.errors[1].field, "installed_on");
        assert!(l.errors[0]
            .to_string()
            .contains("meters.csv:3: field 'ct_ratio'"));
    }

    #[test]
    fn missing_required_column_fails_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts.csv");
        std::fs::write(&p, "account_id,tariff_id\nA1,t\n").unwrap();
        let e = load_accounts(&p).unwrap_err();
        assert_eq!(e.field, "customer_class");
    }

    #[test]
    fn billing_loads_the_same_meters_without_type_and_feeder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meters.csv");
        std::fs::write(
            &p,
            "meter_id,account_id,meter_type,ct_ratio,pt_ratio,installed_on,feeder\n\
             M1,A1,residential_1p,1,1,2024-01-01,F-07\n\
             M2,A1,residential_1p,0,1,2024-01-01,F-07\n",
        )
        .unwrap();
        let all = load_meters(&p).unwrap();
        let billing = load_meters_for_billing(&p).unwrap();
        assert_eq!(all.errors, billing.errors, "same validation");
        assert_eq!(all.rows[0].feeder, "F-07");
        let mut without = all.rows[0].clone();
        without.meter_type.clear();
        without.feeder.clear();
        assert_eq!(billing.rows, vec![without]);
    }

    #[test]
    fn billing_loads_the_same_accounts_without_personal_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts.csv");
        std::fs::write(
            &p,
            "account_id,name,phone,id_number,address,district,customer_class,tariff_id,payment_mode\n\
             A1,Wang Fang,13800138000,110101199003071234,1 Chang'an Ave,Dongcheng,residential,t,prepaid\n\
             A2,Li Lei,13900139000,110101199104081234,2 Jinrong St,Xicheng,retail,t,prepaid\n",
        )
        .unwrap();
        let all = load_accounts(&p).unwrap();
        let billing = load_accounts_for_billing(&p).unwrap();
        let prepay = load_accounts_without_personal(&p).unwrap();
        assert_eq!(all.errors, billing.errors, "same validation");
        assert_eq!(all.errors, prepay.errors, "same validation");
        assert_eq!(billing.rows.len(), 1);
        assert_eq!(all.rows[0].name, "Wang Fang");
        assert_eq!(billing.rows[0], BillingAccount::from(&all.rows[0]));
        let p = &prepay.rows[0];
        assert!(p.name.is_empty() && p.phone.is_empty() && p.address.is_empty());
        let mut without = all.rows[0].clone();
        for f in [
            &mut without.name,
            &mut without.phone,
            &mut without.id_number,
            &mut without.address,
            &mut without.district,
        ] {
            f.clear();
        }
        assert_eq!(*p, without);
    }

    #[test]
    fn accounts_of_one_tariff_share_one_tariff_id_and_files_carry_their_hash() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts.csv");
        // A row that is not UTF-8 is rejected and the rows after it still read.
        let mut text = b"account_id,customer_class,tariff_id,payment_mode\n\
            A1,residential,bj,prepaid\n\
            A2,residential,gd,prepaid\n\
            A\xff3,residential,bj,prepaid\n\
            A4,residential,bj,postpaid\n"
            .to_vec();
        text.extend_from_slice(b"# a comment at the end\n");
        std::fs::write(&p, &text).unwrap();
        let l = load_accounts_for_billing(&p).unwrap();
        let ids: Vec<&str> = l.rows.iter().map(|a| &*a.account_id).collect();
        assert_eq!(ids, ["A1", "A2", "A4"]);
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert!(Arc::ptr_eq(&l.rows[0].tariff_id, &l.rows[2].tariff_id));
        assert_eq!(&*l.rows[1].tariff_id, "gd");
        assert_eq!(l.sha256, hex::encode(sha2::Sha256::digest(&text)));
        assert_eq!(l.bytes, text.len() as u64);
        let m = dir.path().join("meters.csv");
        std::fs::write(&m, "meter_id,account_id,ct_ratio,pt_ratio,installed_on\n").unwrap();
        let meters = load_billing_meters(&m).unwrap();
        assert!(meters.rows.is_empty());
        assert_eq!(
            meters.sha256,
            hex::encode(sha2::Sha256::digest(std::fs::read(&m).unwrap()))
        );
    }
}
