//! CSV loading with row-level errors (file, line, field).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::{
    Account, BillingAccount, BillingMeter, BillingPayment, CustomerClass, Id, Meter,
    OpeningBalance, Payment, PaymentMode, PrepaidOpening,
};

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

/// A header's column positions by name (the first of repeated names), so a
/// field is found without comparing it with every column name on every row.
struct Columns(crate::store::scan::FxMap<Box<str>, usize>);

impl Columns {
    fn new(header: &csv::StringRecord) -> Columns {
        let mut m = crate::store::scan::FxMap::default();
        for (i, h) in header.iter().enumerate() {
            m.entry(h.into()).or_insert(i);
        }
        Columns(m)
    }
}

/// Column positions a parse has asked for, in the order it asked, by the
/// address and length of the field name it passed (a `'static` name, so
/// an address never comes to hold another name; parsers ask in the same
/// order on every row): one pointer compare per lookup instead of hashing
/// the name on every row.
#[derive(Default)]
struct Seen(std::cell::RefCell<Vec<(usize, usize, Option<usize>)>>);

impl Seen {
    /// The position of `field`, expected at `*next` in the order of asking.
    fn position(
        &self,
        field: &'static str,
        headers: &Columns,
        next: &std::cell::Cell<usize>,
    ) -> Option<usize> {
        let key = (field.as_ptr() as usize, field.len());
        let mut seen = self.0.borrow_mut();
        let n = next.get();
        let at = match seen.get(n) {
            Some(e) if (e.0, e.1) == key => Some(n),
            _ => seen.iter().position(|e| (e.0, e.1) == key),
        };
        let at = at.unwrap_or_else(|| {
            seen.push((key.0, key.1, headers.0.get(field).copied()));
            seen.len() - 1
        });
        next.set(at + 1);
        seen[at].2
    }
}

struct Row<'a> {
    file: &'a Path,
    line: u64,
    headers: &'a Columns,
    seen: &'a Seen,
    /// Where this row's next lookup is expected in `seen`.
    next: std::cell::Cell<usize>,
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
    fn raw(&self, field: &'static str) -> Result<&str, RowError> {
        let i = self
            .seen
            .position(field, self.headers, &self.next)
            .ok_or_else(|| self.err(field, "column missing from the header"))?;
        Ok(self.rec.get(i).unwrap_or("").trim())
    }
    fn text(&self, field: &'static str) -> Result<String, RowError> {
        Ok(self.nonempty(field)?.to_string())
    }
    fn nonempty(&self, field: &'static str) -> Result<&str, RowError> {
        let v = self.raw(field)?;
        if v.is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(v)
    }
    fn opt_text(&self, field: &'static str) -> Result<String, RowError> {
        // Optional columns may be absent from the header altogether.
        Ok(self.raw(field).map(str::to_string).unwrap_or_default())
    }
    /// [`Row::opt_text`] when `keep`, else empty (a column a loader drops).
    fn kept_text(&self, keep: bool, field: &'static str) -> Result<String, RowError> {
        if keep {
            self.opt_text(field)
        } else {
            Ok(String::new())
        }
    }
    fn decimal(&self, field: &'static str) -> Result<Decimal, RowError> {
        let v = self.raw(field)?;
        v.parse::<Decimal>()
            .map_err(|e| self.err(field, format!("'{v}' is not a decimal number: {e}")))
    }
    /// An optional decimal column: absent or empty is zero.
    fn decimal_or_zero(&self, field: &'static str) -> Result<Decimal, RowError> {
        match self.raw(field) {
            Ok("") | Err(_) => Ok(Decimal::ZERO),
            Ok(_) => self.decimal(field),
        }
    }
    /// Yuan in fen: at most 2 decimals, and at most [`MAX_PAYMENT`] either
    /// way, which keeps any sum of them far from Decimal's range (a typo of
    /// many digits is a bad row, not a crash).
    fn fen(&self, field: &'static str) -> Result<Decimal, RowError> {
        let x = self.decimal(field)?;
        if x.scale() > 2 && x.normalize().scale() > 2 {
            return Err(self.err(field, format!("'{x}' has more than 2 decimals (fen)")));
        }
        if x.abs() > MAX_PAYMENT {
            return Err(self.err(field, format!("'{x}' is over {MAX_PAYMENT} yuan")));
        }
        Ok(x)
    }
    fn date(&self, field: &'static str) -> Result<NaiveDate, RowError> {
        let v = self.raw(field)?;
        ymd(v)
            .or_else(|| NaiveDate::parse_from_str(v, "%Y-%m-%d").ok())
            .ok_or_else(|| self.err(field, format!("'{v}' is not a date (YYYY-MM-DD)")))
    }
    fn opt_date(&self, field: &'static str) -> Result<Option<NaiveDate>, RowError> {
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

/// `YYYY-MM-DDTHH:MM:SSZ` exactly, without chrono's RFC 3339 parser (a
/// million payments carry one each). Other spellings go to chrono.
fn utc_seconds(v: &str) -> Option<DateTime<Utc>> {
    let b = v.as_bytes();
    if b.len() != 20 || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        b[r].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let time = chrono::NaiveTime::from_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)?;
    Some(ymd(&v[..10])?.and_time(time).and_utc())
}

