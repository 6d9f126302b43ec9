//! Masking rules for personal fields. Masked values keep their length where
//! the rule says "mask the rest", so operators can still tell formats apart.

/// Two-character Chinese family names; every other name keeps one character.
const COMPOUND_SURNAMES: &[&str] = &[
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
    "夏侯", "令狐", "澹台", "轩辕",
];

/// Keeps the family name, masks the rest: `郭超` -> `郭*`, `欧阳娜娜` -> `欧阳**`.
/// Names written with spaces (Latin script) keep their last word: `Ada Lovelace` -> `*** Lovelace`.
pub fn mask_name(name: &str) -> String {
    let name = name.trim();
    if name.is_empty() {
        return String::new();
    }
    if name.contains(' ') {
        let words: Vec<&str> = name.split_whitespace().collect();
        let last = words.len() - 1;
        return words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == last {
                    (*w).to_string()
                } else {
                    "*".repeat(w.chars().count())
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    let keep = if COMPOUND_SURNAMES.iter().any(|s| name.starts_with(s)) && name.chars().count() > 2
    {
        2
    } else {
        1
    };
    let n = name.chars().count();
    if n <= keep {
        // A lone family name would be the whole name: mask it all.
        return "*".repeat(n);
    }
    name.chars()
        .take(keep)
        .chain(std::iter::repeat_n('*', n - keep))
        .collect()
}

/// Keeps the first 3 and last 4 digits: `18205525202` -> `182****5202`.
/// Fewer than 8 digits leave nothing worth keeping: all masked.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(|c| c.is_ascii_digit()).collect();
    keep_ends(&digits, 3, 4)
}

/// Keeps the first 3 and last 4 characters: `110108197507063515` -> `110***********3515`.
pub fn mask_id_number(id: &str) -> String {
    let chars: Vec<char> = id.trim().chars().collect();
    keep_ends(&chars, 3, 4)
}

fn keep_ends(chars: &[char], head: usize, tail: usize) -> String {
    let n = chars.len();
    if n < head + tail + 1 {
        return "*".repeat(n);
    }
    let mut out = String::with_capacity(n);
    out.extend(&chars[..head]);
    out.extend(std::iter::repeat_n('*', n - head - tail));
    out.extend(&chars[n - tail..]);
    out
}

/// Keeps the address up to and including its district:
/// `北京市海淀区望京街109号3单元798室` -> `北京市海淀区`. Without the district in
/// the text, cuts after the first `区` / `县` / `旗`; failing that keeps nothing.
pub fn mask_address(address: &str, district: &str) -> String {
    let district = district.trim();
    if !district.is_empty() {
        if let Some(i) = address.find(district) {
            return address[..i + district.len()].to_string();
        }
    }
    match address
        .char_indices()
        .find(|(_, c)| matches!(c, '区' | '县' | '旗'))
    {
        Some((i, c)) => address[..i + c.len_utf8()].to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_only_the_family_name() {
        assert_eq!(mask_name("郭超"), "郭*");
        assert_eq!(mask_name("王小明"), "王**");
        assert_eq!(mask_name("欧阳娜娜"), "欧阳**");
        assert_eq!(mask_name("Ada Lovelace"), "*** Lovelace");
        assert_eq!(mask_name("王"), "*");
        assert_eq!(mask_name(""), "");
    }

    #[test]
    fn phones_keep_three_and_four_digits() {
        assert_eq!(mask_phone("18205525202"), "182****5202");
        assert_eq!(mask_phone("182-0552-5202"), "182****5202");
        assert_eq!(mask_phone("1234567"), "*******");
    }

    #[test]
    fn id_numbers_keep_first_three_and_last_four() {
        assert_eq!(mask_id_number("110108197507063515"), "110***********3515");
        assert_eq!(mask_id_number("11010819750706351X"), "110***********351X");
        assert_eq!(mask_id_number("123"), "***");
    }

    #[test]
    fn addresses_are_cut_after_the_district() {
        assert_eq!(
            mask_address("北京市海淀区望京街109号3单元798室", "海淀区"),
            "北京市海淀区"
        );
        assert_eq!(
            mask_address("北京市丰台区中关村大街169号", ""),
            "北京市丰台区"
        );
        assert_eq!(mask_address("12 Main Street", ""), "");
    }

    #[test]
    fn masked_values_never_contain_the_raw_value() {
        for (raw, masked) in [
            ("18205525202", mask_phone("18205525202")),
            ("110108197507063515", mask_id_number("110108197507063515")),
            ("郭超", mask_name("郭超")),
        ] {
            assert!(!masked.contains(raw), "{masked} contains {raw}");
        }
    }
}
