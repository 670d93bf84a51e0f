//! A JSON reader that keeps locations.
//!
//! Azure Resource Manager accepts JSON with `//` and `/* */` comments, and users paste templates
//! with trailing commas. serde_json does neither and forgets where a value came from, so kiln
//! reads templates with this small parser: every value and every object key carries its byte
//! span, [`LineIndex`] turns spans into `line:column`, and nesting depth is bounded so hostile
//! input (50 MB of `[`) fails fast instead of overflowing the stack.

use std::fmt;

/// The deepest nesting accepted. Real templates stay under 20.
pub const MAX_DEPTH: usize = 256;

/// A half-open byte range `start..end` in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// A span over `start..end`.
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
}

/// A JSON value with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it stands in the source (for a value produced by evaluation: the expression's span).
    pub span: Span,
}

/// An object member key with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key text, unescaped.
    pub name: String,
    /// The span of the quoted key.
    pub span: Span,
}

/// The JSON data model, objects keeping their member order (and duplicates, which the validator
/// reports).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, as serde_json keeps it.
    Number(serde_json::Number),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Node>),
    /// An object.
    Object(Vec<(Key, Node)>),
}

impl Value {
    /// The JSON type's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

impl Node {
    /// A node at `span`.
    pub fn new(value: Value, span: Span) -> Node {
        Node { value, span }
    }

    /// The member `name` of an object (exact case), if this is an object that has it.
    pub fn get(&self, name: &str) -> Option<&Node> {
        match &self.value {
            Value::Object(m) => m.iter().find(|(k, _)| k.name == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The member `name` of an object, compared ignoring ASCII case.
    pub fn get_ci(&self, name: &str) -> Option<(&Key, &Node)> {
        match &self.value {
            Value::Object(m) => m
                .iter()
                .find(|(k, _)| k.name.eq_ignore_ascii_case(name))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Converts to a plain `serde_json::Value` (last duplicate key wins, as in serde_json).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => serde_json::Value::Number(n.clone()),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Node::to_json).collect()),
            Value::Object(m) => {
                let mut o = serde_json::Map::new();
                for (k, v) in m {
                    o.insert(k.name.clone(), v.to_json());
                }
                serde_json::Value::Object(o)
            }
        }
    }

    /// Builds a node tree from a plain value, every node at `span`.
    pub fn from_json(v: &serde_json::Value, span: Span) -> Node {
        let value = match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Number(n.clone()),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(a) => {
                Value::Array(a.iter().map(|e| Node::from_json(e, span)).collect())
            }
            serde_json::Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        (
                            Key {
                                name: k.clone(),
                                span,
                            },
                            Node::from_json(v, span),
                        )
                    })
                    .collect(),
            ),
        };
        Node { value, span }
    }
}

/// Something the parser accepted but ARM's strict JSON would not, or that looks accidental.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseNote {
    /// Where.
    pub span: Span,
    /// What.
    pub message: String,
}

/// Why the text is not JSON.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// Where the parser stopped.
    pub span: Span,
    /// What it expected or found.
    pub message: String,
}

/// The result of a successful parse.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The document's root value.
    pub root: Node,
    /// Trailing commas and similar accepted oddities.
    pub notes: Vec<ParseNote>,
}

/// Parses `src` (already checked to be UTF-8) as JSON with comments.
pub fn parse(src: &str) -> Result<Parsed, ParseError> {
    let mut p = Parser {
        src,
        bytes: src.as_bytes(),
        pos: 0,
        notes: Vec::new(),
    };
    // A UTF-8 byte order mark is tolerated, as ARM does.
    if p.bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        p.pos = 3;
    }
    p.skip_ws()?;
    if p.pos >= p.bytes.len() {
        return Err(p.err(p.pos, p.pos, "the file is empty: expected a JSON object"));
    }
    let root = p.value(0)?;
    p.skip_ws()?;
    if p.pos < p.bytes.len() {
        return Err(p.err(
            p.pos,
            p.pos + 1,
            "unexpected text after the end of the JSON document",
        ));
    }
    Ok(Parsed {
        root,
        notes: p.notes,
    })
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    notes: Vec<ParseNote>,
}