/// When a file is parsed in chunks on every core, and how large they are.
#[derive(Clone, Copy)]
struct Chunking {
    /// Files at least this large are parsed in chunks.
    min_bytes: u64,
    /// Bytes per chunk (cut at the next line start).
    chunk_bytes: u64,
}

const CHUNKING: Chunking = Chunking {
    min_bytes: 32 << 20,
    chunk_bytes: 16 << 20,
};

/// One parse whatever the size: every row's `line` is exact (files whose
/// rows are named again in errors found later).
const ONE_PARSE: Chunking = Chunking {
    min_bytes: u64::MAX,
    chunk_bytes: u64::MAX,
};

fn load<T: Send>(
    path: &Path,
    required: &[&str],
    parse: impl Fn(&Row) -> Result<T, RowError> + Sync,
) -> Result<Loaded<T>, RowError> {
    load_in(path, required, parse, CHUNKING)
}

fn load_in<T: Send>(
    path: &Path,
    required: &[&str],
    parse: impl Fn(&Row) -> Result<T, RowError> + Sync,
    chunking: Chunking,
) -> Result<Loaded<T>, RowError> {
    let whole = |message: String| whole_file(path, message);
    let file = std::fs::File::open(path).map_err(|e| whole(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_or(0, |m| m.len());
    let mut rdr = reader(true).from_reader(file);
    let headers = Columns::new(
        rdr.headers()
            .map_err(|e| whole(format!("cannot read header: {e}")))?,
    );
    for r in required {
        if !headers.0.contains_key(*r) {
            return Err(RowError {
                file: path.to_path_buf(),
                line: 1,
                field: r.to_string(),
                message: "required column missing from the header".into(),
            });
        }
    }
    // Where the records start (after comments and the header).
    let body = rdr.position().byte();
    drop(rdr);
    let chunked = if file_len >= chunking.min_bytes {
        load_parallel(path, file_len, body, &headers, &parse, chunking.chunk_bytes)?
    } else {
        None
    };
    let parsed = match chunked {
        Some(out) => out,
        None => load_sequential(path, &headers, &parse)?,
    };
    for e in &parsed.errors {
        tracing::warn!(error = %e, "master data row rejected");
    }
    Ok(parsed)
}

fn whole_file(path: &Path, message: String) -> RowError {
    RowError {
        file: path.to_path_buf(),
        line: 1,
        field: String::new(),
        message,
    }
}

fn reader(has_headers: bool) -> csv::ReaderBuilder {
    let mut b = csv::ReaderBuilder::new();
    b.flexible(true)
        .comment(Some(b'#'))
        .has_headers(has_headers)
        .buffer_capacity(1 << 20);
    b
}

/// The whole file on one thread: a small file, or one with quoted fields
/// (where a chunk boundary could fall inside a field).
fn load_sequential<T>(
    path: &Path,
    headers: &Columns,
    parse: &(impl Fn(&Row) -> Result<T, RowError> + Sync),
) -> Result<Loaded<T>, RowError> {
    let whole = |message: String| whole_file(path, message);
    let file = std::fs::File::open(path).map_err(|e| whole(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_or(0, |m| m.len());
    let mut rdr = reader(true).from_reader(Hashing {
        inner: file,
        hash: Default::default(),
        bytes: 0,
    });
    let mut out = Loaded {
        rows: Vec::new(),
        errors: Vec::new(),
        sha256: String::new(),
        bytes: 0,
    };
    parse_records(&mut rdr, path, headers, file_len, parse, &mut out);
    // A read error stops the parse early: hash the rest too (or fail the
    // file, if it still cannot be read).
    let mut rest = rdr.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| whole(format!("cannot read: {e}")))?;
    out.sha256 = hex::encode(sha2::Digest::finalize(rest.hash));
    out.bytes = rest.bytes;
    Ok(out)
}

/// Reads every record of `rdr` (`len` bytes; lines numbered from 1 at its
/// start) into `out`.
fn parse_records<R: std::io::Read, T>(
    rdr: &mut csv::Reader<R>,
    path: &Path,
    headers: &Columns,
    len: u64,
    parse: &impl Fn(&Row) -> Result<T, RowError>,
    out: &mut Loaded<T>,
) {
    // Sized from the first rows' length: growing a vector of a million
    // rows by doubling copies them over and over.
    const SAMPLE: usize = 1024;
    let mut rec = csv::StringRecord::new();
    let seen = Seen::default();
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                if out.rows.len() == SAMPLE {
                    let read = rec.position().map_or(0, |p| p.byte()).max(1);
                    let estimate = len.saturating_mul(SAMPLE as u64) / read;
                    // No CSV row here is shorter than 16 bytes: a bound
                    // for first rows much shorter than the rest.
                    let rows = (estimate * 11 / 10).min(len / 16);
                    out.rows.reserve(rows as usize);
                }
                let line = rec.position().map(|p| p.line()).unwrap_or(0);
                let row = Row {
                    file: path,
                    line,
                    headers,
                    seen: &seen,
                    next: Default::default(),
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
                    message: malformed(&e),
                });
                if !matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) {
                    break;
                }
            }
        }
    }
}

