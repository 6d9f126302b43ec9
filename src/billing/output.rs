//! Arrow schemas and Parquet encoding of the bill run's outputs:
//! `bills`, `bill_lines`, `exceptions`, `arrears` (docs/billing.md).

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rust_decimal::Decimal;

use super::account::AccountBill;
use super::arrears::AccountArrears;
use super::engine::ExceptionRow;
use super::flags::Flags;
use crate::store::dict::DictText;
use crate::tariff::price::LineKind;
use crate::tariff::TariffSet;

pub const AMOUNT: (u8, i8) = (18, 2);
pub const QTY: (u8, i8) = (28, 6);
pub const PRICE: (u8, i8) = (18, 6);
pub const KWH: (u8, i8) = (28, 4);
/// Sums of payments (and the credit left of them): wider than one amount.
pub const SUM: (u8, i8) = (28, 2);

fn dec_t(p: (u8, i8)) -> DataType {
    DataType::Decimal128(p.0, p.1)
}

/// Writer settings of the run's outputs: the store's, without min/max
/// statistics on the text columns other than `account_id` and `meter_id`.
/// Those are constant (`run_id`, `period`) or take a handful of values in
/// every row group (`kind`, `tariff_id`, ...), so their statistics never
/// prune a row group, and computing them compared every value in the
/// `bill_lines` writer, the thread that paces the bill phase. And zstd at
/// level 1, not the store's 3: on the 1M run's outputs it took about 1.5%
/// less CPU for files within 1% of the size (arrears and bills smaller,
/// lines larger).
pub fn writer_properties(schema: &Schema) -> parquet::file::properties::WriterProperties {
    let mut b =
        crate::store::atomic::base_properties().set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::try_new(1).expect("valid zstd level"),
        ));
    for f in schema.fields() {
        if f.data_type() == &DataType::Utf8
            && !matches!(f.name().as_str(), "account_id" | "meter_id")
        {
            b = b.set_column_statistics_enabled(
                parquet::schema::types::ColumnPath::from(f.name().as_str()),
                parquet::file::properties::EnabledStatistics::None,
            );
        }
    }
    b.build()
}

pub fn bills_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("tariff_id", DataType::Utf8, false),
        Field::new("tariff_versions", DataType::Utf8, false),
        Field::new("days", DataType::Int32, false),
        Field::new("kwh", dec_t(KWH), false),
        Field::new("total", dec_t(AMOUNT), false),
        Field::new("line_count", DataType::Int32, false),
        Field::new("estimated", DataType::Boolean, false),
        Field::new("flags", DataType::Utf8, false),
        Field::new("ytd_kwh_before", dec_t(KWH), true),
        Field::new("ytd_kwh_after", dec_t(KWH), true),
        Field::new("power_factor", dec_t((5, 2)), true),
        Field::new("max_demand_kw", dec_t(KWH), true),
        Field::new("issued_total", dec_t(AMOUNT), true),
        Field::new("adjustment", dec_t(AMOUNT), true),
        Field::new("due_date", DataType::Utf8, true),
    ]))
}

pub fn lines_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("line_no", DataType::Int32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("tier", DataType::Int32, true),
        Field::new("tou_period", DataType::Utf8, true),
        Field::new("quantity", dec_t(QTY), false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("unit_price", dec_t(PRICE), false),
        Field::new("amount", dec_t(AMOUNT), false),
        Field::new("tariff_id", DataType::Utf8, false),
        Field::new("tariff_version", DataType::Utf8, false),
        Field::new("flags", DataType::Utf8, false),
        Field::new("is_adjustment", DataType::Boolean, false),
    ]))
}

pub fn exceptions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("meter_id", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
    ]))
}