impl<'a> Parser<'a> {
    fn err(&self, start: usize, end: usize, msg: impl Into<String>) -> ParseError {
        let end = end.min(self.bytes.len()).max(start);
        ParseError {
            span: Span::new(start, end),
            message: msg.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) -> Result<(), ParseError> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.pos += 1,
                Some(b'/') => match self.bytes.get(self.pos + 1) {
                    Some(b'/') => {
                        while let Some(c) = self.peek() {
                            if c == b'\n' {
                                break;
                            }
                            self.pos += 1;
                        }
                    }
                    Some(b'*') => {
                        let start = self.pos;
                        self.pos += 2;
                        loop {
                            match self.peek() {
                                None => {
                                    return Err(self.err(
                                        start,
                                        start + 2,
                                        "unterminated /* comment",
                                    ))
                                }
                                Some(b'*') if self.bytes.get(self.pos + 1) == Some(&b'/') => {
                                    self.pos += 2;
                                    break;
                                }
                                Some(_) => self.pos += 1,
                            }
                        }
                    }
                    _ => return Ok(()),
                },
                _ => return Ok(()),
            }
        }
    }

    fn describe_here(&self) -> String {
        match self.src[self.pos..].chars().next() {
            None => "the end of the file".to_string(),
            Some(c) => format!("`{c}`"),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, ParseError> {
        if depth >= MAX_DEPTH {
            return Err(self.err(
                self.pos,
                self.pos + 1,
                format!("nesting deeper than {MAX_DEPTH} levels: this is not an image template"),
            ));
        }
        let start = self.pos;
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => {
                let s = self.string()?;
                Ok(Node::new(Value::String(s), Span::new(start, self.pos)))
            }
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'\'') => Err(self.err(
                start,
                start + 1,
                "single-quoted string: JSON strings use double quotes",
            )),
            _ => Err(self.err(
                start,
                start + 1,
                format!("expected a value, found {}", self.describe_here()),
            )),
        }
    }

    fn word(&mut self, w: &str, v: Value) -> Result<Node, ParseError> {
        let start = self.pos;
        if self.src[self.pos..].starts_with(w) {
            self.pos += w.len();
            Ok(Node::new(v, Span::new(start, self.pos)))
        } else {
            let end = self.src[start..]
                .find(|c: char| !c.is_ascii_alphanumeric())
                .map_or(self.bytes.len(), |i| start + i);
            Err(self.err(
                start,
                end.max(start + 1),
                format!(
                    "expected a value, found `{}`",
                    &self.src[start..end.max(start + 1)]
                ),
            ))
        }
    }

    fn number(&mut self) -> Result<Node, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits = |p: &mut Self| {
            let s = p.pos;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.pos += 1;
            }
            p.pos > s
        };
        if !digits(self) {
            return Err(self.err(start, self.pos + 1, "invalid number"));
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !digits(self) {
                return Err(self.err(start, self.pos, "invalid number: digits expected after `.`"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.err(
                    start,
                    self.pos,
                    "invalid number: digits expected in the exponent",
                ));
            }
        }
        let text = &self.src[start..self.pos];
        let n: serde_json::Number = serde_json::from_str(text)
            .map_err(|_| self.err(start, self.pos, format!("invalid number `{text}`")))?;
        Ok(Node::new(Value::Number(n), Span::new(start, self.pos)))
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.src[run_start..self.pos]);
            match self.peek() {
                None => return Err(self.err(start, start + 1, "unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    let esc = self.pos;
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let cp = self.hex4(esc)?;
                            let ch = if (0xD800..0xDC00).contains(&cp) {
                                if self.bytes.get(self.pos + 1) == Some(&b'\\')
                                    && self.bytes.get(self.pos + 2) == Some(&b'u')
                                {
                                    self.pos += 2;
                                    let lo = self.hex4(esc)?;
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        return Err(self.err(esc, self.pos + 1, "invalid UTF-16 surrogate pair in \\u escape"));
                                    }
                                    char::from_u32(0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00))
                                } else {
                                    None
                                }
                            } else {
                                char::from_u32(cp)
                            };
                            match ch {
                                Some(c) => out.push(c),
                                None => return Err(self.err(esc, self.pos + 1, "invalid \\u escape (lone surrogate)")),
                            }
                        }
                        _ => {
                            return Err(self.err(esc, self.pos + 1, format!(
                                "invalid escape `\\{}` in a string (write `\\\\` for a backslash, as in Windows paths)",
                                self.src[self.pos..].chars().next().unwrap_or(' ')
                            )))
                        }
                    }
                    self.pos += 1;
                }
                Some(_) => {
                    return Err(self.err(
                        self.pos,
                        self.pos + 1,
                        "control character inside a string: escape newlines as \\n and tabs as \\t",
                    ))
                }
            }
        }
    }

    /// Reads the 4 hex digits after `\u` (self.pos at the `u`); leaves pos at the last digit.
    fn hex4(&mut self, esc: usize) -> Result<u32, ParseError> {
        let h = self
            .src
            .get(self.pos + 1..self.pos + 5)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        match h {
            Some(h) => {
                self.pos += 4;
                Ok(u32::from_str_radix(h, 16).unwrap_or(0))
            }
            None => Err(self.err(
                esc,
                self.pos + 1,
                "invalid \\u escape: four hex digits expected",
            )),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node, ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Node::new(Value::Array(items), Span::new(start, self.pos)));
                }
                None => return Err(self.err(start, start + 1, "unterminated array: `]` expected")),
                _ => {}
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => {
                    let comma = self.pos;
                    self.pos += 1;
                    self.skip_ws()?;
                    if self.peek() == Some(b']') {
                        self.notes.push(ParseNote {
                            span: Span::new(comma, comma + 1),
                            message: "trailing comma before `]`".into(),
                        });
                    }
                }
                Some(b']') => {}
                None => return Err(self.err(start, start + 1, "unterminated array: `]` expected")),
                _ => {
                    return Err(self.err(
                        self.pos,
                        self.pos + 1,
                        format!(
                            "expected `,` or `]` after an array element, found {}",
                            self.describe_here()
                        ),
                    ))
                }
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node, ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut members = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Node::new(
                        Value::Object(members),
                        Span::new(start, self.pos),
                    ));
                }
                Some(b'"') => {}
                None => {
                    return Err(self.err(start, start + 1, "unterminated object: `}` expected"))
                }
                _ => {
                    return Err(self.err(
                        self.pos,
                        self.pos + 1,
                        format!(
                            "expected a property name in double quotes, found {}",
                            self.describe_here()
                        ),
                    ))
                }
            }
            let kstart = self.pos;
            let name = self.string()?;
            let key = Key {
                name,
                span: Span::new(kstart, self.pos),
            };
            self.skip_ws()?;
            if self.peek() != Some(b':') {
                return Err(self.err(
                    self.pos,
                    self.pos + 1,
                    format!(
                        "expected `:` after the property name \"{}\", found {}",
                        key.name,
                        self.describe_here()
                    ),
                ));
            }
            self.pos += 1;
            self.skip_ws()?;
            let v = self.value(depth + 1)?;
            members.push((key, v));
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => {
                    let comma = self.pos;
                    self.pos += 1;
                    self.skip_ws()?;
                    if self.peek() == Some(b'}') {
                        self.notes.push(ParseNote {
                            span: Span::new(comma, comma + 1),
                            message: "trailing comma before `}`".into(),
                        });
                    }
                }
                Some(b'}') => {}
                None => {
                    return Err(self.err(start, start + 1, "unterminated object: `}` expected"))
                }
                _ => {
                    return Err(self.err(
                        self.pos,
                        self.pos + 1,
                        format!(
                        "expected `,` or `}}` after a property value, found {} (a missing comma?)",
                        self.describe_here()
                    ),
                    ))
                }
            }
        }
    }
}