/// A CSV error's message without the reader's own position: the row error
/// carries the line, and a chunk's reader counts from the chunk's start.
fn malformed(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("malformed CSV: invalid UTF-8: {err}"),
        _ => format!("malformed CSV: {e}"),
    }
}

/// A large file parsed in chunks cut at line starts, on every core, while
/// one task hashes it. Rows and errors come out in file order, with the
/// lines a single parse gives. None when the file has a double quote
/// anywhere: a quoted field may span lines, so only a single parse knows
/// where records start.
fn load_parallel<T: Send>(
    path: &Path,
    len: u64,
    body: u64,
    headers: &Columns,
    parse: &(impl Fn(&Row) -> Result<T, RowError> + Sync),
    chunk_bytes: u64,
) -> Result<Option<Loaded<T>>, RowError> {
    use rayon::prelude::*;
    use std::io::{Read, Seek};
    let whole = |message: String| whole_file(path, message);
    let bounds = line_starts(path, len, body, chunk_bytes)
        .map_err(|e| whole(format!("cannot read: {e}")))?;
    let chunk = |k: usize| -> std::io::Result<Loaded<T>> {
        let (start, end) = (bounds[k], bounds[k + 1]);
        let mut f = std::fs::File::open(path)?;
        f.seek(std::io::SeekFrom::Start(start))?;
        let mut rdr = reader(k == 0).from_reader(f.take(end - start));
        let mut out = Loaded {
            rows: Vec::new(),
            errors: Vec::new(),
            sha256: String::new(),
            bytes: 0,
        };
        parse_records(&mut rdr, path, headers, end - start, parse, &mut out);
        // A read error stops a parse early: make it the file's.
        std::io::copy(&mut rdr.into_inner(), &mut std::io::sink())?;
        Ok(out)
    };
    let (hash, parts) = rayon::join(
        || hash_file(path),
        || {
            (0..bounds.len() - 1)
                .into_par_iter()
                .map(chunk)
                .collect::<std::io::Result<Vec<_>>>()
        },
    );
    let (sha256, bytes, quotes) = hash.map_err(|e| whole(format!("cannot read: {e}")))?;
    let parts = parts.map_err(|e| whole(format!("cannot read: {e}")))?;
    if quotes {
        return Ok(None);
    }
    let mut out = Loaded {
        rows: Vec::with_capacity(parts.iter().map(|p| p.rows.len()).sum()),
        errors: Vec::new(),
        sha256,
        bytes,
    };
    // Errors of later chunks carry lines counted from their chunk's start:
    // the newlines before it are counted only when there are such errors.
    let mut lines = LinesBefore::new(path);
    for (k, mut part) in parts.into_iter().enumerate() {
        out.rows.append(&mut part.rows);
        if !part.errors.is_empty() {
            let before = lines
                .at(bounds[k])
                .map_err(|e| whole(format!("cannot read: {e}")))?;
            out.errors.extend(part.errors.into_iter().map(|mut e| {
                e.line += before;
                e
            }));
        }
    }
    Ok(Some(out))
}

/// Newlines before an offset of a file, counted forward as asked.
struct LinesBefore<'a> {
    path: &'a Path,
    file: Option<std::fs::File>,
    offset: u64,
    lines: u64,
}

impl<'a> LinesBefore<'a> {
    fn new(path: &'a Path) -> Self {
        LinesBefore {
            path,
            file: None,
            offset: 0,
            lines: 0,
        }
    }

    /// Newlines in the first `offset` bytes (offsets asked in order).
    fn at(&mut self, offset: u64) -> std::io::Result<u64> {
        use std::io::Read;
        if self.file.is_none() {
            self.file = Some(std::fs::File::open(self.path)?);
        }
        let f = self.file.as_mut().expect("opened above");
        let mut buf = vec![0u8; 1 << 20];
        while self.offset < offset {
            let want = (offset - self.offset).min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            self.lines += buf[..n].iter().filter(|&&c| c == b'\n').count() as u64;
            self.offset += n as u64;
        }
        Ok(self.lines)
    }
}

/// Offsets that cut `path` into chunks of about `chunk` bytes at line
/// starts: 0, then the start of the first line at or after `body + chunk`,
/// and so on every `chunk` bytes, then `len`. The first chunk holds the
/// header (which ends at `body`).
fn line_starts(path: &Path, len: u64, body: u64, chunk: u64) -> std::io::Result<Vec<u64>> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path)?;
    let mut out = vec![0];
    let mut buf = vec![0u8; 64 << 10];
    let mut at = body.max(1) + chunk;
    while at < len {
        // The line start at or after `at`: just after the first newline at
        // or after `at - 1`.
        let mut pos = at - 1;
        let start = loop {
            f.seek(std::io::SeekFrom::Start(pos))?;
            let n = f.read(&mut buf)?;
            if n == 0 {
                break len;
            }
            if let Some(i) = buf[..n].iter().position(|&c| c == b'\n') {
                break pos + i as u64 + 1;
            }
            pos += n as u64;
        };
        if start >= len {
            break;
        }
        if start > *out.last().unwrap_or(&0) {
            out.push(start);
        }
        at = start.max(at) + chunk;
    }
    out.push(len);
    Ok(out)
}

