//! The span reader: TOML text to values that know the line each of their parts is on.
//!
//! `toml_edit` parses the text and keeps each item's byte span; this turns the tree into
//! [`Val`]s placed by line, so the checker can say `FILE:LINE:` without seeing the text.

use toml_edit::{ImDocument, Item, Table, Value};

/// A value and the line it starts on (1-based).
#[derive(Clone, Debug)]
pub(super) struct Located<T> {
    line: usize,
    value: T,
}

impl<T> Located<T> {
    pub(super) fn new(line: usize, value: T) -> Self {
        Located { line, value }
    }
    pub(super) fn line(&self) -> usize {
        self.line
    }
    pub(super) fn get_ref(&self) -> &T {
        &self.value
    }
    pub(super) fn into_inner(self) -> T {
        self.value
    }
}

/// A table's entries in the file's order. A key is placed where its value is: its own line
/// for `key = value`, the table's header for `[table]`.
pub(super) type Entries = Vec<Entry>;
pub(super) type Entry = (Located<String>, Located<Val>);

/// A TOML value whose parts know their lines.
#[derive(Clone, Debug)]
pub(super) enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// No key of a test file takes one; kept so the checker can say so.
    Datetime,
    Array(Vec<Located<Val>>),
    Table(Entries),
}

impl Val {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Bool(_) => "a boolean",
            Val::Datetime => "a date-time",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

/// The document's top-level entries, or its first syntax error (a duplicate key is one) as
/// (line, message).
pub(super) fn read(text: &str) -> Result<Entries, (usize, String)> {
    let lines = Lines::new(text);
    let doc = ImDocument::parse(text).map_err(|e| {
        let line = e.span().map(|s| lines.of(s.start)).unwrap_or(1);
        (line, e.message().trim().replace('\n', "; "))
    })?;
    Ok(lines.entries(doc.as_table()))
}

/// Byte offsets to line numbers.
struct Lines {
    /// Where each `\n` is.
    newlines: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Self {
        Lines { newlines: text.match_indices('\n').map(|(i, _)| i).collect() }
    }

    fn of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    fn at(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        span.map(|s| self.of(s.start))
    }

    fn item(&self, item: &Item) -> Located<Val> {
        match item {
            Item::Value(v) => self.value(v),
            Item::Table(t) => self.table(t),
            Item::ArrayOfTables(a) => {
                let tables = a.iter().map(|t| self.table(t)).collect();
                Located::new(self.at(a.span()).unwrap_or(1), Val::Array(tables))
            }
            Item::None => unreachable!("a parsed document holds no empty items"),
        }
    }

    /// A table, placed at its header; a table no header names (`nodes` of `[nodes.a]`, or
    /// the parents of a dotted key) at its first entry.
    fn table(&self, t: &Table) -> Located<Val> {
        let entries = self.entries(t);
        let line = self.at(t.span()).or_else(|| entries.first().map(|(_, v)| v.line())).unwrap_or(1);
        Located::new(line, Val::Table(entries))
    }

    fn entries(&self, t: &Table) -> Entries {
        t.iter().map(|(k, v)| self.entry(k, self.item(v))).collect()
    }

    fn entry(&self, key: &str, value: Located<Val>) -> Entry {
        (Located::new(value.line(), key.to_owned()), value)
    }

    fn value(&self, v: &Value) -> Located<Val> {
        let val = match v {
            Value::String(s) => Val::Str(s.value().clone()),
            Value::Integer(i) => Val::Int(*i.value()),
            Value::Float(f) => Val::Float(*f.value()),
            Value::Boolean(b) => Val::Bool(*b.value()),
            Value::Datetime(_) => Val::Datetime,
            Value::Array(a) => Val::Array(a.iter().map(|v| self.value(v)).collect()),
            Value::InlineTable(t) => {
                Val::Table(t.iter().map(|(k, v)| self.entry(k, self.value(v))).collect())
            }
        };
        Located::new(self.at(v.span()).unwrap_or(1), val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(entries: &'a Entries, key: &str) -> &'a Located<Val> {
        &entries.iter().find(|(k, _)| k.get_ref() == key).unwrap().1
    }

    fn table(v: &Located<Val>) -> &Entries {
        let Val::Table(t) = v.get_ref() else { panic!("not a table: {v:?}") };
        t
    }

    #[test]
    fn values_and_tables_know_their_lines() {
        let text = "# c\n[nodes.a]\ncpus = 2\n\n[[step]]\non = [\n  \"a\",\n  \"b\",\n]\nwhen = 1979-05-27\n";
        let top = read(text).unwrap();
        // `nodes` has no header of its own: it is where its first entry is.
        let nodes = find(&top, "nodes");
        assert_eq!(nodes.line(), 2);
        let a = find(table(nodes), "a");
        assert_eq!((a.line(), find(table(a), "cpus").line()), (2, 3));
        let Val::Array(steps) = find(&top, "step").get_ref() else { panic!() };
        let on = find(table(&steps[0]), "on");
        let Val::Array(names) = on.get_ref() else { panic!() };
        assert_eq!((steps[0].line(), on.line(), names[1].line()), (5, 6, 8));
        assert_eq!(find(table(&steps[0]), "when").get_ref().kind(), "a date-time");
        // A key is placed where its value is.
        assert!(table(&steps[0]).iter().all(|(k, v)| k.line() == v.line()));
    }

    #[test]
    fn a_syntax_error_is_placed_on_its_line() {
        let (line, msg) = read("a = 1\r\nb = \r\n").unwrap_err();
        assert_eq!(line, 2, "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