/// Maps byte offsets to 1-based line and column (columns count characters).
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes `src`.
    pub fn new(src: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(
            src.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    /// `(line, column)`, both 1-based, of byte `offset` in `src`.
    pub fn line_col(&self, src: &str, offset: usize) -> (usize, usize) {
        let offset = offset.min(src.len());
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let ls = self.starts[line];
        let col = src
            .get(ls..offset)
            .map_or(offset - ls, |s| s.chars().count())
            + 1;
        (line + 1, col)
    }

    /// The text of 1-based `line`, without its newline.
    pub fn line_text<'s>(&self, src: &'s str, line: usize) -> &'s str {
        let Some(&s) = self.starts.get(line.wrapping_sub(1)) else {
            return "";
        };
        let e = self.starts.get(line).map_or(src.len(), |&e| e);
        src.get(s..e).unwrap_or("").trim_end_matches(['\n', '\r'])
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Parsed {
        parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn comments_and_trailing_commas() {
        let p = ok("// head\n{ /* a */ \"a\": [1, 2,], // x\n \"b\": {\"c\": null,}, }");
        assert_eq!(
            p.root.to_json(),
            serde_json::json!({"a": [1, 2], "b": {"c": null}})
        );
        assert_eq!(p.notes.len(), 3);
    }

    #[test]
    fn spans_and_line_columns() {
        let src = "{\n  \"a\": \"xé\",\n  \"b\": 12\n}";
        let p = ok(src);
        let b = p.root.get("b").unwrap();
        let idx = LineIndex::new(src);
        assert_eq!(idx.line_col(src, b.span.start), (3, 8));
        let a = p.root.get("a").unwrap();
        assert_eq!(&src[a.span.start..a.span.end], "\"xé\"");
        assert_eq!(idx.line_text(src, 2), "  \"a\": \"xé\",");
    }

    #[test]
    fn errors_are_located() {
        for (src, at, needle) in [
            ("{\"a\": 1 \"b\": 2}", 8, "missing comma"),
            ("{a: 1}", 1, "property name in double quotes"),
            ("{\"a\": 'x'}", 6, "single-quoted"),
            ("{\"p\": \"c:\\temp\\x\"}", 14, "invalid escape"),
            ("{\"a\": [1, 2}", 11, "`,` or `]`"),
            ("", 0, "empty"),
            ("{\"a\": 1} x", 9, "after the end"),
            ("{\"a\": tru}", 6, "expected a value"),
            ("{\"a\": \"x", 6, "unterminated string"),
        ] {
            let e = parse(src).expect_err(src);
            assert_eq!(e.span.start, at, "{src}: {e}");
            assert!(e.message.contains(needle), "{src}: {e}");
        }
    }

    #[test]
    fn deep_nesting_fails_fast() {
        let src = "[".repeat(5_000_000);
        let e = parse(&src).unwrap_err();
        assert!(e.message.contains("nesting deeper"));
    }

    #[test]
    fn escapes() {
        let p = ok(r#"["a\"b\\c\/\n\u00e9\ud83d\ude00"]"#);
        assert_eq!(p.root.to_json(), serde_json::json!(["a\"b\\c/\né😀"]));
        assert!(parse(r#"["\ud83d"]"#).is_err());
    }
}