/// `arrears`: one row per bill still (partly) unpaid at `as_of`, or one row
/// with null bill columns for an account that owes nothing; the account's
/// columns repeat on each of its rows (docs/billing.md).
pub fn arrears_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("as_of", DataType::Utf8, false),
        Field::new("account_id", DataType::Utf8, false),
        Field::new("bill_period", DataType::Utf8, true),
        Field::new("due_date", DataType::Utf8, true),
        Field::new("amount", dec_t(AMOUNT), true),
        Field::new("unpaid", dec_t(AMOUNT), true),
        Field::new("credit", dec_t(SUM), false),
        Field::new("paid_count", DataType::Int64, false),
        Field::new("paid_sum", dec_t(SUM), false),
        Field::new("last_paid_on", DataType::Utf8, true),
        Field::new("history_from", DataType::Utf8, true),
        Field::new("last_due", DataType::Utf8, true),
    ]))
}

/// Writer settings of `arrears`: the outputs', with the revisions the state
/// reflects in the file's key-value metadata.
pub fn arrears_properties(
    seen: &std::collections::BTreeSet<String>,
    runs: &std::collections::BTreeMap<std::path::PathBuf, usize>,
    run_dir: &std::path::Path,
) -> parquet::file::properties::WriterProperties {
    use parquet::file::metadata::KeyValue;
    let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
    writer_properties(&arrears_schema())
        .into_builder()
        .set_key_value_metadata(Some(vec![
            KeyValue::new(super::arrears::SEEN_KEY.to_string(), seen.join(",")),
            KeyValue::new(
                super::arrears::RUNS_KEY.to_string(),
                super::arrears::runs_metadata(runs, run_dir),
            ),
        ]))
        .build()
}

/// Rows of `arrears` for accounts in id order (an account carried unchanged
/// keeps its own `as_of`).
pub fn arrears_batch(
    run_id: &str,
    period: &str,
    as_of: chrono::NaiveDate,
    rows: &[(&str, &AccountArrears)],
) -> RecordBatch {
    let n = rows.iter().map(|(_, a)| a.open.len().max(1)).sum();
    let days = DayTexts::new(rows.iter().flat_map(|(_, a)| {
        let bills = a.open.iter().map(|b| b.bill.due);
        [a.as_of, a.counted.last, a.history_from, a.last_due]
            .into_iter()
            .flatten()
            .chain(bills)
            .chain([as_of])
    }));
    let date = |d| days.get(d);
    let text = || DictText::with_capacity(n);
    let (mut run, mut per, mut day) = (text(), text(), text());
    let mut acc = StringBuilder::with_capacity(n, n * 12);
    let (mut bp, mut due) = (text(), text());
    let (mut last_paid, mut from, mut last_due) = (text(), text(), text());
    let (mut amount, mut unpaid) = (dec_builder(n, AMOUNT), dec_builder(n, AMOUNT));
    let (mut credit, mut paid_sum) = (dec_builder(n, SUM), dec_builder(n, SUM));
    let mut paid_count = Int64Builder::with_capacity(n);
    for (account, a) in rows {
        let bills: Vec<Option<&super::arrears::OpenBill>> = if a.open.is_empty() {
            vec![None]
        } else {
            a.open.iter().map(Some).collect()
        };
        for b in bills {
            run.push(run_id);
            per.push(period);
            day.push(date(Some(a.as_of.unwrap_or(as_of))).unwrap_or_default());
            acc.append_value(account);
            bp.push_opt(b.map(|b| b.bill.period.as_str()));
            due.push_opt(date(b.map(|b| b.bill.due)));
            amount.append_option(b.map(|b| to_i128(b.bill.amount, AMOUNT.1)));
            unpaid.append_option(b.map(|b| to_i128(b.unpaid, AMOUNT.1)));
            credit.append_value(to_i128(a.credit, SUM.1));
            paid_count.append_value(i64::try_from(a.counted.count).unwrap_or(i64::MAX));
            paid_sum.append_value(to_i128(a.counted.sum, SUM.1));
            last_paid.push_opt(date(a.counted.last));
            from.push_opt(date(a.history_from));
            last_due.push_opt(date(a.last_due));
        }
    }
    let cols: Vec<ArrayRef> = vec![
        run.finish(),
        per.finish(),
        day.finish(),
        Arc::new(acc.finish()),
        bp.finish(),
        due.finish(),
        Arc::new(amount.finish()),
        Arc::new(unpaid.finish()),
        Arc::new(credit.finish()),
        Arc::new(paid_count.finish()),
        Arc::new(paid_sum.finish()),
        last_paid.finish(),
        from.finish(),
        last_due.finish(),
    ];
    RecordBatch::try_new(arrears_batch_schema(), cols).expect("columns match schema")
}