/// SHA-256 (hex) and length of a file, and whether it holds a double quote.
fn hash_file(path: &Path) -> std::io::Result<(String, u64, bool)> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut quotes) = (0u64, false);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        quotes = quotes || buf[..n].contains(&b'"');
        bytes += n as u64;
    }
    Ok((hex::encode(h.finalize()), bytes, quotes))
}

pub fn load_meters(path: &Path) -> Result<Loaded<Meter>, RowError> {
    load_meters_with(path, |r, t| t.meter(r, true), CHUNKING)
}

/// Meters with `meter_type` and `feeder` left empty: prepayment never reads
/// them, and two short strings per meter count at millions of meters (the
/// bill run goes further: [`load_billing_meters`]). Rows are validated
/// exactly as by [`load_meters`].
pub fn load_meters_for_billing(path: &Path) -> Result<Loaded<Meter>, RowError> {
    load_meters_with(path, |r, t| t.meter(r, false), CHUNKING)
}

/// Meters as the bill run holds them ([`BillingMeter`]: no type or feeder,
/// ids inline), built straight from each row: no [`Meter`] and no heap
/// block is made for them. Rows are validated exactly as by [`load_meters`].
pub fn load_billing_meters(path: &Path) -> Result<Loaded<BillingMeter>, RowError> {
    load_meters_with(path, |r, t| t.billing(r), CHUNKING)
}

/// A meters.csv row's checked numbers and dates, before its text is taken.
struct MeterTerms {
    ct: Decimal,
    pt: Decimal,
    digits: u8,
    installed_on: NaiveDate,
    removed_on: Option<NaiveDate>,
}

impl MeterTerms {
    fn meter(self, r: &Row, descriptive: bool) -> Result<Meter, RowError> {
        Ok(Meter {
            meter_id: r.text("meter_id")?,
            account_id: r.text("account_id")?,
            meter_type: r.kept_text(descriptive, "meter_type")?,
            ct_ratio: self.ct,
            pt_ratio: self.pt,
            register_digits: self.digits,
            installed_on: self.installed_on,
            removed_on: self.removed_on,
            feeder: r.kept_text(descriptive, "feeder")?,
        })
    }

    fn billing(self, r: &Row) -> Result<BillingMeter, RowError> {
        Ok(BillingMeter {
            meter_id: Id::new(r.nonempty("meter_id")?),
            account_id: Id::new(r.nonempty("account_id")?),
            multiplier: self.ct * self.pt,
            register_digits: self.digits,
            installed_on: self.installed_on,
            removed_on: self.removed_on,
        })
    }
}

fn load_meters_with<T: Send>(
    path: &Path,
    make: impl Fn(&Row, MeterTerms) -> Result<T, RowError> + Sync,
    chunking: Chunking,
) -> Result<Loaded<T>, RowError> {
    load_in(
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
            let terms = MeterTerms {
                ct,
                pt,
                digits,
                installed_on,
                removed_on,
            };
            make(r, terms)
        },
        chunking,
    )
}

pub fn load_accounts(path: &Path) -> Result<Loaded<Account>, RowError> {
    load_accounts_with(path, |r, t| t.account(r, true), CHUNKING)
}

/// Accounts with the personal and demographic fields (name, phone, ID
/// number, address, district, age band, occupation, gender) left empty:
/// prepayment never reads them, and empty strings take no heap memory.
/// Rows are validated exactly as by [`load_accounts`].
pub fn load_accounts_without_personal(path: &Path) -> Result<Loaded<Account>, RowError> {
    load_accounts_with(path, |r, t| t.account(r, false), CHUNKING)
}

/// Accounts as billing reads them (see [`BillingAccount`]): the personal and
/// demographic fields are not kept at all. Rows are validated exactly as by
/// [`load_accounts`].
pub fn load_accounts_for_billing(path: &Path) -> Result<Loaded<BillingAccount>, RowError> {
    load_billing_accounts_in(path, CHUNKING)
}

fn load_billing_accounts_in(
    path: &Path,
    chunking: Chunking,
) -> Result<Loaded<BillingAccount>, RowError> {
    // One shared copy of each tariff id: a fleet has a handful of tariffs.
    // Large files are parsed on every core, hence the lock (uncontended
    // nearly always: a lookup is a small part of a row's parse).
    let tariffs = std::sync::Mutex::new(std::collections::HashSet::<Arc<str>>::new());
    load_accounts_with(
        path,
        |r, t| {
            let id = r.nonempty("account_id")?;
            let tariff = r.nonempty("tariff_id")?;
            let tariff_id = {
                let mut shared = tariffs.lock().unwrap_or_else(|e| e.into_inner());
                match shared.get(tariff) {
                    Some(k) => k.clone(),
                    None => {
                        let k: Arc<str> = tariff.into();
                        shared.insert(k.clone());
                        k
                    }
                }
            };
            Ok(BillingAccount {
                account_id: Id::new(id),
                tariff_id,
                contracted_kva: t.kva,
                opened_on: t.opened_on,
                customer_class: t.class,
                payment_mode: t.mode,
            })
        },
        chunking,
    )
}

/// An accounts.csv row's checked terms, before its text is taken.
struct AccountTerms {
    class: CustomerClass,
    mode: PaymentMode,
    kva: Decimal,
    household_size: u8,
    opened_on: NaiveDate,
}

