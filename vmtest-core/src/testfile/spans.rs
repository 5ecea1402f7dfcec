//! The span reader: TOML text to values that remember where each of their parts is.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A value and the byte range it came from. Like `toml::Spanned`, but also accepts the
/// implicit tables of dotted headers (`[nodes.a]` makes `nodes` without a span), which
/// `toml::Spanned` refuses; those get an empty span at the start.
#[derive(Clone, Debug)]
pub(super) struct Spanned<T> {
    span: std::ops::Range<usize>,
    value: T,
}

impl<T> Spanned<T> {
    pub(super) fn new(span: std::ops::Range<usize>, value: T) -> Self {
        Spanned { span, value }
    }
    pub(super) fn span(&self) -> std::ops::Range<usize> {
        self.span.clone()
    }
    pub(super) fn get_ref(&self) -> &T {
        &self.value
    }
    pub(super) fn into_inner(self) -> T {
        self.value
    }
}

const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPAN_START: &str = "$__serde_spanned_private_start";
const SPAN_END: &str = "$__serde_spanned_private_end";
const SPAN_VALUE: &str = "$__serde_spanned_private_value";

impl<'de> Deserialize<'de> for Spanned<Val> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Spanned<Val>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let Some(first) = map.next_key::<String>()? else {
                    return Ok(Spanned::new(0..0, Val::Table(Vec::new())));
                };
                if first != SPAN_START {
                    // A table without a span: read it as one.
                    let mut items = Vec::new();
                    let v = map.next_value::<Spanned<Val>>()?;
                    items.push((Spanned::new(v.span(), first), v));
                    while let Some(k) = map.next_key::<String>()? {
                        let v = map.next_value::<Spanned<Val>>()?;
                        items.push((Spanned::new(v.span(), k), v));
                    }
                    let start = items.first().map(|(_, v)| v.span.start).unwrap_or(0);
                    return Ok(Spanned::new(start..start, Val::Table(items)));
                }
                let start: usize = map.next_value()?;
                let mut end = start;
                let mut value = None;
                while let Some(k) = map.next_key::<String>()? {
                    if k == SPAN_END {
                        end = map.next_value()?;
                    } else if k == SPAN_VALUE {
                        value = Some(map.next_value::<Val>()?);
                    } else {
                        let _ = map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                let value = value.ok_or_else(|| serde::de::Error::missing_field(SPAN_VALUE))?;
                Ok(Spanned::new(start..end, value))
            }
        }
        d.deserialize_struct(SPANNED, &[SPAN_START, SPAN_END, SPAN_VALUE], V)
    }
}

/// A TOML value that remembers where each of its parts is.
#[derive(Clone, Debug)]
pub(super) enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Spanned<Val>>),
    Table(Vec<(Spanned<String>, Spanned<Val>)>),
}

impl Val {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Bool(_) => "a boolean",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Val, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Val, E> {
                Ok(Val::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Val, E> {
                Ok(Val::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Val, E> {
                Ok(Val::Int(v as i64))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Val, E> {
                Ok(Val::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Val, E> {
                Ok(Val::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Val, E> {
                Ok(Val::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Val, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element::<Spanned<Val>>()? {
                    items.push(v);
                }
                Ok(Val::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Val, A::Error> {
                let mut items = Vec::new();
                // Keys carry no span of their own here (toml only spans borrowed keys): a key
                // is placed where its value is, which is its line for `key = value` and the
                // table's header for `[table]`.
                while let Some(k) = map.next_key::<String>()? {
                    let v = map.next_value::<Spanned<Val>>()?;
                    items.push((Spanned::new(v.span(), k), v));
                }
                Ok(Val::Table(items))
            }
        }
        d.deserialize_any(V)
    }
}