/// The texts of the days a batch's date columns hold: they take a few
/// dozen values, so each is formatted once, not per row.
struct DayTexts(std::collections::BTreeMap<chrono::NaiveDate, String>);

impl DayTexts {
    fn new(days: impl IntoIterator<Item = chrono::NaiveDate>) -> DayTexts {
        let mut texts = std::collections::BTreeMap::new();
        for d in days {
            texts.entry(d).or_insert_with(|| d.to_string());
        }
        DayTexts(texts)
    }

    fn get(&self, day: Option<chrono::NaiveDate>) -> Option<&str> {
        day.and_then(|d| self.0.get(&d)).map(String::as_str)
    }
}

/// [`arrears_schema`] with the text columns [`arrears_batch`] builds as keys
/// typed as dictionaries (the file holds `arrears_schema`).
pub fn arrears_batch_schema() -> SchemaRef {
    static S: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        with_dictionaries(
            &arrears_schema(),
            &[
                "run_id",
                "period",
                "as_of",
                "bill_period",
                "due_date",
                "last_paid_on",
                "history_from",
                "last_due",
            ],
        )
    })
    .clone()
}

/// `d` as a column of `scale` stores it.
pub fn as_written(d: Decimal, scale: i8) -> Decimal {
    Decimal::try_from_i128_with_scale(to_i128(d, scale), scale.max(0) as u32).unwrap_or(d)
}

/// Decimal to a scaled i128 at `scale`, rounding half away from zero beyond it.
pub fn to_i128(d: Decimal, scale: i8) -> i128 {
    // Most values already fit the scale: widen the mantissa, no rounding.
    let (have, want) = (d.scale(), scale as u32);
    if have <= want {
        if let Some(m) = 10i128
            .checked_pow(want - have)
            .and_then(|f| d.mantissa().checked_mul(f))
        {
            return m;
        }
    }
    let mut r = d.round_dp_with_strategy(
        scale as u32,
        rust_decimal::RoundingStrategy::MidpointAwayFromZero,
    );
    r.rescale(scale as u32);
    r.mantissa()
}

fn dec_builder(cap: usize, p: (u8, i8)) -> Decimal128Builder {
    Decimal128Builder::with_capacity(cap)
        .with_precision_and_scale(p.0, p.1)
        .expect("valid decimal type")
}

/// One output line (a priced line, or an adjustment against an issued one).
#[derive(Debug, Clone, PartialEq)]
pub struct OutLine<'a> {
    pub kind: LineKind,
    pub label: Cow<'a, str>,
    pub tier: Option<i32>,
    pub tou_period: Option<Cow<'a, str>>,
    pub quantity: Decimal,
    pub unit: &'static str,
    pub unit_price: Decimal,
    pub amount: Decimal,
    pub tariff_version: Cow<'a, str>,
    /// The tariff of a line reversed by a revision when it is not the
    /// bill's own (the account moved to another tariff); None: the bill's.
    pub tariff: Option<&'a str>,
    pub flags: Flags,
    pub is_adjustment: bool,
}