impl AccountTerms {
    fn account(self, r: &Row, personal: bool) -> Result<Account, RowError> {
        Ok(Account {
            account_id: r.text("account_id")?,
            name: r.kept_text(personal, "name")?,
            phone: r.kept_text(personal, "phone")?,
            id_number: r.kept_text(personal, "id_number")?,
            address: r.kept_text(personal, "address")?,
            district: r.kept_text(personal, "district")?,
            age_band: r.kept_text(personal, "age_band")?,
            occupation: r.kept_text(personal, "occupation")?,
            gender: r.kept_text(personal, "gender")?,
            customer_class: self.class,
            tariff_id: r.text("tariff_id")?,
            payment_mode: self.mode,
            contracted_kva: self.kva,
            household_size: self.household_size,
            opened_on: self.opened_on,
        })
    }
}

fn load_accounts_with<T: Send>(
    path: &Path,
    make: impl Fn(&Row, AccountTerms) -> Result<T, RowError> + Sync,
    chunking: Chunking,
) -> Result<Loaded<T>, RowError> {
    load_in(
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
            let kva = r.decimal_or_zero("contracted_kva")?;
            if kva < Decimal::ZERO {
                return Err(r.err("contracted_kva", "must not be negative"));
            }
            let household_size = match r.raw("household_size") {
                Ok("") | Err(_) => 0,
                Ok(v) => v.parse().map_err(|_| {
                    r.err("household_size", format!("'{v}' is not a small integer"))
                })?,
            };
            let opened_on = r.opt_date("opened_on")?.unwrap_or(NaiveDate::MIN);
            let terms = AccountTerms {
                class,
                mode,
                kva,
                household_size,
                opened_on,
            };
            make(r, terms)
        },
        chunking,
    )
}

/// The largest payment `load_payments` accepts, in yuan.
pub const MAX_PAYMENT: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

pub fn load_payments(path: &Path) -> Result<Loaded<Payment>, RowError> {
    load_payments_with(path, |r, channel, amount, paid_at| {
        Ok(Payment {
            txn_id: r.text("txn_id")?,
            channel: channel.to_string(),
            account_id: r.text("account_id")?,
            amount,
            paid_at,
        })
    })
}

/// `payments.csv` as the bill run's late fees read it: the same checks as
/// `load_payments`, without keeping transaction ids and channels (a
/// million-account file holds over a million rows).
pub fn load_billing_payments(path: &Path) -> Result<Loaded<BillingPayment>, RowError> {
    load_payments_with(path, |r, _, amount, paid_at| {
        r.nonempty("txn_id")?;
        Ok(BillingPayment {
            account_id: Id::new(r.nonempty("account_id")?),
            amount,
            paid_at,
        })
    })
}

/// Checks a payment row's amount, channel and time, then `make`s it.
fn load_payments_with<T: Send>(
    path: &Path,
    make: impl Fn(&Row, &str, Decimal, DateTime<Utc>) -> Result<T, RowError> + Sync,
) -> Result<Loaded<T>, RowError> {
    load(
        path,
        &["txn_id", "channel", "account_id", "amount", "paid_at"],
        |r| {
            let amount = r.fen("amount")?;
            if amount <= Decimal::ZERO {
                return Err(r.err("amount", "must be positive"));
            }
            let channel = r.nonempty("channel")?;
            if !["wechat", "alipay", "bank", "counter"].contains(&channel) {
                return Err(r.err(
                    "channel",
                    format!("'{channel}' is not wechat|alipay|bank|counter"),
                ));
            }
            let paid = r.raw("paid_at")?;
            let paid_at = utc_seconds(paid)
                .or_else(|| {
                    DateTime::parse_from_rfc3339(paid)
                        .ok()
                        .map(|t| t.with_timezone(&Utc))
                })
                .ok_or_else(|| r.err("paid_at", format!("'{paid}' is not an RFC 3339 time")))?;
            make(r, channel, amount, paid_at)
        },
    )
}

/// Loads `opening_balances.csv` (docs/data-model.md) in one parse, so every
/// row's `line` is exact (the bill run names it in errors it finds later).
/// Row checks here: an unpaid bill has a positive `owed`, a period and a due
/// date; a credit a negative `owed` and neither; amounts in fen, bounded
/// like payments.
pub fn load_opening_balances(path: &Path) -> Result<Loaded<OpeningBalance>, RowError> {
    load_in(
        path,
        &["account_id", "as_of", "period", "owed", "due_date"],
        |r| {
            let owed = r.fen("owed")?;
            let period = r.raw("period")?.to_string();
            let due_date = r.opt_date("due_date")?;
            if owed > Decimal::ZERO {
                if period.is_empty() {
                    return Err(r.err("period", "an unpaid bill (owed > 0) names its period"));
                }
                if due_date.is_none() {
                    return Err(r.err("due_date", "an unpaid bill (owed > 0) has a due date"));
                }
            } else if owed < Decimal::ZERO {
                if !period.is_empty() {
                    return Err(r.err("period", "a credit (owed < 0) has no period"));
                }
                if due_date.is_some() {
                    return Err(r.err("due_date", "a credit (owed < 0) has no due date"));
                }
            } else {
                return Err(r.err("owed", "0 owes nothing: leave the row out"));
            }
            Ok(OpeningBalance {
                account_id: r.nonempty("account_id")?.into(),
                as_of: r.date("as_of")?,
                period,
                owed,
                due_date,
                line: r.line,
            })
        },
        ONE_PARSE,
    )
}

