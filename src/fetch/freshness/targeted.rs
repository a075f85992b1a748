//! `CDN-Cache-Control` (RFC 9213): a Cache-Control aimed at caches run by or for the content's owner,
//! which a gateway like cistern is. Its value is a Structured Field Dictionary (RFC 8941 §3.2); a value
//! that does not parse as one, or whose freshness directives are not Integers, is invalid and the
//! field is ignored as a whole (RFC 9213 §2.1), leaving Cache-Control in charge.

/// The directives of the response's `CDN-Cache-Control` field lines, in the shape of Cache-Control's
/// (name, value), or None when there is none or it is not valid.
pub fn directives(h: &http::HeaderMap) -> Option<Vec<(String, Option<String>)>> {
    let mut lines = h.get_all("cdn-cache-control").iter().peekable();
    lines.peek()?;
    // Several field lines are one value joined by commas (RFC 9110 §5.3).
    let mut joined = String::new();
    for (i, v) in lines.enumerate() {
        if i > 0 {
            joined.push(',');
        }
        joined.push_str(v.to_str().ok()?);
    }
    let ds = dictionary(&joined)?;
    let integer_valued = [
        "max-age",
        "s-maxage",
        "stale-while-revalidate",
        "stale-if-error",
    ];
    for (name, item) in &ds {
        if integer_valued.contains(&name.as_str()) && !matches!(item, Item::Integer(_)) {
            return None;
        }
    }
    Some(
        ds.into_iter()
            .map(|(name, item)| {
                let value = match item {
                    Item::Integer(n) => Some(n.to_string()),
                    Item::Text(s) => Some(s),
                    Item::True => None,
                    Item::Other => Some(String::new()),
                };
                (name, value)
            })
            .collect(),
    )
}

/// A member's value, as far as cache directives care.
#[derive(Debug, PartialEq)]
enum Item {
    Integer(u64),
    /// A string or a token.
    Text(String),
    /// A bare key (Boolean true).
    True,
    /// Anything else that parses (a decimal, a negative integer, bytes, false, an inner list).
    Other,
}

/// Parses an sf-dictionary (RFC 8941 §4.2.2). None when it does not parse.
fn dictionary(v: &str) -> Option<Vec<(String, Item)>> {
    let mut p = Parser {
        s: v.as_bytes(),
        at: 0,
    };
    let mut out: Vec<(String, Item)> = Vec::new();
    p.skip(b' ');
    if p.done() {
        return None;
    }
    loop {
        let key = p.key()?;
        let item = if p.eat(b'=') {
            if p.peek() == Some(b'(') {
                p.inner_list()?;
                Item::Other
            } else {
                p.bare_item()?
            }
        } else {
            Item::True
        };
        p.parameters()?;
        // A key given twice: the last value wins (RFC 8941 §4.2.2).
        out.retain(|(k, _)| *k != key);
        out.push((key, item));
        p.skip_ows();
        if p.done() {
            return Some(out);
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        if p.done() {
            return None;
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at >= self.s.len()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.at += usize::from(hit);
        hit
    }

    fn skip(&mut self, c: u8) {
        while self.eat(c) {}
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn take_while(&mut self, ok: impl Fn(u8) -> bool) -> &str {
        let start = self.at;
        while self.peek().is_some_and(&ok) {
            self.at += 1;
        }
        std::str::from_utf8(&self.s[start..self.at]).unwrap_or("")
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<String> {
        if !self
            .peek()
            .is_some_and(|c| c.is_ascii_lowercase() || c == b'*')
        {
            return None;
        }
        let k = self
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c));
        Some(k.to_string())
    }

    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip(b' ');
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn inner_list(&mut self) -> Option<()> {
        self.eat(b'(');
        loop {
            self.skip(b' ');
            if self.eat(b')') {
                return self.parameters();
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().map(Item::Text),
            b':' => {
                self.at += 1;
                self.take_while(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c));
                self.eat(b':').then_some(Item::Other)
            }
            b'?' => {
                self.at += 1;
                let b = self.peek();
                self.at += 1;
                matches!(b, Some(b'0' | b'1')).then_some(Item::Other)
            }
            c if c.is_ascii_alphabetic() || c == b'*' => {
                let t = self
                    .take_while(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c));
                Some(Item::Text(t.to_string()))
            }
            _ => None,
        }
    }

    /// sf-integer (at most 15 digits) or sf-decimal (at most 12 digits, a dot, 1 to 3 digits).
    fn number(&mut self) -> Option<Item> {
        let negative = self.eat(b'-');
        let int = self.take_while(|c| c.is_ascii_digit()).to_string();
        if int.is_empty() {
            return None;
        }
        if self.eat(b'.') {
            let frac = self.take_while(|c| c.is_ascii_digit());
            let ok = int.len() <= 12 && (1..=3).contains(&frac.len());
            return ok.then_some(Item::Other);
        }
        if int.len() > 15 {
            return None;
        }
        let n: u64 = int.parse().ok()?;
        Some(if negative {
            Item::Other
        } else {
            Item::Integer(n)
        })
    }

    fn string(&mut self) -> Option<String> {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            match self.peek()? {
                b'\\' => {
                    self.at += 1;
                    let c = self.peek().filter(|c| *c == b'"' || *c == b'\\')?;
                    out.push(c as char);
                }
                b'"' => {
                    self.at += 1;
                    return Some(out);
                }
                c if (0x20..0x7f).contains(&c) => out.push(c as char),
                _ => return None,
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdn(v: &str) -> Option<Vec<(String, Option<String>)>> {
        let mut h = http::HeaderMap::new();
        h.insert("cdn-cache-control", v.parse().unwrap());
        directives(&h)
    }

    #[test]
    fn valid_fields_give_their_directives() {
        let ds = cdn("foobar, max-age=3600, no-cache=\"set-cookie\"").unwrap();
        assert_eq!(
            ds,
            vec![
                ("foobar".to_string(), None),
                ("max-age".to_string(), Some("3600".to_string())),
                ("no-cache".to_string(), Some("set-cookie".to_string())),
            ]
        );
        assert!(cdn("private").is_some());
        assert!(cdn("max-age=99999999999").is_some());
        assert!(cdn("a=1.5, b=?0, c=:AQ==:, d=(1 2);x=y, e;p").is_some());
        assert!(directives(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn invalid_fields_are_ignored_whole() {
        for v in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "MaX-aGe=3600",
            "max-age =100",
            "max-age= 100",
            "max-age=1,",
            "",
            "max-age=1234567890123456",
        ] {
            assert_eq!(cdn(v), None, "{v:?}");
        }
    }
}