/// The lines of a bill in output form.
/// Labels and versions are borrowed from `tariffs`.
pub fn out_lines<'a>(b: &AccountBill, tariffs: &'a TariffSet) -> Vec<OutLine<'a>> {
    let t = tariffs.get(&b.tariff_id).expect("billed with this tariff");
    b.lines
        .iter()
        .map(|l| {
            let v = &t.versions[l.version_index];
            let i = l.line.index as i32;
            OutLine {
                kind: l.line.kind,
                label: l.line.label(v),
                tier: matches!(l.line.kind, LineKind::Energy | LineKind::TierSurcharge)
                    .then_some(i + 1)
                    .filter(|_| v.tiers.is_some()),
                tou_period: (l.line.kind == LineKind::Period).then(|| l.line.label(v)),
                quantity: l.line.quantity,
                unit: l.line.unit(v),
                unit_price: l.line.unit_price,
                amount: l.line.amount,
                tariff_version: v.id.as_str().into(),
                tariff: None,
                flags: l.flags,
                is_adjustment: false,
            }
        })
        .collect()
}

/// A bill row ready for output (issued/adjustment set on revisions).
pub struct OutBill<'a> {
    pub bill: &'a AccountBill,
    pub total: Decimal,
    pub line_count: usize,
    pub issued_total: Option<Decimal>,
    pub adjustment: Option<Decimal>,
    /// Postpaid accounts with a late-fee rule: the day after which the bill is overdue.
    pub due_date: Option<chrono::NaiveDate>,
}

pub fn bills_batch<'a>(run_id: &'a str, period: &'a str, rows: &[OutBill<'a>]) -> RecordBatch {
    let n = rows.len();
    let mut run = DictText::with_capacity(n);
    let mut per = DictText::with_capacity(n);
    let mut acc = StringBuilder::with_capacity(n, n * 12);
    let mut tar = DictText::with_capacity(n);
    let mut ver = DictText::with_capacity(n);
    let mut days = Int32Builder::with_capacity(n);
    let mut kwh = dec_builder(n, KWH);
    let mut total = dec_builder(n, AMOUNT);
    let mut lc = Int32Builder::with_capacity(n);
    let mut est = BooleanBuilder::with_capacity(n);
    let mut flags = DictText::with_capacity(n);
    let mut yb = dec_builder(n, KWH);
    let mut ya = dec_builder(n, KWH);
    let mut pf = dec_builder(n, (5, 2));
    let mut md = dec_builder(n, KWH);
    let mut it = dec_builder(n, AMOUNT);
    let mut adj = dec_builder(n, AMOUNT);
    let dues = DayTexts::new(rows.iter().filter_map(|r| r.due_date));
    let mut due = DictText::with_capacity(n);
    for r in rows {
        let b = r.bill;
        run.push(run_id);
        per.push(period);
        acc.append_value(&b.account_id);
        tar.push(&b.tariff_id);
        ver.push(&b.versions);
        days.append_value(b.days as i32);
        kwh.append_value(to_i128(b.kwh, KWH.1));
        total.append_value(to_i128(r.total, AMOUNT.1));
        lc.append_value(r.line_count as i32);
        est.append_value(b.flags.contains(Flags::ESTIMATED));
        flags.push_cow(&b.flags.text());
        yb.append_option(b.ytd_before.map(|x| to_i128(x, KWH.1)));
        ya.append_option(b.ytd_after.map(|x| to_i128(x, KWH.1)));
        pf.append_option(b.power_factor.map(|x| to_i128(x, 2)));
        md.append_option(b.max_demand_kw.map(|x| to_i128(x, KWH.1)));
        it.append_option(r.issued_total.map(|x| to_i128(x, AMOUNT.1)));
        adj.append_option(r.adjustment.map(|x| to_i128(x, AMOUNT.1)));
        due.push_opt(dues.get(r.due_date));
    }
    let cols: Vec<ArrayRef> = vec![
        run.finish(),
        per.finish(),
        Arc::new(acc.finish()),
        tar.finish(),
        ver.finish(),
        Arc::new(days.finish()),
        Arc::new(kwh.finish()),
        Arc::new(total.finish()),
        Arc::new(lc.finish()),
        Arc::new(est.finish()),
        flags.finish(),
        Arc::new(yb.finish()),
        Arc::new(ya.finish()),
        Arc::new(pf.finish()),
        Arc::new(md.finish()),
        Arc::new(it.finish()),
        Arc::new(adj.finish()),
        due.finish(),
    ];
    RecordBatch::try_new(bills_batch_schema(), cols).expect("columns match schema")
}