/// The most kWh a prepaid opening's `position_kwh` may hold (a typo of
/// many digits is a bad row, not a tier position far beyond any tariff).
pub const MAX_POSITION_KWH: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

/// Loads a prepaid fleet's opening balances (`ledger import-balances`,
/// docs/data-model.md): `account_id, switched_at, balance[, position_kwh]`.
/// One parse, so every row's `line` is exact. Row checks here: the switch
/// is an RFC 3339 instant on a quarter hour (interval deductions are whole
/// quarter hours), the balance is in fen (either sign), the position is
/// kWh >= 0 (0 when the column is absent or empty).
pub fn load_prepaid_openings(path: &Path) -> Result<Loaded<PrepaidOpening>, RowError> {
    load_in(
        path,
        &["account_id", "switched_at", "balance"],
        |r| {
            let at = r.nonempty("switched_at")?;
            let switched_at = DateTime::parse_from_rfc3339(at)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    r.err(
                        "switched_at",
                        format!("'{at}' is not an RFC 3339 time with its offset"),
                    )
                })?;
            if switched_at.timestamp_millis() % 900_000 != 0 {
                return Err(r.err(
                    "switched_at",
                    format!(
                        "'{at}' is not on a quarter hour (00, 15, 30 or 45 minutes, 0 seconds)"
                    ),
                ));
            }
            let position_kwh = r.decimal_or_zero("position_kwh")?;
            if position_kwh < Decimal::ZERO {
                return Err(r.err("position_kwh", "must not be negative"));
            }
            if position_kwh > MAX_POSITION_KWH {
                return Err(r.err(
                    "position_kwh",
                    format!("'{position_kwh}' is over {MAX_POSITION_KWH} kWh"),
                ));
            }
            Ok(PrepaidOpening {
                account_id: r.text("account_id")?,
                switched_at,
                balance: r.fen("balance")?,
                position_kwh,
                line: r.line,
            })
        },
        ONE_PARSE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each bad row's line and field, in file order.
    fn lines_and_fields(errors: &[RowError]) -> Vec<(u64, &str)> {
        errors.iter().map(|e| (e.line, e.field.as_str())).collect()
    }

    #[test]
    fn payment_times_read_without_chrono_equal_chrono_s_and_other_spellings_go_to_it() {
        for v in [
            "2026-10-01T09:51:53Z",
            "2000-02-29T00:00:00Z",
            "2026-12-31T23:59:59Z",
        ] {
            let chrono = DateTime::parse_from_rfc3339(v).unwrap().with_timezone(&Utc);
            assert_eq!(utc_seconds(v), Some(chrono), "{v}");
        }
        for v in [
            "2026-10-01T09:51:53+08:00",
            "2026-10-01t09:51:53z",
            "2026-10-01T09:51:53.5Z",
            "2026-12-31T23:59:60Z",
            "2026-02-30T00:00:00Z",
            "2026-10-01T24:00:00Z",
            "2026-10-01T0a:00:00Z",
        ] {
            assert_eq!(utc_seconds(v), None, "{v}");
        }
    }

    #[test]
    fn payments_of_more_than_fen_precision_or_absurd_size_are_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("payments.csv");
        std::fs::write(
            &path,
            "txn_id,channel,account_id,amount,paid_at\n\
             T1,bank,A1,100.50,2026-10-01T00:00:00Z\n\
             T2,bank,A1,10.00001,2026-10-01T00:00:00Z\n\
             T3,bank,A1,79228162514264337593543950335,2026-10-01T00:00:00Z\n\
             T4,bank,A1,1000000000,2026-10-01T00:00:00Z\n\
             T5,bank,A1,1000000000.01,2026-10-01T00:00:00Z\n",
        )
        .unwrap();
        let l = load_payments(&path).unwrap();
        let ids: Vec<&str> = l.rows.iter().map(|p| p.txn_id.as_str()).collect();
        assert_eq!(ids, ["T1", "T4"]);
        let bad = lines_and_fields(&l.errors);
        assert_eq!(bad, [(3, "amount"), (4, "amount"), (6, "amount")]);
    }

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
        let headers = Columns::new(&csv::StringRecord::from(vec!["installed_on"]));
        let row = |v: &str| {
            let rec = csv::StringRecord::from(vec![v]);
            let r = Row {
                file: path,
                line: 2,
                headers: &headers,
                seen: &Seen::default(),
                next: Default::default(),
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

    /// A parse of the meter fields a test file uses.
    fn meter_row(r: &Row) -> Result<(String, Decimal, NaiveDate), RowError> {
        Ok((
            r.text("meter_id")?,
            r.decimal("ct_ratio")?,
            r.date("installed_on")?,
        ))
    }

    #[test]
    fn a_file_parsed_in_chunks_gives_the_rows_errors_lines_and_hash_of_one_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meters.csv");
        let mut text = b"# exported 2026-12-06\nmeter_id,ct_ratio,installed_on\n".to_vec();
        for i in 0..200 {
            let row = match i % 37 {
                5 => format!("M{i},x,2026-01-01\n"),
                9 => "# a comment line\n".to_string(),
                11 => format!("M{i},1,2026-13-01\r\n"),
                _ => format!("M{i},{},2026-01-01\n", i % 4 + 1),
            };
            text.extend_from_slice(row.as_bytes());
            if i == 77 {
                text.extend_from_slice(b"M\xff77,1,2026-01-01\n");
            }
        }
        text.extend_from_slice(b"M_last,1,2026-01-01"); // no newline at the end
        std::fs::write(&p, &text).unwrap();
        let mut rdr = reader(true).from_path(&p).unwrap();
        let headers = Columns::new(rdr.headers().unwrap());
        let body = rdr.position().byte();
        assert_eq!(&text[body as usize..body as usize + 3], b"M0,");
        let one = load_sequential(&p, &headers, &meter_row).unwrap();
        assert_eq!(one.rows.len(), 200 - 18 + 1, "{:?}", one.errors);
        assert_eq!(one.errors.len(), 6 + 6 + 1);
        let utf8 = one
            .errors
            .iter()
            .find(|e| e.message.contains("malformed"))
            .unwrap();
        assert_eq!(utf8.line, 2 + 78 + 1, "header on line 2, then M0..M77");
        for chunk in [1, 7, 64, 300, 1 << 20] {
            let many = load_parallel(&p, text.len() as u64, body, &headers, &meter_row, chunk)
                .unwrap()
                .unwrap();
            assert_eq!(many.rows, one.rows, "chunk {chunk}");
            assert_eq!(many.errors, one.errors, "chunk {chunk}");
            assert_eq!((&many.sha256, many.bytes), (&one.sha256, one.bytes));
        }
        // A quoted field may span lines: such a file is parsed in one piece.
        text.extend_from_slice(b"\n\"M9\n99\",1,2026-01-01\n");
        std::fs::write(&p, &text).unwrap();
        let quoted = load_parallel(&p, text.len() as u64, body, &headers, &meter_row, 64);
        assert!(quoted.unwrap().is_none());
    }

    #[test]
    fn billing_loads_the_same_accounts_and_meters_in_chunks_as_in_one_parse() {
        let dir = tempfile::tempdir().unwrap();
        let (a, m) = (
            dir.path().join("accounts.csv"),
            dir.path().join("meters.csv"),
        );
        let mut accounts =
            String::from("account_id,name,customer_class,tariff_id,payment_mode,opened_on\n");
        let mut meters = String::from("meter_id,account_id,ct_ratio,pt_ratio,installed_on\n");
        for i in 0..400 {
            let class = if i % 53 == 7 { "retail" } else { "residential" };
            let tariff = ["bj", "gd", "ind"][i % 3];
            accounts.push_str(&format!(
                "A{i:04},王{i},{class},{tariff},prepaid,2020-01-0{}\n",
                i % 9 + 1
            ));
            let ct = if i % 61 == 5 { "0" } else { "40" };
            meters.push_str(&format!("M{i:04},A{i:04},{ct},1,2024-01-01\n"));
        }
        std::fs::write(&a, &accounts).unwrap();
        std::fs::write(&m, &meters).unwrap();
        let one = Chunking {
            min_bytes: u64::MAX,
            chunk_bytes: 0,
        };
        let many = Chunking {
            min_bytes: 0,
            chunk_bytes: 256,
        };
        let (a1, an) = (
            load_billing_accounts_in(&a, one).unwrap(),
            load_billing_accounts_in(&a, many).unwrap(),
        );
        assert_eq!(a1.rows, an.rows);
        assert_eq!(a1.errors, an.errors);
        assert_eq!(an.errors.len(), 8);
        assert_eq!((&a1.sha256, a1.bytes), (&an.sha256, an.bytes));
        // One shared tariff id per tariff, across chunks.
        let bj: Vec<_> = an.rows.iter().filter(|r| &*r.tariff_id == "bj").collect();
        assert!(bj.len() > 100);
        assert!(bj
            .iter()
            .all(|r| Arc::ptr_eq(&r.tariff_id, &bj[0].tariff_id)));
        let (m1, mn) = (
            load_meters_with(&m, |r, t| t.billing(r), one).unwrap(),
            load_meters_with(&m, |r, t| t.billing(r), many).unwrap(),
        );
        assert_eq!(m1.rows, mn.rows);
        assert_eq!(m1.errors, mn.errors);
        assert_eq!(mn.errors.len(), 7);
        assert_eq!(mn.errors[1].line, 5 + 61 + 2, "meter 66 on line 68");
    }

    #[test]
    fn opening_balances_are_bills_or_credits_and_bad_rows_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opening_balances.csv");
        std::fs::write(
            &path,
            "account_id,as_of,period,owed,due_date\n\
             A1,2026-09-30,2026-08,120.50,2026-09-15\n\
             A1,2026-09-30,,-30,\n\
             A2,2026-09-30,2026-08,-5,\n\
             A3,2026-09-30,,12.00,2026-09-15\n\
             A4,2026-09-30,2026-08,12.00,\n\
             A5,2026-09-30,2026-08,0,2026-09-15\n\
             A6,2026-09-30,2026-08,1.005,2026-09-15\n\
             A7,2026-09-30,,-5,2026-09-15\n\
             A8,,2026-08,5,2026-09-15\n",
        )
        .unwrap();
        let l = load_opening_balances(&path).unwrap();
        assert_eq!(l.rows.len(), 2);
        assert_eq!(l.rows[0].owed, Decimal::new(12050, 2));
        assert_eq!(
            l.rows[0].as_of,
            NaiveDate::from_ymd_opt(2026, 9, 30).unwrap()
        );
        assert_eq!(l.rows[0].line, 2);
        assert_eq!((l.rows[1].period.as_str(), l.rows[1].line), ("", 3));
        let errs = lines_and_fields(&l.errors);
        assert_eq!(
            errs,
            [
                (4, "period"),
                (5, "period"),
                (6, "due_date"),
                (7, "owed"),
                (8, "owed"),
                (9, "due_date"),
                (10, "as_of")
            ]
        );
    }

    #[test]
    fn prepaid_openings_switch_on_a_quarter_hour_and_bad_rows_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prepaid_balances.csv");
        std::fs::write(
            &path,
            "account_id,switched_at,balance,position_kwh\n\
             P1,2026-11-01T00:00:00+08:00,120.50,\n\
             P2,2026-10-16T00:00:00+08:00,-3.20,187.5\n\
             P3,2026-10-16T00:07:00+08:00,1,0\n\
             P4,2026-10-16,1,0\n\
             P5,2026-10-16T00:00:00+08:00,1.005,0\n\
             P6,2026-10-16T00:00:00+08:00,1,-2\n\
             ,2026-10-16T00:00:00+08:00,1,0\n",
        )
        .unwrap();
        let l = load_prepaid_openings(&path).unwrap();
        assert_eq!(l.rows.len(), 2);
        assert_eq!(
            l.rows[0].switched_at,
            "2026-10-31T16:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(l.rows[0].position_kwh, Decimal::ZERO);
        assert_eq!(l.rows[1].balance, Decimal::new(-320, 2));
        assert_eq!(
            (l.rows[1].position_kwh, l.rows[1].line),
            (Decimal::new(1875, 1), 3)
        );
        let errs = lines_and_fields(&l.errors);
        assert_eq!(
            errs,
            [
                (4, "switched_at"),
                (5, "switched_at"),
                (6, "balance"),
                (7, "position_kwh"),
                (8, "account_id")
            ]
        );
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
             M2,A1,residential_1p,0,1,2024-01-01,F-07\n\
             高压计量点-0000000001,户号-A000000000000000002,industrial_ct,40,100,2024-01-01,F-08\n\
             ,A3,residential_1p,1,1,2024-01-01,F-07\n",
        )
        .unwrap();
        let all = load_meters(&p).unwrap();
        let billing = load_meters_for_billing(&p).unwrap();
        assert_eq!(all.errors, billing.errors, "same validation");
        assert_eq!(all.rows[0].feeder, "F-07");
        let without: Vec<Meter> = all
            .rows
            .iter()
            .map(|m| Meter {
                meter_type: String::new(),
                feeder: String::new(),
                ..m.clone()
            })
            .collect();
        assert_eq!(billing.rows, without);
        // The bill run's rows, built straight from the CSV, hold the same
        // terms, ids longer than an inline id and not ASCII included.
        let rows = load_billing_meters(&p).unwrap();
        assert_eq!(rows.errors, all.errors, "same validation");
        let converted: Vec<BillingMeter> = all.rows.iter().map(BillingMeter::from).collect();
        assert_eq!(rows.rows, converted);
        assert_eq!(&*rows.rows[1].meter_id, "高压计量点-0000000001");
        assert_eq!(&*rows.rows[1].account_id, "户号-A000000000000000002");
        assert_eq!(rows.rows[1].multiplier, Decimal::from(4000));
    }

    #[test]
    fn billing_loads_the_same_accounts_without_personal_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts.csv");
        std::fs::write(
            &p,
            "account_id,name,phone,id_number,address,district,customer_class,tariff_id,payment_mode\n\
             A1,Wang Fang,13800138000,110101199003071234,1 Chang'an Ave,Dongcheng,residential,t,prepaid\n\
             A2,Li Lei,13900139000,110101199104081234,2 Jinrong St,Xicheng,retail,t,prepaid\n\
             户号-A000000000000000003,Zhao Min,,,,,residential,t,postpaid\n",
        )
        .unwrap();
        let all = load_accounts(&p).unwrap();
        let billing = load_accounts_for_billing(&p).unwrap();
        let prepay = load_accounts_without_personal(&p).unwrap();
        assert_eq!(all.errors, billing.errors, "same validation");
        assert_eq!(all.errors, prepay.errors, "same validation");
        assert_eq!(billing.rows.len(), 2);
        assert_eq!(all.rows[0].name, "Wang Fang");
        let converted: Vec<BillingAccount> = all.rows.iter().map(BillingAccount::from).collect();
        assert_eq!(billing.rows, converted);
        assert_eq!(&*billing.rows[1].account_id, "户号-A000000000000000003");
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
