//! A small namespace-resolved XML tree over quick-xml, enough for SOAP envelopes.
//!
//! WS-Man peers choose their own prefixes (`s:`/`env:`/`soap:`), so everything here is keyed by
//! namespace URI and local name, never by prefix. Whitespace-only text between elements is
//! dropped; entity and character references are resolved.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// An element: its expanded name, attributes (expanded names), children and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// Namespace URI (empty when unbound).
    pub ns: String,
    /// Local name.
    pub name: String,
    /// Attributes as (namespace URI, local name, value), in document order; `xmlns`
    /// declarations are not included.
    pub attrs: Vec<(String, String, String)>,
    /// Child elements in document order.
    pub children: Vec<Element>,
    /// The concatenated character data directly inside this element.
    pub text: String,
}

impl Element {
    /// True if this element is `{ns}name`.
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// The first child `{ns}name`.
    pub fn child(&self, ns: &str, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    /// All children `{ns}name`.
    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(ns, name))
    }

    /// Follow a path of `(ns, name)` steps, taking the first match at each step.
    pub fn path(&self, steps: &[(&str, &str)]) -> Option<&Element> {
        let mut cur = self;
        for (ns, name) in steps {
            cur = cur.child(ns, name)?;
        }
        Some(cur)
    }

    /// The value of the attribute `name` in no namespace.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(ns, n, _)| ns.is_empty() && n == name)
            .map(|(_, _, v)| v.as_str())
    }

    /// Text with surrounding whitespace removed.
    pub fn text_trim(&self) -> &str {
        self.text.trim()
    }

    /// Depth-first search for the first descendant (or self) `{ns}name`.
    pub fn find(&self, ns: &str, name: &str) -> Option<&Element> {
        if self.is(ns, name) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(ns, name))
    }
}

fn ns_of(r: &ResolveResult<'_>) -> Result<String, String> {
    match r {
        ResolveResult::Bound(ns) => Ok(String::from_utf8_lossy(ns.as_ref()).into_owned()),
        ResolveResult::Unbound => Ok(String::new()),
        ResolveResult::Unknown(p) => Err(format!(
            "undeclared namespace prefix `{}`",
            String::from_utf8_lossy(p)
        )),
    }
}

/// Parse a document into its root element. Errors are plain text (the caller names the peer).
pub fn parse(doc: &[u8]) -> Result<Element, String> {
    let mut reader = NsReader::from_reader(doc);
    let mut buf = Vec::new();
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let (ns, ev) = match reader.read_resolved_event_into(&mut buf) {
            Ok((res, ev)) => (ns_of(&res), ev),
            Err(e) => {
                return Err(format!(
                    "XML error at byte {}: {e}",
                    reader.buffer_position()
                ))
            }
        };
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let mut el = Element {
                    ns: ns?,
                    name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                    attrs: Vec::new(),
                    children: Vec::new(),
                    text: String::new(),
                };
                for a in e.attributes() {
                    let a = a.map_err(|e| format!("bad attribute: {e}"))?;
                    let key = a.key;
                    if key.as_namespace_binding().is_some() {
                        continue;
                    }
                    let (ares, local) = reader.resolver().resolve_attribute(key);
                    let ans = ns_of(&ares)?;
                    let value = a
                        .unescape_value()
                        .map_err(|e| format!("bad attribute value: {e}"))?
                        .into_owned();
                    el.attrs.push((
                        ans,
                        String::from_utf8_lossy(local.as_ref()).into_owned(),
                        value,
                    ));
                }
                if matches!(ev, Event::Empty(_)) {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => root = Some(el),
                    }
                } else {
                    stack.push(el);
                }
            }
            Event::End(_) => {
                let el = stack.pop().ok_or("unbalanced end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.decode().map_err(|e| format!("bad text: {e}"))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.decode().map_err(|e| format!("bad CDATA: {e}"))?;
                    top.text.push_str(&s);
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    if let Some(c) = r.resolve_char_ref().map_err(|e| e.to_string())? {
                        top.text.push(c);
                    } else {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        let v = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?;
                        top.text.push_str(v);
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !stack.is_empty() {
        return Err("document ended inside an element".into());
    }
    root.ok_or_else(|| "empty document".into())
}

/// Escape text for element content or a double-quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// A canonical, prefix-free rendering of a tree: for comparing two documents that differ only
/// in prefixes, namespace declarations, attribute order and whitespace between elements.
pub fn canonical(el: &Element) -> String {
    let mut out = String::new();
    fn walk(el: &Element, depth: usize, out: &mut String) {
        let mut attrs: Vec<_> = el.attrs.iter().collect();
        attrs.sort();
        out.push_str(&"  ".repeat(depth));
        out.push_str(&format!("{{{}}}{}", el.ns, el.name));
        for (ns, n, v) in attrs {
            out.push_str(&format!(" {{{ns}}}{n}={v:?}"));
        }
        let t = el.text.trim();
        if !t.is_empty() {
            out.push_str(&format!(" text={t:?}"));
        }
        out.push('\n');
        for c in &el.children {
            walk(c, depth + 1, out);
        }
    }
    walk(el, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_prefixes_entities_and_attributes() {
        let doc = br#"<?xml version="1.0"?><a:x xmlns:a="urn:a" xmlns:b="urn:b" b:k="1&amp;2" k="v">t&lt;1&#65;<b:y/>u</a:x>"#;
        let el = parse(doc).unwrap();
        assert!(el.is("urn:a", "x"));
        assert_eq!(el.text, "t<1Au");
        assert_eq!(el.attr("k"), Some("v"));
        assert!(el
            .attrs
            .contains(&("urn:b".into(), "k".into(), "1&2".into())));
        assert!(el.child("urn:b", "y").is_some());
    }

    #[test]
    fn rejects_broken_documents() {
        assert!(parse(b"<a><b></a>").is_err());
        assert!(parse(b"<p:a/>").is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn escape_round_trips() {
        let s = "a<b>&\"c'\r\n";
        let doc = format!("<x a=\"{}\">{}</x>", escape(s), escape(s));
        let el = parse(doc.as_bytes()).unwrap();
        assert_eq!(el.text, s);
        assert_eq!(el.attr("a"), Some(s));
    }
}