/// Builder of `bill_lines` batches. The repeating text columns are built as
/// dictionary keys (`store::dict`): labels, versions and units are borrowed
/// from the tariffs for `'a`, so most rows find their key by address.
pub struct LinesBuilder<'a> {
    run: DictText<'a>,
    per: DictText<'a>,
    acc: StringBuilder,
    no: Int32Builder,
    kind: DictText<'a>,
    label: DictText<'a>,
    tier: Int32Builder,
    period: DictText<'a>,
    qty: Decimal128Builder,
    unit: DictText<'a>,
    price: Decimal128Builder,
    amount: Decimal128Builder,
    tariff: DictText<'a>,
    version: DictText<'a>,
    flags: DictText<'a>,
    adj: BooleanBuilder,
    pub rows: usize,
}

impl<'a> LinesBuilder<'a> {
    pub fn new(cap: usize) -> LinesBuilder<'a> {
        LinesBuilder {
            run: DictText::with_capacity(cap),
            per: DictText::with_capacity(cap),
            acc: StringBuilder::with_capacity(cap, cap * 10),
            no: Int32Builder::with_capacity(cap),
            kind: DictText::with_capacity(cap),
            label: DictText::with_capacity(cap),
            tier: Int32Builder::with_capacity(cap),
            period: DictText::with_capacity(cap),
            qty: dec_builder(cap, QTY),
            unit: DictText::with_capacity(cap),
            price: dec_builder(cap, PRICE),
            amount: dec_builder(cap, AMOUNT),
            tariff: DictText::with_capacity(cap),
            version: DictText::with_capacity(cap),
            flags: DictText::with_capacity(cap),
            adj: BooleanBuilder::with_capacity(cap),
            rows: 0,
        }
    }

    pub fn push(
        &mut self,
        run_id: &'a str,
        period: &'a str,
        account: &str,
        tariff: &'a str,
        no: usize,
        l: &OutLine<'a>,
    ) {
        self.run.push(run_id);
        self.per.push(period);
        self.acc.append_value(account);
        self.no.append_value(no as i32);
        self.kind.push(l.kind.as_str());
        self.label.push_cow(&l.label);
        self.tier.append_option(l.tier);
        match &l.tou_period {
            Some(p) => self.period.push_cow(p),
            None => self.period.push_null(),
        }
        self.qty.append_value(to_i128(l.quantity, QTY.1));
        self.unit.push(l.unit);
        self.price.append_value(to_i128(l.unit_price, PRICE.1));
        self.amount.append_value(to_i128(l.amount, AMOUNT.1));
        self.tariff.push(tariff);
        self.version.push_cow(&l.tariff_version);
        self.flags.push_cow(&l.flags.text());
        self.adj.append_value(l.is_adjustment);
        self.rows += 1;
    }

    pub fn finish(self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            self.run.finish(),
            self.per.finish(),
            Arc::new({ self.acc }.finish()),
            Arc::new({ self.no }.finish()),
            self.kind.finish(),
            self.label.finish(),
            Arc::new({ self.tier }.finish()),
            self.period.finish(),
            Arc::new({ self.qty }.finish()),
            self.unit.finish(),
            Arc::new({ self.price }.finish()),
            Arc::new({ self.amount }.finish()),
            self.tariff.finish(),
            self.version.finish(),
            self.flags.finish(),
            Arc::new({ self.adj }.finish()),
        ];
        RecordBatch::try_new(lines_batch_schema(), cols).expect("columns match schema")
    }
}

/// [`bills_schema`] with the text columns [`bills_batch`] builds as keys
/// typed as dictionaries (the file holds `bills_schema`).
pub fn bills_batch_schema() -> SchemaRef {
    static S: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        with_dictionaries(
            &bills_schema(),
            &[
                "run_id",
                "period",
                "tariff_id",
                "tariff_versions",
                "flags",
                "due_date",
            ],
        )
    })
    .clone()
}

/// [`lines_schema`] with the text columns [`LinesBuilder`] builds as keys
/// typed as dictionaries (the file holds `lines_schema`).
pub fn lines_batch_schema() -> SchemaRef {
    static S: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        with_dictionaries(
            &lines_schema(),
            &[
                "run_id",
                "period",
                "kind",
                "label",
                "tou_period",
                "unit",
                "tariff_id",
                "tariff_version",
                "flags",
            ],
        )
    })
    .clone()
}

fn with_dictionaries(plain: &Schema, names: &[&str]) -> SchemaRef {
    Arc::new(Schema::new(
        plain
            .fields()
            .iter()
            .map(|f| {
                if names.contains(&f.name().as_str()) {
                    Field::new(f.name(), crate::store::dict::dict_type(), f.is_nullable())
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ))
}

pub fn exceptions_batch(run_id: &str, period: &str, rows: &[ExceptionRow]) -> RecordBatch {
    let n = rows.len();
    let mut b: Vec<StringBuilder> = (0..6)
        .map(|_| StringBuilder::with_capacity(n, n * 16))
        .collect();
    for r in rows {
        for (i, v) in [
            run_id,
            period,
            &r.account_id,
            &r.meter_id,
            &r.code,
            &r.detail,
        ]
        .iter()
        .enumerate()
        {
            b[i].append_value(v);
        }
    }
    let cols: Vec<ArrayRef> = b
        .iter_mut()
        .map(|x| Arc::new(x.finish()) as ArrayRef)
        .collect();
    RecordBatch::try_new(exceptions_schema(), cols).expect("columns match schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::properties::EnabledStatistics;
    use parquet::schema::types::ColumnPath;

    #[test]
    fn only_the_id_columns_of_the_outputs_keep_text_statistics() {
        let p = writer_properties(&lines_schema());
        let stats = |c: &str| p.statistics_enabled(&ColumnPath::from(c));
        assert_eq!(stats("kind"), EnabledStatistics::None);
        assert_eq!(stats("run_id"), EnabledStatistics::None);
        assert_eq!(stats("tariff_id"), EnabledStatistics::None);
        assert_ne!(stats("account_id"), EnabledStatistics::None);
        assert_ne!(stats("amount"), EnabledStatistics::None);
        let e = writer_properties(&exceptions_schema());
        assert_ne!(
            e.statistics_enabled(&ColumnPath::from("meter_id")),
            EnabledStatistics::None
        );
    }

    #[test]
    fn the_outputs_are_zstd_level_1_where_the_lake_is_level_3() {
        use parquet::basic::{Compression, ZstdLevel};
        let zstd = |l| Compression::ZSTD(ZstdLevel::try_new(l).unwrap());
        for schema in [bills_schema(), lines_schema(), arrears_schema()] {
            let p = writer_properties(&schema);
            for f in schema.fields() {
                assert_eq!(p.compression(&ColumnPath::from(f.name().as_str())), zstd(1));
            }
        }
        let lake = crate::store::atomic::base_properties().build();
        assert_eq!(lake.compression(&ColumnPath::from("meter_id")), zstd(3));
    }

    #[test]
    fn decimals_widen_exactly_and_round_half_away_from_zero_beyond_the_scale() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(to_i128(d("12.5"), 2), 1250);
        assert_eq!(to_i128(d("-0.5"), 6), -500_000);
        assert_eq!(to_i128(d("7"), 0), 7);
        assert_eq!(to_i128(d("1.005"), 2), 101);
        assert_eq!(to_i128(d("-1.005"), 2), -101);
        assert_eq!(to_i128(d("1.004"), 2), 100);
        assert_eq!(to_i128(d("0.000"), 2), 0);
        // The widest Decimal at scale 0 times 10^6 still fits an i128.
        assert_eq!(
            to_i128(Decimal::MAX, 6),
            Decimal::MAX.mantissa() * 1_000_000
        );
    }
}
